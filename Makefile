# Two commands set everything up on a fresh machine:
#   make serve   create .venv, install, start the service on the embedded demo model (http://localhost:3000)
#   make test    create .venv, install (plus the Fashion-MNIST data package), run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: serve test install data clients perf-analyzer native triton-peer protos demo-model demo-artifact bench overload bento gpu-check gpu-wheels gpu-rehearsal clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned (==2.13.0) in pyproject: an unpinned torch would pull GBs of CUDA packages.
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# gRPC's transport in C++ (service/native/grpc_front.cc; VITSERVE_GRPC_TRANSPORT=auto uses it once built): gRPC's own
# C++ library from Debian (libgrpc++-dev, 1.51) and g++. Without them the service keeps grpc.aio.
NATIVE_FRONT := service/native/vitserve-grpc-front
native: $(NATIVE_FRONT)
$(NATIVE_FRONT): service/native/grpc_front.cc
	@if ! pkg-config --exists grpc++ && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++ make pkg-config libgrpc++-dev >/dev/null; fi
	@if pkg-config --exists grpc++; then \
	  g++ -O2 -std=c++17 -Wall -o $@ $< $$(pkg-config --cflags --libs grpc++) && echo "built $@"; \
	else echo "note: install Debian's libgrpc++-dev and g++ for the C++ gRPC front (gRPC stays on grpc.aio without it)"; fi

# The clients teams already own, in their own environment: tritonclient pins protobuf<7, vitserve's gRPC stack needs
# protobuf 7, so they cannot share one (tests/test_grpc.py runs them from here, unmodified).
CLIENT_VENV ?= .venv-clients
$(CLIENT_VENV)/bin/.installed:
	$(PYTHON) -m venv $(CLIENT_VENV)
	$(CLIENT_VENV)/bin/python -m pip install -q --upgrade pip
	$(CLIENT_VENV)/bin/python -m pip install -q 'tritonclient[grpc,http]==2.73.0'
	touch $@

clients: $(CLIENT_VENV)/bin/.installed

# Triton's load tool, perf_analyzer, ships in the tritonclient[all] 2.40 wheel (later wheels dropped it); it links
# libcudart.so.12 even against a CPU server (the nvidia-cuda-runtime-cu12 wheel has it) and Debian's libb64-0d
# (make data). tests/test_perf_analyzer.py runs it unchanged against the service.
PERF_VENV ?= .venv-perf
$(PERF_VENV)/bin/.installed:
	$(PYTHON) -m venv $(PERF_VENV)
	$(PERF_VENV)/bin/python -m pip install -q --upgrade pip
	$(PERF_VENV)/bin/python -m pip install -q 'tritonclient[all]==2.40.0' nvidia-cuda-runtime-cu12
	touch $@

perf-analyzer: $(PERF_VENV)/bin/.installed

# The Triton peer of `vitserve bench front-door --triton`: PyTriton bundles tritonserver, which runs on CPU here. Its
# venv must come from Debian's python3.11 (pyenv's Python broke PyTriton's backend stub). Not part of `make test`.
TRITON_VENV ?= .venv-triton
SYSTEM_PYTHON ?= /usr/bin/python3.11
$(TRITON_VENV)/bin/.installed:
	$(SYSTEM_PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q --upgrade pip
	$(TRITON_VENV)/bin/python -m pip install -q 'nvidia-pytriton==0.7.*' onnxruntime pillow pydantic numpy
	touch $@

triton-peer: $(TRITON_VENV)/bin/.installed

# The committed gRPC stubs, regenerated from service/protos/*.proto (tests/test_grpc.py checks they match).
protos: install
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. \
	  service/protos/model_config.proto service/protos/grpc_service.proto
	rm -f service/protos/model_config_pb2_grpc.py

# Debian packages the tests use: real data for the fine-tune tests and the demo model (dataset-fashion-mnist, MIT
# licensed), qemu-user, whose qemu-x86_64 runs the INT8 engines on an emulated AVX2 CPU (tests/test_int8.py), and
# libb64-0d, which perf_analyzer links (tests/test_perf_analyzer.py), chromium, the real browser that drives the
# service's page (tests/test_web_page.py), and prometheus, whose promtool parses every PromQL expression we ship
# (tests/test_monitoring.py).
APT_TEST_PACKAGES := dataset-fashion-mnist qemu-user libb64-0d chromium prometheus
data:
	@if [ ! -f $(FASHION_MNIST) ] || ! command -v qemu-x86_64 >/dev/null || [ ! -e /usr/lib/x86_64-linux-gnu/libb64.so.0d ] \
	    || ! command -v chromium >/dev/null || ! command -v promtool >/dev/null; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_TEST_PACKAGES) >/dev/null; \
	  else echo "note: install Debian's $(APT_TEST_PACKAGES) for the Fashion-MNIST and cross-CPU tests (they skip without them)"; fi; \
	fi

