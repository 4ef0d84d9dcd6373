"""Prometheus metrics for every stage, beside BentoML's own.

Plain prometheus_client: BentoML sets PROMETHEUS_MULTIPROC_DIR in its workers and its /metrics merges
every process's files, so these are correct in multiprocess mode. Gauges say how they merge across
processes (livesum: dead workers drop out). Buckets span 0.5 ms (GPU batches) to 30 s (a saturated CPU).
"""

from __future__ import annotations

import asyncio
import functools
from bisect import bisect_left

from prometheus_client import Counter, Gauge, Histogram

from service.batch_types import BatcherHooks
from service.errors import ServiceError, http_status

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 4.0, 6.0, 10.0, 20.0, 30.0,
)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)

REQUEST_SECONDS = Histogram(
    "vitserve_request_duration_seconds", "End-to-end request time, bytes in to response out",
    ["protocol", "status"], buckets=LATENCY_BUCKETS,
)
DECODE_SECONDS = Histogram(
    "vitserve_decode_duration_seconds", "Decode + preprocess time per image", buckets=LATENCY_BUCKETS
)
QUEUE_WAIT_SECONDS = Histogram(
    "vitserve_queue_wait_duration_seconds", "Time an image waited in the batch queue", buckets=LATENCY_BUCKETS
)
INFERENCE_SECONDS = Histogram(
    "vitserve_batch_inference_duration_seconds", "Engine time per batch (incl. host↔device copies)",
    ["engine"], buckets=LATENCY_BUCKETS,
)
POSTPROCESS_SECONDS = Histogram(
    "vitserve_postprocess_duration_seconds", "Per request: its top-k from its batch's scores (softmax and ranking run once per batch)", buckets=LATENCY_BUCKETS
)
BATCH_SIZE = Histogram("vitserve_batch_size", "Images per engine batch (before padding)", ["engine"], buckets=BATCH_BUCKETS)
# The protocol label's values: our JSON API (POST /classify: multipart, a raw image body, JSON), KServe v2 over HTTP
# (/v2/...), KServe v2 over gRPC.
JSON_API, V2_HTTP, V2_GRPC = "json", "v2-http", "grpc"
REQUESTS = Counter(
    "vitserve_requests", "Classification requests answered, by protocol (json, v2-http, grpc) and the HTTP status their outcome maps to",
    ["protocol", "status"],
)
IMAGES = Counter("vitserve_images", "Images classified", ["protocol"])
# Named for its first use (refusals); it counts every request that did not end in 200, by the error type: refusals
# (overloaded, shutting_down), clients' mistakes, engine failures, and client_closed. The name stays: dashboards use it.
REJECTIONS = Counter(
    "vitserve_rejections", "Requests that did not end in 200, by reason: the error type, or client_closed",
    ["protocol", "reason"],
)
SLOW_CLIENTS = Counter(
    "vitserve_slow_clients", "Requests cut off with 408 for sending too slowly, by what was late: headers or body", ["stage"]
)
ENGINE_FAILURES = Counter(
    "vitserve_engine_failures", "Engine calls that failed their batch: raised, or outlived the watchdog", ["engine", "kind"]
)
ENGINE_STALLED = Gauge(
    "vitserve_engine_stalled", "1 while an engine call outlives the watchdog (the replica refuses work with 503)",
    multiprocess_mode="max",
)
EXPIRED = Counter("vitserve_deadline_expired_images", "Images whose deadline passed while queued (never computed)")
PADDING = Counter("vitserve_batch_padding_images", "Rows of zeros added to reach a batch bucket", ["engine"])
QUEUE_DEPTH = Gauge("vitserve_queue_depth", "Images waiting in the batch queue", multiprocess_mode="livesum")
# The door (service/admission.py): what it decided, what it predicted, how good the predictions were, what it knows.
ADMISSIONS = Counter("vitserve_admissions", "Admission decisions at the door, before a body is read", ["protocol", "decision"])
ADMISSION_PREDICTED_SECONDS = Histogram(
    "vitserve_admission_predicted_seconds", "Predicted time to answer of each admitted request", buckets=LATENCY_BUCKETS
)
ADMISSION_PREDICTION_RATIO = Histogram(
    "vitserve_admission_prediction_ratio", "Actual ÷ predicted time to answer of each admitted request (1 = exact)",
    buckets=(0.25, 0.5, 0.75, 0.9, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0),
)
WORK_IN_FLIGHT = Gauge(
    "vitserve_work_in_flight_images", "Images in the building by stage: reading (estimated), decoding, queued, inference",
    ["stage"], multiprocess_mode="livesum",
)
ADMISSION_THROUGHPUT = Gauge(
    "vitserve_admission_throughput_images_per_second", "The answer rate admission predicts with (measured while busy)",
    multiprocess_mode="livesum",
)
ADMISSION_LIMIT = Gauge(
    "vitserve_admission_limit_images", "Images admitted into the building at most (learned from latency)", multiprocess_mode="livesum"
)
EVENT_LOOP_LAG_SECONDS = Gauge(
    "vitserve_event_loop_lag_seconds", "How late the event loop runs a ready callback (EWMA): the wait before the door",
    multiprocess_mode="max",
)
ADMISSION_BOUND_SECONDS = Gauge(
    "vitserve_admission_latency_bound_seconds", "Predicted time to answer above which requests are refused", multiprocess_mode="max"
)
IN_FLIGHT = Gauge("vitserve_requests_in_flight", "Requests being processed", multiprocess_mode="livesum")
ENGINE_INFO = Gauge(
    "vitserve_engine_info", "The engine serving requests (value 1)",
    ["engine", "device", "precision", "model", "version"], multiprocess_mode="max",
)
READY = Gauge("vitserve_ready", "1 when warmed up and accepting work", multiprocess_mode="max")
STARTUP_CHECK_PASSED = Gauge(
    "vitserve_startup_check_passed",
    "Golden-set check on this machine at startup: 1 passed (served), 0 failed (skipped); per engine tried",
    ["engine"], multiprocess_mode="max",
)
STARTUP_CHECK_LOGIT_DIFF = Gauge(
    "vitserve_startup_check_max_abs_logit_diff", "Max |Δlogit| against the FP32 reference on the golden set at startup",
    ["engine"], multiprocess_mode="max",
)


