"""Coverage-guided fuzzing of every request parser with atheris (libFuzzer for Python), from seeds of valid requests.

    vitserve bench fuzz                               # 1,000,000 executions per parser, results committed
    vitserve bench fuzz --runs 2000 --no-write        # the short run the test suite does
    vitserve bench fuzz --jobs 2                      # two parsers at a time

Each target is the server's own parsing code, from bytes on the wire to the checks that run before an image is
decoded: multipart (python-multipart's parser as the routes drive it), base64 JSON, KServe v2 JSON and its binary
extension (``Inference-Header-Content-Length``, ``binary_data_size``), and gRPC ModelInferRequest messages (the
lenient deserializer the server registers, then the same parse and v2 checks). The first bytes of an input choose the
header values (a content type, a header length) the way a client's headers would. A **crash** is any exception that is
not a ``ServiceError``, a ``ServiceError`` the error table answers with a 5xx, or a hang (libFuzzer's per-input timeout).

Each parser runs in its own process (libFuzzer exits when it is done), instrumented with atheris so that coverage
guides the mutations; the table reports executions, time, libFuzzer's coverage counters (``cov``: edges reached,
``ft``: features) and the corpus it grew.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ("multipart", "base64", "v2_json", "v2_binary", "grpc")
LABELS, INPUT_SIZE = 10, (32, 32)
JPEG = bytes.fromhex("ffd8ffe000104a46494600010100000100010000ffdb0043000302020302020303030304030304050805050404050a07070608"
                     "0c0a0c0c0b0a0b0b0d0e12100d0e110e0b0b1016101113141515150c0f171816141812141514ffd9")  # a JPEG's framing


def seeds(target: str) -> list[bytes]:
    """Valid requests of the target's kind: the mutations start from what clients really send."""
    if target == "multipart":
        b = b"vitservefuzz"
        part = lambda name, data, ctype=b"image/jpeg": (  # noqa: E731
            b"--" + b + b'\r\nContent-Disposition: form-data; name="' + name + b'"; filename="a.jpg"\r\nContent-Type: ' + ctype
            + b"\r\n\r\n" + data + b"\r\n")
        head = b"multipart/form-data; boundary=" + b + b"\n"
        return [head + part(b"images", JPEG) + b"--" + b + b"--\r\n",
                head + part(b"images", JPEG) + part(b"images", JPEG) + part(b"top_k", b"3", b"text/plain") + b"--" + b + b"--\r\n"]
    if target == "base64":
        encoded = base64.b64encode(JPEG).decode()
        return [json.dumps({"images": [encoded]}).encode(), json.dumps({"images": [encoded, encoded], "top_k": 2}).encode()]
    if target == "v2_json":
        encoded = base64.b64encode(JPEG).decode()
        return [b"\n" + json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [encoded]}],
                                    "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}]}).encode(),
                b"\n" + json.dumps({"id": "x", "inputs": [{"name": "pixel_values", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                                           "data": [0.5] * (3 * 32 * 32)}]}).encode()]
    if target == "v2_binary":
        head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1],
                                       "parameters": {"binary_data_size": len(JPEG) + 4}}],
                           "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
        return [str(len(head)).encode() + b"\n" + head + struct.pack("<I", len(JPEG)) + JPEG]
    if target == "grpc":
        from service.protos import grpc_service_pb2 as pb

        req = pb.ModelInferRequest(model_name="m", id="1")
        req.inputs.add(name="image", datatype="BYTES", shape=[1, 1])
        req.outputs.add(name="probabilities").parameters["classification"].int64_param = 5
        req.raw_input_contents.append(struct.pack("<I", len(JPEG)) + JPEG)
        typed = pb.ModelInferRequest(model_name="m")
        t = typed.inputs.add(name="pixel_values", datatype="FP32", shape=[1, 3, 32, 32])
        t.contents.fp32_contents.extend([0.25] * (3 * 32 * 32))
        return [req.SerializeToString(), typed.SerializeToString()]
    raise ValueError(target)


def _split_header(data: bytes, limit: int = 256) -> tuple[bytes, bytes]:
    """The input's first line stands for a header value (a content type, a header length); the rest is the body."""
    head, sep, body = data[:limit].partition(b"\n")
    return (head, data[len(head) + 1 :]) if sep else (b"", data)


def parse(target: str, data: bytes) -> None:
    """The server's parsing path for ``target`` on ``data``; raises what the server would answer."""
    from service import kserve_v2
    from service.http_inference import base64_images, multipart_images, parse_top_k

    if target == "multipart":
        content_type, body = _split_header(data)
        images, top_k = multipart_images(body, content_type)
        parse_top_k(top_k)
    elif target == "base64":
        images, top_k = base64_images(data)
        parse_top_k(top_k)
    elif target in ("v2_json", "v2_binary"):
        from service.v2_http_api import parse_request

        length, body = _split_header(data, 16)
        inputs, outputs, _, _ = parse_request(body, length.decode("latin-1") if target == "v2_binary" else None)
        kserve_v2.validate(inputs, outputs, LABELS, INPUT_SIZE)
    elif target == "grpc":
        from service.grpc_api import Undecodable, decode
        from service.grpc_api import parse_request as parse_grpc
        from service.protos import grpc_service_pb2 as pb

        request = decode(pb.ModelInferRequest)(data)
        if isinstance(request, Undecodable):
            raise request.error
        inputs, outputs = parse_grpc(request)
        kserve_v2.validate(inputs, outputs, LABELS, INPUT_SIZE)
    else:
        raise ValueError(target)


