"""Where `vitserve predict` reads and writes: a local folder, or object storage through fsspec (s3://, gs://, az://
with the s3fs / gcsfs / adlfs extras, or any other fsspec protocol).

Images are streamed: listed once, then each file's bytes are read when its batch is decoded, never copied to disk
first. The output is ours and written a batch at a time, which object stores cannot append to, so a remote output is
kept in a local folder while the run writes it and uploaded whole every ``UPLOAD_EVERY_S`` and at the end (or on an
interruption); ``--resume`` downloads it first (the run's own files only). A pod that is lost loses at most the rows since the last upload.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from finetune.storage import Folder, filesystem, is_url  # noqa: F401 - predict's locations are finetune's

UPLOAD_EVERY_S = 30.0


class StagedOutput:
    """A remote OUTPUT (and everything written beside it: parts, summaries, reports) in a local folder while the
    run writes it. ``local`` is the path the run writes; :meth:`upload` copies every file of the folder back."""

    def __init__(self, url: str):
        self.url = url
        self.fs, remote = filesystem(url)
        self.remote_dir, self.name = remote.rstrip("/").rsplit("/", 1) if "/" in remote.rstrip("/") else ("", remote)
        self.dir = Path(tempfile.mkdtemp(prefix="vitserve-predict-"))
        self.local = self.dir / self.name
        self._last_upload = time.monotonic()

    def remote(self, name: str) -> str:
        return f"{self.remote_dir}/{name}" if self.remote_dir else name

    def download(self, names: list[str]) -> list[str]:
        """Those of ``names`` (files beside the output: itself, a shard's part, summaries, reports) that exist remotely,
        into the local folder, so --resume, --force, the refusal to overwrite and the merge see what is there."""
        found = [name for name in names if self.fs.exists(self.remote(name))]
        for name in found:
            self.fs.get_file(self.remote(name), str(self.dir / name))
        return found

    def upload(self, *, now: bool = True) -> None:
        if not now and time.monotonic() - self._last_upload < UPLOAD_EVERY_S:
            return
        for path in sorted(self.dir.iterdir()):
            if path.is_file():
                self.fs.put_file(str(path), self.remote(path.name))
        self._last_upload = time.monotonic()

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
