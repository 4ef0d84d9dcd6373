"""Every service setting, typed, from ``VITSERVE_*`` environment variables (the README lists them)."""

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
    max_batch_size: int = Field(32, ge=1, description="largest batch the batcher forms (capped by the engine's)")
    max_wait_ms: float = Field(5.0, ge=0, description="how long the oldest queued image may wait for a fuller batch")
    queue_capacity: int = Field(256, ge=1, description="images that may wait in the queue; beyond it requests get 429")
    batch_buckets: list[int] = Field(
        default_factory=list, description="pad batches up to these sizes (fixed-shape engines); empty = no padding"
    )
    request_timeout_s: float = Field(10.0, gt=0, description="per-request deadline; expired in the queue → 504")
    max_images_per_request: int = Field(32, ge=1, description="more images in one request → 413")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="larger request bodies → 413")
    max_image_pixels: int = Field(40_000_000, ge=1, description="larger images (width×height) → 422, before decoding")
    default_top_k: int = Field(5, ge=1, description="predictions per image when the request gives no top_k")
    decode_threads: int = Field(0, ge=0, description="decode/preprocess threads; 0 = min(4, CPU count)")
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0 = one per physical core")
    grace_period_s: float = Field(30.0, ge=0, description="on SIGTERM, at most this long to answer accepted requests")
    drain_quiet_s: float = Field(
        1.0, ge=0, description="on SIGTERM, stop once no request has arrived for this long (within the grace period)"
    )
    host: str = Field("0.0.0.0", description="address `vitserve serve` binds")
    port: int = Field(3000, ge=1, le=65535, description="port `vitserve serve` binds")

    @property
    def server_shutdown_s(self) -> int:
        """uvicorn's share of the grace period: closing connections after our drain has answered everything."""
        return max(1, int(min(5.0, self.grace_period_s / 2)))

    @property
    def drain_s(self) -> float:
        """Our share: answering queued and in-flight requests. Together the two fit in grace_period_s."""
        return max(0.0, self.grace_period_s - self.server_shutdown_s)

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if any(b < 1 for b in self.batch_buckets):
            raise ValueError("batch_buckets must be positive sizes")
        # BentoML runs hooks and workers from different directories: a relative artifact path means the
        # current directory if it exists there, else the project (Bento src/) root.
        if not self.artifact.is_absolute():
            here = Path.cwd() / self.artifact
            self.artifact = here if here.exists() else PROJECT_ROOT / self.artifact
        return self
