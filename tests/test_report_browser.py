"""The run report in a real browser: headless Chromium opens the page, every image loads, nothing is fetched and
nothing logs an error; hostile strings in every field stay text. The review files take the same strings.

Skipped where Chromium (Debian's ``chromium``) or the ``playwright`` package is missing, except in CI (``CI=true``
or ``CI_REQUIRE_BROWSER=1``: ``.ci/run`` sets both, after installing Chromium), where that fails the test instead.
"""

import datetime
import io
import json
import os
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.report import main as report_main
from jobs.review import main as review_main
from mnasnet_batch.evaluation import review
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


# Each would run script or add an element if it reached the page unescaped; none holds a "/" (file names hold them).
HOSTILE = {
    "uri": '"><svg onload="window.pwned=1">',
    "uri2": "<img src=x onerror=window.pwned=2>",
    "label": "<script>window.pwned=3</script>",
    "label2": "\"'><b id=injected>&amp;{{ 7*7 }}",
    "error": "<iframe srcdoc='<script>parent.pwned=4</script>'></iframe>",
    "run_id": "r1</title><script>window.pwned=5</script>",
    "model": "mnasnet0_5<marquee id=injected>",
    "weights": "IMAGENET1K_V1<script>window.pwned=6</script>",
}


def hostile_output(tmp_path, corpus, model: str = HOSTILE["model"]) -> tuple:
    """A run's rows whose uris, labels, error message, run id, ``model`` and weights are HOSTILE's strings: 4 images,
    an error row. Returns the output folder and the uris of the images."""
    names = [f"{HOSTILE['uri']}.jpg", f"{HOSTILE['uri2']}.png", "plain.jpg", f"{HOSTILE['label2']}.jpg"]
    tmp_path.mkdir(exist_ok=True)
    images = [shutil.copy(path, tmp_path / name) for path, name in zip(corpus, names, strict=False)]
    (tmp_path / f"{HOSTILE['uri']}.gif").write_text("<html></html>")
    uris = np.array([str(p) for p in images] + [str(tmp_path / f"{HOSTILE['uri']}.gif")], dtype=object)
    errors = np.array([""] * 4 + [HOSTILE["error"]], dtype=object)
    scores = np.array([[0.5, 0.2, 0.1, 0.1, 0.1]] * 4, dtype=np.float32)
    ids = np.array([[285, 1, 2, 3, 4], [1, 285, 2, 3, 4]] * 2, dtype=np.int32)
    categories = [f"class {i}" for i in range(1000)]
    categories[285], categories[1] = HOSTILE["label"], HOSTILE["label2"]
    run = tmp_path / "labels" / "run=r1"
    run.mkdir(parents=True)
    table = output_table(uris, errors, ids, scores, categories, model, HOSTILE["weights"])
    pq.write_table(table, run / "part-0.parquet")
    record = {
        "run_id": HOSTILE["run_id"],
        "status": "succeeded",
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "counts": {"labeled_this_attempt": 5},
        "seconds": 2.0,
        "images_per_s": 2.5,
        "config": {},
    }
    (run / "_run.json").write_text(json.dumps(record))
    return tmp_path / "labels", [str(p) for p in images]


def test_hostile_strings_in_every_field_stay_text_and_every_thumbnail_loads(tmp_path, corpus):
    output, uris = hostile_output(tmp_path, corpus)
    assert report_main(["--output", str(output)]) == 0
    with sync_playwright()() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            dialogs, errors = [], []
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto((output / "_report.html").as_uri(), wait_until="load", timeout=30_000)
            pwned = page.evaluate("window.pwned")
            injected = page.evaluate(
                "document.querySelectorAll('svg, script, iframe, marquee, #injected, [onload], [onerror]').length"
            )
            thumbnails = page.evaluate(
                "Array.from(document.querySelectorAll('figure img'), i => [i.complete && i.naturalWidth > 0, i.title])"
            )
            text = page.evaluate("document.body.innerText")
            titles = page.evaluate("Array.from(document.querySelectorAll('[title]'), e => e.title)")
            page_title = page.title()
        finally:
            browser.close()
    assert pwned is None and dialogs == [] and errors == [] and injected == 0
    # Every image's thumbnail loads, under its own uri, by label and among the least confident.
    assert sorted(title for _, title in thumbnails) == sorted(uris * 2)
    assert all(loaded for loaded, _ in thumbnails), thumbnails
    assert HOSTILE["run_id"] in text and HOSTILE["error"] in text and HOSTILE["label"] in text
    assert HOSTILE["label2"] in text and HOSTILE["model"] in text and HOSTILE["weights"] in text
    assert f"{HOSTILE['uri']}.gif" in " ".join(titles) and page_title == f"Labeling run report: {output}"


def test_hostile_strings_come_back_whole_from_the_review_files(tmp_path, corpus, capsys):
    # The labeling config lists the model's classes (torchvision's): a model that exists.
    output, uris = hostile_output(tmp_path / "photos", corpus, model="mnasnet0_5")
    tasks = tmp_path / "review.json"
    argv = ["--output", str(output), "--to", str(tasks), "--below", "1", "--local-root", str(tmp_path)]
    assert review_main(argv) == 0
    written = json.loads(tasks.read_text())
    assert sorted(t["data"]["uri"] for t in written) == sorted(uris)
    assert {t["predictions"][0]["result"][0]["value"]["choices"][0] for t in written} == {
        HOSTILE["label"],
        HOSTILE["label2"],
    }
    assert {t["predictions"][0]["model_version"] for t in written} == {f"mnasnet0_5 {HOSTILE['weights']}"}
    assert ET.parse(review.config_path(str(tasks))).getroot().tag == "View"
    # The labeling config: each class name is one Choice's value, as written, and nothing else is added.
    names = [HOSTILE[key] for key in ("label", "label2", "run_id", "error")]
    config = ET.fromstring(review.labeling_config(names))
    assert [c.get("value") for c in config.iter("Choice")] == names
    assert [e.tag for e in config.iter()] == ["View", "Image", "Header", "Text", "Choices"] + ["Choice"] * 4
