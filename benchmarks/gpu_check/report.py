"""The run's results: JSON, markdown, figures and the summary rows."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import numpy as np

from benchmarks.gpu_check.plan import SERVERS, tail_of


def write_results(payload: dict, out: Path, stem: str, *, figures: bool, log=print) -> dict[str, Path]:
    """The JSON first (it holds every figure); then the markdown and the figures, whose failure loses nothing."""
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md"}
    if figures:
        try:
            paths |= plot(payload, out, stem)
        except Exception as e:  # noqa: BLE001
            payload["figures"] = {"written": False, "why": f"{type(e).__name__}: {e}", "traceback_tail": tail_of(traceback.format_exc())}
    tmp = paths["json"].with_name(paths["json"].name + ".tmp")  # renamed into place: a run killed mid-write keeps the last whole one
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(paths["json"])
    try:
        paths["md"].write_text(markdown(payload))
    except Exception as e:  # noqa: BLE001
        log(f"markdown not written: {type(e).__name__}: {e}\n{tail_of(traceback.format_exc())}")
    return paths


def _engine_sections(payload: dict) -> dict[str, dict]:
    return {k: v for k, v in payload["sections"].items() if k.startswith(("engines/", "compile/")) and "variants" in v}


def markdown(payload: dict) -> str:
    env, sections = payload["environment"], payload["sections"]
    envs = sections.get("environment", {})
    gpu = envs.get("gpu") or {}
    smi = (envs.get("nvidia_smi") or {}).get("gpus") or [{}]
    title = gpu.get("name") or ("CPU dry run" if payload["dry_run"] else "no GPU")
    lines = [f"# vitserve GPU check: {title}", ""]
    lines += [f"- machine: {env['cpu']} ×{env['cpu_count']}; GPU: {gpu.get('name') or 'none'}"
              + (f" ({gpu['memory_gib']} GiB, capability {gpu['capability']}), driver {smi[0].get('driver_version')}" if gpu else ""),
              f"- torch {env['versions'].get('torch')} (CUDA {envs.get('torch_cuda')}, cuDNN {envs.get('cudnn')}), "
              + ", ".join(f"{k} {v}" for k, v in (envs.get("versions") or {}).items() if v),
              f"- command: `{payload['command']}`; git {env['git_sha']}; {env['date']}; {payload.get('elapsed_s')} s",
              "- steps: " + ", ".join(f"{k} **{v['status']}** ({v.get('seconds', 0)} s)" for k, v in sections.items()), ""]  # fmt: skip
    if envs.get("matmul"):
        lines += ["## Ceiling: dense matmul (random data, median of timed runs)", "", "| device | dtype | n | TFLOP/s | spread |", "|---|---|---|---|---|"]
        lines += [f"| {m['device']} | {m['precision']} | {m['n']} | **{m['tflops']}** | {m['spread_tflops'][0]}–{m['spread_tflops'][1]} |" for m in envs["matmul"]]
        lines.append("")
    py = sections.get("pytest")
    if py and "counts" in py:
        c = py["counts"]
        lines += ["## `pytest -m \"gpu or tensorrt\"`", "", f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, "
                  f"{c['skipped']} skipped ({', '.join(py['files'])})", ""]
        lines += [f"- {t['test']}: {t['outcome']}" + (f" — {t['message']}" if t.get("message") else "") for t in py["tests"]]
        lines.append("")
    for name, sec in _engine_sections(payload).items():
        lines += _engine_markdown(name, sec)
    tm = sections.get("training_memory")
    if tm and tm.get("rows"):
        lines += [f"## Training step memory: {tm['model']}, {tm['precision']}, {tm['optimizer']}", "",
                  "| batch | device | peak allocated GiB, measured | planner's allocated peak GiB | planner ÷ measured | step s | weights + grads + AdamW GiB |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in tm["rows"]:
            static = (r["weights_bytes"] + r["grads_bytes"] + r["adamw_state_bytes"]) / 2**30
            planned = r["planner"]["allocated_peak_bytes"]
            lines.append(f"| {r['batch']} | {r['device']} | {r.get('peak_allocated_gib', '–')} | {round(planned / 2**30, 3) if planned else '–'} | "
                         f"{r['planner_over_measured'] or '–'} | {r['step_s']} | {static:.3f} |")
        lines += ["", f"Planner: {tm['rows'][0]['planner']['note']}", ""]
    dec = sections.get("decode")
    if dec and dec.get("sizes"):
        lines += [f"## Decode → model input {dec['model_input']}", "",
                  "| JPEG | CPU service decode, 1 thread img/s | CPU, all threads img/s | GPU decode img/s | GPU decode + resize + normalise img/s | GPU pixels vs service mean / max \\|Δ\\| |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for size, s in dec["sizes"].items():
            c, g = s["cpu_service_decode"], s.get("gpu_decode")
            gcols = (f"{g['decode_images_per_s']} | {g['decode_and_preprocess_images_per_s']} | {g['pixels_vs_service']['mean_abs_diff_uint8']} / "
                     f"{g['pixels_vs_service']['max_abs_diff_uint8']}") if g else "– | – | –"
            lines.append(f"| {size} | {c['one_thread_images_per_s']} | {c['all_cores_images_per_s']} ({c['threads']} threads) | {gcols} |")
        lines.append("")
    svc = sections.get("service")
    if svc and svc.get("load"):
        from benchmarks.harness.load import load_table

        r = svc["ratio"]
        lines += [f"## Service end to end: {SERVERS[svc['server']]}", "", f"Server chosen: {svc['server_why']}. Artifact {svc['artifact']}, engine "
                  f"{svc['info']['engine']['engine']}; GPU decode: {svc.get('gpu_decode', 'not recorded')}; "
                  f"one JPEG per request (target: service ÷ engine ≥ 0.95 on ViT-L FP16). Service {r['service_images_per_s']} img/s ÷ raw engine at batch {r['engine_batch']} = "
                  f"**{r['service_over_engine']}** (÷ engine + one-thread decode: {r['service_over_engine_plus_one_thread_decode']}).", "",
                  load_table(svc["load"]), ""]  # fmt: skip
    lines += ["## Not run, and why", ""]
    for name, sec in sections.items():
        by_reason: dict[str, list[str]] = {}
        for part, why in ({name: sec.get("why", "")} if sec["status"] == "skipped" else sec.get("skipped") or {}).items():
            by_reason.setdefault(why, []).append(part)
        lines += [f"- {name}: {', '.join(parts)}: {why}" for why, parts in by_reason.items()]
    failures = {k: v for k, v in sections.items() if v["status"] == "failed"}
    if failures:
        lines += ["", "## Failures", ""]
        for name, sec in failures.items():
            lines += [f"### {name}: {sec.get('error')}", "", "```", sec.get("traceback_tail") or sec.get("output_tail") or "", "```", ""]
    return "\n".join(lines) + "\n"


def _engine_markdown(name: str, sec: dict) -> list[str]:
    from service.artifact import ParityReport
    from service.parity import format_table

    m = sec["model"]
    lines = [f"## {name}: {m['gflop_per_image']} GFLOP/image, {m['parity_images']['count']} parity images, FP32 reference on {m['reference']['device']}", "",
             "| engine | batch | img/s | ms/batch | model TFLOP/s | fraction of matmul | first call s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    reports = {}
    for engine, v in sec["variants"].items():
        for r in v.get("rows", []):
            lines.append(f"| {engine} | {r['batch']} | {r['images_per_s']} | {r['ms_per_batch']} | {r['model_tflops']} | "
                         f"{r['fraction_of_matmul'] if r['fraction_of_matmul'] is not None else '–'} | {r['first_call_s']} |")
        if v.get("error"):
            lines.append(f"| {engine} | – | failed: {v['error'][:120]} | | | | |")
        if "parity" in v:
            reports[engine] = ParityReport.model_validate(v["parity"])
    lines.append("")
    notes = [f"- {engine}: {v['note']}" + (f"; {v['stopped']}" if v.get("stopped") else "") + (f"; compile: {v['compile']}" if v.get("compile") else "")
             for engine, v in sec["variants"].items()]  # fmt: skip
    if reports:
        lines += ["Parity against FP32, export's gate (service.parity.check_engine, DEFAULT_THRESHOLDS):", "", "```", format_table(reports), "```"]
    return lines + notes + [""]


def plot(payload: dict, out: Path, stem: str) -> dict[str, Path]:
    """img/s and fraction of the matmul rate by batch for each model's engines; the service's latency–throughput."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        payload["figures"] = {"written": False, "why": f"matplotlib is not installed; draw them anywhere: python -m benchmarks.gpu_check --replot {out / stem}.json"}
        return {}
    paths: dict[str, Path] = {}
    models: dict[str, dict] = {}  # engines/<model> and compile/<model> share the model's axes
    for name, sec in _engine_sections(payload).items():
        model = models.setdefault(name.split("/", 1)[1], {"gflop": sec["model"]["gflop_per_image"], "variants": {}})
        model["variants"].update(sec["variants"])
    if models:
        fig, axes = plt.subplots(len(models), 2, figsize=(12, 3.8 * len(models)), dpi=110, squeeze=False)
        for (name, model), (ax_rate, ax_frac) in zip(models.items(), axes):
            for engine, v in model["variants"].items():
                rows = v.get("rows") or []
                if rows:
                    ax_rate.plot([r["batch"] for r in rows], [r["images_per_s"] for r in rows], "-o", ms=3, label=engine)
                    ax_frac.plot([r["batch"] for r in rows], [r["fraction_of_matmul"] or np.nan for r in rows], "-o", ms=3, label=engine)
            for ax, ylabel in ((ax_rate, "images/s"), (ax_frac, "model FLOP rate ÷ measured matmul rate")):
                ax.set_xscale("log", base=2)
                ax.set_xlabel("batch")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{name} ({model['gflop']} GFLOP/image)", fontsize=9)
                ax.grid(True, which="both", alpha=0.3)
            ax_rate.set_yscale("log")
            ax_rate.legend(fontsize=7)
        fig.suptitle(f"vitserve GPU check: {payload['environment'].get('gpu') or 'CPU dry run'} (git {payload['environment']['git_sha']})", fontsize=10)
        fig.tight_layout()
        paths["png"] = out / f"{stem}.png"
        fig.savefig(paths["png"])
        plt.close(fig)
    svc = payload["sections"].get("service") or {}
    if svc.get("load"):
        from benchmarks.plot import latency_throughput

        result = {"services": {"vitserve": svc["load"]}, "raw_engine": svc.get("raw_engine")}
        paths["service_png"] = latency_throughput(result, out / f"{stem}_service.png", f"vitserve on {svc['server']}: latency against throughput")
    payload["figures"] = {"written": True, "files": [p.name for p in paths.values()]}
    return paths


