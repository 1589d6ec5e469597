"""`ray job submit --working-dir .` on a real two-node Ray cluster with token authentication.

The cluster runs from a Python environment that has every dependency but cannot import this package (CI
installs it editable into .venv; the environment here links .venv's site-packages without that install), so
the job only works if the uploaded working dir is importable by the driver and by the workers. The worker
node declares GPUs that do not exist: Ray schedules by declared resources, so the model actors (one "GPU"
each, running on the CPU since torch finds no CUDA) land there and the decode tasks on the CPU-only head, as
on a real GPU cluster. Nodes are stopped by process group; never `ray stop`, which would stop other
developers' clusters on the same machine.
"""

from __future__ import annotations

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

import numpy as np
import pyarrow.dataset as pads
import pytest

from tests import support

ROOT = Path(__file__).resolve().parents[1]
IMAGES = 12
MAX_ACTORS = 2
# Declared on the worker node: more than MAX_ACTORS, so only the configured bound can keep the pool at 2.
FAKE_GPUS = 3
JOB_TIMEOUT_S = 300
pytestmark = pytest.mark.cluster


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

    def start(self) -> None:
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
            "2",
        )
        # The worker node only needs the GCS; the dashboard starts meanwhile.
        poll(lambda: self.alive() and listening(self.gcs_port), 120, "the head's GCS")
        self.start_node(
            "worker",
            "--address",
            f"127.0.0.1:{self.gcs_port}",
            "--num-cpus",
            str(FAKE_GPUS),
            "--num-gpus",
            str(FAKE_GPUS),
        )
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


class _ignoring:
    def __init__(self, *exceptions):
        self.exceptions = exceptions

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        return kind is not None and issubclass(kind, self.exceptions)


