"""Fashion-MNIST as image folders, the layout `vitserve finetune` reads.

The Debian package `dataset-fashion-mnist` ships the original idx files (Xiao, Rasul & Vollgraf 2017: 60,000 training
and 10,000 test 28x28 grayscale images, 10 classes). This turns them into

    OUT/train/<label>/<i>.png      OUT/test/<label>/<i>.png

with the official class names made filesystem-safe ("T-shirt/top" -> "T-shirt_top"). A subset takes the first N
images of each class in file order, so the same N always gives the same files.

    apt-get install -y dataset-fashion-mnist
    python -m demo.fashion_mnist --out data/fmnist                      # all 70,000 images, ~20 s
    python -m demo.fashion_mnist --out data/fm-small --per-class-train 50 --per-class-test 20
"""

from __future__ import annotations

import argparse
import gzip
import os
from pathlib import Path

import numpy as np
from PIL import Image

from service.cli import HelpFormatter

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")  # where the Debian package puts the idx files
APT_PACKAGE = "dataset-fashion-mnist"

# Official label order of the idx files; "/" and " " replaced so each name is a folder name.
CLASS_NAMES = (
    "T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot",
)  # fmt: skip

SPLITS = {  # split -> (images file, labels file)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def load_split(split: str, source: Path = DEFAULT_SOURCE) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 of one split, read from the idx files."""
    images_file, labels_file = (Path(source) / name for name in SPLITS[split])
    missing = [str(p) for p in (images_file, labels_file) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST idx files not found: {', '.join(missing)}. "
            f"Install the Debian package: apt-get install -y {APT_PACKAGE} (or pass --source DIR)."
        )
    with gzip.open(images_file, "rb") as f:
        raw = f.read()
    magic, n, rows, cols = (int.from_bytes(raw[i : i + 4], "big") for i in range(0, 16, 4))
    if magic != 2051:
        raise ValueError(f"{images_file}: not an idx3 image file (magic {magic})")
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(n, rows, cols)
    with gzip.open(labels_file, "rb") as f:
        raw = f.read()
    if int.from_bytes(raw[:4], "big") != 2049:
        raise ValueError(f"{labels_file}: not an idx1 label file")
    labels = np.frombuffer(raw, np.uint8, offset=8)
    if len(labels) != n:
        raise ValueError(f"{split}: {n} images but {len(labels)} labels")
    return images, labels


def first_per_class(labels: np.ndarray, per_class: int | None) -> np.ndarray:
    """Indices of the first `per_class` images of every class, in file order (all images when None)."""
    if per_class is None:
        return np.arange(len(labels))
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASS_NAMES))])
    return np.sort(keep)


def write_folders(
    out: str | os.PathLike,
    per_class_train: int | None = None,
    per_class_test: int | None = None,
    source: str | os.PathLike = DEFAULT_SOURCE,
) -> dict[str, int]:
    """Write OUT/{train,test}/<label>/<i>.png (i = index in the idx file); returns images written per split."""
    written = {}
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        images, labels = load_split(split, Path(source))
        for name in CLASS_NAMES:
            (Path(out) / split / name).mkdir(parents=True, exist_ok=True)
        keep = first_per_class(labels, per_class)
        for i in keep:
            path = Path(out) / split / CLASS_NAMES[labels[i]] / f"{i}.png"
            Image.fromarray(images[i], mode="L").save(path)  # grayscale; the loader converts to RGB
        written[split] = len(keep)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo.fashion_mnist",
        description="Convert the Debian Fashion-MNIST idx files into train/test image folders.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--out", required=True, help="output folder (gets train/ and test/)")
    parser.add_argument("--per-class-train", type=int, default=None, help="first N training images per class (all)")
    parser.add_argument("--per-class-test", type=int, default=None, help="first N test images per class (all)")
    parser.add_argument("--source", default=str(DEFAULT_SOURCE), help="folder holding the idx .gz files")
    args = parser.parse_args(argv)
    for flag in ("per_class_train", "per_class_test"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    try:
        written = write_folders(args.out, args.per_class_train, args.per_class_test, args.source)
    except FileNotFoundError as e:
        print(f"error: {e}")
        return 1
    print(f"wrote {written['train']} training and {written['test']} test images to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
