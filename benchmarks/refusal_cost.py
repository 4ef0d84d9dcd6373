"""What a refusal costs the server: CPU per refused upload, set beside what uvicorn itself spends on the same upload.

    vitserve bench refusal-cost        # server on core 0, client on core 1: µs of server CPU per request

Two servers, each pinned to the first core and flooded by this process from the last core (16 keep-alive
connections, each POSTing the same 640×480 JPEG, 61 KB, as fast as it is answered):

- **refused**: the real service (the test suite's slowed-engine app, `tests/slowed_engine_app.py`, on the demo
  artifact) with one request held in its engine on command, so every request carrying `X-Vitserve-Timeout-Ms: 1` is
  predicted to miss its deadline and refused with the error table's 429 below ASGI (service/http_refusal.py);
- **uvicorn floor**: benchmarks/peers/transport_floor.py, uvicorn with a bare ASGI app answering a fixed result: the
  least any Python server on uvicorn spends receiving that upload and answering it.

Server CPU is read from /proc over the measured window. The difference is what our refusal adds to uvicorn's floor.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import threading
import time
from pathlib import Path

import httpx

from benchmarks.front_door import jpeg
from benchmarks.harness.measure import server_cpu_s
from benchmarks.harness.results import command_line, environment, finish
from benchmarks.harness.servers import ROOT, free_port, running

_LENGTH = re.compile(rb"content-length: (\d+)", re.I)


async def flood(port: int, wire: bytes, seconds: float, connections: int = 16) -> dict[str, int]:
    """Closed loop on kept-alive connections: each sends the next request as soon as the last is answered."""
    counts: dict[str, int] = {}
    until = time.perf_counter() + seconds

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < until:
            writer.write(wire)
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(int(_LENGTH.search(head).group(1)))
            status = head[9:12].decode()
            counts[status] = counts.get(status, 0) + 1
        writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return counts


def measure(port: int, pid: int, wire: bytes, seconds: float) -> dict:
    asyncio.run(flood(port, wire, 1.0))  # warm-up
    cpu0, t0 = server_cpu_s(pid), time.perf_counter()
    counts = asyncio.run(flood(port, wire, seconds))
    cpu1, t1 = server_cpu_s(pid), time.perf_counter()
    n = sum(counts.values())
    return {"statuses": counts, "requests_per_s": round(n / (t1 - t0), 1), "server_cpu_cores": round((cpu1 - cpu0) / (t1 - t0), 3),
            "server_cpu_us_per_request": round((cpu1 - cpu0) / max(n, 1) * 1e6, 1)}


def run(args) -> dict:
    before = os.sched_getaffinity(0)
    try:
        return _run(args)
    finally:
        os.sched_setaffinity(0, before)  # this process was the client, on a core of its own


def _run(args) -> dict:
    from service.settings import DEMO_ARTIFACT

    image = jpeg()
    wire = lambda extra: (f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n{extra}"  # noqa: E731
                          f"Content-Length: {len(image)}\r\n\r\n").encode() + image
    server_core, client_core = "0", os.cpu_count() - 1
    args.workdir.mkdir(parents=True, exist_ok=True)
    fault = args.workdir / "engine_fault"
    fault.write_text("")
    os.sched_setaffinity(0, {client_core})
    port = free_port()
    env = {**os.environ, "BENTOML_HOME": str(args.workdir / "home"), "BENTOML_DO_NOT_TRACK": "True",
           "VITSERVE_ARTIFACT": str(DEMO_ARTIFACT), "VITSERVE_GRPC_PORT": "0", "VITSERVE_TEST_ENGINE_FAULT_FILE": str(fault),
           "VITSERVE_ENGINE_WATCHDOG_S": "100000", "VITSERVE_ENGINE_STALLED_RESTART_S": "100000"}
    cmd = ["taskset", "-c", server_core, sys.executable, "-m", "bentoml", "serve", "tests.slowed_engine_app:VitServe",
           "--working-dir", str(ROOT), "--host", "127.0.0.1", "--port", str(port)]
    with running("refusing", cmd, env, args.workdir, port) as server:
        fault.write_text("hang")  # the next batch stays in the engine: work in flight, so the door refuses
        held = threading.Thread(target=lambda: httpx.post(f"{server.url}/classify", content=image, trust_env=False, timeout=600,
                                                          headers={"content-type": "image/jpeg"}), daemon=True)
        held.start()
        time.sleep(1.0)
        refused = measure(port, server.proc.pid, wire("X-Vitserve-Timeout-Ms: 1\r\n"), args.duration)
        fault.write_text("")  # let the held request finish before the server stops
        held.join(timeout=30)
    floor_port, grpc_port = free_port(), free_port()
    cmd = ["taskset", "-c", server_core, sys.executable, "-m", "benchmarks.peers.transport_floor", "--port", str(floor_port),
           "--grpc-port", str(grpc_port)]
    with running("floor", cmd, {**os.environ, "PYTHONUNBUFFERED": "1"}, args.workdir, floor_port, ready_path="/health") as floor:
        uvicorn = measure(floor_port, floor.proc.pid, wire(""), args.duration)
    if set(refused["statuses"]) != {"429"}:
        raise RuntimeError(f"not every request was refused: {refused['statuses']}")
    return {"image_bytes": len(image), "server_core": server_core, "client_core": client_core, "refused": refused,
            "uvicorn_floor": uvicorn,
            "refusal_over_floor_us": round(refused["server_cpu_us_per_request"] - uvicorn["server_cpu_us_per_request"], 1)}


def table(result: dict) -> str:
    rows = ["| server (core 0) | answer | requests/s | server cores | server CPU µs per request |", "|---|---|---|---|---|"]
    for name, key, answer in (("vitserve, refused below ASGI", "refused", "429"), ("uvicorn, fixed answer", "uvicorn_floor", "200")):
        r = result[key]
        rows.append(f"| {name} | {answer} | {r['requests_per_s']} | {r['server_cpu_cores']} | {r['server_cpu_us_per_request']} |")
    return "\n".join(rows) + f"\n\nrefusal over uvicorn's floor: **{result['refusal_over_floor_us']} µs** per request"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vitserve bench refusal-cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/vitserve-refusal-cost"))
    p.add_argument("--name", default="refusal-cost_demo")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    result = {"environment": environment(), "command": command_line("refusal-cost", argv), **run(args)}
    rows = [("refused", f"{result['refused']['server_cpu_us_per_request']} µs CPU per 429"),
            ("uvicorn floor", f"{result['uvicorn_floor']['server_cpu_us_per_request']} µs CPU per 200")]
    return finish("refusal cost", result, rows, table=table(result), name=None if args.no_write else args.name)


if __name__ == "__main__":
    sys.exit(main())
