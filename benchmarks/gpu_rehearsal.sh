#!/usr/bin/env bash
# The GPU check's dry run as close to the GPU machine as this one gets (docs/verification.md "GPU check"):
#
#   bash benchmarks/gpu_rehearsal.sh        # → build/gpu-check-rehearsal/, the summary printed last
#
# - Python 3.12 (the device's python3 is 3.12.3; pyenv's 3.12 here, or PY312=/path/to/python3.12) in a venv of its own,
#   build/device-venv, holding the device image's versions of what the check touches (benchmarks/device_image.txt) and
#   none of what the image lacks: pydantic, FastAPI, uvicorn and BentoML come only from the carried wheels.
# - .whl/ made by gpu_wheels.sh as for a real call, and installed by the check itself into .whl/site, exactly as there.
# - Nothing stubbed: torch is PyPI's CUDA build (as the device's is) and sees no GPU, so every CUDA-only part skips with
#   its reason. Not covered: CUDA kernels, nvJPEG, TensorRT, ONNX Runtime's GPU providers, GPU memory, any timing, and
#   the device's sandbox (gVisor or Firecracker).
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=${PY312:-$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1 || true)}
PY312=${PY312:-$(command -v python3.12 || true)}
[ -n "$PY312" ] || { echo "no Python 3.12 here: set PY312=/path/to/python3.12" >&2; exit 2; }
VENV=build/device-venv
ABSENT=(pydantic pydantic-core pydantic-settings annotated-types typing-inspection tzdata python-dotenv fastapi starlette
        uvicorn python-multipart bentoml)
stamp=$(sha256sum benchmarks/device_image.txt | cut -c1-16)
if [ "$(cat "$VENV/.image" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$VENV"
  "$PY312" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r benchmarks/device_image.txt
  # What the requirements pulled in that the device image does not hold (its package list, KINDS.md): gone, so that
  # the carried wheels are the only way these reach the check, as there.
  "$VENV/bin/python" -m pip uninstall --quiet -y "${ABSENT[@]}" 2>/dev/null || true
  echo "$stamp" > "$VENV/.image"
fi
bash benchmarks/gpu_wheels.sh
rc=0
env -u PYTHONPATH PYTHONNOUSERSITE=1 PYTHONUNBUFFERED=1 BENTOML_DO_NOT_TRACK=True \
  "$VENV/bin/python" -m benchmarks.gpu_check --dry-run --out build/gpu-check-rehearsal "$@" || rc=$?
rm -rf .whl/site  # built for this venv's Python 3.12: a later check under another Python must not import it
exit $rc
