"""Our HTTP service without BentoML: the same app BentoML mounts (``service.http_api.make_http_app``) behind the same
guard (API key, body limit, the inference routes and their admission), on one Classifier, plus the three routes
BentoML would add (/readyz, /livez, /metrics). For hosts where BentoML is absent (the GPU check's machine) and for the
in-process test tier (tests/test_http_inprocess.py), which runs it under httpx without a server process.

    uvicorn service.standalone:app --factory --host 127.0.0.1 --port 3000      # settings from VITSERVE_*
"""

from __future__ import annotations

import contextlib


def app(settings=None):
    """The ASGI app (a uvicorn factory): loads and checks the engine now, starts the batcher in the lifespan."""
    import logging

    from fastapi import Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from service.classifier import Classifier
    from service.http_api import make_http_app
    from service.http_guard import guard
    from service.settings import Settings

    logging.getLogger("vitserve").setLevel(logging.INFO)
    settings = settings or Settings()
    classifier = Classifier(settings)  # verifies, loads, re-checks and warms the engine, as VitServe.__init__ does
    http = make_http_app(lambda: classifier)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        classifier.start()
        yield
        await classifier.stop(settings.drain_s)

    http.router.lifespan_context = lifespan
    http.add_api_route("/readyz", lambda: Response(status_code=200 if classifier.ready else 503), methods=["GET"])
    http.add_api_route("/livez", lambda: Response(status_code=200), methods=["GET"])
    http.add_api_route("/metrics", lambda: Response(generate_latest(), media_type=CONTENT_TYPE_LATEST), methods=["GET"])
    return guard(http, lambda: classifier, settings)  # API key, body size, admission: as in front of BentoML
