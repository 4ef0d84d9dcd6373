"""Slow clients lose only their own requests, on a real `vitserve serve`: 50 connections trickle their headers or
their bodies one byte at a time beside a normal client; the normal requests are all answered at their unloaded speed,
the slow ones are cut off with 408 within the configured times, and a real slow upload (300 KB at 64 KB/s) succeeds.

The server runs with stricter limits than the defaults (header 2 s instead of 20; body 2 s + 1 s per 1,000 bytes
instead of 10 s + 1 s per 500), so the test is short; an upload that passes these passes the defaults."""

from __future__ import annotations

import asyncio
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from benchmarks.harness.servers import running_vitserve
from tests.server import metric_value

HEADER_S, GRACE_S, MIN_RATE = 2.0, 2.0, 1000.0
SLOW = 25  # of each kind


def jpeg(size: tuple[int, int] = (64, 48), quality: int = 90, noise: bool = False) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8) if noise else np.full((*size[::-1], 3), 120, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def request_head(host: str, length: int) -> bytes:
    return (f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\nContent-Length: {length}\r\n\r\n").encode()


async def status_of(reader: asyncio.StreamReader) -> int | None:
    head = await reader.readuntil(b"\r\n\r\n")
    return int(head[9:12])


async def trickle(host: str, port: int, wire: bytes, every_s: float) -> tuple[int | None, float]:
    """Send ``wire`` a byte at a time until the server answers or closes; (status, seconds from the first byte)."""
    reader, writer = await asyncio.open_connection(host, port)
    t0 = time.monotonic()
    answer = asyncio.ensure_future(status_of(reader))
    try:
        for byte in wire:
            if answer.done():
                break
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.wait({answer}, timeout=every_s)
        try:
            status = await asyncio.wait_for(answer, 10)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            status = None
        return status, time.monotonic() - t0
    finally:
        writer.close()


async def normal_client(host: str, port: int, body: bytes, seconds: float) -> list[tuple[int, float]]:
    reader, writer = await asyncio.open_connection(host, port)
    wire = request_head(f"{host}:{port}", len(body)) + body
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        writer.write(wire)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        out.append((int(head[9:12]), time.monotonic() - t0))
    writer.close()
    return out


def p99(latencies: list[float]) -> float:
    return float(np.percentile(latencies, 99))


@pytest.mark.timeout(240)
def test_slow_headers_and_bodies_get_408_and_normal_requests_do_not_notice(tiny_artifact, tmp_path):
    # The door at its defaults: the body tricklers are admitted and must not hold it shut.
    with running_vitserve(tiny_artifact, tmp_path, header_timeout_s=HEADER_S, body_grace_s=GRACE_S, body_min_rate=MIN_RATE,
                          decode_threads=2) as server:
        url = httpx.URL(server.url)
        host, port = url.host, url.port
        body = jpeg()

        async def scenario():
            await normal_client(host, port, body, 1.0)  # warm
            unloaded = await normal_client(host, port, body, 3.0)
            full = request_head(f"{host}:{port}", len(body)) + body
            header_trickles = [trickle(host, port, full, 0.25) for _ in range(SLOW)]  # a byte every 0.25 s: never done
            head = request_head(f"{host}:{port}", 60_000)

            async def body_trickler():
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(head)  # the headers at once, then the body a byte every 0.25 s
                await writer.drain()
                t0 = time.monotonic()
                answer = asyncio.ensure_future(status_of(reader))
                for _ in range(60_000):
                    if answer.done():
                        break
                    try:
                        writer.write(b"\xff")
                        await writer.drain()
                    except ConnectionError:
                        break
                    await asyncio.wait({answer}, timeout=0.25)
                try:
                    status = await asyncio.wait_for(answer, 10)
                except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
                    status = None
                writer.close()
                return status, time.monotonic() - t0

            slow = asyncio.gather(*header_trickles, *[body_trickler() for _ in range(SLOW)])
            loaded = await normal_client(host, port, body, 6.0)
            return unloaded, loaded, await slow

        unloaded, loaded, slow = asyncio.run(scenario())
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text

        # A real slow upload on the idle server: 300 KB at 64 KB/s (16 KB every 0.25 s), answered 200.
        async def slow_upload():
            photo = jpeg((640, 480), 95, noise=True)
            assert len(photo) > 250_000, len(photo)
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request_head(f"{host}:{port}", len(photo)))
            for i in range(0, len(photo), 16_384):
                writer.write(photo[i : i + 16_384])
                await writer.drain()
                await asyncio.sleep(0.25)
            status = await status_of(reader)
            writer.close()
            return status, len(photo)

        upload_status, upload_bytes = asyncio.run(slow_upload())

    assert all(s == 200 for s, _ in loaded) and len(loaded) > 20, loaded[:5]
    assert p99([t for _, t in loaded]) <= 3 * p99([t for _, t in unloaded]), (p99([t for _, t in loaded]), p99([t for _, t in unloaded]))
    headers, bodies = slow[:SLOW], slow[SLOW:]
    assert all(status == 408 for status, _ in headers), headers
    assert all(HEADER_S - 0.1 <= seconds <= HEADER_S + 1.5 for _, seconds in headers), headers
    # The body deadline: the grace, plus a second per MIN_RATE bytes received (a few bytes here).
    assert all(status == 408 for status, _ in bodies), bodies
    assert all(GRACE_S - 0.1 <= seconds <= GRACE_S + 1.5 for _, seconds in bodies), bodies
    assert metric_value(metrics, "vitserve_slow_clients_total", stage="headers") == SLOW
    assert metric_value(metrics, "vitserve_slow_clients_total", stage="body") == SLOW
    assert metric_value(metrics, "vitserve_requests_total", protocol="json", status="408") == SLOW
    assert upload_status == 200, upload_bytes
