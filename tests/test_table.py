"""The Iceberg table output: one current row per image through every mode, resume, concurrent jobs, S3 warehouse.

The table is read back with pyiceberg's own catalog and scans, not through the job's code.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from fsspec.implementations.local import LocalFileSystem

from jobs.report import main as report_main
from jobs.runs import main as runs_main
from mnasnet_batch.cli import main
from mnasnet_batch.config import load_config
from mnasnet_batch.inputs.files import FilesLayout
from mnasnet_batch.inputs.layout import InputPlan
from mnasnet_batch.model.postprocess import output_table
from mnasnet_batch.outputs import folder as output
from mnasnet_batch.storage import Storage, StorageError
from tests import support
from tests.support import ROOT, SMALL_BATCHES, kill_session, many_images, poll

support.require("pyiceberg", "iceberg")

TABLE = "labels.photos"  # docs/table.md's


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
    local_ray, corpus, photos, tmp_path, checkpoint_path, fixture_model, capsys
):
    images = tmp_path / "images"
    images.mkdir()
    for path in corpus[:6]:
        shutil.copy(path, images / path.name)
    restored = tmp_path / "restored.jpg"
    (images / "missing.jpg").symlink_to(restored)  # listed, but its file is not there yet: an error row
    (images / "broken.jpg").symlink_to(tmp_path / "broken_target.jpg")  # missing now, not an image later
    output = tmp_path / "labels"

    # 1. The first run labels everything, in one commit that names the run, mode, model, weights and counts.
    assert label(images, output, checkpoint_path, "auto", "r1") == 0
    table = support.embedded_catalog(output).load_table(TABLE)
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
    assert (summary["mnasnet.run.images"], summary["mnasnet.run.errors"]) == ("8", "2")
    assert label(images, output, checkpoint_path, "auto", "again") == 2  # auto refuses a table that holds labels
    # docs/table.md's line of Python reads the table back, from the directory the command ran in.
    (line,) = re.findall(r'^python -c "(.*load_catalog.*)"$', (ROOT / "docs" / "table.md").read_text(), re.MULTILINE)
    printed = subprocess.run([sys.executable, "-c", line], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "[8 rows x 11 columns]" in printed.stdout

    # 2. incremental: only the new images.
    for path in corpus[6:8]:
        shutil.copy(path, images / path.name)
    assert label(images, output, checkpoint_path, "incremental", "r2") == 0
    second = read_rows(support.embedded_catalog(output).load_table(TABLE))
    assert {u for u, r in second.items() if r["run_id"] == "r2"} == {str(images / p.name) for p in corpus[6:8]}
    assert {u: second[u] for u in first} == first

    # 3. retry-errors after the missing file is restored: its row turns ok; one that still fails keeps one error
    # row, with the new message; nothing else changes.
    photos["coffee"].save(restored, quality=90)
    (tmp_path / "broken_target.jpg").write_bytes(b"<html>not an image</html>")
    assert label(images, output, checkpoint_path, "retry-errors", "r3") == 0
    third = read_rows(support.embedded_catalog(output).load_table(TABLE))
    fixed = third.pop(str(images / "missing.jpg"))
    assert fixed["status"] == "ok" and fixed["run_id"] == "r3" and fixed["error"] is None
    support.assert_reference_rows({str(restored): fixed}, [restored], fixture_model)
    still = third.pop(str(images / "broken.jpg"))
    assert still["status"] == "error" and still["run_id"] == "r3"
    assert still["error"].startswith("UnidentifiedImageError"), still["error"]
    retried = {str(images / "missing.jpg"), str(images / "broken.jpg")}
    assert third == {u: r for u, r in second.items() if u not in retried}
    third[fixed["uri"]], third[still["uri"]] = fixed, still

    # 4. changed after one image is rewritten: only it is labeled again.
    rewritten = images / corpus[1].name
    photos["rocket"].resize((320, 240)).save(rewritten, quality=85)
    assert label(images, output, checkpoint_path, "changed", "r4") == 0
    table = support.embedded_catalog(output).load_table(TABLE)
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
    table = support.embedded_catalog(output).load_table(TABLE)
    fifth = read_rows(table)
    assert set(fifth) == set(fourth) and {r["run_id"] for r in fifth.values()} == {"r5"}
    assert all(fifth[u]["weights"] != fourth[u]["weights"] for u in fifth)
    support.assert_reference_rows(fifth, sorted(images.glob("*_*.*")), other_model)
    assert read_rows(table, snapshot_id=before_relabel) == fourth
    # One snapshot per run (each run is one commit here), each the whole table: no partial table to travel to.
    assert snapshot_rows(table) == [8, 10, 10, 10, 10]
    assert run_summary(table, "r5")["mnasnet.mode"] == "relabel"

    # runs.py lists the table's runs from its snapshots; report.py reports on its current rows.
    capsys.readouterr()
    assert runs_main(["--output", str(output), "--table", TABLE, "--format", "json"]) == 0
    runs = {run["run_id"]: run for run in json.loads(capsys.readouterr().out)}
    assert list(runs) == ["r1", "r2", "r3", "r4", "r5"]
    assert [runs[r]["mode"] for r in runs] == ["auto", "incremental", "retry-errors", "changed", "relabel"]
    assert [(runs[r]["images"], runs[r]["errors"], runs[r]["current"]) for r in runs] == [
        (8, 2, 0),
        (2, 0, 0),
        (2, 1, 0),
        (1, 0, 0),
        (10, 1, 10),
    ]
    assert all(run["state"] == "complete" and run["commits"] == 1 for run in runs.values())
    assert runs["r4"]["snapshot_id"] == before_relabel
    assert runs_main(["--output", str(output), "--table", TABLE]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["run", "state", "mode"] and lines[-1].split()[:3] == ["r5", "complete", "relabel"]
    assert report_main(["--output", str(output), "--table", TABLE]) == 0
    out = capsys.readouterr().out
    assert "10 images, 1 errors" in out
    page = (output / "_report.html").read_text()
    assert f"table {TABLE}" in page and "run r5:" in page  # the staged runs' records give the throughput
    # The gallery of the current rows: each labeled image by label and among the least confident, read from the
    # input as it is now, unchanged since (the rows' source size and version); the error row's does not decode.
    assert "18 thumbnails, 1 placeholders (undecodable 1)" in out
    assert page.count('<img src="data:image/jpeg;base64,') == 18


def test_the_parquet_folder_refuses_the_modes_it_cannot_do_before_reading(tmp_path, capsys):
    output = tmp_path / "out"
    for mode in ("changed", "relabel"):  # retry-errors replaces a folder's error rows in their parts
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
    from mnasnet_batch.outputs.iceberg import SOURCE_SCHEMA, to_label

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


def test_a_killed_driver_then_the_same_command_labels_each_image_once_and_nothing_committed_again(
    local_ray, corpus, tmp_path, checkpoint_path, capsys, job_process
):
    images = many_images(tmp_path, corpus, 8)  # 192 images
    output_uri = tmp_path / "labels"
    argv = support.job_argv(
        images, output_uri, checkpoint_path, f"output.table={TABLE}", "output.commit_interval_s=1", *SMALL_BATCHES
    )
    # The part writer stalls once two parts are staged, so the run cannot end before it is killed, whatever the
    # machine's speed, while the driver's interval commits take those parts.
    hooks = support.replace_hook(tmp_path / "hooks", support.STALL_AFTER_TWO_PARTS)
    env = {"PYTHONPATH": os.pathsep.join([str(hooks), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    job = job_process.start([*argv, "--run-id", "nightly"], env=env)

    def committed() -> int:
        try:
            table = support.embedded_catalog(output_uri).load_table(TABLE)
        except Exception:  # the catalog or the table is not there yet
            return 0
        return len(read_rows(table)) if table.current_snapshot() else 0

    try:
        poll(committed, 300, "a first interval commit")
        assert job.poll() is None, "the run finished before it could be killed"
    finally:
        kill_session(job)
    committed_before = committed()
    staged_run = str(output_uri / "_staging" / "run=nightly")
    staged = output.Labeled(LocalFileSystem(), staged_run, staged_run).uris()
    held = committed_before + len(
        set(staged.to_pylist()) - set(read_rows(support.embedded_catalog(output_uri).load_table(TABLE)))
    )
    assert 0 < committed_before < 192

    assert main([*argv, "--run-id", "nightly"]) == 0
    table = support.embedded_catalog(output_uri).load_table(TABLE)
    rows = read_rows(table)
    assert set(rows) == {str(p) for p in images.iterdir()} and {r["run_id"] for r in rows.values()} == {"nightly"}
    assert all(r["status"] == "ok" for r in rows.values())
    # What was committed or staged before the kill was not labeled again.
    assert f"{held} from before the resume" in capsys.readouterr().out
    record = json.loads((output_uri / "_staging" / "run=nightly" / "_run.json").read_text())
    assert record["status"] == "succeeded" and record["counts"]["labeled_this_attempt"] == 192 - held
    assert not list((output_uri / "_staging").rglob("part-*.parquet")), "every staged part is committed"


def table_job(tmp_path, name: str, uris: list[str], catalog: dict, **output_settings):
    """A table target planned as the job plans it, for a job writing ``uris`` through its own staging output."""
    from mnasnet_batch.outputs.table import IcebergTable

    settings = {"uri": str(tmp_path / name), "table": TABLE, "catalog": catalog, "run_id": name, **output_settings}
    config = load_config(overrides=[{"input": {"uri": "/images"}, "output": settings}])
    target = IcebergTable.for_config(config)
    plan = target.plan_run(config, "weights-a", InputPlan(FilesLayout(config.input, Storage(config.storage)), uris))
    return config, target, plan


def stage(plan, uris: list[str], label_id: int, errors: list[str] | None = None) -> None:
    """Stages rows for ``uris`` as the write tasks do, every usable image labeled ``label_id`` first; ``errors``:
    each image's error message, "" for a usable one (default: all usable)."""
    errors = errors or [""] * len(uris)
    usable = sum(not e for e in errors)
    ids = np.tile(np.arange(label_id, label_id + 5, dtype=np.int32), (usable, 1))
    scores = np.full((usable, 5), 0.2, np.float32)
    table = output_table(
        np.asarray(uris, object),
        np.asarray(errors, object),
        ids,
        scores,
        [str(i) for i in range(1000)],
        "mnasnet0_5",
        "weights-a",
    )
    output.write_part(table, plan.run_uri)


