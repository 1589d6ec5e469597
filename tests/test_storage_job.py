"""End to end on a real S3 API (moto): loose files, WebDataset shards, Parquet and a manifest in, s3:// out.

Every layout must label the same images identically to a local run; GCS and Azure cannot run here
(see the mocked tests in test_sources.py).
"""

import contextlib
import io
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

from mnasnet_batch.cli import main
from mnasnet_batch.config import StorageConfig
from mnasnet_batch.model.postprocess import OUTPUT_SCHEMA
from mnasnet_batch.storage import Storage
from tests import support
from tests.support import make_shard

SHARDS = [[0, 1, 2], [3, 4, 5], [6, 7]]  # images per shard; the last shard is cut inside image 7


@pytest.fixture(scope="module")
def images(corpus):
    return corpus[:8]


@pytest.fixture(scope="module")
def buckets(s3_server, images):
    """Buckets `corpus` and `other` holding every layout of the same eight images, and an empty `labels`."""
    storage = StorageConfig(**s3_server)
    fs, _ = Storage(storage).filesystem("s3://corpus")
    for bucket in ("corpus", "other", "labels"):
        fs.mkdir(bucket)
    for path in images:
        fs.pipe(f"corpus/loose/{path.name}", path.read_bytes())
    for i, indices in enumerate(SHARDS):
        shard = make_shard([images[j] for j in indices], cut_inside_last=i == 2, no_image_sample=i == 0)
        fs.pipe(f"corpus/shards/{i:06d}.tar", shard)
    table = pa.table({"name": [p.name for p in images], "jpeg": [p.read_bytes() for p in images]})
    with fs.open("corpus/table/part-0.parquet", "wb") as f:
        pq.write_table(table, f, row_group_size=3)
    for path in images[4:]:
        fs.pipe(f"other/elsewhere/{path.name}", path.read_bytes())
    manifest = [f"s3://corpus/loose/{p.name}" for p in images[:4]] + [
        f"s3://other/elsewhere/{p.name}" for p in images[4:]
    ]
    manifest.insert(2, "s3://corpus/loose/missing.jpg")
    fs.pipe("corpus/manifest.txt", "\n".join(manifest).encode() + b"\n\n")
    return storage, fs


def label(input_uri, output_uri, checkpoint_path, s3_server, *overrides):
    args = ["--input", input_uri, "--output", output_uri, "--weights", str(checkpoint_path)]
    for key, value in s3_server.items():
        args += ["--set", f"storage.{key}={json.dumps(value)}"]
    for override in ("preprocess.batch_size=4", "compute.batch_size=8", *overrides):
        args += ["--set", override]
    return main(args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, local_ray, images, buckets, checkpoint_path, s3_server):
    """One local run over the shards (the reference) and one run per layout from S3 into S3.

    Returns:
        Exit statuses and output tables by run, the local shard folder, and everything the runs printed
        or logged (to check that no secret reaches it).
    """
    storage, fs = buckets
    local_shards = tmp_path_factory.mktemp("shards")
    for i, _ in enumerate(SHARDS):
        (local_shards / f"{i:06d}.tar").write_bytes(fs.cat(f"corpus/shards/{i:06d}.tar"))
    local_out = tmp_path_factory.mktemp("out") / "shards"
    inputs = {
        "loose": "s3://corpus/loose/",
        "shards": "s3://corpus/shards",
        "parquet": "s3://corpus/table",
        "manifest": "s3://corpus/manifest.txt",
    }
    extra = {"parquet": ["input.id_column=name", "input.image_column=jpeg"]}
    printed = io.StringIO()
    handler = logging.StreamHandler(printed)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            statuses = {"local-shards": label(str(local_shards), str(local_out), checkpoint_path, s3_server)}
            for name, uri in inputs.items():
                statuses[name] = label(uri, f"s3://labels/{name}", checkpoint_path, s3_server, *extra.get(name, []))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    tables = {"local-shards": pads.dataset(str(local_out), format="parquet").to_table()}
    for name in inputs:
        tables[name] = pads.dataset(f"labels/{name}", filesystem=fs, format="parquet").to_table()
    return statuses, tables, local_shards, printed.getvalue()


def by_name(table):
    """Rows keyed by image file name, whichever layout named them (path, shard#member, or id)."""
    return {row["uri"].rsplit("#", 1)[-1].rsplit("/", 1)[-1]: row for row in table.to_pylist()}


