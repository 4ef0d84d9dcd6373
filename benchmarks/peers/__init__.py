"""The peers our service is measured against: same model, same machine, same images, same run.

- ``raw_engine``: the ONNX Runtime engine called directly, no server (plus decode + preprocess, timed apart).
- ``bentoml_batching``: what the BentoML docs teach: the same engine file and preprocessing behind
  ``@bentoml.api(batchable=True, max_batch_size=..., max_latency_ms=...)``.
- ``naive_pipeline``: what a user writes first: ``transformers.pipeline("image-classification")`` per request
  inside a plain ``@bentoml.api``.

Both services answer ``POST /classify`` with multipart parts named ``images``, the request our service takes.
"""
