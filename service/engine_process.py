"""One engine process per device, owning the batcher; several front-end processes feed it (``VITSERVE_WORKERS`` > 1).

    front-end worker (HTTP, gRPC, auth, admission, decode → uint8 pixels)  ─┐
    front-end worker                                                        ├─ Unix socket ─→ engine process:
    ...                                                                    ─┘                 normalise → batcher → engine

Why: one process's event loop spends ~0.7 ms per image on sockets, parsing and hand-offs (docs/serving.md "The front door"),
which caps it at a fraction of what a GPU engine does; more front-end processes multiply that, while batches still
form in one place, so the engine sees one queue and its best batch. Each front-end sends a request's images as one
frame of resized uint8 pixels (a quarter of float32's bytes; the engine process normalises the whole frame in one
numpy call) and gets logits and per-image batch stats back. No pickling, one frame per request, many requests in
flight per connection.

Frames, both ways: a 4-byte little-endian length, then the payload.
    request   <Q id> <d deadline (time.monotonic, shared by processes on one host)> <B kind: 0 uint8 NHWC, 1 float32
              NCHW> <I n> <H h> <H w>, then the pixels
    response  <Q id> <B 0>, <I n> <I labels>, float32 logits [n, labels], then STATS [n]
              <Q id> <B 1>, JSON {"type", "message", "retry_after_s"}: a ServiceError of service/errors.py's table
On connecting, the engine process first sends one frame of JSON: the facts a front-end needs about the engine
(:func:`engine_facts`). Hand-written rather than a library: what is needed is two struct layouts on asyncio streams;
multiprocessing's connections pickle every message, and gRPC between processes on one host would cost what this
removes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import struct
import sys
import time

import numpy as np

from service.batch_types import BatchStats
from service.errors import ERROR_TABLE, EngineFailure, ServiceError, ShuttingDown

log = logging.getLogger("vitserve.engine")
LENGTH = struct.Struct("<I")
REQUEST = struct.Struct("<QdBIHH")
RESPONSE = struct.Struct("<QB")
SHAPE = struct.Struct("<II")
STATS = np.dtype([("queue_wait_s", "<f8"), ("inference_s", "<f8"), ("batch_size", "<u4"), ("batch_id", "<u4")])
UINT8_NHWC, FLOAT32_NCHW = 0, 1
ERRORS = {cls.__name__: cls for cls in ERROR_TABLE}


def frame(payload: bytes) -> bytes:
    return LENGTH.pack(len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    (n,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
    return await reader.readexactly(n)


def engine_facts(clf) -> dict:
    """What a front-end needs to know of the engine: for /info, admission's estimates, v2 metadata."""
    return {
        "engine": clf.engine.describe(), "name": clf.engine.name, "device": clf.engine.device,
        "max_batch_size": clf.max_batch_size, "max_batch_reason": clf.max_batch_reason,
        "selection": [a.summary() for a in clf.selection.attempts], "threads": clf.threads.describe(),
        "admission": {"unloaded_s": clf.admission.unloaded_s, "full_batch_s": clf.admission.full_batch_s},
        "pid": os.getpid(),
    }


# ---- the engine process ----------------------------------------------------------------------------------------------------
class EngineServer:
    def __init__(self, clf):
        self.clf = clf
        self.facts = frame(json.dumps(engine_facts(clf)).encode())
        self.connections: set[asyncio.StreamWriter] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.add(writer)
        writer.write(self.facts)
        tasks: set[asyncio.Task] = set()
        try:
            while True:
                payload = await read_frame(reader)
                task = asyncio.get_running_loop().create_task(self.answer(payload, writer))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the front-end closed its end (drained, stopped or died): its requests' answers go nowhere
        finally:
            for task in tasks:
                task.cancel()
            self.connections.discard(writer)
            writer.close()

    async def answer(self, payload: bytes, writer: asyncio.StreamWriter) -> None:
        request_id, deadline, kind, n, h, w = REQUEST.unpack_from(payload)
        try:
            data = memoryview(payload)[REQUEST.size :]
            if kind == UINT8_NHWC:
                pixels = self.clf.preprocessor.normalize(np.frombuffer(data, np.uint8).reshape(n, h, w, 3))
            else:
                pixels = np.frombuffer(data, "<f4").reshape(n, 3, h, w)
            logits, stats = await self.clf.batcher.submit(pixels, deadline)
            table = np.array([(s.queue_wait_s, s.inference_s, s.batch_size, s.batch_id) for s in stats], STATS)
            logits = np.ascontiguousarray(logits, "<f4")
            out = RESPONSE.pack(request_id, 0) + SHAPE.pack(*logits.shape) + logits.tobytes() + table.tobytes()
        except ServiceError as exc:
            error = {"type": type(exc).__name__, "message": exc.message, "retry_after_s": exc.retry_after_s}
            out = RESPONSE.pack(request_id, 1) + json.dumps(error).encode()
        except Exception as exc:  # noqa: BLE001 - answered as the engine's failure, never a hang
            log.exception("engine process: request failed")
            error = {"type": "EngineFailure", "message": f"inference failed: {type(exc).__name__}", "retry_after_s": None}
            out = RESPONSE.pack(request_id, 1) + json.dumps(error).encode()
        if not writer.is_closing():
            writer.write(frame(out))


