"""The real service (service.app:VitServe, its batcher, door, front-ends and metrics) with its real engine wrapped:
``bentoml serve tests.slowed_engine_app:VitServe``.

- ``VITSERVE_TEST_ENGINE_SLEEP_MS``: a fixed sleep per batch. It fixes the service's capacity (max batch ÷ sleep)
  whatever CPU runs the test, and costs no CPU, so a client on the same 2 cores can overload it without slowing it.
- ``VITSERVE_TEST_ENGINE_FAULT_FILE``: read before every batch; ``raise`` makes the call raise (as a CUDA or ONNX
  Runtime error would), ``hang`` makes it wait until the file says anything else, then answer; empty or missing:
  the engine's own answer. A test changes the file between requests to inject faults on command.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import service.engines as engines

_build_engine = engines.build_engine


class WrappedEngine:
    """Delegates everything to the engine it wraps; ``run`` sleeps and obeys the fault file first."""

    def __init__(self, engine, seconds: float, fault_file: Path | None):
        self._engine, self._seconds, self._fault_file = engine, seconds, fault_file

    def _fault(self) -> str:
        try:
            return self._fault_file.read_text().strip() if self._fault_file is not None else ""
        except FileNotFoundError:
            return ""

    def run(self, pixels):
        if self._seconds:
            time.sleep(self._seconds)
        if self._fault() == "raise":
            raise RuntimeError("injected engine failure (tests/slowed_engine_app.py)")
        while self._fault() == "hang":
            time.sleep(0.05)
        return self._engine.run(pixels)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def _wrapped_build_engine(*args, **kwargs):
    fault_file = os.environ.get("VITSERVE_TEST_ENGINE_FAULT_FILE")
    return WrappedEngine(_build_engine(*args, **kwargs), float(os.environ.get("VITSERVE_TEST_ENGINE_SLEEP_MS", "0")) / 1000,
                         Path(fault_file) if fault_file else None)


engines.build_engine = _wrapped_build_engine  # open_engine looks it up at call time

from service.app import VitServe  # noqa: E402,F401 - the service bentoml serves
