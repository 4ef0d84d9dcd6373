"""Step service: the service end to end on the best engine, loaded by the harness's closed and open loops."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from benchmarks.gpu_check.run import Budget, Run


def plain_asgi_app():
    """uvicorn factory (``uvicorn benchmarks.gpu_check.service:plain_asgi_app --factory``): service.standalone's app, our
    HTTP service exactly as BentoML mounts it, without BentoML."""
    import logging

    from service.standalone import app

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return app()


def server_kind(choice: str) -> tuple[str, str]:
    """'bentoml' (`vitserve serve`) or 'uvicorn' (plain_asgi_app), and why."""
    if choice == "uvicorn":
        return "uvicorn", "asked for (--server uvicorn)"
    try:
        import bentoml  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means the same: BentoML cannot serve here
        if choice == "bentoml":
            raise
        return "uvicorn", f"bentoml cannot be imported here ({type(e).__name__}: {e}); our ASGI app ran under plain uvicorn instead"
    return "bentoml", "bentoml imports here"


def running_service(kind: str, artifact: Path, workdir: Path, ready_timeout: float, **settings: str):
    from benchmarks.harness.servers import _base_env, free_port, running, running_vitserve

    if kind == "bentoml":
        return running_vitserve(artifact, workdir, ready_timeout=ready_timeout, **settings)
    port = free_port()
    env = {**_base_env(workdir), "VITSERVE_ARTIFACT": str(artifact), "VITSERVE_GRPC_PORT": "0",
           **{f"VITSERVE_{k.upper()}": v for k, v in settings.items()}}
    cmd = [sys.executable, "-m", "uvicorn", "benchmarks.gpu_check.service:plain_asgi_app", "--factory", "--host", "127.0.0.1",
           "--port", str(port), "--no-access-log", "--timeout-graceful-shutdown", "5"]
    return running("vitserve-uvicorn", cmd, env, workdir, port, ready_timeout=ready_timeout)


def step_service(run: Run, budget: Budget) -> dict:
    import asyncio

    import httpx

    from benchmarks.harness.load import multipart_bodies, run_load
    from benchmarks.peers.raw_engine import measure
    from benchmarks.photos import describe, realistic_photos

    p = run.plan
    artifact = Path(run.args.serve_artifact).resolve()
    kind, why = server_kind(run.args.server)
    photos = realistic_photos(formats=("JPEG",))
    bodies = multipart_bodies(photos)
    load = dict(warmup_s=p.load_warmup_s, duration_s=p.load_duration_s, max_outstanding=256, timeout_s=30, log=run.log)
    workdir = run.work / "server"
    # nvJPEG decode in the service (service/gpu_decode.py) wherever it can run: the GPU service as it is meant to run.
    from service.gpu_decode import available

    no_gpu_decode = available("cuda" if run.cuda else "cpu")
    settings = {} if no_gpu_decode else {"gpu_decode": "true"}
    out: dict = {"server": kind, "server_why": why, "artifact": str(artifact), "images": describe(photos),
                 "settings": settings, "gpu_decode": no_gpu_decode or "on (VITSERVE_GPU_DECODE=true)"}
    phase_s = p.load_warmup_s + p.load_duration_s + 2  # one load phase, with its scrapes
    # What the load phases and the raw engine need is kept back; the server gets the rest to become ready.
    ready_timeout = max(5.0, budget.left() - phase_s * (len(p.load_concurrency) + 1) - 10)
    try:
        with running_service(kind, artifact, workdir, ready_timeout, **settings) as server:
            info = httpx.get(f"{server.url}/info", timeout=30, trust_env=False).json()
            out["info"] = {k: info.get(k) for k in ("model", "engine", "engine_selection", "limits", "cpu_budget", "admission")}
            fits = max(1, min(len(p.load_concurrency), int((budget.left() - phase_s - 10) // phase_s)))
            if fits < len(p.load_concurrency):
                out.setdefault("skipped", {})["closed loop c=" + ",".join(map(str, p.load_concurrency[fits:]))] = "no time left in the step's budget"
            closed = asyncio.run(run_load(server.url, bodies, concurrency=list(p.load_concurrency[:fits]), rates=[], **load))
            peak = closed["saturation"]["images_per_s"]
            if budget.left() > phase_s + 5:
                opened = asyncio.run(run_load(server.url, bodies, concurrency=[], rates=[round(peak / 2, 2)], **load))
                out["load"] = {**closed, "open_loop": opened["open_loop"]}
            else:
                out["load"] = {**closed, "open_loop": []}
                out.setdefault("skipped", {})["open loop"] = "no time left in the step's budget"
    finally:
        for log in workdir.glob("*.log"):
            shutil.copy(log, run.logs / f"service-{log.name}")
    max_batch = out["info"]["limits"]["max_batch_size"]
    # The engine the service chose, alone: the same file, kind and batch size, on the same photographs.
    choice = _engine_choice(out["info"]["engine"]["engine"])
    raw = measure(artifact, photos, [max_batch], engine=choice, min_seconds=max(0.5, p.min_seconds * 4), log=run.log)
    out["raw_engine"] = raw
    served = out["load"]["saturation"]["images_per_s"]
    best = raw["best"]
    out["ratio"] = {"service_over_engine": round(served / best["engine_images_per_s"], 4),
                    "service_over_engine_plus_one_thread_decode": round(served / best["end_to_end_images_per_s"], 4),
                    "engine_batch": best["batch"], "service_images_per_s": served}  # fmt: skip
    o = (out["load"]["open_loop"] or [None])[0]
    run.log(f"  service {served:.1f} img/s at saturation; "
            + (f"open loop {o['target_rate_rps']}/s: p50 {o['latency']['p50_ms']} ms, p99 {o['latency']['p99_ms']} ms; " if o else "")
            + f"service ÷ engine {out['ratio']['service_over_engine']:.3f}")
    if kind == "uvicorn" and run.args.server != "uvicorn":
        out.setdefault("skipped", {})["bentoml"] = why
    return out


def _engine_choice(engine_name: str) -> str:
    """/info's engine name (e.g. pytorch-cuda-fp16, onnxruntime-cpu-fp32) → the VITSERVE_ENGINE choice that loads it."""
    from service.engines import ENGINE_CHOICES

    return max((c for c in ENGINE_CHOICES if engine_name.startswith(c)), key=len, default="auto")


