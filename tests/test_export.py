"""checkpoint → ONNX → engines → validated artifact, on tiny ViTs built in the session."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from export.checkpoint import load_checkpoint
from export.parity import DEFAULT_THRESHOLDS, check_engine, compare, default_image_bytes, preprocess_images, reference_logits
from service.artifact import ArtifactError, load_artifact, read_manifest, write_manifest
from service.engines import build_engine, candidates, load_engine
from service.engines.onnxruntime_engine import OnnxRuntimeEngine
from service.preprocess import Preprocessor
from tests.conftest import make_tiny_checkpoint, run_cli


@pytest.fixture(scope="module")
def parity_inputs(tiny_checkpoint):
    ckpt = load_checkpoint(str(tiny_checkpoint))
    pixels = preprocess_images(default_image_bytes(24), Preprocessor(ckpt.preprocessing))
    return ckpt, pixels, reference_logits(ckpt.model, pixels)


def test_artifact_layout_and_manifest(tiny_artifact, tiny_checkpoint):
    m = read_manifest(tiny_artifact)
    assert m.schema_version == 1
    assert m.labels == [f"class_{i}" for i in range(10)]
    assert m.preprocessing.input_size == (32, 32) and m.preprocessing.mean == (0.5, 0.5, 0.5)
    assert m.temperature == 1.0
    files = {e.file: e for e in m.engines}
    fp16 = files["model.fp16.onnx"]
    assert fp16.precision == "fp16" and fp16.device == "cuda" and fp16.max_batch == 16
    assert fp16.inputs[0].dtype == "float32" and fp16.inputs[0].shape == ["batch", 3, 32, 32]
    cpu = [e for e in m.engines if e.format == "onnx" and e.device == "cpu"]
    assert len(cpu) == 1 and cpu[0].precision == m.export_report["cpu_engine"]["chosen"]
    loser = {"fp32", "int8"} - {cpu[0].precision}
    assert not any((tiny_artifact / f"model.{p}.onnx").exists() for p in loser), "the slower CPU candidate is not shipped"
    assert set(m.export_report["cpu_engine"]["candidates"]) == {"fp32", "int8"}
    assert "model.safetensors" in files["pytorch/model.safetensors"].file
    for e in m.engines:
        assert e.parity is not None and e.parity.passed and e.parity.images == 48
    assert {"torch", "onnx", "onnxruntime", "transformers", "tensorrt"} <= set(m.versions)
    assert len(m.source.sha256) == 64
    report = json.loads((tiny_artifact / "parity_report.json").read_text())
    assert report["passed"] is True and len(report["engines"]) == 4  # fp16, fp32, int8, pytorch


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
    engine = build_engine(kind, art, entry)
    _, pixels, _ = parity_inputs
    alone = np.concatenate([engine.run(pixels[i : i + 1]) for i in range(8)])
    for n in (2, 3, 5, 8):
        batched = engine.run(pixels[:n])
        np.testing.assert_allclose(batched, alone[:n], atol=2e-3 if "fp16" in file else 1e-4)


def test_int8_engine_is_batch_invariant(tiny_checkpoint, tmp_path, parity_inputs):
    """Dynamic INT8 scales activations over the whole batch; the engine must hide that from clients."""
    from export.onnx_export import export_fp32, quantize_int8

    ckpt, pixels, reference = parity_inputs
    fp32 = export_fp32(ckpt.model, tmp_path / "m.onnx", (32, 32), 16)
    int8 = quantize_int8(fp32, tmp_path / "m.int8.onnx")
    entry = next(e for e in read_manifest(_artifact_dir(tiny_checkpoint, tmp_path)).engines if e.device == "cpu")
    entry = entry.model_copy(update={"file": "m.int8.onnx", "precision": "int8"})
    engine = OnnxRuntimeEngine(int8, entry, (32, 32))
    batched, alone = engine.run(pixels[:8]), np.concatenate([engine.run(pixels[i : i + 1]) for i in range(8)])
    assert np.array_equal(batched, alone)
    # ...and raw ONNX Runtime on the same file really is batch-dependent, which is why.
    raw = engine._run(pixels[:8])
    assert not np.array_equal(raw, alone)
    report = check_engine(engine, pixels, reference, temperature=1.0, thresholds=DEFAULT_THRESHOLDS["int8"])
    assert report.passed and report.batch_logit_diff == 0.0


def _artifact_dir(checkpoint, tmp_path):
    out = tmp_path / "art"
    if not (out / "manifest.json").exists():
        proc = run_cli("export", str(checkpoint), "-o", str(out), "--max-images", "8", "--no-pytorch", "--cpu-candidates", "fp32")
        assert proc.returncode == 0, proc.stderr
    return out


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
    report = check_engine(engine, pixels, reference, temperature=1.0, thresholds=DEFAULT_THRESHOLDS["fp16"])
    assert not report.passed
    assert report.top1_agreement < 0.9
    assert any("top-1 agreement" in f for f in report.failures)
    # The intact file passes the same gate.
    good = check_engine(build_engine("onnxruntime-cpu", art, entry), pixels, reference, temperature=1.0, thresholds=DEFAULT_THRESHOLDS["fp16"])
    assert good.passed, good.failures


def test_gate_fails_on_perturbed_weights(parity_inputs):
    ckpt, pixels, reference = parity_inputs
    rng = np.random.default_rng(0)
    noisy = reference + rng.normal(0, 0.2, reference.shape).astype(np.float32)
    report = compare(reference, noisy, temperature=1.0, thresholds=DEFAULT_THRESHOLDS["fp16"])
    assert not report.passed and any("Δlogit" in f for f in report.failures)


def test_gate_fails_on_batch_dependent_engine(parity_inputs):
    _, _, reference = parity_inputs
    batched = reference + np.linspace(0, 0.5, reference.shape[0], dtype=np.float32)[:, None] * np.eye(10, dtype=np.float32)[0]
    report = compare(reference, reference, temperature=1.0, thresholds=DEFAULT_THRESHOLDS["fp32"], alone=batched)
    assert not report.passed and any("batch variation" in f for f in report.failures)


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
    raw["schema_version"] = 2
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError):
        read_manifest(tmp_path)
    raw["schema_version"] = 1
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
    proc = run_cli("export", str(ckpt), "-o", str(tmp_path / "a"), "--max-images", "8", "--no-pytorch", "--cpu-candidates", "fp32")
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


def test_cli_exit_codes(tiny_checkpoint, tmp_path):
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


def test_failed_gate_exits_1_and_still_writes_the_report(tiny_checkpoint, tmp_path):
    out = tmp_path / "strict"
    proc = run_cli("export", str(tiny_checkpoint), "-o", str(out), "--max-images", "8", "--no-pytorch",
                   "--cpu-candidates", "fp32", "--gate", "fp16.max_abs_logit_diff=0")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL" in proc.stdout and "PARITY GATE FAILED" in proc.stderr
    report = json.loads((out / "parity_report.json").read_text())
    assert report["passed"] is False
    m = read_manifest(out)
    fp16 = m.engine(format="onnx", precision="fp16")
    assert fp16.parity.passed is False and "Δlogit" in fp16.parity.failures[0]
    # The service refuses to serve a file that failed its gate, and `auto` never picks it.
    art = load_artifact(out)
    with pytest.raises(ValueError, match="failed its parity gate"):
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
    proc = run_cli("export", str(tiny_checkpoint), "-o", str(tmp_path / "trt"), "--max-images", "16", "--tensorrt")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = read_manifest(tmp_path / "trt")
    plan = m.engine(format="tensorrt")
    assert plan.parity.passed and plan.build["gpu_name"] and plan.build["tensorrt"]
    assert load_engine(load_artifact(tmp_path / "trt"), "tensorrt").name == "tensorrt-cuda-fp16"


@pytest.mark.gpu
def test_fp16_onnx_and_pytorch_fp16_on_cuda_pass_the_gate(tiny_artifact, parity_inputs):
    _, pixels, reference = parity_inputs
    art = load_artifact(tiny_artifact)
    for kind in ("pytorch-cuda", "onnxruntime-cuda"):
        try:
            (_, entry), = candidates(art, kind, cuda=True)
            engine = build_engine(kind, art, entry)
        except RuntimeError as e:  # onnxruntime-gpu not installed
            pytest.skip(str(e))
        report = check_engine(engine, pixels, reference, temperature=1.0, thresholds=DEFAULT_THRESHOLDS["fp16"])
        assert report.passed, (kind, report.failures)
