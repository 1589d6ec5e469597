"""Scale-out from zero under Ray's own autoscaler (its fake multi-node provider, autoscaler v1 and v2): the CPU
cluster profile, with no other setting, on a head of 0 CPUs that the autoscaler grows by nodes of 1 CPU."""

from __future__ import annotations

import pyarrow.dataset as pads
import pytest

from tests import support
from tests.autoscaling import autoscaling_cluster
from tests.cluster import checkout_copy, poll, submit_job, wait_job

IMAGES = 600
MAX_WORKERS = 3
WORKER = {"CPU": 1, "memory": 3 * 2**30}  # a model actor (1.5 GB reserved) and decode tasks beside it
JOB_TIMEOUT_S = 900  # a loaded 2-core machine starts three nodes and their actors in minutes
RELEASE_TIMEOUT_S = 300  # idle for IDLE_TIMEOUT_MINUTES, then the autoscaler's next pass


def labeled_uris(output) -> list[str]:
    files = sorted(str(path) for path in output.rglob("*.parquet"))
    return pads.dataset(files, format="parquet").to_table(columns=["uri"]).column("uri").to_pylist()


@pytest.mark.cluster
@pytest.mark.parametrize("v2", [True, False], ids=["autoscaler-v2", "autoscaler-v1"])
def test_the_cluster_profile_scales_out_from_zero_and_back(v2, tmp_path, checkpoint_path):
    images = support.write_corpus(tmp_path / "images", IMAGES, seed=11, long_side=160)
    output = tmp_path / "labels"
    with autoscaling_cluster(WORKER, MAX_WORKERS, v2) as cluster:
        checkout = checkout_copy(cluster)
        submission_id = submit_job(
            cluster,
            checkout,
            *["--runtime-env", "conf/runtime_env.yaml", "--"],
            *["python", "jobs/label_images.py", "--config", "conf/cpu-cluster.yaml"],
            *support.job_argv(images[0].parent, output, checkpoint_path),
        )
        job, logs = wait_job(cluster, submission_id, JOB_TIMEOUT_S)
        print(logs)

        # The job asked for nodes, in one line, and said which joined; Ray's autoscaler lines stayed out.
        assert logs.count("asked the autoscaler for") == 1
        assert " joined: " in logs
        assert "(autoscaler" not in logs and "No available node types" not in logs
        workers = {node["node_id"] for node in cluster.state("nodes") if not node["is_head_node"]}
        assert len(workers) >= 2, "the autoscaler added fewer than two nodes"

        # Decode tasks and model actors ran on more than one of the nodes the autoscaler added.
        tasks = cluster.state("tasks", job_id=job["job_id"])
        decode_nodes = {task["node_id"] for task in tasks if "decode_batch" in task["name"] and task["node_id"]}
        actors = cluster.state("actors", job_id=job["job_id"])
        actor_nodes = {actor["node_id"] for actor in actors if "Predictor" in actor["class_name"] and actor["node_id"]}
        assert len(decode_nodes & workers) >= 2, f"decode tasks ran on {len(decode_nodes & workers)} worker node(s)"
        assert len(actor_nodes & workers) >= 2, f"model actors ran on {len(actor_nodes & workers)} worker node(s)"

        # Every image exactly once.
        uris = labeled_uris(output)
        assert sorted(uris) == sorted(str(path) for path in images)

        # The nodes go back once idle.
        def released():
            return not [node for node in cluster.state("nodes", state="ALIVE") if not node["is_head_node"]]

        poll(released, RELEASE_TIMEOUT_S, "the autoscaler to release its idle nodes", interval_s=2)
