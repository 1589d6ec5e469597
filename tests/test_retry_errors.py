"""--mode retry-errors on a Parquet folder: error rows labeled again and replaced in their parts, every image exactly
once when the folder is read as one dataset, whatever write a crash stops at; then the job end to end."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.dataset as pads
import pytest

from mnasnet_batch.config import load_config
from mnasnet_batch.inputs.files import FilesLayout
from mnasnet_batch.inputs.layout import InputPlan
from mnasnet_batch.model.postprocess import output_table
from mnasnet_batch.outputs import files as files_module
from mnasnet_batch.outputs import folder
from mnasnet_batch.outputs.retry import RETRIED
from mnasnet_batch.storage import Storage, StorageError
from tests import support

URIS = [f"/images/{i}.jpg" for i in range(8)]
ERRORS = [URIS[1], URIS[4], URIS[7]]  # one in each part of the first run
PARTS = [URIS[:3], URIS[3:6], URIS[6:]]


def rows(uris, errors=(), label_id=7):
    """Rows as the write tasks make them: an error row for each of ``errors``, else ``label_id`` first."""
    messages = np.asarray(["FileNotFoundError: gone" if u in errors else "" for u in uris], object)
    usable = int(sum(not m for m in messages))
    ids = np.tile(np.arange(label_id, label_id + 5, dtype=np.int32), (usable, 1))
    scores = np.full((usable, 5), 0.2, np.float32)
    names = [str(i) for i in range(1000)]
    return output_table(np.asarray(uris, object), messages, ids, scores, names, "mnasnet0_5", "w")


def open_run(out, mode, run_id):
    config = load_config(
        overrides=[{"input": {"uri": "/images"}, "output": {"uri": str(out), "mode": mode, "run_id": run_id}}]
    )
    inputs = InputPlan(FilesLayout(config.input, Storage(config.storage)), URIS)
    plan = folder.ParquetFolder().plan_run(config, "w", inputs)
    return config, plan, sorted(inputs.remaining(plan.done).uris.to_pylist())


def read_once(out) -> dict[str, dict]:
    """The folder read as one dataset, as pyarrow reads it: each image's row, asserting that none has two."""
    table = pads.dataset(str(out), format="parquet").to_table().to_pylist()
    uris = [r["uri"] for r in table]
    assert len(uris) == len(set(uris)), "an image has two rows"
    assert set(uris) == set(URIS)
    return {r["uri"]: r for r in table}


def labeled_with_errors(out):
    config, plan, todo = open_run(out, "auto", "first")
    assert todo == sorted(URIS)
    for part in PARTS:
        folder.write_part(rows(part, ERRORS), plan.run_uri)
    folder.finish_run(config, plan, 1.0)
    assert sorted(u for u, r in read_once(out).items() if r["status"] == "error") == ERRORS


def crash_at(monkeypatch, writes: int, what: str):
    """The ``writes``-th whole-file write whose path ends with ``what`` fails, as a crash there would stop it."""
    real, seen = files_module.write_bytes, []

    def write_bytes(fs, path, data, guard=None):
        if path.endswith(what):
            seen.append(path)
            if len(seen) == writes:
                raise OSError(5, "Input/output error (the crash)")
        real(fs, path, data, guard)

    monkeypatch.setattr(files_module, "write_bytes", write_bytes)


@pytest.mark.parametrize(
    "writes, what",
    [(1, ".parquet"), (2, ".parquet"), (3, ".parquet"), (1, "_run.json"), (1, "_SUCCESS")],
    ids=["first part", "second part", "third part", "the record", "the marker"],
)
def test_error_rows_are_replaced_in_place_and_a_crash_at_any_write_leaves_every_image_once(
    tmp_path, monkeypatch, writes, what
):
    out = tmp_path / "labels"
    labeled_with_errors(out)
    parts = sorted(p.name for p in out.glob("run=first/part-*.parquet"))

    config, plan, todo = open_run(out, "retry-errors", "retry")
    assert todo == sorted(ERRORS) and plan.run_uri.endswith(f"run=retry/{RETRIED}")
    folder.write_part(rows(ERRORS[:2]), plan.run_uri)  # labeled, as the write tasks would
    folder.write_part(rows(ERRORS[2:]), plan.run_uri)
    assert sum(r["status"] == "error" for r in read_once(out).values()) == 3  # not in place yet: unseen

    crash_at(monkeypatch, writes, what)
    with pytest.raises(StorageError, match=r"Input/output error \(the crash\).*run retry stays resumable"):
        folder.finish_run(config, plan, 1.0)
    monkeypatch.undo()
    read_once(out)  # exactly once, whichever parts were replaced

    config, plan, todo = open_run(out, "retry-errors", "later")  # the same command
    assert plan.resumed and plan.run_id == "retry" and todo == [] and plan.rows_before == 3
    summary = folder.finish_run(config, plan, 1.0)
    assert (summary.images, summary.errors) == (3, 0)
    final = read_once(out)
    assert all(r["status"] == "ok" for r in final.values())
    assert [final[u]["top_k_ids"][0] for u in URIS] == [7] * 8
    assert sorted(p.name for p in out.glob("run=first/part-*.parquet")) == parts  # replaced under their names
    record = json.loads((out / "_run.json").read_text())
    replaced = sorted(record["retried"].pop("parts_replaced"))
    assert not list(out.glob(f"run=retry/{RETRIED}/*")) and (out / "_SUCCESS").read_text() == "retry"
    assert record["status"] == "succeeded" and record["mode"] == "retry-errors"
    assert record["retried"] == {"images": 3, "ok": 3, "error": 0}
    assert replaced == [f"run=first/{name}" for name in parts]


