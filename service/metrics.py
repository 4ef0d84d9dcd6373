"""Prometheus metrics for every stage, beside BentoML's own.

Plain prometheus_client: BentoML sets PROMETHEUS_MULTIPROC_DIR in its workers and its /metrics merges
every process's files, so these are correct in multiprocess mode. Gauges say how they merge across
processes (livesum: dead workers drop out). Buckets span 0.5 ms (GPU batches) to 30 s (a saturated CPU).
"""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram

from service.batcher import BatcherHooks
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
    "vitserve_postprocess_duration_seconds", "Softmax + top-k + response building per request", buckets=LATENCY_BUCKETS
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
    labelled(REQUEST_SECONDS, protocol, status).observe(seconds)
    labelled(REQUESTS, protocol, status).inc()
    if error is not None:
        reason = error.type if isinstance(error, ServiceError) else ("client_closed" if status == CLIENT_CLOSED else "internal")
        labelled(REJECTIONS, protocol, reason).inc()


class PrometheusBatcherHooks(BatcherHooks):
    def __init__(self, engine_name: str):
        self._engine = engine_name
        self._inference = INFERENCE_SECONDS.labels(engine=engine_name)
        self._batch = BATCH_SIZE.labels(engine=engine_name)
        self._padding = PADDING.labels(engine=engine_name)

    def queue_depth(self, depth: int) -> None:
        QUEUE_DEPTH.set(depth)
        labelled(WORK_IN_FLIGHT, "queued").set(depth)

    def running(self, images: int) -> None:
        labelled(WORK_IN_FLIGHT, "inference").set(images)

    def queue_wait(self, seconds: float) -> None:
        QUEUE_WAIT_SECONDS.observe(seconds)

    def batch(self, size: int, padded_to: int, seconds: float) -> None:
        self._batch.observe(size)
        self._inference.observe(seconds)
        if padded_to > size:
            self._padding.inc(padded_to - size)

    def expired(self, count: int) -> None:
        EXPIRED.inc(count)

    def engine_failed(self, kind: str) -> None:
        labelled(ENGINE_FAILURES, self._engine, kind).inc()

    def engine_stalled(self, stalled: bool) -> None:
        ENGINE_STALLED.set(1 if stalled else 0)
