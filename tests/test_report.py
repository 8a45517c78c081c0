"""The HTML report: rendered from a real demo run, opened in headless Chromium, numbers checked against metrics.json."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import prune2edge_cli

from prune2edge import report, store
from prune2edge.errors import UserError
from prune2edge.report.decisions import _display
from prune2edge.report.plot import _png

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
# what a report of a complete run must mark with data-metric, so that the test can read the numbers exactly
HEADLINE = {
    "baseline.test_acc_fp32",
    "baseline.test_acc_int8",
    "ensemble.test_acc",
    "ensemble.gain_vs_baseline_fp32",
    "ensemble.mcnemar_p_vs_baseline_fp32",
    "ensemble.k",
    "baseline.bytes.fp32",
    "baseline.bytes.int8",
    "baseline.bytes.int8_gzip",
    "ensemble.bytes.fp32",
    "ensemble.bytes.int8",
    "ensemble.bytes.int8_gzip",
    "baseline.bytes.shipped",  # what a device downloads, in the headline card and the sizes table
    "ensemble.bytes.shipped",
}


def _which(names: tuple[str, ...]) -> str | None:
    return next((p for p in map(shutil.which, names) if p), None)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through the system chromedriver; missing pieces fail the test (they are required)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the browser test needs the selenium package: pip install -e '.[test]'")
    chromium, driver_path = _which(CHROMIUM), _which(("chromedriver",))
    if not chromium or not driver_path:
        pytest.fail(
            f"the browser test needs headless Chromium and chromedriver, and found chromium={chromium}, "
            f"chromedriver={driver_path}: run scripts/system-deps.sh (apt-get install chromium chromium-driver)"
        )
    profile = tempfile.mkdtemp(prefix="prune2edge-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)  # no Selenium Manager
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def open_page(driver, path: Path) -> None:
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    driver.get(path.resolve().as_uri())
    assert driver.execute_script("return document.readyState") == "complete"


def images(driver) -> list[dict]:
    return driver.execute_script(
        "return [...document.images].map(i => ({id: i.dataset.figure, complete: i.complete, width: i.naturalWidth,"
        " src: i.getAttribute('src').slice(0, 22)}))"
    )


def screenshot(driver, path: Path, width: int = 1280, mobile: bool = False) -> bytes:
    """The whole page as PNG (Chromium's DevTools protocol: beyond the viewport), at the given CSS width."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": mobile}
    )
    height = driver.execute_script("return document.documentElement.scrollHeight")
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
        },
    )
    png = base64.b64decode(shot["data"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return png


def metric(metrics: dict, dotted: str):
    """``members.m001.bytes.int8_gzip`` -> the value in metrics.json (members are looked up by name)."""
    node = metrics
    for key in dotted.split("."):
        node = next(m for m in node if m["name"] == key) if isinstance(node, list) else node[key]
    return node


@pytest.mark.browser
def test_run_writes_report_and_browser_shows_every_figure(demo_run: Path, browser) -> None:
    page, metrics = demo_run / "report.html", store.read_json(demo_run / "metrics.json")
    assert page.is_file(), "pipeline.run did not write report.html"
    assert "report" in store.read_json(demo_run / "timings.json")
    html = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(|@import""", html), (
        "the page refers to something outside it"
    )

    open_page(browser, page)
    imgs = images(browser)
    pngs = sorted(p.stem for p in (demo_run / "figures").glob("*.png"))
    assert sorted(i["id"] for i in imgs) == pngs == sorted(f[0] for f in report.FIGURES), (
        "every figure, once, on the page"
    )
    broken = [i["id"] for i in imgs if not (i["complete"] and i["width"] > 0)]
    assert not broken, f"broken images: {broken}"
    assert all(i["src"] == "data:image/png;base64," for i in imgs)
    assert browser.execute_script("return [...document.images].every(i => i.complete && i.naturalWidth > 0)")
    assert not browser.find_elements("css selector", "#missing"), "a complete run reported as incomplete"

    marked = browser.find_elements("css selector", "[data-metric]")
    seen = set()
    for el in marked:
        path, fmt = el.get_attribute("data-metric"), el.get_attribute("data-format")
        expected = metric(metrics, path)
        assert json.loads(el.get_attribute("data-value")) == expected, path
        assert el.text == report.FORMATS[fmt](expected), (path, el.text)
        seen.add(path)
    assert seen >= HEADLINE, f"headline numbers not on the page: {HEADLINE - seen}"
    for name in metrics["ensemble"]["members"]:
        assert {f"members.{name}.bytes.int8_gzip", f"members.{name}.bytes.shipped"} <= seen
    for name in metrics["cost"]["members"]:  # each shipped model's cost on a device, beside its latency
        assert {f"cost.members.{name}.macs", f"cost.members.{name}.memory_mb"} <= seen
    assert {"cost.parent_int8.macs", "cost.parent_int8.memory_mb"} <= seen

    png = screenshot(browser, ARTIFACTS / "report.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    # phone: the page must not scroll sideways (wide tables scroll inside their own box)
    screenshot(browser, ARTIFACTS / "report-phone.png", width=390, mobile=True)
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")


def _stop_after(src: Path, dst: Path, phase: str) -> Path:
    """A copy of a complete run, with the files of every phase after ``phase`` removed."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.onnx", "*.pt"))
    for f in ("metrics.json", "test.npz", "test_scores.npz", "report.html"):
        (dst / f).unlink()
    shutil.rmtree(dst / "figures")
    if phase == "pool":
        shutil.rmtree(dst / "bundle")
        (dst / "selection.json").unlink()
        for f in [*dst.glob("pool/*/quant.json"), *dst.glob("pool/*/val_proba.npy"), dst / "baseline" / "quant.json"]:
            f.unlink()
    return dst


@pytest.mark.parametrize(
    "phase, drawn",
    [
        ("pool", {"accuracy-vs-sparsity", "baseline-history", "timings"}),
        (
            "bundle",
            {
                "accuracy-vs-size",
                "accuracy-vs-sparsity",
                "cluster-map",
                "disagreement-heatmap",
                "baseline-history",
                "timings",
            },
        ),
    ],
)
@pytest.mark.browser
def test_report_of_an_unfinished_run_shows_what_exists(
    demo_run: Path, tmp_path: Path, browser, monkeypatch, phase, drawn
) -> None:
    run = _stop_after(demo_run, tmp_path / "run", phase)

    def no_dataset(*a, **k):
        raise AssertionError("the report loaded a dataset")

    monkeypatch.setattr(store, "dataset", no_dataset)
    monkeypatch.setattr(store, "split", no_dataset)
    page = report.write(run)
    assert {p.stem for p in (run / "figures").glob("*.png")} == drawn
    open_page(browser, page)
    assert sorted(i["id"] for i in images(browser)) == sorted(drawn)
    assert browser.execute_script("return [...document.images].every(i => i.complete && i.naturalWidth > 0)")
    banner = browser.find_element("id", "missing").text
    assert "This run is incomplete" in banner and "metrics.json" in banner and "evaluate" in banner
    assert ("selection.json" in banner) == (phase == "pool")
    body = browser.find_element("tag name", "body").text
    assert "not been evaluated" in body
    assert body.count("Not drawn:") == len(report.FIGURES) - len(drawn)
    for f in sorted(run.glob("pool/*/member.json")):  # every member's validation accuracy is listed
        m = store.read_json(f)
        assert m["name"] in body and report.pct(m["val_acc_fp32"]) in body
    screenshot(browser, ARTIFACTS / f"report-after-{phase}.png")


def test_report_command(demo_run: Path, tmp_path: Path) -> None:
    run = shutil.copytree(demo_run, tmp_path / "run", ignore=shutil.ignore_patterns("*.onnx", "*.pt", "report.html"))
    done = prune2edge_cli("report", str(run))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(run / "report.html") and (run / "report.html").is_file()


def test_bad_run_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a directory"):
        report.write(tmp_path / "nowhere")
    with pytest.raises(UserError, match="not a prune2edge run directory"):
        report.write(tmp_path)
    done = prune2edge_cli("report", str(tmp_path))
    assert done.returncode == 2
    assert (
        "error:" in done.stderr and "not a prune2edge run directory" in done.stderr and "Traceback" not in done.stderr
    )


@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1), (32, 32, 3), (96, 80, 3)])
def test_disputed_images_for_gray_and_colour_images_of_any_size(tmp_path: Path, shape) -> None:
    rng = np.random.default_rng(0)
    n, k, classes = 40, 3, ["cat", "dog", "a very long class name"]
    x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    y = rng.integers(0, k, n)
    members = rng.random((4, n, k)).astype(np.float32)
    names = np.array(["m0", "m1", "m2", "m3"])
    run = report.Run(
        dir=tmp_path,
        dataset={"classes": classes, "image_shape": list(shape)},
        config_text="",
        config={},
        baseline=None,
        baseline_quant=None,
        members=[],
        quant={},
        selection=None,
        timings=None,
        metrics={"ensemble": {"members": ["m1", "m3", "m0"]}},
        test={"x": x, "y": y},
        scores={"names": names, "members": members, "ensemble": members[[1, 3, 0]].mean(0)},
    )
    idx, votes, per_image = report.disputed_images(run)
    assert idx and votes.shape == (3, n) and per_image.max() <= 1
    assert list(per_image[idx]) == sorted(per_image[idx], reverse=True)
    shown = _display(x[0], 255)
    factor = max(1, math.ceil(64 / max(shape[:2])))  # small images are enlarged, pixel by pixel
    assert shown.shape[:2] == (shape[0] * factor, shape[1] * factor)
    assert shown.ndim == (2 if shape[-1] == 1 else 3)
    fig = report.fig_disputed_images(run)
    assert isinstance(fig, report.Figure)
    assert _png(fig)[:4] == b"\x89PNG"
