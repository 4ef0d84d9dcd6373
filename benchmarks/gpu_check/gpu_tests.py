"""Step pytest: the GPU-marked tests in a subprocess, counted from their JUnit XML."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks.gpu_check.plan import ROOT, tail_of
from benchmarks.gpu_check.run import Budget, Run, wait_or_kill_group


def marked_test_files() -> list[str]:
    """Test files with a gpu or tensorrt marker: only they are collected, so a test file whose imports this machine
    lacks (bentoml, kubernetes tooling, ...) cannot stop the GPU tests from running."""
    files = sorted((ROOT / "tests").glob("test_*.py"))
    return [str(f.relative_to(ROOT)) for f in files if any(m in f.read_text() for m in ("mark.gpu", "mark.tensorrt"))]


def junit_counts(xml_path: Path) -> dict:
    import xml.etree.ElementTree as ET

    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    outcomes = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        child = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        outcome = {"failure": "failed", "error": "errors", "skipped": "skipped"}.get(child.tag if child is not None else "", "passed")
        counts["tests"] += 1
        counts[outcome] += 1
        outcomes.append({"test": name, "outcome": outcome, "seconds": float(case.get("time") or 0),
                         **({"message": tail_of(child.get("message") or "", 500)} if child is not None else {})})
    return {"counts": counts, "tests": outcomes}


def step_pytest(run: Run, budget: Budget) -> dict:
    """pytest in its own process group, killed whole at the budget: the exporter a test starts (tests/conftest.py's
    run_cli) goes with it rather than competing with the next step. Its log and JUnit XML go into the logs archive."""
    files = marked_test_files()
    xml, log = run.logs / "pytest.xml", run.logs / "pytest.log"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu or tensorrt", "-p", "no:cacheprovider", "-rs", f"--junitxml={xml}", *files]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        stopped = wait_or_kill_group(proc, budget.left())
    output = log.read_text(errors="replace")
    result = {"command": " ".join(cmd[1:]), "files": files, "returncode": proc.returncode, "summary": output.strip().splitlines()[-1:]}
    if xml.is_file():
        result.update(junit_counts(xml))
    if stopped:
        return {**result, "status": "failed", "error": f"stopped at its budget ({budget.seconds:.0f} s), with every process it started",
                "output_tail": tail_of(output)}  # fmt: skip
    failed = proc.returncode not in (0, 5) or result.get("counts", {}).get("failed") or result.get("counts", {}).get("errors")
    if failed:
        result["status"] = "failed"
        result["output_tail"] = tail_of(output)
    return result
