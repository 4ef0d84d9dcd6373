"""The front door's cost: every protocol against the work itself (decode + engine), in one run.

    vitserve bench front-door                                  # demo artifact, c=16, default settings
    vitserve bench front-door --concurrency 8,16,32 --protocols multipart,grpc --duration 10
    vitserve bench front-door --triton --litserve --rounds 3   # + the peers, interleaved: make triton-peer first
    vitserve bench front-door --floor --protocols raw,grpc     # + the transports' own CPU floor
    vitserve bench front-door --setting workers=2              # any service setting, here two front-end processes

One 640×480 JPEG per request, closed loop, the client on the same machine. It measures, in one run:

- **raw serial**: the artifact's engine and the service's own Preprocessor in this process, decode one image at a time
  then the engine at the service's batch size, serially (the figure a server with a free door would reach on one
  core of decode plus the engine's share), once at the start of every round (benchmarks/harness/raw_serial.py);
- for each protocol (``multipart`` POST /classify, ``raw`` POST /classify with the image as the whole body,
  ``base64`` JSON, ``v2-binary`` KServe v2 HTTP with Triton's binary extension, ``grpc`` KServe v2 ModelInfer):
  images/s, p50/p99, refusals, and the **server's CPU per image** (its process tree's user+system seconds over the
  window, from /proc);
- the same for the peers that speak the protocol, serving the same engine with the same Preprocessor: Triton
  (benchmarks/peers/triton_pytriton.py: v2 binary and gRPC) and LitServe's idiom (benchmarks/peers/litserve_peer.py:
  base64 JSON);
- with ``--floor``, the transports alone (benchmarks/peers/transport_floor.py: uvicorn and grpc.aio answering a fixed
  result, no decode or engine) loaded by the same clients: the server CPU per call that any Python front-end on
  these cores pays before its work;
- the ratio of each to raw serial, CPU per image over (decode + engine share), and ours over Triton's.

The client is hand-written for HTTP (pre-built request bytes over kept-alive sockets, a few tens of µs per request)
and uses grpc.aio with pre-serialised messages for gRPC, so that on a 2-core machine it does not measure itself.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import struct
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from benchmarks.harness import measure, perf_analyzer
from benchmarks.harness.measure import latency_summary_ms, server_cpu_s
from benchmarks.harness.raw_serial import RawSerial, median_of
from benchmarks.harness.results import command_line, environment, finish
from benchmarks.photos import realistic_photos

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = ("multipart", "raw", "base64", "v2-binary", "grpc")
_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")


def jpeg() -> bytes:
    """The astronaut at 640×480, JPEG q90 (~60 KB): a typical web upload."""
    return next(p for p in realistic_photos(formats=("JPEG",)) if p.name.startswith("astronaut")).data


# ---- request bodies -----------------------------------------------------------------------------------------------------------
def http_request(protocol: str, image: bytes, model: str, host: str, litserve: bool = False) -> bytes:
    if protocol == "multipart":
        b = b"vitservebenchboundary"
        body = (b"--" + b + b'\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\n'
                b"Content-Type: image/jpeg\r\n\r\n" + image + b"\r\n--" + b + b"--\r\n")
        path, headers = "/classify", f"Content-Type: multipart/form-data; boundary={b.decode()}\r\n"
    elif protocol == "raw":
        body, path, headers = image, "/classify", "Content-Type: image/jpeg\r\n"
    elif protocol == "base64":  # ours: {"images": [b64]}; LitServe's idiom: {"image": b64} to /predict
        encoded = base64.b64encode(image).decode()
        body = json.dumps({"image": encoded} if litserve else {"images": [encoded]}).encode()
        path, headers = ("/predict" if litserve else "/classify/base64"), "Content-Type: application/json\r\n"
    elif protocol == "v2-binary":
        head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1],
                                       "parameters": {"binary_data_size": len(image) + 4}}],
                           "outputs": [{"name": "probabilities", "parameters": {"classification": 5, "binary_data": False}}]}).encode()
        body = head + struct.pack("<I", len(image)) + image
        path = f"/v2/models/{model}/infer"
        headers = f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(head)}\r\n"
    else:
        raise ValueError(protocol)
    return f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Content-Length: {len(body)}\r\n\r\n".encode() + body


def grpc_request(image: bytes, model: str) -> bytes:
    from service.protos import grpc_service_pb2 as pb

    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="image", datatype="BYTES", shape=[1, 1])  # [batch] + dims [1], as both configs say
    req.outputs.add(name="probabilities").parameters["classification"].int64_param = 5
    req.raw_input_contents.append(struct.pack("<I", len(image)) + image)
    return req.SerializeToString()


# ---- the closed loop -------------------------------------------------------------------------------------------------------------
async def _http_client(host: str, port: int, wire: bytes, until: float, out: list, timeout_s: float) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            writer.write(wire)
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
                await reader.readexactly(int(_LENGTH.search(head).group(1)))
                status = head[9:12].decode()
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as e:
                out.append((t0, time.perf_counter(), type(e).__name__))
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            out.append((t0, time.perf_counter(), status))
    finally:
        writer.close()


async def _grpc_client(call, message: bytes, until: float, out: list, timeout_s: float) -> None:
    import grpc

    while time.perf_counter() < until:
        t0 = time.perf_counter()
        try:
            await call(message, timeout=timeout_s)
            status = "200"
        except grpc.aio.AioRpcError as e:
            status = e.code().name
        out.append((t0, time.perf_counter(), status))


async def closed_loop(protocol: str, url: str, grpc_target: str | None, pid: int, image: bytes, model: str, *,
                      concurrency: int, warmup_s: float, duration_s: float, timeout_s: float = 30.0,
                      litserve: bool = False) -> dict:
    from urllib.parse import urlparse

    u = urlparse(url)
    records: list[tuple[float, float, str]] = []
    start = time.perf_counter()
    w0, w1 = start + warmup_s, start + warmup_s + duration_s
    channel = None
    if protocol == "grpc":
        import grpc

        channel = grpc.aio.insecure_channel(grpc_target, options=[("grpc.max_receive_message_length", -1)])
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        message = grpc_request(image, model)
        clients = [_grpc_client(call, message, w1, records, timeout_s) for _ in range(concurrency)]
    else:
        wire = http_request(protocol, image, model, u.netloc, litserve)
        clients = [_http_client(u.hostname, u.port, wire, w1, records, timeout_s) for _ in range(concurrency)]

    cpu: dict[str, float] = {}  # the server's CPU (all of it, and by thread) at the window's edges

    async def sample() -> None:
        await asyncio.sleep(max(0.0, w0 - time.perf_counter()))
        cpu["before"], cpu["t0"], cpu["threads0"] = server_cpu_s(pid), time.perf_counter(), measure.server_cpu_by_thread_s(pid)
        await asyncio.sleep(max(0.0, w1 - time.perf_counter()))
        cpu["after"], cpu["t1"], cpu["threads1"] = server_cpu_s(pid), time.perf_counter(), measure.server_cpu_by_thread_s(pid)

    await asyncio.gather(sample(), *clients)
    if channel is not None:
        await channel.close()
    window = [r for r in records if w0 <= r[1] <= w1]
    statuses = Counter(s for _, _, s in window)
    ok = [d - t for t, d, s in window if s == "200"]
    images_per_s = len(ok) / duration_s
    cpu_s = cpu["after"] - cpu["before"]
    return {
        "protocol": protocol, "concurrency": concurrency, "images_per_s": round(images_per_s, 1),
        "latency": latency_summary_ms(ok), "statuses": dict(statuses),
        "server_cpu_cores": round(cpu_s / (cpu["t1"] - cpu["t0"]), 2),
        "server_cpu_ms_per_image": round(cpu_s / max(len(ok), 1) * 1000, 3),
        "server_cpu_ms_per_image_by_thread": measure.per_image_ms(cpu["threads0"], cpu["threads1"], len(ok)),
    }


# ---- the run ---------------------------------------------------------------------------------------------------------------------
def clients_for(protocol: str, server: str, with_perf_analyzer: bool) -> list[str]:
    """Our Python clients for every protocol; with --perf-analyzer, Triton's C++ tool as well for the v2 protocols
    of servers that serve a model (not the fixed-answer floors)."""
    extra = with_perf_analyzer and protocol in perf_analyzer.PROTOCOLS and not server.startswith("floor")
    return ["python", "perf_analyzer"] if extra else ["python"]


PEER_PROTOCOLS = {"triton": ("v2-binary", "grpc"), "litserve": ("base64",), "floor": ("raw", "grpc"), "floor-native": ("grpc",),
                  "vitserve-grpc.aio": ("grpc",)}  # what each speaks of ours


def start_servers(stack, args, settings: dict) -> tuple[list, int]:
    """Ours and every peer asked for, up at once (an idle one costs < 0.02 cores): (name, server, protocols) each, and
    our max batch (the peers get the same)."""
    from benchmarks.harness.servers import free_port, running, running_triton, running_vitserve

    ours = stack.enter_context(running_vitserve(args.artifact, args.workdir, cpus=args.server_cpus, **settings))
    batch = httpx.get(f"{ours.url}/info", timeout=10, trust_env=False).json()["limits"]["max_batch_size"]
    servers = [("vitserve", ours, args.protocols)]
    if args.triton:  # the same engine, Preprocessor, batch limit and batching window behind Triton's front-ends
        servers.append(("triton", stack.enter_context(running_triton(args.artifact, args.workdir, max_batch=batch)),
                        [p for p in args.protocols if p in PEER_PROTOCOLS["triton"]]))
    if args.litserve:
        port = free_port()
        cmd = [sys.executable, "-m", "benchmarks.peers.litserve_peer", str(args.artifact), "--port", str(port),
               "--max-batch", str(batch)]
        lit = stack.enter_context(running("litserve", cmd, {**os.environ, "PYTHONUNBUFFERED": "1"},
                                          args.workdir, port, ready_path="/health"))
        lit.grpc_address = None
        servers.append(("litserve", lit, [p for p in args.protocols if p in PEER_PROTOCOLS["litserve"]]))
    if args.grpc_aio:  # the same service with gRPC on grpc.aio in the worker, beside the C++ front
        aio = stack.enter_context(running_vitserve(args.artifact, args.workdir, cpus=args.server_cpus,
                                                   **{**settings, "grpc_transport": "python"}))
        servers.append(("vitserve-grpc.aio", aio, [p for p in args.protocols if p in PEER_PROTOCOLS["vitserve-grpc.aio"]]))
    for transport in ("python", "native") if args.floor else ():  # the transports alone, fixed answers
        name = "floor" if transport == "python" else "floor-native"
        port, grpc_port = free_port(), free_port()
        cmd = [sys.executable, "-m", "benchmarks.peers.transport_floor", "--port", str(port), "--grpc-port", str(grpc_port),
               "--grpc-transport", transport]
        floor = stack.enter_context(running(name, cmd, {**os.environ, "PYTHONUNBUFFERED": "1"}, args.workdir, port,
                                            ready_path="/health"))
        floor.grpc_address = f"127.0.0.1:{grpc_port}"
        servers.append((name, floor, [p for p in args.protocols if p in PEER_PROTOCOLS[name]]))
    return servers, batch


def run(args) -> dict:
    """Every server up at once (an idle one costs < 0.02 cores), then rounds in which each server × protocol is loaded
    in turn: on a shared machine whose speed drifts, interleaving spreads the drift over every figure alike. Each
    figure is the median over rounds."""
    from contextlib import ExitStack

    from service.artifact import load_artifact

    image = jpeg()
    model = load_artifact(args.artifact, verify=False).manifest.model.name
    settings = dict(kv.split("=", 1) for kv in args.setting)
    rounds: list[dict] = []
    with ExitStack() as stack:
        servers, batch = start_servers(stack, args, settings)
        work, serials = RawSerial(args.artifact, image, batch), []  # the yardstick, once a round, the servers idle
        for i in range(args.rounds):
            serials.append(work())
            print(f"  round {i + 1} raw serial {serials[-1]['images_per_s']:7.1f} img/s", flush=True)
            for concurrency in args.concurrency:
                for name, server, protocols in servers:
                    for protocol, client in [(p, c) for p in protocols for c in clients_for(p, name, args.perf_analyzer)]:
                        if client == "perf_analyzer":
                            r = asyncio.run(perf_analyzer.closed_loop(
                                protocol, server.url, server.grpc_address, image, model, concurrency=concurrency,
                                warmup_s=args.warmup, duration_s=args.duration, workdir=args.workdir,
                                server_cpu_s=lambda pid=server.proc.pid: server_cpu_s(pid)))
                        else:
                            r = asyncio.run(closed_loop(protocol, server.url, server.grpc_address, server.proc.pid, image, model,
                                                        concurrency=concurrency, warmup_s=args.warmup, duration_s=args.duration,
                                                        litserve=name == "litserve"))
                        r.update(server=name, round=i + 1, client=client)
                        print(f"  round {i + 1} {name:>8} {protocol:>9} {client:>13} c={concurrency:<3} {r['images_per_s']:7.1f} img/s  "
                              f"p99 {r['latency']['p99_ms']} ms  server {r['server_cpu_ms_per_image']:.2f} ms CPU/img  "
                              f"{r['statuses']}", flush=True)
                        rounds.append(r)
    serial = median_of(serials)
    work_ms = serial["work_cpu_ms_per_image"]  # CPU against CPU (see raw_serial)
    phases = []
    for key in dict.fromkeys((r["server"], r["protocol"], r["concurrency"], r["client"]) for r in rounds):
        runs = [r for r in rounds if (r["server"], r["protocol"], r["concurrency"], r["client"]) == key]
        median = lambda f: float(np.median([f(r) for r in runs]))  # noqa: E731
        phases.append({
            "server": key[0], "protocol": key[1], "concurrency": key[2], "client": key[3], "rounds": len(runs),
            "images_per_s": round(median(lambda r: r["images_per_s"]), 1),
            "latency": {"p50_ms": round(median(lambda r: r["latency"]["p50_ms"] or 0), 2),
                        "p99_ms": round(median(lambda r: r["latency"]["p99_ms"] or 0), 2)},
            "statuses": dict(sum((Counter(r["statuses"]) for r in runs), Counter())),
            "server_cpu_ms_per_image": round(median(lambda r: r["server_cpu_ms_per_image"]), 3),
            "server_cpu_ms_per_image_by_thread": {
                role: round(median(lambda r, role=role: r.get("server_cpu_ms_per_image_by_thread", {}).get(role, 0.0)), 3)
                for role in dict.fromkeys(k for r in runs for k in r.get("server_cpu_ms_per_image_by_thread", {}))},
        })
    for r in phases:
        r["of_raw_serial"] = round(r["images_per_s"] / serial["images_per_s"], 3)
        r["cpu_over_work"] = round(r["server_cpu_ms_per_image"] / work_ms, 2)
        peer = next((t for t in phases if t["server"] == "triton" and t["protocol"] == r["protocol"]
                     and t["concurrency"] == r["concurrency"] and t["client"] == r["client"]), None)
        if peer is not None and r["server"] == "vitserve" and peer["images_per_s"]:
            r["over_triton"] = round(r["images_per_s"] / peer["images_per_s"], 2)
            r["p99_over_triton"] = round(r["latency"]["p99_ms"] / peer["latency"]["p99_ms"], 2)
    return {"image_bytes": len(image), "settings": settings, "server_cpus": args.server_cpus, "max_batch_size": batch, "raw_serial": serial,
            "phases": phases, "rounds": rounds}


def table(result: dict) -> str:
    s = result["raw_serial"]
    lines = [
        f"raw serial (decode one at a time, then {s['engine']} at batch {s['batch']}): **{s['images_per_s']} img/s** "
        f"(median of rounds: {', '.join(map(str, s.get('images_per_s_by_round', [])))}) "
        f"(decode {s['decode_ms_per_image']} ms + engine {s['engine_ms_per_image']} ms per image; their CPU: decode "
        f"{s['decode_cpu_ms_per_image']} ms + engine {s['engine_cpu_ms_per_image']} ms on {s['engine_threads']} threads "
        f"= **{s['work_cpu_ms_per_image']} ms** per image)", "",
        "| server | protocol | clients | img/s | ÷ raw serial | p50 ms | p99 ms | refused/failed | server CPU ms/img | "
        "÷ work's CPU | img/s ÷ Triton's (p99 ÷ Triton's) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["phases"]:
        bad = sum(v for k, v in r["statuses"].items() if k != "200")
        versus = f"{r['over_triton']} ({r['p99_over_triton']})" if "over_triton" in r else ""
        client = " (perf_analyzer)" if r.get("client") == "perf_analyzer" else ""
        lines.append(f"| {r.get('server', 'vitserve')} | {r['protocol']}{client} | {r['concurrency']} | {r['images_per_s']} | {r['of_raw_serial']} | "
                     f"{r['latency']['p50_ms']} | {r['latency']['p99_ms']} | {bad} | {r['server_cpu_ms_per_image']} | "
                     f"{r['cpu_over_work']} | {versus} |")
    return "\n".join(lines + budget_table(result))


def budget_table(result: dict) -> list[str]:
    """Our servers' CPU per image by thread, beside what the work itself costs."""
    rows = [(f"{r['server']} | {r['protocol']} | {r['concurrency']}", r["server_cpu_ms_per_image_by_thread"])
            for r in result["phases"] if r["server"].startswith("vitserve") and r.get("server_cpu_ms_per_image_by_thread")]
    s = result["raw_serial"]
    return [] if not rows else ["", f"Server CPU ms per image by thread (the work alone, raw serial: decode {s['decode_cpu_ms_per_image']}"
                                f"{all_cores_decode(s)}, engine {s['engine_cpu_ms_per_image']} on {s['engine_threads']} threads):", "",
                                *measure.thread_budget_table("server | protocol | clients", rows)]


