"""The run report: rendered from a small labeling run, with its charts inline and its figures right, and its
gallery of thumbnails read back from the run's inputs (files, WebDataset shards, Parquet, S3, a table's rows)."""

import base64
import collections
import io
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.report import main as report_main
from mnasnet_batch.cli import main as label_main
from mnasnet_batch.config import StorageConfig
from mnasnet_batch.evaluation import gallery
from mnasnet_batch.evaluation.rows import OutputRows
from mnasnet_batch.inputs.parquet import ParquetLayout
from mnasnet_batch.inputs.webdataset import WebDatasetLayout
from mnasnet_batch.storage import Storage
from tests import support
from tests.support import make_tar


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


class GalleryPage(HTMLParser):
    """A report page's gallery as a reader sees it: per section (``by-label``, ``least-confident``, ``error-rows``)
    its figures, each with its label block, ``title``, image ``src`` or placeholder (``missing``) and caption."""

    def __init__(self, page: str):
        super().__init__()
        self.sections: dict[str, list[dict]] = {}
        self.section = self.label = self.figure = None
        self.in_caption = False
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.section, self.label = attrs.get("id"), None
        elif tag == "div" and "data-label" in attrs:
            self.label = attrs["data-label"]
        elif tag == "figure":
            self.figure = {"label": self.label, "title": None, "src": None, "missing": None, "caption": ""}
        elif tag == "img" and self.figure is not None:
            self.figure.update(title=attrs["title"], src=attrs["src"])
        elif tag == "div" and attrs.get("class") == "placeholder":
            self.figure.update(title=attrs["title"], missing=attrs["data-missing"])
        elif tag == "figcaption":
            self.in_caption = True
        elif tag == "br" and self.in_caption:
            self.figure["caption"] += "\n"

    def handle_endtag(self, tag):
        if tag == "figcaption":
            self.in_caption = False
        elif tag == "figure":
            self.sections.setdefault(self.section, []).append(self.figure)
            self.figure = None

    def handle_data(self, data):
        if self.in_caption:
            self.figure["caption"] += data


def thumbnail_of(src: str) -> Image.Image:
    """The JPEG of a thumbnail's data URI, checked to be one of ``gallery.THUMBNAIL_PX`` on its long side."""
    prefix = "data:image/jpeg;base64,"
    assert src.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(src[len(prefix) :])))
    assert image.format == "JPEG" and max(image.size) == gallery.THUMBNAIL_PX
    return image


def gallery_html(page: str) -> str:
    return page[page.index('<section id="by-label">') : page.index("<p><small>generated")]


def test_the_gallery_shows_labels_least_confident_and_errors_reproducibly(run_output, tmp_path, capsys):
    rows = {r["uri"]: r for r in pq.read_table(run_output).to_pylist()}
    pages = []
    for name in ("first.html", "second.html"):
        assert report_main(["--output", str(run_output), "--report", str(tmp_path / name)]) == 0
        pages.append((tmp_path / name).read_text())
    out = capsys.readouterr().out
    assert gallery_html(pages[0]) == gallery_html(pages[1])  # the same samples, the same thumbnails
    size = re.search(r"12 thumbnails, 2 placeholders \(undecodable 2\), ([0-9.]+) MB", out)
    assert size and float(size[1]) == pytest.approx(len(pages[0].encode()) / 2**20, abs=0.01)
    assert len(pages[0].encode()) < 5 * 2**20

    sections = GalleryPage(pages[0]).sections
    ok = {uri: row for uri, row in rows.items() if row["status"] == "ok"}
    by_label = sections["by-label"]
    # Every readable image shows under its top-1 label (6 images: no label has more than 8), titled by its uri.
    assert sorted(f["title"] for f in by_label) == sorted(ok)
    for figure in by_label:
        assert figure["label"] == ok[figure["title"]]["top_k_labels"][0]
        assert figure["caption"] == f"{ok[figure['title']]['top_k_scores'][0]:.3f}"
        thumbnail_of(figure["src"])
    assert max(collections.Counter(f["label"] for f in by_label).values()) <= gallery.PER_LABEL

    least = sections["least-confident"]
    assert [f["title"] for f in least] == sorted(ok, key=lambda uri: (ok[uri]["top_k_scores"][0], uri))
    for figure in least:
        row = ok[figure["title"]]
        top3 = zip(row["top_k_labels"][:3], row["top_k_scores"][:3], strict=True)
        assert figure["caption"].split("\n") == [f"{label} {score:.3f}" for label, score in top3]
        thumbnail_of(figure["src"])

    errors = sections["error-rows"]
    assert {f["title"]: f["caption"] for f in errors} == {
        uri: row["error"] for uri, row in rows.items() if row["status"] == "error"
    }
    assert all(f["missing"] == "undecodable" and f["src"] is None for f in errors)  # a placeholder, no broken <img>