def shared_catalog(tmp_path) -> dict:
    return {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": f"file://{tmp_path}/warehouse"}


def snapshot_rows(table) -> list[int]:
    """The rows each snapshot of the table holds, oldest first (``read_rows`` asserts one row per image)."""
    return [len(read_rows(table, snapshot.snapshot_id)) for snapshot in table.snapshots()]


def test_each_commit_is_one_snapshot_that_holds_the_whole_table(tmp_path):
    from pyiceberg.catalog import load_catalog

    # Time travel (a timestamp, or the snapshot before the current one) can land on any snapshot: none may hold
    # part of the table, as a delete snapshot before the commit's append would.
    catalog = shared_catalog(tmp_path)
    uris = [f"/images/{i}.jpg" for i in range(12)]
    runs = [
        ("a", "auto", uris[:6]),
        ("b", "relabel", uris[3:9]),  # replaces half of a's rows: a's file is rewritten without them
        ("c", "incremental", uris[9:]),  # only adds
        ("d", "retry-errors", uris[:2]),  # two rows of one file
        ("e", "relabel", uris),  # every file dropped whole
        ("f", "overwrite", uris[:4]),  # the rows of the images no longer listed go too
    ]
    for i, (name, mode, listed) in enumerate(runs):
        config, job, plan = table_job(tmp_path, name, listed, catalog, mode=mode)
        stage(plan, listed, i, errors=["OSError: unreadable" if name == "a" and u in uris[:2] else "" for u in listed])
        job.finish_run(config, plan, 1.0)
    table = load_catalog("default", **catalog).load_table(TABLE)
    assert snapshot_rows(table) == [6, 9, 12, 12, 12, 4]
    assert [s.summary.operation.value for s in table.snapshots()] == [
        "append",
        "overwrite",
        "append",
        "overwrite",
        "overwrite",
        "overwrite",
    ]
    assert {u: r["run_id"] for u, r in read_rows(table).items()} == dict.fromkeys(uris[:4], "f")
    before_overwrite = read_rows(table, table.snapshots()[-2].snapshot_id)
    assert {u: r["run_id"] for u, r in before_overwrite.items()} == dict.fromkeys(uris, "e")


def test_a_run_counts_what_it_committed_and_apart_what_other_jobs_replaced(tmp_path):
    from pyiceberg.catalog import load_catalog

    catalog = shared_catalog(tmp_path)
    uris = [f"/images/{i}.jpg" for i in range(8)]
    config, job, plan = table_job(tmp_path, "a", uris, catalog)
    stage(plan, uris[:4], 1, errors=["OSError: unreadable", "", "", ""])
    job.commit(final=False)  # an interval commit
    # Another job, with its own staging output, replaces three of them before this run's next commit.
    other_config, other, other_plan = table_job(tmp_path, "b", uris[:3], catalog, mode="relabel")
    stage(other_plan, uris[:3], 100)
    other.finish_run(other_config, other_plan, 1.0)
    stage(plan, uris[4:], 1)
    summary = job.finish_run(config, plan, 2.0)

    assert (summary.images, summary.errors, summary.error_kinds) == (8, 1, {"OSError": 1})
    assert (summary.labeled_now, summary.replaced_by_other_jobs) == (8, 3)
    assert summary.line().startswith("labeled 8 images (1 errors: OSError 1, 3 replaced by other jobs so far) in 2.0 s")
    record = json.loads((tmp_path / "a" / "_staging" / "run=a" / "_run.json").read_text())
    assert record["counts"]["images"] == 8 and record["counts"]["labeled_this_attempt"] == 8
    assert record["counts"]["replaced_by_other_jobs"] == 3 and record["images_per_s"] == 4.0
    table = load_catalog("default", **catalog).load_table(TABLE)
    assert run_summary(table, "a")["mnasnet.run.images"] == "8" and run_summary(table, "a")["mnasnet.run.errors"] == "1"
    assert {u: r["run_id"] for u, r in read_rows(table).items()} == dict.fromkeys(uris[:3], "b") | dict.fromkeys(
        uris[3:], "a"
    )


def test_a_resumed_run_does_not_label_again_what_it_committed_and_another_job_replaced(tmp_path):
    catalog = shared_catalog(tmp_path)
    uris = [f"/images/{i}.jpg" for i in range(6)]
    config, job, plan = table_job(tmp_path, "a", uris, catalog, mode="relabel")
    stage(plan, uris[:4], 1)
    job.commit(final=False)
    plan.lease.release()  # the driver is killed here
    other_config, other, other_plan = table_job(tmp_path, "b", uris[:1], catalog, mode="relabel")
    stage(other_plan, uris[:1], 100)
    other.finish_run(other_config, other_plan, 1.0)

    config, job, plan = table_job(tmp_path, "a", uris, catalog, mode="relabel")  # the same command
    assert plan.resumed and plan.rows_before == 4
    remaining = InputPlan(FilesLayout(config.input, Storage(config.storage)), uris).remaining(plan.done)
    assert sorted(remaining.uris.to_pylist()) == uris[4:]
    stage(plan, uris[4:], 1)
    summary = job.finish_run(config, plan, 1.0)
    assert (summary.images, summary.labeled_now, summary.replaced_by_other_jobs) == (6, 2, 1)


def test_a_commit_that_conflicts_is_rebuilt_on_the_refreshed_table(tmp_path):
    from pyiceberg.catalog import load_catalog

    catalog = shared_catalog(tmp_path)
    uris_a = [f"/images/{i}.jpg" for i in range(0, 6)]
    uris_b = [f"/images/{i}.jpg" for i in range(4, 10)]  # 4 and 5 in both
    config_a, job_a, plan_a = table_job(tmp_path, "a", uris_a, catalog)
    config_b, job_b, plan_b = table_job(tmp_path, "b", uris_b, catalog)
    stage(plan_a, uris_a, 1)
    stage(plan_b, uris_b, 100)
    # B read the table before A committed, as a job committing at the same moment does: its first commit conflicts.
    stale, fresh, loads = job_b.catalog.load_table(TABLE), job_b.catalog.load_table, []

    def load_stale_once(name):
        loads.append(name)
        return stale if len(loads) == 1 else fresh(name)

    job_b.catalog.load_table = load_stale_once
    job_a.finish_run(config_a, plan_a, 1.0)
    job_b.finish_run(config_b, plan_b, 1.0)
    # B's first attempt, on the table as it was before A's commit, did not land: A's rows are all there.
    table = load_catalog("default", **catalog).load_table(TABLE)
    rows = read_rows(table)
    assert set(rows) == set(uris_a) | set(uris_b)
    assert {u: r["run_id"] for u, r in rows.items()} == {u: "a" for u in uris_a} | {u: "b" for u in uris_b}
    assert all(rows[u]["top_k_ids"][0] == 100 for u in uris_b)


def test_a_run_whose_commits_keep_conflicting_fails_clearly_and_the_same_command_commits_it(tmp_path, monkeypatch):
    from mnasnet_batch.outputs import table as table_module

    monkeypatch.setattr(table_module, "COMMIT_BACKOFF_S", 0.0)
    catalog = shared_catalog(tmp_path)
    uris = [f"/images/{i}.jpg" for i in range(4)]
    config, job, plan = table_job(tmp_path, "a", uris, catalog)
    stage(plan, uris, 1)
    other_config, other, other_plan = table_job(tmp_path, "other", uris[:1], catalog)
    stage(other_plan, uris[:1], 7)
    stale = job.catalog.load_table(TABLE)
    other.finish_run(other_config, other_plan, 1.0)  # another job commits after this one read the table
    job.catalog.load_table = lambda name: stale  # and again before each of this job's attempts
    commits = []
    commit_table = job.catalog.commit_table
    job.catalog.commit_table = lambda *args, **kwargs: commits.append(1) or commit_table(*args, **kwargs)
    tried = f"the commit was tried {table_module.COMMIT_ATTEMPTS} times, each conflicting with other jobs"
    with pytest.raises(StorageError, match=f"{tried}.*run the same command again"):
        job.finish_run(config, plan, 1.0)
    # Tried that many times in all: pyiceberg's own retries (commit.retry.num-retries) do not run inside each.
    assert len(commits) == table_module.COMMIT_ATTEMPTS
    assert list((tmp_path / "a" / "_staging" / "run=a").glob("part-*.parquet")), "the staged rows are kept"

    config, job, plan = table_job(tmp_path, "a", uris, catalog)  # the same command
    assert plan.resumed and plan.rows_before == 4 and len(plan.done) >= 4
    job.finish_run(config, plan, 1.0)
    rows = read_rows(job.catalog.load_table(TABLE))
    assert {u: r["run_id"] for u, r in rows.items()} == {u: "a" for u in uris}


def test_two_jobs_committing_into_one_table_at_once_lose_and_duplicate_nothing(tmp_path):
    import threading

    catalog = shared_catalog(tmp_path)
    batches = 6
    jobs = {}
    for name, offset in (("a", 0), ("b", 30)):  # overlapping: images 30-59 are in both
        uris = [f"/images/{i}.jpg" for i in range(offset, offset + 60)]
        jobs[name] = (uris, *table_job(tmp_path, name, uris, catalog))
    errors = []

    def commit_in_batches(name):
        uris, config, job, plan = jobs[name]
        try:
            for i in range(batches):
                stage(plan, uris[i::batches], 1 if name == "a" else 100)
                job.commit(final=False)
            job.finish_run(config, plan, 1.0)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=commit_in_batches, args=(name,)) for name in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a committer still runs after 300 s"
    assert not errors
    rows = read_rows(jobs["a"][2].catalog.load_table(TABLE))
    assert set(rows) == {f"/images/{i}.jpg" for i in range(90)}
    assert all(r["run_id"] == "a" for u, r in rows.items() if int(u.split("/")[-1][:-4]) < 30)
    assert all(r["run_id"] == "b" for u, r in rows.items() if int(u.split("/")[-1][:-4]) >= 60)


