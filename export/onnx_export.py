"""FP32 PyTorch → ONNX (FP32), then FP16 and INT8 variants, with ONNX Runtime's own tools.

Decisions:
- Opset 18 via torch's dynamo exporter: LayerNorm stays the fused ``LayerNormalization`` op (opset ≥ 17),
  whose CUDA/TensorRT kernels accumulate in FP32, and GELU stays exact (``Erf``).
- Graph inputs/outputs stay FP32 in every variant (``keep_io_types``): callers never need to know the
  precision, the FP16 casts at the edges cost nothing next to 24 transformer blocks, and logits leave
  the graph at full precision for softmax.
- Softmax is kept in FP32 in the FP16 graph: attention probabilities are where FP16 rounding compounds.
- INT8 weights use a 7-bit range (``reduce_range``): on x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake)
  ONNX Runtime multiplies u8 activations by s8 weights with VPMADDUBSW, which sums pairs into a *saturating* 16-bit
  lane: 2·255·127 overflows it, 2·255·64 = 32,640 does not. With full 8-bit weights the same file gave max |Δlogit|
  0.48 on an AVX-512 VNNI CPU and 1.89 on AVX2 (the demo model; ONNX Runtime's and OpenVINO's quantisation docs
  describe the issue). With 7 bits the integer sums are exact on every ISA, so results no longer depend on the CPU.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np
import onnx
import torch

from service.artifact import QuantizationInfo

log = logging.getLogger("vitserve.export")

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
OPSET = 18
# Protobuf's hard limit; above it weights go to an external-data file beside the graph.
_PROTOBUF_LIMIT = 2**31 - 1


def export_fp32(model: torch.nn.Module, path: Path, input_size: tuple[int, int], max_batch: int) -> Path:
    """Trace ``model`` (pixel_values → logits) into an ONNX graph with a dynamic batch axis."""
    h, w = input_size
    example = torch.zeros(2, 3, h, w)
    batch = torch.export.Dim("batch", min=1, max=max(max_batch, 2))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"pixel_values": {0: batch}},
            opset_version=OPSET,
            dynamo=True,
            external_data=params > _PROTOBUF_LIMIT * 0.9,
            verbose=False,
        )
    # The exporter's optimiser deduplicates equal initialisers (e.g. the all-zero biases of a fresh model)
    # but can leave stale shape annotations behind, which break ONNX Runtime's quantiser: re-infer them.
    model = onnx.load(str(path))
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.save(model, str(path), save_as_external_data=params > _PROTOBUF_LIMIT * 0.9)
    onnx.checker.check_model(str(path))
    return path


def convert_fp16(fp32_path: Path, out_path: Path) -> Path:
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(fp32_path))
    model16 = convert_float_to_float16(model, keep_io_types=True, op_block_list=["Softmax"])
    wrapped = OnnxModel(model16)
    wrapped.topological_sort()  # the converter appends its input casts last; the checker wants them first
    onnx.save(wrapped.model, str(out_path))
    onnx.checker.check_model(str(out_path))
    return out_path


# Weight magnitude that keeps every VPMADDUBSW pair sum inside int16 (see the module docstring).
SATURATION_FREE_WEIGHT_MAX = 64
_WEIGHTS = "int8, per output channel, symmetric, 7-bit range"


def _weight_matmuls(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(MatMul/Gemm nodes with a constant weight, the classifier Gemm among them)."""
    inits = {i.name for i in model.graph.initializer}
    weighted = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits]
    return [n.name for n in weighted], [n.name for n in weighted if n.op_type == "Gemm"]


