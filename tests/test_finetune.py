"""Unit tests of finetune/: options, data checks, model surgery, optimizers, calibration, crash-safe files.

Everything runs on tiny ViTs built from a ViTConfig in the test session (no downloads), on CPU, in seconds.
The end-to-end runs of the CLI (learning, resume after SIGKILL, LoRA, ...) are in test_finetune_train.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune import calibration, data, optim
from finetune import train_state  # crash-safe files and the --resume state
from finetune import model as model_lib
from finetune.cli import build_parser, main
from finetune.config import TrainConfig, UsageError, check


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Tiny models on a shared machine: one thread for this module (conftest's one_torch_thread)."""


# --- helpers ----------------------------------------------------------------------------------------------------


def tiny_model(num_labels=3, **overrides):
    torch.manual_seed(0)
    from transformers import ViTForImageClassification

    return ViTForImageClassification(model_lib.tiny_config(num_labels=num_labels, **overrides)).eval()


def write_images(root: Path, per_class: dict[str, int], size=(20, 16), seed=0) -> None:
    """root/<class>/<i>.png: noise with a class-specific colour, so every file is distinct."""
    rng = np.random.default_rng(seed)
    for k, (name, n) in enumerate(per_class.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 60, (*size[::-1], 3), dtype=np.uint8)
            pixels[..., k % 3] += 150
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def cfg(**kw) -> TrainConfig:
    return TrainConfig(train_dir="x", output="y", **kw)


# --- options ------------------------------------------------------------------------------------------------------


