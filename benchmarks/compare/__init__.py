"""Our service against its peers: same model, same machine, same images, same offered load, one run.

    vitserve bench compare --config vit-small        # the committed CPU table (~6 min on 2 quiet cores)
    vitserve bench compare --config tiny --concurrency 1,4 --warmup 0.5 --duration 2 --peers '' --no-write   # smoke

Steps, in order: build the model (random weights from a named config, or --checkpoint, or reuse --artifact) →
export it with the real pipeline → start every service on its own free loopback port — ours (`vitserve serve`,
shipped defaults), the BentoML-idiomatic peer (benchmarks/peers/bentoml_batching.py) and the naive
transformers-pipeline peer (benchmarks/peers/naive_pipeline.py) — and check each answers the same multipart request
→ the raw engine with no server (engine.run at batch sizes up to the service maximum; decode+preprocess timed
apart) → closed loop at each concurrency, every service back to back (order alternating) → open loop (Poisson) at
fixed fractions of *our* saturation, the same rates for every service → the raw engine again → stop everything.

Interleaving matters on a shared machine: other jobs' CPU use changes over minutes, and running each level on all
services in a row makes them share it. CPU taken by processes outside this benchmark is recorded per window, and a
run where it exceeded 0.25 cores anywhere is marked as not valid.

Then the ratios (ours ÷ each peer: throughput at saturation, p99 at each offered rate), the targets with by how
much each is met or missed, and — from our service's own stage histograms — what a miss is blamed on.
Results: benchmarks/results/compare_<model>_<env>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from benchmarks.compare.judge import add_verdicts
from benchmarks.compare.render import summary_rows, tables
from benchmarks.compare.run import PEERS, run_compare
from benchmarks.harness.measure import load_average, wait_until_quiet
from benchmarks.harness.results import command_line, environment, finish, result_stem
from benchmarks.models import CONFIGS

# The data flow, one module per step: run.py measures (→ the result dict), judge.py adds targets and validity to it
# (pure functions of the numbers), render.py turns it into markdown and summary rows; report() below draws the figure
# and writes the files. `--from-json` skips run.py: a stored result is judged and rendered again.


# ---- command line ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from benchmarks.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="vitserve bench compare", description=__doc__, formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", choices=sorted(CONFIGS), default="vit-small", help="random-weight model of this size")
    src.add_argument("--checkpoint", type=Path, help="HF ViT checkpoint directory to export and serve")
    src.add_argument("--artifact", type=Path, help="an existing artifact (skips export)")
    p.add_argument("--service-setting", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for our service, as VITSERVE_KEY (e.g. max_batch_size=4); repeatable. Default: the shipped defaults, "
                        "but max_latency_ms=10000 (the peers refuse nothing either)")
    p.add_argument("--peers", default=",".join(PEERS), help="peers to run, comma-separated (empty: ours and the raw engine only)")
    p.add_argument("--concurrency", default="1,4,8,16", help="closed-loop client counts")
    p.add_argument("--rate-fractions", default="0.5,0.8", help="open-loop rates as fractions of our closed-loop saturation")
    p.add_argument("--rates", default="", help="open-loop rates in requests/s, overriding --rate-fractions (e.g. to repeat another run's offered load)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before each measured window")
    p.add_argument("--duration", type=float, default=15.0, help="seconds in each closed-loop window")
    p.add_argument("--open-duration", type=float, default=40.0,
                   help="seconds in each open-loop window: long enough for a p99 over ~600 requests at half our peak, "
                   "not the 3rd-slowest of 200")
    p.add_argument("--wait-quiet", type=float, default=300.0,
                   help="first wait up to this long for other processes to use < 0.3 cores (0: start at once)")
    p.add_argument("--max-outstanding", type=int, default=64, help="open loop: client cap on unanswered requests")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request client timeout, seconds")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=32, help="export max batch = the largest raw-engine batch measured")
    p.add_argument("--export-images", type=int, default=400, help="parity-gate images during export (0.99 agreement needs ≥ 380)")
    p.add_argument("--raw-seconds", type=float, default=3.0, help="raw engine: measure each batch size at least this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="keep the artifact and server logs here (default: temp dir, removed)")
    p.add_argument("--name", default=None, help="result file prefix (default: compare_<model>)")
    p.add_argument("--no-write", action="store_true", help="print only; write no result files")
    p.add_argument("--from-json", type=Path, default=None,
                   help="measure nothing: re-render targets, tables, figure and summary from a stored result JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from benchmarks.cli import quiet_libraries

    quiet_libraries()
    # SIGTERM (or SIGINT, which background shells ignore) must still stop the servers this run started: turn it
    # into SystemExit so every `with running_…` block's cleanup runs.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return _run(args, argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args, argv) -> int:
    if args.from_json:
        import json

        payload = json.loads(args.from_json.read_text())
        add_verdicts(payload, gpu=bool(payload["environment"]["gpu"]), quiet=(payload.get("validity") or {}).get("before_start"))
        payload["rendered_from_json_at"] = environment()["date"]
        return report(payload, args.name or args.from_json.stem.rsplit("_", 1)[0], write=not args.no_write)
    env = environment()
    quiet = wait_until_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
    load_before = load_average()
    t0 = time.perf_counter()
    result = run_compare(args)
    add_verdicts(result, gpu=bool(env["gpu"]), quiet=quiet)
    payload = {
        "benchmark": "compare",
        "command": command_line("compare", argv),
        "environment": env, "load_average": {"before": load_before, "after": load_average()},
        "wall_s": round(time.perf_counter() - t0, 1),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **result,
    }
    return report(payload, args.name or f"compare_{result['model']['name']}", write=not args.no_write)


def report(payload: dict, name: str, *, write: bool) -> int:
    """Tables, figure, files and the summary block, from the payload alone (so a stored JSON can be re-rendered)."""
    env = payload["environment"]
    md = tables(payload)
    rows = summary_rows(payload)
    rows.append(("wall", f"{payload['wall_s']:.0f} s"))
    figures = []
    if write:
        from benchmarks.plot import latency_throughput

        png = latency_throughput(payload, result_stem(name, env).with_suffix(".png"),
                                 f"{payload['model']['name']} on {env['cpu']} ×{env['cpu_count']}: latency vs throughput")
        payload["figure"] = png.name
        md += f"\n\n![latency vs throughput]({png.name})"
        figures.append(png)
    print()
    print(md)
    print()
    return finish("compare", payload, rows, table=md, name=name if write else None, figures=figures)
