"""The batcher: many concurrent requests' images → batches on one engine → each image's row of the outputs (or of their
scores, computed once per batch) back to its caller.

Protocol-independent on purpose: every front-end (our JSON API, KServe v2 over HTTP and gRPC) reaches it through
:meth:`service.classifier.Classifier.classify` (or ``classify_pixels``), the only caller of :meth:`Batcher.submit`;
batches mix their requests.
One asyncio task forms batches; the engine call runs in one worker thread, so exactly one batch is in flight per
engine, and a full batch waiting behind it is copied into one array meanwhile (*assembled ahead*). Rules:

- bounded queue (in images): a request that does not fit is rejected whole with ``Overloaded`` (429);
- a batch closes when it is full, or when its oldest image has waited ``max_wait_s`` and the engine is free and no
  admitted image is still being decoded (``expect``): those would otherwise miss this batch by a few milliseconds
  and wait a whole batch for the next. The wait for them is bounded by ``DECODE_HOLD_S``;
- an image whose deadline passed while queued fails with ``DeadlineExceeded`` and is never computed; one whose caller
  went away is dropped (a batch assembled ahead that lost one meanwhile goes back to the queue's head, formed again);
- batches are padded up to the next configured bucket for fixed-shape engines; padding rows are discarded;
- results are matched to callers by position in the batch, so completion order never mixes them up;
- an engine call that raises fails only its batch's requests (``EngineFailure``); the next batch runs;
- an engine call that outlives the **watchdog** fails its batch's requests the same way and everything queued behind
  it, and the batcher is *stalled*: new work is refused (``EngineStalled``, 503) until the call returns, since the
  engine runs one call at a time and Python cannot interrupt a thread inside a native call;
- :class:`service.engine_health.EngineHealth` keeps what readiness and liveness need.

Images come in by ``submit`` (on the loop, decoded) or ``offer`` (from a decode thread, as soon as decoded: no trip
back through the loop, which is woken only when that changes what it does; docs/serving.md "The front door").
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from service.batch_types import BatcherHooks, BatchStats, QueuedImage, assemble, settle_error
from service.engine_health import EngineHealth
from service.errors import DeadlineExceeded, EngineFailure, EngineStalled, Overloaded, ShuttingDown, drain_seconds
from service.thread_pool import LoopThreads


# How long a batch may wait, beyond max_wait, for images still being decoded: a few decodes of a large photo.
DECODE_HOLD_S = 0.05


class Batcher:
    def __init__(self, run_batch: Callable[[np.ndarray], np.ndarray], *, max_batch_size: int, max_wait_s: float,
                 queue_capacity: int, buckets: Sequence[int] = (), hooks: BatcherHooks | None = None,
                 watchdog_s: float | None = None, health: EngineHealth | None = None,
                 on_stall: Callable[[], None] | None = None, score: Callable[[np.ndarray], Sequence] | None = None):
        if max_batch_size < 1 or queue_capacity < 1:
            raise ValueError("max_batch_size and queue_capacity must be at least 1")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue_capacity = queue_capacity
        self.buckets = tuple(sorted(b for b in buckets if b <= max_batch_size))
        if self.buckets and self.buckets[-1] < max_batch_size:
            self.buckets += (max_batch_size,)
        self.hooks = hooks or BatcherHooks()
        self.watchdog_s = watchdog_s  # None: an engine call may take as long as it takes
        self.health = health or EngineHealth()
        self._on_stall = on_stall  # e.g. the CPU gate lets decodes go on without the hung batch
        self._score = score  # callers get rows of score(a batch's outputs), e.g. service/topk.py score_batch; else its rows
        self._pending: collections.deque[QueuedImage] = collections.deque()  # appended from decode threads too (offer):
        self._offers = threading.Lock()  # the counts, the checks before appending and a stall's clearing take this
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future | None = None  # the assembling loop's sleep, while it sleeps (see _poke)
        self._busy = False
        self._holding = False  # the loop sleeps holding a due batch for decodes still running
        self._closed = False
        self._task: asyncio.Task | None = None
        # One thread: the engine sees one batch at a time (engines are not re-entrant; on a GPU a second batch competes)
        self._executor = LoopThreads("vitserve-engine", 1)
        self._assembler = LoopThreads("vitserve-assemble", 1)  # copies the next full batch while the engine runs
        self._ahead: tuple[list[QueuedImage], int, asyncio.Future] | None = None  # (items, padded size, the array to come)
        self._batch_seconds_ewma: float | None = None
        self._batches_run = 0
        self.decoding = 0  # images admitted upstream and still decoding: the one count (the hold below, the gauge)

    # ---- public interface -------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._event_loop = asyncio.get_running_loop()
            self._task = self._event_loop.create_task(self._loop(), name="vitserve-batcher")

    @property
    def depth(self) -> int:
        """Images waiting for the engine, a batch assembled ahead included."""
        ahead = self._ahead  # read once: decode threads ask too (offer), while the loop may clear it
        return len(self._pending) + (len(ahead[0]) if ahead is not None else 0)

    @property
    def idle(self) -> bool:
        return not self._pending and not self._busy and self._ahead is None and self.decoding <= 0

    def expect(self, images: int) -> None:
        """Upstream is decoding ``images`` more (negative: they arrived or failed). Called on the loop's thread."""
        with self._offers:
            self.decoding += images
        if images < 0 and self._pending and self._wakes(was_empty=False):
            self._poke()  # a batch held for these decodes may close now

    def check_engine(self) -> None:
        """Refuse new work while the engine is stalled (raises ``EngineStalled``)."""
        if (refusal := self._refusal(0, queue=False)) is not None:
            raise refusal

    def retry_after_s(self) -> float:
        """Until the queue and the batch in the engine have cleared, at the measured batch rate."""
        return drain_seconds(len(self._pending) + self.max_batch_size, self.max_batch_size / (self._batch_seconds_ewma or 0.1))

    def _refusal(self, n: int, queue: bool = True) -> Exception | None:
        if self._closed and queue:
            return ShuttingDown("the server is shutting down and accepts no new work")
        if self.health.stalled:
            return EngineStalled(f"the engine has not returned from a call for {time.monotonic() - self.health.stalled_since:.0f} "
                                 f"s (watchdog {self.watchdog_s:.1f} s); retry on another replica", retry_after_s=self.watchdog_s)
        if queue and self.depth + n > self.queue_capacity:
            return Overloaded(f"queue full ({self.depth}/{self.queue_capacity} images waiting); retry later",
                              retry_after_s=self.retry_after_s())
        return None

    def _wakes(self, was_empty: bool) -> bool:
        """Whether the loop must act on what just arrived (else its timer, or the running batch's end, is the next moment
        anything changes for it): a full batch, the first image for an idle engine, the last decode a sleep held for."""
        if len(self._pending) >= self.max_batch_size and self._ahead is None:
            return True
        return not self._busy and (was_empty or (self._holding and self.decoding <= 0))

    async def submit(self, pixels: np.ndarray, deadline: float) -> tuple[np.ndarray | list, list[BatchStats]]:
        """(N, 3, H, W) → (their rows, per-image stats), as ``results``. All N images are admitted or none is."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        items = [QueuedImage(pixels[i], deadline, now, loop.create_future()) for i in range(len(pixels))]
        with self._offers:  # checked and queued at once: decode threads append too
            if (refusal := self._refusal(len(pixels))) is not None:
                raise refusal
            was_empty = not self._pending
            self._pending.extend(items)
        self.hooks.queue_depth(self.depth)
        if self._wakes(was_empty):
            self._poke()
        return await self.results(items)

    def placeholder(self, deadline: float) -> QueuedImage:
        """On the loop: an image still to be decoded, counted as decoding; a decode thread ``offer``s it (or
        ``withdraw``s it), and ``results`` awaits it."""
        self.expect(1)
        return QueuedImage(None, deadline, 0.0, asyncio.get_running_loop().create_future())

    def offer(self, item: QueuedImage, pixels: np.ndarray) -> None:
        """From a decode thread: the placeholder's pixels join the queue now. A refusal (full, stalled, shutting down)
        reaches its caller on the loop. The queue-depth gauge is written as batches form, on the loop."""
        item.pixels, item.decoded_at = pixels, time.perf_counter()
        with self._offers:
            self.decoding -= 1
            refusal = self._refusal(1)
            if refusal is None:
                was_empty = not self._pending
                item.enqueued = time.monotonic()
                self._pending.append(item)
        if refusal is not None:
            self.fail_from_thread(item, refusal)
        elif self._wakes(was_empty):
            self._from_thread(self._poke)

    def withdraw(self, item: QueuedImage, error: BaseException | None) -> None:
        """From a decode thread: the placeholder will not come (its decode failed with ``error``, or its caller left)."""
        with self._offers:
            self.decoding -= 1
        if error is not None:
            self.fail_from_thread(item, error)
        if self._wakes(was_empty=False):
            self._from_thread(self._poke)

    def fail_from_thread(self, item: QueuedImage, error: BaseException) -> None:
        self._from_thread(settle_error, item.future, error)

    def _from_thread(self, fn: Callable, *args) -> None:
        try:
            self._event_loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more

    async def results(self, items: list[QueuedImage]) -> tuple[np.ndarray | list, list[BatchStats]]:
        """The items' ((N, L) outputs, or a list of their ``score`` rows; per-image stats); a caller that leaves drops the rest."""
        n = len(items)
        try:
            results = [await items[0].future] if n == 1 else await asyncio.gather(*(it.future for it in items))
        except BaseException:
            for it in items:  # the caller gave up (or one image failed): don't compute the rest
                if not it.future.done():
                    it.future.cancel()
            raise
        if self._score is not None:
            return [r[0] for r in results], [r[1] for r in results]
        logits = results[0][0][None] if n == 1 else np.stack([r[0] for r in results])
        return logits, [r[1] for r in results]

    async def close(self, timeout_s: float | None = None) -> None:
        """Stop admitting work, answer everything already admitted, then stop the loop."""
        self._closed = True
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.idle and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        with self._offers:  # out of time: what is still queued is answered all the same
            left = list(self._pending) + (self._ahead[0] if self._ahead is not None else [])
            self._pending.clear()
            self._ahead = None
        self._fail(left, ShuttingDown("the server shut down before this image was computed"))
        self._executor.shutdown()
        self._assembler.shutdown()

    # ---- the loop ------------------------------------------------------------------------------------
    # The loop sleeps until something it acts on changes (``_wakes``) or its timer fires. Waking it for every image
    # (each submit and each decode) cost the event loop a wake-up and a wait_for task per image, measured.
    def _poke(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, self._poke)  # cancelled below: it pokes this waiter
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def _loop(self) -> None:
        while True:
            if self._busy:
                if self._ahead is None and len(self._pending) >= self.max_batch_size:
                    self._assemble_ahead()
                await self._wait(None)  # the running batch's end, or a submit that fills a batch, wakes it
                continue
            if self._ahead is not None:
                self._start_ahead()
                continue
            if not self._pending:
                await self._wait(None)
                continue
            # The engine is free: a batch closes when it is full, or once its oldest image has waited max_wait_s
            # (and the decodes it holds for have arrived, up to DECODE_HOLD_S more).
            oldest = self._pending[0].enqueued
            full = len(self._pending) >= self.max_batch_size
            waited = time.monotonic() - oldest
            due = waited >= self.max_wait_s and (self.decoding <= 0 or waited >= self.max_wait_s + DECODE_HOLD_S)
            if not (full or due):
                self._holding = self.decoding > 0  # then the last of those decodes wakes it (_wakes)
                await self._wait(max(0.0, oldest + self.max_wait_s + (DECODE_HOLD_S if self._holding else 0.0) - time.monotonic()))
                self._holding = False
                continue
            batch = self._take()
            if batch:
                self._busy = True
                asyncio.get_running_loop().create_task(self._run(batch, self._bucket(len(batch))))

    def _assemble_ahead(self) -> None:
        batch = self._take()
        if batch:
            padded = self._bucket(len(batch))
            self._ahead = (batch, padded, self._assembler.run(assemble, [it.pixels for it in batch], padded))
            self.hooks.queue_depth(self.depth)  # still waiting for the engine: queued, as far as scaling is concerned

    def _start_ahead(self) -> bool:
        """The engine is free: start the batch assembled ahead (at once when its copy is done, as it normally is), unless
        an image of it was cancelled or timed out meanwhile: then it goes back to the head of the queue (rare)."""
        batch, padded, assembled = self._ahead
        self._ahead = None
        now = time.monotonic()
        started = all(not it.future.done() and now <= it.deadline for it in batch)
        if started:
            self._busy = True
            ready = assembled.done() and not assembled.cancelled() and assembled.exception() is None
            call = self._executor.run(self._run_batch, assembled.result()) if ready else None  # before callers are answered
            asyncio.get_running_loop().create_task(self._run(batch, padded, call=call, assembled=None if ready else assembled))
        else:
            self._pending.extendleft(reversed(batch))
            assembled.cancel()
        self.hooks.queue_depth(self.depth)
        return started

    def _take(self) -> list[QueuedImage]:
        now = time.monotonic()
        batch: list[QueuedImage] = []
        expired = 0
        while self._pending and len(batch) < self.max_batch_size:
            item = self._pending.popleft()
            if item.future.done():  # caller cancelled
                continue
            if now > item.deadline:
                expired += 1
                item.future.set_exception(DeadlineExceeded("request deadline passed while queued; not computed"))
                continue
            batch.append(item)
        if expired:
            self.hooks.expired(expired)
        self.hooks.queue_depth(self.depth)
        return batch

    def _bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        return n

    async def _run(self, batch: list[QueuedImage], padded: int, *, call: asyncio.Future | None = None,
                   assembled: asyncio.Future | None = None) -> None:
        """One batch through the engine: ``call`` started already, or its ``assembled`` array to come, or neither."""
        started = time.monotonic()
        n = len(batch)
        self._batches_run += 1
        batch_id = self._batches_run
        self.hooks.running(n)
        for item in batch:  # until its batch started: a batch assembled ahead waited too, and one formed again once
            self.hooks.queue_wait(started - item.enqueued)
        handed_over = False
        try:
            if call is None and assembled is not None:  # copied ahead, but not done when the engine was free (rare)
                call = self._executor.run(self._run_batch, await assembled)
            elif call is None:  # copied on the engine's thread, then run
                rows = [it.pixels for it in batch]
                call = self._executor.run(lambda: self._run_batch(assemble(rows, padded)))
            done, _ = await asyncio.wait({call}, timeout=self.watchdog_s)
            if not done:
                await self._stall(batch, call)
                return
            logits = call.result()
            elapsed = time.monotonic() - started
            # The engine is free: a batch assembled ahead starts before this one's callers are answered (their wake-ups)
            self._busy = False
            handed_over = self._ahead is not None and self._start_ahead()
            self.hooks.batch(n, padded, elapsed)
            self._batch_seconds_ewma = elapsed if self._batch_seconds_ewma is None else 0.8 * self._batch_seconds_ewma + 0.2 * elapsed
            self.health.failures_in_a_row = 0
            rows = logits if self._score is None else self._score(logits[:n])  # while the next batch runs: GIL released
            for i, item in enumerate(batch):
                if not item.future.done():
                    stats = BatchStats(queue_wait_s=started - item.enqueued, inference_s=elapsed, batch_size=n, batch_id=batch_id)
                    item.future.set_result((rows[i], stats))
        except Exception as e:  # noqa: BLE001 - an engine failure fails this batch's requests, not the loop
            self.health.failures_in_a_row += 1
            self.hooks.engine_failed("raised")
            self._fail(batch, EngineFailure(f"inference failed: {type(e).__name__}"))
        finally:
            if not handed_over:  # else the next batch's run owns the engine's state now
                self.hooks.running(0)
                self._busy = False
            self._poke()

    async def _stall(self, batch: list[QueuedImage], call: asyncio.Future) -> None:
        """The watchdog fired: fail this batch and everything queued, refuse new work until ``call`` returns (its
        result is dropped), then serve again. ``_busy`` stays set meanwhile: the engine takes one call at a time."""
        self.health.failures_in_a_row += 1
        self.health.stalled_since = time.monotonic()
        self.hooks.engine_failed("watchdog")
        self.hooks.engine_stalled(True)
        if self._on_stall is not None:
            self._on_stall()
        self._fail(batch, EngineFailure(f"inference did not return within the engine watchdog's {self.watchdog_s:.1f} s"))
        with self._offers:  # decode threads check the stall under this lock: nothing lands between the copy and clear
            queued = list(self._pending)
            self._pending.clear()
        if self._ahead is not None:  # assembled ahead, never started: it fails with the queue
            queued = self._ahead[0] + queued
            self._ahead[2].cancel()
            self._ahead = None
        self.hooks.queue_depth(0)
        self._fail(queued, EngineFailure("the engine stalled on an earlier batch; not computed"))
        try:
            await asyncio.wait({call})
            if not call.cancelled():
                call.exception()  # retrieved: a late failure of an abandoned call is already counted
        finally:
            self.health.stalled_since = None
            self.hooks.engine_stalled(False)

    @staticmethod
    def _fail(items: list[QueuedImage], error: Exception) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(error)