def test_a_table_whose_warehouse_is_on_s3_through_the_storage_settings(
    local_ray, corpus, photos, tmp_path, checkpoint_path, fixture_model, s3_server
):
    from pyiceberg.catalog import load_catalog

    from mnasnet_batch.config import StorageConfig
    from mnasnet_batch.storage import Storage

    fs, _ = Storage(StorageConfig(**s3_server)).filesystem("s3://tables")
    fs.mkdir("tables")
    for path in corpus[:4]:
        fs.pipe(f"tables/images/{path.name}", path.read_bytes())
    # The catalog is a SQL one on local disk (a SQLite file cannot live on S3); the warehouse, the staged parts
    # and the images are on S3, reached through storage.* alone.
    catalog = {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": "s3://tables/warehouse"}
    settings = [f"storage.{key}={json.dumps(value)}" for key, value in s3_server.items()]
    settings += [f"output.table={TABLE}", f"output.catalog={json.dumps(catalog)}"]
    argv = ["--input", "s3://tables/images", "--output", "s3://tables/staging", "--weights", str(checkpoint_path)]
    for setting in settings:
        argv += ["--set", setting]
    assert main([*argv, "--run-id", "first"]) == 0
    fs.pipe(f"tables/images/{corpus[2].name}", b"not an image any more")
    assert main([*argv, "--run-id", "second", "--mode", "changed"]) == 0

    options = s3_server["options"]
    io = {"s3.endpoint": s3_server["endpoint_url"], "s3.access-key-id": options["key"]}
    io["s3.secret-access-key"] = options["secret"]
    table = load_catalog("default", **catalog, **io).load_table(TABLE)
    assert table.metadata.location.startswith("s3://tables/warehouse/")
    rows = read_rows(table)
    uris = {f"s3://tables/images/{p.name}" for p in corpus[:4]}
    assert set(rows) == uris
    changed = f"s3://tables/images/{corpus[2].name}"
    assert {u: r["run_id"] for u, r in rows.items()} == dict.fromkeys(uris, "first") | {changed: "second"}
    assert rows[changed]["status"] == "error"
    assert all(r["source_version"] for r in rows.values())  # the objects' ETags
    support.assert_reference_rows(
        {str(p): rows[f"s3://tables/images/{p.name}"] for p in corpus[:4] if p != corpus[2]},
        [p for p in corpus[:4] if p != corpus[2]],
        fixture_model,
    )
    assert not [p for p in fs.find("tables/staging/_staging") if "/part-" in p], "every staged part is committed"


def test_overwrite_leaves_exactly_its_rows_and_an_unfinished_run_must_be_finished_first(tmp_path):
    catalog = shared_catalog(tmp_path)
    first = [f"/images/{i}.jpg" for i in range(6)]
    config, job, plan = table_job(tmp_path, "a", first, catalog)
    stage(plan, first, 1)
    job.finish_run(config, plan, 1.0)

    kept = [f"/images/{i}.jpg" for i in range(3, 8)]
    config, job, plan = table_job(tmp_path, "o", kept, catalog, mode="overwrite", commit_interval_s=0)
    stage(plan, kept[:2], 5)
    job.commit(final=False)  # as an interval commit would: the rows of other runs stay until the final commit
    rows = read_rows(job.catalog.load_table(TABLE))
    assert {u: r["run_id"] for u, r in rows.items()} == dict.fromkeys(first, "a") | dict.fromkeys(kept[:2], "o")
    plan.lease.release()  # the driver is killed here

    with pytest.raises(StorageError, match="holds the unfinished run o .*run its command again"):
        table_job(tmp_path, "o", kept, catalog, mode="incremental", run_id="later")
    config, job, plan = table_job(tmp_path, "o", kept, catalog, mode="overwrite")  # the same command
    assert plan.resumed and plan.rows_before == 2
    remaining = InputPlan(FilesLayout(config.input, Storage(config.storage)), kept).remaining(plan.done)
    assert sorted(remaining.uris.to_pylist()) == kept[2:]
    stage(plan, kept[2:], 5)
    job.finish_run(config, plan, 1.0)
    rows = read_rows(job.catalog.load_table(TABLE))
    assert {u: r["run_id"] for u, r in rows.items()} == dict.fromkeys(kept, "o")


def test_a_commit_from_before_fast_decode_existed_counts_as_exact():
    from types import SimpleNamespace

    from mnasnet_batch.outputs.iceberg import PROPERTY, label_settings, latest_labels

    exact = label_settings(load_config(), "w1")
    older = {PROPERTY + k: v for k, v in exact.items() if k != "fast_decode"} | {PROPERTY + "run_id": "r1"}
    table = SimpleNamespace(snapshots=lambda: [SimpleNamespace(summary=SimpleNamespace(additional_properties=older))])
    assert latest_labels(table) == exact  # an older exact table takes exact runs on
    fast = label_settings(load_config(overrides=[{"preprocess": {"fast_decode": True}}]), "w1")
    assert fast["fast_decode"] == "true" and latest_labels(table) != fast
