"""The batcher's hooks reach Prometheus: padding rows and deadline expiries are counted, not only logged."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service import metrics
from service.batcher import Batcher, BatcherHooks
from service.errors import DeadlineExceeded


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_padding_and_expiries_are_counted():
    engine = "test-batcher-hooks"  # a label of its own, so other tests' batches don't count
    seen: list[int] = []
    batches: list[np.ndarray] = []

    def run(x: np.ndarray) -> np.ndarray:
        seen.append(len(x))
        batches.append(x.copy())
        return x.reshape(len(x), -1)[:, :2].copy()

    async def scenario():
        b = Batcher(run, max_batch_size=8, max_wait_s=0.001, queue_capacity=16, buckets=(4, 8),
                    hooks=metrics.PrometheusBatcherHooks(engine))
        b.start()
        pixels = np.arange(3 * 3 * 2 * 2, dtype=np.float32).reshape(3, 3, 2, 2)
        logits, _ = await b.submit(pixels, time.monotonic() + 5)  # 3 images → padded to the bucket of 4
        with pytest.raises(DeadlineExceeded):
            await b.submit(pixels[:2], time.monotonic() - 1)  # already past: expires in the queue, never computed
        return logits

    padding0 = counter("vitserve_batch_padding_images_total", engine=engine)
    expired0 = counter("vitserve_deadline_expired_images_total")
    logits = asyncio.run(scenario())
    assert seen == [4]  # one padded batch; the expired images never reached the engine
    assert logits.shape == (3, 2)  # padding rows discarded
    pixels = np.arange(3 * 3 * 2 * 2, dtype=np.float32).reshape(3, 3, 2, 2)
    np.testing.assert_array_equal(batches[0][:3], pixels)  # the rows, in order, assembled on the engine's thread
    assert not batches[0][3].any()  # the padding row is zeros
    np.testing.assert_array_equal(logits, pixels.reshape(3, -1)[:, :2])  # each image gets its own row back
    assert counter("vitserve_batch_padding_images_total", engine=engine) - padding0 == 1
    assert counter("vitserve_deadline_expired_images_total") - expired0 == 2


# ---- a failing engine fails only its own batch ------------------------------------------------------------------------------
class FaultyEngine:
    """``run`` as an engine: the first value of ``faults`` decides each call ("ok", "raise", or a float: sleep that
    long, then answer). A thread event lets a test end a hang at a moment it chooses."""

    def __init__(self, *faults):
        self.faults = list(faults)
        self.calls = 0
        self.release = __import__("threading").Event()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        fault = self.faults.pop(0) if self.faults else "ok"
        if fault == "raise":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if fault == "hang":
            self.release.wait(30)
        return x.reshape(len(x), -1)[:, :2].copy()


PIXELS = np.ones((1, 3, 2, 2), np.float32)


def test_an_engine_that_raises_fails_only_its_batch_and_the_next_batch_serves():
    from service.errors import EngineFailure

    engine = FaultyEngine("raise")
    failed0 = counter("vitserve_engine_failures_total", engine="test-raise", kind="raised")

    async def scenario():
        b = Batcher(engine, max_batch_size=4, max_wait_s=0.001, queue_capacity=16, hooks=metrics.PrometheusBatcherHooks("test-raise"))
        b.start()
        with pytest.raises(EngineFailure, match="inference failed: RuntimeError"):
            await b.submit(PIXELS, time.monotonic() + 5)
        assert b.health.failures_in_a_row == 1 and b.health.alive
        logits, _ = await b.submit(PIXELS, time.monotonic() + 5)
        assert b.health.failures_in_a_row == 0  # a success resets the count
        return logits

    assert asyncio.run(scenario()).shape == (1, 2)
    assert counter("vitserve_engine_failures_total", engine="test-raise", kind="raised") - failed0 == 1


def test_failures_in_a_row_end_liveness():
    from service.batcher import EngineHealth
    from service.errors import EngineFailure

    async def scenario():
        b = Batcher(FaultyEngine("raise", "raise", "raise"), max_batch_size=4, max_wait_s=0.001, queue_capacity=16,
                    health=EngineHealth(max_failures=3))
        b.start()
        alive = []
        for _ in range(3):
            with pytest.raises(EngineFailure):
                await b.submit(PIXELS, time.monotonic() + 5)
            alive.append(b.health.alive)
        return alive

    assert asyncio.run(scenario()) == [True, True, False]


def test_a_hung_engine_call_trips_the_watchdog_stalls_the_batcher_and_it_recovers():
    from service.errors import EngineFailure, EngineStalled

    engine = FaultyEngine("hang")
    abandoned = []

    async def scenario():
        b = Batcher(engine, max_batch_size=1, max_wait_s=0.001, queue_capacity=16, watchdog_s=0.2,
                    on_stall=lambda: abandoned.append(True))
        b.start()
        hung = asyncio.ensure_future(b.submit(PIXELS, time.monotonic() + 5))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(b.submit(PIXELS, time.monotonic() + 5))  # behind the hung batch
        t0 = time.monotonic()
        with pytest.raises(EngineFailure, match="watchdog"):
            await hung
        fired_after = time.monotonic() - t0
        with pytest.raises(EngineFailure, match="stalled"):
            await queued
        assert b.health.stalled and abandoned == [True]
        with pytest.raises(EngineStalled) as refused:
            await b.submit(PIXELS, time.monotonic() + 5)
        assert refused.value.retry_after_s == 0.2
        engine.release.set()  # the call returns at last
        for _ in range(100):
            if not b.health.stalled:
                break
            await asyncio.sleep(0.01)
        logits, _ = await b.submit(PIXELS, time.monotonic() + 5)
        return fired_after, logits

    fired_after, logits = asyncio.run(scenario())
    assert fired_after < 1.0 and logits.shape == (1, 2)
    assert engine.calls == 2  # the queued request was never computed


# ---- queue limits, cancellation and order ---------------------------------------------------------------------------
def identity_rows(x: np.ndarray) -> np.ndarray:
    """Each image's logits are its own first two values: a result that names the image it came from."""
    return x.reshape(len(x), -1)[:, :2].copy()