def synthetic_rows(labels: dict[str, int], errors: dict[str, int]) -> pa.Table:
    """Output rows: ``labels[name]`` rows of each top-1 label, scores falling, and ``errors[kind]`` error rows."""
    rows = []
    for label, count in labels.items():
        rows += [
            {
                "uri": f"/in/{label}/{i:03d}.jpg",
                "status": "ok",
                "error": None,
                "top_k_scores": [1 - i / 100, 0.0],
                "top_k_labels": [label, "other"],
            }
            for i in range(count)
        ]
    for kind, count in errors.items():
        rows += [
            {
                "uri": f"/in/bad/{kind}{i}.jpg",
                "status": "error",
                "error": f"{kind}: bad {i}",
                "top_k_scores": None,
                "top_k_labels": None,
            }
            for i in range(count)
        ]
    return pa.Table.from_pylist(rows)


def test_samples_are_seeded_spread_and_independent_of_row_order():
    rows = synthetic_rows({"tabby": 30, "goldfish": 5}, {"OSError": 12, "ValueError": 2})
    by_label, least, errors = gallery.choose(rows, ["tabby", "goldfish"])
    tabby = by_label[0][1]["uri"].to_pylist()
    assert len(tabby) == gallery.PER_LABEL and tabby != sorted(rows["uri"].to_pylist())[: gallery.PER_LABEL]
    assert by_label[1][1].num_rows == 5  # all of a label with fewer
    shuffled = rows.take(np.random.default_rng(1).permutation(rows.num_rows))
    again = gallery.choose(shuffled, ["tabby", "goldfish"])
    assert again[0][0][1]["uri"].to_pylist() == tabby and again[2]["uri"] == errors["uri"]
    assert gallery.choose(rows, ["tabby"], seed=1)[0][0][1]["uri"].to_pylist() != tabby
    # The least confident: the lowest top-1 scores first, 24 of the 35.
    scores = [s[0] for s in least["top_k_scores"].to_pylist()]
    assert len(scores) == gallery.LEAST_CONFIDENT and scores == sorted(scores) and scores[0] == pytest.approx(0.71)
    # Errors: 8, every kind shown though one kind has most of the rows.
    kinds = [e.split(":")[0] for e in errors["error"].to_pylist()]
    assert len(kinds) == gallery.ERRORS and collections.Counter(kinds) == {"OSError": 6, "ValueError": 2}


def copy_run(run_output: Path, images: Path, copy: Path) -> list[str]:
    """A copy of the run whose rows name copies of its images (modification times kept), to change them.

    Returns:
        The copies' uris, of the readable images first, in name order.
    """
    images.mkdir()
    for part in run_output.glob("run=*/part-*.parquet"):
        table = pq.read_table(part)
        uris = []
        for uri in table["uri"].to_pylist():
            shutil.copy2(uri, images / Path(uri).name)
            uris.append(str(images / Path(uri).name))
        (copy / part.parent.name).mkdir(parents=True, exist_ok=True)
        pq.write_table(table.set_column(0, "uri", pa.array(uris, pa.string())), copy / part.parent.name / part.name)
        shutil.copy(part.parent / "_run.json", copy / part.parent.name / "_run.json")
    rows = pq.read_table(copy).to_pylist()
    return sorted(r["uri"] for r in rows if r["status"] == "ok")


