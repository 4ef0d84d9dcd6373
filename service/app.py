"""The BentoML service: `bentoml serve service.app:VitServe` (or `vitserve serve`).

Startup reads top to bottom: settings → artifact verified → engine loaded → warmed at every batch
bucket → batcher started → ready. One worker per GPU; the batcher lives in that worker.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import bentoml

from service.http_header_deadline import install as install_header_deadline
from service.settings import Settings

log = logging.getLogger("vitserve.service")
_settings = Settings()  # read once at import: the decorator below needs the timeout
# uvicorn formats an access-log call for every response whenever "uvicorn.access" has a handler, and through the root
# logger BentoML configures it always has one, though at WARNING level nothing is ever written: a few µs per answer
# and per refusal for nothing. BentoML's own access log (``access_log`` above) is a different logger.
logging.getLogger("uvicorn.access").propagate = False
REFUSAL_FILE_ENV = "VITSERVE_REFUSAL_FILE"
ENGINE_SOCKET_ENV = "VITSERVE_ENGINE_SOCKET"  # set by the deployment hook for the workers when there are several


def _exit_2_if_a_worker_refused() -> None:
    """Main process, at exit: a worker that refused to serve (see VitServe.__init__) makes `bentoml serve` (and so
    `vitserve serve`) exit 2 with its reason, instead of 0."""
    path = os.environ.get(REFUSAL_FILE_ENV)
    if path and Path(path).is_file() and (reason := Path(path).read_text().strip()):
        print(f"vitserve: refusing to serve: {reason}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)


def _refuse_to_serve(reason: str) -> None:
    """Worker: a startup failure no restart can fix (the artifact, or no engine that passes its check here). Record
    it, stop the whole server, and wait to be stopped: raising instead would make the process supervisor restart
    this worker forever outside a container (BentoML respawns workers there)."""
    log.error("refusing to serve: %s", reason)
    if path := os.environ.get(REFUSAL_FILE_ENV):
        Path(path).write_text(reason + "\n")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the arbiter's stop must end this process at once
    os.kill(os.getppid(), signal.SIGTERM)  # the BentoML arbiter: it stops every worker, then exits
    time.sleep(60)
    os._exit(2)


# Resolved once: bentoml's top-level names go through a module __getattr__ (an import_module per access, ~2 µs), and
# every HTTP request asks for the classifier once or twice.
_get_current_service = bentoml.get_current_service


def _current_classifier():
    return _get_current_service().classifier


def _make_http_app():
    from service.http_api import make_http_app

    return make_http_app(_current_classifier)


def _start_engine_process() -> None:
    """Several workers: one engine process (service/engine_process.py) owns the engine and its batcher, and every
    worker is a front-end that reaches it over a Unix socket. Started here, in BentoML's main process before any
    worker, so there is exactly one; stopped at exit, after the workers have drained through it."""
    import subprocess

    from bentoml._internal.configuration.containers import BentoMLContainer

    from service.settings import PROJECT_ROOT

    path = Path(tempfile.mkdtemp(prefix="vitserve-engine-")) / "engine.sock"
    # BentoML merges every process's metric files in this directory at /metrics: the batcher's metrics live here.
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(BentoMLContainer.prometheus_multiproc_dir.get())}
    proc = subprocess.Popen([sys.executable, "-m", "service.engine_process", str(path)], cwd=PROJECT_ROOT, env=env)
    os.environ[ENGINE_SOCKET_ENV] = str(path)

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(_settings.grace_period_s + 5)
            except subprocess.TimeoutExpired:
                proc.kill()

    atexit.register(stop)


@bentoml.service(
    name="vitserve",
    # 1: one process does everything, the batcher in it. More: that many front-end processes (HTTP, gRPC, auth,
    # admission, decode) feeding one engine process with the one batcher (service/engine_process.py).
    workers=_settings.workers,
    # BentoML's own per-request timeout stays above ours, so our 504 with a JSON body answers first.
    traffic={"timeout": _settings.request_timeout_s + 30},
    # Off unless asked for: at 2x overload on the demo model BentoML's per-request OpenTelemetry middleware (it runs
    # even at sample rate 0) and access log took ~20 % of the worker's CPU, paid by refused requests as much as by
    # answered ones; the vitserve_* metrics count and time every request anyway.
    logging={"access": {"enabled": _settings.access_log}},
    tracing={} if _settings.tracing else {"excluded_urls": [".*"]},
)
@bentoml.asgi_app(_make_http_app(), path="/")
class VitServe:
    @bentoml.on_deployment
    def verify_artifact() -> None:
        """Runs once in the main process before any worker: a broken artifact stops `serve` with one clear
        message instead of workers crashing and being restarted forever. Workers inherit the refusal file's path."""
        from service.artifact import load_artifact

        load_artifact(Settings().artifact, verify=True)
        os.environ[REFUSAL_FILE_ENV] = str(Path(tempfile.mkdtemp(prefix="vitserve-")) / "refused")
        atexit.register(_exit_2_if_a_worker_refused)
        if _settings.workers > 1:
            _start_engine_process()

    def __init__(self) -> None:
        logging.getLogger("vitserve").setLevel(logging.INFO)
        from service.artifact import ArtifactError
        from service.classifier import Classifier
        from service.engines import EngineRefused

        self.settings = Settings()
        try:
            # Verifies, loads, re-checks and warms the engine; or, one of several workers, attaches to the engine process.
            self.classifier = Classifier(self.settings, engine_socket=os.environ.get(ENGINE_SOCKET_ENV))
        except (ArtifactError, EngineRefused) as e:
            _refuse_to_serve(str(e))

    @bentoml.on_startup
    async def start_batcher(self) -> None:
        # Everything loaded so far (libraries, the engine, ~200k objects) lives as long as the process: freeze it out
        # of the garbage collector's view. Otherwise each full collection walked it all, stopping every thread for
        # 150-350 ms every few seconds under load: the served p99 at the demo's saturation was that pause.
        gc.collect()
        gc.freeze()
        self.classifier.start()
        from service import http_refusal
        from service.http_inference import early_refusal

        http_refusal.REFUSE = early_refusal(lambda: self.classifier)  # overload answered below ASGI from now on
        self.grpc = None
        if self.settings.grpc_port:  # on this worker's loop: gRPC requests join the same batches as HTTP ones
            from service.auth import ApiKeys
            from service.grpc_api import GrpcFrontEnd

            try:
                self.grpc = GrpcFrontEnd(self.classifier, self.settings, ApiKeys(self.settings.keys))
                await self.grpc.start()
            except (RuntimeError, OSError) as e:
                _refuse_to_serve(f"gRPC front-end: {e}")
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
            if self.grpc is not None:
                await self.grpc.begin_drain()  # health NOT_SERVING; new calls get UNAVAILABLE from the classifier
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
        if getattr(self, "grpc", None) is not None:
            await self.grpc.stop(grace_s=1.0)  # already drained: only closes connections
        await self.classifier.stop(self.settings.drain_s)
        log.info("drained and stopped")

    def __is_ready__(self) -> bool:
        return self.classifier.ready

    def __is_alive__(self) -> bool:
        """/livez: false once the engine failed too many calls in a row or stayed stalled past its limit
        (VITSERVE_ENGINE_FAILURES_BEFORE_RESTART, VITSERVE_ENGINE_STALLED_RESTART_S): the orchestrator restarts us."""
        return self.classifier.alive


