"""A folder of files where `vitserve finetune` and `vitserve predict` read images: a local path, or object storage
through fsspec (s3://, gs://, az:// with the s3fs / gcsfs / adlfs extras, or any other fsspec protocol). Files are
listed once and each one's bytes read when it is needed (a data-loader item, a predict batch): streamed, never
copied to disk first.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from finetune.config import UsageError


def is_url(location: str) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def filesystem(url: str):
    try:
        import fsspec
    except ImportError:
        raise UsageError(f"{url}: reading or writing URLs needs fsspec: pip install 'vitserve[storage]'") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:  # a protocol whose package is missing (s3fs, gcsfs, adlfs), or unknown
        raise UsageError(f"{url}: {e}") from None


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


class Folder:
    """A folder of files, local or remote: its files (relative POSIX paths, hidden ones left out), its subfolders,
    and each file's bytes, read when asked (streamed, never copied first)."""

    def __init__(self, location: str | Path):
        self.location = str(location)
        if is_url(self.location):
            self.fs, self.root = filesystem(self.location)
            self.root = self.root.rstrip("/")
        else:
            self.fs, self.root = None, Path(location)

    def exists(self) -> bool:
        return self.root.is_dir() if self.fs is None else self.fs.isdir(self.root)

    def describe(self) -> str:
        return str(self.root.resolve()) if self.fs is None else self.location

    def __str__(self) -> str:
        return self.location

    def subfolders(self) -> list[str]:
        """Names of the folder's immediate subfolders, hidden ones left out, sorted."""
        if self.fs is None:
            names = [p.name for p in self.root.iterdir() if p.is_dir()]
        else:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False) if self.fs.isdir(p)]
        return sorted(n for n in names if not n.startswith("."))

    def files(self, exclude: list[Path], exclude_remote: list[str] = ()) -> list[str]:
        if self.fs is None:
            return list_files(self.root, exclude=exclude)
        skip = {p.rstrip("/") for p in exclude_remote}
        found = []
        for path in self.fs.find(self.root, withdirs=False):
            rel = path[len(self.root) + 1 :]
            if path in skip or any(part.startswith(".") for part in rel.split("/")):
                continue
            found.append(rel)
        return sorted(found)

    def read(self, file: str) -> bytes:
        """One file's bytes (OSError when it cannot be read: the file gets an unreadable_file row)."""
        if self.fs is None:
            return (self.root / file).read_bytes()
        try:
            return self.fs.cat_file(f"{self.root}/{file}")
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - a network or permission error is this file's, not the run's
            raise OSError(f"{type(e).__name__}: {e}") from None