def test_inputs_gone_or_changed_since_the_run_get_placeholders_that_say_so(run_output, corpus, tmp_path, capsys):
    gone, changed, garbled, *kept = copy_run(run_output, tmp_path / "images", tmp_path / "labels")
    os.remove(gone)
    Path(changed).write_bytes(corpus[-1].read_bytes())  # another photo: modified after the run began
    stat = os.stat(garbled)
    Path(garbled).write_bytes(b"not a JPEG any more")
    os.utime(garbled, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # modified "before" the run: its bytes tell
    assert report_main(["--output", str(tmp_path / "labels")]) == 0
    assert "6 thumbnails, 8 placeholders (changed 4, gone 2, undecodable 2)" in capsys.readouterr().out
    page = (tmp_path / "labels" / "_report.html").read_text()
    figures = [f for section in GalleryPage(page).sections.values() for f in section]
    shown = collections.defaultdict(set)
    for figure in figures:
        shown[figure["title"]].add(figure["missing"] or "thumbnail")
    assert shown[gone] == {"gone"} and shown[changed] == {"changed"} and shown[garbled] == {"changed"}
    assert all(shown[uri] == {"thumbnail"} for uri in kept)
    assert "gone since the run" in page and "the bytes no longer decode" in page and "after run " in page


def test_a_tables_rows_compare_their_sources_size_and_version(corpus, tmp_path):
    from mnasnet_batch.outputs.iceberg import source_stats

    images = [shutil.copy2(path, tmp_path / path.name) for path in corpus[:2]]
    uris = [str(path) for path in images]
    stats = source_stats(uris, Storage())
    rows = pa.table(
        {
            "uri": uris,
            "status": ["ok", "ok"],
            "error": pa.nulls(2, pa.string()),
            "top_k_scores": [[0.9], [0.8]],
            "top_k_labels": [["tabby"], ["tabby"]],
            "run_id": ["r1", "r1"],
            "source_size": stats["source_size"],
            "source_version": stats["source_version"],
        }
    )
    stat = os.stat(uris[1])
    Path(uris[1]).write_bytes(corpus[2].read_bytes())
    os.utime(uris[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))  # a table's row keeps the exact version
    found = gallery.look(rows, OutputRows(rows, []), Storage())
    assert found[uris[0]].jpeg and not found[uris[0]].missing
    assert found[uris[1]].missing == "changed" and "when labeled" in found[uris[1]].reason


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory, local_ray, corpus, checkpoint_path):
    """Runs over two WebDataset shards of 3 samples (an image and a class member each), and over a Parquet file
    of 4 images in two row groups; each input's images by the uri the run gives them."""
    root = tmp_path_factory.mktemp("report_layouts")
    (root / "shards").mkdir()
    (root / "table").mkdir()
    images = {"webdataset": {}, "parquet": {}}
    for s in range(2):
        members = []
        for i, path in enumerate(corpus[6 + 3 * s : 9 + 3 * s]):
            members += [(f"s{s}_{i}{path.suffix}", path.read_bytes()), (f"s{s}_{i}.cls", b"1")]
            images["webdataset"][f"{root}/shards/{s:06d}.tar#s{s}_{i}{path.suffix}"] = path
        (root / "shards" / f"{s:06d}.tar").write_bytes(make_tar(members))
    table = pa.table({"id": [10, 11, 12, 13], "image": [p.read_bytes() for p in corpus[12:16]]})
    pq.write_table(table, root / "table" / "part-0.parquet", row_group_size=2)
    images["parquet"] = {f"{root}/table/part-0.parquet#{10 + i}": p for i, p in enumerate(corpus[12:16])}
    outputs = {}
    for name, folder in (("webdataset", "shards"), ("parquet", "table")):
        outputs[name] = root / f"labels-{name}"
        argv = ["--input", str(root / folder), "--output", str(outputs[name]), "--weights", str(checkpoint_path)]
        # The Parquet file's own ids name its rows (without the setting, a row's index in its file would).
        assert label_main([*argv, "--set", "preprocess.batch_size=4", "--set", "input.id_column=id"]) == 0
    return outputs, images


@pytest.mark.parametrize("layout", [WebDatasetLayout, ParquetLayout])
def test_shards_and_parquet_files_give_thumbnails_each_read_once(layout_runs, layout, monkeypatch):
    outputs, images = layout_runs
    reads = []
    read_rows = layout.read_rows

    def counted(self, input_uri, uris):
        reads.append(input_uri)
        return read_rows(self, input_uri, uris)

    monkeypatch.setattr(layout, "read_rows", counted)
    assert report_main(["--output", str(outputs[layout.name])]) == 0
    page = (outputs[layout.name] / "_report.html").read_text()
    figures = [f for section in GalleryPage(page).sections.values() for f in section]
    expected = images[layout.name]
    assert {f["title"] for f in figures} == set(expected)  # SHARD#MEMBER, FILE#ID
    for figure in figures:
        # The thumbnail of the very member or row the uri names.
        assert figure["src"] == gallery.data_uri(gallery.thumbnail(expected[figure["title"]].read_bytes()))
    inputs = {uri.split("#")[0] for uri in expected}
    assert sorted(reads) == sorted(inputs)  # each shard or file read once for all its thumbnails


