"""The artifact contract: one manifest schema, and the only code that opens an artifact directory.

An artifact is a directory holding ``manifest.json``, the engine files it lists and a small golden set (inputs and
their FP32 reference logits, re-checked by the service on the machine that serves). Export writes it (``export/``);
the service and the parity gate read it through :func:`load_artifact`, which checks every file's sha256 before
anything is loaded, so a tampered or truncated file never reaches a runtime.

Schema 2 added the golden set, each INT8 file's quantisation scheme, the speed-by-batch curve measured at export,
and confidence bounds and hardware facts in parity reports; schema 3 the JPEG draft margin in preprocessing (1 by
default; older artifacts keep the 2 they were gated with). Schema 1 and 2 manifests still load.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 3
LEGACY_DRAFT_MARGIN = 2.0  # what schema 1 and 2 artifacts were decoded, and gated, with
GOLDEN_NAME = "golden.safetensors"


class ArtifactError(Exception):
    """The artifact cannot be used: missing, malformed, or failing its checksums. Fatal at startup."""


class _Strict(BaseModel):
    # Unknown keys are errors: a manifest written by a newer schema must not load half-understood.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Preprocessing(_Strict):
    """Exactly what turns a decoded RGB image into the model's input tensor (timm's pretrained cfg role)."""

    resize_mode: Literal["exact", "shortest_edge"] = Field(
        description="exact: resize to resize_size (H, W) ignoring aspect (HF ViTImageProcessor); "
        "shortest_edge: scale so the short side equals resize_size[0], keeping aspect (timm/DeiT)."
    )
    resize_size: tuple[int, int]
    center_crop: tuple[int, int] | None = Field(default=None, description="(H, W) crop after resize, or none")
    crop_offset: Literal["round", "floor"] = Field(
        default="round",
        description="where the centre crop starts when the excess is odd: round = int(round(excess / 2)), torchvision's "
        "and timm's rule; floor = excess // 2, transformers' image processors' rule.",
    )
    resample: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bilinear"
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    channel_order: Literal["RGB"] = "RGB"
    layout: Literal["NCHW"] = "NCHW"
    jpeg_draft_margin: float = Field(
        default=1.0, ge=0,
        description="JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) still at least this many times the "
        "model's input on each side, then resized; 0 = always at full size. Part of preprocessing, so the gate, "
        "training's evaluation and the service decode alike. 1: a 640x480 photo for a 224 model decodes at 320x240 "
        "(1.7 instead of 2.5 ms; 4000x3000: 11 instead of 53), its model input moving by 0.5/255 on average "
        "(benchmarks/results/decode_vit-small_cpu2.md).",
    )

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the tensor the engine sees."""
        if self.center_crop is not None:
            return self.center_crop
        if self.resize_mode == "exact":
            return self.resize_size
        raise ArtifactError("shortest_edge resize needs a center_crop to give a fixed input size")

    @model_validator(mode="after")
    def _fixed_input(self) -> "Preprocessing":
        self.input_size  # raises for a shape the engines cannot take
        if any(s <= 0 for s in self.std):
            raise ValueError("std must be positive")
        return self

    @classmethod
    def from_hf(cls, cfg: dict, image_size: int) -> "Preprocessing":
        """A Hugging Face image-processor config (preprocessor_config.json as a dict) → our spec. Covers
        ViTImageProcessor (exact resize) and DeiT-style shortest-edge resize + centre crop. Export writes this into
        the manifest and fine-tuning evaluates with it, so both read the processor the same way."""
        resample_names = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL's enum values
        size = cfg.get("size", {"height": image_size, "width": image_size})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        crop = None
        if cfg.get("do_center_crop") and cfg.get("crop_size"):
            c = cfg["crop_size"]
            crop = (c, c) if isinstance(c, int) else (c["height"], c["width"])
        if "shortest_edge" in size:
            mode, resize = "shortest_edge", (size["shortest_edge"], size["shortest_edge"])
            crop = crop or (image_size, image_size)
        else:
            mode, resize = "exact", (size["height"], size["width"])
        normalize = cfg.get("do_normalize", True)
        return cls(
            resize_mode=mode,
            resize_size=resize,
            center_crop=crop,
            crop_offset="floor",  # transformers' center_crop: (size - crop) // 2
            resample=resample_names.get(cfg.get("resample", 2), "bilinear"),
            rescale_factor=cfg.get("rescale_factor", 1 / 255) if cfg.get("do_rescale", True) else 1.0,
            mean=tuple(cfg.get("image_mean", (0.5, 0.5, 0.5))) if normalize else (0.0, 0.0, 0.0),
            std=tuple(cfg.get("image_std", (0.5, 0.5, 0.5))) if normalize else (1.0, 1.0, 1.0),
        )


