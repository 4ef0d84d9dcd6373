"""A load client for HTTP/1.1 that costs the machine little: pre-encoded requests over kept-alive connections."""

from __future__ import annotations

import asyncio
import re
import time
from urllib.parse import urlparse


class RawHttp:
    """POSTs of pre-encoded HTTP/1.1 requests over a pool of kept-alive connections, reading each answer's status.

    Hand-written rather than aiohttp or httpx: the load generator shares the server's 2 cores, and aiohttp took a
    third of a core at 320 requests/s, so at 5× it would have measured itself. This costs a few tens of µs per
    request under uvloop. Idle connections are reused for 15 s (aiohttp's default keep-alive), as SDKs and
    balancers hold them: a server that closes idle connections sooner races with their reuse."""

    def __init__(self, base: str, idle_expiry_s: float = 15.0):
        url = urlparse(base)
        self.host, self.port, self.idle_expiry_s = url.hostname, url.port, idle_expiry_s
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []

    def wire(self, body) -> bytes:
        head = (f"POST /classify HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {body.headers['content-type']}\r\n"
                f"Content-Length: {len(body.content)}\r\n\r\n")
        return head.encode() + body.content

    async def _connection(self):
        now = time.monotonic()
        while self.idle:
            reader, writer, used = self.idle.pop()
            if now - used < self.idle_expiry_s and not writer.is_closing():
                return reader, writer
            writer.close()
        return await asyncio.open_connection(self.host, self.port)

    async def post(self, wire: bytes, rec: dict, timeout_s: float) -> None:
        writer = None
        try:
            reader, writer = await self._connection()
            writer.write(wire)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
            await reader.readexactly(int(_CONTENT_LENGTH.search(head).group(1)))
            rec["status"] = head[9:12].decode()
            if b"retry-after" in head.lower():
                rec["retry_after"] = True
            if _CLOSE.search(head):
                writer.close()
            else:
                self.idle.append((reader, writer, time.monotonic()))
        except TimeoutError:
            rec["status"] = "client_timeout"
            writer and writer.close()
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:  # no HTTP answer: reset, disconnect
            rec["status"] = type(e).__name__
            writer and writer.close()
        rec["done"] = time.perf_counter()

    def close(self) -> None:
        for _, writer, _ in self.idle:
            writer.close()


_CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")
_CLOSE = re.compile(rb"(?i)\r\nconnection: *close")
