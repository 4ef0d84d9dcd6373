"""Start a BentoML service (ours or a peer) on a free loopback port, wait until it is ready, and always stop it.

The same approach as the test suite's server fixture: its own BENTOML_HOME (so no two servers share a
Prometheus multiprocess directory), readiness by polling /readyz, fail fast if the process exits, and on exit
SIGTERM then SIGKILL to the whole process group (BentoML's workers included).
"""

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

ROOT = Path(__file__).resolve().parents[2]

PEER_TARGETS = {
    "bentoml-batching": "benchmarks.peers.bentoml_batching:IdiomaticVit",
    "naive-pipeline": "benchmarks.peers.naive_pipeline:NaiveVit",
}


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def bypass_proxies_for_loopback(environ=os.environ) -> None:
    """Add the loopback hosts to NO_PROXY (and no_proxy): httpx, requests and gRPC honour HTTP(S)_PROXY even for
    127.0.0.1, so on a machine with a proxy configured every local server would be reached through it, or not at all.
    Children started afterwards (pytest, servers, exporters) inherit it."""
    for key in ("NO_PROXY", "no_proxy"):
        have = [h.strip() for h in environ.get(key, "").split(",") if h.strip()]
        environ[key] = ",".join(have + [h for h in LOOPBACK_HOSTS if h not in have])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, proc: subprocess.Popen, url: str, log: Path):
        self.name, self.proc, self.url, self.log = name, proc, url, log

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _base_env(workdir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "BENTOML_HOME": str(workdir / "bentoml_home"),
        "BENTOML_DO_NOT_TRACK": "True",
        "PYTHONUNBUFFERED": "1",
    }


@contextmanager
def running(name: str, cmd: list[str], env: dict[str, str], workdir: Path, port: int, ready_timeout: float = 300,
            ready_path: str = "/readyz"):
    """Start ``cmd``, wait for ``ready_path`` to answer 200, yield the server, always stop it. A start that fails with
    "Address already in use" is retried once: BentoML's process manager picks its own internal ports the way
    ``free_port`` does (bind to 0, release, bind again later), so another process starting meanwhile can take one
    first (seen once in a CI run: its ZeroMQ endpoint)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for attempt in (1, 2):
        try:
            server = _start(name, cmd, env, workdir, port, ready_timeout, ready_path, attempt)
            break
        except _PortTaken:
            if attempt == 2:
                raise
    try:
        yield server
    finally:
        stop(server.proc)


class _PortTaken(RuntimeError):
    pass


def _start(name: str, cmd: list[str], env: dict[str, str], workdir: Path, port: int, ready_timeout: float,
           ready_path: str, attempt: int) -> Server:
    log = workdir / (f"{name}-{port}.log" if attempt == 1 else f"{name}-{port}-{attempt}.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(name, proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                output = server.output()
                error = _PortTaken if "Address already in use" in output else RuntimeError
                raise error(f"{name} exited with {proc.returncode} before ready:\n{output[-4000:]}")
            try:
                if httpx.get(f"{server.url}{ready_path}", timeout=2, trust_env=False).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after {ready_timeout}s:\n{server.output()[-4000:]}")
            time.sleep(0.3)
    except BaseException:
        stop(proc)
        raise


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


@contextmanager
def running_vitserve(artifact: Path, workdir: Path, *args: str, cpus: str | None = None, ready_timeout: float = 300, **settings):
    """Our service exactly as users start it: `vitserve serve` (→ `bentoml serve service.app:VitServe`), on free HTTP
    and gRPC ports (the server gets ``.grpc_address``). Extra ``args`` go to `vitserve serve`; ``cpus`` (taskset's
    list, e.g. "0" or "0,1") pins every process of the server to those cores, as a container's cpuset would."""
    port = free_port()
    settings.setdefault("grpc_port", free_port())  # never the shared default 8001: SO_REUSEPORT would let two servers share it
    env = {**_base_env(workdir), **{f"VITSERVE_{k.upper()}": str(v) for k, v in settings.items()}}
    cmd = [sys.executable, str(ROOT / "vitserve.py"), "serve", "--artifact", str(artifact), "--host", "127.0.0.1",
           "--port", str(port), *args]
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    with running("vitserve", cmd, env, workdir, port, ready_timeout=ready_timeout) as server:
        server.grpc_address = f"127.0.0.1:{settings['grpc_port']}"
        yield server


def running_peer(peer: str, artifact: Path, workdir: Path, **env_extra: str):
    """A peer service file under benchmarks/peers/, served by plain `bentoml serve`; it reads the artifact path
    from VITSERVE_BENCH_ARTIFACT."""
    port = free_port()
    env = {**_base_env(workdir), "VITSERVE_BENCH_ARTIFACT": str(Path(artifact).resolve()), **env_extra}
    cmd = [sys.executable, "-m", "bentoml", "serve", PEER_TARGETS[peer], "--working-dir", str(ROOT),
           "--host", "127.0.0.1", "--port", str(port)]
    return running(peer, cmd, env, workdir, port)


TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"  # `make triton-peer`


@contextmanager
def running_triton(artifact: Path, workdir: Path, max_batch: int = 32):
    """NVIDIA Triton (PyTriton's bundled tritonserver) serving the same engine and Preprocessor
    (benchmarks/peers/triton_pytriton.py), from its own environment; the server gets ``.grpc_address``."""
    if not TRITON_PYTHON.exists():
        raise RuntimeError(f"{TRITON_PYTHON} is missing: make triton-peer")
    port, grpc_port = free_port(), free_port()
    cmd = [str(TRITON_PYTHON), "-m", "benchmarks.peers.triton_pytriton", str(Path(artifact).resolve()), "--http-port",
           str(port), "--grpc-port", str(grpc_port), "--metrics-port", str(free_port()), "--max-batch", str(max_batch)]
    env = {**_base_env(workdir), "PYTHONPATH": str(ROOT)}
    from service.artifact import read_manifest

    ready = f"/v2/models/{read_manifest(Path(artifact)).model.name}/ready"  # the server is ready before the model is bound
    with running("triton", cmd, env, workdir, port, ready_path=ready) as server:
        server.grpc_address = f"127.0.0.1:{grpc_port}"
        yield server
