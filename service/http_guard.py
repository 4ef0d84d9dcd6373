"""What every HTTP request meets first, before BentoML's middlewares and our routes: the API key, the body limit, the
inference routes (service/http_inference.py, with the door's admission); then a JSON 404 for paths no route matches."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.errors import InvalidParameter, NotFound, PayloadTooLarge
from service.http_errors import error_response, protocol_of

if TYPE_CHECKING:
    from service.classifier import Classifier


class BodyLimit:
    """Refuse bodies over ``max_bytes`` before reading them (Content-Length) or while streaming (chunked).

    BentoML and uvicorn set no body limit of their own, so without this a client could make us buffer anything.
    """

    def __init__(self, app: ASGIApp, max_bytes: Callable[[], int], protocol_of: Callable[[str], str]):
        self.app = app
        self.max_bytes = max_bytes
        self.protocol_of = protocol_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes()
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            exc = PayloadTooLarge(f"request body is {int(declared)} bytes; the limit is {limit}")
            metrics.record_outcome(self.protocol_of(scope["path"]), exc, 0.0)
            return await error_response(exc, self.protocol_of(scope["path"]))(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            return message

        await self.app(scope, counted, send)


TIMEOUT_HEADERS = (b"x-vitserve-timeout-ms", b"x-envoy-expected-rq-timeout-ms")  # ours, and what Envoy/Istio send upstream


def client_timeout_s(headers: dict[bytes, bytes]) -> float | None:
    """The client's own deadline, in seconds from now, from the first timeout header it sent (ASGI names, lower case)."""
    for name in TIMEOUT_HEADERS:
        value = headers.get(name)
        if value is not None:
            try:
                ms = float(value)
            except ValueError:
                raise InvalidParameter(f"{name.decode()} must be a number of milliseconds, got {value.decode(errors='replace')!r}") from None
            if not ms > 0:
                raise InvalidParameter(f"{name.decode()} must be positive, got {ms:g}")
            return ms / 1000
    return None


class JsonNotFound:
    """A path no app routes gets the error table's ``not_found`` in our JSON shape. BentoML answers such paths itself,
    in plain text (it mounts our app "passively": only paths one of our routes matches reach it). Not counted in the
    request metrics: a scanner's random paths would each become a series."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held = False

        async def sending(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] == 404 and \
                    dict(message.get("headers", [])).get(b"content-type", b"").startswith(b"text/plain"):
                held = True  # the framework's plain "Not Found": replaced by ours below
                return
            if held:
                if not message.get("more_body"):
                    exc = NotFound(f"no route {scope['method']} {scope['path']}")
                    await error_response(exc, protocol_of(scope["path"]))(scope, receive, send)
                return
            await send(message)

        await self.app(scope, receive, sending)


def guard(app: ASGIApp, get_classifier: Callable[[], Classifier], settings) -> ASGIApp:
    """What every HTTP request meets first, cheapest refusals first: the API key (when keys are set), the body limit,
    then either the inference routes (service/http_inference.py: the door's admission, the whole request) or, for
    every other path, BentoML's app with our JSON 404. Wrapped around the *whole* server app (BentoML's
    middlewares included), so an inference request costs none of the stack behind it, and a refused one a header
    parse: under overload on a model whose HTTP handling is the bottleneck, refusals are most of the traffic."""
    from service.auth import ApiKeys, HttpAuth
    from service.http_inference import InferenceRoutes

    from service.web_page import WebPage

    inner = BodyLimit(InferenceRoutes(WebPage(JsonNotFound(app)), get_classifier), max_bytes=lambda: settings.max_body_bytes,
                      protocol_of=protocol_of)
    keys = ApiKeys(settings.keys)
    return HttpAuth(inner, keys=keys, metrics_open=settings.metrics_public) if keys.enabled else inner
