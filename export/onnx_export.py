"""FP32 PyTorch → ONNX (FP32), then FP16 and dynamically quantised INT8 variants, with ONNX Runtime's own tools.

Decisions:
- Opset 18 via torch's dynamo exporter: LayerNorm stays the fused ``LayerNormalization`` op (opset ≥ 17),
  whose CUDA/TensorRT kernels accumulate in FP32, and GELU stays exact (``Erf``).
- Graph inputs/outputs stay FP32 in every variant (``keep_io_types``): callers never need to know the
  precision, the FP16 casts at the edges cost nothing next to 24 transformer blocks, and logits leave
  the graph at full precision for softmax.
- Softmax is kept in FP32 in the FP16 graph: attention probabilities are where FP16 rounding compounds.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import torch

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


def quantize_int8(fp32_path: Path, out_path: Path) -> Path:
    """Dynamic INT8: weights quantised offline per channel, activations at run time (no calibration data)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # No quant_pre_process: its symbolic shape pass mis-infers the dynamo exporter's classifier Gemm.
    quantize_dynamic(
        str(fp32_path), str(out_path), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul", "Gemm"]
    )
    return out_path