async def serve(path: str, settings) -> None:
    """Load, warm and check the engine, then answer front-ends on ``path`` until SIGTERM and their goodbye."""
    from service.classifier import Classifier

    import gc

    clf = Classifier(settings)
    gc.collect()
    gc.freeze()  # as the in-process service does: nothing loaded so far is ever garbage
    clf.start(score_batches=False)  # logits to the front-ends, which score them
    server = EngineServer(clf)
    srv = await asyncio.start_unix_server(server.handle, path=path)
    log.info("engine process %d: %s on %s, max batch %d", os.getpid(), clf.engine.name, path, clf.max_batch_size)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    # Front-ends drain first (they answer what they accepted, which needs this process), then close their links.
    srv.close()
    deadline = time.monotonic() + settings.grace_period_s
    while server.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await clf.stop(max(0.0, deadline - time.monotonic()))
    log.info("engine process %d stopped", os.getpid())


def main() -> None:
    """`python -m service.engine_process SOCKET`: started by service/app.py's deployment hook when workers > 1."""
    from service.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(levelname)s] [engine] %(message)s")
    import uvloop

    from service.artifact import ArtifactError
    from service.engines import EngineRefused

    try:
        uvloop.run(serve(sys.argv[1], Settings()))
    except (ArtifactError, EngineRefused) as e:
        # What no restart fixes. The reason goes where the front-ends look while they wait for this process
        # (fetch_facts): they refuse in turn, which stops the whole server and makes `vitserve serve` exit 2.
        log.error("refusing to serve: %s", e)
        if path := os.environ.get("VITSERVE_REFUSAL_FILE"):
            from pathlib import Path

            Path(path).write_text(f"{e}\n")
        sys.exit(2)


# ---- the front-end's side ---------------------------------------------------------------------------------------------------
def fetch_facts(path: str, timeout_s: float, refusal_file: str | None = None) -> dict:
    """Wait (blocking, before the front-end's event loop runs) until the engine process answers; its facts. Raises
    EngineRefused when the engine process refused to serve (its reason is in ``refusal_file``), and gives up when
    the server that started this front-end is gone, so that no front-end waits for an engine that will never come."""
    from pathlib import Path

    from service.engines import EngineRefused

    deadline = time.monotonic() + timeout_s
    parent = os.getppid()
    while True:
        if refusal_file and Path(refusal_file).is_file() and (reason := Path(refusal_file).read_text().strip()):
            raise EngineRefused(reason)
        if os.getppid() != parent:
            raise EngineRefused("the server stopped while this front-end waited for the engine process")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(max(1.0, deadline - time.monotonic()))
                s.connect(path)
                (n,) = LENGTH.unpack(_recv_exactly(s, LENGTH.size))
                return json.loads(_recv_exactly(s, n))
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine process did not answer on {path} within {timeout_s:.0f} s") from None
            time.sleep(0.2)


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError("the engine process closed the connection")
        buf += chunk
    return buf


class RemoteEngine:
    """The engine as a front-end sees it: its facts, from the engine process."""

    def __init__(self, facts: dict):
        self.facts, self.name, self.device = facts, facts["name"], facts["device"]
        self.max_batch_size = facts["max_batch_size"]

    def describe(self) -> dict:
        return {**self.facts["engine"], "process": self.facts["pid"]}


class RemoteSelection:
    """Every engine the engine process tried at startup, as :class:`service.engines.Selection` reports them."""

    class Attempt:
        def __init__(self, summary: dict):
            self._summary = summary

        def summary(self) -> dict:
            return self._summary

    def __init__(self, facts: dict):
        self.attempts = [self.Attempt(s) for s in facts["selection"]]


