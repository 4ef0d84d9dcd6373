"""The protocol-independent request flow:

    image bytes → decode + preprocess (thread pool) → batcher → engine → softmax and ranking, per batch → top-k
    (or already-preprocessed pixels, from KServe v2 clients, straight to the batcher)

Every front-end (our JSON API in http_api.py, KServe v2 over HTTP in v2_http_api.py and over gRPC in grpc_api.py)
calls :meth:`Classifier.classify` or :meth:`Classifier.classify_pixels` and renders the typed result or the
``ServiceError``; none touches the engine or the batcher directly, so they all share batches, limits and metrics.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from service import cpu_budget, hardware, metrics
from service.admission import Admission, Ticket
from service.artifact import SpeedCurve, load_artifact
from service.batch_types import BatchStats, QueuedImage
from service.batcher import Batcher
from service.engine_health import EngineHealth
from service.engines import select_engine, speed_curve
from service.errors import EmptyRequest, InvalidParameter, NotReady, ShuttingDown, TooManyImages
from service.preprocess import Preprocessor
from service.settings import Settings
from service.thread_pool import LoopThreads
from service.topk import Prediction, ScoredRow, score_batch, top_of

log = logging.getLogger("vitserve.service")


@dataclass
class Classification:
    """One request's answer, before any protocol shapes it."""

    probabilities: np.ndarray  # (N, L) float32, softmax at the manifest's temperature
    top: list[list[Prediction]]  # per image, the top_k best, best first
    timings_ms: dict[str, float]
    batch_size: int  # the largest batch any of its images ran in
    batch_ids: list[int]  # the engine batch each image ran in


