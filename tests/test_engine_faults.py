"""A failing engine fails only its own requests, on a real `bentoml serve` of the service with its real engine wrapped
to raise or hang on command (tests/slowed_engine_app.py): a clear 500 from the error table for the batch that failed,
the next batch served; a hung call trips the watchdog, the replica turns not-ready and refuses with 503 until the call
returns, then serves again; failures in a row end liveness, so an orchestrator restarts the pod."""

from __future__ import annotations

import io
import os
import sys
import time

import httpx
import pytest
from PIL import Image

from benchmarks.harness.servers import ROOT, free_port, running
from tests.server import metric_value


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 90)).save(buf, format="JPEG")
    return buf.getvalue()


def classify(url: str, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{url}/classify", content=jpeg(), headers={"content-type": "image/jpeg"}, timeout=timeout)


def wait_for(predicate, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def faulty_server(tiny_artifact, tmp_path):
    fault = tmp_path / "fault"
    fault.write_text("")
    port = free_port()
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "True",
           "VITSERVE_ARTIFACT": str(tiny_artifact), "VITSERVE_GRPC_PORT": str(free_port()), "VITSERVE_DECODE_THREADS": "2",
           "VITSERVE_TEST_ENGINE_FAULT_FILE": str(fault), "VITSERVE_ENGINE_WATCHDOG_S": "1",
           "VITSERVE_ENGINE_FAILURES_BEFORE_RESTART": "3"}
    cmd = [sys.executable, "-m", "bentoml", "serve", "tests.slowed_engine_app:VitServe", "--working-dir", str(ROOT),
           "--host", "127.0.0.1", "--port", str(port)]
    with running("faulty", cmd, env, tmp_path, port) as server:
        yield server, fault


@pytest.mark.timeout(240)
def test_engine_faults_fail_only_their_batch_stall_then_recover_and_end_liveness(faulty_server):
    server, fault = faulty_server
    url = server.url
    assert classify(url).status_code == 200

    # An engine call that raises: that request gets the table's 500 with a clear message; the next one is served.
    fault.write_text("raise")
    r = classify(url)
    assert r.status_code == 500 and r.json()["error"]["type"] == "engine_failure"
    assert "inference failed: RuntimeError" in r.json()["error"]["message"]
    fault.write_text("")
    assert classify(url).status_code == 200
    assert httpx.get(f"{url}/livez").status_code == 200

    # An engine call that hangs: the watchdog (1 s) fails its request with a 500 that names it, the replica is not
    # ready and refuses new work with 503 before reading it, until the call returns; then it serves again.
    fault.write_text("hang")
    t0 = time.monotonic()
    r = classify(url)
    assert r.status_code == 500 and "watchdog" in r.json()["error"]["message"], r.text
    assert 0.9 <= time.monotonic() - t0 < 10
    assert httpx.get(f"{url}/readyz").status_code == 503
    refused = classify(url)
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "engine_stalled"
    assert int(refused.headers["retry-after"]) >= 1
    assert metric_value(httpx.get(f"{url}/metrics").text, "vitserve_engine_stalled") == 1
    fault.write_text("")  # the hung call returns
    assert wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200)
    assert classify(url).status_code == 200
    assert httpx.get(f"{url}/livez").status_code == 200  # one failure, then successes: alive

    # Failures in a row (VITSERVE_ENGINE_FAILURES_BEFORE_RESTART=3): /livez fails, for the orchestrator to restart us.
    fault.write_text("raise")
    assert [classify(url).status_code for _ in range(3)] == [500, 500, 500]
    assert httpx.get(f"{url}/livez").status_code >= 500
    text = httpx.get(f"{url}/metrics").text
    assert metric_value(text, "vitserve_engine_failures_total", kind="raised") == 4
    assert metric_value(text, "vitserve_engine_failures_total", kind="watchdog") == 1
    assert metric_value(text, "vitserve_requests_total", protocol="json", status="500") == 5
    assert metric_value(text, "vitserve_requests_total", protocol="json", status="503") == 1