def images(values: list[float]) -> np.ndarray:
    return np.stack([np.full((3, 2, 2), v, np.float32) for v in values])


def test_a_full_queue_refuses_the_whole_request_and_admits_none_of_it():
    from service.errors import Overloaded

    async def scenario():
        gate = asyncio.Event()

        def blocked(x):  # the engine holds its first batch until the test says so: the queue fills behind it
            asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(10)
            return identity_rows(x)

        loop = asyncio.get_running_loop()
        b = Batcher(blocked, max_batch_size=2, max_wait_s=0.0, queue_capacity=4)
        b.start()
        first = asyncio.ensure_future(b.submit(images([1, 2]), time.monotonic() + 30))  # taken by the engine
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(b.submit(images([3, 4, 5]), time.monotonic() + 30))  # 3 of 4 places
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded, match="queue full"):
            await b.submit(images([6, 7]), time.monotonic() + 30)  # 3 + 2 > 4: all or nothing
        assert b.depth == 3  # nothing of the refused request was queued
        gate.set()
        a, c = await first, await queued
        return a[0][:, 0].tolist(), c[0][:, 0].tolist()

    assert asyncio.run(scenario()) == ([1, 2], [3, 4, 5])


def test_a_cancelled_request_is_never_computed_and_the_others_are():
    async def scenario():
        seen: list[float] = []
        gate = asyncio.Event()
        loop = asyncio.get_running_loop()

        def engine(x):
            asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(10)
            seen.extend(x[:, 0, 0, 0].tolist())
            return identity_rows(x)

        b = Batcher(engine, max_batch_size=2, max_wait_s=0.0, queue_capacity=16)
        b.start()
        busy = asyncio.ensure_future(b.submit(images([1]), time.monotonic() + 30))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(b.submit(images([2, 3]), time.monotonic() + 30))
        kept = asyncio.ensure_future(b.submit(images([4]), time.monotonic() + 30))
        await asyncio.sleep(0.05)
        gone.cancel()  # the client went away while its images were queued
        gate.set()
        await busy
        result = await kept
        with pytest.raises(asyncio.CancelledError):
            await gone
        return seen, result[0][:, 0].tolist()

    seen, kept = asyncio.run(scenario())
    assert seen == [1, 4] and kept == [4]


def test_each_request_gets_its_own_images_results_in_order_whatever_batches_they_share():
    async def scenario():
        sizes: list[int] = []

        def engine(x):
            sizes.append(len(x))
            return identity_rows(x)

        b = Batcher(engine, max_batch_size=4, max_wait_s=0.005, queue_capacity=64)
        b.start()
        requests = [[10 * r + i for i in range(1 + r % 3)] for r in range(12)]  # 1-3 images each, 24 in all
        answers = await asyncio.gather(*(b.submit(images(v), time.monotonic() + 30) for v in requests))
        return requests, [a[0][:, 0].tolist() for a in answers], sizes

    requests, answers, sizes = asyncio.run(scenario())
    assert answers == [[float(v) for v in r] for r in requests]  # every request its own rows, in its own order
    assert sum(sizes) == 24 and max(sizes) <= 4 and len(sizes) < 24  # batched, never beyond the limit


