"""Load a running classification service over HTTP or gRPC and report what clients saw and what its stages did.

    vitserve bench load --url http://127.0.0.1:3000 [--concurrency 1,4,16] [--rates 5,10] [--duration 10]
    vitserve bench load --url http://127.0.0.1:3000 --protocol grpc [--grpc 127.0.0.1:8001]   # KServe v2 ModelInfer

Two ways to offer load, both with real JPEG/PNG photographs (benchmarks/photos.py), one image per request:

- closed loop: N clients each send a request, wait for the answer, send the next. Throughput at saturation.
- open loop: requests arrive as a Poisson process at a fixed rate and each is sent at its scheduled time whether
  or not earlier ones have been answered, so queueing shows as latency instead of slowing the client down
  (no coordinated omission: latency counts from the *scheduled* time). A cap on outstanding requests keeps the
  client bounded; an arrival beyond it is recorded as "dropped by client", never silently skipped.

Each phase warms up, then measures a fixed window; /metrics is scraped at the window's start and end, and the
difference of the server's histograms gives mean decode per image, queue wait per image, inference per batch
and batch size over exactly that window, and CPU use is sampled at the same two moments: "other_processes_cores"
is what processes outside this one's tree took (when the server is not our child, that includes the server).
Traffic goes only to the URL given, and only a loopback one unless
--allow-remote; every phase stops by itself (bounded duration, bounded requests, per-request timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from urllib.parse import urlparse

import httpx

from benchmarks.harness.load import RESPONSE_CHECKS, check_url, grpc_bodies, load_table, multipart_bodies, run_load
from benchmarks.harness.measure import load_average
from benchmarks.harness.results import command_line, environment, finish
from benchmarks.photos import describe, realistic_photos


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.cli import HelpFormatter

    p = argparse.ArgumentParser(
        prog="vitserve bench load", description=__doc__, formatter_class=HelpFormatter,
    )
    p.add_argument("--url", required=True, help="base URL of a running service, e.g. http://127.0.0.1:3000")
    p.add_argument("--kind", default="vitserve", choices=sorted(RESPONSE_CHECKS), help="answer shape to check before loading")
    p.add_argument("--protocol", default="http", choices=("http", "grpc"),
                   help="http: multipart POST /classify; grpc: KServe v2 ModelInfer (image BYTES), /metrics still via --url")
    p.add_argument("--grpc", default=None, metavar="HOST:PORT", help="gRPC address (default: --url's host, port 8001)")
    p.add_argument("--model", default=None, help="model name for gRPC (default: from GET /info)")
    p.add_argument("--concurrency", default="1,4,16", help="closed-loop client counts (empty: none)")
    p.add_argument("--rates", default="", help="open-loop arrival rates, requests/s (empty: none)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before each measured window")
    p.add_argument("--duration", type=float, default=10.0, help="seconds in each measured window")
    p.add_argument("--max-outstanding", type=int, default=64, help="open loop: arrivals beyond this many unanswered are dropped by the client")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request client timeout, seconds")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback URL")
    p.add_argument("--name", default="service-load", help="result file name prefix under benchmarks/results/")
    p.add_argument("--no-write", action="store_true", help="print only; write no result files")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    base = check_url(args.url, args.allow_remote)
    photos = realistic_photos()
    grpc_target = None
    if args.protocol == "grpc":
        grpc_target = args.grpc or f"{urlparse(base).hostname}:8001"
        check_url(f"http://{grpc_target}", args.allow_remote)
        model = args.model or httpx.get(f"{base}/info", timeout=10, trust_env=False).json()["model"]["name"]
        bodies = grpc_bodies(photos, model, args.images_per_request)
    else:
        bodies = multipart_bodies(photos, args.images_per_request)
    load_before = load_average()
    result = asyncio.run(run_load(
        base, bodies, kind=args.kind, concurrency=[int(c) for c in _floats(args.concurrency)], rates=_floats(args.rates),
        warmup_s=args.warmup, duration_s=args.duration, max_outstanding=args.max_outstanding, timeout_s=args.timeout,
        seed=args.seed, protocol=args.protocol, grpc_target=grpc_target,
    ))
    payload = {
        "benchmark": "service_load", "command": command_line("load", argv),
        "environment": environment(), "load_average": {"before": load_before, "after": load_average()},
        "settings": vars(args), "images": describe(photos), **result,
    }
    rows = [(f"closed c={r['concurrency']}", _row(r)) for r in result["closed_loop"]]
    rows += [(f"open {r['target_rate_rps']}/s", _row(r)) for r in result["open_loop"]]
    return finish("service load", payload, rows, table=load_table(result), name=None if args.no_write else args.name)


def _row(r: dict) -> str:
    lat = r["latency"]
    return (f"{r['throughput_images_per_s']:.2f} img/s, p50 {lat['p50_ms']} ms, p90 {lat['p90_ms']} ms, "
            f"p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms, errors {r['errors'] or 'none'}")


if __name__ == "__main__":
    sys.exit(main())