def test_help_lists_every_option_with_its_default(capsys):
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    parser = build_parser()
    for action in parser._actions:
        if action.dest in ("help",):
            continue
        assert action.option_strings[0] in text
        if action.nargs == 0:  # a flag: "(default: False)" says nothing (and "True" on a --no-X flag misleads)
            continue
        if action.default is not None and action.default != "==SUPPRESS==":
            assert f"(default: {action.default})" in text, action.dest
    # the model card's defaults
    assert "--batch-size BATCH_SIZE images per step per process (model card: 2-16) (default: 4)" in text
    assert "(default: 5e-05)" in text and "(default: google/vit-large-patch16-224-in21k)" in text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--learning-rate=-1e-5"], "--learning-rate must be > 0"),
        (["--lr", "0"], "--learning-rate must be > 0"),
        (["--eval-steps", "0"], "--eval-steps must be >= 1"),
        (["--val-split", "1.5"], "--val-split must be in (0, 1)"),
        (["--freeze", "blocks:x"], "--freeze 'blocks:x'"),
        (["--lora", "--freeze", "linear-probe"], "--lora already freezes"),
    ],
)
def test_nonsense_options_exit_2_with_a_message(tmp_path, capsys, extra, message):
    rc = main(["--train-dir", str(tmp_path), "--output", str(tmp_path / "run"), *extra])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_argparse_errors_also_exit_2(capsys):
    assert main(["--output", "x"]) == 2  # --train-dir missing
    assert main(["--train-dir", "x", "--output", "y", "--optimizer", "rmsprop"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_fp16_on_cpu_is_rejected(tmp_path, capsys):
    write_images(tmp_path / "train", {"a": 3, "b": 3})
    args = ["--train-dir", str(tmp_path / "train"), "--output", str(tmp_path / "run")]
    rc = main([*args, "--precision", "fp16", "--device", "cpu"])
    assert rc == 2
    assert "fp16 needs a CUDA GPU" in capsys.readouterr().err


def test_out_of_range_values_warn_and_say_why():
    assert check(cfg()) == []  # the model card's defaults are all inside the recommended ranges
    (w,) = check(cfg(learning_rate=1e-3))
    assert "1e-06..0.0001" in w and "pretrained features" in w
    (w,) = check(cfg(batch_size=64))
    assert "2-16" in w
    (w,) = check(cfg(epochs=30))
    assert "overfit" in w
    assert len(check(cfg(batch_size=1, learning_rate=1e-7))) == 2


# --- data ---------------------------------------------------------------------------------------------------------


def test_scan_lists_and_skips_corrupt_files(tmp_path):
    write_images(tmp_path, {"cat": 4, "dog": 4})
    good = (tmp_path / "cat" / "0.png").read_bytes()
    (tmp_path / "cat" / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "dog" / "notes.jpg").write_text("this is not a JPEG")
    (tmp_path / "dog" / "empty.png").write_bytes(b"")
    (tmp_path / "dog" / "readme.txt").write_text("ignored")

    scan = data.scan_folder(tmp_path)
    assert scan.classes == ["cat", "dog"]
    assert sorted(rel for rel, _ in scan.corrupt) == ["cat/truncated.png", "dog/empty.png", "dog/notes.jpg"]
    assert scan.ignored == ["dog/readme.txt"]
    assert len(scan.samples) == 8 and all("truncated" not in rel for rel, _ in scan.samples)
    assert scan.counts() == [4, 4]
    # every kept sample loads
    ds = data.ImageFolderDataset(tmp_path, scan.samples, 32)
    assert all(ds[i][0].shape == (3, 32, 32) for i in range(len(ds)))


def test_stratified_split_is_stratified_and_deterministic():
    samples = [(f"a/{i}.png", 0) for i in range(40)] + [(f"b/{i}.png", 1) for i in range(20)]
    samples += [("c/0.png", 2), ("c/1.png", 2)]
    train, val = data.stratified_split(samples, 0.25, seed=1)
    assert [sum(1 for _, label in val if label == c) for c in range(3)] == [10, 5, 1]
    assert sorted(train + val) == sorted(samples) and not set(train) & set(val)
    assert data.stratified_split(list(reversed(samples)), 0.25, seed=1) == (train, val)  # order-independent
    assert data.stratified_split(samples, 0.25, seed=2)[1] != val


def test_report_flags_small_imbalanced_classes_and_duplicates(tmp_path):
    write_images(tmp_path / "train", {"big": 40, "small": 3})
    write_images(tmp_path / "val", {"big": 2, "small": 1}, seed=5)
    shutil.copy(tmp_path / "train" / "big" / "7.png", tmp_path / "val" / "big" / "copy.png")
    train, val = data.scan_folder(tmp_path / "train"), data.scan_folder(tmp_path / "val", ["big", "small"])
    warnings, infos = [], []
    data.describe(train, train.samples, val.samples, val.sha256, infos.append, warnings.append)
    text = "\n".join(warnings)
    assert "class 'small' has only 3 training images" in text
    assert "class imbalance" in text and "ratio 13.3" in text
    assert "1 validation file(s) are byte-identical" in text and "big/7.png == big/copy.png" in text
    assert "under 5,000 images: ViT-Large will likely overfit" in text


def test_eval_transform_matches_the_checkpoints_image_processor(tmp_path):
    write_images(tmp_path, {"a": 2, "b": 1}, size=(57, 31))
    Image.open(tmp_path / "a" / "0.png").convert("L").save(tmp_path / "a" / "gray.png")  # grayscale -> RGB
    processor = model_lib.load_processor(str(tmp_path / "no-such-base"), 24)
    processor.image_mean, processor.image_std = [0.4, 0.5, 0.6], [0.2, 0.3, 0.25]
    processor.save_pretrained(tmp_path / "ckpt")
    from transformers import AutoImageProcessor

    reference = AutoImageProcessor.from_pretrained(tmp_path / "ckpt")
    scan = data.scan_folder(tmp_path)
    spec = data.preprocessing(processor, 24)
    ds = data.ImageFolderDataset(tmp_path, scan.samples, spec)
    scale, offset = data.normalization(spec)
    for i, (rel, _) in enumerate(scan.samples):
        ours = data.normalize(ds[i][0][None], scale, offset)
        theirs = reference(Image.open(tmp_path / rel).convert("RGB"), return_tensors="pt")["pixel_values"]
        assert ours.shape == theirs.shape == (1, 3, 24, 24)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def _awkward_images(root: Path) -> list[str]:
    """The files a real folder holds that a naive loader gets wrong: each in its own class folder."""
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    files = {}
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise on display": the pixels are stored sideways
    files["exif/rotated.jpg"] = lambda p: rgb.save(p, format="JPEG", exif=exif)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 255, (40, 56), dtype=np.uint8)))
    files["rgba/alpha.png"] = lambda p: rgba.save(p)
    files["palette/anim.gif"] = lambda p: rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(p, transparency=3)
    files["deep/sixteen.png"] = lambda p: Image.fromarray(rng.integers(0, 65535, (40, 56), dtype=np.uint16)).save(p)
    files["cmyk/print.jpg"] = lambda p: rgb.convert("CMYK").save(p, format="JPEG")
    big = Image.fromarray(rng.integers(0, 255, (700, 900, 3), dtype=np.uint8))  # large enough for JPEG draft scaling
    files["draft/large.jpg"] = lambda p: big.save(p, format="JPEG")
    for rel, write in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write(root / rel)
    return sorted(files)


