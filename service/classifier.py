"""The protocol-independent request flow:

    image bytes → decode + preprocess (thread pool) → batcher → engine → softmax (manifest temperature) → top-k

Front-ends (HTTP now, gRPC next) call :meth:`Classifier.classify` and render its result or its
``ServiceError``; they never touch the engine or the batcher directly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service import metrics
from service.artifact import load_artifact
from service.batcher import Batcher
from service.engines import select_engine
from service.errors import EmptyRequest, InvalidParameter, NotReady, ServiceError, ShuttingDown, TooManyImages
from service.preprocess import Preprocessor
from service.settings import Settings
from service.topk import predictions

log = logging.getLogger("vitserve.service")


@dataclass
class Classification:
    predictions: list[dict]
    timings_ms: dict[str, float]
    batch_size: int


class Classifier:
    """Loads and warms the engine at construction (slow, synchronous); serves from an event loop after start()."""

    def __init__(self, settings: Settings):
        self.settings = settings
        t0 = time.perf_counter()
        self.artifact = load_artifact(settings.artifact, verify=False)  # engine files are verified as loaded
        self.manifest = self.artifact.manifest
        # Checksum, load, and re-check the golden set on this machine (auto skips an engine that fails it).
        self.selection = select_engine(
            self.artifact, settings.engine, intra_op_threads=settings.intra_op_threads, check=settings.startup_check
        )
        self.engine = self.selection.engine
        metrics.record_engine_selection(self.selection.attempts)
        self.preprocessor = Preprocessor(self.manifest.preprocessing)
        self.max_batch_size = min(settings.max_batch_size, self.engine.max_batch_size)
        buckets = settings.batch_buckets or list(self.engine.batch_buckets)
        self.warmup_sizes = sorted({b for b in buckets if b <= self.max_batch_size} | {1, self.max_batch_size})
        self.engine.warmup(self.warmup_sizes)  # every bucket once, before readiness
        self.buckets = buckets
        threads = settings.decode_threads or min(4, os.cpu_count() or 1)
        self._decode_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vitserve-decode")
        self.batcher: Batcher | None = None
        self.draining = False
        self.in_flight = 0  # requests between check and answer: the drain waits for this to reach 0
        self.last_request_at = time.monotonic()  # the drain also waits for clients to stop arriving
        d = self.engine.describe()
        metrics.ENGINE_INFO.labels(
            engine=self.engine.name, device=d.get("device", "?"), precision=d.get("precision", "?"),
            model=self.manifest.model.name, version=self.manifest.model.version,
        ).set(1)
        log.info(
            "ready to start: model %s v%s, engine %s, max batch %d, warmed %s in %.1fs",
            self.manifest.model.name, self.manifest.model.version, self.engine.name, self.max_batch_size,
            self.warmup_sizes, time.perf_counter() - t0,
        )

    def start(self) -> None:
        """Start the batcher on the running event loop; the service is ready after this."""
        self.batcher = Batcher(
            self.engine.run,
            max_batch_size=self.max_batch_size,
            max_wait_s=self.settings.max_wait_ms / 1000,
            queue_capacity=self.settings.queue_capacity,
            buckets=self.buckets,
            hooks=metrics.PrometheusBatcherHooks(self.engine.name),
        )
        self.batcher.start()
        metrics.READY.set(1)

    @property
    def ready(self) -> bool:
        return self.batcher is not None and not self.draining

    def begin_drain(self) -> None:
        """SIGTERM: refuse new work (readiness turns false) but keep answering what was accepted."""
        self.draining = True
        metrics.READY.set(0)

    def drained(self, quiet_s: float) -> bool:
        """Nothing queued or in flight, and no client has arrived for ``quiet_s``."""
        idle = self.batcher is None or self.batcher.idle
        return idle and self.in_flight == 0 and time.monotonic() - self.last_request_at >= quiet_s

    async def stop(self, timeout_s: float) -> None:
        self.begin_drain()
        if self.batcher is not None:
            await self.batcher.close(timeout_s)
        self._decode_pool.shutdown(wait=False)

    def _decode(self, data: bytes, index: int) -> tuple[np.ndarray, float]:
        t = time.perf_counter()
        x = self.preprocessor.from_bytes(data, max_pixels=self.settings.max_image_pixels, index=index)
        return x, time.perf_counter() - t

    def check_request(self, count: int, top_k: int | None) -> int:
        """Validate what can be validated before reading image bytes; returns the effective top_k."""
        self.last_request_at = time.monotonic()
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        if self.batcher is None:
            raise NotReady("the model is still loading")
        if count == 0:
            raise EmptyRequest("no images in the request (multipart field 'images', or JSON key 'images')")
        if count > self.settings.max_images_per_request:
            raise TooManyImages(f"{count} images in one request; the limit is {self.settings.max_images_per_request}")
        k = self.settings.default_top_k if top_k is None else top_k
        if not 1 <= k <= len(self.manifest.labels):
            raise InvalidParameter(f"top_k must be between 1 and {len(self.manifest.labels)} (the number of labels), got {k}")
        return k

    async def classify(self, images: list[bytes], top_k: int | None = None, protocol: str = "http") -> Classification:
        k = self.check_request(len(images), top_k)
        self.in_flight += 1
        try:
            return await self._classify(images, k, protocol)
        finally:
            self.in_flight -= 1

    async def _classify(self, images: list[bytes], k: int, protocol: str) -> Classification:
        assert self.batcher is not None
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.settings.request_timeout_s
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(
            *(loop.run_in_executor(self._decode_pool, self._decode, b, i) for i, b in enumerate(images)),
            return_exceptions=True,
        )
        for d in decoded:  # report the lowest-index bad image; the others' work is simply dropped
            if isinstance(d, BaseException):
                raise d
        for _, secs in decoded:
            metrics.DECODE_SECONDS.observe(secs)
        t_decoded = time.perf_counter()
        pixels = np.stack([x for x, _ in decoded])  # (N, 3, H, W)
        logits, stats = await self.batcher.submit(pixels, deadline)
        t_inferred = time.perf_counter()
        preds = predictions(logits, self.manifest.labels, temperature=self.manifest.temperature, k=k)
        t_done = time.perf_counter()
        metrics.POSTPROCESS_SECONDS.observe(t_done - t_inferred)
        metrics.IMAGES.labels(protocol=protocol).inc(len(images))
        return Classification(
            predictions=preds,
            timings_ms={
                "decode": (t_decoded - t0) * 1000,
                "queue": max(s.queue_wait_s for s in stats) * 1000,
                "inference": max(s.inference_s for s in stats) * 1000,
                "postprocess": (t_done - t_inferred) * 1000,
            },
            batch_size=max(s.batch_size for s in stats),
        )


def record_outcome(protocol: str, status: int, seconds: float, error: ServiceError | None = None) -> None:
    metrics.REQUEST_SECONDS.labels(protocol=protocol, status=str(status)).observe(seconds)
    metrics.REQUESTS.labels(protocol=protocol, status=str(status)).inc()
    if error is not None:
        metrics.REJECTIONS.labels(protocol=protocol, reason=error.type).inc()