# ---- a full batch behind a running one is assembled ahead ------------------------------------------------------------------
def test_a_full_batch_behind_a_running_one_is_assembled_ahead_and_runs_next_with_its_own_rows():
    async def scenario():
        loop = asyncio.get_running_loop()
        gate = asyncio.Event()
        given: list[list[float]] = []

        def engine(x):
            if not given:  # the first batch holds the engine until the test has looked
                asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(10)
            given.append(x[:, 0, 0, 0].tolist())
            return identity_rows(x)

        b = Batcher(engine, max_batch_size=2, max_wait_s=0.0, queue_capacity=16)
        b.start()
        first = asyncio.ensure_future(b.submit(images([1, 2]), time.monotonic() + 30))
        await asyncio.sleep(0.05)
        behind = [asyncio.ensure_future(b.submit(images([v]), time.monotonic() + 30)) for v in (3, 4, 5)]
        await asyncio.sleep(0.05)
        ahead = b._ahead is not None and [it.pixels[0, 0, 0] for it in b._ahead[0]]
        depth = b.depth  # the batch assembled ahead still counts as waiting
        gate.set()
        answers = [await first] + [await f for f in behind]
        return ahead, depth, given, [a[0][:, 0].tolist() for a in answers], [a[1][0].batch_id for a in answers]

    ahead, depth, given, answers, batch_ids = asyncio.run(scenario())
    assert ahead == [3.0, 4.0] and depth == 3
    assert given == [[1.0, 2.0], [3.0, 4.0], [5.0]]  # the batch assembled ahead ran next, then the rest
    assert answers == [[1.0, 2.0], [3.0], [4.0], [5.0]]  # every caller its own row
    assert batch_ids == [1, 2, 2, 3]


def test_a_batch_assembled_ahead_fails_with_the_queue_when_the_engine_stalls():
    from service.errors import EngineFailure

    engine = FaultyEngine("hang")

    async def scenario():
        b = Batcher(engine, max_batch_size=2, max_wait_s=0.0, queue_capacity=16, watchdog_s=0.2)
        b.start()
        hung = asyncio.ensure_future(b.submit(images([1, 2]), time.monotonic() + 5))
        await asyncio.sleep(0.05)
        ahead = asyncio.ensure_future(b.submit(images([3, 4]), time.monotonic() + 5))
        await asyncio.sleep(0.05)
        assembled = b._ahead is not None
        with pytest.raises(EngineFailure, match="watchdog"):
            await hung
        with pytest.raises(EngineFailure, match="stalled"):
            await ahead
        engine.release.set()
        for _ in range(100):
            if not b.health.stalled:
                break
            await asyncio.sleep(0.01)
        logits, _ = await b.submit(images([5]), time.monotonic() + 5)
        return assembled, logits, b.idle

    assembled, logits, idle = asyncio.run(scenario())
    assert assembled and logits[:, 0].tolist() == [5.0] and idle
    assert engine.calls == 2  # the batch assembled ahead never reached the engine


def test_each_computed_image_has_its_queue_wait_observed_once_even_when_its_batch_is_formed_again():
    class Waits(BatcherHooks):
        def __init__(self):
            self.waits: list[float] = []

        def queue_wait(self, seconds: float) -> None:
            self.waits.append(seconds)

    hooks = Waits()

    async def scenario():
        loop = asyncio.get_running_loop()
        gate = asyncio.Event()
        seen: list[float] = []

        def engine(x):
            if not seen:
                asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(10)
            seen.extend(x[:, 0, 0, 0].tolist())
            return identity_rows(x)

        b = Batcher(engine, max_batch_size=2, max_wait_s=0.0, queue_capacity=16, hooks=hooks)
        b.start()
        first = asyncio.ensure_future(b.submit(images([1]), time.monotonic() + 30))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(b.submit(images([2]), time.monotonic() + 30))
        kept = asyncio.ensure_future(b.submit(images([3]), time.monotonic() + 30))
        await asyncio.sleep(0.05)
        assembled_ahead = b._ahead is not None
        gone.cancel()  # the batch assembled ahead lost an image: it is formed again from what is left
        gate.set()
        await first
        result = await kept
        return assembled_ahead, seen, result[0][:, 0].tolist()

    assembled_ahead, seen, kept = asyncio.run(scenario())
    assert assembled_ahead and seen == [1.0, 3.0] and kept == [3.0]
    assert len(hooks.waits) == 2 and all(w >= 0 for w in hooks.waits)  # images 1 and 3, once each