def summary_rows(payload: dict) -> list[tuple[str, str]]:
    s = payload["sections"]
    rows = [("steps", ", ".join(f"{k} {v['status']}" + (f" {v['seconds']:g}/{v['budget_s']:g} s" if "budget_s" in v else "")
                                for k, v in s.items())),
            ("time", f"{payload.get('elapsed_s')} s of the run's {payload.get('time_limit_s') or payload['plan']['time_limit_s']:g} s limit")]
    envs = s.get("environment", {})
    if envs.get("gpu"):
        smi = ((envs.get("nvidia_smi") or {}).get("gpus") or [{}])[0]
        rows.append(("gpu", f"{envs['gpu']['name']} {envs['gpu']['memory_gib']} GiB, driver {smi.get('driver_version')}, CUDA {envs.get('torch_cuda')}"))
    for m in envs.get("matmul", []):
        rows.append((f"matmul {m['device']} {m['precision']}", f"{m['tflops']} TFLOP/s (n={m['n']})"))
    if "counts" in s.get("pytest", {}):
        c = s["pytest"]["counts"]
        rows.append(("pytest gpu|tensorrt", f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped"))
    for name, sec in _engine_sections(payload).items():
        for engine, v in sec["variants"].items():
            if v.get("rows"):
                best = max(v["rows"], key=lambda r: r["images_per_s"])
                frac = f", {best['fraction_of_matmul']:.2f} of matmul" if best["fraction_of_matmul"] else ""
                verdict = "PASS" if v["parity"]["passed"] else "FAIL"
                rows.append((f"{name.split('/', 1)[1]} {engine}", f"{best['images_per_s']:.1f} img/s at b{best['batch']}{frac}; parity {verdict}"))
            elif v.get("error"):
                rows.append((f"{name.split('/', 1)[1]} {engine}", f"failed: {v['error'][:60]}"))
    for r in s.get("training_memory", {}).get("rows", []):
        rows.append((f"train step b{r['batch']}", f"{r.get('peak_allocated_gib', '–')} GiB peak, {r['step_s']} s/step"))
    for size, d in s.get("decode", {}).get("sizes", {}).items():
        g = d.get("gpu_decode")
        rows.append((f"decode {size}", f"CPU {d['cpu_service_decode']['all_cores_images_per_s']} img/s ({d['cpu_service_decode']['threads']} thr)"
                     + (f", GPU {g['decode_and_preprocess_images_per_s']} img/s" if g else ", GPU –")))
    svc = s.get("service", {})
    if svc.get("load"):
        o = svc["load"]["open_loop"][0]
        rows.append(("service", f"{svc['ratio']['service_images_per_s']:.1f} img/s peak ({svc['server']}); open {o['target_rate_rps']}/s "
                                f"p50 {o['latency']['p50_ms']} / p99 {o['latency']['p99_ms']} ms; ÷ engine {svc['ratio']['service_over_engine']:.3f}"))
    return rows


