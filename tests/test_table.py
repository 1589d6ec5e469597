"""The Iceberg table output: one current row per image through every mode, resume, concurrent jobs, S3 warehouse.

The table is read back with pyiceberg's own catalog and scans, not through the job's code.
"""

import os
import shutil
import sys

import numpy as np
import pyarrow as pa
import pytest

from mnasnet_batch.cli import main
from tests import support

pytest.importorskip("pyiceberg")

TABLE = "labels.images"


def embedded_catalog(output):
    """The embedded catalog the job made under ``output``, opened as any reader would."""
    from pyiceberg.catalog import load_catalog

    return load_catalog("default", type="sql", uri=f"sqlite:///{output}/_catalog.db")


def read_rows(table, snapshot_id=None) -> dict[str, dict]:
    """The table's rows (at ``snapshot_id``, else now) by uri, asserting that no uri has two."""
    rows = table.scan(snapshot_id=snapshot_id).to_arrow().to_pylist()
    uris = [r["uri"] for r in rows]
    assert len(uris) == len(set(uris)), "an image has two rows"
    return {r["uri"]: r for r in rows}


def run_summary(table, run_id: str) -> dict[str, str]:
    """The summary of the latest snapshot the run committed."""
    found = [s for s in table.snapshots() if s.summary.additional_properties.get("mnasnet.run_id") == run_id]
    assert found, f"run {run_id} committed nothing"
    return found[-1].summary.additional_properties


def label(images, output, weights, mode, run_id, *settings):
    argv = support.job_argv(images, output, weights, f"output.table={TABLE}", *settings)
    return main([*argv, "--mode", mode, "--run-id", run_id])


def test_a_table_through_every_mode_keeps_one_current_row_per_image(
    local_ray, corpus, photos, tmp_path, checkpoint_path, fixture_model
):
    images = tmp_path / "images"
    images.mkdir()
    for path in corpus[:6]:
        shutil.copy(path, images / path.name)
    restored = tmp_path / "restored.jpg"
    (images / "missing.jpg").symlink_to(restored)  # listed, but its file is not there yet: an error row
    output = tmp_path / "labels"

    # 1. The first run labels everything, in one commit that names the run, mode, model, weights and counts.
    assert label(images, output, checkpoint_path, "auto", "r1") == 0
    table = embedded_catalog(output).load_table(TABLE)
    first = read_rows(table)
    assert set(first) == {str(p) for p in images.iterdir()}
    support.assert_reference_rows(first, sorted(images.glob("*_*.*")), fixture_model)
    assert first[str(images / "missing.jpg")]["status"] == "error"
    assert first[str(images / "missing.jpg")]["error"].startswith("FileNotFoundError")
    assert {r["run_id"] for r in first.values()} == {"r1"}
    assert all(r["source_size"] == os.stat(r["uri"]).st_size for r in first.values() if r["status"] == "ok")
    summary = run_summary(table, "r1")
    assert summary["mnasnet.mode"] == "auto" and summary["mnasnet.model"] == "mnasnet0_5"
    assert summary["mnasnet.weights"] == first[str(images / corpus[0].name)]["weights"]
    assert (summary["mnasnet.run.images"], summary["mnasnet.run.errors"]) == ("7", "1")
    assert label(images, output, checkpoint_path, "auto", "again") == 2  # auto refuses a table that holds labels

    # 2. incremental: only the new images.
    for path in corpus[6:8]:
        shutil.copy(path, images / path.name)
    assert label(images, output, checkpoint_path, "incremental", "r2") == 0
    second = read_rows(embedded_catalog(output).load_table(TABLE))
    assert {u for u, r in second.items() if r["run_id"] == "r2"} == {str(images / p.name) for p in corpus[6:8]}
    assert {u: second[u] for u in first} == first

    # 3. retry-errors after the missing file is restored: its row turns ok, nothing else changes.
    photos["coffee"].save(restored, quality=90)
    assert label(images, output, checkpoint_path, "retry-errors", "r3") == 0
    third = read_rows(embedded_catalog(output).load_table(TABLE))
    fixed = third.pop(str(images / "missing.jpg"))
    assert fixed["status"] == "ok" and fixed["run_id"] == "r3" and fixed["error"] is None
    support.assert_reference_rows({str(restored): fixed}, [restored], fixture_model)
    assert third == {u: r for u, r in second.items() if u != str(images / "missing.jpg")}
    third[fixed["uri"]] = fixed

    # 4. changed after one image is rewritten: only it is labeled again.
    rewritten = images / corpus[1].name
    photos["rocket"].resize((320, 240)).save(rewritten, quality=85)
    assert label(images, output, checkpoint_path, "changed", "r4") == 0
    table = embedded_catalog(output).load_table(TABLE)
    fourth = read_rows(table)
    assert {u for u, r in fourth.items() if r["run_id"] == "r4"} == {str(rewritten)}
    support.assert_reference_rows(fourth, [rewritten], fixture_model)
    assert {u: r for u, r in fourth.items() if u != str(rewritten)} == {
        u: r for u, r in third.items() if u != str(rewritten)
    }
    before_relabel = table.current_snapshot().snapshot_id

    # 5. relabel with other weights: every row changes; the snapshot before still reads the old labels.
    other_model = support.make_model("mnasnet0_5", seed=1)
    other_weights = tmp_path / "other.pth"
    other_weights.write_bytes(support.checkpoint_bytes(other_model))
    assert label(images, output, other_weights, "incremental", "wrong") == 2  # other weights: relabel, not mix
    assert label(images, output, other_weights, "relabel", "r5") == 0
    table = embedded_catalog(output).load_table(TABLE)
    fifth = read_rows(table)
    assert set(fifth) == set(fourth) and {r["run_id"] for r in fifth.values()} == {"r5"}
    assert all(fifth[u]["weights"] != fourth[u]["weights"] for u in fifth)
    support.assert_reference_rows(fifth, sorted(images.glob("*_*.*")), other_model)
    assert read_rows(table, snapshot_id=before_relabel) == fourth
    assert run_summary(table, "r5")["mnasnet.mode"] == "relabel"


