"""Logits of an ONNX file for saved pixels, one image per call: ``python tests/onnx_logits.py MODEL PIXELS.npy OUT.npy``.

tests/test_int8.py runs it under ``qemu-x86_64 -cpu <model>`` to see what another instruction set computes (ONNX
Runtime picks its integer kernels from CPUID, which QEMU emulates). It imports only numpy and onnxruntime, so it
starts in seconds even under emulation, and uses one thread so the two runs differ in instruction set alone.
"""

import sys

import numpy as np
import onnxruntime as ort

model, pixels, out = sys.argv[1:4]
x = np.load(pixels)
options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
np.save(out, np.concatenate([session.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))]))
