"""Review tasks: a small labeling run's least confident rows as Label Studio tasks, their labeling config, the
URLs Label Studio opens, and reviewed labels read back from a hand-written Label Studio export."""

import json
import os
import re
import shutil
import xml.etree.ElementTree as ET
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torchvision

from jobs.review import main as review_main
from mnasnet_batch.cli import main as label_main
from mnasnet_batch.config import StorageConfig, load_config
from mnasnet_batch.evaluation import review
from mnasnet_batch.outputs import folder as output
from mnasnet_batch.storage import Storage
from tests import support

CATEGORIES = torchvision.models.MNASNet0_5_Weights.IMAGENET1K_V1.meta["categories"]


@pytest.fixture(scope="module")
def run_output(tmp_path_factory, local_ray, corpus, checkpoint_path):
    """A labeling run over 5 photos (one in a subfolder, one named with a space and a '#') and an empty file."""
    images = tmp_path_factory.mktemp("review_images") / "photos"
    (images / "more").mkdir(parents=True)
    names = ["a.jpg", "b.jpg", "more/c.jpg", "two words #4.jpg", "e.jpg"]
    for path, name in zip(corpus[:5], names, strict=True):
        shutil.copy(path, images / name)
    (images / "empty.jpg").write_bytes(b"")
    output_uri = tmp_path_factory.mktemp("review_run") / "labels"
    argv = ["--input", str(images), "--output", str(output_uri), "--weights", str(checkpoint_path)]
    assert label_main([*argv, "--set", "preprocess.batch_size=4"]) == 0
    return output_uri


def job_rows(run_output) -> tuple[list[dict], list[str]]:
    """The run's ok rows, least confident first (ties by uri), and the error rows' uris, read with pyarrow."""
    rows = pq.read_table(run_output).to_pylist()
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: (r["top_k_scores"][0], r["uri"]))
    return ok, [r["uri"] for r in rows if r["status"] == "error"]


def local_path(url: str, root: str) -> str:
    """The path a local-files URL asks Label Studio for, as its server reads it (``d`` under the document root)."""
    parts = urlsplit(url)
    assert parts.path == "/data/local-files/"
    return os.path.join(root, parse_qs(parts.query)["d"][0])


def test_the_least_confident_ok_rows_become_tasks_most_uncertain_first(run_output, tmp_path, capsys):
    ok, errors = job_rows(run_output)
    assert len(ok) == 5 and len(errors) == 1
    scores = [r["top_k_scores"][0] for r in ok]
    threshold = (scores[2] + scores[3]) / 2  # three of the five readable images fall under it
    destination = tmp_path / "review.json"
    assert review_main(["--output", str(run_output), "--to", str(destination), "--below", f"{threshold:.8f}"]) == 0
    line = capsys.readouterr().out.strip()
    assert f"review tasks {destination}: 3 of 3 ok images with a top-1 score under {threshold:.8f}" in line
    assert f"labeling config {tmp_path / 'review.labeling.xml'}" in line

    tasks = json.loads(destination.read_text())
    assert [t["data"]["uri"] for t in tasks] == [r["uri"] for r in ok[:3]]
    assert [t["predictions"][0]["score"] for t in tasks] == scores[:3]  # ascending: most uncertain first
    # The default document root is the folder above the photos' (Label Studio refuses a Local Files storage at the
    # root itself), and the photos' folder is the storage.
    root = re.search(r"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=(\S+) ", line).group(1)
    photos = os.path.join(root, "photos")
    assert f"a Local Files storage for {photos}" in line and all(r["uri"].startswith(photos + "/") for r in ok)
    for t, row in zip(tasks, ok, strict=False):
        assert t["data"]["image"].startswith("/data/local-files/?d=")
        assert local_path(t["data"]["image"], root) == row["uri"]
        [prediction] = t["predictions"]
        assert prediction["model_version"] == f"{row['model']} {row['weights']}"
        [result] = prediction["result"]
        assert result["type"] == "choices" and result["value"] == {"choices": [row["top_k_labels"][0]]}
        assert (result["from_name"], result["to_name"]) == (review.FROM_NAME, review.TO_NAME)
        for label, score in zip(row["top_k_labels"], row["top_k_scores"], strict=True):
            assert f"{label} {score:.3f}" in t["data"]["top_k"]  # the alternatives, for the reviewer
    assert len({t["predictions"][0]["result"][0]["id"] for t in tasks}) == 3


