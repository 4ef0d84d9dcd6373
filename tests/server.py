"""Start the real `vitserve serve` (→ `bentoml serve`) on a free loopback port for a test, and always stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total


@contextmanager
def running_server(artifact: Path, tmp: Path, *, ready_timeout: float = 120, **settings):
    port = free_port()
    env = {
        **os.environ,
        "BENTOML_HOME": str(tmp / "bentoml_home"),  # its own metrics dir: servers never share one
        "BENTOML_DO_NOT_TRACK": "True",
        "VITSERVE_DECODE_THREADS": "2",
        **{f"VITSERVE_{k.upper()}": str(v) for k, v in settings.items()},
    }
    log = tmp / f"server-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "vitserve.py"), "serve", "--artifact", str(artifact),
             "--host", "127.0.0.1", "--port", str(port)],  # other settings travel as VITSERVE_* env vars
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} before ready:\n{server.output()[-4000:]}")
            try:
                if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {ready_timeout}s:\n{server.output()[-4000:]}")
            time.sleep(0.3)
        yield server
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # workers too, whatever state they are in
    except ProcessLookupError:
        pass
    proc.wait(10)
