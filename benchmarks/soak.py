"""A soak: the service at 70 % of its saturation for half an hour, with every protocol and a trickle of bad requests,
watched minute by minute for what only time shows (a leak of memory, file descriptors or threads; latency drifting).

    vitserve bench soak                          # the demo artifact, 30 minutes
    vitserve bench soak --minutes 3 --no-write   # a rehearsal

It starts `vitserve serve` (default settings), measures saturation (a closed loop of 16 clients, raw JPEG bodies), then
offers Poisson arrivals at ``--load`` × that rate: one 640×480 JPEG per request, spread over multipart, raw body,
KServe v2 binary and gRPC in turn, and one request in 100 a corrupt image (answered 4xx). Each minute it records the
server's RSS, open file descriptors and threads (its whole process tree, from /proc via psutil), p50/p99 of the
answered requests and their statuses, the server's CPU per request, and the cores other processes (and a
hypervisor's steal) took from the machine meanwhile. The verdict compares the last minutes with the first after a warm-up minute:
RSS growth, file descriptors and threads (flat), p99 drift (the median of the last five minutes' p99 over the first
five's).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = ("multipart", "raw", "v2-binary", "grpc")
BAD_EVERY = 100


def tree_stats(pid: int) -> dict:
    """RSS (MB), open file descriptors and threads of the server's whole process tree."""
    import psutil

    root = psutil.Process(pid)
    rss = fds = threads = cpu = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            with p.oneshot():
                rss += p.memory_info().rss
                fds += p.num_fds()
                threads += p.num_threads()
                cpu += sum(p.cpu_times()[:2])
        except psutil.Error:
            pass
    return {"rss_mb": round(rss / 2**20, 1), "fds": fds, "threads": threads, "cpu_s": cpu}


async def soak(url: str, grpc_target: str, pid: int, model: str, rate: float, minutes: int, seed: int = 0) -> list[dict]:
    import grpc

    from benchmarks.front_door import grpc_request, http_request, jpeg
    from benchmarks.harness.load import poisson_schedule
    from benchmarks.harness.raw_http import RawHttp

    image, host = jpeg(), url.split("//", 1)[1]
    client = RawHttp(url)
    wires = {p: http_request(p, image, model, host) for p in PROTOCOLS if p != "grpc"}
    bad = http_request("raw", b"\xff\xd8\xff\xe0 not really a JPEG" * 8, model, host)
    channel = grpc.aio.insecure_channel(grpc_target, options=[("grpc.max_receive_message_length", -1)])
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    message = grpc_request(image, model)
    records: list[dict] = []
    minute_stats: list[dict] = []

    async def grpc_post(rec: dict) -> None:
        try:
            await call(message, timeout=30)
            rec["status"] = "200"
        except grpc.aio.AioRpcError as e:
            rec["status"] = e.code().name
        rec["done"] = time.perf_counter()

    async def sample() -> None:
        # Each minute also records what the machine did besides this benchmark and its server (other processes and a
        # hypervisor's steal): on a shared machine, a p99 that moves with it is the machine, not a leak.
        from benchmarks.harness.measure import cpu_snapshot, other_cpu_load

        before, cpu_before = cpu_snapshot(), tree_stats(pid)["cpu_s"]
        for m in range(minutes):
            await asyncio.sleep(max(0.0, t0 + 60 * (m + 1) - time.perf_counter()))
            now, stats = cpu_snapshot(), tree_stats(pid)
            minute_stats.append({"minute": m + 1, **stats, "server_cpu_s": stats["cpu_s"] - cpu_before,
                                 "other_cores": other_cpu_load(before, now)["other_processes_cores"]})
            before, cpu_before = now, stats["cpu_s"]

    t0 = time.perf_counter() + 0.05
    sampler = asyncio.ensure_future(sample())
    tasks = []
    for i, offset in enumerate(poisson_schedule(rate, 60 * minutes, seed)):
        due = t0 + offset
        if (delay := due - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        protocol = "bad" if i % BAD_EVERY == BAD_EVERY - 1 else PROTOCOLS[i % len(PROTOCOLS)]
        rec = {"scheduled": due, "protocol": protocol}
        records.append(rec)
        if protocol == "grpc":
            tasks.append(asyncio.ensure_future(grpc_post(rec)))
        else:
            tasks.append(asyncio.ensure_future(client.post(bad if protocol == "bad" else wires[protocol], rec, 30)))
        if len(tasks) > 4096:
            tasks = [t for t in tasks if not t.done()]
    await asyncio.gather(*tasks)
    await sampler
    client.close()
    await channel.close()
    return minute_table(records, minute_stats, t0)


def minute_table(records: list[dict], stats: list[dict], t0: float) -> list[dict]:
    from benchmarks.harness.measure import latency_summary_ms

    rows = []
    for s in stats:
        lo, hi = t0 + 60 * (s["minute"] - 1), t0 + 60 * s["minute"]
        window = [r for r in records if lo <= r["scheduled"] < hi]
        ok = [r["done"] - r["scheduled"] for r in window if r.get("status") == "200"]
        bad = [r for r in window if r["protocol"] == "bad"]
        lat = latency_summary_ms(ok)
        s = {k: v for k, v in s.items() if k != "cpu_s"}
        s["server_cpu_ms_per_request"] = round(s.pop("server_cpu_s") / max(len(window), 1) * 1000, 3)
        rows.append({**s, "requests": len(window), "answered_200": len(ok), "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"],
                     "statuses": dict(Counter(r.get("status", "never") for r in window)),
                     "bad_requests_4xx": sum(1 for r in bad if str(r.get("status", "")).startswith("4"))})
    return rows


