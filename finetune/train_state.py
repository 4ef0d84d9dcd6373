"""Crash-safe files: atomic folders and the training state that --resume continues from.

A folder is written as `.NAME.tmp/`, every file fsynced, then swapped in with two renames
(NAME -> .NAME.old, .NAME.tmp -> NAME). A process killed at any point (SIGKILL included) leaves either the old
or the new folder complete; `recover()` finishes an interrupted swap at the next start.

The training state (RUN_DIR/train_state/) is tensors.safetensors (model, optimizer tensors, RNG states) and
state.json (everything else: step, epoch, position in the epoch, scheduler, history). Nothing is pickled: nested
Python structures are stored as JSON with {"__tensor__": key} placeholders for their tensors.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

STATE_DIR = "train_state"


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover(target: Path) -> None:
    """Finish or undo a swap that a killed process left half done; drop stale temporary folders."""
    target = Path(target)
    old, tmp = target.with_name(f".{target.name}.old"), target.with_name(f".{target.name}.tmp")
    if not target.exists() and old.exists():
        os.replace(old, target)  # killed between the two renames: the old folder is complete
    for leftover in (old, tmp):
        if leftover.exists():
            shutil.rmtree(leftover)


def write_dir_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_folder), then replace `target` by it in a way that survives being killed at any point."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp, old = target.with_name(f".{target.name}.tmp"), target.with_name(f".{target.name}.old")
    tmp.mkdir()
    write(tmp)
    _fsync_tree(tmp)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    if old.exists():
        shutil.rmtree(old)


def write_json_atomically(path: Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- nested structures with tensors <-> (JSON, safetensors) ----------------------------------------------------


def split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list/tuple by {"__tensor__": key}, collecting it in `tensors`.
    Dicts become {"__dict__": [[key, value], ...]} so integer keys (optimizer state) survive JSON."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[k, split_tensors(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} in a training state")


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: join_tensors(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def save_state(run_dir: Path, state: dict) -> None:
    """Atomically write RUN_DIR/train_state/ from a nested dict of tensors and JSON values."""
    tensors: dict[str, torch.Tensor] = {}
    meta = split_tensors(state, "s", tensors)

    def write(folder: Path) -> None:
        save_file(tensors, folder / "tensors.safetensors")
        with open(folder / "state.json", "w") as f:
            json.dump(meta, f)

    write_dir_atomically(Path(run_dir) / STATE_DIR, write)


def load_state(run_dir: Path) -> dict | None:
    """The last training state of a run folder, or None when it has none."""
    folder = Path(run_dir) / STATE_DIR
    recover(folder)
    if not (folder / "state.json").exists():
        return None
    tensors = load_file(folder / "tensors.safetensors")
    with open(folder / "state.json") as f:
        return join_tensors(json.load(f), tensors)
