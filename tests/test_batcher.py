"""The batcher's hooks reach Prometheus: padding rows and deadline expiries are counted, not only logged."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service import metrics
from service.batch_types import BatcherHooks
from service.batcher import Batcher
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
    from service.engine_health import EngineHealth
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


# ---- images offered by decode threads --------------------------------------------------------------------------------------
def test_images_offered_from_threads_each_get_their_own_result_and_the_decoding_count_returns_to_zero():
    """Many decode threads queue images straight into the batcher (``offer``) while the loop submits others: every image
    is answered with its own row, batches form as usual, a failed decode reaches its caller, and nothing stays counted."""
    import threading

    from service.errors import InvalidImage

    async def scenario():
        sizes: list[int] = []

        def engine(x):
            sizes.append(len(x))
            return identity_rows(x)

        b = Batcher(engine, max_batch_size=8, max_wait_s=0.005, queue_capacity=256)
        b.start()
        items = [b.placeholder(time.monotonic() + 30) for _ in range(60)]
        assert b.decoding == 60

        def decoder(part: list[int]) -> None:
            for i in part:
                time.sleep(0.0005 * (i % 3))
                if i % 20 == 7:
                    b.withdraw(items[i], InvalidImage(f"image {i} is corrupt", index=0))
                else:
                    b.offer(items[i], np.full((3, 2, 2), i, np.float32))

        threads = [threading.Thread(target=decoder, args=(list(range(t, 60, 4)),)) for t in range(4)]
        for t in threads:
            t.start()
        submitted = b.submit(images([1000, 1001]), time.monotonic() + 30)
        answers = await asyncio.gather(*(b.results([it]) for it in items), submitted, return_exceptions=True)
        for t in threads:
            t.join()
        await b.close(1)
        return answers, sizes, b.decoding

    answers, sizes, decoding = asyncio.run(scenario())
    for i, answer in enumerate(answers[:60]):
        if i % 20 == 7:
            assert isinstance(answer, InvalidImage) and f"image {i}" in str(answer)
        else:
            logits, stats = answer
            assert logits[:, 0].tolist() == [float(i)] and stats[0].batch_size >= 1
    assert answers[60][0][:, 0].tolist() == [1000.0, 1001.0]
    assert decoding == 0
    assert sum(sizes) == 57 + 2 and max(sizes) <= 8 and len(sizes) < 59  # batched, never beyond the limit


def test_a_due_batch_holds_for_a_placeholder_and_closes_when_its_decode_thread_offers_it():
    """The hold for images still decoding works for offered images: the batch waits for the placeholder, not max_wait."""
    import threading

    async def scenario():
        seen: list[int] = []
        b = Batcher(lambda x: seen.append(len(x)) or identity_rows(x), max_batch_size=8, max_wait_s=0.002, queue_capacity=16)
        b.start()
        late = b.placeholder(time.monotonic() + 30)
        first = asyncio.ensure_future(b.submit(images([1]), time.monotonic() + 30))
        await asyncio.sleep(0.02)  # 10 × max_wait, within the hold for decodes (DECODE_HOLD_S)
        threading.Thread(target=b.offer, args=(late, np.full((3, 2, 2), 2, np.float32))).start()
        a, c = await asyncio.gather(first, b.results([late]))
        await b.close(1)
        return seen, a[0][:, 0].tolist(), c[0][:, 0].tolist()

    assert asyncio.run(scenario()) == ([2], [1.0], [2.0])


def test_offered_images_are_refused_when_the_queue_is_full_or_closed_and_a_closing_batcher_answers_what_is_queued():
    """What ``submit`` refuses, ``offer`` refuses too, to the caller on the loop; a close that runs out of time answers
    the images still queued (ShuttingDown) instead of leaving them unanswered."""
    import threading

    from service.errors import Overloaded, ShuttingDown

    async def scenario():
        gate = threading.Event()
        b = Batcher(lambda x: gate.wait(10) and identity_rows(x), max_batch_size=1, max_wait_s=0.0, queue_capacity=2)
        b.start()
        running = asyncio.ensure_future(b.submit(images([1]), time.monotonic() + 30))  # held in the engine
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(b.submit(images([2, 3]), time.monotonic() + 30))  # the queue is full
        await asyncio.sleep(0.01)
        full = b.placeholder(time.monotonic() + 30)
        threading.Thread(target=b.offer, args=(full, images([4])[0])).start()
        with pytest.raises(Overloaded, match="queue full"):
            await b.results([full])
        await b.close(0.1)  # the engine is still held: out of time
        with pytest.raises(ShuttingDown):
            await queued
        late = b.placeholder(time.monotonic() + 30)
        threading.Thread(target=b.offer, args=(late, images([5])[0])).start()
        with pytest.raises(ShuttingDown):
            await b.results([late])
        gate.set()
        return (await running)[0][:, 0].tolist(), b.decoding

    assert asyncio.run(scenario()) == ([1.0], 0)


def test_the_last_decode_a_sleeping_batch_holds_for_wakes_it_even_before_max_wait(monkeypatch):
    """A batch held for decodes sleeps until max_wait + DECODE_HOLD_S; the offer that ends the last of them wakes it, so
    it closes at max_wait, not at the end of the hold (a lost wake-up once: the offer woke it only after max_wait)."""
    import threading

    from service import batcher as batcher_module

    monkeypatch.setattr(batcher_module, "DECODE_HOLD_S", 1.0)

    async def scenario():
        seen: list[int] = []
        b = Batcher(lambda x: seen.append(len(x)) or identity_rows(x), max_batch_size=8, max_wait_s=0.02, queue_capacity=16)
        b.start()
        first, second = b.placeholder(time.monotonic() + 30), b.placeholder(time.monotonic() + 30)
        t0 = time.monotonic()
        b.offer(first, np.full((3, 2, 2), 1, np.float32))  # the loop wakes, sees one still decoding: holds for it
        await asyncio.sleep(0.005)  # before max_wait
        threading.Thread(target=b.offer, args=(second, np.full((3, 2, 2), 2, np.float32))).start()
        await asyncio.gather(b.results([first]), b.results([second]))
        took = time.monotonic() - t0
        await b.close(1)
        return seen, took

    seen, took = asyncio.run(scenario())
    assert seen == [2] and took < 0.5, (seen, took)
