"""The embedded demo artifact: intact, gated, and as accurate on real Fashion-MNIST test images as the README says."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from demo.fashion_mnist import CLASS_NAMES, DEFAULT_SOURCE, load_split
from service.artifact import load_artifact
from service.engines import load_engine, select_engine
from service.preprocess import Preprocessor
from service.settings import DEMO_ARTIFACT

# The README quotes the full 10k test-set accuracy; on this fixed 1,000-image slice the model must stay near it.
MIN_ACCURACY = 0.86


def test_demo_artifact_is_intact_and_every_engine_passed_its_gate():
    art = load_artifact(DEMO_ARTIFACT)  # checksums verified, the golden set's included
    m = art.manifest
    assert m.schema_version == 3 and m.labels == sorted(CLASS_NAMES)  # folder names, sorted: what `vitserve finetune` does
    for e in m.engines:
        assert e.parity is not None and e.parity.passed and e.parity.images >= 1000, (e.file, e.parity)
        assert e.parity.decided_on == "lower_bound"
        assert e.quantization is None or e.quantization.saturation_free, e.file
    assert m.temperature != 1.0, "the demo model carries its fitted temperature"
    assert (DEMO_ARTIFACT / "pytorch" / "vitserve_calibration.json").is_file(), "pytorch/ re-exports with the same T"
    cpu = m.export_report["cpu_engine"]
    assert {"int8-dynamic", "int8-static"} <= set(cpu["candidates"])  # both saturation-free schemes were measured


def test_demo_artifact_passes_its_startup_check_on_this_machine():
    selection = select_engine(load_artifact(DEMO_ARTIFACT), "auto")
    report = selection.startup_check
    assert report is not None and report.passed and report.images == 32, report
    assert [a.outcome for a in selection.attempts] == ["selected"]


@pytest.mark.skipif(not (DEFAULT_SOURCE / "t10k-images-idx3-ubyte.gz").exists(), reason="Debian's dataset-fashion-mnist is not installed (make data)")
def test_demo_model_accuracy_on_real_test_images_through_the_serving_path():
    images, labels = load_split("test")
    art = load_artifact(DEMO_ARTIFACT)
    engine = load_engine(art, "auto")
    pre = Preprocessor(art.manifest.preprocessing)
    idx = np.arange(0, 10_000, 10)  # every tenth image: all classes, fixed
    pixels = []
    for i in idx:  # as a client sends them: PNG bytes, decoded by the service's own code
        buf = io.BytesIO()
        Image.fromarray(images[i]).save(buf, format="PNG")
        pixels.append(pre.from_bytes(buf.getvalue(), max_pixels=10**6))
    x = np.stack(pixels)
    logits = np.concatenate([engine.run(x[i : i + 50]) for i in range(0, len(x), 50)])
    predicted = np.array(art.manifest.labels)[logits.argmax(1)]
    truth = np.array(CLASS_NAMES)[labels[idx]]  # the dataset's own index order; compare by name
    accuracy = float(np.mean(predicted == truth))
    assert accuracy >= MIN_ACCURACY, accuracy
