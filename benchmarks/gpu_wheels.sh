#!/usr/bin/env bash
# What a bare GPU machine lacks for `python -m benchmarks.gpu_check`, gathered here into .whl/ (git-ignored) so that it
# travels with the working tree (the GPU machine has no network):
#
#   bash benchmarks/gpu_wheels.sh          # → .whl/*.whl + .whl/skimage_photos.npz, then the sizes
#   PLOT=0 bash benchmarks/gpu_wheels.sh   # without matplotlib (17 MiB less): the PNGs are then drawn afterwards with
#                                          # python -m benchmarks.gpu_check --replot OUT/gpu-check_<gpu>.json
#
# - Wheels for CPython 3.12 on manylinux x86_64 (glibc 2.28: torch's CUDA wheels need it anyway), each without its
#   dependencies: exactly what the GPU machine's torch / transformers / onnx / httpx / pytest stack does not bring.
#   Versions are this project's .venv's (its tests pass with them). gpu_check installs one only where its package is
#   missing or older, into .whl/site, never over torch.
# - scikit-image's photographs as the arrays `skimage.data` returns: scikit-image needs scipy (~35 MB), too big to
#   carry, and the parity images, the load test's photos and the GPU tests all come from them.
#
# Environment: PYTHON (default: .venv/bin/python where `make install` made it, else a small venv in build/ with only
# what this script runs: numpy, scikit-image, pip), DEST (default .whl), TARGET_PYTHON (default 3.12), PLOT (default 1).
# Without the project's .venv the carried versions are the newest releases rather than the ones its tests passed with.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then
    PYTHON=.venv/bin/python
  else
    PYTHON=build/gpu-wheels-venv/bin/python
    if [ ! -x "$PYTHON" ]; then
      python3 -m venv build/gpu-wheels-venv
      "$PYTHON" -m pip install --quiet numpy scikit-image
    fi
  fi
fi
DEST=${DEST:-.whl}
TARGET_PYTHON=${TARGET_PYTHON:-3.12}
PLOT=${PLOT:-1}

# service/ (settings, artifact, HTTP API) and the plain-uvicorn server: pydantic, FastAPI and what they import
SERVICE=(pydantic pydantic-core pydantic-settings python-dotenv typing-inspection annotated-types typing-extensions
         fastapi annotated-doc opentelemetry-api starlette anyio python-multipart uvicorn click h11)
# benchmarks/harness/measure.py samples CPU use with psutil; the tests use pytest-timeout's marker; the GPU tests export a tiny
# model with torch's dynamo ONNX exporter, which needs onnxscript
CHECKS=(psutil pytest-timeout onnxscript onnx-ir ml-dtypes)
# the PNG figures
FIGURES=(matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil tzdata)
[ "$PLOT" = 1 ] || FIGURES=()

pinned() {  # "name==version" as installed in $PYTHON's environment, else the bare name (the newest release)
  "$PYTHON" - "$@" <<'PY'
import importlib.metadata as md, sys
for name in sys.argv[1:]:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(name)
PY
}

mkdir -p "$DEST"
rm -rf "$DEST"/*.whl "$DEST/site"  # site/: what a dry run here installed, built for this Python, not the GPU machine's
mapfile -t SPECS < <(pinned "${SERVICE[@]}" "${CHECKS[@]}" "${FIGURES[@]}")
"$PYTHON" -m pip download --quiet --only-binary=:all: --python-version "$TARGET_PYTHON" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --no-deps --dest "$DEST" "${SPECS[@]}"
"$PYTHON" -c "from benchmarks.gpu_check.packages import save_skimage_photos; save_skimage_photos('$DEST/skimage_photos.npz')"

du -b "$DEST"/*.whl "$DEST"/skimage_photos.npz | sort -n | awk '{printf "%8.2f MiB  %s\n", $1 / 1048576, $2}'
carried=$(du -cb "$DEST"/*.whl "$DEST"/skimage_photos.npz | tail -1 | cut -f1)
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
awk -v c="$carried" -v t="$tree" -v d="$DEST" 'BEGIN {
  printf "carry: %s %.1f MiB + working tree %.1f MiB = %.1f MiB (a device run takes 64 MiB in all)\n",
         d, c / 1048576, t / 1048576, (c + t) / 1048576 }'
