"""What the batcher costs between requests and a fast engine: ViT-L-shaped rows, a stand-in engine of fixed time.

    vitserve bench batch-assembly                          # this checkout: 3×224×224 float32 rows, batch 32, 10 ms engine
    vitserve bench batch-assembly --against ../old-commit  # and another checkout's batcher, rounds interleaved

The service's own ``Batcher`` (imported from each checkout, in a child process of its own) is fed by 64 concurrent
submitters of one image each on uvloop, as the front-ends feed it, and runs a stand-in engine that sleeps a fixed time
per batch with the GIL released, as a GPU engine waits on its device. No model, no GPU: what is measured is the
batcher's own share, the event loop's CPU per image and how far throughput falls short of the engine's ceiling
(batch size ÷ engine time), which is the time the engine waits for its next batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.harness.results import command_line, environment, finish
from benchmarks.harness.servers import ROOT

# Run in a child with the checkout's directory first on sys.path, so its `service.batcher` is the one measured.
CHILD = r"""
import asyncio, json, sys, time
import numpy as np, uvloop
from service.batcher import Batcher
shape, batch, engine_s, clients, warmup_s, duration_s = json.loads(sys.argv[1])
def engine(x):
    time.sleep(engine_s)  # the GIL released, as a GPU engine waits on its device
    return np.zeros((len(x), 1000), np.float32)
async def submitter(b, row, stop, done):
    while not stop.is_set():
        await b.submit(row[None], time.monotonic() + 60)
        done[0] += 1
async def main():
    b = Batcher(engine, max_batch_size=batch, max_wait_s=0.005, queue_capacity=4 * clients)
    b.start()
    row = np.random.default_rng(0).random(shape, dtype=np.float32)
    stop, done = asyncio.Event(), [0]
    tasks = [asyncio.create_task(submitter(b, row, stop, done)) for _ in range(clients)]
    await asyncio.sleep(warmup_s)
    c0, n0, t0 = time.thread_time(), done[0], time.perf_counter()
    await asyncio.sleep(duration_s)
    c1, n1, t1 = time.thread_time(), done[0], time.perf_counter()
    stop.set()
    await asyncio.gather(*tasks)
    n = n1 - n0
    print(json.dumps({"images_per_s": n / (t1 - t0), "loop_cpu_us_per_image": (c1 - c0) / n * 1e6}))
uvloop.install()
asyncio.run(main())
"""


def git_label(project: Path) -> str:
    r = subprocess.run(["git", "-C", str(project), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or str(project)


def measure(project: Path, args) -> dict:
    spec = json.dumps([[3, args.size, args.size], args.batch, args.engine_ms / 1000, args.clients, args.warmup, args.duration])
    r = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(project)!r})\n" + CHILD, spec],
                       capture_output=True, text=True, cwd=project, timeout=args.warmup + args.duration + 60)
    if r.returncode != 0:
        raise RuntimeError(f"batcher of {project} failed: {r.stderr[-2000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return {"images_per_s": round(out["images_per_s"], 1), "loop_cpu_us_per_image": round(out["loop_cpu_us_per_image"], 1)}


def run(args) -> dict:
    projects = [ROOT] + ([args.against.resolve()] if args.against else [])
    ceiling = args.batch / (args.engine_ms / 1000)
    rounds: dict[str, list[dict]] = {str(p): [] for p in projects}
    for _ in range(args.rounds):  # interleaved: a drifting host moves every checkout alike
        for p in projects:
            rounds[str(p)].append(measure(p, args))
    rows = []
    for p in projects:
        rs = rounds[str(p)]
        ips = round(statistics.median([r["images_per_s"] for r in rs]), 1)
        rows.append({"project": str(p), "git": git_label(p), "rounds": rs, "images_per_s": ips,
                     "over_engine_ceiling": round(ips / ceiling, 3),
                     "loop_cpu_us_per_image": round(statistics.median([r["loop_cpu_us_per_image"] for r in rs]), 1)})
    return {"row_shape": [3, args.size, args.size], "batch": args.batch, "engine_ms": args.engine_ms,
            "clients": args.clients, "engine_ceiling_images_per_s": round(ceiling, 1), "results": rows}


def table(result: dict) -> str:
    lines = [f"Rows 3×{result['row_shape'][1]}×{result['row_shape'][2]} float32, batch {result['batch']}, a stand-in engine of "
             f"{result['engine_ms']} ms a batch (ceiling **{result['engine_ceiling_images_per_s']} img/s**), "
             f"{result['clients']} submitters of one image each; medians of {len(result['results'][0]['rounds'])} interleaved rounds.",
             "", "| checkout | img/s | ÷ the engine's ceiling | event loop CPU µs per image |", "|---|---|---|---|"]
    for r in result["results"]:
        lines.append(f"| {r['git']} | {r['images_per_s']} | {r['over_engine_ceiling']} | {r['loop_cpu_us_per_image']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vitserve bench batch-assembly", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=224, help="rows are 3×size×size float32 (ViT-L: 224)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--engine-ms", type=float, default=10.0, help="the stand-in engine's time per batch")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--against", type=Path, help="another checkout whose batcher is measured beside this one's")
    p.add_argument("--name", default="batch-assembly")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    result = {"environment": environment(), "command": command_line("batch-assembly", argv), **run(args)}
    rows = [(r["git"], f"{r['images_per_s']} img/s ({r['over_engine_ceiling']} of the engine's ceiling), "
                       f"event loop {r['loop_cpu_us_per_image']} µs CPU per image") for r in result["results"]]
    return finish("batch assembly", result, rows, table=table(result), name=None if args.no_write else args.name)


if __name__ == "__main__":
    sys.exit(main())