def verdict(rows: list[dict], warmup: int = 1) -> dict:
    import statistics

    steady = rows[min(warmup, len(rows) - 1):]  # a rehearsal of one minute has no warm-up to drop
    first, last = steady[: min(5, len(steady))], steady[-min(5, len(steady)):]
    p99 = lambda rs: statistics.median(r["p99_ms"] for r in rs if r["p99_ms"] is not None)  # noqa: E731
    statuses = Counter()
    for r in rows:
        statuses.update(r["statuses"])
    return {
        "rss_growth": round(steady[-1]["rss_mb"] / steady[0]["rss_mb"] - 1, 4),
        "fds": [min(r["fds"] for r in steady), max(r["fds"] for r in steady)],
        "threads": [min(r["threads"] for r in steady), max(r["threads"] for r in steady)],
        "p99_first_ms": p99(first), "p99_last_ms": p99(last), "p99_drift": round(p99(last) / p99(first) - 1, 4),
        "statuses": dict(statuses),
        "server_errors": sum(v for k, v in statuses.items() if k.startswith("5") or k in ("INTERNAL", "UNKNOWN")),
    }


def table(rows: list[dict], v: dict) -> str:
    lines = ["| minute | requests | 200 | p50 ms | p99 ms | server CPU ms/request | other processes (cores) | RSS MB | fds | threads | bad → 4xx |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['minute']} | {r['requests']} | {r['answered_200']} | {r['p50_ms']} | {r['p99_ms']} | "
                     f"{r['server_cpu_ms_per_request']} | {r['other_cores']} | {r['rss_mb']} | {r['fds']} | {r['threads']} | "
                     f"{r['bad_requests_4xx']} |")
    lines.append(f"\nAfter the first minute: RSS growth {v['rss_growth']:+.1%}, file descriptors {v['fds'][0]}-{v['fds'][1]}, "
                 f"threads {v['threads'][0]}-{v['threads'][1]}, p99 {v['p99_first_ms']} → {v['p99_last_ms']} ms "
                 f"(drift {v['p99_drift']:+.1%}); statuses {v['statuses']}.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="vitserve bench soak", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--artifact", type=Path, default=ROOT / "service" / "demo_artifact")
    p.add_argument("--minutes", type=int, default=30)
    p.add_argument("--load", type=float, default=0.7, help="offered load as a fraction of the measured saturation")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/vitserve-soak"))
    p.add_argument("--name", default="soak")
    p.add_argument("--no-write", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    import uvloop

    from benchmarks.harness.results import command_line, environment, finish
    from benchmarks.harness.servers import running_vitserve
    from benchmarks.overload import saturation
    from service.artifact import load_artifact

    args = build_parser().parse_args(argv)
    model = load_artifact(args.artifact, verify=False).manifest.model.name
    with running_vitserve(args.artifact, args.workdir) as server:
        sat = uvloop.run(saturation(server.url, 16))
        rate = args.load * sat["images_per_s"]
        print(f"saturation {sat['images_per_s']} img/s; offering {rate:.1f} req/s for {args.minutes} min", flush=True)
        rows = uvloop.run(soak(server.url, server.grpc_address, server.proc.pid, model, rate, args.minutes))
    v = verdict(rows)
    payload = {"benchmark": "soak", "command": command_line("soak", argv), "environment": environment(),
               "saturation_images_per_s": sat["images_per_s"], "offered_rps": rate, "minutes": rows, "verdict": v}
    summary = [("RSS growth", f"{v['rss_growth']:+.1%} (target ≤ +5 %)"), ("fds", f"{v['fds'][0]}-{v['fds'][1]}"),
               ("threads", f"{v['threads'][0]}-{v['threads'][1]}"), ("p99 drift", f"{v['p99_drift']:+.1%} (target ≤ 20 %)"),
               ("5xx", str(v["server_errors"]))]
    return finish("soak", payload, summary, table=table(rows, v), name=None if args.no_write else args.name)


if __name__ == "__main__":
    sys.exit(main())
