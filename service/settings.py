"""Every service setting, typed, from ``VITSERVE_*`` environment variables (docs/serving.md lists them)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.engines import EngineChoice

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the repository, or a Bento's src/ directory
DEMO_ARTIFACT = PROJECT_ROOT / "service" / "demo_artifact"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VITSERVE_", extra="ignore")

    artifact: Path = Field(DEMO_ARTIFACT, description="artifact directory to serve (default: the embedded demo model)")
    engine: EngineChoice = Field("auto", description="engine to run; auto picks the best one for this machine")
    startup_check: bool = Field(
        True, description="re-check the artifact's golden set through the engine on this machine before readiness"
    )
    max_batch_size: int | None = Field(
        None, ge=1,
        description="largest batch the batcher forms (capped by the engine's); unset = the engine's fastest batch on "
        "this CPU (export's speed curve, or one measured at startup), 32 on a GPU",
    )
    max_wait_ms: float = Field(5.0, ge=0, description="how long the oldest queued image may wait for a fuller batch")
    queue_capacity: int = Field(256, ge=1, description="images that may wait in the queue; beyond it requests get 429")
    batch_buckets: list[int] = Field(
        default_factory=list, description="pad batches up to these sizes (fixed-shape engines); empty = no padding"
    )
    request_timeout_s: float = Field(
        10.0, gt=0, description="per-request deadline (a client's X-Vitserve-Timeout-Ms or gRPC deadline may shorten it)"
    )
    max_latency_ms: float | None = Field(
        None, gt=0,
        description="refuse (429) at the door a request predicted to take longer than this to answer; unset = "
        "max(3 × the measured unloaded latency, unloaded + one full batch)",
    )
    header_timeout_s: float = Field(
        20.0, gt=0, description="a request's headers must arrive within this long of its first byte (or of the connection "
        "opening); else 408 and the connection closes (nginx client_header_timeout, Apache mod_reqtimeout header=20)",
    )
    body_grace_s: float = Field(
        10.0, gt=0, description="a request body may take this long, plus one second per body_min_rate bytes received; "
        "else 408 and the connection closes (Apache mod_reqtimeout body=10,MinRate=500)",
    )
    body_min_rate: float = Field(500.0, gt=0, description="bytes/s a body must keep up after body_grace_s (see there)")
    engine_watchdog_s: float | None = Field(
        None, gt=0,
        description="an engine call running longer fails its batch (500 engine_failure) and the replica refuses work "
        "(503 engine_stalled, not ready) until the call returns; default max(10 s, 20 x a full batch's time at startup)",
    )
    engine_failures_before_restart: int = Field(
        3, ge=1, description="failed engine calls in a row (raised or watchdog) after which /livez fails, so the pod restarts"
    )
    engine_stalled_restart_s: float = Field(
        120.0, gt=0, description="an engine call stalled past the watchdog this long makes /livez fail"
    )
    max_images_per_request: int = Field(32, ge=1, description="more images in one request → 413")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="larger request bodies → 413")
    max_image_pixels: int = Field(40_000_000, ge=1, description="larger images (width×height) → 422, before decoding")
    default_top_k: int = Field(5, ge=1, description="predictions per image when the request gives no top_k")
    workers: int = Field(
        1, ge=1, description="front-end processes (HTTP, gRPC, admission, decode); more than 1 adds one engine process "
        "that owns the engine and the batcher, so batches still form in one place",
    )
    cpu_cores: int = Field(0, ge=0, description="cores this worker may use; 0 = its CPU affinity capped by the cgroup quota")
    decode_threads: int = Field(0, ge=0, description="decode/preprocess threads; 0 = the CPU budget's rule (every core)")
    intra_op_threads: int = Field(0, ge=0, description="CPU engine threads; 0 = the CPU budget's rule (every core)")
    gpu_decode: bool = Field(
        False, description="decode JPEGs with nvJPEG and resize/normalise on the engine's GPU (torchvision); off until "
        "the GPU check has measured its parity and speed on your GPU",
    )
    cpu_gate: bool | None = Field(
        None, description="decode and the CPU engine take turns on the cores; unset = on for CPU engines, off for GPU ones"
    )
    grace_period_s: float = Field(30.0, ge=0, description="on SIGTERM, at most this long to answer accepted requests")
    drain_quiet_s: float = Field(
        1.0, ge=0, description="on SIGTERM, stop once no request has arrived for this long (within the grace period)"
    )
    keep_alive_s: int = Field(
        75, ge=1, description="close idle HTTP keep-alive connections after this long; keep it above the idle timeout "
        "of every client and load balancer in front (they must close first, or a request races the close)",
    )
    backlog: int = Field(2048, ge=1, description="the HTTP listen backlog: connections the kernel queues before accept")
    access_log: bool = Field(False, description="BentoML's access log line per request (the vitserve_* metrics count them anyway)")
    tracing: bool = Field(False, description="BentoML's OpenTelemetry middleware (configure its exporter in BentoML's config)")
    host: str = Field("0.0.0.0", description="address `vitserve serve` binds (HTTP and gRPC)")
    port: int = Field(3000, ge=1, le=65535, description="HTTP port: our JSON API, KServe v2 REST, /metrics, probes")
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC port (KServe v2, health, reflection); 8001 as Triton's; 0 = off")
    grpc_tls_cert: Path | None = Field(None, description="PEM certificate for TLS on the gRPC port (with grpc_tls_key)")
    grpc_tls_key: Path | None = Field(None, description="PEM private key for TLS on the gRPC port")
    api_keys: str = Field(
        "", description="API keys every front-end requires: 'k1,k2' or '@file' (one per line); empty = no checks"
    )
    metrics_open: bool | None = Field(None, description="serve /metrics without a key; default: open unless keys are set")

    @property
    def server_shutdown_s(self) -> int:
        """uvicorn's share of the grace period: closing connections after our drain has answered everything."""
        return max(1, int(min(5.0, self.grace_period_s / 2)))

    @property
    def drain_s(self) -> float:
        """Our share: answering queued and in-flight requests. Together the two fit in grace_period_s."""
        return max(0.0, self.grace_period_s - self.server_shutdown_s)

    @property
    def keys(self) -> list[str]:
        from service.auth import load_keys

        return load_keys(self.api_keys)

    @property
    def metrics_public(self) -> bool:
        return self.metrics_open if self.metrics_open is not None else not self.api_keys

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if any(b < 1 for b in self.batch_buckets):
            raise ValueError("batch_buckets must be positive sizes")
        if (self.grpc_tls_cert is None) != (self.grpc_tls_key is None):
            raise ValueError("grpc_tls_cert and grpc_tls_key go together")
        self.keys  # noqa: B018 - an unreadable key file is a startup error, not a per-request one
        # BentoML runs hooks and workers from different directories: a relative artifact path means the
        # current directory if it exists there, else the project (Bento src/) root.
        if not self.artifact.is_absolute():
            here = Path.cwd() / self.artifact
            self.artifact = here if here.exists() else PROJECT_ROOT / self.artifact
        return self
