"""The door's budget, layer by layer: what the event loop spends on one request between the socket and the batcher.

    vitserve bench door-budget                          # the demo artifact, one 640×480 JPEG per request (~1 min)
    vitserve bench door-budget --protocols raw,multipart --requests 3000

One Classifier (the artifact's real engine, decode threads and batcher) in this process; every figure is CPU time of
the event loop's own thread (``time.thread_time``: the decode and engine threads are not in it), per request:

1. **The whole request, in process**: the service's own HTTP protocol (uvicorn's httptools protocol with vitserve's
   header deadline and refusal below ASGI, as ``http_header_deadline.install`` makes it) in front of the guarded app
   (body limit → inference routes, as in front of BentoML), on ``--clients`` connections whose transports are in
   memory, each fed the exact bytes `vitserve bench front-door`'s clients send, closed loop: what a server's loop
   does for a request except the client sockets' system calls.
2. **uvicorn**: the same protocol and requests in front of an app that reads the body and sends a fixed answer of
   the same size: HTTP parsing, the request cycle and its task, the response's bytes.
3. **Layers**: the service's own functions on one request, each timed alone: the body read, body → images, the door
   (``RequestScope``: accepting, admission, the tally), top-k (a request's share: its batch was scored at once, in the
   rest), rendering the answer, the two ASGI messages.

What 1 has beyond 2 and 3 is the rest of the route: the guard and the dispatch, handing the image to a decode thread,
the request's task and the batcher's futures, the loop's wake-ups as results come back from the decode and engine
threads. A real server's loop spends more than 1 by its socket reads and writes: `vitserve bench front-door`'s
by-thread table (event loop) minus 1, on the same machine. Rounds alternate the protocols; medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = ("raw", "multipart", "v2-binary")
UVICORN = "uvicorn: HTTP parse, request cycle, response bytes"
REST = "the rest of the route: guard, dispatch, decode hand-off, batcher futures, wake-ups"
TOTAL = "total in process (all but the client sockets' system calls)"


# ---- requests as the front-door clients send them -------------------------------------------------------------------
def headers_and_body(wire: bytes) -> tuple[dict[bytes, bytes], bytes]:
    """(header names lower-cased → values, body) of one HTTP/1.1 request's bytes, as the route reads them."""
    head, body = wire.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, v in (line.split(b":", 1) for line in lines)}, body


# ---- 1. uvicorn's protocol on in-memory transports ---------------------------------------------------------------------
class MemoryTransport:
    """What uvicorn's protocol asks of a transport; the answer's bytes are kept until the protocol says it is done."""

    def __init__(self):
        self.out = bytearray()
        self.closed = False

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 3000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_protocol(self, protocol) -> None:
        pass