def check(target: str, data: bytes) -> None:
    """One execution: a ``ServiceError`` answered with a 4xx is the parser doing its job; anything else is a crash."""
    from service.errors import ServiceError, http_status

    try:
        parse(target, data)
    except ServiceError as e:
        if http_status(e) >= 500:
            raise AssertionError(f"a client's bytes got a {http_status(e)}: {e.type}: {e.message}") from e


# ---- one parser in its own process ------------------------------------------------------------------------------------------
def _fuzz_one(target: str, libfuzzer_args: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["service", "python_multipart"]):
        import python_multipart.multipart  # noqa: F401

        import service.grpc_api  # noqa: F401
        import service.http_inference  # noqa: F401
        import service.kserve_v2  # noqa: F401
        import service.v2_http_api  # noqa: F401
    atheris.Setup([sys.argv[0], *libfuzzer_args], lambda data: check(target, data))
    atheris.Fuzz()


_DONE = re.compile(r"Done (\d+) runs in (\d+) second")
_STATS = re.compile(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)")


def run_target(target: str, runs: int, workdir: Path, timeout_s: int = 10) -> dict:
    corpus, seed_dir, artifacts = workdir / target / "corpus", workdir / target / "seeds", workdir / target / "crashes"
    for d in (corpus, seed_dir, artifacts):
        d.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(seeds(target)):
        (seed_dir / f"seed-{i}").write_bytes(s)
    cmd = [sys.executable, "-m", "benchmarks.fuzz", "--one", target, "--", f"-runs={runs}", f"-timeout={timeout_s}",
           f"-artifact_prefix={artifacts}/", "-print_final_stats=1", str(corpus), str(seed_dir)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    seconds = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    stats = _STATS.findall(log)
    done = _DONE.search(log)
    crashes = sorted(p.name for p in artifacts.iterdir())
    executions = int(done.group(1)) if done else (int(stats[-1][0]) if stats else 0)
    return {
        "target": target, "executions": executions, "seconds": round(seconds, 1),
        "executions_per_s": round(executions / seconds, 1) if seconds else None,
        "coverage_edges": int(stats[-1][1]) if stats else None, "features": int(stats[-1][2]) if stats else None,
        "corpus": len(list(corpus.iterdir())), "crashes": len(crashes), "crash_files": crashes,
        "exit_code": proc.returncode, "log_tail": log[-3000:] if proc.returncode else "",
    }


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="vitserve bench fuzz", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated: " + ", ".join(TARGETS))
    p.add_argument("--runs", type=int, default=1_000_000, help="executions per parser")
    p.add_argument("--jobs", type=int, default=1, help="parsers fuzzed at once (each is one process)")
    p.add_argument("--workdir", type=Path, default=None, help="corpora and crash files (default: a temporary folder)")
    p.add_argument("--name", default="fuzz")
    p.add_argument("--no-write", action="store_true")
    return p


def table(results: list[dict]) -> str:
    lines = ["| parser | executions | seconds | exec/s | coverage (edges / features) | corpus | crashes |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['target']} | {r['executions']:,} | {r['seconds']} | {r['executions_per_s']} | "
                     f"{r['coverage_edges']} / {r['features']} | {r['corpus']} | {r['crashes']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one"]:  # a child: one parser under libFuzzer (never returns)
        _fuzz_one(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
    from benchmarks.harness.results import command_line, environment, finish

    args = build_parser().parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    if unknown := set(targets) - set(TARGETS):
        raise SystemExit(f"unknown targets: {', '.join(sorted(unknown))}; choose from {', '.join(TARGETS)}")
    with tempfile.TemporaryDirectory(prefix="vitserve-fuzz-") as tmp:
        workdir = args.workdir or Path(tmp)
        from concurrent.futures import ThreadPoolExecutor

        def one(target: str) -> dict:
            r = run_target(target, args.runs, workdir)
            print(f"  {target:>10}: {r['executions']:,} executions in {r['seconds']} s, cov {r['coverage_edges']}, "
                  f"crashes {r['crashes']}", flush=True)
            if r["crashes"] or r["exit_code"]:
                print(r["log_tail"], file=sys.stderr)
            return r

        with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # threads only wait: each parser is its own process
            results = list(pool.map(one, targets))
    payload = {"benchmark": "fuzz", "command": command_line("fuzz", argv), "environment": environment(), "runs": args.runs,
               "results": results}
    rows = [(r["target"], f"{r['executions']:,} runs, {r['crashes']} crashes, cov {r['coverage_edges']}") for r in results]
    finish("fuzz", payload, rows, table=table(results), name=None if args.no_write else args.name)
    return 1 if any(r["crashes"] or r["exit_code"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