def test_thumbnails_from_s3_through_the_storage_settings(corpus, s3_server):
    storage = Storage(StorageConfig(**s3_server))
    fs, _ = storage.filesystem("s3://gallery-bucket")
    fs.mkdir("gallery-bucket")
    fs.pipe_file("gallery-bucket/photos/a.jpg", corpus[0].read_bytes())
    fs.pipe_file("gallery-bucket/shards/000000.tar", make_tar([("k.jpg", corpus[1].read_bytes()), ("k.cls", b"1")]))
    uris = ["s3://gallery-bucket/photos/a.jpg", "s3://gallery-bucket/shards/000000.tar#k.jpg"]
    rows = pa.table(
        {
            "uri": uris + ["s3://gallery-bucket/photos/gone.jpg"],
            "status": ["ok"] * 3,
            "error": pa.nulls(3, pa.string()),
            "top_k_scores": [[0.9]] * 3,
            "top_k_labels": [["tabby"]] * 3,
            "run_id": ["r1", "r2", "r1"],
            "source_size": pa.nulls(3, pa.int64()),
            "source_version": pa.nulls(3, pa.string()),
        }
    )
    records = [{"run_id": "r1", "config": {"input": {"format": "files"}}}, {"run_id": "r2", "config": {}}]
    found = gallery.look(rows, OutputRows(rows, records), storage)
    for uri, path in zip(uris, corpus[:2], strict=True):
        assert found[uri].jpeg == gallery.thumbnail(path.read_bytes())
    gone = found["s3://gallery-bucket/photos/gone.jpg"]
    assert gone.missing == "gone" and gone.reason.startswith("FileNotFoundError")


def test_thumbnails_are_upright_by_their_exif_orientation(photos):
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    photos["chelsea"].resize((300, 200)).save(buffer, format="JPEG", exif=exif)
    with Image.open(io.BytesIO(gallery.thumbnail(buffer.getvalue()))) as thumbnail:
        assert thumbnail.size == (85, 128)


def test_the_gallery_keeps_the_page_under_its_budget():
    big = os.urandom(20_000)  # a thumbnail's worth of incompressible bytes
    labels = [
        (f"label {i}", [gallery.Picture(f"/in/{i}/{j}.jpg", (f"label {i}",), (0.5,), jpeg=big) for j in range(8)])
        for i in range(40)
    ]
    html = gallery.render(gallery.Gallery(labels, [], []), {f"label {i}": 8 for i in range(40)})
    assert len(html) < gallery.GALLERY_BYTES + 100_000 and "not shown, to keep the page under 5 MB: label " in html
    assert "label 0" in html and html.count("<figure>") < 40 * 8


def test_a_manifests_http_urls_are_read_back_with_its_storage_settings(corpus, tmp_path):
    with support.ImageServer({"/good.jpg": corpus[0].read_bytes()}) as server:
        uris = [server.url("/good.jpg"), server.url("/missing.jpg"), server.url("/page.jpg"), str(corpus[1])]
        rows = pa.table(
            {
                "uri": uris,
                "status": ["ok", "ok", "ok", "ok"],
                "error": pa.nulls(4, pa.string()),
                "top_k_scores": [[0.9]] * 4,
                "top_k_labels": [["tabby"]] * 4,
                "run_id": ["m"] * 4,
                "source_size": pa.nulls(4, pa.int64()),
                "source_version": pa.nulls(4, pa.string()),
            }
        )
        record = {"run_id": "m", "config": {"input": {"uri": str(tmp_path / "list.txt"), "format": "manifest"}}}
        found = gallery.look(rows, OutputRows(rows, [record]), Storage(StorageConfig(http_timeout_s=2)))
    assert found[uris[0]].jpeg == gallery.thumbnail(corpus[0].read_bytes())
    assert found[uris[1]].missing == "gone" and found[uris[1]].reason.startswith("FileNotFoundError")
    # An HTML page where the run read an image: the bytes it serves now no longer decode.
    assert found[uris[2]].missing == "changed" and "no longer decode" in found[uris[2]].reason
    assert found[uris[3]].jpeg == gallery.thumbnail(corpus[1].read_bytes())
