"""`vitserve bench fuzz`: atheris on every request parser. A short run here (the committed results are 1,000,000
executions per parser); and the harness's own judgement: what counts as a crash."""

from __future__ import annotations

import json

import pytest

from benchmarks import fuzz
from service.errors import EngineFailure, InvalidParameter

pytest.importorskip("atheris", reason="atheris (a dev dependency) is not installed")


@pytest.mark.timeout(300)
def test_a_short_fuzz_run_of_every_parser_finds_no_crash(tmp_path, monkeypatch):
    from benchmarks.cli import main
    from benchmarks.harness import results as common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert main(["fuzz", "--runs", "2000", "--workdir", str(tmp_path / "work"), "--name", "fuzz-test"]) == 0
    results = json.loads((tmp_path / f"fuzz-test_{common.env_tag(common.environment())}.json").read_text())["results"]
    assert [r["target"] for r in results] == list(fuzz.TARGETS)
    for r in results:
        assert r["executions"] >= 2000 and r["crashes"] == 0 and r["exit_code"] == 0, r
        assert r["coverage_edges"] and r["coverage_edges"] > 10, r  # instrumented: coverage guides the mutations


@pytest.mark.parametrize("target", fuzz.TARGETS)
def test_every_seed_is_a_request_the_parser_accepts(target):
    for seed in fuzz.seeds(target):
        fuzz.parse(target, seed)  # raises for a seed the server would refuse


def test_the_harness_calls_a_4xx_the_parser_doing_its_job_and_anything_else_a_crash(monkeypatch):
    def raising(exc):
        def parse(target, data):
            raise exc
        return parse

    monkeypatch.setattr(fuzz, "parse", raising(InvalidParameter("bad top_k")))
    fuzz.check("base64", b"x")  # a client's mistake, answered 422: fine
    monkeypatch.setattr(fuzz, "parse", raising(EngineFailure("boom")))
    with pytest.raises(AssertionError, match="got a 500"):
        fuzz.check("base64", b"x")
    monkeypatch.setattr(fuzz, "parse", raising(KeyError("images")))
    with pytest.raises(KeyError):
        fuzz.check("base64", b"x")


def test_what_the_fuzzer_found_stays_fixed():
    """Crashes `vitserve bench fuzz` found, as regressions: "³" is a digit to str.isdigit() but not to int(), so an
    Inference-Header-Content-Length (read as latin-1) or a top_k holding it was a 500."""
    head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1],
                                   "parameters": {"binary_data_size": len(fuzz.JPEG) + 4}}]}).encode()
    fuzz.check("v2_binary", "³86".encode("latin-1") + b"\n" + head + len(fuzz.JPEG).to_bytes(4, "little") + fuzz.JPEG)
    seed = fuzz.seeds("multipart")[1]
    fuzz.check("multipart", seed.replace(b"\r\n\r\n3\r\n", "\r\n\r\n³\r\n".encode("latin-1")))
    fuzz.check("base64", json.dumps({"images": [], "top_k": "³"}).encode())