class TensorSpec(_Strict):
    name: str
    dtype: Literal["float32", "float16", "bfloat16"]
    shape: list[int | str] = Field(description="'batch' marks the dynamic axis")


class ParityThresholds(_Strict):
    min_top1_agreement: float
    min_top5_overlap: float
    max_abs_logit_diff: float
    max_abs_prob_diff: float
    max_batch_logit_diff: float = Field(description="an image's logits alone vs inside a full batch")


class ParityReport(_Strict):
    """One engine measured against the FP32 PyTorch model on the same preprocessed images."""

    reference: str = "pytorch-fp32"
    images: int
    top1_agreement: float
    top5_overlap: float = Field(description="mean |top5(engine) ∩ top5(reference)| / 5")
    top1_agreement_ci95: tuple[float, float] | None = Field(default=None, description="95 % Wilson interval")
    top5_overlap_ci95: tuple[float, float] | None = Field(default=None, description="95 % Wilson interval (conservative)")
    decided_on: Literal["point", "lower_bound", "upper_bound"] = Field(
        default="point",
        description="which end of the interval the agreement thresholds were applied to: export's gate must show "
        "agreement (lower bound); the startup check refuses only what its few images refute (upper bound)",
    )
    max_abs_logit_diff: float
    max_abs_prob_diff: float
    batch_logit_diff: float = Field(description="max |Δlogit| of each image run alone vs inside a full batch")
    batch_top5_identical: bool = Field(description="every image's top-5 is the same alone and inside a batch")
    batch_images: int | None = Field(default=None, description="images the batch-invariance figures were measured on")
    thresholds: ParityThresholds
    passed: bool
    failures: list[str] = Field(default_factory=list, description="which thresholds were missed, and by how much")
    hardware: dict[str, str] = Field(default_factory=dict, description="where it was measured: CPU, ISA flags, GPU")


class QuantizationInfo(_Strict):
    """How an INT8 file was quantised: what decides whether it may batch and whether it is exact on every CPU."""

    scheme: Literal["dynamic", "static"] = Field(
        description="dynamic: activation scales computed per call from the batch; static: calibrated constants"
    )
    weights: str = Field(description="e.g. 'int8, per output channel, symmetric, 7-bit range'")
    activations: str
    saturation_free: bool = Field(
        description="no 16-bit intermediate can saturate on any ISA (x86 without VNNI multiplies u8 x s8 pairs into "
        "16 bits; 7-bit weights keep every pair sum in range), so results do not depend on the CPU"
    )
    batch_invariant: bool = Field(description="an image's logits do not depend on its batch-mates")
    quantized_ops: str
    calibration: dict[str, str | int | float] | None = Field(default=None, description="static only: method, images")


class SpeedCurve(_Strict):
    """Throughput by batch size through the engine exactly as the service calls it, measured at export."""

    images_per_s: dict[int, float]
    best_batch: int
    measured_on: dict[str, str] = Field(default_factory=dict)


class GoldenSet(_Strict):
    """A few dozen inputs and their FP32 reference logits: the service re-runs them through the engine it is about
    to serve, on the machine that serves, before it turns ready."""

    file: str = GOLDEN_NAME
    sha256: str
    images: int
    source: str = Field(description="where the inputs came from (the first images of the parity set)")


class EngineFile(_Strict):
    file: str = Field(description="path relative to the artifact directory")
    format: Literal["onnx", "tensorrt", "safetensors"]
    precision: Literal["fp32", "fp16", "bf16", "int8"]
    device: Literal["cpu", "cuda", "any"] = Field(description="where this file is meant to run")
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int
    sha256: str
    parity: ParityReport | None = None
    quantization: QuantizationInfo | None = None
    speed: SpeedCurve | None = None
    build: dict[str, str] = Field(default_factory=dict, description="builder facts, e.g. TensorRT version, GPU name")

    @property
    def batch_dependent(self) -> bool:
        """True when the engine must run one image per call to keep clients independent (dynamic INT8)."""
        if self.quantization is not None:
            return not self.quantization.batch_invariant
        return self.precision == "int8"  # schema 1: every INT8 file was dynamically quantised

    @field_validator("file")
    @classmethod
    def _relative(cls, v: str) -> str:
        if Path(v).is_absolute() or ".." in Path(v).parts:
            raise ValueError(f"engine file must be inside the artifact: {v!r}")
        return v