def record_engine_selection(attempts) -> None:
    """Each engine the startup check ran on, passed or skipped (service.engines.Attempt)."""
    for a in attempts:
        if a.startup_check is not None:
            STARTUP_CHECK_PASSED.labels(engine=a.engine).set(1 if a.startup_check.passed else 0)
            STARTUP_CHECK_LOGIT_DIFF.labels(engine=a.engine).set(a.startup_check.max_abs_logit_diff)


@functools.cache
def labelled(metric, *values: str):
    """``metric.labels(*values)``, looked up once per label set: prometheus_client's ``labels()`` checks its arguments
    and takes a lock (~2.6 µs), and every request and every refusal named a few. Label sets here are small and fixed
    (protocol × status, reason, decision, stage), so the cache stays small."""
    return metric.labels(*values)


class Tally:
    """The hot path's metric updates, summed in plain dicts and written to prometheus_client in bulk.

    Why not write each one: BentoML runs prometheus_client in multiprocess mode, where every ``inc``/``set`` takes a
    lock, asks the pid and writes an mmap (~0.9 µs; an ``observe`` ~2.4 µs), and a request made about twenty of them on
    the event loop: 34 µs of the loop's ~0.34 ms per image (A/B, the demo model, metrics on and off). Here each is a dict
    update, and ``flush`` writes one ``inc`` per counter and per histogram bucket touched, one ``set`` per gauge.

    When it is written: as soon as the loop is free after the service goes idle (``settle``: the last request in flight
    answered, or the batcher's queue empty after a batch), before this process serves /metrics, and otherwise at most
    ``FLUSH_S`` after an update (one loop timer at a time): /metrics is exact once requests are answered and at most
    ``FLUSH_S`` behind under load. Used from the event loop's thread only (every caller is), so the dicts need no lock.
    """

    FLUSH_S = 0.05

    def __init__(self):
        self._deltas: dict = {}  # Counter or Gauge child → amount to add
        self._values: dict = {}  # Gauge child → last value set
        self._observed: dict = {}  # Histogram child → [sum, per-bucket counts, upper bounds]
        self._timer = None  # the one pending FLUSH_S timer
        self._settling = False  # a flush is scheduled for the loop's next turn

    def inc(self, child, amount: float = 1.0) -> None:
        """``child.inc(amount)`` (a Counter, or a Gauge; a negative amount on a Gauge is its ``dec``)."""
        self._deltas[child] = self._deltas.get(child, 0.0) + amount
        if self._timer is None:
            self._arm()

    def set(self, child, value: float) -> None:
        """``child.set(value)`` (a Gauge): the last value set in a flush interval is written."""
        self._values[child] = value
        if self._timer is None:
            self._arm()

    def observe(self, child, value: float) -> None:
        """``child.observe(value)`` (a Histogram)."""
        entry = self._observed.get(child)
        if entry is None:
            bounds = child._upper_bounds
            entry = self._observed[child] = [0.0, [0] * len(bounds), bounds]
        entry[0] += value
        entry[1][bisect_left(entry[2], value)] += 1  # the first bucket with value <= bound, as observe() picks
        if self._timer is None:
            self._arm()

    def settle(self) -> None:
        """The service went idle: write everything on the loop's next turn (once, however many ask this turn)."""
        if not self._settling:
            self._settling = True
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        self._settling = False
        deltas, values, observed = self._deltas, self._values, self._observed
        if not (deltas or values or observed):
            return
        self._deltas, self._values, self._observed = {}, {}, {}
        for child, amount in deltas.items():
            if amount:
                child.inc(amount)
        for child, value in values.items():
            child.set(value)
        for child, (total, counts, _) in observed.items():
            # A histogram is its sum and one counter per bucket (prometheus_client's Histogram.observe writes exactly
            # these two); written here a bucket at a time. tests/test_metrics_tally.py checks the exposition matches.
            child._sum.inc(total)
            for bucket, count in zip(child._buckets, counts):
                if count:
                    bucket.inc(count)

    def _arm(self) -> None:
        try:
            self._timer = asyncio.get_running_loop().call_later(self.FLUSH_S, self._on_timer)
        except RuntimeError:  # no event loop in this thread (a script, a test): write at once
            self.flush()

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()


