"""The benchmark code itself, on a tiny model and a tiny local HTTP server, in seconds. No timed assertions on
performance: these check that the benchmarks run, record every field, count correctly and offer load as promised."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import threading
from contextlib import contextmanager

import pytest

from benchmarks.harness import results as common
from benchmarks.harness.load import check_url, closed_loop, open_loop, poisson_schedule
from benchmarks.harness.measure import latency_summary_ms, percentile
from benchmarks.harness.prometheus import parse_prometheus, stage_breakdown
from benchmarks.models import CONFIGS, shape_from_hf, vit_flops
from benchmarks.photos import realistic_photos

pytestmark = pytest.mark.timeout(300)


# ---- arithmetic --------------------------------------------------------------------------------------------------
def test_vit_large_flops_is_123_1_gflop():
    f = vit_flops(CONFIGS["vit-large"])
    assert f["tokens"] == 197
    assert f["total"] / 1e9 == pytest.approx(123.1, abs=0.05)
    # The same from an HF config.json, as `--checkpoint` reads it.
    hf = {"image_size": 224, "patch_size": 16, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
          "intermediate_size": 4096, "id2label": {str(i): str(i) for i in range(1000)}}
    assert vit_flops(shape_from_hf(hf))["total"] == f["total"]
    assert vit_flops(CONFIGS["vit-base"])["total"] / 1e9 == pytest.approx(35.1, abs=0.05)  # 17.6 GMACs, as usually quoted


def test_percentiles_on_known_inputs():
    assert percentile([], 50) is None
    assert percentile([7], 99) == 7
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([4, 1, 3, 2], 0) == 1 and percentile([4, 1, 3, 2], 100) == 4  # order of input does not matter
    assert percentile(range(1, 101), 90) == pytest.approx(90.1)  # rank 0.9 × 99 = 89.1 → 90 + 0.1 × (91 − 90)
    assert percentile(range(1, 101), 99) == pytest.approx(99.01)
    assert percentile([10, 20], 25) == pytest.approx(12.5)
    with pytest.raises(ValueError):
        percentile([1, 2], 101)
    s = latency_summary_ms([0.010] * 98 + [0.100, 1.000])  # seconds in, milliseconds out
    assert s["count"] == 100 and s["p50_ms"] == 10 and s["max_ms"] == 1000
    assert s["p99_ms"] == pytest.approx(100 + 0.01 * 900)  # between the two slowest
    assert s["mean_ms"] == pytest.approx((0.98 + 0.1 + 1.0) / 100 * 1000)


def test_poisson_schedule_has_the_exact_count_and_exponential_gaps():
    times = poisson_schedule(rate=200, duration_s=10, seed=3)
    assert len(times) == 2000 and times == sorted(times) and 0 <= times[0] and times[-1] <= 10
    gaps = [b - a for a, b in zip(times, times[1:])]
    cv = statistics.pstdev(gaps) / statistics.mean(gaps)
    assert 0.85 < cv < 1.15  # exponential gaps have a coefficient of variation of 1 (a fixed-interval sender: 0)
    assert poisson_schedule(200, 10, seed=3) == times and poisson_schedule(200, 10, seed=4) != times


def test_prometheus_deltas_give_stage_means():
    def text(n_img, n_batch, decode, queue, infer, images_in_batches):
        return "\n".join([
            "# HELP vitserve_decode_duration_seconds x", "# TYPE vitserve_decode_duration_seconds histogram",
            f"vitserve_decode_duration_seconds_sum {decode}", f"vitserve_decode_duration_seconds_count {n_img}",
            f"vitserve_queue_wait_duration_seconds_sum {queue}", f"vitserve_queue_wait_duration_seconds_count {n_img}",
            f'vitserve_batch_inference_duration_seconds_sum{{engine="e"}} {infer}',
            f'vitserve_batch_inference_duration_seconds_count{{engine="e"}} {n_batch}',
            f'vitserve_batch_size_sum{{engine="e"}} {images_in_batches}', f'vitserve_batch_size_count{{engine="e"}} {n_batch}',
            f'vitserve_request_duration_seconds_sum{{protocol="json",status="200"}} {n_img * 0.5}',
            f'vitserve_request_duration_seconds_count{{protocol="json",status="200"}} {n_img}',
            'vitserve_request_duration_seconds_sum{protocol="json",status="429"} 99',
            'vitserve_request_duration_seconds_count{protocol="json",status="429"} 1',
        ])

    before = parse_prometheus(text(10, 5, 1.0, 2.0, 3.0, 10))
    after = parse_prometheus(text(50, 15, 3.0, 10.0, 8.0, 50))  # +40 images in +10 batches over a 10 s window
    s = stage_breakdown(before, after, window_s=10)
    assert s["available"] and s["images"] == 40 and s["batches"] == 10 and s["mean_batch_size"] == 4.0
    assert s["decode_ms_per_image"] == 50.0 and s["queue_wait_ms_per_image"] == 200.0
    assert s["inference_ms_per_batch"] == 500.0 and s["inference_ms_per_image"] == 125.0
    assert s["engine_busy_fraction"] == 0.5
    assert s["server_request_ms"] == 500.0  # status="200" only: the 429 sample is not mixed in
    assert stage_breakdown(None, after, 10) == {"available": False}


def test_only_loopback_urls_unless_asked():
    assert check_url("http://127.0.0.1:3000/", allow_remote=False) == "http://127.0.0.1:3000"
    with pytest.raises(ValueError, match="loopback"):
        check_url("http://example.com:3000", allow_remote=False)
    assert check_url("http://example.com", allow_remote=True) == "http://example.com"


def test_realistic_photos_are_real_jpegs_and_pngs():
    photos = realistic_photos()
    assert {p.content_type for p in photos} == {"image/jpeg", "image/png"}
    assert photos[0].data[:3] == b"\xff\xd8\xff" and photos[1].data[:8] == b"\x89PNG\r\n\x1a\n"
    import io

    from PIL import Image

    assert all(Image.open(io.BytesIO(p.data)).size == (640, 480) for p in photos)


# ---- the load generator against a tiny local HTTP server ------------------------------------------------------------
class FakeService:
    """HTTP/1.1 keep-alive server on 127.0.0.1 in its own thread: answers POST /classify after ``delay`` s with a
    vitserve-shaped body (POST /fail: 503), serves /metrics, and records how many requests it held at once."""

    def __init__(self, delay: float):
        self.delay = delay
        self.in_flight = self.max_in_flight = self.requests = 0
        self.loop = asyncio.new_event_loop()
        self.url = ""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                await reader.readexactly(int(headers.get("content-length", 0)))
                if path == "/metrics":
                    n = self.requests
                    body, status = (f"vitserve_batch_size_sum {n}\nvitserve_batch_size_count {n}\n"
                                    f"vitserve_decode_duration_seconds_sum {n * 0.01}\nvitserve_decode_duration_seconds_count {n}\n").encode(), 200
                else:
                    self.in_flight += 1
                    self.max_in_flight = max(self.max_in_flight, self.in_flight)
                    await asyncio.sleep(self.delay)
                    self.in_flight -= 1
                    self.requests += 1
                    status = 503 if path == "/fail" else 200
                    pred = {"label": "a", "index": 0, "score": 1.0}
                    body = json.dumps({"model": "m", "version": "1", "predictions": [{"top1": pred, "top5": [pred] * 5}]}).encode()
                writer.write(f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @contextmanager
    def running(self):
        started = threading.Event()

        async def serve():
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            started.set()
            async with server:
                try:
                    await server.serve_forever()
                except asyncio.CancelledError:  # stopped by the test
                    pass

        thread = threading.Thread(target=lambda: self.loop.run_until_complete(serve()), daemon=True)
        thread.start()
        started.wait(10)
        try:
            yield self
        finally:
            for task in asyncio.all_tasks(self.loop):
                self.loop.call_soon_threadsafe(task.cancel)
            thread.join(5)


@pytest.fixture(scope="module")
def bodies():
    from benchmarks.harness.load import multipart_bodies

    return multipart_bodies(realistic_photos()[:4])


def test_open_loop_keeps_its_rate_while_the_server_is_slow(bodies):
    # Each answer takes 0.3 s and requests arrive every 25 ms on average: a client that waited for answers would
    # send ~3/s. The open loop must still send at 40/s and hold many requests outstanding at once.
    fake = FakeService(delay=0.3)
    with fake.running():
        r = asyncio.run(open_loop(fake.url, bodies, rate=40, warmup_s=0.25, duration_s=1.5, max_outstanding=64, timeout_s=10))
    assert r["target_rate_rps"] == 40 and r["requests"] == 60  # round(40 × 1.5) arrivals in the window
    assert r["achieved_arrival_rps"] == pytest.approx(40, rel=0.15)
    assert r["statuses"] == {"200": 60} and r["dropped_by_client"] == 0
    assert fake.max_in_flight >= 5  # sent on schedule, not after earlier answers
    assert r["latency"]["count"] == 60 and r["latency"]["p50_ms"] >= 300  # counted from the scheduled time
    assert r["server_stages"]["available"] and r["server_stages"]["decode_ms_per_image"] == 10.0


def test_open_loop_caps_outstanding_and_counts_drops(bodies):
    fake = FakeService(delay=0.5)
    with fake.running():
        r = asyncio.run(open_loop(fake.url, bodies, rate=30, warmup_s=0.0, duration_s=1.0, max_outstanding=3, timeout_s=10))
    assert fake.max_in_flight <= 3
    assert r["dropped_by_client"] > 0 and r["errors"]["dropped_by_client"] == r["dropped_by_client"]
    assert r["statuses"].get("200", 0) + r["dropped_by_client"] == r["requests"] == 30


def test_closed_loop_holds_its_concurrency_and_counts_errors_by_status(bodies):
    fake = FakeService(delay=0.05)
    with fake.running():
        ok = asyncio.run(closed_loop(fake.url, bodies, concurrency=3, warmup_s=0.2, duration_s=0.8))
        bad = asyncio.run(closed_loop(fake.url, bodies, concurrency=2, warmup_s=0.0, duration_s=0.3, path="/fail"))
    assert fake.max_in_flight == 3
    assert ok["concurrency"] == 3 and ok["statuses"] == {"200": ok["requests"]} and ok["throughput_rps"] > 0
    assert ok["latency"]["p50_ms"] >= 50
    assert set(bad["errors"]) == {"503"} and bad["throughput_rps"] == 0 and bad["latency"]["count"] == 0


def test_load_command_writes_every_field(bodies, tmp_path, monkeypatch, capsys):
    from benchmarks.cli import main

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    fake = FakeService(delay=0.02)
    with fake.running():
        assert main(["load", "--url", fake.url, "--concurrency", "2", "--rates", "20", "--warmup", "0.2",
                     "--duration", "0.6", "--name", "load-test"]) == 0
    payload = json.loads(next(tmp_path.glob("load-test_*.json")).read_text())
    assert {"benchmark", "command", "environment", "load_average", "settings", "images", "closed_loop", "open_loop", "saturation"} <= set(payload)
    _check_run_fields(payload["closed_loop"][0])
    _check_run_fields(payload["open_loop"][0])
    assert "vitserve bench summary: service load" in capsys.readouterr().out


def _check_run_fields(r: dict) -> None:
    assert {"mode", "window_s", "requests", "throughput_rps", "throughput_images_per_s", "latency", "statuses", "errors",
            "send_lag_ms", "server_stages"} <= set(r)
    assert {"count", "p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms"} <= set(r["latency"])
    assert {"machine_busy_cores", "ours_cores", "other_processes_cores"} <= set(r["cpu"])


# ---- the real benchmarks, on the tiny model --------------------------------------------------------------------------
def test_engine_sweep_runs_on_cpu_and_skips_gpu_paths(tmp_path, monkeypatch, capsys):
    from benchmarks.cli import main

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert main(["engines", "--config", "tiny", "--batches", "1,2", "--min-seconds", "0.05", "--devices", "cpu,cuda",
                 "--wait-quiet", "0", "--name", "sweep-test"]) == 0
    payload = json.loads(next(tmp_path.glob("sweep-test_*.json")).read_text())
    assert {"environment", "model", "settings", "flops_per_image", "rows", "best", "skipped", "targets"} <= set(payload)
    engines = {r["engine"] for r in payload["rows"]}
    assert engines == {"onnxruntime-cpu-fp32", "onnxruntime-cpu-int8-dynamic", "onnxruntime-cpu-int8-static", "pytorch-cpu-fp32"}
    for r in payload["rows"]:
        assert {"batch", "images_per_s", "seconds_per_batch", "ms_per_batch", "model_tflops", "repeats", "other_processes_cores"} <= set(r)
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["seconds_per_batch"], rel=1e-3)
    import torch

    if not torch.cuda.is_available():  # every GPU variant is listed as skipped, with its reason
        assert "pytorch-cuda-fp16-cudagraph" in payload["skipped"] and payload["matmul"] is None
        assert payload["targets"]["gpu_engine_fraction_of_matmul"]["met"] is None
    assert "vitserve bench summary: engine sweep" in capsys.readouterr().out


def test_int8_schemes_benchmark_times_and_judges_every_scheme(tmp_path, monkeypatch, capsys):
    from benchmarks.cli import main

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert main(["int8", "--config", "tiny", "--images", "32", "--calibration-images", "8", "--min-seconds", "0.05",
                 "--name", "int8-test"]) == 0
    payload = json.loads(next(tmp_path.glob("int8-test_*.json")).read_text())
    assert set(payload["schemes"]) == {"fp32", "old", "dynamic", "static"}
    for name, r in payload["schemes"].items():
        assert set(r["images_per_s"]) == {"1", "4", "8", "32"} and all(v > 0 for v in r["images_per_s"].values())
        assert r["parity"]["images"] == 32 and r["per_image"] == (name in ("old", "dynamic"))
    assert payload["schemes"]["static"]["quantization"]["saturation_free"] is True
    assert "vitserve bench summary: int8 schemes" in capsys.readouterr().out


def test_compare_runs_every_peer_and_records_every_field(tiny_artifact, tmp_path, monkeypatch, capsys):
    from benchmarks.cli import main

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert main(["compare", "--artifact", str(tiny_artifact), "--concurrency", "2", "--rate-fractions", "0.5",
                 "--warmup", "0.3", "--duration", "1", "--open-duration", "1", "--raw-seconds", "0.1", "--max-batch", "4",
                 "--wait-quiet", "0", "--workdir", str(tmp_path / "work"), "--name", "compare-test"]) == 0
    out = capsys.readouterr().out
    payload = json.loads((tmp_path / f"compare-test_{common.env_tag(common.environment())}.json").read_text())
    assert {"benchmark", "command", "environment", "load_average", "wall_s", "settings", "model", "images", "raw_engine",
            "services", "offered_rates_rps", "targets", "validity", "figure"} <= set(payload)
    assert {"date", "git_sha", "cpu", "cpu_count", "gpu", "versions"} <= set(payload["environment"])
    raw = payload["raw_engine"]
    assert raw["decode_preprocess"]["mean_ms_per_image"] > 0 and [r["batch"] for r in raw["batches"]] == [1, 4]
    assert len(raw["passes"]) == 2  # before and after the services
    assert len(payload["validity"]["other_processes_cores"]) == 3 * 2 + 2  # every window is accounted for
    assert set(payload["services"]) == {"vitserve", "bentoml-batching", "naive-pipeline"}
    for name, svc in payload["services"].items():
        assert svc["answer_check"]["checked_requests"] > 0
        assert {"other_processes_cores_mean", "other_processes_cores_max"} <= set(svc["cpu"])  # contention recorded
        assert len(svc["closed_loop"]) == 1 and len(svc["open_loop"]) == 1
        for run in svc["closed_loop"] + svc["open_loop"]:
            _check_run_fields(run)
        assert svc["open_loop"][0]["target_rate_rps"] == payload["offered_rates_rps"][0]  # same offered load for all
    ours = payload["services"]["vitserve"]["closed_loop"][0]["server_stages"]
    assert payload["services"]["vitserve"]["closed_loop"][0]["littles_law_images_per_s"] > 0
    assert ours["available"] and {"mean_batch_size", "queue_wait_ms_per_image", "inference_ms_per_batch",
                                  "decode_ms_per_image", "engine_busy_fraction"} <= set(ours)
    assert set(payload["targets"]) == {"vs_raw_end_to_end", "vs_bentoml_throughput", "vs_bentoml_p99", "vs_naive_throughput",
                                       "gpu_vs_raw_engine", "gpu_p99_ms_at_half_peak"}
    for t in payload["targets"].values():  # a miss always says by how much and what the histograms blame
        if t["met"] is False:
            assert "missed_by" in t and "blame" in t
    assert (tmp_path / payload["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / payload["figure"]).with_suffix(".md").read_text()
    assert "| bentoml-batching |" in md and "### Targets" in md
    assert "vitserve bench summary: compare" in out and "target vs_naive_throughput" in out


def test_refusal_cost_refuses_every_request_and_measures_both_servers(tmp_path, monkeypatch, capsys):
    """`vitserve bench refusal-cost` end to end: every flooded request refused (429) by the real service, every one
    answered by uvicorn's floor, a CPU figure for each; this process's cores restored afterwards."""
    import os

    from benchmarks.cli import main

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    cores = os.sched_getaffinity(0)
    assert main(["refusal-cost", "--duration", "1", "--workdir", str(tmp_path / "work"), "--name", "refusal-test"]) == 0
    assert os.sched_getaffinity(0) == cores
    payload = json.loads((tmp_path / f"refusal-test_{common.env_tag(common.environment())}.json").read_text())
    assert set(payload["refused"]["statuses"]) == {"429"} and set(payload["uvicorn_floor"]["statuses"]) == {"200"}
    assert payload["refused"]["server_cpu_us_per_request"] > 0 and payload["uvicorn_floor"]["server_cpu_us_per_request"] > 0
    assert "vitserve bench summary: refusal cost" in capsys.readouterr().out


def test_batch_assembly_measures_this_checkouts_batcher_against_the_engines_ceiling(tmp_path, monkeypatch, capsys):
    """`vitserve bench batch-assembly` end to end on small rows: the real Batcher in a child process answers the
    submitters, throughput is positive and cannot beat the stand-in engine's ceiling, the loop's CPU is measured."""
    from benchmarks.cli import main

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert main(["batch-assembly", "--size", "32", "--batch", "8", "--engine-ms", "4", "--clients", "16", "--rounds", "1",
                 "--warmup", "0.3", "--duration", "1", "--name", "assembly-test"]) == 0
    payload = json.loads((tmp_path / f"assembly-test_{common.env_tag(common.environment())}.json").read_text())
    (row,) = payload["results"]
    assert payload["engine_ceiling_images_per_s"] == 2000.0
    assert 0 < row["images_per_s"] <= payload["engine_ceiling_images_per_s"] * 1.02  # timer slack, not a faster engine
    assert row["loop_cpu_us_per_image"] > 0
    assert "vitserve bench summary: batch assembly" in capsys.readouterr().out


def test_engine_turns_times_every_pool_setting_on_the_served_engine_file(tmp_path, monkeypatch, capsys):
    """`vitserve bench engine-turns` on the demo artifact: each of the three ONNX Runtime pool settings runs whole
    cycles (an engine call, then a decode turn of as many photos), with its own session config written down."""
    from benchmarks.cli import main

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert main(["engine-turns", "--batch", "4", "--rounds", "1", "--cycles", "2", "--name", "turns-test"]) == 0
    payload = json.loads((tmp_path / f"turns-test_{common.env_tag(common.environment())}.json").read_text())
    assert [r["config"] for r in payload["rows"]] == [
        {"session.intra_op.allow_spinning": "0"}, {"session.force_spinning_stop": "1"}, {}]
    for row in payload["rows"]:
        assert row["engine_ms"] > 0 and row["decode_turn_ms"] > 0 and row["images_per_s"] > 0 and row["cpu_ms_per_image"] > 0
        assert row["cycle_ms"] == pytest.approx(row["engine_ms"] + row["decode_turn_ms"], abs=0.01)
    assert "vitserve bench summary: engine-turns" in capsys.readouterr().out


def test_door_budget_splits_the_loops_cpu_into_the_routes_own_layers(tmp_path, monkeypatch, capsys):
    """`vitserve bench door-budget` on the demo artifact: the service's own HTTP protocol in front of its guarded app,
    serving real closed-loop requests of every protocol in process (a refusal or error fails the run), the same
    protocol in front of a fixed answer, then each layer of the route timed alone; the split adds up to the in-process
    total by construction, so every layer is checked on its own."""
    from benchmarks.cli import main

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert main(["door-budget", "--clients", "4", "--requests", "16", "--calls", "20", "--rounds", "1", "--name", "door-test"]) == 0
    payload = json.loads((tmp_path / f"door-test_{common.env_tag(common.environment())}.json").read_text())
    assert set(payload["protocols"]) == {"raw", "multipart", "v2-binary"}
    for protocol, figures in payload["protocols"].items():
        assert figures["whole request in process"] > 0 and figures["requests/s in process"] > 0, figures
        for layer in ("uvicorn: HTTP parse, request cycle, response bytes", "read the body", "the door (accept, admit, count)", "top-k (from the batch's scores; the tally)", "render the answer",
                      "two ASGI messages"):
            assert figures[layer] > 0, (protocol, layer, figures)
        assert (figures["body → images"] > 0) == (protocol != "raw"), figures  # the raw body is the image itself
        split = payload["budget"][protocol]
        parts = sum(v for k, v in split.items() if not k.startswith("total"))
        assert parts == pytest.approx(split["total in process (all but the client sockets' system calls)"], abs=0.1)
    assert "vitserve bench summary: door-budget" in capsys.readouterr().out


def test_front_door_loads_every_protocol_and_the_litserve_peer(tiny_artifact, tmp_path, monkeypatch, capsys):
    """`vitserve bench front-door` end to end on the tiny artifact: every protocol of ours answered (no refusals at
    default settings), LitServe's idiom around the same engine answered too, each figure against raw serial."""
    from benchmarks.cli import main

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    # 2 clients: within the door's floor (two full batches) whatever batch size this CPU's speed curve picks.
    assert main(["front-door", "--artifact", str(tiny_artifact), "--concurrency", "2", "--duration", "1", "--warmup", "0.5",
                 "--litserve", "--workdir", str(tmp_path / "work"), "--name", "front-door-test"]) == 0
    payload = json.loads((tmp_path / f"front-door-test_{common.env_tag(common.environment())}.json").read_text())
    phases = {(p["server"], p["protocol"]): p for p in payload["phases"]}
    assert set(phases) == {*(("vitserve", p) for p in ("multipart", "raw", "base64", "v2-binary", "grpc")), ("litserve", "base64")}
    for p in phases.values():
        assert p["images_per_s"] > 0 and set(p["statuses"]) == {"200"}, p  # every request answered, none refused
        assert p["server_cpu_ms_per_image"] > 0 and p["of_raw_serial"] > 0
        if p["server"] == "vitserve":  # the budget by thread: the loop and decode named, adding up to the whole
            by = p["server_cpu_ms_per_image_by_thread"]
            assert by["event loop"] > 0 and by["decode"] > 0, by
            # each thread's reading is in clock ticks (10 ms): allow a few per thread over the 1 s window's images,
            # so a slower CPU (fewer images) cannot fail this on rounding
            ticks_ms = 8 * 1000 / os.sysconf("SC_CLK_TCK") / max(p["images_per_s"], 1)
            assert sum(by.values()) == pytest.approx(p["server_cpu_ms_per_image"], rel=0.25, abs=max(0.05, ticks_ms)), by
    serial = payload["raw_serial"]
    assert serial["images_per_s"] > 0 and serial["decode_ms_per_image"] > 0
    # the same decode on the service's decode threads at once: the same work, so near the serial figure
    assert 0.5 < serial["decode_cpu_ms_per_image_all_cores"] / serial["decode_cpu_ms_per_image"] < 3, serial
    report = (tmp_path / f"front-door-test_{common.env_tag(common.environment())}.md").read_text()
    assert "threads decoding at once" in report
    assert "vitserve bench summary: front door" in capsys.readouterr().out
