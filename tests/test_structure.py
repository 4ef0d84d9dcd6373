"""The shape of the code, checked so it cannot drift back: no function over 80 lines and no file over 400 lines in the
product and benchmark packages unless a reason is written here; one place assembles the HTTP app; `service/` never
imports export, training, prediction, demo or benchmark code; tests import the benchmark harness, not scripts."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "export", "finetune", "predict", "benchmarks")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 80
GENERATED = ("service/protos/",)  # protoc's output: regenerated, never edited (test_grpc checks it is current)
# path (or path:function) → why it may be longer. Empty today; a new entry must say why splitting would be worse.
ALLOWED: dict[str, str] = {}


def _sources():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if not rel.startswith(GENERATED):
                yield rel, path.read_text()


def test_no_file_or_function_is_longer_than_the_limits_without_a_reason():
    too_long = []
    for rel, text in _sources():
        lines = text.count("\n")
        if lines > MAX_FILE_LINES and rel not in ALLOWED:
            too_long.append(f"{rel}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and f"{rel}:{node.name}" not in ALLOWED:
                    too_long.append(f"{rel}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, "over the limits (split it, or add the reason to ALLOWED):\n" + "\n".join(too_long)


def test_the_allowed_exceptions_still_exist_and_say_why():
    for key, why in ALLOWED.items():
        assert (ROOT / key.split(":")[0]).is_file(), f"{key} no longer exists: remove it from ALLOWED"
        assert len(why) > 20, f"{key}: the reason must say why"


def test_one_place_builds_the_http_app():
    """FastAPI's app is constructed once (service/http_api.py); BentoML's adapter and the standalone host take it."""
    builders = [rel for rel, text in _sources() if re.search(r"\b(FastAPI|Starlette)\(", text)]
    assert builders == ["service/http_api.py"], builders


def test_the_service_never_imports_export_training_or_benchmarks():
    forbidden = ("export", "finetune", "predict", "demo", "benchmarks")
    found = []
    for rel, text in _sources():
        if not rel.startswith("service/"):
            continue
        for node in ast.walk(ast.parse(text)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{rel}: {n}" for n in names if n.split(".")[0] in forbidden]
    assert not found, found


def test_tests_import_the_benchmark_harness_not_benchmark_scripts():
    """A benchmark script's module is its command line; what tests reuse (servers, load, metrics parsing) lives in
    benchmarks/harness/. Tests of a benchmark's own model (the cluster simulation, the overload sampler, the models'
    shapes) and of the commands through `benchmarks.cli` are what they test, not reuse."""
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"__init__", "cli", "models", "photos", "cluster_sim", "autoscale", "overload", "fuzz"}
    found = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks."):
                parts = node.module.split(".")
                if parts[1] in scripts:
                    found.append(f"{path.name}: from {node.module} import ...")
    assert not found, found
