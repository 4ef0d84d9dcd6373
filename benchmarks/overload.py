"""Overload: what clients get at 1×, 2× and 5× the service's saturation rate, for a fixed time.

    vitserve bench overload                                     # the demo artifact, 60 s per multiplier
    vitserve bench overload --multipliers 2 --duration 60 --name overload-before

It starts `vitserve serve` on the artifact (or loads ``--url``), measures the unloaded latency (one client, closed
loop) and the saturation throughput (``--concurrency`` clients, closed loop), then offers Poisson arrivals at each
multiple of saturation, one real 640×480 JPEG per request, sent at their scheduled times whatever the server does
(open loop, no coordinated omission; no client-side cap on outstanding requests). For each phase it reports:

- goodput: 200s completed per second inside the window, and its ratio to saturation;
- p50/p99 of accepted (200) requests, from their scheduled time, against the unloaded p99;
- refusals by status (429, 503, 504, ...) and **unanswered** requests: no HTTP answer at all (connection reset,
  server disconnect, client timeout), by exception type;
- server RSS (the whole process tree) at the start, its maximum and at the end;
- whether the server's own counters (``vitserve_requests_total`` by status) equal what the client saw.

The client is aiohttp with its default keep-alive (15 s idle), as a load balancer or SDK would hold connections: a
server that closes idle connections sooner races with the client's reuse of them.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

from benchmarks.common import environment, latency_summary_ms, load_average, print_summary, write_result
from benchmarks.service_load import multipart_bodies, parse_prometheus, poisson_schedule, total

ROOT = Path(__file__).resolve().parents[1]


class Sampler:
    """The server's process tree RSS, sampled in the background."""

    def __init__(self, pid: int | None):
        self.pid, self.samples = pid, []

    def rss_mb(self) -> float | None:
        if self.pid is None:
            return None
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return None
        rss = 0
        for p in procs:
            try:
                rss += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return rss / 2**20

    async def run(self, stop: asyncio.Event, every_s: float = 0.5) -> None:
        while not stop.is_set():
            if (v := self.rss_mb()) is not None:
                self.samples.append(v)
            try:
                await asyncio.wait_for(stop.wait(), every_s)
            except TimeoutError:
                pass


