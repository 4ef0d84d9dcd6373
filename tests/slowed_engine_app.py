"""The real service (service.app:VitServe, its batcher, door, front-ends and metrics) with its real engine slowed by
a fixed sleep per batch: ``bentoml serve tests.slowed_engine_app:VitServe``. The sleep fixes the service's capacity
(max batch ÷ sleep) whatever CPU runs the test, and costs no CPU, so a client on the same 2 cores can overload it
without slowing it. VITSERVE_TEST_ENGINE_SLEEP_MS sets the sleep."""

from __future__ import annotations

import os
import time

import service.engines as engines

_build_engine = engines.build_engine


class SlowedEngine:
    """Delegates everything to the engine it wraps; ``run`` sleeps first."""

    def __init__(self, engine, seconds: float):
        self._engine, self._seconds = engine, seconds

    def run(self, pixels):
        time.sleep(self._seconds)
        return self._engine.run(pixels)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def _slowed_build_engine(*args, **kwargs):
    return SlowedEngine(_build_engine(*args, **kwargs), float(os.environ["VITSERVE_TEST_ENGINE_SLEEP_MS"]) / 1000)


engines.build_engine = _slowed_build_engine  # open_engine looks it up at call time

from service.app import VitServe  # noqa: E402,F401 - the service bentoml serves
