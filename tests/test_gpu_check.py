"""The GPU check rehearsed on CPU (`python -m benchmarks.gpu_check --dry-run`): every step produces its figures or says
why not, so the one prepared GPU run cannot rot between the rare times a GPU is lent; and the parts a bare GPU machine
depends on (carried wheels, the scikit-image stand-in) work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.gpu_check.packages import save_skimage_photos, wheel_fits, wheel_wanted, write_skimage_stand_in
from benchmarks.gpu_check.plan import DRY_PLAN, LOGS_ARCHIVE, MAX_OUTPUT_DEPTH, MAX_OUTPUT_FILES
from benchmarks.gpu_check.run import wait_or_kill_group
from benchmarks.harness.servers import bypass_proxies_for_loopback
from tests.conftest import ROOT

STEPS = ("environment", "pytest", "engines/tiny", "engines/demo", "training_memory", "decode", "service", "compile/tiny")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run into a temporary folder (never benchmarks/results/), serving as a bare GPU machine would: BentoML is
    not there, so the service step runs our ASGI app under plain uvicorn."""
    out = tmp_path_factory.mktemp("gpu-check")
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out), "--server", "uvicorn"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    (result,) = out.glob("gpu-check_*.json")
    return out, json.loads(result.read_text()), proc.stdout


def _reasons(section: dict) -> dict[str, str]:
    return section.get("skipped") or {}