def test_training_evaluates_on_exactly_the_tensors_the_service_serves(tmp_path):
    """EXIF rotation, alpha, palette transparency, 16-bit, CMYK and JPEG draft decoding: finetune's evaluation path
    (scan → dataset → normalize) gives bit-identical tensors to the service's Preprocessor.from_bytes."""
    from service.preprocess import Preprocessor

    rels = _awkward_images(tmp_path)
    spec = data.preprocessing(model_lib.load_processor(str(tmp_path / "no-such-base"), 32), 32)
    scan = data.scan_folder(tmp_path)
    assert sorted(rel for rel, _ in scan.samples) == rels and not scan.corrupt
    ds = data.ImageFolderDataset(tmp_path, scan.samples, spec)
    scale, offset = data.normalization(spec)
    served = Preprocessor(spec)
    for i, (rel, _) in enumerate(scan.samples):
        ours = data.normalize(ds[i][0][None], scale, offset)[0].numpy()
        theirs = served.from_bytes((tmp_path / rel).read_bytes(), max_pixels=10**8)
        assert ours.dtype == theirs.dtype == np.float32 and ours.shape == theirs.shape == (3, 32, 32)
        assert np.array_equal(ours, theirs), rel


def test_fashion_mnist_missing_files_name_the_package(tmp_path):
    from demo.fashion_mnist import write_folders

    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        write_folders(tmp_path / "out", source=tmp_path / "nothing-here")


# --- model --------------------------------------------------------------------------------------------------------


def test_new_resolution_is_baked_into_the_checkpoint(tmp_path):
    from transformers import ViTForImageClassification

    model = tiny_model()  # 32 px, patch 8: a 4x4 grid
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = model(pixel_values=x, interpolate_pos_encoding=True).logits
    model_lib.set_image_size(model, 48)
    assert model.vit.embeddings.position_embeddings.shape == (1, 1 + 6 * 6, 32)
    model.save_pretrained(tmp_path)
    reloaded = ViTForImageClassification.from_pretrained(tmp_path, use_safetensors=True).eval()
    assert reloaded.config.image_size == 48
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=x).logits, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(UsageError, match="multiple of the base's patch size 8"):
        model_lib.set_image_size(model, 50)


def test_drop_path_is_per_sample_in_training_and_off_in_eval():
    model = tiny_model()
    x = torch.randn(1, 3, 32, 32).expand(64, -1, -1, -1)  # one image, 64 times
    with torch.no_grad():
        reference = model(pixel_values=x).logits
    handles = model_lib.add_drop_path(model, 0.5)
    assert len(handles) == 2  # one hook per block (transformers 5: both branches end in layer.dropout)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, reference)  # eval: a no-op
        model.train()  # hidden dropout is 0 in tiny_config, so only drop path is random
        a, b = model(pixel_values=x).logits, model(pixel_values=x).logits
    assert not torch.allclose(a, b)
    # identical inputs, different outputs within one batch: the mask is drawn per sample, not per batch;
    # the last block has two branches, each kept or dropped: up to 4 distinct outcomes
    distinct = torch.unique(a.round(decimals=4), dim=0)
    assert 2 <= len(distinct) <= 4
    for h in handles:
        h.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, reference)


def test_frozen_parameters_do_not_change():
    model = tiny_model(num_hidden_layers=3).train()
    model_lib.freeze(model, "blocks:2")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = optim.build("adamw", optim.param_groups(model, 0.05), 1e-2)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y).backward()
        opt.step()
        opt.zero_grad()
    for name, p in model.named_parameters():
        frozen = name.startswith("vit.embeddings") or name.startswith(("vit.layers.0.", "vit.layers.1."))
        assert torch.equal(p, before[name]) == frozen, name
    model_lib.freeze(model, "linear-probe")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["classifier.weight", "classifier.bias"]
    with pytest.raises(UsageError, match="only 3 blocks"):
        model_lib.freeze(tiny_model(num_hidden_layers=3), "blocks:4")