@contextlib.contextmanager
def _quiet_quantizer():
    """ORT's quantiser prints calibration progress and warns on the root logger that we skipped quant_pre_process
    (deliberately: see quantize_int8_dynamic). Keep both out of the export's own output."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _check_saturation_free(path: Path) -> None:
    """The claim in the manifest is checked on the file, not assumed: every int8 weight within ±64."""
    from onnx import numpy_helper

    worst = 0
    for init in onnx.load(str(path)).graph.initializer:
        if init.data_type == onnx.TensorProto.INT8:
            worst = max(worst, int(np.abs(numpy_helper.to_array(init).astype(np.int32)).max(initial=0)))
    if worst > SATURATION_FREE_WEIGHT_MAX:
        raise RuntimeError(f"{path.name}: an int8 weight reaches {worst} > {SATURATION_FREE_WEIGHT_MAX}; it could saturate on AVX2")


def quantize_int8_dynamic(fp32_path: Path, out_path: Path) -> QuantizationInfo:
    """Weights quantised offline per output channel; activations at run time, one scale per tensor per call (so an
    image's result depends on its batch-mates: the engine runs it one image per call). No calibration data."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # No quant_pre_process: its symbolic shape pass mis-infers the dynamo exporter's classifier Gemm.
    with _quiet_quantizer():
        quantize_dynamic(
            str(fp32_path), str(out_path), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
            op_types_to_quantize=["MatMul", "Gemm"],
        )  # fmt: skip
    _check_saturation_free(out_path)
    return QuantizationInfo(
        scheme="dynamic", weights=_WEIGHTS, activations="uint8, one scale per tensor computed from each call's batch",
        saturation_free=True, batch_invariant=False,
        quantized_ops="MatMul/Gemm with constant weights (attention's activation x activation products stay FP32)",
    )  # fmt: skip


class _Images:
    """ONNX Runtime's CalibrationDataReader protocol over (N, 3, H, W) pixels, one image per call, with the ranges
    its strided calibration walks (``set_range``). The calibrators keep every intermediate output of what they read
    before reducing it to ranges or histograms: 128 ViT-S images at once took 24 GB (killed). Read in strides of
    ``CALIBRATION_STRIDE`` images, memory is bounded by that stride and the histograms are merged across strides."""

    def __init__(self, pixels: np.ndarray):
        self._pixels = pixels
        self._i, self._end = 0, len(pixels)

    def get_next(self) -> dict | None:
        if self._i >= self._end:
            return None
        self._i += 1
        return {INPUT_NAME: self._pixels[self._i - 1 : self._i]}

    def __len__(self) -> int:
        return len(self._pixels)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._i, self._end = start_index, min(end_index, len(self._pixels))

    def rewind(self) -> None:
        self._i, self._end = 0, len(self._pixels)


CALIBRATION_STRIDE = 8


def _stride(n: int) -> int:
    """The largest stride ≤ CALIBRATION_STRIDE dividing n (ORT's strided calibration requires one)."""
    return next(s for s in range(min(CALIBRATION_STRIDE, n), 0, -1) if n % s == 0)


def quantize_int8_static(fp32_path: Path, out_path: Path, calibration: np.ndarray, method: str = "percentile") -> QuantizationInfo:
    """Static QDQ: activation scales calibrated once on ``calibration`` pixels, so they are constants and an image's
    result never depends on its batch-mates (the engine may batch). Only weight MatMuls are quantised: the attention
    products and the classifier head stay FP32 (quantising the head alone moved the demo model's logits by 2.1
    instead of 0.64). Percentile (99.99 %) calibration clips the rare activation outliers ViTs have, which MinMax
    would spend the 256 levels on."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if len(calibration) == 0:
        raise ValueError("static INT8 needs calibration images")
    weighted, head = _weight_matmuls(onnx.load(str(fp32_path), load_external_data=False))
    methods = {"percentile": CalibrationMethod.Percentile, "minmax": CalibrationMethod.MinMax}
    if method not in methods:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(methods)}")
    with _quiet_quantizer():
        quantize_static(
            str(fp32_path), str(out_path), _Images(calibration), quant_format=QuantFormat.QDQ,
            nodes_to_quantize=[n for n in weighted if n not in head], per_channel=True, reduce_range=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=methods[method],
            extra_options={"CalibStridedMinMax": _stride(len(calibration)),  # strides for every method, despite the name
                           **({"CalibPercentile": 99.99} if method == "percentile" else {})},
        )  # fmt: skip
    _check_saturation_free(out_path)
    return QuantizationInfo(
        scheme="static", weights=_WEIGHTS, activations="uint8, one calibrated scale per tensor (constants in the graph)",
        saturation_free=True, batch_invariant=True,
        quantized_ops="MatMul with constant weights (attention products and the classifier head stay FP32)",
        calibration={"method": method, "images": int(len(calibration))},
    )  # fmt: skip