# ---- BentoML-specific workarounds (tests/test_bentoml_internals.py fails if what they rely on changes) ----------------
# 1. _serve_behind_the_guard: our guard outside BentoML's middlewares, by wrapping the class's to_asgi.
# 2. _refuse_to_serve / _exit_2_if_a_worker_refused: a worker stops the arbiter (its parent) and the exit code says why.
# 3. start_batcher's SIGTERM handler: our drain runs before uvicorn's shutdown.
# 4. install_header_deadline: uvicorn's "auto" HTTP protocol with a header timer (service/http_header_deadline.py).
def _serve_behind_the_guard() -> None:
    """Every HTTP request meets service.http_guard.guard (API key, body size, admission) before BentoML's own
    middlewares (its request metrics, timeout, tracing, context): BentoML offers middlewares only inside those, so the
    app it builds for this service is wrapped where it is built. Refusals under overload then cost a header parse."""
    from service.http_guard import guard

    build = type(VitServe).to_asgi

    def to_asgi(self, is_main: bool = True):
        app = build(self, is_main)
        return guard(app, _current_classifier, _settings) if self is VitServe else app

    type(VitServe).to_asgi = to_asgi


_serve_behind_the_guard()
# Slow request headers are cut off below ASGI, in uvicorn's protocol (service/http_header_deadline.py); slow bodies in
# the inference routes (service/http_inference.py read_body).
install_header_deadline(_settings.header_timeout_s)
