"""What every benchmark records beside its figures: machine, versions, git SHA, date."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from service.hardware import cpu_features, cpu_name

RESULTS = Path(__file__).resolve().parents[1] / "results"


NO_GPU = "no CUDA GPU visible (torch.cuda.is_available() is false)"  # why a GPU-only figure is missing


def gpu_name() -> str | None:
    from service.hardware import cuda_available  # the service's own check: benchmarks see what `auto` sees

    if not cuda_available():
        return None
    import torch

    return torch.cuda.get_device_name(0)


def git_sha() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
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
        # INT8 kernels and their figures differ by instruction set: "AMD EPYC" alone named two different CPUs here.
        "isa": " ".join(cpu_features()) or "unknown",
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


def checkpoint_for(args, work: Path) -> tuple[Path, str]:
    """The model a benchmark runs, and its name: ``--checkpoint`` as given, else a random-weight model of ``--config``
    written under ``work`` (nothing downloaded)."""
    from benchmarks.models import make_checkpoint

    if args.checkpoint:
        return args.checkpoint, args.checkpoint.name
    return make_checkpoint(args.config, work / f"{args.config}-random"), args.config


def command_line(subcommand: str, argv: list[str] | None) -> str:
    """The command a result came from, as a user would type it again."""
    return f"vitserve bench {subcommand} " + " ".join(argv if argv is not None else sys.argv[1:])


def write_result(name: str, payload: dict, table: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_{env_tag(payload['environment'])}"
    json_path = RESULTS / f"{stem}.json"
    md_path = RESULTS / f"{stem}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    env = payload["environment"]
    md_path.write_text(
        f"# {name}\n\n{table}\n\n- machine: {env['cpu']} ×{env['cpu_count']} ({env.get('isa', 'ISA not recorded')}), "
        f"GPU: {env['gpu'] or 'none'}\n"
        f"- versions: {', '.join(f'{k} {v}' for k, v in env['versions'].items() if v)}\n"
        f"- git {env['git_sha']}, {env['date']}\n- command: `{payload.get('command', '')}`\n"
    )
    return json_path, md_path


def result_stem(name: str, env: dict) -> Path:
    """benchmarks/results/<name>_<env tag>: write_result's JSON and markdown, and any figure, share it."""
    return RESULTS / f"{name}_{env_tag(env)}"


def print_summary(title: str, payload: dict, rows: list[tuple[str, str]]) -> str:
    """The fixed block every benchmark run prints last: the same header, the same rows in the same order."""
    env = payload["environment"]
    head = [
        ("benchmark", title),
        ("machine", f"{env['cpu']} ×{env['cpu_count']}, GPU: {env['gpu'] or 'none'}"),
        ("load avg", " / ".join(str(x) for x in (payload.get("load_average") or {}).get("before", []) or ["?"])),
        ("versions", ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)),
        ("git", f"{env['git_sha']} ({env['date']})"),
    ]
    width = max(len(k) for k, _ in head + rows)
    bar = "=" * 78
    lines = [bar, f"vitserve bench summary: {title}", bar]
    lines += [f"{k:<{width}}  {v}" for k, v in head]
    lines.append("-" * 78)
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append(bar)
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def finish(title: str, payload: dict, rows: list[tuple[str, str]], *, table: str, name: str | None, figures=()) -> int:
    """Every benchmark's last step: its JSON and markdown written as ``name`` (with ``figures`` already drawn beside
    them; nothing written when ``name`` is None, i.e. --no-write), then the summary block with a "written" row."""
    if name is not None:
        written = [*write_result(name, payload, table), *figures]
        rows.append(("written", f"{', '.join(path.name for path in written)} (in {written[0].parent})"))
    print_summary(title, payload, rows)
    return 0
