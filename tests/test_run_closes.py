"""Every failure after a run opens closes it: Ray's start, the model's costs, a stop; the record says so, the lease
is released, and the line says to run the same command again. No Ray runs here: its start is what fails."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest

from mnasnet_batch import cli
from mnasnet_batch.outputs import folder
from mnasnet_batch.outputs.lease import LEASE_FILE
from tests import support

RAY_TIMEOUT = "The current node timed out during startup. This could happen because some of the Ray processes failed"
# Bound on waiting for the run to open beside the failing start (the command's prepare thread, on a loaded machine).
OPEN_WAIT_S = 120


def wait_until_open(output):
    """Waits (bounded) until the command's run is open: the lease names its run."""
    deadline = time.monotonic() + OPEN_WAIT_S
    lease = output / LEASE_FILE
    while True:
        try:
            if json.loads(lease.read_text()).get("run_id"):
                return
        except (FileNotFoundError, ValueError):
            pass
        assert time.monotonic() < deadline, "the run did not open"
        time.sleep(0.05)


@pytest.fixture
def command(tmp_path, corpus, checkpoint_path, monkeypatch):
    """A labeling command on 3 images; Ray counted as not started, so that the command starts its own."""
    images = tmp_path / "images"
    images.mkdir()
    for path in corpus[:3]:
        shutil.copy(path, images / path.name)
    output = tmp_path / "out"
    monkeypatch.setattr(cli, "ray_initialized", lambda: False)
    return support.job_argv(images, output, checkpoint_path), output


def record_of(output) -> dict:
    record = json.loads((output / "_run.json").read_text())
    assert json.loads((output / f"run={record['run_id']}" / "_run.json").read_text()) == record
    return record


def assert_resumes(argv, record):
    """The same command would resume the run: it is the one the output holds unfinished."""
    config = cli.config_from_args(cli.build_parser().parse_args(argv))
    plan = folder.plan_run(config, record["fingerprint"]["weights"])
    plan.lease.release()
    assert plan.resumed and plan.run_id == record["run_id"]


def test_ray_failing_to_start_after_the_run_opened_closes_it_as_failed(command, monkeypatch, capsys):
    argv, output = command

    def start_ray(config):
        wait_until_open(output)
        raise Exception(RAY_TIMEOUT)

    monkeypatch.setattr(cli, "start_ray", start_ray)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    record = record_of(output)
    assert record["status"] == "failed" and record["error"].startswith("Exception: The current node timed out")
    assert record["ended_at"] and record["counts"]["images"] == 0
    assert not (output / LEASE_FILE).exists() and not (output / "_SUCCESS").exists()
    line = f"error: run {record['run_id']} failed, run the same command again to resume: Exception: {RAY_TIMEOUT}"
    assert line in err.splitlines()
    assert not list(output.rglob("_spool*"))
    assert_resumes(argv, record)


def test_the_model_failing_after_the_run_opened_closes_it_as_failed(command, monkeypatch, capsys):
    argv, output = command
    monkeypatch.setattr(cli, "start_ray", lambda config: None)

    def job_costs(*args):
        raise RuntimeError("the model cannot be run: out of memory")

    monkeypatch.setattr("mnasnet_batch.costs.job_costs", job_costs)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    record = record_of(output)
    assert record["status"] == "failed" and record["error"] == "RuntimeError: the model cannot be run: out of memory"
    assert not (output / LEASE_FILE).exists()
    expected = f"error: run {record['run_id']} failed, run the same command again to resume: RuntimeError: the model"
    assert expected in err


def test_a_stop_during_rays_start_records_the_run_as_interrupted(command, monkeypatch, capsys):
    argv, output = command

    def start_ray(config):
        wait_until_open(output)
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; the job's handler raises in this (the main) thread
        raise AssertionError("the stop did not arrive")

    monkeypatch.setattr(cli, "start_ray", start_ray)
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    record = record_of(output)
    assert record["status"] == "interrupted" and record["error"] == "Stopped: SIGINT"
    assert not (output / LEASE_FILE).exists()
    line = f"stopped by SIGINT: run {record['run_id']} is recorded as interrupted; run the same command again to resume"
    assert line in err.splitlines()


def test_a_record_that_cannot_be_written_after_rays_start_failed_says_why(command, monkeypatch, capsys):
    from fsspec.implementations.local import LocalFileSystem

    argv, output = command

    def no_space(self, path, value, *args, **kwargs):
        raise OSError(28, "No space left on device")

    def start_ray(config):
        wait_until_open(output)
        monkeypatch.setattr(LocalFileSystem, "pipe_file", no_space)  # the disk fills as Ray fails to start
        raise Exception(RAY_TIMEOUT)

    monkeypatch.setattr(cli, "start_ray", start_ray)
    assert cli.main(argv) == 1
    monkeypatch.undo()
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    record = record_of(output)
    assert record["status"] == "running"  # could not be written; the same command resumes it
    assert f"run {record['run_id']} failed (Exception: The current node timed out" in line
    assert "cannot be written: OSError: [Errno 28] No space left on device" in line
    assert line.endswith("and run the same command")
    assert not (output / LEASE_FILE).exists()
    assert_resumes(argv, record)


def test_a_run_refused_at_opening_is_not_closed(command, monkeypatch, capsys):
    """A refusal (here: another configuration's finished run) opens nothing: exit 2, that run's record untouched."""
    argv, output = command
    config = cli.config_from_args(cli.build_parser().parse_args([*argv, "--run-id", "done"]))
    folder.finish_run(config, folder.plan_run(config, "other-weights"), 1.0)
    before = (output / "_run.json").read_text()
    monkeypatch.setattr(cli, "start_ray", lambda config: None)
    assert cli.main(argv) == 2
    assert "holds run done of a different configuration (weights differ)" in capsys.readouterr().err
    assert (output / "_run.json").read_text() == before and not (output / LEASE_FILE).exists()
