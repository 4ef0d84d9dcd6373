"""Offer load to a running classification service over HTTP or gRPC: request bodies, one sender per protocol,
closed and open loops, the answers checked, and what clients saw in a measured window."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

import httpx

from benchmarks.harness.measure import latency_summary_ms, other_cpu_load
from benchmarks.harness.prometheus import scrape_window, stage_breakdown
from benchmarks.photos import Photo

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class Body:
    content: bytes  # HTTP: the multipart body; gRPC: a serialised ModelInferRequest
    headers: dict[str, str]
    images: int


def multipart_bodies(photos: list[Photo], images_per_request: int = 1, field: str = "images") -> list[Body]:
    """Pre-encoded multipart bodies (httpx's own encoder, once), so the client spends no CPU on encoding in the run."""
    bodies = []
    n = len(photos)
    for i in range(n):
        parts = [(field, (p.name, p.data, p.content_type)) for p in (photos[(i + j) % n] for j in range(images_per_request))]
        req = httpx.Request("POST", "http://placeholder/", files=parts)
        req.read()
        bodies.append(Body(req.content, {"content-type": req.headers["content-type"]}, images_per_request))
    return bodies


def grpc_bodies(photos: list[Photo], model: str, images_per_request: int = 1) -> list[Body]:
    """Pre-serialised KServe v2 ModelInferRequests (input "image", BYTES, raw_input_contents), one per photo."""
    import struct

    from service.protos import grpc_service_pb2 as pb

    bodies = []
    n = len(photos)
    for i in range(n):
        images = [photos[(i + j) % n].data for j in range(images_per_request)]
        req = pb.ModelInferRequest(model_name=model)
        req.inputs.add(name="image", datatype="BYTES", shape=[len(images)])
        req.raw_input_contents.append(b"".join(struct.pack("<I", len(x)) + x for x in images))
        bodies.append(Body(req.SerializeToString(), {}, images_per_request))
    return bodies


class HttpSender:
    """POST each body to ``url`` over HTTP/1.1, one kept-alive connection per concurrent request."""

    def __init__(self, url: str, pool: int, timeout_s: float):
        self.url, self.client = url, _client(pool, timeout_s)

    async def __aenter__(self):
        await self.client.__aenter__()
        return self

    async def __aexit__(self, *exc):
        await self.client.__aexit__(*exc)

    async def send(self, body: Body, rec: Record) -> None:
        await _send(self.client, self.url, body, rec)


class GrpcSender:
    """ModelInfer on one HTTP/2 channel (gRPC multiplexes concurrent calls): bytes in, bytes out, so the client spends
    no CPU on protobuf in the run. Status: "200" for OK, else the gRPC code's name."""

    def __init__(self, target: str, pool: int, timeout_s: float):
        import grpc

        self.grpc, self.timeout_s = grpc, timeout_s
        self.channel = grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
        self.call = self.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.channel.close()

    async def send(self, body: Body, rec: Record) -> None:
        rec.sent = time.perf_counter()
        try:
            await self.call(body.content, timeout=self.timeout_s)
            rec.status = "200"
        except self.grpc.aio.AioRpcError as e:
            rec.status = e.code().name if e.code() != self.grpc.StatusCode.DEADLINE_EXCEEDED else "timeout"
        rec.done = time.perf_counter()


def sender(protocol: str, url: str, grpc_target: str | None, pool: int, timeout_s: float):
    return GrpcSender(grpc_target, pool, timeout_s) if protocol == "grpc" else HttpSender(url, pool, timeout_s)


@dataclass
class Record:
    scheduled: float  # loop time the request was due (closed loop: = sent)
    sent: float
    done: float | None = None
    status: str = "pending"  # HTTP status as text, or "timeout", "connect_error", …, or "dropped_by_client"
    images: int = 1


def check_url(url: str, allow_remote: bool) -> str:
    host = urlparse(url).hostname
    if host is None:
        raise ValueError(f"not a URL: {url!r}")
    if host not in LOOPBACK and not allow_remote:
        raise ValueError(f"{url} is not a loopback address; pass --allow-remote to load a remote service on purpose")
    return url.rstrip("/")


async def _send(client: httpx.AsyncClient, url: str, body: Body, rec: Record) -> None:
    rec.sent = time.perf_counter()
    try:
        r = await client.post(url, content=body.content, headers=body.headers)
        rec.status = str(r.status_code)
    except httpx.TimeoutException:
        rec.status = "timeout"
    except httpx.HTTPError as e:
        rec.status = type(e).__name__
    rec.done = time.perf_counter()


def _client(pool: int, timeout_s: float) -> httpx.AsyncClient:
    # HTTP/1.1, one connection per concurrent request, kept alive between requests.
    limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
    # trust_env=False: HTTP(S)_PROXY from the environment would otherwise carry even loopback traffic through a proxy,
    # and a benchmark measures the service, never a proxy in front of it.
    return httpx.AsyncClient(http2=False, limits=limits, timeout=httpx.Timeout(timeout_s), trust_env=False)


def summarize(records: list[Record], window: tuple[float, float], *, latency_from: str) -> dict:
    """Throughput = successful answers completed inside the window per second; latency over the requests that
    started (closed loop) or were due (open loop) inside it; errors by status for those same requests."""
    start, end = window
    span = end - start
    in_window = [r for r in records if start <= r.scheduled < end]
    ok_done = [r for r in records if r.status == "200" and r.done is not None and start <= r.done <= end]
    lat = [r.done - (r.scheduled if latency_from == "scheduled" else r.sent) for r in in_window if r.status == "200" and r.done is not None]
    lag = [r.sent - r.scheduled for r in in_window if r.status != "dropped_by_client"]
    statuses = Counter(r.status for r in in_window)
    return {
        "window_s": round(span, 3),
        "requests": len(in_window),
        "throughput_rps": round(len(ok_done) / span, 3),
        "throughput_images_per_s": round(sum(r.images for r in ok_done) / span, 3),
        "latency": latency_summary_ms(lat),
        "latency_measured_from": latency_from,
        "statuses": dict(sorted(statuses.items())),
        "errors": {k: v for k, v in sorted(statuses.items()) if k != "200"},
        "send_lag_ms": {k: v for k, v in latency_summary_ms(lag).items() if k in ("p50_ms", "p99_ms", "max_ms")},
    }


async def closed_loop(
    base: str, bodies: list[Body], *, concurrency: int, warmup_s: float, duration_s: float,
    timeout_s: float = 30, path: str = "/classify", protocol: str = "http", grpc_target: str | None = None,
) -> dict:
    url = f"{base}{path}"
    records: list[Record] = []
    async with sender(protocol, url, grpc_target, concurrency, timeout_s) as client, httpx.AsyncClient(trust_env=False) as meta:
        t0 = time.perf_counter()
        w_start, w_end = t0 + warmup_s, t0 + warmup_s + duration_s
        snapshots: dict[str, list | None] = {}

        async def worker(i: int) -> None:
            k = i
            while time.perf_counter() < w_end:
                now = time.perf_counter()
                rec = Record(scheduled=now, sent=now, images=bodies[k % len(bodies)].images)
                records.append(rec)
                await client.send(bodies[k % len(bodies)], rec)
                k += concurrency

        await asyncio.gather(scrape_window(meta, base, w_start, w_end, snapshots), *(worker(i) for i in range(concurrency)))
    out = {"mode": "closed", "protocol": protocol, "concurrency": concurrency, **summarize(records, (w_start, w_end), latency_from="sent")}
    # Cross-check: with every client always waiting on one request, Little's law gives throughput = clients ÷ mean
    # latency. It does not depend on how completions bunch up at the window's edges (a batch of 16 finishing just
    # inside or just outside a 15 s window moves the counted figure by ~10% at ~12 img/s).
    mean_s = out["latency"]["mean_ms"] and out["latency"]["mean_ms"] / 1000
    per_request = bodies[0].images
    out["littles_law_images_per_s"] = round(concurrency * per_request / mean_s, 3) if mean_s else None
    out["server_stages"] = stage_breakdown(snapshots.get("before"), snapshots.get("after"), duration_s)
    out["cpu"] = other_cpu_load(snapshots["cpu_before"], snapshots["cpu_after"])
    return out


def poisson_schedule(rate: float, duration_s: float, seed: int = 0) -> list[float]:
    """Arrival offsets (s) of a Poisson process of ``rate``/s over ``duration_s``, conditioned on having exactly
    round(rate × duration) arrivals: given its count, a Poisson process's arrival times are independent uniform
    draws, sorted. The gaps stay exponential-like (bursts and lulls) while the offered rate is exactly the one
    asked for, so runs at the same rate offer the same number of requests to every peer."""
    n = round(rate * duration_s)
    rng = random.Random(seed)
    return sorted(rng.uniform(0, duration_s) for _ in range(n))


async def open_loop(
    base: str, bodies: list[Body], *, rate: float, warmup_s: float, duration_s: float, max_outstanding: int = 64,
    timeout_s: float = 30, seed: int = 0, path: str = "/classify", protocol: str = "http", grpc_target: str | None = None,
) -> dict:
    url = f"{base}{path}"
    schedule = [t for t in poisson_schedule(rate, warmup_s, seed)] + [warmup_s + t for t in poisson_schedule(rate, duration_s, seed + 1)]
    records: list[Record] = []
    tasks: list[asyncio.Task] = []
    outstanding = 0
    async with sender(protocol, url, grpc_target, max_outstanding, timeout_s) as client, httpx.AsyncClient(trust_env=False) as meta:
        t0 = time.perf_counter() + 0.05
        w_start, w_end = t0 + warmup_s, t0 + warmup_s + duration_s
        snapshots: dict[str, list | None] = {}

        async def one(body: Body, rec: Record) -> None:
            nonlocal outstanding
            try:
                await client.send(body, rec)
            finally:
                outstanding -= 1

        scraping = asyncio.create_task(scrape_window(meta, base, w_start, w_end, snapshots))
        for i, offset in enumerate(schedule):
            due = t0 + offset
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body = bodies[i % len(bodies)]
            rec = Record(scheduled=due, sent=time.perf_counter(), images=body.images)
            records.append(rec)
            if outstanding >= max_outstanding:
                rec.status = "dropped_by_client"
                continue
            outstanding += 1
            tasks.append(asyncio.create_task(one(body, rec)))
        await scraping
        if tasks:  # answers still owed: each is bounded by the client timeout
            await asyncio.wait(tasks, timeout=timeout_s + 5)
    # Achieved rate from the *actual* send times (an arrival dropped by the client counts when it was handled): a
    # generator that fell behind its schedule would send fewer inside the window.
    sent_in_window = [r for r in records if w_start <= r.sent < w_end]
    out = {
        "mode": "open", "protocol": protocol, "target_rate_rps": rate, "max_outstanding": max_outstanding,
        "achieved_arrival_rps": round(len(sent_in_window) / duration_s, 3),
        **summarize(records, (w_start, w_end), latency_from="scheduled"),
    }
    out["dropped_by_client"] = out["statuses"].get("dropped_by_client", 0)
    out["server_stages"] = stage_breakdown(snapshots.get("before"), snapshots.get("after"), duration_s)
    out["cpu"] = other_cpu_load(snapshots["cpu_before"], snapshots["cpu_after"])
    return out


def _vitserve_ok(body, n: int) -> bool:
    return isinstance(body, dict) and len(body.get("predictions", [])) == n and all(len(p["top5"]) == 5 for p in body["predictions"])


def _list_ok(body, n: int) -> bool:
    if not isinstance(body, list) or len(body) != n:
        return False
    first = body[0]
    top5 = first.get("top5") if isinstance(first, dict) else first  # batching peer: dicts; pipeline: lists
    return isinstance(top5, list) and len(top5) == 5


RESPONSE_CHECKS: dict[str, Callable] = {"vitserve": _vitserve_ok, "bentoml-batching": _list_ok, "naive-pipeline": _list_ok}


async def check_answers(base: str, bodies: list[Body], kind: str, count: int = 4, path: str = "/classify",
                        protocol: str = "http", grpc_target: str | None = None) -> dict:
    """A few sequential requests before measuring: the service answers this request shape with real predictions
    (and is warm)."""
    if protocol == "grpc":
        async with GrpcSender(grpc_target, 1, 120) as client:
            for i in range(count):
                rec = Record(scheduled=0.0, sent=0.0)
                await client.send(bodies[i % len(bodies)], rec)
                if rec.status != "200":
                    raise RuntimeError(f"gRPC ModelInfer at {grpc_target} answered {rec.status}")
        return {"checked_requests": count, "shape": "kserve-v2-grpc"}
    checker = RESPONSE_CHECKS.get(kind, lambda body, n: True)
    async with _client(1, 120) as client:
        for i in range(count):
            b = bodies[i % len(bodies)]
            r = await client.post(f"{base}{path}", content=b.content, headers=b.headers)
            if r.status_code != 200 or not checker(r.json(), b.images):
                raise RuntimeError(f"{kind} at {base}{path} answered {r.status_code}: {r.text[:500]}")
    return {"checked_requests": count, "shape": kind}


async def run_load(
    base: str, bodies: list[Body], *, kind: str = "vitserve", concurrency: list[int], rates: list[float],
    warmup_s: float, duration_s: float, max_outstanding: int, timeout_s: float, seed: int = 0,
    log: Callable[[str], None] = print, protocol: str = "http", grpc_target: str | None = None,
) -> dict:
    check = await check_answers(base, bodies, kind, protocol=protocol, grpc_target=grpc_target)
    closed = []
    for c in concurrency:
        r = await closed_loop(base, bodies, concurrency=c, warmup_s=warmup_s, duration_s=duration_s, timeout_s=timeout_s,
                              protocol=protocol, grpc_target=grpc_target)
        log(f"  {kind} closed c={c:<3d} {r['throughput_images_per_s']:7.2f} img/s  p50 {r['latency']['p50_ms']} ms  "
            f"p99 {r['latency']['p99_ms']} ms  errors {r['errors'] or '-'}")
        closed.append(r)
    opened = []
    for rate in rates:
        r = await open_loop(base, bodies, rate=rate, warmup_s=warmup_s, duration_s=duration_s,
                            max_outstanding=max_outstanding, timeout_s=timeout_s, seed=seed, protocol=protocol, grpc_target=grpc_target)
        log(f"  {kind} open {rate:6.2f}/s  arrivals {r['achieved_arrival_rps']:6.2f}/s  {r['throughput_images_per_s']:7.2f} img/s  "
            f"p50 {r['latency']['p50_ms']} ms  p99 {r['latency']['p99_ms']} ms  errors {r['errors'] or '-'}")
        opened.append(r)
    return {
        "url": base, "kind": kind, "protocol": protocol, "grpc_target": grpc_target, "answer_check": check,
        "closed_loop": closed, "open_loop": opened, "saturation": saturation(closed),
    }


def saturation_run(closed: list[dict]) -> dict:
    """The closed-loop run with the highest throughput: the service at saturation."""
    return max(closed, key=lambda r: r["throughput_images_per_s"])


def saturation(closed: list[dict]) -> dict | None:
    """What a result records of :func:`saturation_run` (None without closed-loop runs)."""
    if not closed:
        return None
    best = saturation_run(closed)
    return {"images_per_s": best["throughput_images_per_s"], "concurrency": best["concurrency"], "latency": best["latency"]}
def load_table(result: dict) -> str:
    lines = ["| mode | load | img/s | p50 ms | p90 ms | p99 ms | max ms | errors | batch | queue ms/img | infer ms/batch | decode ms/img |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["closed_loop"] + result["open_loop"]:
        s, lat = r["server_stages"], r["latency"]
        load = f"c={r['concurrency']}" if r["mode"] == "closed" else f"{r['target_rate_rps']}/s"
        lines.append(
            f"| {r['mode']} | {load} | {r['throughput_images_per_s']:.2f} | {lat['p50_ms']} | {lat['p90_ms']} | {lat['p99_ms']} | "
            f"{lat['max_ms']} | {json.dumps(r['errors']) if r['errors'] else '-'} | {s.get('mean_batch_size', '-')} | "
            f"{s.get('queue_wait_ms_per_image', '-')} | {s.get('inference_ms_per_batch', '-')} | {s.get('decode_ms_per_image', '-')} |"
        )
    return "\n".join(lines)


