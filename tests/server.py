"""The real `vitserve serve` on a free loopback port for a test. Start, poll /readyz, fail fast and always stop
are the benchmarks' runner (one implementation); this adds a /metrics reader."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import httpx

from benchmarks.harness.prometheus import parse_prometheus, total
from benchmarks.harness.servers import ROOT, free_port, running_vitserve, stop  # noqa: F401 - re-exported for tests


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return total(parse_prometheus(text), name, **labels)


@contextmanager
def running_server(artifact: Path, tmp: Path, *args: str, **settings):
    """Our service as users start it, configured by VITSERVE_* settings (and `vitserve serve` ``args``); the server
    has .url, .grpc_address, .proc, .metrics()."""
    settings.setdefault("decode_threads", 2)
    # These tests send bursts to check batching, errors and drains, not admission (tests/test_overload.py does): a
    # latency bound as long as the request timeout lets every burst queue, as it would on a service sized for it.
    settings.setdefault("max_latency_ms", 10_000)
    headers = {"authorization": f"Bearer {settings['api_keys'].split(',')[0]}"} if settings.get("api_keys") else {}
    with running_vitserve(artifact, tmp, *args, **settings) as server:
        server.metrics = lambda: httpx.get(f"{server.url}/metrics", headers=headers, timeout=10).text
        yield server
