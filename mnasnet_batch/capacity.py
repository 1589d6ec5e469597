"""The cluster the job plans for: the nodes alive now, and the node types an autoscaler can add to them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# A node type without a largest count (-1 in Ray's cluster config) is planned as this many nodes: the plan sizes
# the actor pool's bound and the read blocks from it, and a cluster that grows further still runs the job.
UNBOUNDED_NODES = 8
# Ray marks its head node with this resource.
HEAD_RESOURCE = "node:__internal_head__"


@dataclass(frozen=True)
class NodeType:
    """What one node of a type holds, and how many of it the cluster may have."""

    cpus: float
    gpus: float = 0.0
    memory: float = 0.0  # bytes; 0: not said (Ray then counts the node's own)
    max_count: int = -1  # the most nodes of the type; -1: no bound

    def resources(self) -> dict[str, float]:
        """The type's resources by Ray's names (those it has)."""
        named = {"CPU": self.cpus, "GPU": self.gpus, "memory": self.memory}
        return {name: amount for name, amount in named.items() if amount}


@dataclass(frozen=True)
class Capacity:
    """The cluster's nodes alive (each one's total resources) and the node types an autoscaler can add (none: the
    cluster is as it is), and where those types were read (``types_from``)."""

    alive: tuple[Mapping[str, float], ...]
    types: tuple[NodeType, ...] = ()
    types_from: str = ""

    @property
    def can_grow(self) -> bool:
        return bool(self.types)

    def planned(self) -> dict[str, float]:
        """The CPUs and GPUs the cluster may reach: its head's and, with node types, the most of each type; without
        them, the nodes alive."""
        alive = _total(self.alive)
        if not self.types:
            return alive
        head = _total(node for node in self.alive if HEAD_RESOURCE in node)
        planned = {
            name: head.get(name, 0.0) + sum(_count(kind) * kind.resources().get(name, 0.0) for kind in self.types)
            for name in ("CPU", "GPU")
        }
        # Nodes alive beyond what the types count (workers started by hand beside an autoscaling group).
        return {name: max(amount, alive.get(name, 0.0)) for name, amount in planned.items()}

    def node_cpus(self) -> list[float]:
        """The CPUs of each node of the cluster planned for: the head's, and the most nodes of each type (without
        types, each node alive)."""
        if not self.types:
            return [node.get("CPU", 0.0) for node in self.alive]
        heads = [node.get("CPU", 0.0) for node in self.alive if HEAD_RESOURCE in node]
        planned = heads + [kind.cpus for kind in self.types for _ in range(_count(kind))]
        workers = sorted((node.get("CPU", 0.0) for node in self.alive if HEAD_RESOURCE not in node), reverse=True)
        # Nodes alive beyond what the types count (workers started by hand beside an autoscaling group).
        return planned + workers[len(planned) - len(heads) :]

    def largest_node_cpus(self) -> float:
        """The CPUs of the largest CPU node alive or that can be added: a model actor runs on one node."""
        return max([node.get("CPU", 0.0) for node in self.alive] + [kind.cpus for kind in self.types], default=0.0)

    def describe(self) -> str:
        """``3 nodes alive (2 CPU); may add 3 nodes of 1 CPU, 4 GB memory (Ray's autoscaler)`` for the log."""
        alive = _total(self.alive)
        line = f"{len(self.alive)} node(s) alive ({_describe(alive)})"
        if not self.types:
            return line + "; the cluster is planned as it is"
        kinds = ", ".join(
            f"{'any number' if kind.max_count < 0 else kind.max_count} of {_describe(kind.resources())}"
            for kind in self.types
        )
        return f"{line}; may add nodes: {kinds} ({self.types_from}); planned for {_describe(self.planned())}"


def _count(kind: NodeType) -> int:
    return UNBOUNDED_NODES if kind.max_count < 0 else kind.max_count


def _total(nodes: Iterable[Mapping[str, float]]) -> dict[str, float]:
    total = {"CPU": 0.0, "GPU": 0.0}
    for node in nodes:
        for name in total:
            total[name] += node.get(name, 0.0)
    return total


def _describe(resources: Mapping[str, float]) -> str:
    parts = [f"{resources.get(name, 0.0):g} {name}" for name in ("CPU", "GPU") if resources.get(name)]
    if resources.get("memory"):
        parts.append(f"{resources['memory'] / 2**30:.1f} GB memory")
    return ", ".join(parts) or "0 CPU"


def types_of_config(
    groups: Iterable[tuple[Mapping[str, float], int, int]], alive: Iterable[Mapping[str, float]] = ()
) -> tuple[NodeType, ...]:
    """The worker node types of Ray's cluster config (its ``node_group_configs``: resources, min and max count),
    leaving out those that cannot add a node (max 0) or hold no CPU or GPU, and the head's own group (at most one
    node, of the head's CPUs and GPUs), whose node is counted among those alive."""
    heads = [node for node in alive if HEAD_RESOURCE in node]
    kinds = []
    for resources, _min_count, max_count in groups:
        kind = NodeType(
            resources.get("CPU", 0.0), resources.get("GPU", 0.0), resources.get("memory", 0.0), int(max_count)
        )
        is_head = kind.max_count == 1 and any(
            (head.get("CPU", 0.0), head.get("GPU", 0.0)) == (kind.cpus, kind.gpus) for head in heads
        )
        if kind.max_count != 0 and (kind.cpus or kind.gpus) and not is_head:
            kinds.append(kind)
    return tuple(kinds)


def types_of_profile(node_cpus: float, max_nodes: int, alive: Iterable[Mapping[str, float]]) -> tuple[NodeType, ...]:
    """The node type the profile says an autoscaler adds (``compute.node_cpus``, ``compute.max_nodes``); where only
    one is set, the other is that of the worker nodes alive (their largest node, their count). None where neither
    is set, or where nothing tells the node's CPUs."""
    if not node_cpus and not max_nodes:
        return ()
    workers = [node for node in alive if HEAD_RESOURCE not in node and node.get("CPU", 0.0) > 0]
    cpus = node_cpus or max((node.get("CPU", 0.0) for node in workers), default=0.0)
    if not cpus:
        return ()
    return (NodeType(cpus, max_count=max_nodes or len(workers)),)


def holds(nodes: Iterable[Mapping[str, float]], demands: Iterable[Mapping[str, float]]) -> bool:
    """Whether ``nodes`` (each one's total resources) can hold every one of ``demands`` at once, packed largest
    first on the first node with room (Ray's scheduler spreads them, so this is the bound, not where they go)."""
    free = [dict(node) for node in nodes]
    for demand in sorted(demands, key=lambda d: (d.get("GPU", 0.0), d.get("CPU", 0.0)), reverse=True):
        node = next((node for node in free if all(node.get(k, 0.0) >= v - 1e-9 for k, v in demand.items())), None)
        if node is None:
            return False
        for name, amount in demand.items():
            node[name] = node.get(name, 0.0) - amount
    return True
