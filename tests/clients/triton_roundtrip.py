"""NVIDIA's own clients, unmodified, against vitserve: ``tritonclient.grpc`` and ``tritonclient.http``.

Run by tests/test_grpc.py with the Python of its own environment (.venv-clients: tritonclient pins protobuf<7 and
vitserve's gRPC stack wants protobuf 7, so they never share a process), exactly as a team that owns these clients
would call a Triton or KServe server. Prints one JSON object: per protocol, liveness, readiness, metadata, the
model configuration, and each image's top-k from the classification extension plus its full probabilities.

    python triton_roundtrip.py --grpc HOST:PORT --http HOST:PORT --model NAME [--key K] [--top 5] IMAGE...
"""

import argparse
import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def roundtrip(module, url: str, model: str, images: list[bytes], top: int, headers: dict) -> dict:
    client = module.InferenceServerClient(url)
    out = {"live": client.is_server_live(headers=headers), "ready": client.is_server_ready(headers=headers),
           "model_ready": client.is_model_ready(model, headers=headers)}
    meta = client.get_model_metadata(model, headers=headers)
    config = client.get_model_config(model, headers=headers)
    if module is grpcclient:
        out["metadata"] = {"name": meta.name, "versions": list(meta.versions),
                           "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in meta.inputs],
                           "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in meta.outputs]}
        out["max_batch_size"] = config.config.max_batch_size
    else:
        out["metadata"] = {k: meta[k] for k in ("name", "versions", "inputs", "outputs")}
        out["max_batch_size"] = config["max_batch_size"]
    image = module.InferInput("image", [len(images)], "BYTES")
    image.set_data_from_numpy(np.array(images, dtype=np.object_))
    classified = client.infer(model, [image], outputs=[module.InferRequestedOutput("probabilities", class_count=top)], headers=headers)
    rows = classified.as_numpy("probabilities")  # (N, top) of b"score:index:label"
    out["top"] = [[{"score": float(s), "index": int(i), "label": label} for s, i, label in (e.decode().split(":", 2) for e in row)] for row in rows]
    plain = client.infer(model, [image], headers=headers)
    out["probabilities"] = plain.as_numpy("probabilities").tolist()
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--grpc", required=True)
    p.add_argument("--http", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--key", default=None)
    p.add_argument("--top", type=int, default=5)
    p.add_argument("images", nargs="+")
    a = p.parse_args()
    images = [open(f, "rb").read() for f in a.images]
    headers = {"authorization": f"Bearer {a.key}"} if a.key else None
    result = {}
    for name, module, url in (("grpc", grpcclient, a.grpc), ("v2-http", httpclient, a.http)):
        try:
            result[name] = roundtrip(module, url, a.model, images, a.top, headers)
        except InferenceServerException as e:
            result[name] = {"error": str(e.message()), "status": str(e.status())}
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
