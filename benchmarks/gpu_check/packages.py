"""What a bare GPU machine lacks, installed from the wheels carried in .whl/ into .whl/site (never over its torch)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.gpu_check.plan import PHOTOS_FILE, ROOT, SITE, WHEELS, tail_of


def wheel_fits(wheel: Path) -> bool:
    """Whether this Python and platform can install the wheel (gpu_wheels.sh fetches CPython 3.12 manylinux ones)."""
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    return bool(parse_wheel_filename(wheel.name)[3] & set(sys_tags()))


def wheel_wanted(wheel: Path) -> str | None:
    """Why a carried wheel must be installed here ("missing", "older x"), or None when this Python already has it."""
    from importlib import metadata

    from packaging.utils import parse_wheel_filename
    from packaging.version import Version

    dist, version, _, _ = parse_wheel_filename(wheel.name)
    try:
        have = metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "missing"
    return f"older {have}" if Version(have) < version else None


STAND_IN_INIT = '''"""Stand-in for scikit-image, written by benchmarks/gpu_check.py on a machine that cannot install it (it needs
scipy): only `skimage.data`, serving the photographs benchmarks/gpu_wheels.sh saved from the real package."""
'''


STAND_IN_DATA = '''"""The arrays the real `skimage.data` functions return, one function per photograph."""
from pathlib import Path as _Path

import numpy as _np

_ARRAYS = _np.load(_Path(__file__).with_name("photos.npz"))


def __getattr__(name):
    if name.startswith("_") or name not in _ARRAYS.files:
        raise AttributeError(f"the scikit-image stand-in has no photograph {name!r}")
    return lambda: _ARRAYS[name]
'''


def save_skimage_photos(path) -> Path:
    """The photographs export's parity images (export/gate_inputs.py) and the load test (benchmarks/photos.py) take from
    scikit-image, as the arrays ``skimage.data`` returns: for a machine that cannot install scikit-image."""
    from skimage import data

    from benchmarks.photos import COLOR_PHOTOS

    arrays = {}
    for name in sorted(set(_gate_photo_names()) | set(COLOR_PHOTOS)):
        try:
            arrays[name] = getattr(data, name)()
        except Exception:  # noqa: BLE001 - export's parity images skip a photograph its version lacks, so may we
            continue
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def _gate_photo_names() -> tuple[str, ...]:
    """export/gate_inputs.py's photograph names, read from its source: importing it needs torch, which the small venv
    of gpu_wheels.sh (for machines without the project's .venv) does not have."""
    import ast

    tree = ast.parse((ROOT / "export" / "gate_inputs.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "_SKIMAGE_PHOTOS")
    return ast.literal_eval(node.value)


def write_skimage_stand_in(photos: Path, site: Path) -> Path:
    package = site / "skimage"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(STAND_IN_INIT)
    (package / "data.py").write_text(STAND_IN_DATA)
    shutil.copy(photos, package / "photos.npz")
    return package


def prepare_packages(log=print) -> dict:
    """Make the carried wheels importable where this Python lacks them (pip --no-index --no-deps into .whl/site, first
    on sys.path and on every child's PYTHONPATH), and scikit-image's photographs where it lacks scikit-image. Runs
    before anything imports pydantic, FastAPI or scikit-image; never touches what is installed."""
    import importlib

    os.environ["PYTHONPATH"] = os.pathsep.join([str(SITE), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    sys.path[:0] = [str(SITE), str(ROOT)]
    wheels = sorted(WHEELS.glob("*.whl"))
    fitting = [w for w in wheels if wheel_fits(w)]
    wanted = {w: why for w in fitting if (why := wheel_wanted(w)) is not None}
    record: dict = {"wheels_dir": str(WHEELS), "site": str(SITE), "installed": {},
                    "already_here": [w.name for w in fitting if w not in wanted],
                    "not_for_this_python": [w.name for w in wheels if w not in fitting]}
    if wanted:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--upgrade", "--target", str(SITE), *map(str, wanted)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            record["installed"] = {w.name: why for w, why in wanted.items()}
            log(f"installed {len(wanted)} carried wheels into {SITE}: {', '.join(w.name.split('-')[0] for w in wanted)}")
        else:  # the steps that need them fail with their import error, recorded; the others still run
            record["error"] = f"pip could not install the carried wheels: {tail_of(proc.stderr, 2000)}"
            log(record["error"])
    importlib.invalidate_caches()
    photos = WHEELS / PHOTOS_FILE
    if importlib.util.find_spec("skimage") is None and photos.is_file():
        write_skimage_stand_in(photos, SITE)
        importlib.invalidate_caches()
        record["skimage"] = f"stand-in: scikit-image is not installed; its photographs come from {photos}"
        log(record["skimage"])
    return record


