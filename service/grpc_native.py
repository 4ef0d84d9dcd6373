"""gRPC's transport in C++, the calls answered here: a stand-in for ``grpc.aio.server`` that starts
``vitserve-grpc-front`` (``service/native/grpc_front.cc``) and runs every call it forwards through the same
registered handlers (servicers, interceptors, health, reflection) on this worker's event loop.

Why: grpc.aio costs ~0.3 ms of server CPU per call before any work (measured, docs/serving.md "The front door"),
more than the rest of the door together; gRPC's C++ server and one Unix socket of frames cost ~0.1 ms. The calls keep
everything they had under grpc.aio: the door, deadlines (``time_remaining``), metadata, trailing metadata, abort codes,
cancellation (the handler's task is cancelled, as grpc.aio cancels it), streaming (health ``Watch``, reflection).

The frame format is the C++ file's header comment; this side reads START / MESSAGE / HALF_CLOSE / CANCEL and writes
MESSAGE / FINISH. ``VITSERVE_GRPC_TRANSPORT`` chooses (``auto``: this when the binary is built, else grpc.aio).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc

from service.grpc_frames import (
    HEAD,
    READY,
    STOP,
    Abort,
    Call,
    Context,
    Details,
    Frames,
    deserialize,
    requests_of,
)

log = logging.getLogger("vitserve.grpc")
BINARY_NAME = "vitserve-grpc-front"


def find_binary() -> Path | None:
    """The built front: next to its source (``make native``), else on PATH (a container image's install)."""
    here = Path(__file__).parent / "native" / BINARY_NAME
    if here.is_file() and os.access(here, os.X_OK):
        return here
    found = shutil.which(BINARY_NAME)
    return Path(found) if found else None


def transport(settings) -> str:
    """Who terminates gRPC under these settings: "native" (this module's front) or "python" (grpc.aio)."""
    if settings.grpc_transport == "python":
        return "python"
    if find_binary() is not None:
        return "native"
    if settings.grpc_transport == "native":
        raise RuntimeError(f"VITSERVE_GRPC_TRANSPORT=native but {BINARY_NAME} is not built (make native)")
    return "python"


class NativeServer(grpc.aio.Server):
    """``grpc.aio.Server``'s interface (what service/grpc_api.py, health and reflection use), served by
    ``vitserve-grpc-front``. A subclass because registrations pick their servicer by it (reflection's async one)."""

    def __init__(self, binary: Path, interceptors=(), max_receive_bytes: int = 4 << 20):
        self.binary, self.interceptors, self.max_receive_bytes = binary, tuple(interceptors), max_receive_bytes
        self.generic_handlers: list = []
        self.handler_cache: dict[str, Any] = {}
        self.process: subprocess.Popen | None = None
        self.frames: Frames | None = None
        self.stopping = False
        self._sock: socket.socket | None = None
        self._bound: tuple[str, list[str]] | None = None  # address and TLS options, to start another front
        self._restart_delay_s = 0.5
        self.client_streaming: list[str] = []

    def add_generic_rpc_handlers(self, handlers) -> None:
        self.generic_handlers.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        # The generic handlers registered beside these answer the calls; from these the front learns which methods
        # take a stream of requests (reflection), whose further messages it forwards.
        self.client_streaming += [f"/{service}/{name}" for name, h in handlers.items() if h.request_streaming]

    def add_insecure_port(self, address: str) -> int:
        return self._bind(address, [])

    def add_secure_port(self, address: str, credentials_files: tuple[Path, Path]) -> int:
        cert, key = credentials_files
        return self._bind(address, ["--tls-cert", str(cert), "--tls-key", str(key)])

    def _bind(self, address: str, tls: list[str]) -> int:
        """Start the front (it binds the port at once, as grpc.aio does in add_*_port) and wait for its READY."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        args = [str(self.binary), "--fd", str(theirs.fileno()), "--address", address,
                "--max-receive", str(self.max_receive_bytes), *tls]
        if self.client_streaming:
            args += ["--client-streaming", ",".join(self.client_streaming)]
        self.process = subprocess.Popen(args, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        theirs.close()
        head = _recv_exact(ours, 13, timeout_s=30)
        if head is None:
            self.process.wait(timeout=5)
            ours.close()
            return 0  # grpc.aio's way of saying the port could not be bound
        _length, kind, port = HEAD.unpack(head)
        if kind != READY:
            raise RuntimeError(f"{BINARY_NAME} sent frame kind {kind} before READY")
        ours.setblocking(False)
        self._sock, self._bound = ours, (address, tls)
        return port

    async def start(self) -> None:
        if self._sock is None:
            raise RuntimeError("no port bound")
        loop = asyncio.get_running_loop()
        _, self.frames = await loop.create_connection(lambda: Frames(self), sock=self._sock)

    def front_exited(self) -> None:
        """The front died under a running worker (a crash, an OOM kill): its calls in flight are lost with it (their
        clients saw the connection drop); start another on the same port, backing off if it keeps dying."""
        if self.stopping:
            return
        log.error("%s exited (code %s); starting another", BINARY_NAME, self.process.poll() if self.process else None)
        asyncio.get_running_loop().create_task(self._restart())

    async def _restart(self) -> None:
        await asyncio.sleep(self._restart_delay_s)
        self._restart_delay_s = min(30.0, self._restart_delay_s * 2)
        if self.stopping or self._bound is None:
            return
        if self.process is not None:
            await asyncio.to_thread(self.process.wait)
        if not await asyncio.to_thread(self._bind, *self._bound):
            log.error("%s could not bind %s again; retrying", BINARY_NAME, self._bound[0])
            return self.front_exited()
        await self.start()
        self._restart_delay_s = 0.5
        log.info("%s restarted on %s", BINARY_NAME, self._bound[0])

    def _lookup(self, details: Details):
        for generic in self.generic_handlers:
            handler = generic.service(details)
            if handler is not None:
                return handler
        return None

    async def _handler_for(self, call: Call):
        if not self.interceptors:
            handler = self.handler_cache.get(call.method)
            if handler is None:
                handler = self._lookup(Details(call.method, ()))
                if handler is not None:
                    self.handler_cache[call.method] = handler
            return handler
        details = Details(call.method, call.metadata)

        async def continuation(d):
            return self._lookup(d)

        chain = continuation
        for interceptor in reversed(self.interceptors):  # the first interceptor sees the call first, as in grpc.aio
            chain = functools.partial(interceptor.intercept_service, chain)
        return await chain(details)

    async def run(self, call: Call, first_message: bytes | None) -> None:
        """One call, start to FINISH, as grpc.aio runs a method handler."""
        context = Context(call)
        try:
            handler = await self._handler_for(call)
            if handler is None:
                call.finish(grpc.StatusCode.UNIMPLEMENTED, "Method not found!", ())
                return
            call.handler = handler
            if handler.request_streaming:
                early, call.requests = call.requests, asyncio.Queue()  # messages that came before this task ran follow
                if first_message is not None:
                    call.requests.put_nowait(bytes(first_message))
                while early is not None and not early.empty():
                    call.requests.put_nowait(early.get_nowait())
                request = requests_of(call)
            else:
                if first_message is None:
                    call.finish(grpc.StatusCode.INTERNAL, "the client sent no request message", ())
                    return
                request = deserialize(call, first_message)
            behaviour = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
            if handler.response_streaming:
                result = behaviour(request, context)
                if hasattr(result, "__aiter__"):
                    async for message in result:
                        call.send_message(message)
                else:
                    await result
                last = None
            else:
                last = await behaviour(request, context)
            code = context._code or grpc.StatusCode.OK
            call.finish(code, context._details, context._trailing, last if code == grpc.StatusCode.OK else None)
        except Abort as e:
            call.finish(e.code, e.details, context._trailing)
        except asyncio.CancelledError:
            call.finish(grpc.StatusCode.CANCELLED, "cancelled", ())
        except Exception as e:  # as grpc.aio answers a handler's exception: the code it set (else UNKNOWN), logged
            log.exception("gRPC method %s raised", call.method)
            code = context._code if context._code not in (None, grpc.StatusCode.OK) else grpc.StatusCode.UNKNOWN
            call.finish(code, f"Unexpected {type(e)}: {e}", context._trailing)

    async def stop(self, grace: float | None) -> None:
        """Stop taking calls; those in flight are answered within ``grace`` seconds (the front's Shutdown)."""
        self.stopping = True
        if self.process is None or self.process.poll() is not None:
            return
        grace_ms = int((grace or 0) * 1000)
        if self.frames is not None:
            self.frames.write_frame(STOP, grace_ms, b"")
        else:  # never started: nothing in flight
            self.process.kill()
        deadline = time.monotonic() + grace_ms / 1000 + 5
        while self.process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.process.poll() is None:
            self.process.kill()
        if self.frames is not None and self.frames.transport is not None:
            self.frames.transport.close()

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        if self.frames is not None:
            await asyncio.wait_for(asyncio.shield(self.frames.closed), timeout)
        return True


def _recv_exact(sock: socket.socket, n: int, timeout_s: float) -> bytes | None:
    sock.settimeout(timeout_s)
    data = b""
    while len(data) < n:
        try:
            chunk = sock.recv(n - len(data))
        except (TimeoutError, OSError):
            return None
        if not chunk:
            return None
        data += chunk
    return data
