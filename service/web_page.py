"""The service's own page at ``/``: try the model, read its card, watch it live (service/web/).

Four static files, read once, served before BentoML's stack (which would otherwise answer ``/`` with its stock page,
one that loads Google Tag Manager and badges from other hosts). Nothing on the page comes from another host, and the
Content-Security-Policy says so to the browser: scripts, styles and requests from this origin only, images from this
origin or the visitor's own files (blob:). The page is open without an API key; everything it shows comes from the
API (/info, /metrics, /classify), which asks for one when keys are on.
"""

from __future__ import annotations

from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

WEB = Path(__file__).with_name("web")
FILES = {  # path → (file, content type)
    "/": ("index.html", b"text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", b"text/javascript; charset=utf-8"),
    "/ui/app.css": ("app.css", b"text/css; charset=utf-8"),
    "/ui/icon.svg": ("icon.svg", b"image/svg+xml"),
    "/favicon.ico": ("icon.svg", b"image/svg+xml"),  # browsers ask for it whatever the page says
}
PATHS = frozenset(FILES)
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    b"form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)


class WebPage:
    """``GET``/``HEAD`` of the page's files; every other request goes on to ``app``."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self.files = {path: ((WEB / name).read_bytes(), kind) for path, (name, kind) in FILES.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in PATHS or scope["method"] not in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        body, kind = self.files[scope["path"]]
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", kind), (b"content-length", str(len(body)).encode()),
            (b"content-security-policy", CONTENT_SECURITY_POLICY), (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"), (b"cache-control", b"no-cache"),
        ]})
        await send({"type": "http.response.body", "body": body if scope["method"] == "GET" else b""})