def test_the_parquet_folder_refuses_the_modes_it_cannot_do_before_reading(tmp_path, capsys):
    output = tmp_path / "out"
    for mode in ("retry-errors", "changed", "relabel"):
        argv = ["--input", str(tmp_path / "nowhere"), "--output", str(output), "--mode", mode]
        assert main(argv) == 2
        assert "needs the table output" in capsys.readouterr().err
    assert not output.exists()


def test_a_table_without_pyiceberg_or_on_an_object_store_without_catalog_stops_early(tmp_path, capsys, monkeypatch):
    argv = ["--input", str(tmp_path / "nowhere"), "--set", f"output.table={TABLE}"]
    assert main([*argv, "--output", "s3://bucket/labels"]) == 2
    assert "set output.catalog" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "pyiceberg", None)  # import pyiceberg now raises ImportError
    assert main([*argv, "--output", str(tmp_path / "out")]) == 2
    assert "pip install 'mnasnet-batch[iceberg]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_which_images_each_mode_labels():
    from mnasnet_batch.table import SOURCE_SCHEMA, to_label

    rows = pa.table(
        {
            "uri": ["a", "b", "c", "d"],
            "status": ["ok", "error", "ok", "ok"],
            "source_size": pa.array([1, 2, 3, None], pa.int64()),
            "source_version": ["t1", "t2", "t3", None],
        }
    )
    listed = ["a", "b", "c", "d", "e"]
    sources = pa.table(
        [listed, pa.array([1, 2, 30, None, 5], pa.int64()), ["t1", "t2", "t3", None, "t5"]], schema=SOURCE_SCHEMA
    )
    assert to_label("incremental", listed, rows, sources).to_pylist() == ["e"]
    assert to_label("retry-errors", listed, rows, sources).to_pylist() == ["b"]
    # c's size changed; d could not be examined, then or now; e is new.
    assert sorted(to_label("changed", listed, rows, sources).to_pylist()) == ["c", "d", "e"]
    assert to_label("relabel", listed, rows, sources).to_pylist() == listed
    assert np.array_equal(to_label("overwrite", listed, rows, sources).to_pylist(), listed)