async def _post(session, url: str, body, rec: dict, timeout_s: float) -> None:
    import aiohttp

    try:
        async with session.post(url, data=body.content, headers=body.headers, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            await r.read()
            rec["status"] = str(r.status)
    except TimeoutError:
        rec["status"] = "client_timeout"
    except aiohttp.ClientError as e:  # no HTTP answer: reset, disconnect, refused
        rec["status"] = type(e).__name__
    rec["done"] = time.perf_counter()


async def _counters(session, base: str) -> Counter:
    async with session.get(f"{base}/metrics") as r:
        samples = parse_prometheus(await r.text())
    out = Counter()
    for name, labels, value in samples:
        if name == "vitserve_requests_total" and labels.get("protocol") == "http":
            out[labels["status"]] += int(value)
    return out


async def closed(base: str, bodies, *, concurrency: int, duration_s: float, warmup_s: float = 2.0) -> dict:
    import aiohttp

    records = []
    async with aiohttp.ClientSession() as session:
        t0 = time.perf_counter()
        start, end = t0 + warmup_s, t0 + warmup_s + duration_s

        async def worker(i: int) -> None:
            k = i
            while time.perf_counter() < end:
                rec = {"scheduled": time.perf_counter()}
                await _post(session, f"{base}/classify", bodies[k % len(bodies)], rec, 30)
                records.append(rec)
                k += concurrency

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    ok = [r for r in records if r["status"] == "200" and start <= r["scheduled"] < end]
    done_in = [r for r in records if r["status"] == "200" and start <= r["done"] < end]
    return {"concurrency": concurrency, "images_per_s": round(len(done_in) / duration_s, 2),
            "latency": latency_summary_ms([r["done"] - r["scheduled"] for r in ok]),
            "statuses": dict(Counter(r["status"] for r in records))}


async def open_phase(base: str, bodies, *, rate: float, duration_s: float, saturation: float, unloaded_p99_ms: float,
                     sampler: Sampler, timeout_s: float, seed: int) -> dict:
    import aiohttp

    schedule = poisson_schedule(rate, duration_s, seed)
    records: list[dict] = []
    # No cap on connections: every arrival is sent at its time; what the server cannot take, it must refuse.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        before = await _counters(session, base)
        stop = asyncio.Event()
        sampling = asyncio.create_task(sampler.run(stop))
        tasks = []
        t0 = time.perf_counter() + 0.05
        for i, offset in enumerate(schedule):
            due = t0 + offset
            if (delay := due - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            rec = {"scheduled": due, "sent": time.perf_counter()}
            records.append(rec)
            tasks.append(asyncio.create_task(_post(session, f"{base}/classify", bodies[i % len(bodies)], rec, timeout_s)))
        await asyncio.wait(tasks, timeout=timeout_s + 10)
        stop.set()
        await sampling
        await asyncio.sleep(0.5)  # the server counts a request just after answering it
        after = await _counters(session, base)
    end = t0 + duration_s
    statuses = Counter(r.get("status", "never_finished") for r in records)
    ok = [r for r in records if r.get("status") == "200"]
    goodput = sum(1 for r in ok if t0 <= r["done"] <= end) / duration_s
    lat = latency_summary_ms([r["done"] - r["scheduled"] for r in ok])
    server = after - before
    http_answers = {k: v for k, v in statuses.items() if k.isdigit()}
    rss = sampler.samples
    return {
        "offered_rps": rate, "sent": len(records), "duration_s": duration_s,
        "achieved_send_lag_p99_ms": latency_summary_ms([r["sent"] - r["scheduled"] for r in records])["p99_ms"],
        "goodput_images_per_s": round(goodput, 2), "goodput_over_saturation": round(goodput / saturation, 3),
        "accepted_latency": lat,
        "p99_over_unloaded_p99": None if lat["p99_ms"] is None else round(lat["p99_ms"] / unloaded_p99_ms, 2),
        "statuses": dict(sorted(statuses.items())),
        "unanswered": {k: v for k, v in statuses.items() if not k.isdigit()},
        "server_counted": dict(sorted(server.items())),
        "counters_exact": dict(server) == http_answers,
        "rss_mb": None if not rss else {"start": round(rss[0], 1), "max": round(max(rss), 1), "end": round(rss[-1], 1)},
    }


def table(result: dict) -> str:
    lines = ["| load | offered req/s | goodput img/s (÷ saturation) | accepted p50 / p99 ms (p99 ÷ unloaded) | 200 | 429 | 503 | 504 | "
             "unanswered | RSS MB start → max | counters exact |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in result["phases"].items():
        s, lat = r["statuses"], r["accepted_latency"]
        lines.append(
            f"| {m}× | {r['offered_rps']:.1f} | {r['goodput_images_per_s']:.1f} ({r['goodput_over_saturation']:.2f}) | "
            f"{lat['p50_ms']} / {lat['p99_ms']} ({r['p99_over_unloaded_p99']}×) | {s.get('200', 0)} | {s.get('429', 0)} | "
            f"{s.get('503', 0)} | {s.get('504', 0)} | {sum(r['unanswered'].values())} {r['unanswered'] or ''} | "
            f"{r['rss_mb']['start'] if r['rss_mb'] else '-'} → {r['rss_mb']['max'] if r['rss_mb'] else '-'} | {r['counters_exact']} |")
    u, sat = result["unloaded"], result["saturation"]
    lines.append(f"\nUnloaded (1 client): p50 {u['latency']['p50_ms']} ms, p99 {u['latency']['p99_ms']} ms. Saturation "
                 f"({sat['concurrency']} clients, closed loop): {sat['images_per_s']} img/s.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="vitserve bench overload", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--artifact", type=Path, default=ROOT / "service" / "demo_artifact", help="artifact to serve")
    p.add_argument("--url", default=None, help="load a running service instead of starting one (no RSS then)")
    p.add_argument("--multipliers", default="1,2,5", help="offered load as multiples of the measured saturation")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per multiplier")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop clients that measure saturation")
    p.add_argument("--saturation", type=float, default=None, help="skip measuring: saturation in img/s")
    p.add_argument("--timeout", type=float, default=30.0, help="client timeout per request, seconds")
    p.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE", help="VITSERVE_* settings for the server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="overload")
    p.add_argument("--no-write", action="store_true")
    return p


async def measure(base: str, args, pid: int | None) -> dict:
    bodies = multipart_bodies([p for p in _photos() if p.content_type == "image/jpeg"])
    unloaded = await closed(base, bodies, concurrency=1, duration_s=10)
    sat = await closed(base, bodies, concurrency=args.concurrency, duration_s=10) if args.saturation is None else \
        {"concurrency": None, "images_per_s": args.saturation, "latency": {}, "statuses": {}}
    print(f"unloaded p99 {unloaded['latency']['p99_ms']} ms; saturation {sat['images_per_s']} img/s", flush=True)
    phases = {}
    for i, m in enumerate(float(x) for x in args.multipliers.split(",")):
        await asyncio.sleep(3)  # let the previous phase's backlog clear
        r = await open_phase(base, bodies, rate=m * sat["images_per_s"], duration_s=args.duration, saturation=sat["images_per_s"],
                             unloaded_p99_ms=unloaded["latency"]["p99_ms"], sampler=Sampler(pid), timeout_s=args.timeout, seed=args.seed + i)
        print(f"{m:g}x: goodput {r['goodput_images_per_s']} img/s ({r['goodput_over_saturation']}), p99 {r['accepted_latency']['p99_ms']} ms, "
              f"statuses {r['statuses']}, counters exact {r['counters_exact']}", flush=True)
        phases[f"{m:g}"] = r
    return {"unloaded": unloaded, "saturation": sat, "phases": phases}


def _photos():
    from benchmarks.photos import realistic_photos

    return realistic_photos()


def main(argv: list[str] | None = None) -> int:
    from benchmarks.servers import running_vitserve

    args = build_parser().parse_args(argv)
    random.seed(args.seed)
    settings = dict(kv.split("=", 1) for kv in args.serve_env)
    load_before = load_average()
    with (nullcontext() if args.url else running_vitserve(args.artifact, Path("/tmp") / f"vitserve-overload-{time.time_ns()}",
                                                          **{k.removeprefix("VITSERVE_").lower(): v for k, v in settings.items()})) as server:
        base = (args.url or server.url).rstrip("/")
        result = asyncio.run(measure(base, args, None if args.url else server.proc.pid))
    payload = {"benchmark": "overload", "command": "vitserve bench overload " + " ".join(argv if argv is not None else sys.argv[1:]),
               "environment": environment(), "load_average": {"before": load_before, "after": load_average()},
               "artifact": str(args.artifact), "server_settings": settings, **result}
    md = table(result)
    print(md)
    rows = [(f"{m}x", f"goodput {r['goodput_over_saturation']:.2f} of saturation, p99 {r['accepted_latency']['p99_ms']} ms "
                      f"({r['p99_over_unloaded_p99']}x unloaded), unanswered {sum(r['unanswered'].values())}, 504 {r['statuses'].get('504', 0)}")
            for m, r in result["phases"].items()]
    if not args.no_write:
        j, m = write_result(args.name, payload, md)
        rows.append(("written", f"{j.name}, {m.name}"))
    print_summary("overload", payload, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
