"""The GPU check rehearsed on CPU (`python -m benchmarks.gpu_check --dry-run`): every step produces its figures or says
why not, so the one prepared GPU run cannot rot between the rare times a GPU is lent; and the parts a bare GPU machine
depends on (carried wheels, the scikit-image stand-in) work."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from benchmarks.gpu_check.packages import save_skimage_photos, wheel_fits, wheel_wanted, write_skimage_stand_in
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
        assert [r["batch"] for r in rows] == [1, 2, 4, 8, 16][: len(rows)] and len(rows) >= 2
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
        assert {f"{md_path.stem}.json", "gpu-check.log", "pytest.log", "pytest.xml"} <= {p.name for p in out.iterdir()}
        assert payload["figures"]["written"] and all((out / f).is_file() for f in payload["figures"]["files"])
        md = md_path.read_text()
        for heading in ("Ceiling: dense matmul", "pytest -m", "engines/tiny", "Training step memory", "Decode", "Service end to end", "Not run, and why"):
            assert heading in md
        assert payload["environment"]["git_sha"] and payload["command"].startswith("python -m benchmarks.gpu_check --dry-run")
        tail = stdout.strip().splitlines()
        assert "vitserve bench summary: GPU check (dry run)" in "\n".join(tail[-40:]) and tail[-1].startswith("=")


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