def test_every_ok_row_under_one_and_the_limit_and_never_an_error_row(run_output, tmp_path, capsys):
    ok, errors = job_rows(run_output)
    every = tmp_path / "every.json"
    assert review_main(["--output", str(run_output), "--to", str(every), "--below", "1.01"]) == 0
    tasks = json.loads(every.read_text())
    assert [t["data"]["uri"] for t in tasks] == [r["uri"] for r in ok]
    assert not {t["data"]["uri"] for t in tasks} & set(errors)
    # The name with a space and a '#' is a loose file, its URL percent-encoded and decoded back by the server.
    [odd] = [t for t in tasks if t["data"]["uri"].endswith("two words #4.jpg")]
    assert "%20" in odd["data"]["image"] and "%23" in odd["data"]["image"]

    capsys.readouterr()
    limited = tmp_path / "limited.json"
    assert review_main(["--output", str(run_output), "--to", str(limited), "--below", "1.01", "--limit", "2"]) == 0
    assert [t["data"]["uri"] for t in json.loads(limited.read_text())] == [r["uri"] for r in ok[:2]]
    line = capsys.readouterr().out
    assert "2 of 5 ok images" in line and "(3 over --limit 2 left out)" in line


def test_a_local_root_makes_paths_relative_to_it_and_leaves_out_images_directly_in_it(run_output, tmp_path, capsys):
    ok, _ = job_rows(run_output)
    photos = os.path.commonpath([os.path.dirname(r["uri"]) for r in ok])
    assert os.path.basename(photos) == "photos"
    root = os.path.dirname(os.path.dirname(photos))  # two folders above the photos
    destination = tmp_path / "review.json"
    argv = ["--output", str(run_output), "--to", str(destination), "--below", "1.01", "--local-root", root]
    assert review_main(argv) == 0
    line = capsys.readouterr().out
    assert f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={root} " in line
    assert f"a Local Files storage for {os.path.dirname(photos)}" in line
    tasks = json.loads(destination.read_text())
    assert len(tasks) == 5
    for t in tasks:
        d = parse_qs(urlsplit(t["data"]["image"]).query)["d"][0]
        assert d.startswith(os.path.relpath(photos, root) + "/")
        assert local_path(t["data"]["image"], root) == t["data"]["uri"]

    # With the photos' folder as the root, only the one in a subfolder can be served: no storage may be the root.
    assert review_main([*argv[:-1], photos]) == 0
    line = capsys.readouterr().out
    assert "1 of 5 ok images" in line and f"(4 {review.AT_ROOT} left out)" in line
    [t] = json.loads(destination.read_text())
    assert t["data"]["image"] == "/data/local-files/?d=more/c.jpg"
    assert f"a Local Files storage for {photos}/more" in line


def test_the_labeling_config_holds_every_class_and_the_predictions_names(run_output, tmp_path):
    destination = tmp_path / "review.json"
    assert review_main(["--output", str(run_output), "--to", str(destination), "--below", "1.01"]) == 0
    view = ET.parse(tmp_path / "review.labeling.xml").getroot()
    [image] = view.findall("Image")
    [choices] = view.findall("Choices")
    assert [c.get("value") for c in choices.findall("Choice")] == list(CATEGORIES)
    assert len(set(CATEGORIES)) == 1000
    assert choices.get("layout") == "select" and choices.get("choice") == "single"
    assert image.get("value") == "$image" and choices.get("toName") == image.get("name")
    for t in json.loads(destination.read_text()):
        [result] = t["predictions"][0]["result"]
        assert (result["from_name"], result["to_name"]) == (choices.get("name"), image.get("name"))
        assert result["value"]["choices"][0] in CATEGORIES


