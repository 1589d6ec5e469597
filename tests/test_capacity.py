"""Planning for the cluster the job may have (an autoscaler's node types), asking for it and saying what it waits
for; the GPU profile's plan on a GPU group that scales from zero, with fake GPU resources (no GPU runs here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mnasnet_batch import job
from mnasnet_batch.capacity import (
    HEAD_RESOURCE,
    UNBOUNDED_NODES,
    Capacity,
    NodeType,
    holds,
    types_of_config,
    types_of_profile,
)
from mnasnet_batch.cluster import is_ray_chatter
from mnasnet_batch.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
GB = 2**30
HEAD = {"CPU": 0.0, "memory": 8 * GB, HEAD_RESOURCE: 1.0}
CPU_NODE = {"CPU": 1.0, "memory": 3 * GB}


def test_an_autoscaling_cluster_is_planned_for_the_nodes_it_may_add():
    capacity = Capacity((HEAD,), (NodeType(1.0, memory=3 * GB, max_count=3),), "Ray's cluster config")
    assert capacity.can_grow and capacity.planned() == {"CPU": 3.0, "GPU": 0.0}
    assert capacity.largest_node_cpus() == 1.0
    assert "may add nodes: 3 of 1 CPU, 3.0 GB memory (Ray's cluster config); planned for 3 CPU" in capacity.describe()
    # Nodes alive beyond the types' counts are planned too; a type without a bound counts UNBOUNDED_NODES.
    assert Capacity((HEAD, CPU_NODE) * 3, (NodeType(1.0, max_count=1),)).planned()["CPU"] == 3.0
    assert Capacity((HEAD,), (NodeType(16.0),)).planned()["CPU"] == 16.0 * UNBOUNDED_NODES
    # Without types, the cluster is planned as it is.
    assert Capacity((HEAD, CPU_NODE)).planned() == {"CPU": 1.0, "GPU": 0.0} and not Capacity((HEAD,)).can_grow


def test_node_types_come_from_rays_cluster_config_without_the_head_group():
    groups = [({"CPU": 8.0, "memory": 8 * GB}, 1, 1), ({"CPU": 1.0}, 0, 3), ({"GPU": 1.0, "CPU": 4.0}, 0, 0)]
    head = {"CPU": 8.0, HEAD_RESOURCE: 1.0}
    # The head's own group (one node of its shape) is counted among the nodes alive, not as a type; a group of at
    # most 0 nodes adds none.
    assert types_of_config(groups, [head]) == (NodeType(1.0, max_count=3),)
    assert types_of_config(groups, [])[0] == NodeType(8.0, memory=8 * GB, max_count=1)
    assert types_of_config([({"memory": GB}, 0, 2)]) == ()  # nothing to run work on


def test_the_profile_stands_in_where_ray_does_not_say():
    assert types_of_profile(0.0, 0, [HEAD, CPU_NODE]) == ()
    assert types_of_profile(16.0, 8, [HEAD]) == (NodeType(16.0, max_count=8),)
    # One of the two set: the other is that of the worker nodes alive (largest, count).
    assert types_of_profile(0.0, 4, [HEAD, CPU_NODE]) == (NodeType(1.0, max_count=4),)
    assert types_of_profile(4.0, 0, [HEAD, CPU_NODE, CPU_NODE]) == (NodeType(4.0, max_count=2),)
    assert types_of_profile(0.0, 4, [HEAD]) == ()  # nothing tells a node's CPUs


def test_holds_packs_demands_on_nodes():
    actor, decode = {"CPU": 0.75, "memory": 1.5 * GB}, {"CPU": 0.25}
    assert holds([CPU_NODE, CPU_NODE], [actor, actor, decode, decode])
    assert not holds([CPU_NODE], [actor, actor])
    assert not holds([HEAD], [decode])  # a head of 0 CPUs holds no decode task
    assert not holds([{"CPU": 1.0, "memory": GB}], [actor])  # memory counts


def test_autoscaler_events_are_chatter():
    no_room = "No available node types can fulfill cluster constraint: {'CPU': 0.25}*24, {'CPU': 1.0}*3"
    assert is_ray_chatter("autoscaler", no_room)
    assert is_ray_chatter("autoscaler", "Adding 3 node(s) of type ray.worker.cpu.")
    assert not is_ray_chatter("1234", no_room)  # a worker's own words


def test_the_pool_says_each_change_and_each_wait_once():
    watch = job.PoolWatch("1 CPU, 1.5 GB memory")
    assert watch.update([]) == []
    lines = watch.update(["PENDING_CREATION", "PENDING_CREATION"])
    assert lines == [
        "waiting for 2 model actor(s) of 1 CPU, 1.5 GB memory to start: on a node with room, or on one the "
        "autoscaler adds"
    ]
    assert watch.update(["ALIVE", "PENDING_CREATION"]) == ["model actors: 1 running (was 0)"]  # still the same wait
    assert watch.update(["ALIVE", "ALIVE"]) == ["model actors: 2 running (was 1)"]
    assert watch.update(["ALIVE", "ALIVE", "PENDING_CREATION"])[0].startswith("waiting for 1 model actor(s)")
    assert watch.update(["ALIVE", "ALIVE", "ALIVE", "DEAD"]) == ["model actors: 3 running (was 2)"]
    assert watch.update(["ALIVE", "DEAD", "DEAD", "DEAD"]) == ["model actors: 1 running (was 3)"]


def test_a_node_that_joins_is_said(caplog):
    node = {"NodeID": "c" * 56, "NodeManagerAddress": "10.0.0.3", "Alive": True, "Resources": {"CPU": 1.0}}
    watch = job.NodeWatch([])
    with caplog.at_level("INFO", logger="mnasnet_batch.job"):
        assert watch.update([node]) == []  # only lost nodes are returned
    assert caplog.messages == [f"node {'c' * 12} (10.0.0.3, 1 CPUs) joined: 1 nodes alive, 1 CPUs"]


class Autoscaler:
    """Stands in for ``ray.autoscaler.sdk.request_resources`` and the cluster's nodes: the nodes join after the
    job has asked for them and slept ``after`` times (a real autoscaler's fake provider: tests/test_autoscale.py)."""

    def __init__(self, before: list[dict], after: list[dict], sleeps: int = 2):
        self.requests: list[list[dict]] = []
        self.before, self.after, self.sleeps, self.slept = before, after, sleeps, 0

    def request_resources(self, bundles):
        self.requests.append(list(bundles))

    def sleep(self, seconds):
        self.slept += 1

    def nodes(self):
        return self.after if self.requests and self.slept >= self.sleeps else self.before


def cpu_plan(**compute):
    config = load_config(ROOT / "conf" / "cpu-cluster.yaml", overrides=[{"compute": compute}] if compute else ())
    capacity = Capacity((HEAD,), (NodeType(1.0, memory=3 * GB, max_count=3),), "Ray's cluster config")
    pool = job.model_actor_pool(config, capacity.planned(), capacity.node_cpus(), 0.75)
    return config, capacity, pool


def test_the_job_asks_for_what_it_waits_for_once_and_withdraws_it_when_the_actors_run(monkeypatch):
    config, _capacity, pool = cpu_plan(actor_cpus=0.75)
    scaler = Autoscaler([HEAD], [HEAD, CPU_NODE, CPU_NODE])
    monkeypatch.setattr(job.ray.autoscaler.sdk, "request_resources", scaler.request_resources)
    asking = job.AutoscalerRequest()
    job.wait_for_room(config, pool, scaler.nodes, 0.25, asking, sleep=scaler.sleep)
    # Only what it waits for: under autoscaler v2, a request the node types cannot meet in full is refused whole.
    assert scaler.requests == [[{"CPU": 0.75, "memory": 1.5 * GB}] * pool.min_size + [{"CPU": 0.25}]]
    # It stands until the pool's least actors run (the nodes added for them would be idle until then), once.
    watch = job.PoolWatch("0.75 CPU", pool.min_size, asking.withdraw)
    watch.update(["ALIVE", "PENDING_CREATION"])
    assert asking.standing and len(scaler.requests) == 1
    watch.update(["ALIVE", "ALIVE"])
    watch.update(["ALIVE", "ALIVE", "ALIVE"])
    assert not asking.standing and scaler.requests[1:] == [[]]


def test_a_cluster_that_never_has_room_ends_the_wait_with_one_message(monkeypatch):
    config, _capacity, pool = cpu_plan(actor_cpus=0.75, node_wait_s=0.0)
    with pytest.raises(ConfigError, match=r"no node of the cluster can hold a model actor \(0.75 CPU, 1.5 GB memory"):
        job.wait_for_room(config, pool, lambda: [HEAD], 0.25, job.AutoscalerRequest())
    with pytest.raises(ConfigError, match="cannot hold 2 model actor"):
        job.wait_for_room(config, pool, lambda: [HEAD, CPU_NODE], 0.25, job.AutoscalerRequest())


def test_the_cpu_profile_plans_the_pool_and_blocks_for_the_nodes_it_may_reach():
    config, capacity, pool = cpu_plan()
    # 3 nodes of 1 CPU: actors of at most a node's CPUs, more than one, growing with the nodes that join.
    assert pool.resources["num_cpus"] <= 1.0 and pool.max_size >= 2 and pool.min_size == 2
    decode_cpus = job.decode_task_cpus(config, capacity.planned(), pool, capacity.node_cpus())
    assert 0 < decode_cpus <= 1.0
    # Read blocks are cut for a decode task or more per CPU the cluster may reach, not for the head's none.
    assert job.decode_slots(capacity.planned(), pool, decode_cpus) >= 3
    assert config.compute.node_wait_s > 0


def test_a_first_node_is_asked_for_where_the_cluster_says_nothing(monkeypatch):
    config = load_config(ROOT / "conf" / "cpu-cluster.yaml")
    scaler = Autoscaler([HEAD], [HEAD, CPU_NODE], sleeps=1)
    monkeypatch.setattr(job.ray.autoscaler.sdk, "request_resources", scaler.request_resources)
    monkeypatch.setattr(job, "alive_nodes", scaler.nodes)
    monkeypatch.setattr(job, "autoscaler_node_groups", lambda: [])
    asking = job.AutoscalerRequest()
    capacity = job.wait_for_first_node(config, asking, sleep=scaler.sleep)
    # The request stands until the plan's replaces it: the node is not released as idle meanwhile.
    assert scaler.requests == [[{"CPU": 1.0}]] and asking.standing
    assert capacity.types == (NodeType(1.0),) and capacity.planned()["CPU"] == UNBOUNDED_NODES


def test_the_gpu_profile_asks_for_gpu_nodes_for_the_actors_and_cpu_nodes_for_decoding(monkeypatch):
    """conf/gpu-cluster.yaml on conf/kuberay/raycluster.yaml's groups (a CPU group of 16-CPU nodes, min 1, and a
    GPU group of 4 CPUs and a GPU each, min 0 max 4), with fake GPU resources: the plan and the requests."""
    config = load_config(ROOT / "conf" / "gpu-cluster.yaml")
    groups = [({"CPU": 16.0, "memory": 32 * GB}, 1, 8), ({"CPU": 4.0, "GPU": 1.0, "memory": 16 * GB}, 0, 4)]
    cpu_node = {"CPU": 16.0, "memory": 32 * GB}
    gpu_node = {"CPU": 4.0, "GPU": 1.0, "memory": 16 * GB}
    capacity = Capacity((HEAD, cpu_node), types_of_config(groups, [HEAD, cpu_node]), "Ray's cluster config")
    assert capacity.planned() == {"CPU": 16.0 * 8 + 4.0 * 4, "GPU": 4.0}
    pool = job.model_actor_pool(config, capacity.planned(), capacity.node_cpus(), 0.75)
    assert pool.resources == {"num_gpus": 1.0, "num_cpus": 2.0} and (pool.min_size, pool.max_size) == (1, 4)
    decode_cpus = job.decode_task_cpus(config, capacity.planned(), pool, capacity.node_cpus())
    assert decode_cpus == 1.0
    scaler = Autoscaler([HEAD, cpu_node], [HEAD, cpu_node, gpu_node])
    monkeypatch.setattr(job.ray.autoscaler.sdk, "request_resources", scaler.request_resources)
    job.wait_for_room(config, pool, scaler.nodes, decode_cpus, job.AutoscalerRequest(), sleep=scaler.sleep)
    (asked,) = scaler.requests
    # The actors ask for a GPU each; decode tasks for CPUs only, which Ray keeps off GPU nodes while CPU nodes have
    # room (a GPU actor's run is what only a real GPU node shows: tests/test_cluster.py, docs/operations.md).
    assert [bundle for bundle in asked if "GPU" in bundle] == [{"CPU": 2.0, "memory": 4 * GB, "GPU": 1.0}]
    assert [bundle for bundle in asked if "GPU" not in bundle] == [{"CPU": 1.0}]
    # Without Ray's cluster config, the profile's stand-in is the CPU group of conf/kuberay/raycluster.yaml.
    stand_in = types_of_profile(config.compute.node_cpus, config.compute.max_nodes, [HEAD])
    assert stand_in == (NodeType(16.0, max_count=8),)


def test_the_planned_nodes_are_the_head_and_the_most_of_each_type():
    capacity = Capacity((HEAD, CPU_NODE), (NodeType(1.0, max_count=3), NodeType(4.0, gpus=1.0, max_count=2)))
    assert capacity.node_cpus() == [0.0, 1.0, 1.0, 1.0, 4.0, 4.0]
    assert Capacity((HEAD, CPU_NODE, {"CPU": 2.0})).node_cpus() == [0.0, 1.0, 2.0]  # no types: as alive
    # Workers alive beyond the types' counts stay in the plan.
    assert Capacity((HEAD, CPU_NODE, CPU_NODE), (NodeType(1.0, max_count=1),)).node_cpus() == [0.0, 1.0, 1.0]