TALLY = Tally()


# Client went away before an answer (HTTP disconnect, gRPC cancel): nginx's convention, so it never reads as ours.
CLIENT_CLOSED = "499"


def record_outcome(protocol: str, error: BaseException | None, seconds: float) -> None:
    """One answered (or abandoned) request: every protocol and every error path ends here."""
    if error is None:
        status = "200"
    elif isinstance(error, (GeneratorExit, KeyboardInterrupt, ConnectionError)) or type(error).__name__ == "CancelledError":
        status = CLIENT_CLOSED
    else:
        status = str(http_status(error))
    TALLY.observe(labelled(REQUEST_SECONDS, protocol, status), seconds)
    TALLY.inc(labelled(REQUESTS, protocol, status))
    if error is not None:
        reason = error.type if isinstance(error, ServiceError) else ("client_closed" if status == CLIENT_CLOSED else "internal")
        TALLY.inc(labelled(REJECTIONS, protocol, reason))


class PrometheusBatcherHooks(BatcherHooks):
    def __init__(self, engine_name: str):
        self._engine = engine_name
        self._inference = INFERENCE_SECONDS.labels(engine=engine_name)
        self._batch = BATCH_SIZE.labels(engine=engine_name)
        self._padding = PADDING.labels(engine=engine_name)
        self._depth = 0

    def queue_depth(self, depth: int) -> None:
        self._depth = depth
        TALLY.set(QUEUE_DEPTH, depth)
        TALLY.set(labelled(WORK_IN_FLIGHT, "queued"), depth)

    def running(self, images: int) -> None:
        TALLY.set(labelled(WORK_IN_FLIGHT, "inference"), images)
        if images == 0 and self._depth == 0:
            TALLY.settle()  # a batch done and nothing queued (the engine process has no requests of its own to settle on)

    def queue_wait(self, seconds: float) -> None:
        TALLY.observe(QUEUE_WAIT_SECONDS, seconds)

    def batch(self, size: int, padded_to: int, seconds: float) -> None:
        TALLY.observe(self._batch, size)
        TALLY.observe(self._inference, seconds)
        if padded_to > size:
            TALLY.inc(self._padding, padded_to - size)

    def expired(self, count: int) -> None:
        EXPIRED.inc(count)

    def engine_failed(self, kind: str) -> None:
        labelled(ENGINE_FAILURES, self._engine, kind).inc()

    def engine_stalled(self, stalled: bool) -> None:
        ENGINE_STALLED.set(1 if stalled else 0)