def test_every_layout_from_s3_labels_every_image_once(runs, images):
    statuses, tables, _, _ = runs
    assert statuses == dict.fromkeys(statuses, 0)
    for name, table in tables.items():
        assert table.schema == OUTPUT_SCHEMA, name
        assert len(set(table.column("uri").to_pylist())) == table.num_rows, name
    names = {p.name for p in images}
    assert set(by_name(tables["loose"])) == names
    assert set(tables["loose"].column("uri").to_pylist()) == {f"s3://corpus/loose/{n}" for n in names}
    assert set(tables["parquet"].column("uri").to_pylist()) == {f"s3://corpus/table/part-0.parquet#{n}" for n in names}
    manifest = tables["manifest"].to_pylist()
    assert len(manifest) == 9
    [missing] = [row for row in manifest if row["status"] == "error"]
    assert missing["uri"] == "s3://corpus/loose/missing.jpg" and missing["error"].startswith("FileNotFoundError")


def test_shards_label_the_readable_samples_and_report_the_rest(runs, images):
    _, tables, local_shards, _ = runs
    rows = {row["uri"]: row for row in tables["shards"].to_pylist()}
    ok = {uri for uri, row in rows.items() if row["status"] == "ok"}
    expected = {f"s3://corpus/shards/{i:06d}.tar#{images[j].name}" for i, s in enumerate(SHARDS) for j in s}
    assert ok == expected - {f"s3://corpus/shards/000002.tar#{images[7].name}"} and len(ok) == 7
    errors = {uri: row["error"] for uri, row in rows.items() if row["status"] == "error"}
    assert errors == {
        "s3://corpus/shards/000000.tar#no_image_99": (
            "ValueError: sample no_image_99 has no image member (members: no_image_99.json, no_image_99.cls)"
        ),
        f"s3://corpus/shards/000002.tar#{images[7].name}": (
            f"ReadError: shard cannot be read inside member {images[7].name}: unexpected end of data"
        ),
    }
    local = {
        row["uri"].replace(str(local_shards), "s3://corpus/shards"): row for row in tables["local-shards"].to_pylist()
    }
    assert set(local) == set(rows)
    for uri, row in rows.items():
        # Scores within the contract's 1e-4: the two runs batch the images differently, which moves float sums.
        same = {**local[uri], "uri": uri, "top_k_scores": row["top_k_scores"]}
        assert same == row, uri
        if row["top_k_scores"] is not None:
            np.testing.assert_allclose(row["top_k_scores"], local[uri]["top_k_scores"], atol=1e-4)


def test_predictions_match_the_local_run_and_the_reference(runs, images, fixture_model):
    _, tables, _, _ = runs
    ids, scores = support.reference_predictions(images, fixture_model, "mnasnet0_5", 5)
    local = by_name(tables["local-shards"])
    for name in ("loose", "parquet", "manifest", "shards"):
        rows = by_name(tables[name])
        for path, ref_ids, ref_scores in zip(images, ids, scores, strict=True):
            row = rows[path.name]
            if name == "shards" and path == images[7]:
                continue  # cut short in its shard
            assert row["status"] == "ok" and row["top_k_ids"] == ref_ids.tolist(), (name, path.name)
            np.testing.assert_allclose(row["top_k_scores"], ref_scores, atol=1e-4)
            if path.name in local and local[path.name]["status"] == "ok":
                assert row["top_k_ids"] == local[path.name]["top_k_ids"]
                np.testing.assert_allclose(row["top_k_scores"], local[path.name]["top_k_scores"], atol=1e-4)


def test_no_secret_in_logs_written_config_or_output(runs, buckets, s3_server):
    _, tables, _, printed = runs
    _, fs = buckets
    secret = s3_server["options"]["secret"]
    assert "labeled 8 images (0 errors)" in printed and "input format webdataset" in printed
    assert "labeled 9 images (2 errors: ReadError 1, ValueError 1)" in printed
    assert "labeled 9 images (1 errors: FileNotFoundError 1)" in printed
    assert secret not in printed
    [config_path] = fs.glob("labels/loose/run=*/_config.yaml")
    written = fs.cat(config_path).decode()
    assert secret not in written and yaml.safe_load(written)["storage"]["endpoint_url"] == s3_server["endpoint_url"]
    for table in tables.values():
        assert secret not in str(table.to_pylist())
