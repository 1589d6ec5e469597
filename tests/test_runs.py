"""jobs/runs.py: the runs under an output root, from records written the way the labeling job writes them."""

import json

import pyarrow as pa
import pytest
import yaml

from jobs.runs import main as runs_main
from mnasnet_batch.config import StorageConfig, load_config
from mnasnet_batch.outputs import folder as output
from mnasnet_batch.outputs import run as run_module
from mnasnet_batch.storage import Storage


def rows(uris, errors=()):
    return pa.table(
        {
            "uri": pa.array(uris, pa.string()),
            "error": pa.array([f"{e}: bad" if e else None for e in errors] or [None] * len(uris), pa.string()),
        }
    )


def start(out, mode, run_id):
    config = load_config(
        overrides=[{"input": {"uri": "/images"}, "output": {"uri": out, "mode": mode, "run_id": run_id}}]
    )
    return config, output.plan_run(config, "IMAGENET1K_V1")


@pytest.fixture
def three_runs(tmp_path):
    """A finished run, a finished incremental run, and an incremental run still going (the latest)."""
    out = str(tmp_path / "labels")
    config, plan = start(out, "auto", "night-1")
    output.write_part(rows(["/images/a.jpg", "/images/b.jpg", "/images/c.jpg"], ["", "OSError", ""]), plan.run_uri)
    output.finish_run(config, plan, seconds=2.0, labeled_now=3)
    config, plan = start(out, "incremental", "night-2")
    output.write_part(rows(["/images/d.jpg"]), plan.run_uri)
    output.finish_run(config, plan, seconds=0.5, labeled_now=1)
    _, plan = start(out, "incremental", "night-3")
    yield out
    plan.lease.release()


def test_table_lists_every_run_with_status_counts_and_rate(three_runs, capsys):
    assert runs_main(["--output", three_runs]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "status", "mode", "started", "(UTC)", "ended", "(UTC)"] + [
        "images",
        "ok",
        "errors",
        "images/s",
        "seconds",
    ]
    first, second, third = (line.split() for line in lines[1:])
    assert first[:3] == ["night-1", "succeeded", "auto"] and first[-5:] == ["3", "2", "1", "1.5", "2.0"]
    assert second[:3] == ["night-2", "succeeded", "incremental"] and second[-5:] == ["1", "1", "0", "2.0", "0.5"]
    # The latest run is marked, and has no counts until it ends.
    assert third[:4] == ["night-3", "*", "running", "incremental"] and third[-5:] == ["-"] * 5
    assert len(lines) == 4


def test_json_has_the_records_and_marks_the_latest_complete_run(three_runs, tmp_path, capsys):
    config, plan = start(str(tmp_path / "other"), "auto", "only")
    output.finish_run(config, plan, seconds=1.0, labeled_now=0)
    assert runs_main(["--output", str(tmp_path / "other"), "--format", "json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert record["run_id"] == "only" and record["latest"] and record["complete"]
    assert record["counts"]["images"] == 0 and record["versions"]["mnasnet_batch"]


def test_no_runs_is_an_error(tmp_path, capsys):
    assert runs_main(["--output", str(tmp_path)]) == 2
    assert "no runs under" in capsys.readouterr().err


def test_the_run_id_defaults_to_the_ray_job_submission_id(monkeypatch):
    # What Ray's job supervisor sets for the driver of `ray job submit --submission-id raysubmit_X`.
    job_config = {"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_X", "job_name": "raysubmit_X"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job_config))
    assert run_module.submission_id() == "raysubmit_X"
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert run_module.submission_id() == ""


def storage_flags(s3_server) -> list[str]:
    flags = []
    for key, value in s3_server.items():
        flags += ["--set", f"storage.{key}={json.dumps(value)}"]
    return flags


def test_runs_on_s3_are_read_with_the_storage_settings(s3_server, tmp_path, capsys):
    fs, _ = Storage(StorageConfig(**s3_server)).filesystem("s3://runs-bucket")
    fs.mkdir("runs-bucket")
    out = "s3://runs-bucket/labels"
    config = load_config(
        overrides=[{"input": {"uri": "/images"}, "output": {"uri": out, "run_id": "night-1"}, "storage": s3_server}]
    )
    plan = output.plan_run(config, "IMAGENET1K_V1")
    output.write_part(rows(["/images/a.jpg", "/images/b.jpg"]), plan.run_uri, plan.storage)
    output.finish_run(config, plan, seconds=1.0, labeled_now=2)

    assert runs_main(["--output", out, *storage_flags(s3_server), "--format", "json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert record["run_id"] == "night-1" and record["counts"]["images"] == 2 and record["complete"]
    # The job's own profile works too: its storage section is used, the rest ignored.
    profile = tmp_path / "s3.yaml"
    profile.write_text(yaml.safe_dump({"storage": s3_server, "model": {"top_k": 3}}))
    assert runs_main(["--output", out, "--config", str(profile)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:3] == ["night-1", "*", "succeeded"]


def test_runs_accept_only_storage_settings(tmp_path, capsys):
    assert runs_main(["--output", str(tmp_path), "--set", "model.top_k=3"]) == 2
    assert "only storage.* settings" in capsys.readouterr().err
    assert runs_main(["--output", str(tmp_path), "--set", "storage.nope=1"]) == 2
    assert "unknown key storage.nope" in capsys.readouterr().err