class RemoteBatcher:
    """The batcher's interface (service/batcher.py) for a front-end process: ``submit`` sends the request's pixels as
    one frame to the engine process and awaits its logits (the rows of ``score`` of them, given one); many requests
    share one connection."""

    def __init__(self, path: str, max_batch_size: int, score=None):
        self.path, self.max_batch_size, self._score = path, max_batch_size, score
        self._pending: dict[int, asyncio.Future] = {}
        self._next_id = 0
        self._writer: asyncio.StreamWriter | None = None
        self._connected: asyncio.Future | None = None
        self._reader_task: asyncio.Task | None = None
        self._closed = False
        self.decoding = 0  # images this front-end is decoding (the batcher's count, for the gauge)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._connected = loop.create_future()
        self._reader_task = loop.create_task(self._read(), name="vitserve-engine-link")

    @property
    def depth(self) -> int:
        return len(self._pending)  # this front-end's images at the engine process (queued or running)

    @property
    def idle(self) -> bool:
        return not self._pending

    def expect(self, images: int) -> None:
        """Counted for the decoding gauge only: in one process the batcher holds a closing batch for images still
        decoding; across processes it cannot."""
        self.decoding += images

    def retry_after_s(self) -> float:
        return 1.0

    def check_engine(self) -> None:
        """The engine's watchdog runs in the engine process: a stalled engine refuses there (EngineStalled comes back
        in the answer frame), so a front-end has nothing to check before reading a body."""

    async def submit(self, pixels: np.ndarray, deadline: float):
        if self._closed:
            raise ShuttingDown("the server is shutting down and accepts no new work")
        await self._connected
        if self._writer is None or self._writer.is_closing():
            raise EngineFailure("the engine process is gone")
        self._next_id += 1
        request_id = self._next_id
        n = len(pixels)
        if pixels.dtype == np.uint8:  # (N, H, W, 3): resized, not yet normalised
            head = REQUEST.pack(request_id, deadline, UINT8_NHWC, n, pixels.shape[1], pixels.shape[2])
        else:
            pixels = np.ascontiguousarray(pixels, "<f4")
            head = REQUEST.pack(request_id, deadline, FLOAT32_NCHW, n, pixels.shape[2], pixels.shape[3])
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        self._writer.write(LENGTH.pack(REQUEST.size + pixels.nbytes) + head)
        self._writer.write(memoryview(np.ascontiguousarray(pixels)).cast("B"))
        try:
            logits, table = await future
        finally:
            self._pending.pop(request_id, None)
        rows = logits if self._score is None else self._score(logits)  # the request's rows at once, on this front-end
        return rows, [BatchStats(float(q), float(i), int(s), int(b)) for q, i, s, b in table]

    async def _read(self) -> None:
        try:
            reader, self._writer = await asyncio.open_unix_connection(self.path, limit=2**20)
            await read_frame(reader)  # the facts, already known from fetch_facts
            self._connected.set_result(None)
            while True:
                payload = await read_frame(reader)
                request_id, status = RESPONSE.unpack_from(payload)
                future = self._pending.get(request_id)
                if future is None or future.done():
                    continue  # its caller gave up
                if status == 0:
                    n, labels = SHAPE.unpack_from(payload, RESPONSE.size)
                    start = RESPONSE.size + SHAPE.size
                    logits = np.frombuffer(payload, "<f4", n * labels, start).reshape(n, labels)
                    future.set_result((logits, np.frombuffer(payload, STATS, n, start + logits.nbytes)))
                else:
                    error = json.loads(payload[RESPONSE.size :])
                    cls = ERRORS.get(error["type"], EngineFailure)
                    future.set_exception(cls(error["message"], retry_after_s=error.get("retry_after_s")))
        except (OSError, asyncio.IncompleteReadError) as e:
            if not self._closed:
                log.error("lost the engine process (%s): failing %d requests", e, len(self._pending))
            if self._connected is not None and not self._connected.done():
                self._connected.set_result(None)
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(EngineFailure("the engine process is gone"))
            if self._writer is not None:
                self._writer.close()

    async def close(self, timeout_s: float | None = None) -> None:
        """Stop admitting work, wait for what is at the engine process, then say goodbye (close the link)."""
        self._closed = True
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._pending and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(0.01)
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()


if __name__ == "__main__":
    main()
