"""Two jobs on one output, the later one with its clock ten minutes ahead or behind (Debian's faketime, on its whole
process tree): every image exactly once, the later job refused or resuming only what the first has not written."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from tests import support
from tests.cluster import end_session
from tests.test_node_loss import GatedImages
from tests.test_output import poll

ROOT = Path(__file__).resolve().parents[1]
FAKETIME = shutil.which("faketime")
IMAGES = 24
SERVED_FIRST = 8  # job A labels these, writes its first parts, then waits on the gate for the rest
TABLE = "labels.images"
SKEWS = ["+10m", "-10m"]


def other_machine_works() -> bool:
    """Whether a process can run in its own PID namespace (``unshare``, as root): to its lease's readers, another
    machine's job, judged by its renewals and not by its pid."""
    unshare = shutil.which("unshare")
    if not unshare:
        return False
    probe = subprocess.run([unshare, "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not FAKETIME, reason="needs Debian's faketime (.ci/run installs it)")


@pytest.fixture
def gated_manifest(tmp_path):
    images = support.write_corpus(tmp_path / "images", IMAGES, seed=38, long_side=200)
    server = GatedImages(tmp_path / "images", {p.name for p in images[:SERVED_FIRST]})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    manifest = tmp_path / "urls.txt"
    manifest.write_text("".join(f"{base}/{p.name}\n" for p in images))
    try:
        yield server, manifest, {f"{base}/{p.name}" for p in images}
    finally:
        server.opened.set()
        server.shutdown()
        server.server_close()


def job_argv(manifest: Path, output: Path, checkpoint: Path, target: str) -> list[str]:
    settings = [
        "output.rows_per_file=4",
        "compute.batch_size=4",
        "preprocess.batch_size=4",
        # Gated reads wait for the gate, not for a timeout.
        "storage.http_timeout_s=600",
        # A renewal every 0.5 s: a job on another machine takes an unrenewed lease after 2 s of watching it.
        "output.lease_heartbeat_s=0.5",
    ]
    if target == "table":
        settings.append(f"output.table={TABLE}")
    return support.job_argv(manifest, output, checkpoint, *settings, extra=("--run-id", "first"))


def start(argv: list[str], log: Path, skew: str = "", other_machine: bool = False) -> subprocess.Popen:
    """The job as users run it, in its own session with its own local Ray; ``skew``: its whole process tree's
    clock that far off (faketime); ``other_machine``: in its own PID namespace."""
    command = [sys.executable, str(ROOT / "jobs" / "label_images.py"), *argv]
    if skew:
        command = [FAKETIME, "-f", skew, *command]
    if other_machine:
        command = ["unshare", "--pid", "--fork", "--mount-proc", *command]
    # Its own Ray: temp folder (short: Ray's socket paths are bounded) and token.
    ray_dir = Path(tempfile.mkdtemp(prefix="r", dir=os.environ.get("TMPDIR", "/tmp")))
    (ray_dir / "token").write_text(uuid.uuid4().hex)
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_TMPDIR": str(ray_dir),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(ray_dir / "token"),
    }
    with open(log, "wb") as out:
        return subprocess.Popen(command, cwd=ROOT, env=environment, start_new_session=True, stdout=out, stderr=out)


def parts(output: Path, target: str) -> list[Path]:
    staged = output / "_staging" if target == "table" else output
    return sorted(staged.glob("run=*/part-*.parquet"))


def labeled_uris(output: Path, target: str) -> list[str]:
    """Every row's uri, repeats kept: the folder's parts, or the table's current rows."""
    if target == "folder":
        dataset = pads.dataset([str(p) for p in parts(output, target)], format="parquet")
        return dataset.to_table(["uri"])["uri"].to_pylist()
    from tests.test_table import embedded_catalog

    table = embedded_catalog(output).load_table(TABLE)
    return table.scan(selected_fields=("uri",)).to_arrow()["uri"].to_pylist()


def lease_token(output: Path) -> str | None:
    try:
        return json.loads((output / "_lease.json").read_text())["token"]
    except FileNotFoundError:
        return None


def finish(job: subprocess.Popen, timeout_s: float = 600) -> int:
    try:
        return job.wait(timeout=timeout_s)
    finally:
        end_session(job.pid)


@pytest.mark.parametrize("skew", SKEWS)
@pytest.mark.parametrize("target", ["folder", "table"])
def test_a_job_with_a_skewed_clock_on_this_machine_is_refused(
    gated_manifest, checkpoint_path, tmp_path, target, skew
):
    server, manifest, urls = gated_manifest
    output = tmp_path / "labels"
    argv = job_argv(manifest, output, checkpoint_path, target)
    first = start(argv, tmp_path / "first.log")
    try:
        poll(lambda: parts(output, target) or first.poll() is not None, 300, "the first job's first part")
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        second = start(argv, tmp_path / "second.log", skew=skew)
        assert finish(second) == 2
        said = (tmp_path / "second.log").read_text()
        assert "in use by run first" in said and "its process runs on this machine" in said, said[-3000:]
        server.opened.set()
        assert finish(first) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        server.opened.set()
        end_session(first.pid)
    labeled = labeled_uris(output, target)
    assert sorted(labeled) == sorted(urls)  # every image exactly once


@pytest.mark.skipif(not other_machine_works(), reason="needs unshare --pid (root) to play another machine")
@pytest.mark.parametrize("skew", SKEWS)
@pytest.mark.parametrize("target", ["folder", "table"])
def test_a_job_on_another_machine_with_a_skewed_clock_takes_over_only_a_silent_lease(
    gated_manifest, checkpoint_path, tmp_path, target, skew
):
    """Job A stops renewing (SIGSTOP, as a driver starved or a VM paused): B, in another PID namespace with its
    clock off, takes the output over after watching the lease for A's period, and labels only what A had not
    written. A, continued, finds its lease taken, publishes nothing more and exits 1 naming B's run."""
    server, manifest, urls = gated_manifest
    output = tmp_path / "labels"
    argv = job_argv(manifest, output, checkpoint_path, target)
    first = start(argv, tmp_path / "first.log")
    second = None
    try:
        poll(lambda: parts(output, target) or first.poll() is not None, 300, "the first job's first part")
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        # While B watches A's renewing lease it stops: renewed while watched.
        watcher = start(argv, tmp_path / "watcher.log", skew=skew, other_machine=True)
        assert finish(watcher) == 2
        said = (tmp_path / "watcher.log").read_text()
        assert "it renewed its lease while this job watched" in said and "in about" in said, said[-3000:]

        os.kill(first.pid, signal.SIGSTOP)
        token = json.loads((output / "_lease.json").read_text())["token"]
        server.opened.set()
        second = start(argv, tmp_path / "second.log", skew=skew, other_machine=True)
        poll(lambda: lease_token(output) != token or second.poll() is not None, 300, "the second job's takeover")
        os.kill(first.pid, signal.SIGCONT)
        assert finish(first) == 1
        said = (tmp_path / "first.log").read_text()
        assert "error: output" in said and "was taken over by" in said and "stopped writing" in said, said[-3000:]
        assert finish(second) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        server.opened.set()
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
        end_session(first.pid)
        if second is not None:
            end_session(second.pid)
    said = (tmp_path / "second.log").read_text()
    assert "taking over the stale lease of run first" in said
    assert "resuming run first" in said
    labeled = labeled_uris(output, target)
    assert sorted(labeled) == sorted(urls)  # every image exactly once
