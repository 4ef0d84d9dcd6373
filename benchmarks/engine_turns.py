"""A CPU engine taking turns with decoding: ONNX Runtime's thread-pool spinning against the cycle the service runs.

    vitserve bench engine-turns                       # the demo artifact at batch 32 (~1 min)
    vitserve bench engine-turns --config vit-small --batch 4

The service's CPU plan (service/cpu_budget.py) runs a batch on every core, then decodes on every core, in turns. How
ONNX Runtime's intra-op pool waits decides both halves: threads that sleep between a model's parallel regions make
the batch slower, threads that go on spinning after the call returns take the cores from the decode turn. One
cycle = one engine call on ``--batch`` images, then a decode turn of as many 640×480 JPEGs on the plan's decode
threads (the artifact's Preprocessor), for each pool setting in turn, rounds interleaved:

- ``sleep inside a run``: ``session.intra_op.allow_spinning=0`` (the service's setting until this benchmark);
- ``spin, stop on return``: ``session.force_spinning_stop=1`` (the service's setting now, OnnxRuntimeEngine's for a
  plan that takes turns);
- ``spin on``: ONNX Runtime's default, as an engine alone would run.

Sessions take OnnxRuntimeEngine's own fixed options (``session_options``: all graph optimisations, sequential, the
plan's intra-op threads). Reported: medians of engine ms per call, decode-turn ms and cycle ms, img/s, and process CPU ms per image.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.front_door import jpeg
from benchmarks.harness.results import checkpoint_for, command_line, environment, finish
from benchmarks.models import CONFIGS

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {  # name → session config entries beyond OnnxRuntimeEngine's fixed options
    "sleep inside a run": {"session.intra_op.allow_spinning": "0"},
    "spin, stop on return": {"session.force_spinning_stop": "1"},
    "spin on": {},
}


def session(path: Path, threads: int, entries: dict[str, str]):
    import onnxruntime as ort

    from service.engines.onnxruntime_engine import session_options

    opts = session_options(threads)
    for key, value in entries.items():
        opts.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def model(args, work: Path):
    """(ONNX file, Preprocessor) of ``--artifact``, or of a random-weight ``--config`` exported here."""
    from service.artifact import Preprocessing, load_artifact
    from service.preprocess import Preprocessor

    if args.config is None:
        art = load_artifact(args.artifact)
        entry = next(e for e in art.manifest.engines if e.format == "onnx" and e.precision == "fp32")
        return art.root / entry.file, Preprocessor(art.manifest.preprocessing)
    from benchmarks.harness.engine_builds import Builds

    builds = Builds(checkpoint_for(args, work)[0], work, max_batch=max(args.batch, 1))
    return builds.file("fp32"), Preprocessor(Preprocessing(resize_mode="exact", resize_size=(builds.h, builds.w), resample="bilinear"))


def run(args) -> dict:
    from service.cpu_budget import plan

    budget = plan(cpu_engine=True)
    with tempfile.TemporaryDirectory() as work:
        path, pre = model(args, Path(work))
        sessions = {name: session(path, budget.engine_threads, entries) for name, entries in SETTINGS.items()}
    image = jpeg()
    pixels = np.stack([pre.from_bytes(image, max_pixels=10**8)] * args.batch)
    name_in = next(iter(sessions.values())).get_inputs()[0].name
    pool = ThreadPoolExecutor(budget.decode_threads)

    def cycle(s) -> tuple[float, float]:
        t0 = time.perf_counter()
        s.run(None, {name_in: pixels})
        t1 = time.perf_counter()
        list(pool.map(lambda _: pre.from_bytes(image, max_pixels=10**8), range(args.batch)))
        return t1 - t0, time.perf_counter() - t1

    for s in sessions.values():
        for _ in range(3):
            cycle(s)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in sessions}
    cpu_s = dict.fromkeys(sessions, 0.0)
    for _ in range(args.rounds):
        for name, s in sessions.items():
            c0 = time.process_time()
            times[name] += [cycle(s) for _ in range(args.cycles)]
            cpu_s[name] += time.process_time() - c0
    rows = []
    for name, t in times.items():
        engine, decode = statistics.median(a for a, _ in t), statistics.median(b for _, b in t)
        rows.append({"setting": name, "config": SETTINGS[name], "engine_ms": round(engine * 1000, 3),
                     "decode_turn_ms": round(decode * 1000, 3), "cycle_ms": round((engine + decode) * 1000, 3),
                     "images_per_s": round(args.batch / (engine + decode), 2),
                     "cpu_ms_per_image": round(cpu_s[name] * 1000 / (len(t) * args.batch), 4)})
    return {"model": str(args.config or args.artifact), "batch": args.batch, "engine_threads": budget.engine_threads,
            "decode_threads": budget.decode_threads, "rounds": args.rounds, "cycles": args.cycles, "rows": rows}


def table(result: dict) -> str:
    base = result["rows"][0]
    lines = [f"{result['model']}, batch {result['batch']}, {result['engine_threads']} engine threads, "
             f"{result['decode_threads']} decode threads; medians of {result['rounds']} × {result['cycles']} cycles per setting, interleaved.", "",
             "| ONNX Runtime pool | engine ms per call | decode turn ms | cycle ms | img/s | ÷ first row | process CPU ms/img |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['setting']} | {r['engine_ms']} | {r['decode_turn_ms']} | {r['cycle_ms']} | {r['images_per_s']} | "
                     f"{r['images_per_s'] / base['images_per_s']:.3f} | {r['cpu_ms_per_image']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.cli import HelpFormatter, quiet_libraries

    p = argparse.ArgumentParser(prog="vitserve bench engine-turns", description=__doc__, formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--artifact", type=Path, default=ROOT / "service" / "demo_artifact")
    src.add_argument("--config", choices=sorted(CONFIGS), default=None, help="a random-weight model instead, exported here")
    p.add_argument("--checkpoint", type=Path, default=None, help=argparse.SUPPRESS)  # checkpoint_for reads it
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--cycles", type=int, default=10, help="cycles per setting per round")
    p.add_argument("--name", default=None, help="results file name (default: engine-turns_<model>)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    quiet_libraries()
    result = run(args)
    md = table(result)
    print(md)
    payload = {"benchmark": "engine-turns", "command": command_line("engine-turns", argv), "environment": environment(), **result}
    rows = [(r["setting"], f"{r['images_per_s']} img/s, engine {r['engine_ms']} ms, decode turn {r['decode_turn_ms']} ms") for r in result["rows"]]
    name = args.name or f"engine-turns_{args.config or Path(args.artifact).name}"
    return finish("engine-turns", payload, rows, table=md, name=None if args.no_write else name)


if __name__ == "__main__":
    sys.exit(main())
