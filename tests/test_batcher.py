"""The batcher's hooks reach Prometheus: padding rows and deadline expiries are counted, not only logged."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service import metrics
from service.batcher import Batcher
from service.errors import DeadlineExceeded


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_padding_and_expiries_are_counted():
    engine = "test-batcher-hooks"  # a label of its own, so other tests' batches don't count
    seen: list[int] = []

    def run(x: np.ndarray) -> np.ndarray:
        seen.append(len(x))
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
    assert counter("vitserve_batch_padding_images_total", engine=engine) - padding0 == 1
    assert counter("vitserve_deadline_expired_images_total") - expired0 == 2
