"""A real Ray cluster for tests: `ray start` nodes with token authentication, each in its own process group.

Nodes run from a Python environment that has every dependency but cannot import this package (CI installs it
editable into .venv; the environment here links .venv's site-packages without that install), so a job only works
if the working dir `ray job submit` uploads is importable by the driver and by the workers. Nodes are stopped by
process group; never `ray stop`, which would stop other developers' clusters on the same machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def poll(condition, timeout_s: float, what: str, interval_s: float = 0.5):
    """Returns the first truthy ``condition()``, or fails after ``timeout_s`` saying what was awaited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def session_members(session_id: int) -> list[int]:
    """The live (not zombie) processes of a session."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == session_id and fields[0] != "Z":  # fields[3]: session id
                    members.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return members


def end_session(session_id: int, timeout_s: float = 30) -> None:
    """SIGKILLs every process of a session until none is left: Ray's workers and job drivers run in process groups
    of their own, so killing a node's process group leaves them running."""

    def none_left() -> bool:
        members = session_members(session_id)
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return not members

    poll(none_left, timeout_s, f"the processes of session {session_id} to exit", interval_s=0.1)


def isolated_environment(root: Path) -> Path:
    """A venv whose site-packages links every entry of this interpreter's, except this package's install."""
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    target = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    sources = {Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")}
    for source in sources:
        for entry in source.iterdir():
            # The dist-info, the editable .pth / finder, or a regular install of the package.
            if "mnasnet" not in entry.name.lower() and not (target / entry.name).exists():
                (target / entry.name).symlink_to(entry)
    (root / "bin" / "ray").write_text(
        f"#!{python}\nimport sys\nfrom ray.scripts.scripts import main\nsys.exit(main())\n"
    )
    (root / "bin" / "ray").chmod(0o755)
    return root / "bin"


class Cluster:
    """A head node (dashboard on 127.0.0.1) and one worker node, each in its own process group and temp dir."""

    def __init__(self, root: Path, bin_dir: Path, token: str):
        self.root = root
        self.token = token
        token_path = root / "auth_token"
        token_path.write_text(token)
        token_path.chmod(0o600)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONPATH"}
        self.env.update(
            PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(token_path),
            RAY_USAGE_STATS_ENABLED="0",
        )
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        self.processes: list[subprocess.Popen] = []

    def start_node(self, name: str, *args: str) -> None:
        temp_dir = self.root / name
        temp_dir.mkdir()
        command = ["ray", "start", "--block", "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp_dir)]
        command += ["--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats", *args]
        with open(self.root / f"{name}.log", "w") as log:
            self.processes.append(
                subprocess.Popen(
                    command, env=self.env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )

    def start(self, head_cpus: int, *worker_args: str) -> None:
        """Starts the head (dashboard on 127.0.0.1, ``head_cpus`` CPUs), then one worker node with ``worker_args``."""
        self.start_node(
            "head",
            "--head",
            "--port",
            str(self.gcs_port),
            "--include-dashboard",
            "true",
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(self.dashboard_port),
            "--ray-client-server-port",
            str(free_port()),
            "--num-cpus",
            str(head_cpus),
        )
        # The worker node only needs the GCS; the dashboard starts meanwhile.
        poll(lambda: self.alive() and listening(self.gcs_port), 120, "the head's GCS")
        self.start_node("worker", "--address", f"127.0.0.1:{self.gcs_port}", *worker_args)
        poll(lambda: self.alive() and self.get("/api/version", allow_errors=True), 120, "the head's dashboard")
        poll(lambda: self.alive() and len(self.state("nodes", state="ALIVE")) == 2, 120, "two alive nodes")

    def alive(self) -> bool:
        for process in self.processes:
            if process.poll() is not None:
                logs = "".join((self.root / f"{n}.log").read_text()[-3000:] for n in ("head", "worker"))
                pytest.fail(f"`ray start` exited with {process.returncode}:\n{logs}")
        return True

    def get(self, path: str, allow_errors: bool = False, **query):
        """GETs the dashboard's JSON with the token, as `ray job` and `ray list` do."""
        url = f"{self.url}{path}?{urllib.parse.urlencode(query, doseq=True)}"
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except OSError:
            if allow_errors:
                return None
            raise

    def state(self, resource: str, **filters) -> list[dict]:
        """Ray's state API (what `ray list RESOURCE` shows), detailed, filtered on equality."""
        query = {"detail": "true", "limit": 10000, "filter_keys": [], "filter_predicates": [], "filter_values": []}
        for key, value in filters.items():
            query["filter_keys"].append(key)
            query["filter_predicates"].append("=")
            query["filter_values"].append(value)
        return self.get(f"/api/v0/{resource}", **query)["data"]["result"]["result"]

    def stop(self) -> None:
        """SIGTERM to each node's process group, SIGKILL after 5 s of draining (the job is over by then)."""
        for process in self.processes:
            with _ignoring(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for process in self.processes:
            with _ignoring(subprocess.TimeoutExpired):
                process.wait(max(0.1, deadline - time.monotonic()))
            with _ignoring(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            end_session(process.pid)  # each node started its own session


class _ignoring:
    def __init__(self, *exceptions):
        self.exceptions = exceptions

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        return kind is not None and issubclass(kind, self.exceptions)


@contextlib.contextmanager
def running_cluster(head_cpus: int, *worker_args: str):
    """A started two-node cluster under a fresh short temp dir, stopped and removed afterwards."""
    # Short: Ray's Unix socket paths under the temp dir must stay under 107 characters.
    root = Path(tempfile.mkdtemp(prefix="mnb-", dir="/tmp"))
    bin_dir = isolated_environment(root / "env")
    cluster = Cluster(root, bin_dir, secrets.token_hex(32))
    try:
        cluster.start(head_cpus, *worker_args)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def checkout_copy(cluster: Cluster) -> Path:
    """A copy of the repository's files, as a user's checkout (not this one, which holds .venv and caches)."""
    checkout = cluster.root / "checkout"
    shutil.copytree(
        ROOT,
        checkout,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info", "output", "build"
        ),
    )
    return checkout


def run_job(cluster: Cluster, checkout: Path, *command: str) -> tuple[dict, str]:
    """``ray job submit --no-wait --working-dir . [command]`` from ``checkout`` with the cluster's token, then polls
    the job until it ends and checks that it succeeded.

    Returns:
        The job's status record and its driver's log.
    """
    submission_id = f"mnasnet-test-{secrets.token_hex(4)}"
    started = time.monotonic()
    result = subprocess.run(
        ["ray", "job", "submit", "--address", cluster.url, "--submission-id", submission_id, "--no-wait"]
        + ["--working-dir", ".", *command],
        cwd=checkout,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    def finished():
        cluster.alive()
        job = cluster.get(f"/api/jobs/{submission_id}")
        return job if job["status"] in ("SUCCEEDED", "FAILED", "STOPPED") else None

    job = poll(finished, JOB_TIMEOUT_S, f"job {submission_id} to finish", interval_s=1)
    logs = cluster.get(f"/api/jobs/{submission_id}/logs")["logs"]
    assert job["status"] == "SUCCEEDED", f"{job['status']}: {job.get('message')}\n{logs[-6000:]}"
    print(f"{submission_id}: {time.monotonic() - started:.1f} s from submission to SUCCEEDED")
    return job, logs
