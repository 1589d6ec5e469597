"""A Ray cluster under Ray's own autoscaler, whose fake node provider starts worker nodes as local processes.

Ray's ``AutoscalingCluster`` runs ``ray stop --force`` (every Ray on the machine) and reads a config file the wheel
does not ship, so the head is started here as ``tests/cluster.py`` starts its nodes: its own temp dir, ports, token
and process session, with the autoscaler's config written for it (``provider.type: external``, ``fake_nodes``).
The autoscaler runs in the head's monitor process and starts each worker node from there, so the head's session
holds them all: ``Cluster.stop`` ends every one.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

from tests.cluster import Cluster, free_port, isolated_environment, listening, poll

OBJECT_STORE_BYTES = 300 * 2**20  # each node's; Ray's least is 75 MiB, and 3 nodes share this machine's memory
# Seconds a worker node stays idle before the autoscaler releases it: short, so a test sees it go.
IDLE_TIMEOUT_MINUTES = 0.25


def autoscaler_config(gcs_port: int, temp_root: Path, worker: dict, max_workers: int, v2: bool) -> dict:
    """The autoscaler's config: a head type of no resources and one worker type (``worker``: its resources), min 0,
    at most ``max_workers``."""
    provider = {
        "type": "external",
        "module": "fake_nodes.FakeNodes",
        "gcs_address": f"127.0.0.1:{gcs_port}",
        "temp_root": str(temp_root),
        "head_node_id": FAKE_HEAD_NODE_ID,
        "launch_multiple": v2,  # v2 asks for several nodes in one call
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    }
    return {
        "cluster_name": f"mnb-{secrets.token_hex(3)}",
        "max_workers": max_workers,
        "upscaling_speed": 10.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        "provider": provider,
        "auth": {"ssh_user": "ray"},
        "docker": {},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
            "ray.worker.cpu": {
                "resources": {**worker, "object_store_memory": OBJECT_STORE_BYTES},
                "node_config": {},
                "min_workers": 0,
                "max_workers": max_workers,
            },
        },
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def start_head(cluster: Cluster, worker: dict, max_workers: int, v2: bool) -> None:
    """Starts the head of 0 CPUs with the autoscaler's config, and waits for its GCS and dashboard."""
    provider_dir = cluster.root / "provider"
    provider_dir.mkdir()
    shutil.copy(Path(__file__).with_name("fake_nodes.py"), provider_dir / "fake_nodes.py")
    (cluster.root / "nodes").mkdir()
    config = cluster.root / "autoscaler.yaml"
    settings = autoscaler_config(cluster.gcs_port, cluster.root / "nodes", worker, max_workers, v2)
    config.write_text(yaml.safe_dump(settings))
    env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "PYTHONPATH": str(provider_dir)}
    if v2:
        env.update(
            RAY_enable_autoscaler_v2="1",
            RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_NODE_ID,
            RAY_OVERRIDE_NODE_ID_FOR_TESTING=FAKE_HEAD_NODE_ID,
        )
    cluster.start_node(
        "head",
        "--head",
        *["--port", str(cluster.gcs_port), "--autoscaling-config", str(config)],
        *["--include-dashboard", "true", "--dashboard-host", "127.0.0.1"],
        *["--dashboard-port", str(cluster.dashboard_port)],
        *["--ray-client-server-port", str(free_port()), "--num-cpus", "0"],
        *["--object-store-memory", str(OBJECT_STORE_BYTES)],
        env=env,
    )
    poll(lambda: cluster.alive() and listening(cluster.gcs_port), 120, "the head's GCS")
    poll(lambda: cluster.alive() and cluster.get("/api/version", allow_errors=True), 120, "the head's dashboard")


@contextlib.contextmanager
def autoscaling_cluster(worker: dict, max_workers: int, v2: bool = True) -> Iterator[Cluster]:
    """A head of 0 CPUs whose autoscaler adds up to ``max_workers`` nodes of ``worker``'s resources, under a fresh
    short temp dir; every process of it stopped, and the dir removed, afterwards."""
    # Short: Ray's Unix socket paths under the temp dir must stay under 107 characters.
    root = Path(tempfile.mkdtemp(prefix="mnb-", dir="/tmp"))
    bin_dir = isolated_environment(root / "env")
    cluster = Cluster(root, bin_dir, secrets.token_hex(32))
    try:
        start_head(cluster, worker, max_workers, v2)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
