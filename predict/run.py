"""The service's own path from bytes to top-k, driven over a list of files instead of HTTP requests.

The engine comes from the service's :class:`~service.classifier.Classifier`, built as `vitserve serve` builds it:
checksum, load, startup check on this machine (``auto`` falls through to the next engine), the CPU budget's thread
plan, the batch size the engine is fastest at on this CPU (or ``--batch-size``), warm-up. Only its HTTP batcher is
left out: here the batches are simply consecutive files.

    file bytes → Preprocessor.from_bytes (decode pool sized by the CPU budget, taking turns with a CPU engine)
               → engine.run on (B, 3, H, W) → softmax at the manifest's temperature, top-k with labels (service.topk)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from finetune.config import UsageError
from predict.output import Row
from service.errors import EngineFailure, ServiceError

# Batches being decoded while the engine runs the current one: one keeps the engine fed (decodes run in its gaps
# under the CPU gate); more would only hold decoded tensors in memory.
DECODE_AHEAD = 1


class UnreadableFile(ServiceError):
    """The file could not be read from disk (permissions, a broken link): the one error the service cannot see."""

    type = "unreadable_file"


def settings_for(artifact: Path, engine: str, *, batch_size: int | None, startup_check: bool, max_image_pixels: int):
    """The service's Settings for these options (the rest from VITSERVE_* variables, as for `vitserve serve`)."""
    from service.settings import Settings

    try:
        return Settings(artifact=artifact, engine=engine, max_batch_size=batch_size, startup_check=startup_check,
                        max_image_pixels=max_image_pixels)  # fmt: skip
    except ValueError as e:  # pydantic's ValidationError, from an option or a VITSERVE_* variable
        raise UsageError(str(e)) from None


def open_classifier(settings):
    """The service's Classifier; UsageError when the artifact or the engine cannot serve on this machine."""
    from service.artifact import ArtifactError
    from service.classifier import Classifier
    from service.engines import EngineRefused

    try:
        return Classifier(settings)
    except (ArtifactError, EngineRefused) as e:
        raise UsageError(str(e)) from None


def _decode(clf, read: Callable[[str], bytes], file: str) -> np.ndarray | ServiceError:
    """(3, H, W) float32 exactly as the service decodes a request's image, or the error it would answer."""
    try:
        data = read(file)  # outside the gate: waiting on the disk or network does not hold the CPU from the engine
    except OSError as e:
        return UnreadableFile(f"cannot read the file: {e.strerror or e}")
    try:
        return clf.decode(data)[0]
    except ServiceError as e:
        return e
    except Exception as e:  # noqa: BLE001 - one bad file gets its row; the run goes on
        return ServiceError(f"{type(e).__name__}: {e}")


def _rows(clf, files: list[str], decoded: list[np.ndarray | ServiceError], top_k: int) -> list[Row]:
    from service.topk import predictions

    ok = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
    top: dict[int, list] = {}
    if ok:
        try:
            logits = clf.run_batch(np.stack([decoded[i] for i in ok]))  # (B, 3, H, W) → (B, L)
            m = clf.manifest
            top = dict(zip(ok, predictions(logits, m.labels, temperature=m.temperature, k=top_k)))
        except Exception as e:  # noqa: BLE001 - as the service: the batch's images fail, the next batch runs
            failure = EngineFailure(f"inference failed: {type(e).__name__}: {e}")
            decoded = [failure if i in ok else d for i, d in enumerate(decoded)]
    return [
        Row(file, tuple(top[i])) if i in top else Row(file, error_type=decoded[i].type, error=decoded[i].message)
        for i, file in enumerate(files)
    ]


def score(clf, read: Callable[[str], bytes], files: list[str], top_k: int) -> Iterator[list[Row]]:
    """Rows for ``files`` (their bytes from ``read``), one list per engine batch of ``clf.max_batch_size``, in order.
    The next batch decodes in the pool while the engine runs this one."""
    size = clf.max_batch_size
    batches = [files[i : i + size] for i in range(0, len(files), size)]
    pool = ThreadPoolExecutor(clf.threads.decode_threads, thread_name_prefix="predict-decode")
    queued: deque[list[Future]] = deque()
    try:
        for i, batch in enumerate(batches):
            for ahead in batches[i + len(queued) : i + 1 + DECODE_AHEAD]:
                queued.append([pool.submit(_decode, clf, read, file) for file in ahead])
            decoded = [f.result() for f in queued.popleft()]
            yield _rows(clf, batch, decoded, top_k)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C: drop queued decodes, finish the running ones
