"""What every benchmark records beside its figures: machine, versions, git SHA, date."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        return None


def git_sha() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def environment() -> dict:
    versions = {}
    for mod in ("torch", "transformers", "onnx", "onnxruntime", "tensorrt", "bentoml"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "host": socket.gethostname(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu_name(),
        "python": platform.python_version(),
        "versions": versions,
    }


def env_tag(env: dict) -> str:
    """Short environment label for file names, e.g. 'cpu2' or 'nvidia-h100-80gb-hbm3'."""
    if env.get("gpu"):
        return env["gpu"].lower().replace(" ", "-")
    return f"cpu{env['cpu_count']}"


def write_result(name: str, payload: dict, table: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_{env_tag(payload['environment'])}"
    json_path = RESULTS / f"{stem}.json"
    md_path = RESULTS / f"{stem}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    env = payload["environment"]
    md_path.write_text(
        f"# {name}\n\n{table}\n\n- machine: {env['cpu']} ×{env['cpu_count']}, GPU: {env['gpu'] or 'none'}\n"
        f"- versions: {', '.join(f'{k} {v}' for k, v in env['versions'].items() if v)}\n"
        f"- git {env['git_sha']}, {env['date']}\n- command: `{payload.get('command', '')}`\n"
    )
    return json_path, md_path