def all_cores_decode(serial: dict) -> str:
    """The decode's CPU with the service's decode threads all decoding at once (results before it lack the figure)."""
    ms = serial.get("decode_cpu_ms_per_image_all_cores")
    return "" if ms is None else f" ({ms} with {serial['decode_threads']} threads decoding at once, as the server's pool does)"


def main(argv: list[str] | None = None) -> int:
    from service.settings import DEMO_ARTIFACT

    p = argparse.ArgumentParser(prog="vitserve bench front-door", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, default=DEMO_ARTIFACT)
    p.add_argument("--protocols", type=lambda s: s.split(","), default=list(PROTOCOLS))
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[16])
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                   help="a service setting for the run (VITSERVE_NAME), e.g. max_latency_ms=5000")
    p.add_argument("--server-cpus", default=None, metavar="LIST",
                   help="pin our server to these cores (taskset -c LIST): how throughput grows with the cores it gets")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds over every server and protocol (median)")
    p.add_argument("--litserve", action="store_true", help="also load LitServe's idiom around the same engine (base64 JSON)")
    p.add_argument("--triton", action="store_true",
                   help="also load Triton (PyTriton) serving the same engine and Preprocessor: make triton-peer first")
    p.add_argument("--grpc-aio", action="store_true",
                   help="also load the same service with gRPC on grpc.aio (VITSERVE_GRPC_TRANSPORT=python), gRPC only")
    p.add_argument("--perf-analyzer", action="store_true",
                   help="also load gRPC and v2-binary with Triton's perf_analyzer (C++, far cheaper than our Python client "
                        "on shared cores): make perf-analyzer first")
    p.add_argument("--floor", action="store_true",
                   help="also load the transports alone (uvicorn and grpc.aio answering fixed results) for their CPU floor")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/vitserve-front-door"))
    p.add_argument("--name", default="front-door_demo")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if unknown := set(args.protocols) - set(PROTOCOLS):
        p.error(f"unknown protocols {sorted(unknown)}; choose from {', '.join(PROTOCOLS)}")
    result = {"environment": environment(), "command": command_line("front-door", argv), **run(args)}
    text = table(result)
    best = max((r for r in result["phases"] if r["server"] == "vitserve"), key=lambda r: r["images_per_s"])
    rows = [("raw serial", f"{result['raw_serial']['images_per_s']} img/s"),
            ("best", f"{best['protocol']} c={best['concurrency']}: {best['images_per_s']} img/s ({best['of_raw_serial']} of raw)")]
    return finish("front door", result, rows, table=text, name=None if args.no_write else args.name)


if __name__ == "__main__":
    sys.exit(main())
