"""`vitserve serve`: check the artifact, then run `bentoml serve service.app:VitServe` with our settings."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every `vitserve` command's help: a default beside each option that takes a value, once (not where the help
    names its default itself, nor a flag's "False" or an unset "None", which say nothing), and descriptions keep
    their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.nargs == 0 or action.required or action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)


def add_engine_options(p: argparse.ArgumentParser, s) -> None:
    """--artifact and --engine, as every command that runs an artifact's engine (serve, predict) spells them."""
    from service.engines import ENGINE_CHOICES

    p.add_argument("--artifact", type=Path, default=s.artifact, help="artifact directory")
    p.add_argument("--engine", default=s.engine, choices=ENGINE_CHOICES, help="engine to run; auto picks the best for this machine")


def build_parser() -> argparse.ArgumentParser:
    from service.settings import Settings

    s = Settings()
    p = argparse.ArgumentParser(
        prog="vitserve serve",
        description="Serve an artifact with dynamic batching and Prometheus metrics: our JSON API and KServe v2 REST "
        "on the HTTP port, KServe v2 gRPC (+ grpc.health.v1, reflection) on the gRPC port. Every option is also a "
        "VITSERVE_* environment variable (e.g. VITSERVE_MAX_BATCH_SIZE); options win.",
        formatter_class=HelpFormatter,
    )
    add_engine_options(p, s)
    p.add_argument("--host", default=s.host, help="address to bind (HTTP and gRPC)")
    p.add_argument("--port", type=int, default=s.port, help="HTTP port")
    p.add_argument("--grpc-port", type=int, default=s.grpc_port, help="gRPC port (0: no gRPC)")
    p.add_argument("--workers", type=int, default=s.workers,
                   help="front-end processes; more than 1 adds one engine process that owns the engine and the batcher")
    p.add_argument("--max-batch-size", type=int, default=s.max_batch_size,
                   help="largest batch (capped by the engine's); unset: the engine's fastest batch on this CPU, 32 on a GPU")
    p.add_argument("--max-wait-ms", type=float, default=s.max_wait_ms, help="how long the oldest queued image waits for a fuller batch")
    p.add_argument("--queue-capacity", type=int, default=s.queue_capacity, help="images that may wait; beyond: 429")
    p.add_argument("--grace-period-s", type=float, default=s.grace_period_s, help="on SIGTERM, time to answer accepted requests")
    p.add_argument("--max-latency-ms", type=float, default=s.max_latency_ms,
                   help="refuse (429) at the door requests predicted to take longer; unset: max(3 x unloaded, unloaded + two full batches at the measured rate)")
    p.add_argument("--keep-alive-s", type=int, default=s.keep_alive_s,
                   help="idle HTTP keep-alive timeout; keep it above your load balancer's and clients' idle timeouts")
    p.add_argument("--no-startup-check", dest="startup_check", action="store_false",
                   help="skip re-checking the golden set through the engine on this machine before readiness")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require this key on every request (repeatable; or VITSERVE_API_KEYS='k1,k2' or '@file')")
    p.add_argument("--metrics-open", action=argparse.BooleanOptionalAction, default=None,
                   help="serve /metrics without a key (default: open unless keys are set)")
    p.add_argument("--ssl-certfile", type=Path, default=None, help="HTTPS on the HTTP port (BentoML's own TLS), with --ssl-keyfile")
    p.add_argument("--ssl-keyfile", type=Path, default=None, help="private key for --ssl-certfile")
    p.add_argument("--grpc-tls-cert", type=Path, default=s.grpc_tls_cert, help="TLS on the gRPC port: PEM certificate")
    p.add_argument("--grpc-tls-key", type=Path, default=s.grpc_tls_key, help="TLS on the gRPC port: PEM private key")
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

    env = {
        **os.environ,
        "VITSERVE_ARTIFACT": str(args.artifact.resolve()),
        "VITSERVE_ENGINE": args.engine,
        "VITSERVE_HOST": args.host,
        "VITSERVE_GRPC_PORT": str(args.grpc_port),
        "VITSERVE_WORKERS": str(args.workers),
        "VITSERVE_MAX_WAIT_MS": str(args.max_wait_ms),
        "VITSERVE_QUEUE_CAPACITY": str(args.queue_capacity),
        "VITSERVE_GRACE_PERIOD_S": str(args.grace_period_s),
        "VITSERVE_KEEP_ALIVE_S": str(args.keep_alive_s),
        "BENTOML_DO_NOT_TRACK": os.environ.get("BENTOML_DO_NOT_TRACK", "True"),
    }
    if args.max_batch_size is not None:
        env["VITSERVE_MAX_BATCH_SIZE"] = str(args.max_batch_size)
    if args.max_latency_ms is not None:
        env["VITSERVE_MAX_LATENCY_MS"] = str(args.max_latency_ms)
    if not args.startup_check:
        env["VITSERVE_STARTUP_CHECK"] = "false"
    if args.api_key:
        env["VITSERVE_API_KEYS"] = ",".join(args.api_key)
    if args.metrics_open is not None:
        env["VITSERVE_METRICS_OPEN"] = str(args.metrics_open).lower()
    for name in ("grpc_tls_cert", "grpc_tls_key"):
        if getattr(args, name) is not None:
            env[f"VITSERVE_{name.upper()}"] = str(getattr(args, name).resolve())
    try:
        settings = Settings(**{k.removeprefix("VITSERVE_").lower(): v for k, v in env.items() if k.startswith("VITSERVE_")})
    except ValueError as e:  # pydantic's ValidationError: a bad value, an unreadable key file, half a TLS pair
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmd = [
        sys.executable, "-m", "bentoml", "serve", "service.app:VitServe",
        "--working-dir", str(ROOT), "--host", args.host, "--port", str(args.port),
        "--timeout-graceful-shutdown", str(settings.server_shutdown_s),  # after our drain (see service/app.py)
        # Idle keep-alive connections outlive every client's and balancer's idle timeout, so they close first: a
        # server closing one just as a client reuses it leaves that request without an answer (a reset).
        "--timeout-keep-alive", str(settings.keep_alive_s), "--backlog", str(settings.backlog),
    ]
    if args.ssl_certfile or args.ssl_keyfile:
        if not (args.ssl_certfile and args.ssl_keyfile):
            print("error: --ssl-certfile and --ssl-keyfile go together", file=sys.stderr)
            return 2
        cmd += ["--ssl-certfile", str(args.ssl_certfile.resolve()), "--ssl-keyfile", str(args.ssl_keyfile.resolve())]
    os.execve(sys.executable, cmd, env)  # become the server: signals reach bentoml directly


if __name__ == "__main__":
    sys.exit(main())
