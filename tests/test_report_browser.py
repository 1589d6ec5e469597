"""The run report in a real browser: headless Chromium opens the page, every image loads, nothing is fetched and
nothing logs an error.

Skipped where Chromium (Debian's ``chromium``) or the ``playwright`` package is missing, except under
``CI_REQUIRE_BROWSER=1`` (``.ci/run`` sets it, after installing Chromium), where that fails the test instead.
"""

import datetime
import io
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.report import main as report_main
from mnasnet_batch.model.postprocess import output_table

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless, as root in a container, and quiet: without the background-networking flags Chromium tries connections
# of its own (which fail offline and would mask the page's own requests).
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def sync_playwright():
    """Playwright's entry point, or a skip (a failure in CI: ``CI=true`` or ``CI_REQUIRE_BROWSER=1``) saying what
    is missing."""
    missing = ""
    if not os.access(CHROMIUM, os.X_OK):
        missing = f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = missing or "no playwright package (pip install 'mnasnet-batch[test]')"
    if missing:
        if os.environ.get("CI_REQUIRE_BROWSER") == "1" or os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(f"CI requires the browser test, but {missing}")
        pytest.skip(missing)
    return sync_playwright


@pytest.fixture
def report_page(tmp_path, corpus):
    """A report over a run's rows (the job's own output schema, a run folder and its record, no cluster): 8 images
    of two labels, an input deleted since, and an error row."""
    images = [shutil.copy(path, tmp_path / path.name) for path in corpus[:9]]
    (tmp_path / "page.png").write_text("<html></html>")
    uris = np.array([str(p) for p in images] + [str(tmp_path / "page.png")], dtype=object)
    errors = np.array([""] * 9 + ["UnidentifiedImageError: cannot identify image file"], dtype=object)
    rng = np.random.default_rng(0)
    scores = np.sort(rng.dirichlet(np.ones(5) * 0.5, 9).astype(np.float32), axis=1)[:, ::-1]
    ids = np.array([[285 if i % 2 else 1, 2, 3, 4, 5] for i in range(9)], dtype=np.int32)
    categories = [f"class {i}" for i in range(1000)]
    categories[285], categories[1] = "Egyptian cat", "goldfish"
    run = tmp_path / "labels" / "run=r1"
    run.mkdir(parents=True)
    pq.write_table(
        output_table(uris, errors, ids, scores, categories, "mnasnet0_5", "IMAGENET1K_V1"), run / "part-0.parquet"
    )
    record = {
        "run_id": "r1",
        "status": "succeeded",
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "counts": {"labeled_this_attempt": 10},
        "seconds": 2.0,
        "images_per_s": 5.0,
        "config": {},
    }
    (run / "_run.json").write_text(json.dumps(record))
    os.remove(images[0])  # gone since the run
    assert report_main(["--output", str(tmp_path / "labels")]) == 0
    return tmp_path / "labels" / "_report.html"


def test_the_report_renders_in_chromium(report_page):
    with sync_playwright()() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            errors, requests = [], []
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("request", lambda request: requests.append(request.url))
            page.goto(report_page.as_uri(), wait_until="load", timeout=30_000)
            loaded = page.evaluate("Array.from(document.images, i => [i.complete, i.naturalWidth, i.title || i.alt])")
            placeholders = page.locator(".placeholder").all_inner_texts()
            screenshot = page.screenshot(full_page=True)
        finally:
            browser.close()
    assert errors == []
    # The page alone: every image is inline.
    assert [url for url in requests if not url.startswith("data:")] == [report_page.as_uri()]
    # 5 charts, and thumbnails: 8 images by label and among the least confident.
    assert len(loaded) == 5 + 2 * 8
    assert all(complete and width > 0 for complete, width, _ in loaded), loaded
    assert any("gone since the run" in text for text in placeholders)
    assert any("does not decode" in text for text in placeholders)
    with Image.open(io.BytesIO(screenshot)) as png:
        assert png.format == "PNG" and png.width == 1100 and png.height > 900
        assert len(np.unique(np.asarray(png.convert("L")))) > 50  # charts and photos, not a blank page
