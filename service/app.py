"""The BentoML service: `bentoml serve service.app:VitServe` (or `vitserve serve`).

Startup reads top to bottom: settings → artifact verified → engine loaded → warmed at every batch
bucket → batcher started → ready. One worker per GPU; the batcher lives in that worker.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import bentoml

from service.settings import Settings

log = logging.getLogger("vitserve.service")
_settings = Settings()  # read once at import: the decorator below needs the timeout


def _current_classifier():
    return bentoml.get_current_service().classifier


def _make_http_app():
    from service.http_api import BodyLimit, create_app

    app = create_app(_current_classifier)
    app.add_middleware(BodyLimit, max_bytes=lambda: _settings.max_body_bytes)
    return app


@bentoml.service(
    name="vitserve",
    workers=1,  # one worker per GPU: the batcher, not extra processes, is what fills the device
    # BentoML's own per-request timeout stays above ours, so our 504 with a JSON body answers first.
    traffic={"timeout": _settings.request_timeout_s + 30},
)
@bentoml.asgi_app(_make_http_app(), path="/")
class VitServe:
    @bentoml.on_deployment
    def verify_artifact() -> None:
        """Runs once in the main process before any worker: a broken artifact stops `serve` with one clear
        message instead of workers crashing and being restarted forever."""
        from service.artifact import load_artifact

        load_artifact(Settings().artifact, verify=True)

    def __init__(self) -> None:
        logging.getLogger("vitserve").setLevel(logging.INFO)
        from service.classifier import Classifier

        self.settings = Settings()
        self.classifier = Classifier(self.settings)  # verifies, loads and warms the engine

    @bentoml.on_startup
    async def start_batcher(self) -> None:
        self.classifier.start()
        # On SIGTERM, drain *before* uvicorn hears of it: uvicorn stops accepting connections at once, so
        # handing it the signal first would leave new clients hanging instead of getting our 503. Order:
        # readiness → 503 and new requests → 503; wait until every accepted request is answered (or the
        # grace period ends); then uvicorn's own handler shuts the worker down. Replacing (rather than
        # wrapping) uvicorn's handler would hang shutdown.
        loop = asyncio.get_running_loop()
        uvicorn_handler = signal.getsignal(signal.SIGTERM)
        grace = self.settings.drain_s

        async def drain_then_exit(signum, frame) -> None:
            clf = self.classifier
            log.info("SIGTERM: draining %d queued images, %d requests in flight", clf.batcher.depth, clf.in_flight)
            clf.begin_drain()
            deadline = loop.time() + grace
            # Answer what was accepted, and keep answering newcomers 503 (with Connection: close) until they
            # stop coming: closing idle keep-alive connections under a client's feet is a dropped request.
            while not clf.drained(self.settings.drain_quiet_s) and loop.time() < deadline:
                await asyncio.sleep(0.02)
            log.info("drained (%d still in flight); stopping", clf.in_flight)
            if callable(uvicorn_handler):
                uvicorn_handler(signum, frame)

        def on_sigterm(signum, frame) -> None:
            if not self.classifier.draining:
                loop.call_soon_threadsafe(lambda: loop.create_task(drain_then_exit(signum, frame)))

        signal.signal(signal.SIGTERM, on_sigterm)

    @bentoml.on_shutdown
    async def drain(self) -> None:
        await self.classifier.stop(self.settings.drain_s)
        log.info("drained and stopped")

    def __is_ready__(self) -> bool:
        return self.classifier.ready