def test_merged_lora_gives_the_same_logits_as_the_peft_model(tmp_path):
    from transformers import ViTForImageClassification

    model = model_lib.add_lora(tiny_model(), r=4, alpha=8, dropout=0.0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    assert any("q_proj.lora_A" in n for n in trainable) and any("v_proj.lora_B" in n for n in trainable)
    # train a little so LoRA's B matrices (zero at init) and the head move away from the base
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    for _ in range(5):
        torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    base_only = tiny_model()
    with torch.no_grad():
        peft_logits = model(pixel_values=x).logits
        assert not torch.allclose(peft_logits, base_only(pixel_values=x).logits, atol=1e-3)
    merged = model_lib.plain(model)
    assert type(merged) is ViTForImageClassification
    assert not any("lora" in k for k in merged.state_dict())
    model_lib.save_checkpoint(model, model_lib.load_processor(str(tmp_path / "none"), 32), tmp_path / "ckpt")
    reloaded = ViTForImageClassification.from_pretrained(tmp_path / "ckpt", use_safetensors=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(pixel_values=x).logits, peft_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reloaded(pixel_values=x).logits, peft_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(pixel_values=x).logits, peft_logits)  # the training model is untouched


# --- optimizers ---------------------------------------------------------------------------------------------------

# Each optimizer at a learning rate in its own usual range (LAMB/LARS/Adafactor scale steps by weight norms).
OPTIMIZER_LR = {"adamw": 1e-3, "sgd": 0.1, "adafactor": 3e-2, "lamb": 5e-2, "lars": 10.0}


@pytest.mark.parametrize("sam", [False, True], ids=["plain", "sam"])
@pytest.mark.parametrize("name", list(OPTIMIZER_LR))
def test_each_optimizer_reduces_the_loss_on_a_fixed_batch(name, sam):
    model = tiny_model(num_labels=4).train()
    torch.manual_seed(1)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 4, (16,))
    opt = optim.build(name, optim.param_groups(model, 0.01), OPTIMIZER_LR[name])
    helper = optim.SAM(model.parameters(), rho=0.02) if sam else None

    def loss_fn():
        return torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y)

    with torch.no_grad():
        initial = loss_fn().item()
    for _ in range(20):
        loss_fn().backward()
        if helper:
            w = [p.detach().clone() for p in model.parameters()]
            helper.perturb()
            opt.zero_grad()
            loss_fn().backward()
            helper.restore()
            assert all(torch.allclose(a, b) for a, b in zip(w, model.parameters()))
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        final = loss_fn().item()
    assert final < 0.7 * initial, (name, initial, final)


def test_weight_decay_skips_biases_norms_and_embeddings():
    model = tiny_model()
    decay, no_decay = optim.param_groups(model, 0.1)
    name_of = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 or "projection" in name_of[id(p)] for p in decay["params"])
    skipped = {name_of[id(p)] for p in no_decay["params"]}
    assert {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings", "classifier.bias"} <= skipped
    assert "classifier.weight" not in skipped


def test_warmup_then_cosine_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler, warmup = optim.schedule(opt, 100, 0.1)
    lrs = []
    for _ in range(100):
        lrs.append(scheduler.get_last_lr()[0])
        opt.step()
        scheduler.step()
    assert warmup == 10 and lrs[0] == 0.0 and lrs[10] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11])) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(0.5, abs=0.02) and lrs[-1] < 0.01


