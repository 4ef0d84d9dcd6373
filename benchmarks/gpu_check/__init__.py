"""The GPU path, proven in one run: vitserve's GPU engines, its GPU tests, training memory, decode and the service on
one lent GPU machine in at most 7.5 minutes, everything into one folder; rehearsed on CPU so that it never rots.

    bash benchmarks/gpu_wheels.sh                      # here: .whl/ = what a bare GPU machine lacks (carry it along)
    python -m benchmarks.gpu_check --out OUT           # there, from the source tree: ≤ 450 s on one H100 / H200
    python -m benchmarks.gpu_check --out OUT --steps failed   # there again, on the warm machine: what failed only
    python -m benchmarks.gpu_check --dry-run           # here: the same steps on CPU with a tiny ViT, < 2 min on 2 cores
    python -m benchmarks.gpu_check --replot OUT/gpu-check_<gpu>.json    # the figures again, from a run's JSON

Nothing is installed over the machine's own torch stack: wheels carried in .whl/ go into .whl/site, and only for
packages that are missing or older there (see gpu_wheels.sh). Steps, in this order, each with a time budget it cannot
overrun (pytest and the compile step run in process groups killed at their budget); a step that fails is recorded with
its traceback's tail and the run goes on, and the results are rewritten after every step, so a run cut short keeps
everything done so far:

  environment      GPU, driver, CUDA, versions; the measured ceiling: large BF16 and FP16 matmuls, TFLOP/s (median)
  pytest           `pytest -m "gpu or tensorrt"` in a subprocess: passed / failed / skipped, with reasons
  engines/<model>  ViT-L/16@224 (random weights, the real shape) and the demo model through every GPU engine vitserve
                   has: PyTorch FP16 and BF16 eager with SDPA (the service's TorchEngine), the same replayed from one
                   CUDA graph per batch bucket (this check's: the engine has none), ONNX Runtime CUDA / TensorRT EPs and
                   native TensorRT where they import. Batch sweep 1..256: img/s, ms per batch, fraction of the matmul
                   rate; parity of each against FP32 with export's gate (service.parity.check_engine)
  training_memory  peak CUDA memory of a ViT-L training step (BF16 autocast, FP32 weights, AdamW) at batch 4 and 16
  decode           GPU JPEG decode (torchvision, batched) against the service's CPU decode, 640×480 and 1920×1080
  service          the service on the best engine (`vitserve serve`; our ASGI app under plain uvicorn where BentoML
                   does not import), loaded by benchmarks/harness/load.py: closed loop, then open loop at half the
                   peak; img/s, p50/p99, per-stage means from its histograms, and service ÷ raw engine
  compile/<model>  torch.compile of the PyTorch engine (this check's: the engine has none); last, as the slowest, in
                   a child process killed at its budget; batch 1 not swept (Dynamo would compile it again)

The dry run swaps ViT-L for the `tiny` config, runs what a CPU can (the CPU PyTorch engine's sweep and parity, the CPU
matmul, CPU decode, the service on its CPU engine, torch.compile with Dynamo's eager backend) and says, per GPU-only
part, that it was skipped and why. Results, within what a GPU machine returns (8 files): OUT/gpu-check_<machine>.
{json,md,png} (+ _service.png), gpu-check.log, and logs.tar.gz (pytest's log and XML, the server's, the compile
step's).
"""

import time

STARTED = time.monotonic()  # the time limit counts from here: imports and package setup are part of the run
