"""Peer: LitServe's idiom around the same engine and the service's own Preprocessor.

    python -m benchmarks.peers.litserve_peer ARTIFACT --port P [--max-batch 32]

A ``LitAPI`` as LitServe's docs write one: ``decode_request`` turns a JSON ``{"image": "<base64>"}`` into the model's
input (here the service's Preprocessor), LitServe batches up to ``max_batch_size`` within ``batch_timeout``,
``predict`` runs the engine on the batch, ``encode_response`` returns the top 5. LitServe runs its API server and
its inference worker as separate processes (a multiprocessing queue between them), which is the multi-process shape
vitserve's VITSERVE_WORKERS takes too.
"""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

import litserve as ls
import numpy as np


class VitLitAPI(ls.LitAPI):
    def __init__(self, artifact: Path, **kwargs):
        super().__init__(**kwargs)
        self.artifact = artifact

    def setup(self, device):
        from service.artifact import load_artifact
        from service.engines import load_engine
        from service.preprocess import Preprocessor

        art = load_artifact(self.artifact, verify=True)
        self.engine = load_engine(art, "onnxruntime-cpu", check=False)
        self.pre = Preprocessor(art.manifest.preprocessing)
        self.labels, self.temperature = art.manifest.labels, art.manifest.temperature

    def decode_request(self, request):
        return self.pre.from_bytes(base64.b64decode(request["image"]), max_pixels=40_000_000)

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, x):
        logits = self.engine.run(x) / self.temperature
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def unbatch(self, output):
        return list(output)

    def encode_response(self, probs):
        top = np.argsort(-probs)[:5]
        return {"top5": [{"label": self.labels[i], "index": int(i), "score": float(probs[i])} for i in top]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("artifact", type=Path)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--batch-timeout-s", type=float, default=0.005, help="as vitserve's max_wait_ms default (5 ms)")
    args = p.parse_args()
    api = VitLitAPI(args.artifact.resolve(), max_batch_size=args.max_batch, batch_timeout=args.batch_timeout_s)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