def test_a_location_without_a_run_or_a_folder_that_is_not_there_stops_with_one_line(run_output, tmp_path, capsys):
    assert review_main(["--output", str(tmp_path / "missing"), "--to", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read the run's Parquet files") and err.count("\n") == 1
    assert review_main(["--output", str(run_output), "--to", str(tmp_path / "nowhere" / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {tmp_path / 'nowhere' / 'r.json'}") and err.count("\n") == 1


def test_an_output_on_s3_is_read_and_the_files_written_through_the_storage_settings(run_output, s3_server, capsys):
    fs, _ = Storage(StorageConfig(**s3_server)).filesystem("s3://review-bucket")
    fs.mkdir("review-bucket")
    fs.put(str(run_output), "review-bucket/labels", recursive=True)
    flags = []
    for key, value in s3_server.items():
        flags += ["--set", f"storage.{key}={json.dumps(value)}"]
    argv = ["--output", "s3://review-bucket/labels", "--to", "s3://review-bucket/review.json", "--below", "1.01"]
    assert review_main([*argv, *flags]) == 0
    assert "5 of 5 ok images" in capsys.readouterr().out
    ok, _ = job_rows(run_output)
    tasks = json.loads(fs.cat_file("review-bucket/review.json"))
    assert [t["data"]["uri"] for t in tasks] == [r["uri"] for r in ok]  # the rows' local paths, as written
    view = ET.fromstring(fs.cat_file("review-bucket/review.labeling.xml"))
    assert len(view.find("Choices").findall("Choice")) == 1000


def row(uri: str, score: float, status: str = "ok") -> dict:
    ok = status == "ok"
    return {
        "uri": uri,
        "status": status,
        "error": None if ok else "OSError: unreadable",
        "top_k_ids": [1, 0] if ok else None,
        "top_k_scores": [score, 1 - score] if ok else None,
        "top_k_labels": ["goldfish", "tench"] if ok else None,
        "model": "mnasnet0_5",
        "weights": "IMAGENET1K_V1",
    }


def test_object_and_web_urls_pass_through_and_shard_members_are_left_out():
    assert review.image_url("s3://bucket/photos/a b.jpg", None) == ("s3://bucket/photos/a b.jpg", "")
    assert review.image_url("gs://bucket/a.jpg", None) == ("gs://bucket/a.jpg", "")
    assert review.image_url("gcs://bucket/a.jpg", None) == ("gs://bucket/a.jpg", "")
    assert review.image_url("https://example.com/a.jpg?x=1", None) == ("https://example.com/a.jpg?x=1", "")
    # Label Studio's Azure storage resolves azure-blob://CONTAINER/PATH; the account is the storage's.
    assert review.image_url("az://photos/day/a.jpg", None) == ("azure-blob://photos/day/a.jpg", "")
    assert review.image_url("abfss://photos@acct.dfs.core.windows.net/a.jpg", None) == (
        "azure-blob://photos/a.jpg",
        "",
    )
    assert review.image_url("memory://photos/a.jpg", None) == (None, review.NO_URL)
    for uri in ("s3://b/shards/000.tar#0001.jpg", "/data/shards/000.TAR.GZ#k.png", "/data/images.parquet#17"):
        assert review.image_url(uri, "/data") == (None, review.IN_CONTAINER)
    assert review.image_url("/data/photos/a #1.jpg", "/data") == ("/data/local-files/?d=photos/a%20%231.jpg", "")
    assert review.image_url("/elsewhere/a.jpg", "/data") == (None, review.OUTSIDE_ROOT)
    assert review.image_url("/data/a.jpg", "/data") == (None, review.AT_ROOT)
    assert review.image_url("file:///data/x/caf%E9.jpg", "/data") == (None, review.NO_URL)  # not UTF-8
    assert review.image_url("file:///data/x/caf%C3%A9.jpg", "/data") == ("/data/local-files/?d=x/caf%C3%A9.jpg", "")


def test_tasks_from_rows_built_directly_count_what_they_leave_out():
    rows = [
        row("s3://bucket/b.jpg", 0.2),
        row("s3://bucket/a.jpg", 0.2),
        row("s3://bucket/shard.tar#x.jpg", 0.1),
        row("s3://bucket/bad.jpg", 0.0, "error"),
        row("s3://bucket/sure.jpg", 0.9),
    ]
    selected = review.uncertain_rows(pa.Table.from_pylist(rows), 0.5)
    assert [r["uri"] for r in selected] == ["s3://bucket/shard.tar#x.jpg", "s3://bucket/a.jpg", "s3://bucket/b.jpg"]
    result = review.build_tasks(selected)
    assert [t["data"]["image"] for t in result.tasks] == ["s3://bucket/a.jpg", "s3://bucket/b.jpg"]
    assert result.candidates == 3 and result.skipped == {review.IN_CONTAINER: 1} and result.local_root is None
    np.testing.assert_allclose([t["predictions"][0]["score"] for t in result.tasks], [0.2, 0.2])


def test_an_iceberg_tables_current_rows_become_tasks(tmp_path, capsys):
    support.require("pyiceberg", "iceberg")
    from mnasnet_batch.inputs.files import FilesLayout
    from mnasnet_batch.inputs.layout import InputPlan
    from mnasnet_batch.outputs.table import IcebergTable

    uris = [f"{tmp_path}/images/{i}.jpg" for i in range(4)]
    settings = {"uri": str(tmp_path / "labels"), "table": "labels.photos", "run_id": "r1"}
    config = load_config(overrides=[{"input": {"uri": f"{tmp_path}/images"}, "output": settings}])
    target = IcebergTable.for_config(config)
    plan = target.plan_run(config, "IMAGENET1K_V1", InputPlan(FilesLayout(config.input, Storage(config.storage)), uris))
    rows = [row(uris[0], 0.3), row(uris[1], 0.1), row(uris[2], 0.0, "error"), row(uris[3], 0.8)]
    output.write_part(pa.Table.from_pylist(rows, schema=output_schema()), plan.run_uri)
    target.finish_run(config, plan, 1.0)

    destination = tmp_path / "review.json"
    argv = ["--output", str(tmp_path / "labels"), "--table", "labels.photos", "--to", str(destination)]
    assert review_main(argv) == 0
    assert "2 of 2 ok images" in capsys.readouterr().out
    assert [t["data"]["uri"] for t in json.loads(destination.read_text())] == [uris[1], uris[0]]
    assert review_main([*argv[:2], "--table", "labels.other", "--to", str(destination)]) == 2
    assert capsys.readouterr().err.startswith("error: cannot read table labels.other")


def output_schema() -> pa.Schema:
    from mnasnet_batch.model.postprocess import OUTPUT_SCHEMA

    return OUTPUT_SCHEMA


# A Label Studio JSON export (Export > JSON) of three reviewed tasks and one not yet reviewed, written by hand in the
# format of its docs (guide/export.html, "Label Studio JSON format of annotated tasks").
EXPORT = [
    {
        "id": 1,
        "data": {"image": "/data/local-files/?d=a.jpg", "uri": "/photos/a.jpg", "top_k": "goldfish 0.300"},
        "annotations": [
            {
                "id": 11,
                "result": [
                    {
                        "id": "x1",
                        "from_name": "label",
                        "to_name": "image",
                        "type": "choices",
                        "value": {"choices": ["tench"]},
                        "origin": "manual",
                    }
                ],
                "was_cancelled": False,
                "ground_truth": False,
                "created_at": "2026-12-06T08:00:00.000000Z",
                "updated_at": "2026-12-06T08:00:00.000000Z",
                "lead_time": 4.2,
                "task": 1,
                "completed_by": 1,
            }
        ],
        "predictions": [],
    },
    {
        "id": 2,
        "data": {"image": "s3://bucket/b.jpg", "uri": "s3://bucket/b.jpg", "top_k": "goldfish 0.200"},
        "annotations": [
            {
                "id": 12,
                "result": [],
                "was_cancelled": True,
                "created_at": "2026-12-06T08:01:00.000000Z",
                "updated_at": "2026-12-06T08:01:00.000000Z",
                "task": 2,
                "completed_by": 1,
            }
        ],
    },
    {
        "id": 3,
        "data": {"image": "s3://bucket/c.jpg", "uri": "s3://bucket/c.jpg", "top_k": "goldfish 0.100"},
        "annotations": [
            {
                "id": 13,
                "result": [
                    {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": ["hen"]}}
                ],
                "was_cancelled": False,
                "created_at": "2026-12-06T08:02:00.000000Z",
                "updated_at": "2026-12-06T09:30:00.000000Z",
                "completed_by": {"id": 2, "email": "second@example.com"},
            },
            {
                "id": 14,
                "result": [
                    {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": ["cock"]}}
                ],
                "was_cancelled": False,
                "created_at": "2026-12-06T08:03:00.000000Z",
                "updated_at": "2026-12-06T08:03:00.000000Z",
                "completed_by": 1,
            },
        ],
    },
    {"id": 4, "data": {"image": "s3://bucket/d.jpg", "uri": "s3://bucket/d.jpg"}, "annotations": []},
]


def test_reviewed_labels_come_back_one_row_per_uri_and_join_the_jobs_rows(tmp_path, capsys):
    export = tmp_path / "project-1-at-2026-12-06.json"
    export.write_text(json.dumps(EXPORT))
    reviewed = tmp_path / "reviewed.parquet"
    assert review_main(["--import", str(export), "--to", str(reviewed)]) == 0
    assert f"reviewed labels {reviewed}: 3 reviewed tasks, 2 labeled, 1 skipped" in capsys.readouterr().out
    labels = pq.read_table(reviewed).to_pylist()
    assert labels == [
        {
            "uri": "/photos/a.jpg",
            "reviewed_label": "tench",
            "completed_by": "1",
            "updated_at": "2026-12-06T08:00:00.000000Z",
            "annotations": 1,
        },
        {
            "uri": "s3://bucket/b.jpg",
            "reviewed_label": None,
            "completed_by": "1",
            "updated_at": "2026-12-06T08:01:00.000000Z",
            "annotations": 1,
        },
        {
            "uri": "s3://bucket/c.jpg",
            "reviewed_label": "hen",  # the annotation updated last
            "completed_by": "second@example.com",
            "updated_at": "2026-12-06T09:30:00.000000Z",
            "annotations": 2,
        },
    ]
    # docs/review.md's join, with pandas: the job's rows with their reviewed label beside them.
    pd = support.require("pandas", "test")
    labels_folder = tmp_path / "labels"
    labels_folder.mkdir()
    job = pa.Table.from_pylist([row("/photos/a.jpg", 0.3), row("s3://bucket/d.jpg", 0.4)], schema=output_schema())
    pq.write_table(job, labels_folder / "part-0.parquet")
    rows = pd.read_parquet(labels_folder)
    reviewed_rows = pd.read_parquet(reviewed)
    joined = rows.merge(reviewed_rows[["uri", "reviewed_label"]], on="uri", how="left")
    joined["label"] = joined["reviewed_label"].fillna(joined["top_k_labels"].str[0])
    assert sorted(zip(joined["uri"], joined["label"], strict=True)) == [
        ("/photos/a.jpg", "tench"),
        ("s3://bucket/d.jpg", "goldfish"),
    ]


def test_an_export_that_is_not_label_studio_json_stops_with_one_line(tmp_path, capsys):
    minimal = tmp_path / "min.json"
    minimal.write_text(json.dumps([{"image": "s3://b/a.jpg", "uri": "s3://b/a.jpg", "label": "tench"}]))
    assert review_main(["--import", str(minimal), "--to", str(tmp_path / "r.parquet")]) == 2
    assert "export as JSON" in capsys.readouterr().err
    assert review_main(["--import", str(tmp_path / "none.json"), "--to", str(tmp_path / "r.parquet")]) == 2
    assert capsys.readouterr().err.startswith("error: cannot read the Label Studio export")
    with pytest.raises(SystemExit) as stopped:  # neither --output nor --import: argparse's usage error
        review_main(["--to", str(tmp_path / "r.json")])
    assert stopped.value.code == 2
