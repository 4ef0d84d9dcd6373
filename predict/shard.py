"""One folder scored by N workers: each takes a fixed share of the files and writes its own part; a merge makes one
output of the parts, checking that every file was scored exactly once.

The share is Kubernetes' own static assignment made deterministic over files: an Indexed Job gives each pod
``JOB_COMPLETION_INDEX`` (0..N-1), and file ``f`` belongs to the shard ``sha256(f) mod N``. A file's shard depends on
its path alone (not on listing order, the machine or how many files there are), so a pod that is restarted, or
re-run with ``--resume``, takes exactly the files it had, and no two shards ever take the same file.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from finetune.config import UsageError

INDEX_ENV = "JOB_COMPLETION_INDEX"  # set by Kubernetes in every pod of an Indexed Job
COUNT_ENV = "JOB_COMPLETIONS"  # set by our Job manifest to its spec.completions (Kubernetes does not pass it)


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def owns(self, file: str) -> bool:
        digest = hashlib.sha256(file.encode("utf-8", "surrogateescape")).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index

    def part(self, output: Path) -> Path:
        """Where this shard writes: preds.csv → preds.shard-00001-of-00003.csv (its reports beside it)."""
        return output.with_name(f"{output.stem}.shard-{self.index:05d}-of-{self.count:05d}{output.suffix}")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse(text: str) -> Shard:
    """``I/N`` (0 ≤ I < N) → Shard; argparse's ``type=``."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise UsageError(f"--shard {text!r}: expected I/N, e.g. 0/3 for the first of three")
    index, count = int(match.group(1)), int(match.group(2))
    if not 0 <= index < count:
        raise UsageError(f"--shard {text}: I must be between 0 and N-1")
    return Shard(index, count)


def from_environment(env=os.environ) -> Shard | None:
    """The shard of a pod in an Indexed Job (JOB_COMPLETION_INDEX and our JOB_COMPLETIONS), or None outside one."""
    if INDEX_ENV not in env:
        return None
    if COUNT_ENV not in env:
        raise UsageError(f"{INDEX_ENV} is set but {COUNT_ENV} is not: set it to the Job's spec.completions (or pass --shard I/N)")
    return parse(f"{env[INDEX_ENV]}/{env[COUNT_ENV]}")


def parts(output: Path, count: int) -> list[Path]:
    return [Shard(i, count).part(output) for i in range(count)]


def check_complete(files: list[str], rows_by_shard: list[list], count: int) -> list:
    """The rows of every shard as one list, after checking each row is its shard's and every file has exactly one.
    Raises UsageError naming the shards that are missing files (not finished: run them again with --resume)."""
    seen: dict[str, int] = {}
    for index, rows in enumerate(rows_by_shard):
        shard = Shard(index, count)
        for row in rows:
            if not shard.owns(row.file):
                raise UsageError(f"shard {shard} holds {row.file!r}, which belongs to another shard: parts of another split?")
            if row.file in seen:
                raise UsageError(f"{row.file!r} was scored twice (shard {seen[row.file]} and {index})")
            seen[row.file] = index
    missing: dict[int, int] = {}
    for file in files:
        if file not in seen:
            index = next(i for i in range(count) if Shard(i, count).owns(file))
            missing[index] = missing.get(index, 0) + 1
    if missing:
        unfinished = ", ".join(f"shard {i}/{count} lacks {n}" for i, n in sorted(missing.items()))
        raise UsageError(f"the parts are not complete ({unfinished}): run those shards again with --resume, then merge")
    return [row for rows in rows_by_shard for row in rows]