class ModelInfo(_Strict):
    name: str
    version: str
    architecture: str = "vit"
    num_parameters: int


class SourceInfo(_Strict):
    checkpoint: str
    sha256: str = Field(description="sha256 over the checkpoint's weight files, in name order")


class Evaluation(_Strict):
    """How well the fine-tuned model did on held-out images (fine-tune's metrics.json), for the model card."""

    split: Literal["test", "validation"]
    images: int
    top1: float
    top5: float
    macro_f1: float
    ece: float = Field(description="expected calibration error before temperature scaling")
    confusion: list[list[int]] | None = Field(default=None, description="counts, row = true class, column = predicted")
    source: str = Field(description="the fine-tune run's metrics.json it was read from")


class Manifest(_Strict):
    schema_version: Literal[1, 2, 3] = SCHEMA_VERSION
    model: ModelInfo
    labels: list[str] = Field(min_length=1, description="class names in logit index order")
    preprocessing: Preprocessing
    temperature: float = Field(default=1.0, gt=0, description="softmax temperature; 1.0 until calibrated")
    engines: list[EngineFile] = Field(min_length=1)
    golden: GoldenSet | None = None
    source: SourceInfo
    versions: dict[str, str | None]
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    export_report: dict = Field(default_factory=dict, description="e.g. the CPU engine choice and its timings")
    evaluation: Evaluation | None = Field(default=None, description="the fine-tune run's held-out figures, when known")

    @model_validator(mode="before")
    @classmethod
    def _legacy_draft_margin(cls, data):
        """An older artifact decodes JPEGs as it was gated: with the margin of its time."""
        if isinstance(data, dict) and data.get("schema_version", SCHEMA_VERSION) < 3:
            pre = data.get("preprocessing")
            if isinstance(pre, dict) and "jpeg_draft_margin" not in pre:
                data = {**data, "preprocessing": {**pre, "jpeg_draft_margin": LEGACY_DRAFT_MARGIN}}
        return data

    def engine(self, *, format: str, precision: str | None = None) -> EngineFile | None:
        for e in self.engines:
            if e.format == format and (precision is None or e.precision == precision):
                return e
        return None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Artifact:
    """A verified artifact directory: its manifest plus resolved paths."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = root
        self.manifest = manifest

    def path(self, entry: EngineFile) -> Path:
        return self.root / entry.file

    def verify(self, entries: list[EngineFile] | None = None) -> None:
        """Refuse any engine file (and the golden set) whose bytes are not the ones export measured."""
        for entry in entries if entries is not None else self.manifest.engines:
            self._check(entry.file, entry.sha256, "engine file")
        if entries is None and self.manifest.golden is not None:
            self._check(self.manifest.golden.file, self.manifest.golden.sha256, "golden set")

    def _check(self, file: str, sha256: str, what: str) -> None:
        p = self.root / file
        if not p.is_file():
            raise ArtifactError(f"artifact {self.root}: {what} {file} is missing")
        actual = sha256_file(p)
        if actual != sha256:
            raise ArtifactError(
                f"artifact {self.root}: checksum mismatch for {file} "
                f"(manifest {sha256[:12]}…, file {actual[:12]}…); refusing to load it"
            )

    def golden_set(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(pixels (N, H, W, 3) uint8 after resize/crop, reference logits (N, L) float32), checksum-verified; None
        for an artifact without one (schema 1)."""
        g = self.manifest.golden
        if g is None:
            return None
        from safetensors.numpy import load_file

        self._check(g.file, g.sha256, "golden set")
        tensors = load_file(self.root / g.file)
        return tensors["pixels"], tensors["reference_logits"]


def read_manifest(root: Path) -> Manifest:
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"no {MANIFEST_NAME} in {root}: not a vitserve artifact (run `vitserve export`)")
    try:
        return Manifest.model_validate_json(path.read_text())
    except ValueError as e:  # pydantic.ValidationError and json errors are both ValueErrors
        raise ArtifactError(f"{path} is not a valid vitserve manifest: {e}") from e


def write_manifest(root: Path, manifest: Manifest) -> Path:
    path = Path(root) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a manifest
    return path


def load_artifact(root: str | Path, verify: bool | list[EngineFile] = True) -> Artifact:
    """Open and (by default) checksum-verify an artifact directory."""
    root = Path(root)
    artifact = Artifact(root, read_manifest(root))
    if verify is True:
        artifact.verify()
    elif verify:
        artifact.verify(list(verify))
    return artifact
