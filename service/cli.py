"""`vitserve serve`: check the artifact, then run `bentoml serve service.app:VitServe` with our settings."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    from service.engines import ENGINE_CHOICES
    from service.settings import Settings

    s = Settings()
    p = argparse.ArgumentParser(
        prog="vitserve serve",
        description="Serve an artifact over HTTP with dynamic batching and Prometheus metrics. Every option is "
        "also a VITSERVE_* environment variable (e.g. VITSERVE_MAX_BATCH_SIZE); options win.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--artifact", type=Path, default=s.artifact, help="artifact directory")
    p.add_argument("--engine", default=s.engine, choices=ENGINE_CHOICES, help="engine to run; auto picks the best for this machine")
    p.add_argument("--host", default=s.host)
    p.add_argument("--port", type=int, default=s.port)
    p.add_argument("--max-batch-size", type=int, default=s.max_batch_size)
    p.add_argument("--max-wait-ms", type=float, default=s.max_wait_ms)
    p.add_argument("--queue-capacity", type=int, default=s.queue_capacity)
    p.add_argument("--grace-period-s", type=float, default=s.grace_period_s)
    p.add_argument("--no-startup-check", dest="startup_check", action="store_false", default=s.startup_check,
                   help="skip re-checking the golden set through the engine on this machine before readiness")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from service.artifact import ArtifactError, load_artifact

    try:
        load_artifact(args.artifact, verify=True)
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from service.settings import Settings

    settings = Settings(grace_period_s=args.grace_period_s)
    env = {
        **os.environ,
        "VITSERVE_ARTIFACT": str(args.artifact.resolve()),
        "VITSERVE_ENGINE": args.engine,
        "VITSERVE_MAX_BATCH_SIZE": str(args.max_batch_size),
        "VITSERVE_MAX_WAIT_MS": str(args.max_wait_ms),
        "VITSERVE_QUEUE_CAPACITY": str(args.queue_capacity),
        "VITSERVE_GRACE_PERIOD_S": str(args.grace_period_s),
        "VITSERVE_STARTUP_CHECK": str(args.startup_check).lower(),
        "BENTOML_DO_NOT_TRACK": os.environ.get("BENTOML_DO_NOT_TRACK", "True"),
    }
    cmd = [
        sys.executable, "-m", "bentoml", "serve", "service.app:VitServe",
        "--working-dir", str(ROOT), "--host", args.host, "--port", str(args.port),
        "--timeout-graceful-shutdown", str(settings.server_shutdown_s),  # after our drain (see service/app.py)
    ]
    os.execve(sys.executable, cmd, env)  # become the server: signals reach bentoml directly


if __name__ == "__main__":
    sys.exit(main())
