"""What service/app.py and service/http_header_deadline.py rely on inside BentoML and uvicorn, checked directly, so a
library upgrade that changes one fails here by name instead of as a slower door or an unbounded slow client.

The workarounds (one labelled section each in those files): the guard is wrapped around the app BentoML builds by
replacing the service class's ``to_asgi`` (BentoML's middlewares can only be added inside its own); a worker that
must refuse to serve signals its parent, BentoML's arbiter; SIGTERM is taken over in the worker's startup hook so
the drain runs before uvicorn hears of it; uvicorn's ``http="auto"`` protocol is replaced to add a header deadline.
"""

from __future__ import annotations

import inspect


def test_the_service_class_builds_its_app_through_to_asgi_and_ours_is_the_outer_layer():
    from service.app import VitServe
    from service.http_guard import BodyLimit

    signature = inspect.signature(type(VitServe).to_asgi)
    assert list(signature.parameters)[:2] == ["self", "is_main"], signature
    assert type(VitServe).to_asgi.__qualname__.endswith("_serve_behind_the_guard.<locals>.to_asgi")  # our wrapper
    app = VitServe.to_asgi(is_main=True)
    assert isinstance(app, BodyLimit), type(app)  # what uvicorn is given: the guard, with BentoML's stack inside


def test_the_hooks_and_the_current_service_accessor_exist():
    import bentoml

    for name in ("on_deployment", "on_startup", "on_shutdown", "asgi_app", "get_current_service"):
        assert callable(getattr(bentoml, name, None)), name
    from service.app import VitServe

    assert VitServe.inner.__is_ready__ and VitServe.inner.__is_alive__  # BentoML's readiness and liveness hooks


def test_a_worker_is_bentomls_worker_module_under_an_arbiter():
    """_refuse_to_serve stops the server by signalling the worker's parent: the worker module must still be started
    by BentoML's process manager (circus's arbiter), as `bentoml serve` does today."""
    import _bentoml_impl.worker.service as worker
    from bentoml._internal.utils import circus as bentoml_circus  # noqa: F401 - the arbiter BentoML starts workers with

    source = inspect.getsource(worker)
    assert "uvicorn" in source and "def main" in source


def test_uvicorn_resolves_http_auto_from_the_module_attribute_we_replace():
    import uvicorn.config
    import uvicorn.protocols.http.auto as auto
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from service.http_header_deadline import install

    assert uvicorn.config.HTTP_PROTOCOLS["auto"] == "uvicorn.protocols.http.auto:AutoHTTPProtocol"
    assert install(5.0)
    assert issubclass(auto.AutoHTTPProtocol, HttpToolsProtocol)
    assert [c.__name__ for c in auto.AutoHTTPProtocol.__mro__[:2]] == ["EarlyRefusalHeaderDeadlineHttpToolsProtocol", "HeaderDeadlineHttpToolsProtocol"]
    # what service/http_refusal.py overrides: uvicorn's one place where a parsed request becomes a task
    assert "_start_asgi_task" in vars(HttpToolsProtocol) and "self._start_asgi_task(self.cycle, app)" in inspect.getsource(HttpToolsProtocol.on_headers_complete)
    for hook in ("connection_made", "on_message_begin", "on_headers_complete", "connection_lost"):
        assert hook in vars(HttpToolsProtocol), hook  # the methods the deadline wraps are uvicorn's own, by name
