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

from tests.support import ROOT, end_session, poll

JOB_TIMEOUT_S = 300


def profile_health_checks() -> dict[str, str]:
    """The ``RAY_health_check_*`` settings that conf/kuberay's head node runs with, for a test cluster's head."""
    import yaml

    spec = yaml.safe_load((ROOT / "conf" / "kuberay" / "raycluster.yaml").read_text())["spec"]
    (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in head.get("env", []) if e["name"].startswith("RAY_health_check_")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


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
    """A head node (dashboard on 127.0.0.1) and worker nodes, each in its own session, process group and temp dir.

    Each node needs its own ``--temp-dir``: two nodes of one host sharing one time out at start.
    """

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
        # Each node's `ray start --block`, by name: the head, worker1, worker2, ...
        self.nodes: dict[str, subprocess.Popen] = {}
        self.killed: set[str] = set()

    def start_node(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        temp_dir = self.root / name
        temp_dir.mkdir()
        command = ["ray", "start", "--block", "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp_dir)]
        command += ["--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats", *args]
        with open(self.root / f"{name}.log", "w") as log:
            self.nodes[name] = subprocess.Popen(
                command,
                env={**self.env, **(env or {})},
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start(self, head_cpus: int, *worker_args: str, workers: int = 1, head_env: dict[str, str] | None = None):
        """Starts the head (dashboard on 127.0.0.1, ``head_cpus`` CPUs, ``head_env`` added to its environment: its
        GCS reads ``RAY_*`` settings from it), then ``workers`` worker nodes with ``worker_args``."""
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
            env=head_env,
        )
        # Worker nodes only need the GCS; the dashboard starts meanwhile.
        poll(lambda: self.alive() and listening(self.gcs_port), 120, "the head's GCS")
        for number in range(1, workers + 1):
            self.start_node(f"worker{number}", "--address", f"127.0.0.1:{self.gcs_port}", *worker_args)
        poll(lambda: self.alive() and self.get("/api/version", allow_errors=True), 120, "the head's dashboard")
        nodes = workers + 1
        poll(lambda: self.alive() and len(self.state("nodes", state="ALIVE")) == nodes, 180, f"{nodes} alive nodes")

    def alive(self) -> bool:
        """Fails if a node's `ray start` exited (other than one ``kill_node`` killed), with the nodes' logs."""
        for name, process in self.nodes.items():
            if name not in self.killed and process.poll() is not None:
                logs = "".join((self.root / f"{n}.log").read_text()[-3000:] for n in self.nodes)
                pytest.fail(f"`ray start` of {name} exited with {process.returncode}:\n{logs}")
        return True

    def node_of(self, pid: int) -> str:
        """The name of the node that process ``pid`` belongs to (a node's processes share its session)."""
        session_id = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
        return next(name for name, process in self.nodes.items() if process.pid == session_id)

    def kill_node(self, name: str) -> None:
        """SIGKILLs every process of node ``name`` at once, as when its machine is lost."""
        self.killed.add(name)
        end_session(self.nodes[name].pid)
        self.nodes[name].wait()

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
        for process in self.nodes.values():
            with _ignoring(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for process in self.nodes.values():
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
def running_cluster(head_cpus: int, *worker_args: str, workers: int = 1, head_env: dict[str, str] | None = None):
    """A started cluster (``Cluster.start``) under a fresh short temp dir, stopped and removed afterwards."""
    # Short: Ray's Unix socket paths under the temp dir must stay under 107 characters.
    root = Path(tempfile.mkdtemp(prefix="mnb-", dir="/tmp"))
    bin_dir = isolated_environment(root / "env")
    cluster = Cluster(root, bin_dir, secrets.token_hex(32))
    try:
        cluster.start(head_cpus, *worker_args, workers=workers, head_env=head_env)
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


def submit_job(cluster: Cluster, checkout: Path, *command: str) -> str:
    """``ray job submit --no-wait --working-dir . [command]`` from ``checkout`` with the cluster's token.

    Returns:
        The job's submission id.
    """
    submission_id = f"mnasnet-test-{secrets.token_hex(4)}"
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
    return submission_id


def wait_job(cluster: Cluster, submission_id: str, timeout_s: float = JOB_TIMEOUT_S) -> tuple[dict, str]:
    """Polls the job until it ends and checks that it succeeded.

    Returns:
        The job's status record and its driver's log.
    """

    def finished():
        cluster.alive()
        job = cluster.get(f"/api/jobs/{submission_id}")
        return job if job["status"] in ("SUCCEEDED", "FAILED", "STOPPED") else None

    job = poll(finished, timeout_s, f"job {submission_id} to finish", interval_s=1)
    logs = cluster.get(f"/api/jobs/{submission_id}/logs")["logs"]
    assert job["status"] == "SUCCEEDED", f"{job['status']}: {job.get('message')}\n{logs[-6000:]}"
    return job, logs


def run_job(cluster: Cluster, checkout: Path, *command: str) -> tuple[dict, str]:
    """``submit_job``, then ``wait_job``.

    Returns:
        The job's status record and its driver's log.
    """
    started = time.monotonic()
    submission_id = submit_job(cluster, checkout, *command)
    job, logs = wait_job(cluster, submission_id)
    print(f"{submission_id}: {time.monotonic() - started:.1f} s from submission to SUCCEEDED")
    return job, logs
