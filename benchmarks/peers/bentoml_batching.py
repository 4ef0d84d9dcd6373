"""Peer: the BentoML-idiomatic service. `bentoml serve benchmarks.peers.bentoml_batching:IdiomaticVit`

Written the way BentoML 1.4's adaptive-batching docs show it: a class service, the model loaded in ``__init__``,
and one ``@bentoml.api(batchable=True, ...)`` method. For a batchable API BentoML's CorkDispatcher gathers the
one argument of concurrent requests and concatenates the lists (``DefaultContainer.batches_to_batch``), calls
the method once in its worker thread, then splits the returned list back per request. A multipart request whose
parts are named ``images`` arrives as ``list[PIL.Image.Image]`` (BentoML's multipart serde + PIL validator).

Everything model-side is ours, so only the serving layer differs: the engine our service would pick, loaded with
``service.engines.load_engine`` (on CPU the artifact's one CPU ONNX file, the same ONNX Runtime session options) and the manifest's
``Preprocessor``/``to_rgb`` and top-k. Batch limits match our service's defaults: at most 32 images a batch,
and a 10 s latency budget (our request deadline) after which BentoML answers 503.
"""

from __future__ import annotations

import os
from pathlib import Path

import bentoml
from PIL import Image

MAX_BATCH_SIZE = 32  # = service.settings.Settings.max_batch_size
MAX_LATENCY_MS = 10_000  # = Settings.request_timeout_s


@bentoml.service(name="vit-bentoml-batching", workers=1, traffic={"timeout": 40})
class IdiomaticVit:
    def __init__(self) -> None:
        from service.artifact import load_artifact
        from service.engines import load_engine
        from service.preprocess import Preprocessor

        artifact = load_artifact(Path(os.environ["VITSERVE_BENCH_ARTIFACT"]))
        # "auto" picks what our service picks on this machine (on CPU: the artifact's one CPU ONNX file).
        self.engine = load_engine(artifact, os.environ.get("VITSERVE_BENCH_ENGINE", "auto"))
        self.manifest = artifact.manifest
        self.preprocess = Preprocessor(self.manifest.preprocessing)

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def classify(self, images: list[Image.Image]) -> list[dict]:
        import numpy as np

        from service.preprocess import to_rgb
        from service.topk import predictions

        pixels = np.stack([self.preprocess(to_rgb(img)) for img in images])  # (B, 3, H, W)
        logits = self.engine.run(pixels)
        top = predictions(logits, self.manifest.labels, temperature=self.manifest.temperature, k=5)
        return [{"top5": [p._asdict() for p in row]} for row in top]  # one dict per image, as the load test checks