# --- calibration --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_temperature_fit_recovers_a_known_temperature(true_t):
    """Labels drawn from softmax(z / T): the fitted temperature on z must come back as T, and be applied."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 10, generator=g) * 3
    labels = torch.multinomial((z / true_t).softmax(-1), 1, generator=g).squeeze(1)
    result = calibration.calibrate(z, labels)
    assert result["applied"] and result["temperature"] == pytest.approx(true_t, rel=0.05)
    assert result["held_out"]["nll_gain"] > 0 and result["held_out"]["ece_gain"] > 0
    assert result["nll_after"] < result["nll_before"]
    assert result["ece_after"] < result["ece_before"] and result["ece_after"] < 0.02
    assert result["num_samples"] == 20000 and result["source"] == "validation" and result["warning"] is None


def test_a_temperature_that_does_not_help_on_held_out_images_is_not_applied():
    """Already calibrated logits (labels drawn at T = 1) on 90 images, as in the issue: the fitted T is noise. It must
    not ship, the decision must say so, and the small set must be warned about."""
    kept = 0
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(90, 10, generator=g) * 3
        labels = torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(1)
        result = calibration.calibrate(z, labels)
        assert result["warning"] and "only 90 validation images" in result["warning"]
        if not result["applied"]:
            kept += 1
            assert result["temperature"] == 1.0 and result["fitted_temperature"] != 1.0
            assert result["decision"].startswith("T = 1 kept") and result["ece_after"] == result["ece_before"]
        else:
            assert result["held_out"]["ece_gain"] > 0 and result["held_out"]["nll_gain"] > 0
    assert kept >= 5, "on calibrated logits the held-out check rejects the noise fit most of the time (8 of these 10)"


def test_a_validation_set_without_errors_keeps_t_1():
    """Every image right: NLL falls forever as T → 0, so the fit says "be 100 % sure". That must not ship."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (18,), generator=g)
    z = torch.nn.functional.one_hot(labels, 3).float() * 4 + torch.randn(18, 3, generator=g) * 0.3
    result = calibration.calibrate(z, labels)
    assert result["fitted_temperature"] < 0.2 and not result["applied"] and result["temperature"] == 1.0
    assert "0 of 18 validation images are misclassified, too few" in result["decision"]


def test_calibration_file_contract(tmp_path):
    calibration.write(tmp_path, {"temperature": 1.5, "ece_before": 0.1})
    assert calibration.CALIBRATION_FILE == "vitserve_calibration.json"
    assert json.loads((tmp_path / "vitserve_calibration.json").read_text())["temperature"] == 1.5


# --- crash-safe files ---------------------------------------------------------------------------------------------


def test_training_state_roundtrip_keeps_types_and_tensors(tmp_path):
    model = tiny_model()
    opt = optim.build("adamw", optim.param_groups(model, 0.1), 1e-3)
    logits = model(pixel_values=torch.randn(2, 3, 32, 32)).logits
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    opt.step()
    meta = {"step": 3, "best": None, "pair": (1, "a")}
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "meta": meta}
    train_state.save_state(tmp_path, state)
    loaded = train_state.load_state(tmp_path)
    assert loaded["meta"] == {"step": 3, "best": None, "pair": [1, "a"]}
    assert set(loaded["optimizer"]["state"]) == set(opt.state_dict()["state"])  # integer keys survive JSON
    opt2 = optim.build("adamw", optim.param_groups(tiny_model(), 0.1), 1e-3)
    opt2.load_state_dict(loaded["optimizer"])
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(opt2.state_dict()["state"][0][k], v)
    assert all(torch.equal(loaded["model"][k], v) for k, v in model.state_dict().items())
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in tmp_path.rglob("*"))  # nothing pickled


def test_atomic_folder_survives_a_kill_between_the_two_renames(tmp_path):
    target = tmp_path / "checkpoint"
    train_state.write_dir_atomically(target, lambda d: (d / "v").write_text("1"))
    train_state.write_dir_atomically(target, lambda d: (d / "v").write_text("2"))
    assert (target / "v").read_text() == "2" and sorted(os.listdir(tmp_path)) == ["checkpoint"]
    # a process killed after `checkpoint -> .checkpoint.old`, before `.checkpoint.tmp -> checkpoint`
    os.replace(target, tmp_path / ".checkpoint.old")
    (tmp_path / ".checkpoint.tmp").mkdir()
    train_state.recover(target)
    assert (target / "v").read_text() == "2" and sorted(os.listdir(tmp_path)) == ["checkpoint"]

    def crash(d):
        (d / "v").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_state.write_dir_atomically(target, crash)
    assert (target / "v").read_text() == "2"
