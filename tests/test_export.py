"""checkpoint → ONNX → engines → validated artifact, on tiny ViTs built in the session."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from export.checkpoint import load_checkpoint
from export.gate_inputs import default_image_bytes, preprocess_images, reference_logits, split_calibration
from service.artifact import ArtifactError, ParityThresholds, load_artifact, read_manifest, write_manifest
from service.engines import EngineRefused, candidates, fastest_batch, load_engine, open_engine
from service.engines.onnxruntime_engine import OnnxRuntimeEngine
from service.parity import DEFAULT_THRESHOLDS, check_engine, compare, images_needed, wilson_interval
from service.preprocess import Preprocessor
from tests.conftest import GATE_IMAGES, make_tiny_checkpoint, run_cli


@pytest.fixture(scope="module")
def parity_inputs(tiny_checkpoint):
    ckpt = load_checkpoint(str(tiny_checkpoint))
    pixels = preprocess_images(default_image_bytes(24), Preprocessor(ckpt.preprocessing))
    return ckpt, pixels, reference_logits(ckpt.model, pixels)


def test_artifact_layout_and_manifest(tiny_artifact, tiny_checkpoint):
    m = read_manifest(tiny_artifact)
    assert m.schema_version == 3 and m.preprocessing.jpeg_draft_margin == 1.0
    assert m.labels == [f"class_{i}" for i in range(10)]
    assert m.preprocessing.input_size == (32, 32) and m.preprocessing.mean == (0.5, 0.5, 0.5)
    assert m.temperature == 1.0
    files = {e.file: e for e in m.engines}
    fp16 = files["model.fp16.onnx"]
    assert fp16.precision == "fp16" and fp16.device == "cuda" and fp16.max_batch == 16
    assert fp16.inputs[0].dtype == "float32" and fp16.inputs[0].shape == ["batch", 3, 32, 32]
    cpu = [e for e in m.engines if e.format == "onnx" and e.device == "cpu"]
    choice = m.export_report["cpu_engine"]
    assert len(cpu) == 1 and cpu[0].file == choice["candidates"][choice["chosen"]]["file"]
    assert set(choice["candidates"]) == {"fp32", "int8-dynamic", "int8-static"}
    for name, c in choice["candidates"].items():  # every candidate was timed at every batch size up to the max
        assert set(map(int, c["images_per_s"])) == {1, 4, 8, 16} and c["best_batch"] in (1, 4, 8, 16)
        if name != choice["chosen"]:
            assert not (tiny_artifact / c["file"]).exists(), "a candidate that did not win is not shipped"
    passing = {n: c for n, c in choice["candidates"].items() if c["passed_gate"]}
    best = lambda c: c["images_per_s"][str(c["best_batch"])] if str(c["best_batch"]) in c["images_per_s"] else c["images_per_s"][c["best_batch"]]  # noqa: E731
    assert choice["chosen"] == max(passing, key=lambda n: best(passing[n])), "the fastest candidate that passed ships"
    assert cpu[0].speed is not None and cpu[0].speed.measured_on["isa"]
    assert "model.safetensors" in files["pytorch/model.safetensors"].file
    for e in m.engines:
        assert e.parity is not None and e.parity.passed and e.parity.images == int(GATE_IMAGES) - 0
        assert e.parity.decided_on == "lower_bound" and e.parity.hardware["cpu"]
    assert m.golden is not None and m.golden.images == 32 and (tiny_artifact / m.golden.file).is_file()
    pixels, reference = load_artifact(tiny_artifact).golden_set()
    assert pixels.shape == (32, 32, 32, 3) and pixels.dtype == np.uint8 and reference.shape == (32, 10)
    assert {"torch", "onnx", "onnxruntime", "transformers", "tensorrt"} <= set(m.versions)
    assert len(m.source.sha256) == 64
    report = json.loads((tiny_artifact / "parity_report.json").read_text())
    assert report["passed"] is True and len(report["engines"]) == 5  # fp16, fp32, int8 ×2, pytorch
    assert report["parity_images"] == {"count": int(GATE_IMAGES), "source": "scikit-image photographs", "calibration": 64}


def test_every_int8_file_is_saturation_free_and_says_how_it_batches(tiny_checkpoint, tmp_path):
    """Both INT8 schemes keep weights within ±64 (7 bits), checked on the file; only the static one batches."""
    from export.onnx_export import SATURATION_FREE_WEIGHT_MAX, export_fp32, quantize_int8_dynamic, quantize_int8_static

    ckpt = load_checkpoint(str(tiny_checkpoint))
    calibration = preprocess_images(default_image_bytes(16), Preprocessor(ckpt.preprocessing))
    fp32 = export_fp32(ckpt.model, tmp_path / "m.onnx", (32, 32), 16)
    for scheme, info in (("dynamic", quantize_int8_dynamic(fp32, tmp_path / "d.onnx")),
                         ("static", quantize_int8_static(fp32, tmp_path / "s.onnx", calibration))):
        model = onnx.load(str(tmp_path / f"{scheme[0]}.onnx"))
        weights = [numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
        assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= SATURATION_FREE_WEIGHT_MAX
        assert info.scheme == scheme and info.saturation_free and info.batch_invariant == (scheme == "static")
    assert info.calibration == {"method": "percentile", "images": 16}


def test_parity_and_calibration_images_are_disjoint():
    views = default_image_bytes(200)
    assert len({b for _, b in views}) == 200  # every view is different bytes
    gate, calibration = split_calibration(views, 40)
    assert len(gate) == 160 and len(calibration) == 40
    assert not {n for n, _ in gate} & {n for n, _ in calibration}
    assert {n.split("-view")[0] for n, _ in calibration} == {n.split("-view")[0] for n, _ in gate}  # all photos in both


def test_fp16_graph_is_half_precision_inside_with_fp32_io(tiny_artifact):
    model = onnx.load(str(tiny_artifact / "model.fp16.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dtypes = {init.data_type for init in model.graph.initializer if len(init.dims) == 2}
    assert dtypes == {onnx.TensorProto.FLOAT16}, "every weight matrix is FP16"
    ops = {n.op_type for n in model.graph.node}
    assert "LayerNormalization" in ops and "Erf" in ops  # fused LN (opset ≥ 17) and exact GELU
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17


@pytest.mark.parametrize("kind, file", [("onnxruntime-cpu", "model.fp16.onnx"), ("onnxruntime-cpu", "cpu"), ("pytorch-cpu", "pytorch/model.safetensors")])
def test_batch_sizes_give_the_same_logits_as_batch_one(tiny_artifact, parity_inputs, kind, file):
    art = load_artifact(tiny_artifact)
    entry = next(e for e in art.manifest.engines if e.file == file or (file == "cpu" and e.device == "cpu" and e.format == "onnx"))
    engine = open_engine(kind, art, entry)
    _, pixels, _ = parity_inputs
    alone = np.concatenate([engine.run(pixels[i : i + 1]) for i in range(8)])
    for n in (2, 3, 5, 8):
        batched = engine.run(pixels[:n])
        np.testing.assert_allclose(batched, alone[:n], atol=2e-3 if "fp16" in file else 1e-4)


def test_gate_fails_on_swapped_logit_columns(tiny_artifact, parity_inputs, tmp_path):
    ckpt, pixels, reference = parity_inputs
    art = load_artifact(tiny_artifact)
    entry = art.manifest.engine(format="onnx", precision="fp16")
    model = onnx.load(str(tiny_artifact / entry.file))
    # Swap the classifier's rows for the two most-predicted classes: a label-order bug in an export.
    top = np.bincount(reference.argmax(1), minlength=10).argsort()[::-1][:2]
    for init in model.graph.initializer:
        if init.name.endswith("classifier.weight"):
            w = numpy_helper.to_array(init).copy()
            w[[top[0], top[1]]] = w[[top[1], top[0]]]
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    engine = OnnxRuntimeEngine(broken, entry, (32, 32))
    # Judged as the startup check judges 24 images: a label swap is refuted even by so few.
    report = check_engine(engine, pixels, reference, temperature=1.0, thresholds=DEFAULT_THRESHOLDS["fp16"], decide_on="upper_bound")
    assert not report.passed
    assert report.top1_agreement < 0.9
    assert any("top-1 agreement" in f and "upper bound" in f for f in report.failures)
    # The intact file passes the same gate.
    good = check_engine(open_engine("onnxruntime-cpu", art, entry), pixels, reference, temperature=1.0,
                        thresholds=DEFAULT_THRESHOLDS["fp16"], decide_on="upper_bound")
    assert good.passed, good.failures


def test_gate_fails_on_perturbed_weights(parity_inputs):
    ckpt, pixels, reference = parity_inputs
    rng = np.random.default_rng(0)
    noisy = reference + rng.normal(0, 0.2, reference.shape).astype(np.float32)
    report = compare(reference, noisy, temperature=1.0, thresholds=DEFAULT_THRESHOLDS["fp16"], decide_on="upper_bound")
    assert not report.passed and any("Δlogit" in f for f in report.failures)


def test_gate_fails_on_batch_dependent_engine(parity_inputs):
    _, _, reference = parity_inputs
    batched = reference + np.linspace(0, 0.5, reference.shape[0], dtype=np.float32)[:, None] * np.eye(10, dtype=np.float32)[0]
    report = compare(reference, reference, temperature=1.0, thresholds=DEFAULT_THRESHOLDS["fp32"], alone=batched, decide_on="upper_bound")
    assert not report.passed and any("batch variation" in f for f in report.failures)


def test_wilson_interval_matches_hand_worked_values():
    # Wilson (1927) 95 % intervals, worked by hand from p ± z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n), z = 1.96.
    lo, hi = wilson_interval(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == pytest.approx(1.0)
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert wilson_interval(0, 20) == (0.0, pytest.approx(0.1611, abs=1e-4))
    assert images_needed(0.99) == 381 and images_needed(0.97) == 125  # n ≥ z²·t/(1-t)
    assert wilson_interval(381, 381)[0] >= 0.99 > wilson_interval(380, 380)[0]


def test_a_perfect_gate_on_too_few_images_fails_and_says_how_many_are_needed(parity_inputs):
    """Zero disagreements out of 24 shows only ~0.86 at 95 %: not "≥ 0.99". The gate says so and what would."""
    _, _, reference = parity_inputs
    report = compare(reference, reference, temperature=1.0, thresholds=DEFAULT_THRESHOLDS["fp32"])
    assert report.top1_agreement == 1.0 and report.top1_agreement_ci95[0] < 0.9 and not report.passed
    assert any("24 images cannot show 0.99" in f and "≥ 381" in f for f in report.failures)
    many = np.concatenate([reference] * 40)  # 960 images, all agreeing
    assert compare(many, many, temperature=1.0, thresholds=DEFAULT_THRESHOLDS["fp32"]).passed
    # One disagreement in 960 still shows ≥ 0.99 at 95 % (lower bound 0.994); six do not (0.986).
    top1_only = ParityThresholds(min_top1_agreement=0.99, min_top5_overlap=0.0, max_abs_logit_diff=1e9,
                                 max_abs_prob_diff=1.0, max_batch_logit_diff=1e9)
    for flips, shown in ((1, True), (6, False)):
        worse = many.copy()
        worse[:flips] = worse[:flips, ::-1]  # reversed logits: a different top-1
        report = compare(many, worse, temperature=1.0, thresholds=top1_only)
        assert report.passed == shown, report.failures


def test_checksum_tampering_is_detected(tiny_artifact, tmp_path):
    bad = tmp_path / "tampered"
    shutil.copytree(tiny_artifact, bad)
    target = bad / "model.fp16.onnx"
    data = bytearray(target.read_bytes())
    data[100] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch for model.fp16.onnx"):
        load_artifact(bad)
    # The engine loader verifies the file it is about to load, whatever the caller checked before.
    cpu_file = next(e.file for e in read_manifest(bad).engines if e.device == "cpu")
    data = bytearray((bad / cpu_file).read_bytes())
    data[-1] ^= 0x01
    (bad / cpu_file).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"checksum mismatch for {cpu_file}"):
        load_engine(load_artifact(bad, verify=False), "onnxruntime-cpu")
    (bad / "model.fp16.onnx").unlink()
    with pytest.raises(ArtifactError, match="model.fp16.onnx is missing"):
        load_artifact(bad)


def test_older_manifests_decode_jpegs_as_they_were_gated(tiny_artifact, tmp_path):
    raw = json.loads((tiny_artifact / "manifest.json").read_text())
    raw["schema_version"] = 2
    del raw["preprocessing"]["jpeg_draft_margin"]
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    assert read_manifest(tmp_path).preprocessing.jpeg_draft_margin == 2.0  # the margin of their time, not today's


def test_manifest_round_trips_and_rejects_unknown_fields(tiny_artifact, tmp_path):
    m = read_manifest(tiny_artifact)
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == m
    raw = json.loads((tmp_path / "manifest.json").read_text())
    raw["surprise"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="not a valid vitserve manifest"):
        read_manifest(tmp_path)
    raw.pop("surprise")
    raw["schema_version"] = 4  # a newer schema than this reader knows
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError):
        read_manifest(tmp_path)
    raw["schema_version"] = 3
    raw["engines"][0]["file"] = "../escape.onnx"
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError):
        read_manifest(tmp_path)
    with pytest.raises(ArtifactError, match="not a vitserve artifact"):
        read_manifest(tmp_path / "nowhere")


def test_auto_engine_choice_on_cpu(tiny_artifact):
    art = load_artifact(tiny_artifact)
    kinds = [k for k, _ in candidates(art, "auto", cuda=False)]
    assert kinds == ["onnxruntime-cpu", "pytorch-cpu"]
    gpu_kinds = [k for k, _ in candidates(art, "auto", cuda=True)]
    assert gpu_kinds[-2:] == ["onnxruntime-cpu", "pytorch-cpu"] and "pytorch-cuda" in gpu_kinds
    engine = load_engine(art, "auto")
    assert engine.name.startswith("onnxruntime-cpu-")


def test_calibrated_temperature_reaches_the_manifest(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", seed=3)
    (ckpt / "vitserve_calibration.json").write_text(json.dumps({"temperature": 1.7}))
    proc = run_cli("export", str(ckpt), "-o", str(tmp_path / "a"), "--max-images", GATE_IMAGES, "--no-pytorch", "--cpu-candidates", "fp32")
    assert proc.returncode == 0, proc.stderr
    assert read_manifest(tmp_path / "a").temperature == 1.7


def test_cli_help_lists_every_option_with_defaults():
    proc = run_cli("export", "--help")
    assert proc.returncode == 0
    for opt in ("--output", "--max-batch", "--opt-batch", "--tensorrt", "--calibration-dir", "--gate", "--max-images", "--cpu-candidates"):
        assert opt in proc.stdout
    assert "(default: 64)" in proc.stdout
    top = run_cli("--help")
    assert top.returncode == 0 and all(c in top.stdout for c in ("export", "serve", "finetune", "bench"))
    assert run_cli("frobnicate").returncode == 2


def test_cli_exit_codes_and_failed_exports_leave_nothing_behind(tiny_checkpoint, tmp_path):
    missing = run_cli("export", str(tmp_path / "nope"), "-o", str(tmp_path / "o1"))
    assert missing.returncode == 2 and "no loader recognises" in missing.stderr
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoint, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    refused = run_cli("export", str(pickled), "-o", str(tmp_path / "o2"))
    assert refused.returncode == 2 and "never unpickles" in refused.stderr
    bad_gate = run_cli("export", str(tiny_checkpoint), "-o", str(tmp_path / "o3"), "--gate", "fp16.nonsense=1")
    assert bad_gate.returncode == 2 and "bad --gate" in bad_gate.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    exists = run_cli("export", str(tiny_checkpoint), "-o", str(tmp_path / "full"))
    assert exists.returncode == 2 and "--force" in exists.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "pickled"], "no empty output folder is left behind"
    bad_dir = run_cli("export", str(tiny_checkpoint), "-o", str(tmp_path / "o4"), "--calibration-dir", str(tmp_path / "full"))
    assert bad_dir.returncode == 2 and "no images" in bad_dir.stderr and not (tmp_path / "o4").exists()


def test_failed_gate_exits_1_and_still_writes_the_report(tiny_checkpoint, tmp_path):
    out = tmp_path / "strict"
    proc = run_cli("export", str(tiny_checkpoint), "-o", str(out), "--max-images", GATE_IMAGES, "--no-pytorch",
                   "--cpu-candidates", "fp32", "--gate", "fp16.max_abs_logit_diff=0")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL" in proc.stdout and "PARITY GATE FAILED" in proc.stderr
    report = json.loads((out / "parity_report.json").read_text())
    assert report["passed"] is False
    m = read_manifest(out)
    fp16 = m.engine(format="onnx", precision="fp16")
    assert fp16.parity.passed is False and fp16.parity.failures == [f"max |Δlogit| {fp16.parity.max_abs_logit_diff:.4g} > 0.0"]
    assert m.engine(format="onnx", precision="fp32").parity.passed  # only the tightened gate failed
    # The service refuses to serve a file that failed its gate, and `auto` never picks it.
    art = load_artifact(out)
    with pytest.raises(EngineRefused, match="failed its parity gate"):
        candidates(art, "onnxruntime-cuda", cuda=True)
    assert "onnxruntime-cuda" not in [k for k, _ in candidates(art, "auto", cuda=True)]


def test_tensorrt_without_tensorrt_says_how_to_install(tiny_checkpoint, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here; the missing-package message cannot be shown")
    proc = run_cli("export", str(tiny_checkpoint), "-o", str(tmp_path / "t"), "--max-images", "8", "--tensorrt",
                   "--no-pytorch", "--cpu-candidates", "fp32")
    assert proc.returncode == 2
    assert "TensorRT is not installed" in proc.stderr and "pip install tensorrt" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.tensorrt
def test_tensorrt_plan_builds_and_passes_the_gate(tiny_checkpoint, tmp_path):
    proc = run_cli("export", str(tiny_checkpoint), "-o", str(tmp_path / "trt"), "--max-images", GATE_IMAGES, "--tensorrt")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = read_manifest(tmp_path / "trt")
    plan = m.engine(format="tensorrt")
    assert plan.parity.passed and plan.build["gpu_name"] and plan.build["tensorrt"]
    assert load_engine(load_artifact(tmp_path / "trt"), "tensorrt").name == "tensorrt-cuda-fp16"


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["pytorch-cuda", "onnxruntime-cuda"])
def test_fp16_engines_on_cuda_pass_the_gate(kind, tiny_artifact, parity_inputs):
    """One test per engine, so a missing onnxruntime-gpu skips its own case and never hides PyTorch's result."""
    _, pixels, reference = parity_inputs
    art = load_artifact(tiny_artifact)
    try:
        (_, entry), = candidates(art, kind, cuda=True)
        engine = open_engine(kind, art, entry)
    except RuntimeError as e:  # onnxruntime-gpu not installed
        pytest.skip(str(e))
    report = check_engine(engine, pixels, reference, temperature=1.0, thresholds=DEFAULT_THRESHOLDS["fp16"], decide_on="upper_bound")
    assert report.passed, (kind, report.failures)


def test_the_fastest_batch_is_the_largest_within_noise_of_the_best():
    """A flat curve picks its largest batch (the door's floor is two of them); a real gap keeps the faster one."""
    assert fastest_batch({1: 785.4, 4: 1583.8, 8: 1722.6, 16: 1755.5, 32: 1749.8}) == 32  # a startup on the EPYC
    assert fastest_batch({1: 700.0, 4: 1200.0, 8: 1300.0, 16: 1400.0, 32: 1000.0}) == 16  # 32 is 29 % slower
    assert fastest_batch({1: 100.0, 4: 90.0}) == 1
