"""The page at `/`, in a real browser (Debian's chromium, headless, driven by Playwright) against a real `vitserve
serve`: a Fashion-MNIST test image uploaded through the page's own file control shows its right top-1 label, a
corrupt file shows the error table's message, the model card and live figures fill in, and the page asks nothing of
any other host. With API keys on, the page asks for a key before it shows anything.

Set VITSERVE_PAGE_SCREENSHOT=path to keep the screenshot (docs/page.png is taken this way)."""

from __future__ import annotations

import io
import os
import shutil
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from PIL import Image

from service.settings import DEMO_ARTIFACT
from tests.server import running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it with apt)"),
    pytest.mark.timeout(300),
]


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (make install)")
    with playwright.sync_playwright() as p:
        # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start.
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Watched:
    """A page with every request URL and every console error or uncaught exception recorded."""

    def __init__(self, browser, width: int = 1000):
        self.page = browser.new_page(viewport={"width": width, "height": 900})
        self.urls: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.urls.append(r.url))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def hosts(self) -> set[str]:
        return {urlparse(u).netloc for u in self.urls if not u.startswith(("blob:", "data:"))}


def a_test_image_the_model_gets_right(url: str) -> tuple[bytes, str]:
    """The first Fashion-MNIST test image whose true label the served model predicts (the API's own answer)."""
    from demo.fashion_mnist import CLASS_NAMES, load_split

    try:
        images, labels = load_split("test")
    except FileNotFoundError:
        pytest.skip("needs Debian's dataset-fashion-mnist (make test installs it)")
    for pixels, label in zip(images[:50], labels[:50]):
        data = png(pixels)
        answer = httpx.post(f"{url}/classify", files={"images": ("x.png", data, "image/png")}, timeout=30).json()
        if answer["predictions"][0]["top1"]["label"] == CLASS_NAMES[label]:
            return data, CLASS_NAMES[label]
    raise AssertionError("the demo model got none of the first 50 test images right")


def test_the_page_classifies_an_upload_shows_errors_and_its_card_and_calls_no_other_host(browser, tmp_path):
    with running_server(DEMO_ARTIFACT, tmp_path, grpc_port=0) as server:
        head = httpx.get(f"{server.url}/", timeout=10)
        assert head.status_code == 200 and "default-src 'none'" in head.headers["content-security-policy"]
        assert len(head.content) + sum(len(httpx.get(f"{server.url}/ui/{f}", timeout=10).content) for f in ("app.js", "app.css", "icon.svg")) < 100_000
        image, truth = a_test_image_the_model_gets_right(server.url)
        bad = b"\xff\xd8\xff\xe0 this is not a JPEG"
        refused = httpx.post(f"{server.url}/classify", files={"images": ("bad.jpg", bad, "image/jpeg")}, timeout=30)
        assert refused.status_code == 422, refused.text

        w = Watched(browser)
        page = w.page
        page.goto(f"{server.url}/")
        page.wait_for_selector("#card-body table")
        labels = page.inner_text("#labels")
        assert truth in labels and "Ankle_boot" in labels
        assert "model.fp32.onnx" in page.inner_text("#card-body")  # the gate table and the engine serving

        page.set_input_files("#file-input", files=[{"name": "item.png", "mimeType": "image/png", "buffer": image}])
        page.wait_for_selector(".result .top1")
        assert page.inner_text(".result .top1") == truth
        assert len(page.query_selector_all(".result .bars li")) == 5

        page.wait_for_selector("#live-images", timeout=10_000)  # the second poll of /metrics gives rates
        assert page.inner_text("#live-queue").strip().isdigit()
        if os.environ.get("VITSERVE_PAGE_SCREENSHOT"):
            page.screenshot(path=os.environ["VITSERVE_PAGE_SCREENSHOT"], full_page=True)

        page.set_input_files("#file-input", files=[{"name": "bad.jpg", "mimeType": "image/jpeg", "buffer": bad}])
        page.wait_for_selector("#try-error:not(:empty)")
        shown = page.inner_text("#try-error")
        assert shown == f"422: {refused.json()['error']['message']} (bad.jpg)", shown


        # At a phone's width the page still lays out (nothing wider than the screen).
        phone = Watched(browser, width=390).page
        phone.goto(f"{server.url}/")
        phone.wait_for_selector("#card-body table")
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390
        phone.close()

        origin = urlparse(server.url).netloc
        assert w.hosts() == {origin}, w.hosts()
        # The one expected console error is the browser's own line for the 422 answer.
        assert [e for e in w.errors if "status of 422" not in e] == [], w.errors
        page.close()


def test_with_api_keys_the_page_asks_for_one_and_shows_nothing_without_it(browser, tmp_path):
    with running_server(DEMO_ARTIFACT, tmp_path, grpc_port=0, api_keys="right-key") as server:
        w = Watched(browser)
        page = w.page
        page.goto(f"{server.url}/")
        page.wait_for_selector("#key-form:not([hidden])")
        assert "Ankle_boot" not in page.content()  # no labels, no card without a key
        page.fill("#key-input", "wrong-key")
        page.click("#key-form button")
        page.wait_for_selector("#key-error:not(:empty)")
        assert "not accepted" in page.inner_text("#key-error")
        page.fill("#key-input", "right-key")
        page.click("#key-form button")
        page.wait_for_selector("#card-body table")
        assert "Ankle_boot" in page.inner_text("#labels")
        assert page.is_hidden("#key-form")
        assert w.hosts() == {urlparse(server.url).netloc}
        page.close()


def test_the_finetune_report_is_one_file_that_opens_without_console_errors(browser, tmp_path):
    from tests.test_folder_to_endpoint import CLASSES, finetune_on_drawn_photos

    trained = finetune_on_drawn_photos(tmp_path, per_class=8, epochs=1, rng=np.random.default_rng(0))
    report = tmp_path / "run" / "report" / "index.html"
    assert f"report: {report}" in trained.stdout
    # Self-contained: moved away from its folder, every figure still shows.
    alone = tmp_path / "alone.html"
    alone.write_bytes(report.read_bytes())

    w = Watched(browser)
    w.page.goto(alone.as_uri())
    text = w.page.inner_text("body")
    for heading in ("Summary", "Validation per epoch", "Per class, validation", "Attention heads"):
        assert heading in text, heading
    assert all(label in text for label in CLASSES)
    images = w.page.query_selector_all("img")
    assert len(images) >= 4  # curves, confusion, reliability, attention
    assert all(img.evaluate("i => i.complete && i.naturalWidth > 0") for img in images)
    assert w.errors == [] and w.hosts() <= {""}, (w.errors, w.hosts())  # data: URIs only, nothing fetched
    w.page.close()
