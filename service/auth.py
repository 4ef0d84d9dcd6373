"""Who may call: optional API keys, checked the same way for every front-end before any request body is read.

Keys come from ``VITSERVE_API_KEYS`` (``vitserve serve --api-key``): one key, several separated by commas, or
``@/path/to/file`` with one key per line (``#`` comments). HTTP clients send ``Authorization: Bearer <key>``, gRPC
clients the ``authorization`` metadata with the same value. A missing or wrong key is 401 / UNAUTHENTICATED from
the error table. Probes stay open (/livez, /readyz, /v2/health/*, grpc.health.v1); /metrics is open unless keys are
set (``VITSERVE_METRICS_OPEN`` decides either way). No keys configured = no checks: the default.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from service import metrics
from service.errors import Unauthenticated
from service.web_page import PATHS as PAGE_PATHS

# The page's files are open too: they hold no data (what the page shows comes from the API, which asks for the key).
OPEN_PATHS = frozenset({"/livez", "/readyz", "/v2/health/live", "/v2/health/ready"}) | PAGE_PATHS
OPEN_GRPC_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def load_keys(spec: str) -> list[str]:
    """``k1,k2`` or ``@file`` → the keys; an unreadable file or an empty result with a spec given is an error."""
    spec = spec.strip()
    if not spec:
        return []
    if spec.startswith("@"):
        path = Path(spec[1:])
        try:
            lines = path.read_text().splitlines()
        except OSError as e:
            raise ValueError(f"VITSERVE_API_KEYS names {path}, which cannot be read: {e}") from None
        keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    else:
        keys = [k.strip() for k in spec.split(",") if k.strip()]
    if not keys:
        raise ValueError("VITSERVE_API_KEYS is set but holds no key")
    return keys


class ApiKeys:
    def __init__(self, keys: list[str]):
        # Compare digests, not keys: equal lengths, so compare_digest's time says nothing about a key's length.
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> None:
        """Raise Unauthenticated unless ``authorization`` is "Bearer <one of the keys>". Constant time: every
        configured key is compared, whichever matches."""
        if not self._digests:
            return
        if not authorization:
            raise Unauthenticated("this server needs an API key: send 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.partition(" ")
        digest = hashlib.sha256(token.strip().encode()).digest()
        matched = False
        for d in self._digests:
            matched |= hmac.compare_digest(d, digest)
        if scheme.lower() != "bearer" or not matched:
            raise Unauthenticated("the API key is not valid")


class HttpAuth:
    """ASGI middleware around BentoML's whole app (so /metrics is covered too): refuse before the body is read."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, metrics_open: bool):
        self.app, self.keys, self.metrics_open = app, keys, metrics_open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not self.keys.enabled or path in OPEN_PATHS or (path == "/metrics" and self.metrics_open):
            return await self.app(scope, receive, send)
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        try:
            self.keys.check(header)
        except Unauthenticated as exc:
            from service.http_errors import error_response, protocol_of

            protocol = protocol_of(path)
            if scope.get("method") == "POST":  # a classification request refused: counted like any other answer
                metrics.record_outcome(protocol, exc, 0.0)
            response = error_response(exc, protocol)
            return await response(scope, receive, send)
        await self.app(scope, receive, send)