serve: install native
	BENTOML_DO_NOT_TRACK=True $(BIN)/vitserve serve

test: install native data clients perf-analyzer
	BENTOML_DO_NOT_TRACK=True $(BIN)/python -m pytest

# Rebuild the embedded demo model from Fashion-MNIST: the exact recipe (docs/finetune.md "The demo model"), ~12 min on
# 2 CPU cores. torchrun runs two DDP processes on CPU here; on GPUs the same command uses one per GPU.
demo-model: install data
	$(BIN)/python -m demo.fashion_mnist --out data/fashion-mnist
	$(BIN)/python -m demo.tiny_base --out data/demo-base --image-size 28 --patch-size 7 --hidden 128 --layers 4 --heads 4
	$(BIN)/torchrun --nproc-per-node 2 -m finetune --train-dir data/fashion-mnist/train --test-dir data/fashion-mnist/test \
	  --val-split 0.05 --base data/demo-base --output runs/demo --epochs 12 --batch-size 32 --lr 1.5e-3 --augment none --num-workers 0
	$(BIN)/vitserve export runs/demo/checkpoint --output service/demo_artifact --force --name fashion-mnist-vit \
	  --calibration-dir data/fashion-mnist/test --max-images 1024 --max-batch 64

# Re-export the committed demo model without retraining: its pytorch/ folder is a complete checkpoint (weights,
# configs, vitserve_calibration.json), copied out first because --force empties the output folder.
demo-artifact: install data
	$(BIN)/python -m demo.fashion_mnist --out data/fashion-mnist
	rm -rf runs/demo-checkpoint && mkdir -p runs && cp -r service/demo_artifact/pytorch runs/demo-checkpoint
	$(BIN)/vitserve export runs/demo-checkpoint --output service/demo_artifact --force --name fashion-mnist-vit \
	  --calibration-dir data/fashion-mnist/test --max-images 1024 --max-batch 64

# The CPU comparison table in docs/results.md: our service vs the raw engine, BentoML's batchable idiom and a naive
# pipeline() service, same model (ViT-S/16, random weights), same machine, one run (~6 min on 2 quiet cores).
bench: install
	BENTOML_DO_NOT_TRACK=True $(BIN)/vitserve bench compare --config vit-small

# Overload on the demo model: 1x, 2x and 5x its saturation for 60 s each (docs/serving.md "Overload"), ~4 min.
overload: install
	BENTOML_DO_NOT_TRACK=True $(BIN)/vitserve bench overload

# The GPU path proven in one prepared run (docs/verification.md "GPU check"): <= 7.5 min on one H100/H200, every result into one folder.
# Needs no .venv: a GPU machine keeps its own torch stack (run `make gpu-wheels` here first and carry .whl/ along).
# DRY_RUN=1 rehearses the same script on CPU with a tiny ViT (< 2 min on 2 cores; tests/test_gpu_check.py runs it too).
CHECK_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_CHECK_OUT ?=
gpu-check:
	BENTOML_DO_NOT_TRACK=True $(CHECK_PYTHON) -m benchmarks.gpu_check $(if $(filter 1,$(DRY_RUN)),--dry-run) $(if $(GPU_CHECK_OUT),--out $(GPU_CHECK_OUT))

# Needs no .venv either: gpu_wheels.sh uses it for the versions where it exists, else a small venv of its own.
gpu-wheels:
	bash benchmarks/gpu_wheels.sh

# The dry run under Python 3.12 with the device image's versions and the carried wheels, as close to the GPU machine as
# this one gets (benchmarks/gpu_rehearsal.sh says what it cannot cover).
gpu-rehearsal:
	bash benchmarks/gpu_rehearsal.sh

bento: install
	BENTOML_DO_NOT_TRACK=True $(BIN)/bentoml build

clean:
	rm -rf $(VENV) $(CLIENT_VENV) .pytest_cache build dist *.egg-info