@pytest.mark.slow
@pytest.mark.timeout(600)
class TestDryRun:
    """Each step of one dry run (about 1.5 minutes on 2 cores)."""

    @pytest.mark.parametrize("step", STEPS)
    def test_every_step_runs_or_says_why(self, dry_run, step):
        _, payload, _ = dry_run
        section = payload["sections"][step]
        assert section["status"] in ("ok", "partial"), section.get("traceback_tail") or section
        assert all(isinstance(why, str) and why for why in _reasons(section).values())

    def test_environment_measures_the_matmul_ceiling(self, dry_run):
        env = dry_run[1]["sections"]["environment"]
        assert {(m["device"], m["precision"]) for m in env["matmul"]} == {("cpu", "fp32"), ("cpu", "bf16")}
        assert all(m["tflops"] > 0 and m["runs"] >= 3 for m in env["matmul"])
        assert "CUDA" in _reasons(env)["gpu"] and env["cuda_available"] is False
        assert env["versions"]["numpy"] and "CPUExecutionProvider" in env["onnxruntime_providers"]

    def test_pytest_step_runs_the_gpu_tests_and_records_skip_reasons(self, dry_run):
        py = dry_run[1]["sections"]["pytest"]
        assert "tests/test_export.py" in py["files"] and py["returncode"] == 0
        c = py["counts"]
        assert c["tests"] >= 2 and c["skipped"] == c["tests"] and c["failed"] == c["errors"] == 0
        assert all("GPU" in t["message"] for t in py["tests"])

    @pytest.mark.parametrize("step", ["engines/tiny", "engines/demo", "compile/tiny"])
    def test_engine_steps_sweep_batches_and_gate_parity(self, dry_run, step):
        section = dry_run[1]["sections"][step]
        assert section["model"]["gflop_per_image"] > 0 and section["model"]["parity_images"]["count"] == 400
        (variant,) = section["variants"].values()
        assert variant["device"] == "cpu" and "error" not in variant
        rows = variant["rows"]
        swept = [2, 4, 8, 16] if step.startswith("compile/") else [1, 2, 4, 8, 16]  # compile: no second compile for batch 1
        assert [r["batch"] for r in rows] == swept[: len(rows)] and len(rows) >= 2
        assert all(r["images_per_s"] > 0 and r["ms_per_batch"] > 0 and r["fraction_of_matmul"] > 0 for r in rows)
        parity = variant["parity"]
        assert parity["passed"] and parity["images"] == 400 and parity["thresholds"]["max_abs_logit_diff"] == 1e-3
        gpu_only = [n for n in _reasons(section) if "cuda" in n]
        assert gpu_only and all("CUDA" in _reasons(section)[n] for n in gpu_only)

    def test_compile_step_states_backend_and_graph_breaks(self, dry_run):
        (variant,) = dry_run[1]["sections"]["compile/tiny"]["variants"].values()
        assert variant["compile"]["backend"] == "eager" and variant["compile"]["graphs"] >= 1
        assert variant["compile"]["graph_breaks"] >= 0 and "rehearsal" in variant["note"]

    def test_training_memory_step_times_the_step_and_asks_the_planner(self, dry_run):
        tm = dry_run[1]["sections"]["training_memory"]
        assert [r["batch"] for r in tm["rows"]] == [4, 16]
        for r in tm["rows"]:
            assert r["step_s"] > 0 and r["adamw_state_bytes"] == 2 * r["weights_bytes"]
            assert "peak_allocated_bytes" not in r  # CUDA-only: not measured here, and said so
            assert r["planner"]["note"]  # its estimate, or why there is none
        assert "CUDA-only" in _reasons(tm)["peak memory"]

    def test_decode_step_measures_the_service_decode(self, dry_run):
        dec = dry_run[1]["sections"]["decode"]
        assert set(dec["sizes"]) == {"640x480", "1920x1080"}
        for size, d in dec["sizes"].items():
            assert d["cpu_service_decode"]["one_thread_images_per_s"] > 0 and d["cpu_service_decode"]["all_cores_images_per_s"] > 0
            assert "CUDA" in _reasons(dec)[f"gpu decode {size}"]

    def test_service_step_loads_the_plain_uvicorn_app(self, dry_run):
        svc = dry_run[1]["sections"]["service"]
        assert svc["server"] == "uvicorn" and svc["info"]["engine"]["engine"].startswith("onnxruntime-cpu")
        load = svc["load"]
        assert [r["concurrency"] for r in load["closed_loop"]] == [1, 4]
        (opened,) = load["open_loop"]
        assert opened["target_rate_rps"] == pytest.approx(load["saturation"]["images_per_s"] / 2, abs=0.01)
        for r in load["closed_loop"] + load["open_loop"]:
            assert r["throughput_images_per_s"] > 0 and r["latency"]["p50_ms"] > 0 and r["latency"]["p99_ms"] >= r["latency"]["p50_ms"]
            assert r["server_stages"]["available"] and r["server_stages"]["decode_ms_per_image"] > 0
        assert 0 < svc["ratio"]["service_over_engine"] and svc["raw_engine"]["best"]["engine_images_per_s"] > 0

    def test_results_json_markdown_and_figures_in_the_output_folder(self, dry_run):
        out, payload, stdout = dry_run
        (md_path,) = out.glob("gpu-check_*.md")
        assert {f"{md_path.stem}.json", "gpu-check.log", LOGS_ARCHIVE} <= {p.name for p in out.iterdir()}
        with tarfile.open(out / LOGS_ARCHIVE) as tar:
            logs = set(tar.getnames())
        assert {"pytest.log", "pytest.xml", "compile.log"} <= logs and any(n.startswith("service-") for n in logs), logs
        assert payload["figures"]["written"] and all((out / f).is_file() for f in payload["figures"]["files"])
        md = md_path.read_text()
        for heading in ("Ceiling: dense matmul", "pytest -m", "engines/tiny", "Training step memory", "Decode", "Service end to end", "Not run, and why"):
            assert heading in md
        assert payload["environment"]["git_sha"] and payload["command"].startswith("python -m benchmarks.gpu_check --dry-run")
        tail = stdout.strip().splitlines()
        assert "vitserve bench summary: GPU check (dry run)" in "\n".join(tail[-40:]) and tail[-1].startswith("=")


    def test_the_output_folder_is_within_what_comes_back_from_a_gpu_machine(self, dry_run):
        out, payload, stdout = dry_run
        files = [p for p in out.rglob("*") if p.is_file()]
        depth = max(len(p.relative_to(out).parts) - 1 for p in files)
        assert len(files) <= MAX_OUTPUT_FILES and depth <= MAX_OUTPUT_DEPTH, sorted(str(p.relative_to(out)) for p in files)
        assert payload["output_files"]["within_limits"] and payload["output_files"]["count"] == len(files)
        assert "(within what comes back from a GPU machine)" in stdout

    def test_every_step_ends_within_its_budget_and_the_run_well_within_its_limit(self, dry_run):
        _, payload, _ = dry_run
        for name, section in payload["sections"].items():
            assert section["seconds"] <= section["budget_s"] + 5, (name, section["seconds"], section["budget_s"])
        assert payload["elapsed_s"] < 0.8 * DRY_PLAN.time_limit_s, payload["elapsed_s"]

    def test_the_compile_step_runs_in_a_child_process_and_skips_batch_1(self, dry_run):
        _, payload, stdout = dry_run
        assert "compile/tiny: start (budget" in stdout and "in a child process" in stdout
        (variant,) = payload["sections"]["compile/tiny"]["variants"].values()
        assert variant["rows"] and min(r["batch"] for r in variant["rows"]) == 2 and variant["parity"]["passed"]

    def test_steps_failed_reruns_only_what_failed_and_keeps_the_rest(self, dry_run, tmp_path):
        out, payload, _ = dry_run
        again = tmp_path / "again"
        shutil.copytree(out, again)
        (result,) = again.glob("gpu-check_*.json")
        earlier = json.loads(result.read_text())
        earlier["sections"]["decode"] = {"status": "failed", "error": "pretend"}
        result.write_text(json.dumps(earlier))
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(again), "--server", "uvicorn", "--steps", "failed"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        assert "steps: decode" in proc.stdout and "engines/tiny: start" not in proc.stdout
        rerun = json.loads(result.read_text())["sections"]
        assert rerun["decode"]["status"] in ("ok", "partial") and rerun["engines/tiny"] == payload["sections"]["engines/tiny"]
        with tarfile.open(again / LOGS_ARCHIVE) as tar:
            assert {"pytest.log", "compile.log"} <= set(tar.getnames())  # the first run's logs are kept


