"""The run report: rendered from a small labeling run, with its charts inline and its figures right."""

import base64
import io
import json
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.report import main as report_main
from mnasnet_batch.cli import main as label_main
from mnasnet_batch.config import StorageConfig
from mnasnet_batch.storage import Storage


@pytest.fixture(scope="module")
def run_output(tmp_path_factory, local_ray, corpus, checkpoint_path):
    """A labeling run over 6 photos, an empty file and a text file posing as an image."""
    images = tmp_path_factory.mktemp("report_images")
    for path in corpus[:6]:
        shutil.copy(path, images / path.name)
    (images / "empty.jpg").write_bytes(b"")
    (images / "page.png").write_text("<html></html>")
    output = tmp_path_factory.mktemp("report_run") / "labels"
    argv = ["--input", str(images), "--output", str(output), "--weights", str(checkpoint_path)]
    assert label_main([*argv, "--set", "preprocess.batch_size=4"]) == 0
    return output


def test_report_renders_the_runs_charts_and_figures(run_output, capsys):
    table = pq.read_table(run_output)
    ok = table.filter(table.column("status").to_numpy(zero_copy_only=False) == "ok").to_pylist()
    scores = sorted(row["top_k_scores"][0] for row in ok)
    threshold = (scores[1] + scores[2]) / 2  # two of the six readable images fall under it
    assert report_main(["--output", str(run_output), "--low-confidence", f"{threshold:.6f}"]) == 0
    assert "8 images, 2 errors, 33.3 % low confidence" in capsys.readouterr().out

    page = (run_output / "_report.html").read_text()
    charts = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [title for title, _ in charts] == [
        "Most frequent top-1 labels",
        "Top-1 confidence",
        "Low confidence share",
        "Error kinds",
        "Throughput",
    ]
    for _, data in charts:
        with Image.open(io.BytesIO(base64.b64decode(data))) as png:
            assert png.format == "PNG" and png.width > 300 and png.height > 100
            # A chart, not a blank canvas.
            assert len(np.unique(np.asarray(png.convert("L")))) > 10
    top1_labels = [row["top_k_labels"][0] for row in ok]
    top_label = max(set(top1_labels), key=top1_labels.count)
    assert f"<li>{top_label}: {top1_labels.count(top_label)}</li>" in page
    assert "<li>UnidentifiedImageError: 2</li>" in page
    assert "2 of 6 readable images (33.3 %)" in page
    assert re.search(r"run \S+: [0-9.]+ images/s \(8 images in [0-9.]+ s, succeeded\)", page)  # from _run.json
    assert "http://" not in page and "https://" not in page  # nothing to fetch: readable offline
    assert pq.read_table(run_output).num_rows == 8  # the page does not break reading the run as one table


def test_report_without_summary_or_errors(run_output, tmp_path):
    table = pq.read_table(run_output)
    clean = tmp_path / "clean"
    clean.mkdir()
    pq.write_table(table.filter(table.column("error").is_null()), clean / "part-0.parquet")
    destination = tmp_path / "elsewhere" / "page.html"
    destination.parent.mkdir()
    assert report_main(["--output", str(clean), "--report", str(destination)]) == 0
    page = destination.read_text()
    assert "throughput</th><td>not recorded" in page
    assert (
        page.count("data:image/png;base64,") == 3
        and "<h2>Throughput</h2>\n<p>nothing to show</p>" in page
        and "<h2>Error kinds</h2>\n<p>nothing to show</p>" in page
    )


def test_report_on_a_location_without_a_run(tmp_path, capsys):
    assert report_main(["--output", str(tmp_path / "missing")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_report_on_s3_uses_the_storage_settings(run_output, s3_server, capsys):
    fs, _ = Storage(StorageConfig(**s3_server)).filesystem("s3://report-bucket")
    fs.mkdir("report-bucket")
    fs.put(str(run_output), "report-bucket/labels", recursive=True)
    flags = []
    for key, value in s3_server.items():
        flags += ["--set", f"storage.{key}={json.dumps(value)}"]
    assert report_main(["--output", "s3://report-bucket/labels", *flags]) == 0
    assert "8 images, 2 errors" in capsys.readouterr().out
    page = fs.cat_file("report-bucket/labels/_report.html").decode()
    assert "<li>UnidentifiedImageError: 2</li>" in page and s3_server["options"]["secret"] not in page