def service_protocol():
    """The HTTP protocol class a vitserve server runs (service/http_header_deadline.py ``install``), without installing it."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from service.http_header_deadline import protocol_with_header_deadline
    from service.http_refusal import protocol_with_early_refusal

    return protocol_with_early_refusal(protocol_with_header_deadline(HttpToolsProtocol, 20.0))


async def uvicorn_closed_loop(app, wire: bytes, requests: int, clients: int) -> tuple[float, float, int]:
    """(loop CPU µs per request, requests/s, the last answer's body bytes): ``clients`` connections, each sending its next request when the last is
    answered, through the service's protocol class."""
    import uvicorn
    from uvicorn.server import ServerState

    config = uvicorn.Config(app=app, lifespan="off", access_log=False, log_level="warning", timeout_keep_alive=75)
    config.load()
    state = ServerState()
    loop = asyncio.get_running_loop()
    count = {"sent": 0, "answered": 0, "body_bytes": 0}
    finished = loop.create_future()
    base = service_protocol()

    class Driven(base):
        def on_response_complete(self) -> None:
            super().on_response_complete()
            if b" 200 " not in self.transport.out[:16]:
                if not finished.done():
                    finished.set_exception(RuntimeError(f"answered {bytes(self.transport.out[:200])!r}"))
                return
            head, _, body = bytes(self.transport.out).partition(b"\r\n\r\n")
            count["body_bytes"] = len(body)
            self.transport.out.clear()
            count["answered"] += 1
            if count["answered"] == requests:
                finished.set_result(None)
            elif count["sent"] < requests:
                count["sent"] += 1
                loop.call_soon(self.data_received, wire)  # the client's next request, as its next read would bring it

    connections = []
    for _ in range(clients):
        p = Driven(config=config, server_state=state, app_state={}, _loop=loop)
        p.connection_made(MemoryTransport())
        connections.append(p)
    c0, t0 = time.thread_time(), time.perf_counter()
    for p in connections:
        count["sent"] += 1
        p.data_received(wire)
    await finished
    cpu, wall = time.thread_time() - c0, time.perf_counter() - t0
    for p in connections:
        p.connection_lost(None)
    return cpu * 1e6 / requests, requests / wall, count["body_bytes"]


# ---- 2. uvicorn alone: a fixed answer ---------------------------------------------------------------------------------
def fixed_answer(size: int):
    """An ASGI app that reads the body and answers ``size`` bytes of JSON: uvicorn's part of a request, nothing else."""
    body = b'{"answer": "' + b"x" * max(0, size - 14) + b'"}'
    start = {"type": "http.response.start", "status": 200,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}

    async def app(scope, receive, send) -> None:
        while (await receive()).get("more_body"):
            pass
        await send(start)
        await send({"type": "http.response.body", "body": body})

    return app


# ---- 3. the layers, each alone --------------------------------------------------------------------------------------
async def layers(clf, protocol: str, headers: dict[bytes, bytes], body: bytes, calls: int) -> dict[str, float]:
    """Loop CPU µs per call of each layer the route runs for one request of ``protocol``."""
    from service import kserve_v2
    from service.http_errors import JSON_API, V2_HTTP
    from service.http_guard import client_timeout_s
    from service.http_inference import classify_body, multipart_images, read_body, send_response, timing_headers
    from service.request_scope import RequestScope
    from service.v2_http_api import parse_request, render_response

    wire_protocol = V2_HTTP if protocol == "v2-binary" else JSON_API

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        pass

    def timed(fn) -> float:
        c0 = time.thread_time_ns()
        for _ in range(calls):
            fn()
        return (time.thread_time_ns() - c0) / calls / 1000

    async def timed_async(make) -> float:
        c0 = time.thread_time_ns()
        for _ in range(calls):
            await make()
        return (time.thread_time_ns() - c0) / calls / 1000

    # One real answer to render, and its scored row and batch stats for top-k, from the service's own batcher.
    image = body if protocol == "raw" else None
    if protocol == "multipart":
        image = multipart_images(body, headers[b"content-type"])[0][0]
    if protocol == "v2-binary":
        inputs, outputs, binary_default, request_id = parse_request(body, headers[b"inference-header-content-length"].decode())
        model = kserve_v2.Model(clf)
        tensors, result = await kserve_v2.infer(model, inputs, outputs, V2_HTTP)
        image = inputs[0].data[0]
    else:
        result = await clf.classify([image], 5, protocol=JSON_API)
    pixels, _ = clf.decode(image)
    rows, stats = await clf.batcher.submit(pixels[None], time.monotonic() + 10)

    out = {"read the body": await timed_async(lambda: read_body(receive, 10.0, 500.0))}
    if protocol == "multipart":
        out["body → images"] = timed(lambda: multipart_images(body, headers[b"content-type"]))
    elif protocol == "v2-binary":
        out["body → images"] = timed(lambda: parse_request(body, headers[b"inference-header-content-length"].decode()))
    else:
        out["body → images"] = 0.0  # the body is the image

    def door() -> None:
        with RequestScope(clf, wire_protocol, lambda: client_timeout_s(headers)) as request:
            clf.admission.settle(request.ticket, 1)
            request.answered = True

    clf.in_flight += 1  # as under load: the last request out writes the tally in bulk, which a busy server rarely does
    try:
        out["the door (accept, admit, count)"] = timed(door)
    finally:
        clf.in_flight -= 1
    out["top-k (from the batch's scores; the tally)"] = timed(lambda: clf._classification(rows, stats, 5, wire_protocol, 0.001))
    if protocol == "v2-binary":
        params = kserve_v2.response_parameters(result)
        out["render the answer"] = timed(lambda: render_response(model, tensors, outputs, binary_default, request_id,
                                                                 kserve_v2.response_parameters(result)))
        answer, extra = render_response(model, tensors, outputs, binary_default, request_id, params)[0], None
    else:
        out["render the answer"] = timed(lambda: (classify_body(clf, result), timing_headers(result, 0.01)))
        answer, extra = classify_body(clf, result), timing_headers(result, 0.01)
    out["two ASGI messages"] = await timed_async(lambda: send_response(send, 200, answer, headers=extra))
    return out


# ---- the run ----------------------------------------------------------------------------------------------------------
async def measure(args) -> dict:
    from benchmarks.front_door import http_request, jpeg
    from service.classifier import Classifier
    from service.http_api import make_http_app
    from service.http_guard import guard
    from service.settings import Settings

    # What service.standalone.app builds (the guard in front of the app BentoML mounts), with its Classifier at hand.
    # A generous latency bound: the door decides as always (its cost is measured), but 16 requests arriving at once
    # into a cold service are not refused while it learns its unloaded latency.
    settings = Settings(artifact=args.artifact, grpc_port=0, max_latency_ms=10_000)
    clf = Classifier(settings)
    app = guard(make_http_app(lambda: clf), lambda: clf, settings)
    clf.start()
    image = jpeg()
    wires = {p: http_request(p, image, clf.manifest.model.name, "127.0.0.1") for p in args.protocols}
    rows: dict[str, dict[str, list[float]]] = {p: {} for p in args.protocols}
    sizes: dict[str, int] = {}
    try:
        for p in args.protocols:  # warm every path once; the answer's size, for uvicorn's fixed one
            sizes[p] = (await uvicorn_closed_loop(app, wires[p], args.clients * 4, args.clients))[2]
        for _ in range(args.rounds):
            for p in args.protocols:
                cpu, rate, _ = await uvicorn_closed_loop(app, wires[p], args.requests, args.clients)
                rows[p].setdefault("whole request in process", []).append(cpu)
                rows[p].setdefault("requests/s in process", []).append(rate)
                cpu, _, _ = await uvicorn_closed_loop(fixed_answer(sizes[p]), wires[p], args.requests, args.clients)
                rows[p].setdefault(UVICORN, []).append(cpu)
                for name, us in (await layers(clf, p, *headers_and_body(wires[p]), args.calls)).items():
                    rows[p].setdefault(name, []).append(us)
        if args.profile:
            await profile(app, wires, args.requests, args.clients)
    finally:
        await clf.stop(5.0)
    return {
        "artifact": str(args.artifact), "clients": args.clients, "requests": args.requests, "calls": args.calls,
        "rounds": args.rounds, "image_bytes": len(image),
        "protocols": {p: {k: round(statistics.median(v), 2) for k, v in r.items()} for p, r in rows.items()},
    }


async def profile(app, wires: dict[str, bytes], requests: int, clients: int, top: int = 25) -> None:
    """The whole request under cProfile (the event loop's thread only), by module and by function: where the rest of
    the route goes. cProfile adds ~1 µs to each of a request's ~350 Python calls, so shares, not times, are the point."""
    import cProfile
    import pstats
    from collections import Counter

    for p, wire in wires.items():
        await uvicorn_closed_loop(app, wire, clients * 4, clients)  # what was left running before is not this request's
        profiler = cProfile.Profile()
        profiler.enable()
        await uvicorn_closed_loop(app, wire, requests, clients)
        profiler.disable()
        stats = pstats.Stats(profiler)
        by_module: Counter[str] = Counter()
        for (file, _, _), (_, _, tottime, _, _) in stats.stats.items():
            by_module[module_of(file)] += tottime
        total = sum(by_module.values())
        print(f"\n{p}: {stats.total_calls / requests:.0f} Python calls per request; own time by module:")
        for module, t in by_module.most_common(12):
            print(f"  {t / total:6.1%}  {module}")
        print(f"{p}: the {top} functions with the most own time:")
        stats.sort_stats("tottime").print_stats(top)


def module_of(file: str) -> str:
    """A profiler entry's file → the package it belongs to (``~`` is a builtin or C function)."""
    if file == "~":
        return "builtins and C extensions (numpy, uvloop, the json encoder, ...)"
    if m := re.search(r"site-packages/([^/]+)", file):
        return m.group(1).removesuffix(".py")
    if m := re.search(r"lib/python3\.\d+/([^/]+)", file):
        return "stdlib " + m.group(1).removesuffix(".py")
    try:
        return ".".join(Path(file).resolve().relative_to(ROOT).with_suffix("").parts[:2])
    except ValueError:
        return Path(file).name


def budget(figures: dict[str, float]) -> dict[str, float]:
    """The loop's CPU per request split: uvicorn, each layer, and the rest (the whole request − both)."""
    layer_names = [k for k in figures if k not in ("whole request in process", "requests/s in process", UVICORN)]
    out = {UVICORN: figures[UVICORN], **{k: figures[k] for k in layer_names}}
    out[REST] = figures["whole request in process"] - sum(out.values())
    out[TOTAL] = figures["whole request in process"]
    return out


def table(result: dict) -> str:
    protocols = list(result["protocols"])
    split = {p: budget(result["protocols"][p]) for p in protocols}
    lines = [f"{result['artifact']}; one {result['image_bytes'] // 1000} KB JPEG per request, {result['clients']} clients "
             f"closed loop, {result['requests']} requests per measurement, layers {result['calls']} calls each; medians "
             f"of {result['rounds']} rounds. Event loop CPU µs per request (decode and engine threads not included).", "",
             "| layer | " + " | ".join(protocols) + " |", "|---|" + "---|" * len(protocols)]
    for name in split[protocols[0]]:
        cells = [f"{split[p][name]:.1f}" for p in protocols]
        if name == TOTAL:
            name, cells = f"**{name}**", [f"**{c}**" for c in cells]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| (requests/s in process) | " + " | ".join(f"{result['protocols'][p]['requests/s in process']:.0f}" for p in protocols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.cli import HelpFormatter, quiet_libraries
    from benchmarks.harness.results import command_line, environment, finish

    p = argparse.ArgumentParser(prog="vitserve bench door-budget", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--artifact", type=Path, default=ROOT / "service" / "demo_artifact")
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help=f"comma-separated, of {', '.join(PROTOCOLS)}")
    p.add_argument("--clients", type=int, default=16, help="requests in flight (closed loop)")
    p.add_argument("--requests", type=int, default=2000, help="requests per closed-loop measurement")
    p.add_argument("--calls", type=int, default=2000, help="calls per layer timing")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="then print where the whole request's loop time goes (cProfile)")
    p.add_argument("--name", default="door-budget", help="results file name")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    args.protocols = [x for x in args.protocols.split(",") if x]
    if unknown := set(args.protocols) - set(PROTOCOLS):
        p.error(f"unknown protocols {sorted(unknown)}")
    quiet_libraries()
    try:  # the event loop a vitserve server runs (uvicorn's loop="auto" picks uvloop where it is installed)
        import uvloop

        result = uvloop.run(measure(args))
    except ImportError:
        result = asyncio.run(measure(args))
    md = table(result)
    print(md)
    payload = {"benchmark": "door-budget", "command": command_line("door-budget", argv), "environment": environment(), **result,
               "budget": {p: {k: round(v, 2) for k, v in budget(f).items()} for p, f in result["protocols"].items()}}
    summary = [(p, f"{f['whole request in process']:.0f} µs of event loop per request in process, uvicorn's {f[UVICORN]:.0f}")
               for p, f in result["protocols"].items()]
    return finish("door-budget", payload, summary, table=md, name=None if args.no_write else args.name)


if __name__ == "__main__":
    sys.exit(main())
