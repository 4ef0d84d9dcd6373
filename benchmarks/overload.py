"""Overload: what clients get at 1×, 2× and 5× the service's saturation rate, for a fixed time.

    vitserve bench overload                                     # the demo artifact, 60 s per multiplier
    vitserve bench overload --multipliers 2 --duration 60 --name overload-before

It starts `vitserve serve` on the artifact (or loads ``--url``), measures the saturation throughput (the best closed
loop of 4, 8 and 16 clients, which the door never refuses: up to twice the max batch in flight is always admitted) on
that same server before the phases and again after them (goodput is divided by the mean of the two), and the
unloaded latency (one client), then offers Poisson arrivals at each multiple of saturation, one real 640×480 JPEG per request, sent at their scheduled times whatever the server does
(open loop, no coordinated omission; no client-side cap on outstanding requests). For each phase it reports:

- goodput: 200s completed per second inside the window, and its ratio to saturation;
- p50/p99 of accepted (200) requests, from their scheduled time, against the unloaded p99;
- refusals by status (429, 503, 504, ...) and **unanswered** requests: no HTTP answer at all (connection reset,
  server disconnect, client timeout), by exception type;
- server RSS (the whole process tree) at the start, its maximum and at the end;
- whether the server's own counters (``vitserve_requests_total`` by status) equal what the client saw.

The client (``RawHttp``) costs a few tens of µs per request, so that at 5× on a 2-core machine it does not measure
itself, and keeps idle connections 15 s (aiohttp's default), as a load balancer or SDK would: a server that closes
idle connections sooner races with the client's reuse of them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import httpx

from benchmarks.harness.load import multipart_bodies, poisson_schedule
from benchmarks.harness.measure import (latency_summary_ms, load_average, per_image_ms, server_cpu_by_thread_s, server_cpu_s,
                                        thread_budget_table)
from benchmarks.harness.prometheus import REQUESTS_TOTAL, parse_prometheus
from benchmarks.harness.raw_http import RawHttp
from benchmarks.harness.results import command_line, environment, finish
from service import metrics

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


def _counters(base: str) -> Counter:
    samples = parse_prometheus(httpx.get(f"{base}/metrics", timeout=30, trust_env=False).text)
    out = Counter()
    for name, labels, value in samples:
        if name == REQUESTS_TOTAL and labels.get("protocol") == metrics.JSON_API:
            out[labels["status"]] += int(value)
    return out


async def closed(base: str, bodies, *, concurrency: int, duration_s: float, warmup_s: float = 2.0, pid: int | None = None) -> dict:
    client = RawHttp(base)
    wires = [client.wire(b) for b in bodies]
    records = []
    t0 = time.perf_counter()
    start, end = t0 + warmup_s, t0 + warmup_s + duration_s

    cpu: dict[str, float] = {}  # the server's CPU (all of it, and by thread) at the window's edges

    async def window() -> None:
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        cpu["start"], cpu["threads0"] = server_cpu_s(pid), server_cpu_by_thread_s(pid)
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        cpu["end"], cpu["threads1"] = server_cpu_s(pid), server_cpu_by_thread_s(pid)

    async def worker(i: int) -> None:
        k = i
        while time.perf_counter() < end:
            rec = {"scheduled": time.perf_counter()}
            await client.post(wires[k % len(wires)], rec, 30)
            records.append(rec)
            k += concurrency

    await asyncio.gather(*(worker(i) for i in range(concurrency)), *([window()] if pid is not None else []))
    client.close()
    ok = [r for r in records if r["status"] == "200" and start <= r["scheduled"] < end]
    done_in = [r for r in records if r["status"] == "200" and start <= r["done"] < end]
    return {"concurrency": concurrency, "images_per_s": round(len(done_in) / duration_s, 2),
            "server_cpu_ms_per_200": round((cpu["end"] - cpu["start"]) * 1000 / max(len(done_in), 1), 3) if cpu else None,
            "server_cpu_ms_per_200_by_thread": per_image_ms(cpu["threads0"], cpu["threads1"], len(done_in)) if cpu else None,
            "latency": latency_summary_ms([r["done"] - r["scheduled"] for r in ok]),
            "statuses": dict(Counter(r["status"] for r in records))}


async def open_phase(base: str, bodies, *, rate: float, duration_s: float, saturation: float, unloaded_p99_ms: float,
                     sampler: Sampler, timeout_s: float, seed: int) -> dict:
    import psutil

    client = RawHttp(base)
    wires = [client.wire(b) for b in bodies]
    schedule = poisson_schedule(rate, duration_s, seed)
    records: list[dict] = []
    before = await asyncio.to_thread(_counters, base)
    me = psutil.Process()
    cpu_before = sum(me.cpu_times()[:2])
    server_before = server_cpu_s(sampler.pid) if sampler.pid is not None else None
    threads_before = server_cpu_by_thread_s(sampler.pid) if sampler.pid is not None else None
    stop = asyncio.Event()
    sampling = asyncio.create_task(sampler.run(stop))
    tasks = []
    t0 = time.perf_counter() + 0.05
    for i, offset in enumerate(schedule):  # every arrival is sent at its time: what the server cannot take, it refuses
        due = t0 + offset
        if (delay := due - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        rec = {"scheduled": due, "sent": time.perf_counter()}
        records.append(rec)
        tasks.append(asyncio.create_task(client.post(wires[i % len(wires)], rec, timeout_s)))
    await asyncio.wait(tasks, timeout=timeout_s + 10)
    client_cores = (sum(me.cpu_times()[:2]) - cpu_before) / (time.perf_counter() - t0)
    server_s = server_cpu_s(sampler.pid) - server_before if server_before is not None else None
    threads_after = server_cpu_by_thread_s(sampler.pid) if sampler.pid is not None else None
    elapsed = time.perf_counter() - t0
    stop.set()
    await sampling
    client.close()
    await asyncio.sleep(0.5)  # the server counts a request just after answering it
    after = await asyncio.to_thread(_counters, base)
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
        "send_lag_p99_ms": latency_summary_ms([r["sent"] - r["scheduled"] for r in records])["p99_ms"],
        "client_cores": round(client_cores, 3),
        # the server's whole process tree over the phase (its last answers included): cores, and CPU per 200 with the
        # refusals' share in it, to set beside saturation's CPU per image
        "server_cores": None if server_s is None else round(server_s / elapsed, 3),
        "server_cpu_ms_per_200": None if server_s is None else round(server_s * 1000 / max(statuses.get("200", 0), 1), 3),
        "server_cpu_ms_per_200_by_thread": None if server_s is None else per_image_ms(threads_before, threads_after, statuses.get("200", 0)),
        "goodput_images_per_s": round(goodput, 2), "goodput_over_saturation": round(goodput / saturation, 3),
        "accepted_latency": lat,
        "p99_over_unloaded_p99": None if lat["p99_ms"] is None else round(lat["p99_ms"] / unloaded_p99_ms, 2),
        "statuses": dict(sorted(statuses.items())),
        "refusals_with_retry_after": sum(1 for r in records if r.get("status") == "429" and r.get("retry_after")),
        "unanswered": {k: v for k, v in statuses.items() if not k.isdigit()},
        "server_counted": dict(sorted(server.items())),
        "counters_exact": dict(server) == http_answers,
        "rss_mb": None if not rss else {"start": round(rss[0], 1), "max": round(max(rss), 1), "end": round(rss[-1], 1)},
    }


def table(result: dict) -> str:
    lines = ["| load | offered req/s | goodput img/s (÷ saturation) | accepted p50 / p99 ms (p99 ÷ unloaded) | 200 | 429 | 503 | 504 | "
             "unanswered | RSS MB start → max | counters exact | server CPU ms per 200 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in result["phases"].items():
        s, lat = r["statuses"], r["accepted_latency"]
        lines.append(
            f"| {m}× | {r['offered_rps']:.1f} | {r['goodput_images_per_s']:.1f} ({r['goodput_over_saturation']:.2f}) | "
            f"{lat['p50_ms']} / {lat['p99_ms']} ({r['p99_over_unloaded_p99']}×) | {s.get('200', 0)} | {s.get('429', 0)} | "
            f"{s.get('503', 0)} | {s.get('504', 0)} | {sum(r['unanswered'].values())} {r['unanswered'] or ''} | "
            f"{r['rss_mb']['start'] if r['rss_mb'] else '-'} → {r['rss_mb']['max'] if r['rss_mb'] else '-'} | {r['counters_exact']} | "
            f"{r.get('server_cpu_ms_per_200') or '-'} |")
    u, sat = result["unloaded"], result["saturation"]
    if (lim := result.get("server_limits")) is not None:
        lines.append(f"\nThe server's max batch: {lim['max_batch_size']} ({lim['max_batch_size_reason']}); the door's floor: "
                     f"{lim['admission_floor_images']:g} images.")
    cores = result.get("cores")
    if isinstance(cores, dict):
        lines.append(f"\nCores: the server on {cores['server'] or 'its own (--url)'}, this load generator on {cores['client']} "
                     "(the offered load's own CPU does not come out of the server's).")
    lines.append(f"\nUnloaded (1 client): p50 {u['latency']['p50_ms']} ms, p99 {u['latency']['p99_ms']} ms. Saturation "
                 f"({sat['concurrency']} clients, closed loop): {sat['images_per_s']} img/s, p99 {sat['latency'].get('p99_ms')} ms, "
                 f"server CPU {sat.get('server_cpu_ms_per_200') or '-'} ms per image.")
    if (after := result.get("saturation_after")) is not None:
        lines.append(f"Saturation again after the phases, same server: {after['images_per_s']} img/s ({after['concurrency']} clients); "
                     f"goodput ratios are against the mean, **{result['saturation_mean_images_per_s']} img/s** "
                     f"(before and after differ by {result['saturation_spread']:.1%}).")
    if (st := result.get("storm")) is not None:
        lines.append(f"\nRetry storm ({st['concurrency']} closed-loop clients resending at once): goodput {st['images_per_s']} img/s "
                     f"({st['goodput_over_saturation']} of saturation), answered p99 {st['latency']['p99_ms']} ms, statuses {st['statuses']}.")
    budget = [(f"saturation ({sat['concurrency']} clients)", sat.get("server_cpu_ms_per_200_by_thread"))]
    budget += [(f"{m}×", r.get("server_cpu_ms_per_200_by_thread")) for m, r in result["phases"].items()]
    if budget := [(label, by) for label, by in budget if by]:
        lines += ["", "Server CPU ms per 200 by thread (refusals' share included):", "", *thread_budget_table("load", budget)]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="vitserve bench overload", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--artifact", type=Path, default=ROOT / "service" / "demo_artifact", help="artifact to serve")
    p.add_argument("--url", default=None, help="load a running service instead of starting one (no RSS then)")
    p.add_argument("--project", type=Path, default=ROOT,
                   help="the checkout whose `vitserve serve` to start (another commit's worktree: before/after comparisons)")
    p.add_argument("--multipliers", default="1,2,5", help="offered load as multiples of the measured saturation")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per multiplier")
    p.add_argument("--concurrency", type=int, default=16, help="saturation: the best of closed loops with this many clients, half and a quarter")
    p.add_argument("--saturation", type=float, default=None, help="skip measuring: saturation in img/s")
    p.add_argument("--timeout", type=float, default=30.0, help="client timeout per request, seconds")
    p.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE", help="VITSERVE_* settings for the server")
    p.add_argument("--storm", type=int, default=64,
                   help="then this many closed-loop clients that resend at once on a refusal (0: skip)")
    p.add_argument("--client-cores", default="auto", metavar="LIST|auto|shared",
                   help="cores for this load generator (taskset's list, e.g. 3); the server started here gets the others. "
                        "auto: the last core when there are at least 2, so that the offered load's own CPU (the client's, "
                        "and the kernel's on its side) does not come out of the server's as load grows; shared: no pinning")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="overload")
    p.add_argument("--no-write", action="store_true")
    return p


def _bodies():
    return multipart_bodies([p for p in _photos() if p.content_type == "image/jpeg"])


async def saturation(base: str, concurrency: int, pid: int | None = None) -> dict:
    """The service's capacity: the best closed-loop throughput of a concurrency sweep up to ``concurrency``."""
    bodies, best = _bodies(), None
    for c in sorted({max(1, concurrency // 4), max(1, concurrency // 2), concurrency}):
        r = await closed(base, bodies, concurrency=c, duration_s=10, pid=pid)
        best = r if best is None or r["images_per_s"] > best["images_per_s"] else best
    return best


async def measure(base: str, args, pid: int | None, sat: dict) -> dict:
    bodies = _bodies()
    unloaded = await closed(base, bodies, concurrency=1, duration_s=10)
    print(f"unloaded p99 {unloaded['latency']['p99_ms']} ms; saturation {sat['images_per_s']} img/s", flush=True)
    phases = {}
    for i, m in enumerate(float(x) for x in args.multipliers.split(",")):
        await asyncio.sleep(3)  # let the previous phase's backlog clear
        r = await open_phase(base, bodies, rate=m * sat["images_per_s"], duration_s=args.duration, saturation=sat["images_per_s"],
                             unloaded_p99_ms=unloaded["latency"]["p99_ms"], sampler=Sampler(pid), timeout_s=args.timeout, seed=args.seed + i)
        print(f"{m:g}x: goodput {r['goodput_images_per_s']} img/s ({r['goodput_over_saturation']}), p99 {r['accepted_latency']['p99_ms']} ms, "
              f"statuses {r['statuses']}, counters exact {r['counters_exact']}", flush=True)
        phases[f"{m:g}"] = r
    storm = None
    if args.storm:
        # Closed-loop clients that resend at once whatever they get (load tools and naive clients ignore Retry-After):
        # every refusal comes straight back, so what a refusal costs is what goodput loses.
        await asyncio.sleep(3)
        before = await asyncio.to_thread(_counters, base)
        storm = await closed(base, bodies, concurrency=args.storm, duration_s=args.duration, pid=pid)
        storm["goodput_over_saturation"] = round(storm["images_per_s"] / sat["images_per_s"], 3)
        storm["server_counted"] = dict(sorted((await asyncio.to_thread(_counters, base) - before).items()))
        print(f"storm of {args.storm} clients retrying at once: goodput {storm['images_per_s']} img/s "
              f"({storm['goodput_over_saturation']}), statuses {storm['statuses']}", flush=True)
    return {"unloaded": unloaded, "saturation": sat, "phases": phases, "storm": storm}


def against_mean(result: dict, after: dict) -> None:
    """Goodput against the mean of saturation measured before and after the phases on the same server: the machine's
    speed drifts by ~10 % between minutes here, and one measurement alone moved the 2x ratio by as much."""
    before = result["saturation"]
    mean = (before["images_per_s"] + after["images_per_s"]) / 2
    result["saturation_after"] = after
    result["saturation_mean_images_per_s"] = round(mean, 1)
    result["saturation_spread"] = round(abs(after["images_per_s"] - before["images_per_s"]) / mean, 3)
    for r in [*result["phases"].values(), *([result["storm"]] if result.get("storm") else [])]:
        r["goodput_over_first_saturation"] = r["goodput_over_saturation"]
        goodput = r["goodput_images_per_s"] if "goodput_images_per_s" in r else r["images_per_s"]  # a phase, or the storm
        r["goodput_over_saturation"] = round(goodput / mean, 3)
    print(f"saturation before {before['images_per_s']} / after {after['images_per_s']} img/s: goodput against their mean "
          f"{mean:.1f}", flush=True)


def _git_sha(project: Path) -> str:
    import subprocess

    out = subprocess.run(["git", "-C", str(project), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def _photos():
    from benchmarks.photos import realistic_photos

    return realistic_photos()


def cpu_split(choice: str, url_given: bool) -> dict | None:
    """{"client": [...], "server": [...]}: disjoint cores for the load generator and the server, or None (shared).
    With --url the server is not ours to pin: only an explicit list pins the client."""
    cores = sorted(os.sched_getaffinity(0))
    if choice == "shared" or (choice == "auto" and (url_given or len(cores) < 2)):
        return None
    client = [cores[-1]] if choice == "auto" else sorted(int(c) for c in choice.split(","))
    server = [c for c in cores if c not in client]
    if not server:
        raise ValueError(f"--client-cores {choice}: no core left for the server (this process may use {cores})")
    return {"client": client, "server": None if url_given else server}


def _serve(project: Path, artifact: Path, settings: dict[str, str], cpus: list[int] | None = None):
    """`vitserve serve` of ``project`` (this checkout or another commit's) on free ports, its own BentoML home, on
    ``cpus`` when given."""

    from benchmarks.harness.servers import free_port, running

    workdir = Path("/tmp") / f"vitserve-overload-{time.time_ns()}"
    port = free_port()
    env = {**os.environ, "BENTOML_HOME": str(workdir / "bentoml_home"), "BENTOML_DO_NOT_TRACK": "True",
           "VITSERVE_GRPC_PORT": str(free_port()), **settings}
    cmd = [sys.executable, str(project / "vitserve.py"), "serve", "--artifact", str(artifact.resolve()), "--host", "127.0.0.1",
           "--port", str(port)]
    if cpus:
        cmd = ["taskset", "-c", ",".join(map(str, cpus)), *cmd]
    return running("vitserve", cmd, env, workdir, port)


def main(argv: list[str] | None = None) -> int:

    args = build_parser().parse_args(argv)
    random.seed(args.seed)
    settings = dict(kv.split("=", 1) for kv in args.serve_env)
    load_before = load_average()
    split = cpu_split(args.client_cores, bool(args.url))
    if split is not None:
        os.sched_setaffinity(0, split["client"])  # this process is the load generator
        print(f"cores: client {split['client']}, server {split['server'] or 'as started (--url)'}", flush=True)
    server_cpus = split["server"] if split else None
    import uvloop

    with (nullcontext() if args.url else _serve(args.project, args.artifact, settings, server_cpus)) as server:
        base = (args.url or server.url).rstrip("/")
        pid = None if args.url else server.proc.pid
        if args.saturation is not None:
            sat = {"concurrency": None, "images_per_s": args.saturation, "latency": {}, "statuses": {}, "measured": "given"}
        else:  # on the server the phases load, with its own settings (up to twice the max batch in flight is never refused)
            sat = {**uvloop.run(saturation(base, args.concurrency, pid)), "measured": "before the phases, on the same server"}
        # What the server chose at startup and the door is built on (its floor is two full batches): a startup speed
        # curve can pick another max batch on another run, and the storm's result depends on it
        info = httpx.get(f"{base}/info", timeout=10, trust_env=False).json()
        result = uvloop.run(measure(base, args, pid, sat))
        result["server_limits"] = {"max_batch_size": info["limits"]["max_batch_size"],
                                   "max_batch_size_reason": info["limits"]["max_batch_size_reason"],
                                   "admission_floor_images": info["admission"]["limit_floor_images"]}
        if args.saturation is None:
            after = {**uvloop.run(saturation(base, args.concurrency, pid)), "measured": "after the phases, on the same server"}
            against_mean(result, after)
    result["cores"] = split or "shared by the client and the server"
    payload = {"benchmark": "overload", "command": command_line("overload", argv),
               "environment": environment(), "load_average": {"before": load_before, "after": load_average()},
               "artifact": str(args.artifact), "project_git": _git_sha(args.project), "server_settings": settings, **result}
    md = table(result)
    print(md)
    rows = [(f"{m}x", f"goodput {r['goodput_over_saturation']:.2f} of saturation, p99 {r['accepted_latency']['p99_ms']} ms "
                      f"({r['p99_over_unloaded_p99']}x unloaded), unanswered {sum(r['unanswered'].values())}, 504 {r['statuses'].get('504', 0)}")
            for m, r in result["phases"].items()]
    if (st := result.get("storm")) is not None:
        rows.append((f"storm x{st['concurrency']}", f"goodput {st['goodput_over_saturation']:.2f} of saturation, "
                                                   f"{st['statuses'].get('429', 0)} refusals"))
    return finish("overload", payload, rows, table=md, name=None if args.no_write else args.name)


if __name__ == "__main__":
    sys.exit(main())
