"""Every service setting, typed, from ``VITSERVE_*`` environment variables (docs/serving.md lists them)."""

from __future__ import annotations

import typing
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.engines import EngineChoice

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the repository, or a Bento's src/ directory
DEMO_ARTIFACT = PROJECT_ROOT / "service" / "demo_artifact"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VITSERVE_", extra="ignore")

    # Each description is the one place the setting is explained: `vitserve serve --help` and the table in
    # docs/serving.md are generated from these (python -m service.settings prints the table; a test compares).
    artifact: Path = Field(
        DEMO_ARTIFACT, description="artifact directory to serve (relative paths: the working directory, then the project root)"
    )
    engine: EngineChoice = Field("auto", description="engine to run; `auto` picks the best one for this machine")
    startup_check: bool = Field(
        True, description="re-check the artifact's golden set through the engine on this machine before readiness"
    )
    max_batch_size: int | None = Field(
        None, ge=1,
        description="largest batch the batcher forms (capped by the engine's); unset = the CPU engine's fastest batch on "
        "this CPU (export's speed curve if it was timed on this CPU model and ISA, else one measured at startup; the "
        "largest batch within 5 % of the best rate, so a flat curve picks its largest), 32 on a GPU. `/info` says which "
        "and why",
    )
    workers: int = Field(
        1, ge=1, description="front-end processes (HTTP, gRPC, auth, admission, decode). 1: one process does everything. "
        "More: those front-ends feed one engine process that owns the engine and the one batcher (see *The front door*); "
        "on the 2-core machines here 1 is faster",
    )
    max_wait_ms: float = Field(5.0, ge=0, description="how long the oldest queued image may wait for a fuller batch")
    queue_capacity: int = Field(256, ge=1, description="images that may wait in the queue; beyond it requests get 429")
    batch_buckets: list[int] = Field(
        default_factory=list,
        description="pad batches up to these sizes (fixed-shape engines), e.g. `[1,2,4,8,16,32]`; empty = no padding",
    )
    request_timeout_s: float = Field(
        10.0, gt=0, description="per-request deadline; a client's `X-Vitserve-Timeout-Ms` (or Envoy's "
        "`x-envoy-expected-rq-timeout-ms`, or its gRPC deadline) may shorten it",
    )
    max_latency_ms: float | None = Field(
        None, gt=0,
        description="the latency bound admission holds accepted requests to (see *Overload*); unset = max(3 × the "
        "measured unloaded latency, unloaded + two full batches at the measured rate); the door always admits two full "
        "batches of work",
    )
    keep_alive_s: int = Field(
        75, ge=1, description="idle HTTP keep-alive timeout; keep it above every client's and load balancer's idle "
        "timeout so they close first",
    )
    backlog: int = Field(2048, ge=1, description="the HTTP listen backlog")
    access_log: bool = Field(
        False, description="BentoML's access-log line per request (off: at 2× overload it and BentoML's tracing "
        "middleware took ~20 % of the worker's CPU; the `vitserve_*` metrics count every request anyway)",
    )
    tracing: bool = Field(
        False, description="BentoML's OpenTelemetry middleware (configure its exporter in BentoML's own config)"
    )
    max_images_per_request: int = Field(32, ge=1, description="more images in one request → 413")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="larger request bodies → 413")
    max_image_pixels: int = Field(40_000_000, ge=1, description="larger images (width×height) → 422, before decoding")
    default_top_k: int = Field(5, ge=1, description="predictions per image when the request gives no `top_k`")
    cpu_cores: int = Field(
        0, ge=0, description="cores this worker may use; 0 = its CPU affinity capped by the cgroup quota (never "
        "`os.cpu_count()`)",
    )
    decode_threads: int = Field(0, ge=0, description="decode/preprocess threads; 0 = the CPU budget's rule (every core)")
    intra_op_threads: int = Field(0, ge=0, description="CPU engine threads; 0 = the CPU budget's rule (every core)")
    gpu_decode: bool = Field(
        False, description="decode JPEGs with nvJPEG and resize/normalise on the engine's GPU (`service/gpu_decode.py`; "
        "needs torchvision); Pillow still checks every header, other formats and rotated JPEGs decode on the CPU. Off "
        "until the GPU check has measured it on your GPU (it has not run on one yet)",
    )
    cpu_gate: bool | None = Field(
        None, description="decode and the CPU engine take turns on the cores; unset = on for CPU engines, off for GPU ones"
    )
    header_timeout_s: float = Field(
        20.0, gt=0, description="a request's headers must arrive within this long of its first byte (or of the "
        "connection opening), else 408 and the connection closes (nginx `client_header_timeout`, Apache "
        "`mod_reqtimeout header=20`)",
    )
    body_grace_s: float = Field(
        10.0, gt=0, description="a request body may take this long plus one second per `VITSERVE_BODY_MIN_RATE` bytes "
        "received, else 408 and the connection closes (Apache `mod_reqtimeout body=10,MinRate=500`)",
    )
    body_min_rate: float = Field(500.0, gt=0, description="bytes/s a body must keep up after the grace")
    engine_watchdog_s: float | None = Field(
        None, gt=0,
        description="an engine call running longer fails its batch (500 `engine_failure`) and the replica refuses work "
        "(503 `engine_stalled`, not ready) until the call returns; unset = max(10 s, 20 × a full batch's time at startup)",
    )
    engine_failures_before_restart: int = Field(
        3, ge=1, description="failed engine calls in a row (raised or watchdog) after which `/livez` fails, so the pod "
        "restarts",
    )
    engine_stalled_restart_s: float = Field(
        120.0, gt=0, description="an engine call stalled past the watchdog this long makes `/livez` fail"
    )
    grace_period_s: float = Field(30.0, ge=0, description="on SIGTERM, at most this long to answer accepted requests")
    drain_quiet_s: float = Field(
        1.0, ge=0, description="on SIGTERM, stop once no request has arrived for this long (within the grace period)"
    )
    host: str = Field("0.0.0.0", description="address `vitserve serve` binds (HTTP and gRPC)")
    port: int = Field(
        3000, ge=0, le=65535, description="HTTP port: our JSON API, KServe v2 REST, `/metrics`, probes; `0` = any free port"
    )
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="gRPC port (KServe v2, `grpc.health.v1`, reflection), Triton's default; `0` = "
        "no gRPC. Several workers share it (SO_REUSEPORT)",
    )
    grpc_transport: typing.Literal["auto", "native", "python"] = Field(
        "auto", description="who terminates gRPC: `native` = the C++ front `make native` builds (`vitserve-grpc-front`, "
        "~0.1 ms of CPU a call), `python` = grpc.aio in the worker (~0.3 ms), `auto` = native when it is built",
    )
    grpc_tls_cert: Path | None = Field(None, description="PEM certificate: TLS on the gRPC port (with the key)")
    grpc_tls_key: Path | None = Field(None, description="PEM private key for the gRPC port's TLS")
    api_keys: str = Field(
        "", description="API keys every front-end requires: `k1,k2` or `@/path/file` (one per line, `#` comments); "
        "empty = no checks",
    )
    metrics_open: bool | None = Field(None, description="serve `/metrics` without a key; unset = open unless keys are set")

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


def default_shown(name: str) -> str:
    """A setting's default as the docs show it (the demo artifact relative to the project)."""
    field = Settings.model_fields[name]
    value = field.default_factory() if field.default_factory else field.default
    if isinstance(value, Path) and value.is_relative_to(PROJECT_ROOT):
        value = value.relative_to(PROJECT_ROOT).as_posix()
    return f"`{value}`"


def markdown_table() -> str:
    """docs/serving.md's configuration table, from the fields above (tests/test_readme.py keeps the docs equal)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        meaning = field.description
        if typing.get_origin(field.annotation) is typing.Literal:
            meaning += "; one of " + ", ".join(f"`{c}`" for c in typing.get_args(field.annotation))
        rows.append(f"| `VITSERVE_{name.upper()}` | {default_shown(name)} | {meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())

