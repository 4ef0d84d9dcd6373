"""`vitserve plan`'s estimator against the real thing: parameter counts and optimizer state against torch, the saved
activations against autograd's own list, and a whole training step's peak memory against a measured one.

The peak is measured on CPU (no GPU here), in a fresh process: the resident set's high-water mark (Linux
/proc/self/status VmHWM, reset through /proc/self/clear_refs) during one steady-state step, above the resident set
just before it. glibc is told to mmap every block over 64 KiB (MALLOC_MMAP_THRESHOLD_), so a freed tensor leaves the
resident set at once and the high-water mark follows the live tensors; torch's own profiler, replaying its
allocations, agreed with this within 1 MB when the tolerance was chosen. The tolerance, ±10 % of the measured peak,
covers what the estimator approximates instead of listing: the transient of backward's first operations (measured
residuals up to 5 %) plus glibc metadata, oneDNN scratch space and Python objects. CUDA adds the context and the
caching allocator's fragmentation; those are constants in finetune/estimates.py, not checked here.

Run as a script, this file is that measuring process: python tests/test_plan.py '[{...config...}, ...]'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # as a script, for the measuring process

from finetune import estimates, plan, shapes  # noqa: E402

TOLERANCE = 0.10  # of the measured peak; the module docstring says why

# Small enough to measure in seconds, large enough (40-150 MB a step) that a megabyte of noise does not matter.
MEASURED = dict(image_size=224, patch_size=16, hidden=192, layers=3, heads=3, mlp=768, labels=10)
CONFIGS = {
    "fp32 sdpa adamw": estimates.Setup(batch=8),
    "bf16 sdpa adamw": estimates.Setup(batch=8, precision="bf16"),
    "fp32 eager, 12 heads": estimates.Setup(batch=8, attention="eager"),
    "fp32 gradient checkpointing": estimates.Setup(batch=8, checkpointing=True),
    "fp32 lora r=8": estimates.Setup(batch=8, lora_r=8),
    "bf16 sgd, blocks:1 frozen": estimates.Setup(batch=8, precision="bf16", optimizer="sgd", frozen="blocks:1"),
}
SHAPES = {"fp32 eager, 12 heads": dict(heads=12, hidden=192)}  # attention-heavy: 12 (T, T) maps a block


def measured_shape(name: str) -> shapes.VitShape:
    return shapes.VitShape(**{**MEASURED, **SHAPES.get(name, {})})


# --- the measuring process ------------------------------------------------------------------------------------------


def _rss(key: str) -> int:
    return int(re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def build(shape: shapes.VitShape, setup: estimates.Setup):
    """The model and optimizer `vitserve finetune` would build for this shape and setup."""
    from finetune import model as model_lib
    from finetune import optim

    model = model_lib.random_vit(model_lib.shape_config(shape, attn_implementation=setup.attention))
    if setup.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model_lib.freeze(model, setup.frozen)
    if setup.lora_r:
        model = model_lib.add_lora(model, setup.lora_r, 2 * setup.lora_r, setup.lora_dropout)
    model.train()
    return model, optim.build(setup.optimizer, optim.param_groups(model, 0.05), 1e-4)


def measure(shape: shapes.VitShape, setup: estimates.Setup) -> dict:
    """Peak resident bytes above the steady state during one training step (after two that allocate the optimizer
    state and warm the kernels), and during one inference forward pass, as finetune's loop runs them."""
    import torch

    model, opt = build(shape, setup)
    images = torch.randint(0, 256, (setup.batch, 3, shape.image_size, shape.image_size), dtype=torch.uint8)
    target = torch.randint(0, shape.labels, (setup.batch,))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if setup.autocast else contextlib.nullcontext
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step():
        x = images.float() * (2 / 255) - 1  # finetune.data.normalize: a new fp32 batch every step
        with autocast():
            logits = model(pixel_values=x).logits
        torch.nn.functional.cross_entropy(logits.float(), target).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def peak_of(fn) -> int:
        gc.collect()
        steady = _rss("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        fn()
        return _rss("VmHWM") - steady

    step(), step()
    train = peak_of(step)
    model.eval()
    x = torch.rand(setup.batch, 3, shape.image_size, shape.image_size)  # the engine gets one fp32 batch
    with torch.no_grad():
        inference = peak_of(lambda: model(pixel_values=x))
    return {"train": train, "inference": inference}


def _measure_in_this_process(names: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    from transformers.utils import logging

    logging.set_verbosity_error()
    print(json.dumps({n: measure(measured_shape(n), CONFIGS[n]) for n in names}))


# --- estimate against measurement ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def measured() -> dict:
    """Every configuration in one fresh process (one import of torch): ~1 minute on 2 cores."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, json.dumps(list(CONFIGS))], capture_output=True, text=True,
                          env=env, timeout=600, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable VmHWM")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_step_peak_is_within_tolerance_of_the_measured_peak(measured, name):
    setup = dataclasses.replace(CONFIGS[name], device="cpu")  # torch's CPU optimizers loop per tensor
    estimate = estimates.training_memory(measured_shape(name), setup).step_peak
    got = measured[name]["train"]
    print(f"{name}: estimate {estimate / 1e6:.1f} MB, measured {got / 1e6:.1f} MB ({estimate / got - 1:+.1%})")
    assert abs(estimate - got) <= TOLERANCE * got, (name, estimate, got)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable VmHWM")
@pytest.mark.parametrize("name", ["fp32 sdpa adamw", "fp32 eager, 12 heads"])
def test_inference_working_set_is_within_tolerance_of_the_measured_peak(measured, name):
    shape, setup = measured_shape(name), CONFIGS[name]
    estimate = estimates.inference_memory(shape, setup.batch, "fp32", setup.attention, device="cpu")["working"]
    got = measured[name]["inference"]
    print(f"{name}: estimate {estimate / 1e6:.1f} MB, measured {got / 1e6:.1f} MB ({estimate / got - 1:+.1%})")
    assert abs(estimate - got) <= TOLERANCE * got, (name, estimate, got)


# --- exact counts ----------------------------------------------------------------------------------------------------

TINY = shapes.VitShape(image_size=32, patch_size=8, hidden=48, layers=3, heads=3, mlp=80, labels=5)
MODES = [
    estimates.Setup(batch=2, precision=p, attention=a, lora_r=r, frozen=f)
    for p in ("fp32", "bf16") for a in ("sdpa", "eager")
    for r, f in ((0, "none"), (4, "none"), (0, "blocks:1"), (0, "patch-embed"), (0, "linear-probe"))
]  # fmt: skip


@pytest.mark.parametrize("setup", MODES, ids=lambda s: f"{s.precision}-{s.attention}-lora{s.lora_r}-{s.frozen}")
def test_saved_activations_are_exactly_what_autograd_keeps(setup):
    """Every tensor autograd saves for backward (one count per storage), plus the input batch the loop holds."""
    import torch

    model, _ = build(TINY, setup)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    x = torch.randn(setup.batch, 3, TINY.image_size, TINY.image_size)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if setup.autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(pixel_values=x)
    saved.setdefault(x.untyped_storage().data_ptr(), x.untyped_storage().nbytes())  # held by the loop anyway
    assert sum(saved.values()) == sum(estimates.activation_bytes(TINY, setup).values())


@pytest.mark.parametrize("setup", [estimates.Setup(), estimates.Setup(lora_r=4), estimates.Setup(frozen="blocks:2"),
                                   estimates.Setup(frozen="patch-embed"), estimates.Setup(frozen="linear-probe")])  # fmt: skip
def test_parameter_counts_match_the_model(setup):
    model, _ = build(TINY, setup)
    params = list(model.parameters())
    assert estimates.trainable_count(TINY, setup) == sum(p.numel() for p in params if p.requires_grad)
    weights = estimates.training_memory(TINY, setup).weights
    assert weights == 4 * sum(p.numel() for p in params)  # with LoRA: adapters and PEFT's classifier copy


@pytest.mark.parametrize("optimizer", estimates.OPTIMIZERS)
def test_optimizer_state_matches_torch(optimizer):
    import torch

    setup = estimates.Setup(optimizer=optimizer)
    model, opt = build(TINY, setup)
    model(pixel_values=torch.randn(2, 3, 32, 32)).logits.sum().backward()
    opt.step()
    state = sum(v.nbytes for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v) and k != "step")
    assert estimates.optimizer_state_bytes(TINY, setup) == state


def test_named_models_and_flops_are_the_published_ones():
    from benchmarks.models import CONFIGS as BENCH
    from benchmarks.models import vit_flops as bench_flops

    assert shapes.parameter_count(shapes.MODELS["vit-base"]) == pytest.approx(86.6e6, rel=0.01)
    assert shapes.parameter_count(shapes.MODELS["vit-large"]) == pytest.approx(304.3e6, rel=0.01)
    assert shapes.parameter_count(shapes.MODELS["vit-huge"]) == pytest.approx(632e6, rel=0.01)
    assert shapes.vit_flops(shapes.MODELS["vit-large"])["total"] == pytest.approx(123.1e9, rel=0.001)
    for name, s in BENCH.items():  # the same FLOP count as benchmarks/models.py, which should import this one
        ours = shapes.vit_flops(shapes.VitShape(**dataclasses.asdict(s)))
        assert {k: ours[k] for k in bench_flops(s)} == bench_flops(s), name


def test_largest_batch_is_the_boundary_of_the_budget():
    shape, setup = shapes.MODELS["vit-large"], estimates.Setup(precision="bf16")
    budget = 16 * estimates.GiB
    n = estimates.largest_batch(shape, setup, budget)
    assert n > 1
    assert estimates.training_memory(shape, dataclasses.replace(setup, batch=n)).total <= budget
    assert estimates.training_memory(shape, dataclasses.replace(setup, batch=n + 1)).total > budget
    checkpointed = estimates.largest_batch(shape, dataclasses.replace(setup, checkpointing=True), budget)
    assert checkpointed > n  # checkpointing keeps one (B, T, D) per block instead of all its tensors


# --- the command ---------------------------------------------------------------------------------------------------


def test_plan_command_reports_memory_speed_and_advice(capsys):
    assert plan.main(["--model", "vit-large", "--batch-size", "4", "--precision", "bf16", "--gpu-memory", "16",
                      "--images", "3000"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    for text in ("304M parameters", "optimizer state", "activations saved for backward", "total", "H100 SXM 80GB",
                 "fits in 16 GiB", "largest batch that fits", "under 5,000 images: ViT-Large will likely overfit"):
        assert text in out, text
    assert plan.main(["--model", "vit-huge", "--batch-size", "64", "--precision", "bf16", "--gpu-memory", "16"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit in 16 GiB" in out and "--gradient-checkpointing" in out and "--lora" in out


def test_plan_json_agrees_with_the_functions(capsys):
    assert plan.main(["--model", "vit-base", "--batch-size", "8", "--optimizer", "sgd", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    setup = estimates.Setup(batch=8, optimizer="sgd")
    assert r["training"]["total"] == estimates.training_memory(shapes.MODELS["vit-base"], setup).total
    assert r["training"]["optimizer_state"] == 4 * r["trainable"] == 4 * r["parameters"]  # one momentum buffer
    a100 = r["gpus"]["a100"]
    assert a100["largest_batch"] == estimates.largest_batch(shapes.MODELS["vit-base"], setup, 80 * estimates.GiB)


def test_plan_sizes_checkpoint_folders_and_refuses_unknown_models(tmp_path, capsys):
    from tests.conftest import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "tiny", image_size=32, hidden=64)
    shape, _ = shapes.resolve_shape(str(ckpt))
    assert (shape.image_size, shape.patch_size, shape.hidden, shape.layers, shape.heads) == (32, 8, 64, 2, 4)
    assert plan.main(["--model", "no-such-model"]) == 2
    assert "neither a known model" in capsys.readouterr().err


def test_dataset_advice_names_the_base_being_fine_tuned(tmp_path):
    from tests.conftest import make_tiny_checkpoint

    warns, text = estimates.dataset_advice(3000)
    assert warns and "under 5,000 images: ViT-Large will likely overfit" in text and shapes.DEFAULT_BASE in text
    warns, text = estimates.dataset_advice(3000, "google/vit-base-patch16-224-in21k")
    assert not warns and "ViT-Base" in text and "ViT-Large" in text
    tiny = str(make_tiny_checkpoint(tmp_path / "tiny"))
    warns, text = estimates.dataset_advice(12000, tiny)
    assert not warns and tiny in text


def test_out_of_memory_message_without_a_gpu_keeps_the_remedies():
    """The error path of `vitserve finetune` (it only runs on a GPU): where no CUDA device can be asked for its size,
    the remedies are printed without estimates instead of a second exception."""
    import torch

    from finetune.config import TrainConfig
    from finetune.prepare import out_of_memory_message

    message = out_of_memory_message(TrainConfig(train_dir="x", output="y", base="vit-large"), torch.device("cpu"))
    assert "Remedies" in message and "--gradient-checkpointing" in message and "estimates" not in message


if __name__ == "__main__":
    _measure_in_this_process(json.loads(sys.argv[1]))


def test_multi_node_and_batch_job_estimates_follow_from_the_one_gpu_figures(capsys):
    from finetune import plan_scale

    args = ["--model", "vit-large", "--precision", "bf16", "--gpu", "a100", "--images", "100000", "--epochs", "3", "--json"]
    assert plan.main([*args, "--nodes", "2", "--gpus-per-node", "4", "--predict-images", "10000000", "--pods", "100"]) == 0
    r = json.loads(capsys.readouterr().out)
    one = r["gpus"]["a100"]["train_images_per_s"]
    t = r["multi_node"]
    assert t["gpus"] == 8 and t["global_batch"] == 32
    assert t["images_per_s"] == pytest.approx(one * 8 * plan_scale.INTRA_NODE_EFFICIENCY * plan_scale.DDP_EFFICIENCY)
    assert t["wall_s"] == pytest.approx(3 * 100_000 / t["images_per_s"]) and t["steps_per_epoch"] == 3125
    p = r["prediction_job"]
    assert p["images_per_pod"] == 100_000 and p["pod_rate_measured"] is False
    assert p["pod_images_per_s"] == pytest.approx(r["gpus"]["a100"]["serve_images_per_s"])
    assert p["wall_s"] == pytest.approx(plan_scale.POD_STARTUP_S + 100_000 / p["pod_images_per_s"])
    # A measured pod rate replaces the estimate; one node with one GPU adds no multi-node section.
    assert plan.main(["--predict-images", "1000", "--pods", "3", "--pod-images-per-s", "50"]) == 0
    text = capsys.readouterr().out
    assert "Batch prediction of 1,000 images on 3 pods" in text and "334 per pod at 50 img/s (measured)" in text
    assert "Fine-tuning on" not in text
    assert plan.main(["--nodes", "0"]) == 2