def test_a_process_group_is_killed_whole_at_its_budget():
    """What stops pytest (and the exporter it started) or an isolated step at its budget: the grandchild goes too."""
    proc = subprocess.Popen(["bash", "-c", "sleep 60 & echo $! ; wait"], stdout=subprocess.PIPE, text=True, start_new_session=True)
    grandchild = int(proc.stdout.readline())
    assert wait_or_kill_group(proc, 1.0) is True
    time.sleep(0.2)
    assert not os.path.exists(f"/proc/{grandchild}") or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]
    quick = subprocess.Popen(["true"], start_new_session=True)
    assert wait_or_kill_group(quick, 10.0) is False


def test_loopback_bypasses_any_proxy_from_the_environment():
    environ = {"NO_PROXY": "example.com"}
    bypass_proxies_for_loopback(environ)
    bypass_proxies_for_loopback(environ)  # idempotent
    assert environ["NO_PROXY"] == "example.com,127.0.0.1,localhost,::1" and environ["no_proxy"] == "127.0.0.1,localhost,::1"


def test_the_carried_photographs_are_the_ones_export_gates_with():
    from benchmarks.gpu_check.packages import _gate_photo_names
    from export.gate_inputs import _SKIMAGE_PHOTOS

    assert _gate_photo_names() == _SKIMAGE_PHOTOS


def test_a_carried_wheel_is_installed_only_where_missing_or_older(tmp_path):
    from importlib import metadata

    have = metadata.version("numpy")
    assert wheel_wanted(tmp_path / f"numpy-{have}-py3-none-any.whl") is None
    assert wheel_wanted(tmp_path / "numpy-999.0-py3-none-any.whl") == f"older {have}"
    assert wheel_wanted(tmp_path / "no_such_vitserve_package-1.0-py3-none-any.whl") == "missing"
    assert wheel_fits(tmp_path / "numpy-999.0-py3-none-any.whl")
    assert not wheel_fits(tmp_path / "numpy-999.0-cp27-cp27mu-win32.whl")  # gpu_wheels.sh's are for the GPU machine


def test_the_skimage_stand_in_serves_the_same_photographs(tmp_path):
    from skimage import data

    photos = save_skimage_photos(tmp_path / "photos.npz")
    site = tmp_path / "site"
    write_skimage_stand_in(photos, site)
    script = ("import sys, numpy as np; from skimage import data; assert data.__file__.startswith(sys.argv[1]), data.__file__; "
              "np.save(sys.argv[2], data.astronaut()); np.save(sys.argv[3], data.horse())")
    proc = subprocess.run([sys.executable, "-c", script, str(site), str(tmp_path / "a.npy"), str(tmp_path / "h.npy")],
                          cwd=tmp_path, env={"PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(np.load(tmp_path / "a.npy"), data.astronaut())
    assert np.array_equal(np.load(tmp_path / "h.npy"), data.horse())
