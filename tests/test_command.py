"""The job as people run it: the README's command from another directory, stopping it, settings that cannot fit,
and a driver whose working directory Ray replaces under it."""

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnasnet_batch import cli
from mnasnet_batch.cli import main
from mnasnet_batch.outputs import files as files_module
from mnasnet_batch.outputs import run as output_module
from tests import support
from tests.support import SMALL_BATCHES, kill_session, many_images, poll, rows_by_uri

ROOT = Path(__file__).resolve().parents[1]


def plain_environment(**extra: str) -> dict[str, str]:
    """This environment without a cluster address: the command starts its own local Ray."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | extra


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stopped_job_says_how_to_resume_and_records_the_run_interrupted(
    corpus, tmp_path, checkpoint_path, signum, job_process
):
    images = many_images(tmp_path, corpus, 8)  # 192 images
    output = tmp_path / "out"
    argv = support.job_argv(images, output, checkpoint_path, *SMALL_BATCHES)
    # The third part's publishing waits for the gate, so the job is still running when the signal comes, however fast
    # the machine; the gate opens once the signal is sent, so the job can close.
    gate = tmp_path / "gate"
    hooks = support.replace_hook(tmp_path / "hooks", support.stall_after_two_parts_until(gate))
    with open(tmp_path / "stderr", "w") as stderr:
        job = job_process.start(argv, stderr=stderr, env={"PYTHONPATH": os.pathsep.join([str(hooks), str(ROOT)])})
        try:
            poll(lambda: len(list(output.glob("run=*/part-*.parquet"))) >= 2, 180, "two written parts")
            assert job.poll() is None, "the run finished before it could be stopped"
            os.kill(job.pid, signum)  # the driver alone, as Kubernetes and `kill` do
            gate.touch()
            status = job.wait(timeout=120)
        finally:
            kill_session(job)
    lines = (tmp_path / "stderr").read_text().splitlines()
    assert status == 128 + signum
    assert "Traceback" not in "\n".join(lines)
    record = json.loads((output / "_run.json").read_text())
    assert lines[-1] == (
        f"stopped by {signal.Signals(signum).name}: run {record['run_id']} is recorded as interrupted; "
        "run the same command again to resume"
    )
    assert record["status"] == "interrupted" and not (output / "_SUCCESS").exists()
    # What this attempt labeled is what it wrote, not what it was given.
    written = len(rows_by_uri(output))
    assert 0 < written < 192 and record["counts"]["labeled_this_attempt"] == written == record["counts"]["images"]


def test_model_actors_that_fit_no_node_stop_the_job_with_one_line(local_ray, corpus, tmp_path, checkpoint_path, capsys):
    # The local Ray has 2 CPUs; Ray would keep an actor asking for 4 pending forever, and the job with it.
    argv = support.job_argv(corpus[0].parent, tmp_path / "out", checkpoint_path, "compute.actor_cpus=4")
    # In this thread, so that a job that never stops is ended by the test's time limit (pytest-timeout), not left
    # running on the shared Ray as a thread would be.
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: no node of the cluster can hold a model actor (4 CPU, 1.5 GB memory)")
    assert "compute.actor_cpus" in error
    assert json.loads((tmp_path / "out" / "_run.json").read_text())["status"] == "failed"


def test_a_driver_whose_working_directory_is_replaced_still_labels_everything(
    local_ray, corpus, tmp_path, checkpoint_path, job_process
):
    # `ray job submit` runs the driver in the unpacked working dir, then Ray unpacks it again (rmtree, extract)
    # while setting the job's runtime env up on the node. This driver joins the tests' Ray from such a directory,
    # and a test-only hook (sitecustomize, loaded at start-up) deletes the directory right after ray.init returns
    # and never puts it back: the worst case of that window, so any later use of the working directory, or any
    # import from it, fails every time instead of by chance.
    working_dir = tmp_path / "working_dir"
    shutil.copytree(ROOT / "mnasnet_batch", working_dir / "mnasnet_batch", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "jobs", working_dir / "jobs")
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import shutil, ray\n"
        "_init = ray.init\n"
        "def _init_then_delete_the_working_dir(*args, **kwargs):\n"
        "    context = _init(*args, **kwargs)\n"
        f"    shutil.rmtree({str(working_dir)!r})\n"
        f"    open({str(tmp_path / 'deleted')!r}, 'w').close()\n"
        "    return context\n"
        "ray.init = _init_then_delete_the_working_dir\n"
    )
    output = tmp_path / "out"
    result = job_process.run(
        support.job_argv(corpus[0].parent, output, checkpoint_path),
        600,
        env={
            "RAY_ADDRESS": local_ray.get_runtime_context().gcs_address,
            "PYTHONPATH": os.pathsep.join([str(hooks), str(working_dir)]),
        },
        program=[sys.executable, "jobs/label_images.py"],
        cwd=working_dir,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert (tmp_path / "deleted").exists() and not working_dir.exists(), "the hook did not delete the working dir"
    assert set(rows_by_uri(output)) == {str(p) for p in corpus}


def test_a_full_disk_stops_the_run_with_one_line_and_it_resumes(
    local_ray, corpus, tmp_path, checkpoint_path, job_process
):
    # Publishing a Parquet part fails as on a full disk.
    hooks = support.replace_hook(
        tmp_path / "hooks",
        "    if str(dst).endswith('.parquet'):\n        raise OSError(errno.ENOSPC, 'No space left on device')\n",
    )
    output = tmp_path / "out"
    argv = support.job_argv(corpus[0].parent, output, checkpoint_path)
    result = job_process.run(argv, 600, env={"PYTHONPATH": os.pathsep.join([str(hooks), str(ROOT)])})
    record = json.loads((output / "_run.json").read_text())
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"error: run {record['run_id']} failed, run the same command again to resume: "
        "OSError: [Errno 28] No space left on device"
    )
    assert record["status"] == "failed" and record["counts"]["labeled_this_attempt"] == 0
    assert not list(output.rglob("_inprogress-*")) and not list(output.rglob("*.parquet"))
    # Space again: the same command resumes the run and labels everything.
    assert main(argv) == 0
    assert set(rows_by_uri(output)) == {str(p) for p in corpus}
    assert json.loads((output / "_run.json").read_text())["run_id"] == record["run_id"]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_cluster_stops_the_job_in_its_timeout_and_touches_no_output(
    corpus, tmp_path, checkpoint_path, job_process
):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(corpus[0], images / corpus[0].name)
    address = f"127.0.0.1:{closed_port()}"
    argv = support.job_argv(images, tmp_path / "out", checkpoint_path, "ray.connect_timeout_s=2")
    # Ray's own connect would wait minutes: a test that hangs here has lost its bound.
    job = job_process.run(argv, 120, env={"RAY_ADDRESS": address})
    err = job.stderr
    assert job.returncode == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and address in errors[0] and "RAY_ADDRESS" in errors[0]
    assert "ray.connect_timeout_s" in errors[0]
    assert not (tmp_path / "out").exists()


def test_a_missing_input_or_weights_or_an_unwritable_output_is_told_before_torch_or_ray(tmp_path, checkpoint_path):
    script = (
        "import sys\n"
        "from mnasnet_batch.cli import main\n"
        "status = main(sys.argv[1:])\n"
        "print(status, 'torch' in sys.modules, 'ray' in sys.modules)\n"
    )
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "notes.txt").write_text("a file where the output's folder would be")
    for argv, missing in (
        (["--input", "nope", "--output", "out", "--weights", str(checkpoint_path)], f"input {tmp_path / 'nope'}"),
        (["--input", "images", "--output", "out", "--weights", "nope.pth"], "weights nope.pth"),
        (["--input", "images", "--output", "notes.txt/out", "--weights", str(checkpoint_path)], "output"),
    ):
        result = subprocess.run(
            [sys.executable, "-c", script, *argv],
            cwd=tmp_path,
            env=plain_environment(PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.stdout.split() == ["2", "False", "False"], result.stdout + result.stderr
        if missing == "output":
            written = f"output {tmp_path}/notes.txt/out cannot be written: {tmp_path}/notes.txt is not a folder"
            assert f"error: {written}" in result.stderr
        else:
            assert f"error: {missing} does not exist" in result.stderr
        assert not (tmp_path / "out").exists()


def signal_after(function, condition=lambda *args: True):
    """``function``, which sends this process SIGINT once a call satisfying ``condition`` has returned."""

    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        if condition(*args):
            os.kill(os.getpid(), signal.SIGINT)
        return result

    return wrapper


def run_record_written(fs, path, data, guard=None):
    return path.endswith(f"/{output_module.RUN_RECORD}") and "/run=" in path and b'"succeeded"' in data


STEPS = ["before the record", "during the record", "after the record", "during Ray's shutdown"]


@pytest.mark.parametrize("step", STEPS)
def test_a_stop_while_the_run_closes_gives_its_true_outcome(
    local_ray, corpus, tmp_path, checkpoint_path, capsys, monkeypatch, step
):
    from mnasnet_batch import job as pipeline

    images = tmp_path / "images"
    images.mkdir()
    for path in corpus[:4]:
        shutil.copy(path, images / path.name)
    output = tmp_path / "out"
    shutdowns = []
    if step == "before the record":  # the last image labeled, closing not begun
        monkeypatch.setattr(pipeline, "run", signal_after(pipeline.run))
    elif step == "during the record":  # between the run folder's record and the output's
        monkeypatch.setattr(files_module, "write_bytes", signal_after(files_module.write_bytes, run_record_written))
    elif step == "after the record":  # the run recorded as succeeded and marked complete
        marker = lambda fs, path, data, guard=None: path.endswith(output_module.SUCCESS_MARKER)  # noqa: E731
        monkeypatch.setattr(files_module, "write_bytes", signal_after(files_module.write_bytes, marker))
    else:  # the job's own local Ray (here the tests' Ray, which stays up) shutting down
        monkeypatch.setattr(cli, "ray_initialized", lambda: False)
        monkeypatch.setattr(cli, "start_ray", lambda config: None)
        monkeypatch.setattr(local_ray, "shutdown", signal_after(lambda: shutdowns.append("done")))
    status = main(support.job_argv(images, output, checkpoint_path))
    printed = capsys.readouterr()
    record = json.loads((output / "_run.json").read_text())
    assert json.loads((output / f"run={record['run_id']}" / "_run.json").read_text()) == record
    if step == "before the record":
        assert status == 130 and record["status"] == "interrupted"
        assert f"stopped by SIGINT: run {record['run_id']} is recorded as interrupted" in printed.err
        assert not (output / "_SUCCESS").exists()
    else:
        assert status == 0, printed.err
        assert record["status"] == "succeeded" and (output / "_SUCCESS").exists()
        assert "labeled 4 images (0 errors)" in printed.out
        assert f"SIGINT arrived while run {record['run_id']} was closing; it had succeeded" in printed.err
        assert shutdowns == ([] if step != "during Ray's shutdown" else ["done"])
    assert set(rows_by_uri(output)) == {str(images / p.name) for p in corpus[:4]}


# Every line a good local job prints on stderr, after its time stamp: the job's own, each once but progress.
OWN_LINES = {
    "version": r"INFO mnasnet_batch\.cli: mnasnet-batch \S+ from \S+",
    "layout": r"INFO mnasnet_batch\.inputs\.listing: input format files \(detected from \S+\)",
    "plan": r"INFO mnasnet_batch\.cli: weights \S+ verified \(\w+\); 5 image files \(files\) under \S+, 5 image files "
    r"to label in run \w+",
    "ray data log": r"INFO mnasnet_batch\.job: Ray Data's log, with the traceback of any failed task: \S+; Ray's own "
    r"messages \(node health, retries\) are in the folder above it, on each node",
    "costs": r"INFO mnasnet_batch\.job: an image costs [0-9.]+ ms to decode and [0-9.]+ ms in the model \(\w+\) on "
    r"one core \(.*\)",
    "cluster": r"INFO mnasnet_batch\.job: the cluster: \d+ node\(s\) alive .*",
    "actors": r"INFO mnasnet_batch\.job: labeling 5 image files \(files\) with mnasnet0_5: .*",
    "engine": r"INFO mnasnet_batch\.job: the model runs on (ONNX Runtime|torch)",
    "progress": r"INFO mnasnet_batch\.progress: progress: \d+/5 images .*",
    "cpu time": r"INFO mnasnet_batch\.job: in the job, an image took [0-9.]+ ms to decode and [0-9.]+ ms in the "
    r"model \(CPU time\)",
}


def test_a_good_local_job_prints_its_own_lines_only(corpus, photos, tmp_path, checkpoint_path, job_process):
    # A photo whose EXIF Pillow warns about: a warning, not an error, and not a line of the job's log.
    images = tmp_path / "images"
    images.mkdir()
    for path in corpus[:4]:
        shutil.copy(path, images / path.name)
    exif = (
        b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x02\x00\x12\x01\x03\x00\x01\x00\x00\x00\x06\x00\x00\x00"
        b"\x0f\x01\x02\x00\x00\x10\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00"
    )
    photos["coffee"].save(images / "corrupt_exif.jpg", "JPEG", exif=exif)
    # The user's token file, as `ray get-auth-token --generate` leaves it: Ray turns token authentication on for
    # the job's local Ray, and would say so.
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    result = job_process.run(
        support.job_argv(images, tmp_path / "labels", checkpoint_path), 600, env={"HOME": str(home)}
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        line for line in result.stdout.splitlines() if line.startswith("labeled 5 images (0 errors) in ")
    ] and len(result.stdout.splitlines()) == 1
    kinds = []
    for line in result.stderr.splitlines():
        text = re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", "", line)
        matched = [kind for kind, pattern in OWN_LINES.items() if re.fullmatch(pattern, text)]
        assert matched, f"a line that is not the job's own: {line!r}"
        kinds += matched
    assert sorted(k for k in kinds if k != "progress") == sorted(k for k in OWN_LINES if k != "progress")


def readme_block(after: str) -> str:
    """The README's first code block after the line ``after``."""
    text = (ROOT / "README.md").read_text()
    return text[text.index(after) :].split("```")[1].split("\n", 1)[1]


