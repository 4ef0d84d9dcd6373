"""Peer: NVIDIA Triton Inference Server (its C++ HTTP/gRPC front-ends and dynamic batcher) serving the same engine,
with the service's own Preprocessor in a Python model, through PyTriton (the `nvidia-pytriton` wheel bundles
tritonserver, so it runs on this CPU-only machine).

    .venv-triton/bin/python -m benchmarks.peers.triton_pytriton ARTIFACT --http-port P --grpc-port Q [--max-batch 32]

Run from its own environment (`make triton-peer`: Debian's system python3.11 + nvidia-pytriton 0.7, onnxruntime,
pillow, pydantic; pyenv's Python broke PyTriton's backend stub). Only service.artifact, service.preprocess and the
ONNX Runtime engine are imported: what Triton's model needs, none of vitserve's serving. The model takes what
vitserve's KServe v2 endpoint takes (``image``, BYTES [N, 1]) and returns ``probabilities`` (FP32 [N, labels]), so
the same client requests reach both.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np


def main() -> None:
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    from service.artifact import load_artifact
    from service.engines.onnxruntime_engine import OnnxRuntimeEngine
    from service.preprocess import Preprocessor

    p = argparse.ArgumentParser()
    p.add_argument("artifact", type=Path)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-queue-delay-us", type=int, default=5000, help="as vitserve's max_wait_ms default (5 ms)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)

    art = load_artifact(args.artifact, verify=True)
    m = art.manifest
    entry = next(e for e in m.engines if e.format == "onnx" and e.device == "cpu" and e.precision == "fp32")
    engine = OnnxRuntimeEngine(art.path(entry), entry, m.preprocessing.input_size, provider="cpu")
    pre = Preprocessor(m.preprocessing)
    temperature = m.temperature

    @batch
    def infer(image: np.ndarray) -> dict[str, np.ndarray]:
        x = np.stack([pre.from_bytes(bytes(row[0]), max_pixels=40_000_000) for row in image])
        logits = engine.run(x) / temperature
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return {"probabilities": (e / e.sum(axis=1, keepdims=True)).astype(np.float32)}

    config = TritonConfig(http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port)
    # PyTriton puts Triton's statistics API behind an access token by default; perf_analyzer reads it (as it does from
    # any Triton), so it stays open here. The other management APIs stay restricted; inference is not affected.
    security = TritonSecurityConfig(restricted_endpoints=["shared-memory", "model-repository", "trace", "logging"])
    with Triton(config=config, security_config=security) as triton:
        triton.bind(
            model_name=m.model.name,
            infer_func=infer,
            inputs=[Tensor(name="image", dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(len(m.labels),))],
            config=ModelConfig(max_batch_size=args.max_batch,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us)),
            strict=False,
        )
        triton.serve()


if __name__ == "__main__":
    main()