class Classifier:
    """Loads and warms the engine at construction (slow, synchronous); serves from an event loop after start()."""

    def __init__(self, settings: Settings, engine_socket: str | None = None):
        """In-process (the default): this process loads the engine and runs the batcher. With ``engine_socket``, a
        front-end of several (service/engine_process.py): the engine and its batcher live in the engine process,
        and this one parses, admits and decodes."""
        self.settings = settings
        self.engine_socket = engine_socket
        t0 = time.perf_counter()
        self.artifact = load_artifact(settings.artifact, verify=False)  # engine files are verified as loaded
        self.manifest = self.artifact.manifest
        # Each batch's softmax and ranking at once (service/topk.py), keeping the usual k (a request wanting more re-ranks)
        self._score = functools.partial(score_batch, temperature=self.manifest.temperature,
                                        keep=min(len(self.manifest.labels), max(settings.default_top_k, 5)))
        if engine_socket is not None:
            self._attach(engine_socket)
            return
        # One CPU budget (service/cpu_budget.py): how many cores, the engine's and decode's shares, whether they
        # take turns. Planned for the engine `auto` will most likely pick, re-planned if it picked the other kind.
        self.threads = self._plan(cpu_engine=settings.engine.endswith("-cpu") or (settings.engine == "auto" and not hardware.cuda_available()))
        # Checksum, load, and re-check the golden set on this machine (auto skips an engine that fails it).
        self.selection = select_engine(
            self.artifact, settings.engine, intra_op_threads=self.threads.engine_threads,
            idle_spinning=self.threads.idle_spinning, check=settings.startup_check,
        )  # fmt: skip
        self.engine = self.selection.engine
        if (self.engine.device == "cpu") != bool(self.threads.engine_threads):
            self.threads = self._plan(cpu_engine=self.engine.device == "cpu")
        metrics.record_engine_selection(self.selection.attempts)
        self.gate = cpu_budget.CpuGate(self.threads.gate)
        self.preprocessor = Preprocessor(self.manifest.preprocessing)
        self.gpu_decoder = self._gpu_decoder()
        self.max_batch_size, self.max_batch_reason, self.speed = self._max_batch()
        buckets = settings.batch_buckets or list(self.engine.batch_buckets)
        self.warmup_sizes = sorted({b for b in buckets if b <= self.max_batch_size} | {1, self.max_batch_size})
        self.engine.warmup(self.warmup_sizes)  # every bucket once, before readiness
        self.buckets = buckets
        self._decode_pool = LoopThreads("vitserve-decode", self.threads.decode_threads)
        timing = self._warm_and_time()
        self.admission = Admission(
            **timing, max_batch=self.max_batch_size, request_timeout_s=settings.request_timeout_s,
            max_latency_s=None if settings.max_latency_ms is None else settings.max_latency_ms / 1000,
        )  # fmt: skip
        # A generous multiple of what a full batch took here: a busy CPU slows batches several-fold, a hang is forever.
        self.watchdog_s = settings.engine_watchdog_s or max(10.0, 20 * timing["full_batch_s"])
        self.engine_health = EngineHealth(max_failures=settings.engine_failures_before_restart,
                                          restart_after_s=settings.engine_stalled_restart_s)
        self.batcher: Batcher | None = None
        self.draining = False
        self.in_flight = 0  # requests inside service/request_scope.py: the drain waits for this to reach 0
        self.last_request_at = time.monotonic()  # the drain also waits for clients to stop arriving
        d = self.engine.describe()
        metrics.ENGINE_INFO.labels(
            engine=self.engine.name, device=d.get("device", "?"), precision=d.get("precision", "?"),
            model=self.manifest.model.name, version=self.manifest.model.version,
        ).set(1)
        log.info("ready to start: model %s v%s, engine %s, max batch %d (%s), %s, warmed %s in %.1fs", self.manifest.model.name,
                 self.manifest.model.version, self.engine.name, self.max_batch_size, self.max_batch_reason, self.threads,
                 self.warmup_sizes, time.perf_counter() - t0)

    def _gpu_decoder(self):
        """nvJPEG on the engine's GPU when VITSERVE_GPU_DECODE asks and it can run here (service/gpu_decode.py)."""
        if not self.settings.gpu_decode:
            return None
        from service import gpu_decode

        why_not = gpu_decode.available(self.engine.device)
        if why_not:
            log.warning("VITSERVE_GPU_DECODE: decoding on the CPU instead: %s", why_not)
            return None
        return gpu_decode.GpuDecoder(self.preprocessor, device=self.engine.device)

    def _attach(self, path: str) -> None:
        """A front-end: the engine's facts from the engine process; decoding, admission and the door are ours."""
        from service.engine_process import RemoteEngine, RemoteSelection, fetch_facts

        # The engine process loads, checks and warms the engine meanwhile; if it refuses, so does this front-end.
        facts = fetch_facts(path, timeout_s=900, refusal_file=os.environ.get("VITSERVE_REFUSAL_FILE"))
        self.engine, self.selection = RemoteEngine(facts), RemoteSelection(facts)
        self.gpu_decoder = None  # front-ends decode on the CPU; the GPU is the engine process's
        # No engine here; the front-ends share the cores for decoding (the engine process has them for its engine).
        s = self.settings
        share = max(1, cpu_budget.available_cores() // s.workers)
        self.threads = cpu_budget.plan(cpu_engine=False, cores=s.cpu_cores, decode_threads=s.decode_threads or share, gate=False)
        self.gate = cpu_budget.CpuGate(False)
        self.preprocessor = Preprocessor(self.manifest.preprocessing)
        self.max_batch_size, self.max_batch_reason, self.speed = facts["max_batch_size"], facts["max_batch_reason"], None
        self._decode_pool = LoopThreads("vitserve-decode", self.threads.decode_threads)
        self.admission = Admission(
            **facts["admission"], max_batch=self.max_batch_size, request_timeout_s=self.settings.request_timeout_s,
            max_latency_s=None if self.settings.max_latency_ms is None else self.settings.max_latency_ms / 1000,
        )  # fmt: skip
        # The engine process runs the watchdog and counts failures (its batcher); a front-end's own stays healthy.
        self.watchdog_s, self.engine_health = None, EngineHealth()
        self.batcher = None
        self.draining = False
        self.in_flight = 0
        self.last_request_at = time.monotonic()
        log.info("front-end %d: engine %s in process %d, max batch %d", os.getpid(), self.engine.name, facts["pid"], self.max_batch_size)

    def _plan(self, *, cpu_engine: bool) -> cpu_budget.ThreadPlan:
        s = self.settings
        return cpu_budget.plan(cpu_engine=cpu_engine, cores=s.cpu_cores, decode_threads=s.decode_threads,
                               engine_threads=s.intra_op_threads, gate=s.cpu_gate)

    def _max_batch(self) -> tuple[int, str, SpeedCurve | None]:
        """The batcher's limit: the setting if given; on a CPU engine, the batch it is fastest at on this CPU
        (export's curve when export timed it on this CPU model and instruction set, else a curve measured now, a few
        seconds); on a GPU, 32 (larger batches keep a GPU busier). Never above the engine's own limit."""
        limit = self.engine.max_batch_size
        if self.settings.max_batch_size is not None:
            return min(self.settings.max_batch_size, limit), "VITSERVE_MAX_BATCH_SIZE", None
        if self.engine.device != "cpu":
            return min(32, limit), "GPU engine: 32, the default for a device that batching keeps busy", None
        here = hardware.describe("cpu")
        curve = self.engine.entry.speed
        same_cpu = curve is not None and all(curve.measured_on.get(k) == here.get(k) for k in ("cpu", "isa"))
        if not same_cpu:
            golden = self.artifact.golden_set()
            pixels = self.preprocessor.normalize(golden[0]) if golden is not None else np.zeros((1, 3, *self.input_size), np.float32)
            curve = speed_curve(self.engine, pixels, limit, min_seconds=0.2, max_call_s=1.0)
        where = "export's speed curve, timed on this CPU" if same_cpu else "a speed curve measured at startup on this CPU"
        rates = ", ".join(f"b{b} {r:.1f}" for b, r in curve.images_per_s.items())
        return min(curve.best_batch, limit), f"the engine's fastest batch ({where}: img/s {rates})", curve

    def _warm_and_time(self) -> dict[str, float]:
        """Admission's starting estimates, measured here before readiness: decode one photo-like JPEG and PNG (which
        also warms the codecs' cold paths: a first decode took ~240 ms against 1-5 ms later) and run a batch of one
        and a full batch. Requests answered with nothing ahead of them replace the unloaded estimate at once."""
        import io

        from PIL import Image

        golden = self.artifact.golden_set()
        rng = np.random.default_rng(0)
        picture = golden[0][0] if golden is not None else rng.integers(0, 256, (*self.input_size, 3), dtype=np.uint8)
        picture = Image.fromarray(np.ascontiguousarray(picture)).resize((640, 480))
        decode_s = []
        for fmt in ("JPEG", "PNG", "JPEG", "PNG"):
            buf = io.BytesIO()
            picture.save(buf, format=fmt)
            decode_s.append(self.decode(buf.getvalue(), 0)[1])
        x = np.zeros((self.max_batch_size, 3, *self.input_size), np.float32)
        t = time.perf_counter()
        self.run_batch(x[:1])
        one = time.perf_counter() - t
        t = time.perf_counter()
        self.run_batch(x)
        full = time.perf_counter() - t
        # + 1 ms for the event loop's share (HTTP parsing, softmax, JSON): the first unloaded requests correct it.
        return {"unloaded_s": float(np.mean(decode_s[2:])) + one + 0.001, "full_batch_s": full}

    def start(self, *, score_batches: bool = True) -> None:
        """Start the batcher (or the link to the engine process's) on the running event loop; ready after this. It hands
        back each image's scores, unless not ``score_batches`` (the engine process, whose front-ends score its logits)."""
        if self.engine_socket is not None:
            from service.engine_process import RemoteBatcher

            self.batcher = RemoteBatcher(self.engine_socket, self.max_batch_size, score=self._score)
            self.batcher.start()
            self._loop_watch = asyncio.get_running_loop().create_task(self.admission.watch_loop(), name="vitserve-loop-lag")
            metrics.READY.set(1)
            return
        self.batcher = Batcher(
            self.run_batch,
            max_batch_size=self.max_batch_size,
            max_wait_s=self.settings.max_wait_ms / 1000,
            queue_capacity=self.settings.queue_capacity,
            buckets=self.buckets,
            hooks=metrics.PrometheusBatcherHooks(self.engine.name),
            watchdog_s=self.watchdog_s,
            health=self.engine_health,
            on_stall=self.gate.abandon_engine,
            score=self._score if score_batches else None,
        )
        self.batcher.start()
        self._loop_watch = asyncio.get_running_loop().create_task(self.admission.watch_loop(), name="vitserve-loop-lag")
        metrics.READY.set(1)

    @property
    def ready(self) -> bool:
        return self.batcher is not None and not self.draining and not self.engine_health.stalled

    @property
    def alive(self) -> bool:
        """False once the engine has failed too often in a row or stayed stalled too long: restart this process."""
        return self.engine_health.alive

    @property
    def input_size(self) -> tuple[int, int]:
        return self.preprocessor.input_size

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
            self._loop_watch.cancel()
        self._decode_pool.shutdown()

    def decode(self, data: bytes, index: int = 0) -> tuple[np.ndarray, float]:
        """One image's bytes → (3, H, W) float32 (a front-end: (H, W, 3) uint8) and the seconds it took, taking turns
        with a CPU engine."""
        with self.gate.decode():  # not while a CPU engine batch runs: they would only slow each other down
            t = time.perf_counter()
            if self.engine_socket is not None:  # (H, W, 3) uint8: the engine process normalises whole frames
                x = self.preprocessor.decode_uint8(data, max_pixels=self.settings.max_image_pixels, index=index)
            elif self.gpu_decoder is not None:
                x = self.gpu_decoder(data, max_pixels=self.settings.max_image_pixels, index=index)
            else:
                x = self.preprocessor.from_bytes(data, max_pixels=self.settings.max_image_pixels, index=index)
            return x, time.perf_counter() - t

    def run_batch(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) → (B, L) logits on the engine, taking turns with decoding on a CPU."""
        with self.gate.engine():
            return self.engine.run(pixels)

    def check_accepting(self) -> None:
        """Refuse at once (before reading a body) while loading or draining."""
        self.last_request_at = time.monotonic()
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        if self.batcher is None:
            raise NotReady("the model is still loading")
        self.batcher.check_engine()  # a stalled engine: 503 before the body is read

    def check_request(self, count: int, top_k: int | None, ticket: Ticket | None = None) -> int:
        """Validate what can be validated before reading image bytes; returns the effective top_k. The request's
        admission ticket learns how many images it really has."""
        if ticket is not None:
            self.admission.settle(ticket, count)
        self.check_accepting()
        if count == 0:
            raise EmptyRequest("no images in the request")
        if count > self.settings.max_images_per_request:
            raise TooManyImages(f"{count} images in one request; the limit is {self.settings.max_images_per_request}")
        k = self.settings.default_top_k if top_k is None else top_k
        if not 1 <= k <= len(self.manifest.labels):
            raise InvalidParameter(f"top_k must be between 1 and {len(self.manifest.labels)} (the number of labels), got {k}")
        return k

    async def classify(self, images: list[bytes], top_k: int | None = None, protocol: str = metrics.JSON_API,
                       ticket: Ticket | None = None) -> Classification:
        """Encoded images (JPEG, PNG, ...) → their classification. ``ticket``: the request's admission at the door."""
        k = self.check_request(len(images), top_k, ticket)
        t0 = time.perf_counter()
        if len(images) == 1 and self.engine_socket is None:
            return await self._classify_one(images[0], k, protocol, ticket, t0)
        self._decoding(len(images))  # a batch about to close waits (briefly) for these
        try:
            if len(images) == 1:  # most requests: one thread hop, without gather's task and future around it
                decoded = [await self._decode_pool.run(self.decode, images[0], 0)]
            else:
                decoded = await asyncio.gather(
                    *(self._decode_pool.run(self.decode, b, i) for i, b in enumerate(images)),
                    return_exceptions=True,
                )
        finally:
            self._decoding(-len(images))  # no await between this and submit(): the batch cannot close in between
        for d in decoded:  # report the lowest-index bad image; the others' work is simply dropped
            if isinstance(d, BaseException):
                raise d
        for _, secs in decoded:
            metrics.TALLY.observe(metrics.DECODE_SECONDS, secs)
        # (N, 3, H, W); one image (most requests) as a view, without np.stack's ~2 µs of Python
        pixels = decoded[0][0][None] if len(decoded) == 1 else np.stack([x for x, _ in decoded])
        return await self._infer(pixels, k, protocol, decode_s=time.perf_counter() - t0, ticket=ticket)

    async def _classify_one(self, data: bytes, k: int, protocol: str, ticket: Ticket | None, t0: float) -> Classification:
        """A request of one image (most are): decoded straight into the batcher's queue by a decode thread, without
        coming back through the event loop in between (service/batcher.py ``offer``). A request of several is decoded
        whole first (above), so that its lowest-index bad image is the one named and none of it is computed."""
        item = self.batcher.placeholder(self._deadline(ticket))
        self._decode_pool.post(self._decode_into_queue, data, item)
        try:
            rows, stats = await self.batcher.results([item])
        finally:  # decoded, even if then refused or expired: counted, as for a request of several
            if item.pixels is not None:
                metrics.TALLY.observe(metrics.DECODE_SECONDS, item.decode_s)  # the decode alone, without its wait
            metrics.TALLY.set(metrics.labelled(metrics.WORK_IN_FLIGHT, "decoding"), self.batcher.decoding)
        return self._classification(rows, stats, k, protocol, item.decoded_at - t0)  # the wait for a thread included

    def _decode_into_queue(self, data: bytes, item: QueuedImage) -> None:
        """On a decode thread: decode, then queue the pixels for the engine (or hand the caller its bad image)."""
        if item.future.cancelled():  # the caller left while this waited for a thread
            return self.batcher.withdraw(item, None)
        try:
            pixels, item.decode_s = self.decode(data, 0)
        except BaseException as e:  # noqa: BLE001 - the caller's bad image (or a decoder's failure) is its answer
            return self.batcher.withdraw(item, e)
        try:
            self.batcher.offer(item, pixels)
        except BaseException as e:  # noqa: BLE001 - a bug there must not leave the caller waiting forever
            self.batcher.fail_from_thread(item, e)

    def _deadline(self, ticket: Ticket | None) -> float:
        return ticket.deadline if ticket is not None else time.monotonic() + self.settings.request_timeout_s

    def _decoding(self, images: int) -> None:
        """Images entering (or leaving) the decode pool: counted once, by the batcher, whose closing batch waits for
        them; the gauge shows the same count."""
        self.batcher.expect(images)
        metrics.TALLY.set(metrics.labelled(metrics.WORK_IN_FLIGHT, "decoding"), self.batcher.decoding)

    async def classify_pixels(self, pixels: np.ndarray, top_k: int | None = None, protocol: str = metrics.V2_HTTP,
                              ticket: Ticket | None = None) -> Classification:
        """Already-preprocessed (N, 3, H, W) float32 pixels (a client that preprocesses itself) → their classification."""
        k = self.check_request(len(pixels), top_k, ticket)
        h, w = self.input_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, h, w) or pixels.dtype != np.float32:
            raise InvalidParameter(f"pixels must be float32 [N, 3, {h}, {w}], got {pixels.dtype} {list(pixels.shape)}")
        if not np.isfinite(pixels).all():
            raise InvalidParameter("pixels contain NaN or infinity")
        return await self._infer(np.ascontiguousarray(pixels), k, protocol, decode_s=0.0, ticket=ticket)

    async def _infer(self, pixels: np.ndarray, k: int, protocol: str, *, decode_s: float, ticket: Ticket | None) -> Classification:
        rows, stats = await self.batcher.submit(pixels, self._deadline(ticket))
        return self._classification(rows, stats, k, protocol, decode_s)

    def _classification(self, rows: list[ScoredRow], stats: list[BatchStats], k: int, protocol: str, decode_s: float) -> Classification:
        t_inferred = time.perf_counter()
        top = [top_of(row, self.manifest.labels, k) for row in rows]
        post_s = time.perf_counter() - t_inferred
        metrics.TALLY.observe(metrics.POSTPROCESS_SECONDS, post_s)
        metrics.TALLY.inc(metrics.labelled(metrics.IMAGES, protocol), len(rows))
        return Classification(
            probabilities=rows[0].probabilities32[None] if len(rows) == 1 else np.stack([r.probabilities32 for r in rows]),
            top=top,
            timings_ms=_timings(decode_s, stats, post_s),
            batch_size=max(s.batch_size for s in stats),
            batch_ids=[s.batch_id for s in stats],
        )


def _timings(decode_s: float, stats: list[BatchStats], post_s: float) -> dict[str, float]:
    return {
        "decode": decode_s * 1000,
        "queue": max(s.queue_wait_s for s in stats) * 1000,
        "inference": max(s.inference_s for s in stats) * 1000,
        "postprocess": post_s * 1000,
    }
