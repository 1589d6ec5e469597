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
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from fsspec.implementations.local import LocalFileSystem

from mnasnet_batch.config import StorageConfig
from mnasnet_batch.outputs import files
from mnasnet_batch.storage import Storage
from tests import support
from tests.support import GatedImages, end_session, poll

ROOT = Path(__file__).resolve().parents[1]
FAKETIME = shutil.which("faketime")
IMAGES = 24
SERVED_FIRST = 8  # job A labels these, writes its first parts, then waits on the gate for the rest
TABLE = "labels.images"


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


@dataclass
class Output:
    """Where both jobs write: ``uri`` as the jobs take it, and ``fs`` / ``root`` as the test reads it."""

    uri: str
    fs: object
    root: str
    storage: dict = field(default_factory=dict)  # the jobs' storage settings (the moto server's, for S3)


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path):
    if request.param == "local":
        return Output(str(tmp_path / "labels"), LocalFileSystem(), str(tmp_path / "labels"))
    s3_server = request.getfixturevalue("s3_server")
    fs, _ = Storage(StorageConfig(**s3_server)).filesystem("s3://lease-jobs")
    if not fs.exists("lease-jobs"):
        fs.mkdir("lease-jobs")
    return Output(f"s3://lease-jobs/{tmp_path.name}", fs, f"lease-jobs/{tmp_path.name}", s3_server)


def job_argv(manifest: Path, out: Output, checkpoint: Path, target: str) -> list[str]:
    settings = [
        "output.rows_per_file=4",
        "compute.batch_size=4",
        "preprocess.batch_size=4",
        # Gated reads wait for the gate, not for a timeout.
        "storage.http_timeout_s=600",
        # A renewal every 0.5 s: a job on another machine takes an unrenewed lease after 2 s of watching it.
        "output.lease_heartbeat_s=0.5",
        *(f"storage.{key}={json.dumps(value)}" for key, value in out.storage.items()),
    ]
    if target == "table":
        settings.append(f"output.table={TABLE}")
    return support.job_argv(manifest, out.uri, checkpoint, *settings, extra=("--run-id", "first"))


# Ray 2.60 gives a starting node 30 s (hard-coded) to register; on a loaded machine it may not, and the job ends
# with this line before it touched the output. Such a start is tried again, at most RAY_STARTS times.
RAY_START_TIMEOUT = "The current node timed out during startup"
RAY_STARTS = 3


def start(argv: list[str], log: Path, skew: str = "", other_machine: bool = False) -> subprocess.Popen:
    """The job as users run it, in its own session with its own local Ray; ``skew``: its whole process tree's
    clock that far off (faketime); ``other_machine``: in its own PID namespace."""
    command = [sys.executable, str(ROOT / "jobs" / "label_images.py"), *argv]
    if other_machine:
        command = ["unshare", "--pid", "--fork", "--mount-proc", *command]
    if skew:
        # Outside the PID namespace: the wrapper names its semaphore by its pid, which is 1 in a new namespace.
        command = [FAKETIME, "-f", skew, *command]
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


def ray_did_not_start(job: subprocess.Popen, log: Path) -> bool:
    return job.poll() is not None and RAY_START_TIMEOUT in log.read_text()


def start_first(argv: list[str], out: Output, target: str, log: Path) -> subprocess.Popen:
    """Job A, running once its first part is written (polled, never slept for)."""
    for _ in range(RAY_STARTS):
        first = start(argv, log)
        poll(lambda job=first: parts(out, target) or job.poll() is not None, 300, "the first job's first part")
        if not ray_did_not_start(first, log):
            break
        end_session(first.pid)
    assert first.poll() is None, log.read_text()[-3000:]
    return first


def run_second(argv: list[str], log: Path, **how) -> int:
    """Job B to its end; its exit status."""
    for _ in range(RAY_STARTS):
        second = start(argv, log, **how)
        status = finish(second)
        if not ray_did_not_start(second, log):
            return status
    return status


def parts(out: Output, target: str) -> list[str]:
    out.fs.invalidate_cache()
    return files.parts_under(out.fs, files.join(out.root, "_staging") if target == "table" else out.root)