def test_a_retry_keeps_images_that_fail_again_as_one_error_row(tmp_path):
    out = tmp_path / "labels"
    labeled_with_errors(out)
    config, plan, todo = open_run(out, "retry-errors", "retry")
    folder.write_part(rows(ERRORS, errors=[URIS[4]]), plan.run_uri)
    folder.finish_run(config, plan, 1.0)
    again = read_once(out)
    assert [u for u, r in again.items() if r["status"] == "error"] == [URIS[4]]
    record = json.loads((out / "run=retry" / "_run.json").read_text())
    assert (record["retried"]["ok"], record["retried"]["error"]) == (2, 1)
    _, plan, todo = open_run(out, "retry-errors", "once-more")
    assert todo == [URIS[4]] and not plan.resumed
    plan.lease.release()


def test_retry_errors_refuses_labels_of_other_settings(tmp_path):
    out = tmp_path / "labels"
    labeled_with_errors(out)
    config = load_config(
        overrides=[{"input": {"uri": "/images"}, "output": {"uri": str(out), "mode": "retry-errors"}}]
    )
    with pytest.raises(StorageError, match=r"different configuration \(weights differ\)"):
        folder.ParquetFolder().plan_run(config, "other-weights", InputPlan(FilesLayout(config.input, Storage()), URIS))


def test_the_job_retries_a_folders_error_rows_and_resumes_a_crashed_retry(
    local_ray, corpus, tmp_path, checkpoint_path, fixture_model, monkeypatch, capsys
):
    from mnasnet_batch import job
    from mnasnet_batch.cli import main

    images = tmp_path / "images"
    images.mkdir()
    for path in corpus[:5]:
        shutil.copy(path, images / path.name)
    restored = [tmp_path / f"restored{i}.jpg" for i in range(3)]
    for i, target in enumerate(restored):
        (images / f"later{i}.jpg").symlink_to(target)  # listed, unreadable until its file is there
    output = tmp_path / "out"
    argv = support.job_argv(images, output, checkpoint_path, "output.rows_per_file=3", "compute.batch_size=4")
    assert main(argv) == 0
    first = read_all(output)
    assert sorted(u for u, r in first.items() if r["status"] == "error") == sorted(
        str(images / f"later{i}.jpg") for i in range(3)
    )
    for source, target in zip(corpus[5:8], restored, strict=True):
        shutil.copy(source, target)
    capsys.readouterr()

    # A crash once the errors are labeled again, before their rows are in place: exactly once, nothing replaced.
    real_run = job.run

    def crashing_run(*args, **kwargs):
        real_run(*args, **kwargs)
        raise RuntimeError("the driver's node went away")

    monkeypatch.setattr(job, "run", crashing_run)
    assert main([*argv, "--mode", "retry-errors", "--run-id", "retry"]) == 1
    assert "run retry failed, run the same command again to resume" in capsys.readouterr().err
    assert read_all(output) == first
    monkeypatch.undo()

    # The same command: nothing left to label, the rows put in place.
    assert main([*argv, "--mode", "retry-errors", "--run-id", "retry"]) == 0
    assert "labeled 3 images (0 errors, 3 from before the resume)" in capsys.readouterr().out
    final = read_all(output)
    assert set(final) == set(first) and all(r["status"] == "ok" for r in final.values())
    support.assert_reference_rows(
        {str(t): final[str(images / f"later{i}.jpg")] for i, t in enumerate(restored)}, restored, fixture_model
    )
    assert {u: r for u, r in final.items() if "later" not in u} == {u: r for u, r in first.items() if "later" not in u}
    record = json.loads((output / "_run.json").read_text())
    assert record["status"] == "succeeded" and record["retried"]["ok"] == 3 and record["retried"]["parts_replaced"]


def read_all(out) -> dict[str, dict]:
    """The folder read as one dataset (pyarrow's): each image's row, asserting that none has two."""
    table = pads.dataset(str(out), format="parquet").to_table().to_pylist()
    uris = [r["uri"] for r in table]
    assert len(uris) == len(set(uris)), "an image has two rows"
    return {r["uri"]: r for r in table}
