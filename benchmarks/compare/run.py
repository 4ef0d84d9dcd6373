"""Run: build or reuse the artifact, start every service, measure them interleaved, and return the measured numbers.

    prepare_artifact → start_services → raw_pass (before) → closed_loops → open_loops (at offered_rates) → raw_pass
    (after) → summarise_services, ceiling

Every server is started first and stays up (idle ones cost next to nothing); then each load level runs on every
service back to back, alternating the order, so load from other jobs on a shared machine — which changes over
minutes — falls on all services alike instead of on whichever happened to run then.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from benchmarks.compare.render import progress_line
from benchmarks.harness.load import Body, multipart_bodies, saturation, saturation_run
from benchmarks.harness.measure import cpu_snapshot, other_cpu_load
from benchmarks.harness.results import checkpoint_for
from benchmarks.models import build_artifact, checkpoint_shape, vit_flops
from benchmarks.photos import describe, realistic_photos

PEERS = ("bentoml-batching", "naive-pipeline")


def run_compare(args, log=print) -> dict:
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vitserve-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        artifact, model = prepare_artifact(args, work, log)
        photos = realistic_photos()
        bodies = multipart_bodies(photos, args.images_per_request)
        concurrency = [int(c) for c in args.concurrency.split(",") if c]
        fractions = [float(f) for f in args.rate_fractions.split(",") if f]
        batches = sorted({b for b in (1, 4, 8, 16, args.max_batch) if b <= args.max_batch})
        # The peers refuse nothing and queue every request, so our service is measured the same way: its admission
        # bound is lifted to the request timeout (what refusing does under overload is `vitserve bench overload`'s).
        overrides = {"max_latency_ms": "10000", **dict(kv.split("=", 1) for kv in args.service_setting)}
        peers = [p for p in args.peers.split(",") if p]
        with ExitStack() as stack:
            servers, services = start_services(stack, artifact, work, overrides, peers, bodies, log)
            raw_passes = [raw_pass(artifact, photos, batches, args.raw_seconds, "before the services", log)]
            closed_loops(servers, services, bodies, concurrency, args, log)
            rates = offered_rates(services["vitserve"], fractions, args)
            open_loops(servers, services, bodies, rates, len(concurrency), args, log)
            raw_passes.append(raw_pass(artifact, photos, batches, args.raw_seconds, "after the services", log))
        summarise_services(services, overrides)
        return {"model": model, "images": describe(photos), "raw_engine": ceiling(raw_passes), "services": services,
                "offered_rates_rps": rates, "rate_fractions_of_our_saturation": fractions,
                "order": "servers all up; each load level run on every service back to back, order alternating"}
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


# ---- the artifact -------------------------------------------------------------------------------------------------
def prepare_artifact(args, work: Path, log) -> tuple[Path, dict]:
    """The artifact to serve (--artifact as is; else exported from --checkpoint or a random-weight --config) and what
    the result records about its model."""
    from service.artifact import read_manifest

    if args.artifact:
        artifact = args.artifact
        model = {"name": read_manifest(artifact).model.name, "source": str(artifact)}
        if (artifact / "pytorch" / "config.json").is_file():
            model.update(_shape_facts(artifact / "pytorch"))
    else:
        ckpt, name = checkpoint_for(args, work)
        t = time.perf_counter()
        log(f"exporting {name} → artifact (parity gate on {args.export_images} images)…")
        artifact = build_artifact(ckpt, work / "artifact", max_images=args.export_images, max_batch=args.max_batch)
        log(f"  exported in {time.perf_counter() - t:.0f} s")
        model = {"name": name, "source": "random weights from config" if not args.checkpoint else str(ckpt), **_shape_facts(ckpt)}
    manifest = read_manifest(artifact)
    model["num_parameters"] = manifest.model.num_parameters
    model["cpu_engine_file"] = next((e.file for e in manifest.engines if e.format == "onnx" and e.device == "cpu"), None)
    model["export_cpu_choice"] = manifest.export_report.get("cpu_engine")
    return artifact, model


def _shape_facts(checkpoint: Path) -> dict:
    shape = checkpoint_shape(checkpoint)
    return {"shape": shape.__dict__, "gflops_per_image": round(vit_flops(shape)["total"] / 1e9, 3)}


# ---- the services -------------------------------------------------------------------------------------------------
def start_services(stack: ExitStack, artifact: Path, work: Path, overrides: dict, peers: list[str], bodies: list[Body],
                   log) -> tuple[dict, dict]:
    """Ours and each peer on its own free loopback port (stopped when ``stack`` closes), each checked to answer the
    same multipart request; their result records, to be filled by the load runs."""
    from benchmarks.harness.load import check_answers
    from benchmarks.harness.servers import running_peer, running_vitserve

    log(f"starting our service ({'settings ' + str(overrides) if overrides else 'default settings'}) and peers {peers}…")
    servers = {"vitserve": stack.enter_context(running_vitserve(artifact, work / "vitserve", **overrides))}
    for peer in peers:
        servers[peer] = stack.enter_context(running_peer(peer, artifact, work / peer))
    services: dict[str, dict] = {}
    for name, srv in servers.items():
        services[name] = {"url": srv.url, "kind": name, "closed_loop": [], "open_loop": [],
                          "answer_check": asyncio.run(check_answers(srv.url, bodies, name))}
    services["vitserve"]["info"] = _service_info(servers["vitserve"].url)
    return servers, services


def _service_info(base: str) -> dict:
    import httpx

    try:
        r = httpx.get(f"{base}/info", timeout=10, trust_env=False)
        return r.json() if r.status_code == 200 else {}
    except httpx.HTTPError:
        return {}


def _peer_settings(peer: str) -> dict:
    if peer == "bentoml-batching":
        from benchmarks.peers import bentoml_batching as m

        return {"max_batch_size": m.MAX_BATCH_SIZE, "max_latency_ms": m.MAX_LATENCY_MS, "workers": 1, "engine": "auto"}
    return {"batching": "none", "pipeline": "transformers image-classification, PyTorch FP32 CPU", "workers": 1}


# ---- the measurements ---------------------------------------------------------------------------------------------
def raw_pass(artifact: Path, photos, batches: list[int], min_seconds: float, label: str, log) -> dict:
    """The engine alone (engine.run at each batch size, decode+preprocess timed apart), no server."""
    from benchmarks.peers import raw_engine

    log(f"raw engine, no server ({label})…")
    cpu0 = cpu_snapshot()
    r = raw_engine.measure(artifact, photos, batches, min_seconds=min_seconds, log=log)
    r["cpu"] = other_cpu_load(cpu0, cpu_snapshot())
    return r


def _in_turn(names: list[str], level: int) -> list[str]:
    """The order the services take a load level in: alternating, so neither always goes first."""
    return names if level % 2 == 0 else names[::-1]


def closed_loops(servers: dict, services: dict, bodies: list[Body], concurrency: list[int], args, log) -> None:
    from benchmarks.harness.load import closed_loop

    for i, c in enumerate(concurrency):
        for name in _in_turn(list(servers), i):
            r = asyncio.run(closed_loop(servers[name].url, bodies, concurrency=c, warmup_s=args.warmup,
                                        duration_s=args.duration, timeout_s=args.timeout))
            services[name]["closed_loop"].append(r)
            log(f"  {name:<17} closed c={c:<3d} {progress_line(r)}")


def offered_rates(ours: dict, fractions: list[float], args) -> list[float]:
    """Open-loop rates: --rates as given, else fractions of *our* closed-loop saturation (the same for every service)."""
    peak_rps = saturation_run(ours["closed_loop"])["throughput_images_per_s"] / args.images_per_request
    return [float(r) for r in args.rates.split(",") if r] or [round(f * peak_rps, 2) for f in fractions]


def open_loops(servers: dict, services: dict, bodies: list[Body], rates: list[float], first_level: int, args, log) -> None:
    from benchmarks.harness.load import open_loop

    for i, rate in enumerate(rates):
        for name in _in_turn(list(servers), i + first_level):
            r = asyncio.run(open_loop(servers[name].url, bodies, rate=rate, warmup_s=args.warmup, duration_s=args.open_duration,
                                      max_outstanding=args.max_outstanding, timeout_s=args.timeout, seed=args.seed))
            services[name]["open_loop"].append(r)
            log(f"  {name:<17} open {rate:6.2f}/s  {progress_line(r)}")


# ---- what the runs add up to --------------------------------------------------------------------------------------
def summarise_services(services: dict, overrides: dict) -> None:
    """Each service's saturation, the CPU other processes took over its windows, and the settings it ran with."""
    for name, svc in services.items():
        svc["saturation"] = saturation(svc["closed_loop"])
        runs = svc["closed_loop"] + svc["open_loop"]
        svc["cpu"] = {"other_processes_cores_mean": round(sum(r["cpu"]["other_processes_cores"] for r in runs) / len(runs), 2),
                      "other_processes_cores_max": max(r["cpu"]["other_processes_cores"] for r in runs)}
        svc["settings"] = ({"VITSERVE_" + k.upper(): v for k, v in overrides.items()} or "defaults (service/settings.py)") \
            if name == "vitserve" else _peer_settings(name)


def ceiling(raw_passes: list[dict]) -> dict:
    """The better of the raw passes (the stricter comparison), with both kept."""
    raw = dict(max(raw_passes, key=lambda r: r["best"]["end_to_end_images_per_s"]))
    raw["passes"] = [{"best": r["best"], "cpu": r["cpu"], "batches": r["batches"]} for r in raw_passes]
    return raw
