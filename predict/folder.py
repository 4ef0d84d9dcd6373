"""IMAGES_DIR → the files to score, and each file's true label when the folder is laid out by class."""

from __future__ import annotations

from finetune.storage import list_files  # noqa: F401 - the listing predict and finetune share


def labels_by_folder(files: list[str], labels: list[str]) -> dict[str, int]:
    """file → label index, for the files that lie (at any depth) under a top-level folder named after a label:
    the layout `vitserve finetune` trains from. The folder is labelled when this covers every file."""
    index = {name: i for i, name in enumerate(labels)}
    top = {file: file.split("/", 1)[0] for file in files if "/" in file}
    return {file: index[name] for file, name in top.items() if name in index}
