"""IMAGES_DIR → the files to score, and each file's true label when the folder is laid out by class."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def list_files(root: Path, exclude: Iterable[Path] = ()) -> list[str]:
    """Every file under ``root``, recursively, as sorted relative POSIX paths; hidden files and folders are left out,
    and so is anything in ``exclude`` (the run's own output when it is written inside the folder).

    Files are not filtered by extension: the service's decoder decides what is an image (a file named .jpg may be
    anything, and one without a suffix may be a PNG), and a file it refuses gets a row with the service's error.
    Symbolic links to folders are not followed (they can loop); a broken link to a file is listed and fails to read.
    """
    root = root.resolve()
    skip = {p.resolve() for p in exclude}
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            path = Path(folder, name)
            if name.startswith(".") or path in skip or not (path.is_file() or path.is_symlink()):
                continue  # not a regular file: a FIFO would block the read
            found.append(path.relative_to(root).as_posix())
    return sorted(found)


def labels_by_folder(files: list[str], labels: list[str]) -> dict[str, int]:
    """file → label index, for the files that lie (at any depth) under a top-level folder named after a label:
    the layout `vitserve finetune` trains from. The folder is labelled when this covers every file."""
    index = {name: i for i, name in enumerate(labels)}
    top = {file: file.split("/", 1)[0] for file in files if "/" in file}
    return {file: index[name] for file, name in top.items() if name in index}