def test_the_readme_quickstart_from_another_directory_prints_the_line_it_states(
    tmp_path, checkpoint_path, job_process
):
    # The quickstart's photos, and its command, with the test's weights (torchvision's cannot be fetched here), every
    # path relative to a directory that is not the checkout.
    commands = readme_block("## Quickstart").splitlines()
    assert commands[1].split("#")[0].split() == [".venv/bin/python", "scripts/sample_photos.py", "./sample"]
    assert commands[2].split() == ["bash", "scripts/label.sh", "--input", "./sample", "--output", "./labels"]
    subprocess.run([sys.executable, str(ROOT / "scripts" / "sample_photos.py"), "./sample"], cwd=tmp_path, check=True)
    shutil.copy(checkpoint_path, tmp_path / "w.pth")
    started = time.monotonic()
    result = job_process.run(
        ["--input", "./sample", "--output", "./labels", "--weights", "w.pth"],
        600,
        program=["bash", str(ROOT / "scripts" / "label.sh")],
        cwd=tmp_path,
    )
    wall = time.monotonic() - started
    printed = result.stdout + result.stderr
    assert result.returncode == 0, printed
    stated = readme_block("It ends with one line on stdout").strip()
    pattern = re.escape(stated).replace("T", "[0-9.]+")
    assert re.fullmatch(pattern, result.stdout.strip()), (stated, result.stdout)
    assert set(rows_by_uri(tmp_path / "labels")) == {str(p) for p in (tmp_path / "sample").iterdir()}
    assert not (ROOT / "labels").exists()
    # A log for people: no colour codes, no Ray start-up chatter, no warning about what the job chose itself.
    assert "\x1b[" not in printed
    assert "Started a local Ray instance" not in printed and "Progress bars disabled" not in printed
    assert "Execution plan of Dataset" not in printed
    # The summary's time is the command's (it said 31.9 s for a 56 s command: Ray's start and stop were missing).
    seconds = float(re.search(r"labeled 8 images \(0 errors\) in ([0-9.]+) s", result.stdout).group(1))
    # Python's start before the job's clock is the rest: far less than Ray's start and stop, however loaded.
    assert wall * 0.75 <= seconds <= wall, (seconds, wall)
    # The README's line that reads the result.
    read = readme_block("Read the result with pandas").strip().split(maxsplit=1)[1]
    shown = subprocess.run([sys.executable, *shlex.split(read)], cwd=tmp_path, capture_output=True, text=True)
    assert shown.returncode == 0 and len(re.findall(r"\bok\b", shown.stdout)) == 8, shown.stdout + shown.stderr
