"""The frames between ``vitserve-grpc-front`` and its worker (the format is service/native/grpc_front.cc's header
comment): each call's START / MESSAGE / HALF_CLOSE / CANCEL in, its MESSAGE / FINISH out, and the part of
``grpc.aio.ServicerContext`` the handlers use. service/grpc_native.py starts the front and runs the calls."""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from service.grpc_native import NativeServer

log = logging.getLogger("vitserve.grpc")
START, MESSAGE, HALF_CLOSE, CANCEL, FINISH, READY, STOP = 1, 2, 3, 4, 5, 6, 7
HEAD = struct.Struct("<IBQ")  # length (of what follows), kind, call id
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")


class Abort(Exception):
    """``context.abort``: ends the handler; the call finishes with this code."""

    def __init__(self, code: grpc.StatusCode, details: str):
        self.code, self.details = code, details


class Details:
    """grpc.HandlerCallDetails, as interceptors and generic handlers receive it."""

    __slots__ = ("method", "invocation_metadata")

    def __init__(self, method: str, metadata: tuple):
        self.method, self.invocation_metadata = method, metadata


class Context:
    """The part of ``grpc.aio.ServicerContext`` handlers use."""

    def __init__(self, call: Call):
        self._call = call
        self._trailing: tuple = ()
        self._code: grpc.StatusCode | None = None
        self._details = ""

    def time_remaining(self) -> float | None:
        deadline = self._call.deadline
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def invocation_metadata(self) -> tuple:
        return self._call.metadata

    def peer(self) -> str:
        return self._call.peer

    def set_trailing_metadata(self, metadata) -> None:
        self._trailing = tuple(metadata)

    def trailing_metadata(self) -> tuple:
        return self._trailing

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def cancelled(self) -> bool:
        return self._call.cancelled

    def done(self) -> bool:
        return self._call.finished

    async def send_initial_metadata(self, metadata) -> None:  # sent with the first message by gRPC
        pass

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()) -> None:
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise Abort(code, details)

    async def write(self, message) -> None:
        self._call.send_message(message)

    async def read(self):
        item = await self._call.requests.get()
        return grpc.aio.EOF if item is None else deserialize(self._call, item)


class Call:
    __slots__ = ("id", "method", "deadline", "peer", "metadata", "handler", "requests", "task", "cancelled",
                 "finished", "door")

    def __init__(self, door: Frames, call_id: int, method: str, deadline: float | None, peer: str, metadata: tuple):
        self.door, self.id, self.method, self.deadline, self.peer, self.metadata = door, call_id, method, deadline, peer, metadata
        self.handler = None
        self.requests: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.cancelled = self.finished = False

    def send_message(self, message) -> None:
        self.door.write_frame(MESSAGE, self.id, self.handler.response_serializer(message) if self.handler.response_serializer else message)

    def finish(self, code: grpc.StatusCode, details: str, trailing: tuple, last: Any = None) -> None:
        if self.finished:
            return
        self.finished = True
        parts = [_U32.pack(code.value[0]), _U32.pack(len(details.encode())), details.encode(), _U32.pack(len(trailing))]
        for k, v in trailing:
            kb, vb = k.encode(), (v if isinstance(v, bytes) else str(v).encode())
            parts += [_U32.pack(len(kb)), kb, _U32.pack(len(vb)), vb]
        if last is None:
            parts.append(b"\0")
        else:
            serialize = self.handler.response_serializer if self.handler else None
            parts += [b"\1", serialize(last) if serialize else last]
        self.door.write_frame(FINISH, self.id, b"".join(parts))


async def requests_of(call: Call):
    """A client-streaming call's requests, parsed as the handler reads them, until the client's half-close."""
    while (item := await call.requests.get()) is not None:
        yield deserialize(call, item)


class Frames(asyncio.Protocol):
    """The worker's end of the socket: frames in, calls run, frames out."""

    def __init__(self, server: NativeServer):
        self.server = server
        self.buffer = bytearray()
        self.calls: dict[int, Call] = {}
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        for call in list(self.calls.values()):
            call.cancelled = True
            if call.task is not None:
                call.task.cancel()
        if not self.closed.done():
            self.closed.set_result(None)
        self.server.front_exited()

    def write_frame(self, kind: int, call_id: int, body: bytes) -> None:
        if kind == FINISH:
            self.calls.pop(call_id, None)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(HEAD.pack(len(body) + 9, kind, call_id) + body)

    def data_received(self, data: bytes) -> None:
        if self.buffer:  # the rest of a frame that arrived in pieces
            self.buffer += data
            data = bytes(self.buffer)
            self.buffer.clear()
        view = memoryview(data)  # frames sliced without copying; a request's bytes are copied once, by protobuf
        at, end = 0, len(data)
        while end - at >= 13:
            length, kind, call_id = HEAD.unpack_from(data, at)
            if end - at < 4 + length:
                break
            body = view[at + 13:at + 4 + length]
            at += 4 + length
            try:
                self.on_frame(kind, call_id, body)
            except Exception:  # a bug here must not stop every other call: log it, fail this one
                log.exception("gRPC call %s failed in the frame handler", call_id)
                call = self.calls.get(call_id)
                if call is not None:
                    call.finish(grpc.StatusCode.INTERNAL, "internal error", ())
        if at < end:
            self.buffer += view[at:]

    def on_frame(self, kind: int, call_id: int, body: memoryview) -> None:
        if kind == START:
            self.start(call_id, body)
        elif kind == MESSAGE or kind == HALF_CLOSE:  # client-streaming methods only; may come before the handler runs
            call = self.calls.get(call_id)
            if call is not None:
                if call.requests is None:
                    call.requests = asyncio.Queue()
                call.requests.put_nowait(bytes(body) if kind == MESSAGE else None)  # parsed when the handler reads it
        elif kind == CANCEL:
            call = self.calls.pop(call_id, None)
            if call is not None:
                call.cancelled = call.finished = True  # gRPC has answered the client already
                if call.task is not None:
                    call.task.cancel()

    def start(self, call_id: int, body: memoryview) -> None:
        at = 0
        (n,) = _U32.unpack_from(body, at)
        method = str(body[4:4 + n], "ascii")
        at = 4 + n
        (left_ms,) = _I64.unpack_from(body, at)
        at += 8
        (n,) = _U32.unpack_from(body, at)
        peer = str(body[at + 4:at + 4 + n], "utf-8", "replace")
        at += 4 + n
        (count,) = _U32.unpack_from(body, at)
        at += 4
        metadata = []
        for _ in range(count):
            (n,) = _U32.unpack_from(body, at)
            key = str(body[at + 4:at + 4 + n], "ascii", "replace")
            at += 4 + n
            (n,) = _U32.unpack_from(body, at)
            value = body[at + 4:at + 4 + n]
            at += 4 + n
            metadata.append((key, bytes(value) if key.endswith("-bin") else str(value, "utf-8", "replace")))
        has_message = body[at] == 1
        deadline = None if left_ms < 0 else time.monotonic() + left_ms / 1000
        call = Call(self, call_id, method, deadline, peer, tuple(metadata))
        self.calls[call_id] = call
        call.task = asyncio.get_running_loop().create_task(self.server.run(call, body[at + 1:] if has_message else None))


def deserialize(call: Call, data: memoryview):
    """A request message as its handler takes it (protobuf's parser reads the frame's bytes in place)."""
    handler = call.handler
    return handler.request_deserializer(data) if handler is not None and handler.request_deserializer else bytes(data)
