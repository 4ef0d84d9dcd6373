"""Prediction rows as CSV or JSONL (chosen by the output's suffix), written a batch at a time and read back.

One row per file: its path relative to IMAGES_DIR, the top-k labels and calibrated scores best first, and the
service's error (type and message) for a file that could not be scored. Scores are written at full precision
(Python's shortest round-trip repr), so a row read back is the row that was computed.

    CSV:   file,label_1,score_1,...,label_k,score_k,error       error = "invalid_image: <message>", or empty
    JSONL: {"file": ..., "top_k": [{"label": ..., "index": ..., "score": ...}, ...], "error": null}
           error = {"type": "invalid_image", "message": ...} as in the service's error body

Each batch's rows are flushed as soon as they are computed, so a killed run loses at most the batch in flight; the
line it was writing when killed has no newline yet, and :func:`drop_partial_line` cuts it off before a resume.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from finetune.config import UsageError
from service.topk import Prediction

FORMATS = (".csv", ".jsonl")


@dataclass(frozen=True)
class Row:
    file: str  # relative to IMAGES_DIR, POSIX separators
    top: tuple[Prediction, ...] = ()  # best first; empty when the file failed
    error_type: str = ""  # service/errors.py's type name, e.g. "invalid_image"
    error: str = ""  # the service's message

    @property
    def failed(self) -> bool:
        return bool(self.error_type)


def csv_columns(top_k: int) -> list[str]:
    ranked = [name for i in range(1, top_k + 1) for name in (f"label_{i}", f"score_{i}")]
    return ["file", *ranked, "error"]


def _csv_record(row: Row, top_k: int) -> list:
    cells: list = [row.file]
    for i in range(top_k):
        cells += [row.top[i].label, row.top[i].score] if i < len(row.top) else ["", ""]
    return cells + [f"{row.error_type}: {row.error}" if row.failed else ""]


def _json_record(row: Row) -> dict:
    error = {"type": row.error_type, "message": row.error} if row.failed else None
    return {"file": row.file, "top_k": [{"label": p.label, "index": p.index, "score": p.score} for p in row.top],
            "error": error}  # fmt: skip


class RowWriter:
    """Appends rows to the output (a CSV header first when the file is new) and flushes after each batch."""

    def __init__(self, path: Path, top_k: int):
        self.path, self.top_k, self.csv = path, top_k, path.suffix == ".csv"
        new = not path.exists() or path.stat().st_size == 0
        # surrogateescape: a file name that is not valid UTF-8 is written back as the bytes it was read as
        self._file = open(path, "a", newline="" if self.csv else None, encoding="utf-8", errors="surrogateescape")
        self._csv = csv.writer(self._file, lineterminator="\n") if self.csv else None
        if self.csv and new:
            self._csv.writerow(csv_columns(top_k))
            self._file.flush()

    def write(self, rows: list[Row]) -> None:
        for row in rows:
            if self._csv is not None:
                self._csv.writerow(_csv_record(row, self.top_k))
            else:
                self._file.write(json.dumps(_json_record(row), ensure_ascii=False) + "\n")
        self._file.flush()  # in the kernel's page cache now: a SIGKILL no longer loses it

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def drop_partial_line(path: Path) -> int:
    """Truncate ``path`` after its last newline: whatever follows was being written when the run was killed.
    Returns the number of bytes dropped."""
    with open(path, "r+b") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            f.truncate(keep)
        return len(data) - keep


def read_rows(path: Path, labels: list[str], top_k: int) -> list[Row]:
    """Every complete row of an output written by this command for an artifact with ``labels`` at ``top_k``.
    Raises UsageError for a file that is not one (another tool's, another artifact's, another --top-k)."""
    data = path.read_bytes()
    text = data[: data.rfind(b"\n") + 1].decode("utf-8", "surrogateescape")  # a half-written last line is not a row
    index = {name: i for i, name in enumerate(labels)}
    try:
        rows = _read_csv(text, top_k, index) if path.suffix == ".csv" else _read_jsonl(text, index)
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise UsageError(
            f"{path} was not written by `vitserve predict` with this artifact and --top-k {top_k} "
            f"({type(e).__name__}: {e}); use --force to overwrite it or another --output"
        ) from None
    if any(len(r.top) not in (0, top_k) for r in rows):
        raise UsageError(f"{path} holds rows with another number of predictions than --top-k {top_k}")
    return rows


def _read_csv(text: str, top_k: int, index: dict[str, int]) -> list[Row]:
    records = list(csv.reader(io.StringIO(text)))
    if not records:
        return []
    if records[0] != csv_columns(top_k):
        raise ValueError(f"its columns are {records[0][:3] + ['...']}, not those of --top-k {top_k}")
    rows = []
    for cells in records[1:]:
        if len(cells) != 2 * top_k + 2:
            raise ValueError(f"a row has {len(cells)} cells, not {2 * top_k + 2}")
        pairs = [(cells[1 + 2 * i], cells[2 + 2 * i]) for i in range(top_k)]
        top = tuple(Prediction(label, index[label], float(score)) for label, score in pairs if label)
        error_type, _, error = cells[-1].partition(": ")
        rows.append(Row(cells[0], top, error_type, error))
    return rows


def _read_jsonl(text: str, index: dict[str, int]) -> list[Row]:
    rows = []
    for line in text.split("\n")[:-1]:  # not splitlines(): it also splits at U+2028, which JSON leaves unescaped
        record = json.loads(line)
        top = tuple(Prediction(p["label"], index[p["label"]], float(p["score"])) for p in record["top_k"])
        error = record["error"] or {"type": "", "message": ""}
        rows.append(Row(record["file"], top, error["type"], error["message"]))
    return rows