def labeled_uris(out: Output, target: str) -> list[str]:
    """Every row's uri, repeats kept: the folder's parts, or the table's current rows."""
    if target == "folder":
        dataset = pads.dataset(parts(out, target), filesystem=out.fs, format="parquet")
        return dataset.to_table(["uri"])["uri"].to_pylist()
    table = support.embedded_catalog(Path(out.root)).load_table(TABLE)
    return table.scan(selected_fields=("uri",)).to_arrow()["uri"].to_pylist()


def lease_token(out: Output) -> str | None:
    out.fs.invalidate_cache()
    try:
        return json.loads(out.fs.cat_file(files.join(out.root, "_lease.json")))["token"]
    except FileNotFoundError:
        return None


def finish(job: subprocess.Popen, timeout_s: float = 600) -> int:
    try:
        return job.wait(timeout=timeout_s)
    finally:
        end_session(job.pid)


# The later job's clock against the first's: ahead, where a clock-trusting lease would take a live job's output
# (rows written twice), and behind, where it would never take a dead one's. Each test covers both directions,
# spread over the targets and stores (the lease is the same code for each; its units cover every store).
@pytest.mark.parametrize(("target", "skew"), [("folder", "+10m"), ("table", "-10m")])
def test_a_job_with_a_skewed_clock_on_this_machine_is_refused(
    gated_manifest, checkpoint_path, tmp_path, target, skew, job_process
):
    server, manifest, urls = gated_manifest
    output = Output(str(tmp_path / "labels"), LocalFileSystem(), str(tmp_path / "labels"))
    argv = job_argv(manifest, output, checkpoint_path, target)
    first = start_first(argv, output, target, tmp_path / "first.log")
    job_process.started.append(first)  # its session ends with the test
    try:
        assert run_second(argv, tmp_path / "second.log", skew=skew) == 2
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
@pytest.mark.parametrize(
    ("out", "target", "skew"),
    [("local", "folder", "-10m"), ("local", "table", "+10m"), ("s3", "folder", "+10m"), ("s3", "folder", "-10m")],
    indirect=["out"],
)
def test_a_job_on_another_machine_with_a_skewed_clock_takes_over_only_a_silent_lease(
    gated_manifest, checkpoint_path, tmp_path, out, target, skew, job_process
):
    """Job A stops renewing (SIGSTOP, as a driver starved or a VM paused): B, in another PID namespace with its
    clock off, takes the output over after watching the lease for A's period, and labels only what A had not
    written. A, continued, finds its lease taken, publishes nothing more and exits 1 naming B's run. On local disk
    and on S3 (a table on S3 needs output.catalog: its staging is the folder's, whose lease is tested here on S3)."""
    server, manifest, urls = gated_manifest
    output = out
    argv = job_argv(manifest, output, checkpoint_path, target)
    first = start_first(argv, output, target, tmp_path / "first.log")
    job_process.started.append(first)  # its session ends with the test
    second = None
    try:
        # While B watches A's renewing lease it stops: renewed while watched.
        assert run_second(argv, tmp_path / "watcher.log", skew=skew, other_machine=True) == 2
        said = (tmp_path / "watcher.log").read_text()
        assert "it renewed its lease while this job watched" in said and "in about" in said, said[-3000:]

        os.kill(first.pid, signal.SIGSTOP)
        token = lease_token(output)
        server.opened.set()
        second = start(argv, tmp_path / "second.log", skew=skew, other_machine=True)
        job_process.started.append(second)  # its session ends with the test
        poll(lambda: lease_token(output) != token or second.poll() is not None, 300, "the second job's takeover")
        os.kill(first.pid, signal.SIGCONT)
        assert finish(first) == 1
        said = (tmp_path / "first.log").read_text()
        assert "error: output" in said and "was taken over by" in said and "stopped writing" in said, said[-3000:]
        status = finish(second)
        if ray_did_not_start(second, tmp_path / "second.log"):  # after it took the lease, maybe: taken over again
            status = run_second(argv, tmp_path / "second.log", skew=skew, other_machine=True)
        assert status == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        server.opened.set()
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
        end_session(first.pid)
        if second is not None:
            end_session(second.pid)
    said = (tmp_path / "second.log").read_text()
    assert "taking over the stale lease of" in said
    assert "resuming run first" in said
    labeled = labeled_uris(output, target)
    assert sorted(labeled) == sorted(urls)  # every image exactly once
