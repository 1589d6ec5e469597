"""`ray job submit --working-dir .` with the GPU profile on a real two-node Ray cluster (tests/cluster.py).

The worker node declares GPUs that do not exist: Ray schedules by declared resources, so the model actors (one
"GPU" each, running on the CPU since torch finds no CUDA) land there and the decode tasks on the CPU-only head, as
on a real GPU cluster.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request

import pyarrow.dataset as pads
import pytest

from tests import support
from tests.cluster import ROOT, checkout_copy, run_job, running_cluster

IMAGES = 12
MAX_ACTORS = 2
# Declared on the worker node: more than MAX_ACTORS, so only the configured bound can keep the pool at 2.
FAKE_GPUS = 3
# A cluster's start, a submitted job and its stop: minutes on two loaded cores, more than the default limit.
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def cluster():
    # The worker node declares GPUs it does not have: the model actors land there, decoding on the head.
    with running_cluster(2, "--num-cpus", str(FAKE_GPUS), "--num-gpus", str(FAKE_GPUS)) as started:
        yield started


@pytest.fixture(scope="module")
def submitted(cluster, tmp_path_factory, checkpoint_path):
    """One job over IMAGES photos, submitted from a copy of the repo (not this checkout) with the GPU profile."""
    checkout = checkout_copy(cluster)
    images = support.write_corpus(tmp_path_factory.mktemp("cluster-images"), IMAGES, seed=6)
    output = tmp_path_factory.mktemp("cluster-out") / "labels"
    job, logs = run_job(
        cluster,
        checkout,
        *["--runtime-env", "conf/runtime_env.yaml", "--"],
        *["python", "jobs/label_images.py", "--config", "conf/gpu-cluster.yaml"],
        *["--input", str(images[0].parent), "--output", str(output), "--weights", str(checkpoint_path)],
        *["--set", f"compute.max_actors={MAX_ACTORS}", "--set", "compute.initial_actors=1"],
        *["--set", "compute.actor_cpus=1", "--set", "compute.actor_memory_gb=1"],
        *["--set", "compute.batch_size=2", "--set", "preprocess.batch_size=2", "--set", "progress.interval_s=1"],
    )
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
    support.assert_reference_rows(rows, images, fixture_model)
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
    decode_nodes = {t["node_id"] for t in tasks if "decode_batch" in t["name"] and t["state"] == "FINISHED"}
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
