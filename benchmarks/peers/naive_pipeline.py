"""Peer: the service a user writes first. `bentoml serve benchmarks.peers.naive_pipeline:NaiveVit`

A plain (non-batchable) ``@bentoml.api`` calling transformers' ``pipeline("image-classification")`` on the
artifact's ``pytorch/`` folder (a complete HF checkpoint) for each request: PyTorch FP32 eager (on the GPU where
there is one), the HF image processor, no batching across requests. Same weights, same images, same
``POST /classify`` multipart ``images`` request as our service.
"""

from __future__ import annotations

import os
from pathlib import Path

import bentoml
from PIL import Image


@bentoml.service(name="vit-naive-pipeline", workers=1, traffic={"timeout": 40})
class NaiveVit:
    def __init__(self) -> None:
        import torch
        from transformers import pipeline

        self.classifier = pipeline(
            "image-classification",
            model=str(Path(os.environ["VITSERVE_BENCH_ARTIFACT"]) / "pytorch"),
            device="cuda" if torch.cuda.is_available() else "cpu",  # on a GPU machine the user at least moves it there
        )

    @bentoml.api
    def classify(self, images: list[Image.Image]) -> list:
        return self.classifier(images, top_k=5)
