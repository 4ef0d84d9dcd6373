"""The hot path's metric updates are summed (service/metrics.py ``Tally``) and written in bulk: what /metrics shows
must be exactly what writing each update would have shown, in prometheus_client's multiprocess mode (the one BentoML
runs) and in its default mode, histogram buckets at their edges included."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.server import ROOT

# Runs in a fresh interpreter: prometheus_client picks multiprocess mode at import, from the environment.
SCRIPT = textwrap.dedent("""
    import asyncio, os, sys
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from service.metrics import LATENCY_BUCKETS, Tally

    def metrics(prefix):
        registry = CollectorRegistry()
        return registry, (
            Histogram(prefix + "_seconds", "h", ["protocol"], buckets=LATENCY_BUCKETS, registry=registry),
            Counter(prefix + "_requests", "c", ["protocol"], registry=registry),
            Gauge(prefix + "_in_flight", "g", registry=registry, multiprocess_mode="livesum"),
            Gauge(prefix + "_depth", "g", registry=registry, multiprocess_mode="livesum"),
        )

    # On an edge, between edges, below the first, above the last finite one, and zero.
    values = [0.0005, 0.0004, 0.002, 0.0021, 0.03, 0.03, 29.0, 30.0, 31.0, 1e9, 0.0, 0.0075]
    direct, (h, c, g, d) = metrics("direct")
    tallied, (th, tc, tg, td) = metrics("tally")
    tally = Tally()
    for i, v in enumerate(values):
        protocol = "json" if i % 3 else "grpc"
        h.labels(protocol).observe(v); tally.observe(th.labels(protocol), v)
        c.labels(protocol).inc(); tally.inc(tc.labels(protocol))
        g.inc(); tally.inc(tg)
        d.set(i); tally.set(td, i)
        if i % 2:
            g.dec(); tally.inc(tg, -1)

    async def flushed_by_the_timer():  # with a loop running, the timer writes what was recorded
        tally.inc(tc.labels("v2-http"), 5)
        await asyncio.sleep(Tally.FLUSH_S * 4)
    asyncio.run(flushed_by_the_timer())
    c.labels("v2-http").inc(5)

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        sys.stdout.write(generate_latest(registry).decode())
    else:  # one process: each registry holds its own values
        sys.stdout.write(generate_latest(direct).decode() + generate_latest(tallied).decode())
""")


def exposition(tmp_path, multiprocess: bool) -> dict[str, dict[str, float]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if multiprocess:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    series: dict[str, dict[str, float]] = {"direct": {}, "tally": {}}
    for line in out.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        if "_created" in name:
            continue
        for prefix in series:
            if name.startswith(prefix + "_"):
                series[prefix][name[len(prefix):]] = float(value)
    return series


def test_a_tally_writes_exactly_what_each_update_would_in_multiprocess_mode(tmp_path):
    series = exposition(tmp_path, multiprocess=True)
    assert series["direct"] and series["tally"] == series["direct"]
    assert series["tally"]['_seconds_bucket{le="0.0005",protocol="grpc"}'] == 1  # 0.0005 is in its own edge's bucket
    assert series["tally"]['_requests_total{protocol="v2-http"}'] == 5  # written by the loop's timer


def test_a_tally_writes_exactly_what_each_update_would_in_one_process(tmp_path):
    series = exposition(tmp_path, multiprocess=False)
    assert series["direct"] and series["tally"] == series["direct"]


def test_without_an_event_loop_a_tally_writes_at_once():
    from prometheus_client import CollectorRegistry, Counter

    from service.metrics import Tally

    counter = Counter("t_requests", "c", registry=CollectorRegistry())
    Tally().inc(counter, 3)  # no loop running in this thread: nothing would ever flush it later
    assert counter._value.get() == 3