@pytest.fixture(scope="module")
def cluster():
    # Short: Ray's Unix socket paths under the temp dir must stay under 107 characters.
    root = Path(tempfile.mkdtemp(prefix="mnb-", dir="/tmp"))
    bin_dir = isolated_environment(root / "env")
    cluster = Cluster(root, bin_dir, secrets.token_hex(32))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def submitted(cluster, tmp_path_factory, checkpoint_path):
    """One job over IMAGES photos, submitted from a copy of the repo (not this checkout) with the GPU profile."""
    checkout = cluster.root / "checkout"
    shutil.copytree(
        ROOT,
        checkout,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info", "output", "build"
        ),
    )
    images = support.write_corpus(tmp_path_factory.mktemp("cluster-images"), IMAGES, seed=6)
    output = tmp_path_factory.mktemp("cluster-out") / "labels"
    submission_id = f"mnasnet-test-{secrets.token_hex(4)}"
    started = time.monotonic()
    submit = subprocess.run(
        ["ray", "job", "submit", "--address", cluster.url, "--submission-id", submission_id, "--no-wait"]
        + ["--working-dir", ".", "--runtime-env", "conf/runtime_env.yaml", "--"]
        + ["python", "jobs/label_images.py", "--config", "conf/gpu-cluster.yaml"]
        + ["--input", str(images[0].parent), "--output", str(output), "--weights", str(checkpoint_path)]
        + ["--set", f"compute.max_actors={MAX_ACTORS}", "--set", "compute.initial_actors=1"]
        + ["--set", "compute.actor_cpus=1", "--set", "compute.actor_memory_gb=1"]
        + ["--set", "compute.batch_size=2", "--set", "preprocess.batch_size=2", "--set", "progress.interval_s=1"],
        cwd=checkout,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr

    def finished():
        cluster.alive()
        job = cluster.get(f"/api/jobs/{submission_id}")
        return job if job["status"] in ("SUCCEEDED", "FAILED", "STOPPED") else None

    job = poll(finished, JOB_TIMEOUT_S, f"job {submission_id} to finish", interval_s=1)
    seconds = time.monotonic() - started
    logs = cluster.get(f"/api/jobs/{submission_id}/logs")["logs"]
    assert job["status"] == "SUCCEEDED", f"{job['status']}: {job.get('message')}\n{logs[-6000:]}"
    print(f"cluster job: {IMAGES} images in {seconds:.1f} s from submission to SUCCEEDED")
    return job, logs, images, output


def test_the_cluster_environment_cannot_import_the_package(cluster):
    probe = subprocess.run(
        ["python", "-c", "import mnasnet_batch"], cwd=cluster.root, env=cluster.env, capture_output=True, text=True
    )
    assert probe.returncode != 0 and "No module named 'mnasnet_batch'" in probe.stderr
    # The same interpreter has every dependency the job needs.
    deps = subprocess.run(
        ["python", "-c", "import ray.data, torch, torchvision, pyarrow, fsspec, PIL, yaml"],
        cwd=cluster.root,
        env=cluster.env,
    )
    assert deps.returncode == 0


def test_token_authentication_is_enforced(cluster):
    request = urllib.request.Request(f"{cluster.url}/api/jobs/")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code in (401, 403)
    env = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    env["HOME"] = str(cluster.root)  # no ~/.ray/auth_token to fall back on
    listing = subprocess.run(
        ["ray", "job", "list", "--address", cluster.url], env=env, cwd=cluster.root, capture_output=True, text=True
    )
    assert listing.returncode != 0 and "AuthenticationError" in listing.stdout + listing.stderr


def test_every_image_is_labeled(submitted, fixture_model):
    _, logs, images, output = submitted
    rows = {row["uri"]: row for row in pads.dataset(output, format="parquet").to_table().to_pylist()}
    assert set(rows) == {str(p) for p in images}
    ref_ids, ref_scores = support.reference_predictions(images, fixture_model, "mnasnet0_5", 5)
    for path, ids, scores in zip(images, ref_ids, ref_scores, strict=True):
        row = rows[str(path)]
        assert row["status"] == "ok" and row["top_k_ids"] == ids.tolist()
        np.testing.assert_allclose(row["top_k_scores"], scores, atol=1e-4)
    assert f"labeled {IMAGES} images (0 errors)" in logs


def test_the_run_is_named_after_the_submission(submitted):
    job, _, _, output = submitted
    # `ray job submit` gives the driver its submission id, which the job takes as the run id.
    record = json.loads((output / f"run={job['submission_id']}" / "_run.json").read_text())
    assert record["status"] == "succeeded" and record["counts"]["ok"] == IMAGES
    assert (output / "_SUCCESS").read_text() == job["submission_id"]


def test_the_driver_imported_the_uploaded_working_dir(cluster, submitted):
    _, logs, _, _ = submitted
    line = next(line for line in logs.splitlines() if "mnasnet-batch 0.1.0 from " in line)
    location = line.split("mnasnet-batch 0.1.0 from ", 1)[1].strip()
    assert location.startswith(str(cluster.root / "head")) and "working_dir_files" in location, location
    assert not location.startswith(str(ROOT))


def test_work_ran_on_both_nodes_gpu_actors_on_the_gpu_node(cluster, submitted):
    job, _, _, _ = submitted
    nodes = {n["node_id"]: n for n in cluster.state("nodes")}
    gpu_node = next(node_id for node_id, n in nodes.items() if n["resources_total"].get("GPU"))
    tasks = cluster.state("tasks", job_id=job["job_id"])
    decode_nodes = {t["node_id"] for t in tasks if "load_batch" in t["name"] and t["state"] == "FINISHED"}
    actors = [a for a in cluster.state("actors", job_id=job["job_id"]) if "MapBatches(Predictor)" in a["repr_name"]]
    assert actors and {a["node_id"] for a in actors} == {gpu_node}
    # Decoding ran on the CPU-only head (Ray prefers it for tasks that need no GPU), possibly also on the GPU node.
    assert decode_nodes and len(decode_nodes | {gpu_node}) == 2


def test_the_actor_pool_stays_within_its_bounds(cluster, submitted):
    job, logs, _, _ = submitted
    actors = [a for a in cluster.state("actors", job_id=job["job_id"]) if "MapBatches(Predictor)" in a["repr_name"]]
    # Every actor the job ever started, dead or alive: the pool cannot have been larger at any moment.
    assert 1 <= len(actors) <= MAX_ACTORS
    assert f"1-{MAX_ACTORS} model actors (1 at start)" in logs


def test_job_logs_have_progress_lines_and_no_progress_bars(submitted):
    _, logs, _, _ = submitted
    progress = [line for line in logs.splitlines() if "progress: " in line]
    assert progress, logs[-3000:]
    assert all("images/s" in line and "errors" in line and ("ETA" in line or "done" in line) for line in progress)
    assert "Running Dataset" not in logs  # Ray Data's own periodic progress block
    assert "\r" not in logs and "it/s]" not in logs  # no tqdm bars
