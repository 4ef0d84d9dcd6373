"""`vitserve serve`: check the artifact, then run `bentoml serve service.app:VitServe` with our settings."""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
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


def add_setting_options(p: argparse.ArgumentParser, s, skip: tuple[str, ...] = ()) -> None:
    """One option per Settings field (``--max-wait-ms`` for max_wait_ms), typed, defaulted (environment included)
    and described by the field itself: settings are described once, in service/settings.py."""
    for name, field in type(s).model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        text = field.description.replace("%", "%%")  # argparse formats help with %
        kind = field.annotation
        if type(None) in typing.get_args(kind):  # `int | None`: an option of type int whose default may be unset
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        default = getattr(s, name)
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif typing.get_origin(kind) is typing.Literal:
            p.add_argument(flag, choices=typing.get_args(kind), default=default, help=text)
        elif typing.get_origin(kind) is list:
            p.add_argument(flag, type=lambda text: [int(x) for x in text.split(",") if x.strip()], default=default,
                           metavar="N,N,...", help=text)
        else:
            p.add_argument(flag, type=kind, default=default, help=text)


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
    add_setting_options(p, s, skip=("artifact", "engine"))
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="one API key (repeatable); joined into --api-keys")
    p.add_argument("--ssl-certfile", type=Path, default=None, help="HTTPS on the HTTP port (BentoML's own TLS), with --ssl-keyfile")
    p.add_argument("--ssl-keyfile", type=Path, default=None, help="private key for --ssl-certfile")
    return p


def setting_environment(args, settings_class) -> dict[str, str]:
    """VITSERVE_* for every setting the options give a value (unset ones stay unset), paths made absolute."""
    env = {}
    for name in settings_class.model_fields:
        value = getattr(args, name)
        if value is None:
            continue
        if isinstance(value, Path):
            value = value.resolve()
        env[f"VITSERVE_{name.upper()}"] = json.dumps(value) if isinstance(value, list) else \
            str(value).lower() if isinstance(value, bool) else str(value)
    return env


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from service.artifact import ArtifactError, load_artifact

    try:
        load_artifact(args.artifact, verify=True)
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from service.settings import Settings

    if args.api_key:
        args.api_keys = ",".join(args.api_key)
    env = {**os.environ, **setting_environment(args, Settings),
           "BENTOML_DO_NOT_TRACK": os.environ.get("BENTOML_DO_NOT_TRACK", "True")}
    try:
        settings = Settings(**{name: getattr(args, name) for name in Settings.model_fields if getattr(args, name) is not None})
    except ValueError as e:  # pydantic's ValidationError: a bad value, an unreadable key file, half a TLS pair
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmd = [
        sys.executable, "-m", "bentoml", "serve", "service.app:VitServe",
        "--working-dir", str(ROOT), "--host", settings.host, "--port", str(settings.port),
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
