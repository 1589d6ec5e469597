"""The Ray Data graph: input URIs -> read + decode CPU tasks -> model actors -> Parquet."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.autoscaler.sdk
from ray.data.exceptions import ExecutionTimeoutError

from mnasnet_batch.capacity import Capacity, NodeType, holds, types_of_config, types_of_profile
from mnasnet_batch.config import ConfigError, JobConfig
from mnasnet_batch.costs import StageCosts, split_cpus, spread_block, survivor_cpus, task_cpus
from mnasnet_batch.decode.preprocess import PreprocessSpec, decode_batch
from mnasnet_batch.inputs.kept import NO_COLUMNS
from mnasnet_batch.inputs.layout import MAX_INPUT_BLOCK, InputPlan, drop_done
from mnasnet_batch.parts import driver_node, write
from mnasnet_batch.progress import ProgressCounter, ProgressReporter, StallWatch, format_duration
from mnasnet_batch.storage import Storage

if TYPE_CHECKING:  # torch stays out of the graph's modules: Ray's tasks unpickle functions from them
    from mnasnet_batch.model.weights import Checkpoint
    from mnasnet_batch.outputs.lease import Fence

log = logging.getLogger(__name__)

# Share of a CPU-only cluster's CPUs that model actors reserve when the stages' costs are not known (no image of
# the sample decoded), or the actors decode too (``preprocess.decode_on=actor``): the model costs more per image
# than decoding ImageNet-sized JPEGs (docs/benchmarks.md), the corpus the job was first tuned for; reading gets the
# rest.
MODEL_CPU_SHARE = 0.75
# Model batches of decoded crops buffered per model actor, and the least object store memory Ray Data may use.
BUFFERED_BATCHES = 16
MIN_BUFFER_BYTES = 256 * 2**20

# Seconds between looks at the cluster's nodes while waiting for one that can hold a model actor.
NODE_POLL_S = 5.0
# Seconds between looks at the model actors (Ray's state API, through the dashboard) while the job runs: a pool's
# change is said within that, and the dashboard is asked little however large the cluster.
ACTOR_POLL_S = 5.0
# What the model actors' class name holds in Ray's state API: Ray Data names a pool's actors after the function
# they run ("MapWorker(MapBatches(Predictor))").
POOL_ACTOR_CLASS = "Predictor"
# Seconds after which a stall is raised again in the labeling thread, should it still be labeling: a stall that
# landed ends the labeling within parts.STOP_WRITE_WAIT_S (20 s) of writing its last parts.
STALL_REFIRE_S = 120.0


def from_uri_blocks(blocks: list[pa.Table]) -> ray.data.Dataset:
    """A dataset of exactly these blocks of URIs.

    ``from_blocks`` reads the blocks' metadata here; ``from_arrow`` runs a Ray task for it and waits for a worker
    to start and import Ray Data, which delays the job's start.
    """
    return ray.data.from_blocks(blocks)


def read(
    inputs: InputPlan, batch_size: int, block_images: int, decode_cpus: float, run_uri: str | None = None
) -> ray.data.Dataset:
    """The input's images as read, not decoded (``uri``, ``data``, ``error``), on CPU tasks.

    The driver listed the input (one recursive listing, not Ray's per-path expansion, which takes minutes on
    millions of paths) and hands it to the read tasks as blocks of URIs that its layout chose, so nothing but URIs
    is held by the driver and reading starts as soon as the dataset executes. The rows of ``inputs.skip``, written
    by an earlier attempt, are dropped after reading (``InputPlan.remaining`` left out what it could before).
    ``batch_size``: images a task reads, then decodes, at a time (``StageCosts.read_batch``); ``block_images``: the
    most image URIs one task gets (``StageCosts.block_images``); ``decode_cpus``: each
    task's CPUs (``decode_task_cpus``); ``run_uri``: the run being written, where layouts record the inputs they
    read to their end.
    """
    layout = inputs.layout
    dataset = from_uri_blocks(layout.blocks(inputs.uris, batch_size, block_images)).map_batches(
        layout.read,
        fn_kwargs={"batch_size": batch_size, "run_uri": run_uri},
        batch_size=None,
        batch_format="numpy",
        num_cpus=decode_cpus,
    )
    if inputs.skip is not None and len(inputs.skip):
        dataset = dataset.map_batches(
            drop_done,
            fn_kwargs={"done": inputs.skip},
            batch_size=None,
            batch_format="numpy",
            num_cpus=decode_cpus,
        )
    return dataset


def decode(dataset: ray.data.Dataset, spec: PreprocessSpec, decode_cpus: float) -> ray.data.Dataset:
    """Decoded images (``uri``, ``image``, ``error``), on the CPU tasks that read them.

    With ``preprocess.decode_on=actor`` there is no decode stage: the model actors decode (``Predictor``).
    """
    if spec.decode_on == "actor":
        return dataset
    # The same CPUs as reading, so Ray Data fuses the two into one task: the bytes never leave the worker.
    return dataset.map_batches(
        decode_batch,
        fn_kwargs={"spec": spec},
        batch_size=None,
        batch_format="numpy",
        num_cpus=decode_cpus,
    )


@dataclass(frozen=True)
class Labeling:
    """What ``run`` did: images labeled after the first batch and the seconds from the first batch to the last
    (``ProgressCounter.labeling_span``), and where each stage ran (for the run's record)."""

    images: int
    seconds: float
    stages: dict[str, object]


@dataclass(frozen=True)
class ActorPool:
    """The model actors' resources and the bounds Ray Data autoscales the pool between."""

    resources: dict[str, float]
    min_size: int
    max_size: int
    initial_size: int

    def strategy(self) -> ray.data.ActorPoolStrategy:
        return ray.data.ActorPoolStrategy(
            min_size=self.min_size, max_size=self.max_size, initial_size=self.initial_size
        )


def model_actor_pool(
    config: JobConfig,
    cluster: dict[str, float],
    node_cpus: Sequence[float] | None = None,
    model_share: float = MODEL_CPU_SHARE,
) -> ActorPool:
    """Chooses the model actors' resources and pool bounds from the configuration and the cluster.

    ``compute.actor_gpus`` GPUs per actor where the cluster has GPUs (or ``compute.device`` is ``gpu``, for GPU
    nodes that autoscale from zero), as many actors as the GPUs hold. Otherwise CPU actors share ``model_share`` of
    the cluster's CPUs (``costs.split_cpus``), up to 4 each. Values set in the configuration win over derived ones.

    Args:
        config: the job's configuration.
        cluster: the CPUs and GPUs the cluster may reach (``Capacity.planned``).
        node_cpus: the CPUs of each node of the cluster planned for (``Capacity.node_cpus``: alive, or that an
            autoscaler adds), which bound a derived actor's (an actor runs on one node, and a lost node's actors
            are restarted on the others); None when the cluster is one node.
        model_share: the model's share of an image's CPU time (``StageCosts.model_share``).
    """
    compute = config.compute
    gpus = int(cluster.get("GPU", 0))
    cpus = cluster.get("CPU", 0.0)
    if compute.device == "gpu" or (compute.device == "auto" and gpus):
        resources = {"num_gpus": compute.actor_gpus, "num_cpus": compute.actor_cpus or 1.0}
        derived_max = int(gpus / compute.actor_gpus)
    else:
        split = split_cpus([cpus] if node_cpus is None else node_cpus, model_share)
        # Never all of them: decode tasks need room beside the actors, or the pipeline cannot start.
        actor_cpus = compute.actor_cpus or min(split.actor_cpus, cpus - config.preprocess.num_cpus)
        if actor_cpus <= 0:
            raise ConfigError(f"the cluster has {cpus} CPUs: too few for a model actor beside a decode task")
        if compute.precision == "fp16":
            raise ConfigError("compute.precision: fp16 needs GPU actors and the cluster has no GPU; use bf16 or fp32")
        resources = {"num_cpus": actor_cpus}
        derived_max = split.actors if not compute.actor_cpus else int(model_share * cpus // actor_cpus)
    max_size = compute.max_actors or max(compute.min_actors, derived_max)
    # A derived maximum can be below a configured initial size (a smaller cluster than planned).
    initial_size = min(compute.initial_actors or compute.min_actors, max_size)
    return ActorPool(resources, compute.min_actors, max_size, initial_size)


def decode_task_cpus(
    config: JobConfig, cluster: dict[str, float], pool: ActorPool, node_cpus: Sequence[float] | None = None
) -> float:
    """Each decode (and read) task's CPUs: ``preprocess.num_cpus`` where set, else what the model actors leave,
    in tasks of about one CPU (Pillow decodes on one thread), as many as fill it (``costs.split_cpus``); beside
    derived CPU actors, no more than an actor leaves on the node left after a loss (``node_cpus``, as for
    ``model_actor_pool``)."""
    if config.preprocess.num_cpus:
        return config.preprocess.num_cpus
    free = free_cpus(cluster, pool)
    if free <= 0:  # GPU actors on nodes that are not there yet (an autoscaler adds them): one CPU a task
        return 1.0
    if "num_gpus" in pool.resources or config.compute.actor_cpus:
        return task_cpus(free)
    room = survivor_cpus([cluster.get("CPU", 1)] if node_cpus is None else node_cpus)
    return task_cpus(free, most=room - pool.resources["num_cpus"])


def free_cpus(cluster: dict[str, float], pool: ActorPool) -> float:
    """The cluster's CPUs that its largest pool of model actors leaves to reading and decoding."""
    return cluster.get("CPU", 0.0) - pool.max_size * pool.resources["num_cpus"]


def decode_slots(planned: dict[str, float], pool: ActorPool, decode_cpus: float) -> int:
    """Decode tasks the read blocks are cut for (``costs.spread_block``): those that run at a time beside the
    largest pool, and one per CPU the cluster may reach at least, so that nodes joining mid-run find blocks left
    to read (the model actors' CPUs decode too once the pool shrinks)."""
    return max(int(free_cpus(planned, pool) / decode_cpus + 1e-6), math.ceil(planned.get("CPU", 0.0)))


def alive_nodes() -> list[dict[str, float]]:
    """The total resources of each alive node of the cluster."""
    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def autoscaler_node_groups() -> list[tuple[dict[str, float], int, int]]:
    """The node groups of Ray's cluster config (resources, min and max count), where the autoscaler reported it to
    the GCS; none where it did not (Ray 2.60's own autoscalers, v1 and v2, do not) or it cannot be read."""
    import ray._private.state  # the cluster config has no public API; Ray Data reads it the same way

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception as exc:
        log.debug("Ray's cluster config could not be read: %s: %s", type(exc).__name__, exc)
        return []
    if config is None:
        return []
    return [(dict(group.resources), group.min_count, group.max_count) for group in config.node_group_configs]


def cluster_capacity(config: JobConfig, added: Capacity | None = None) -> Capacity:
    """The nodes alive and the node types an autoscaler can add: from Ray's cluster config, else from the profile
    (``compute.node_cpus``, ``compute.max_nodes``), else those of ``added`` (the type of a node the autoscaler added
    when asked, ``wait_for_first_node``)."""
    nodes = tuple(alive_nodes())
    types = types_of_config(autoscaler_node_groups(), nodes)
    if types:
        return Capacity(nodes, types, "Ray's cluster config")
    types = types_of_profile(config.compute.node_cpus, config.compute.max_nodes, nodes)
    if types:
        return Capacity(nodes, types, "compute.node_cpus and compute.max_nodes")
    if added is not None:
        return Capacity(nodes, added.types, added.types_from)
    return Capacity(nodes)


class AutoscalerRequest:
    """What the job asks Ray's autoscaler for (``ray.autoscaler.sdk.request_resources``). A request replaces the one
    before, and stays after the driver exits, holding its nodes up: ``withdraw`` ends it once the pool's least
    actors run (``PoolWatch``: until then, the nodes added for them hold nothing and an autoscaler would release
    them as idle), and ``run`` withdraws it however the job ends. Under autoscaler v2 a request that the node types
    cannot meet in full is refused whole, so the job asks only for what it waits for."""

    def __init__(self) -> None:
        self.standing = False

    def ask(self, bundles: list[dict[str, float]]) -> None:
        ray.autoscaler.sdk.request_resources(bundles=bundles)
        self.standing = True

    def withdraw(self) -> None:
        if self.standing:
            ray.autoscaler.sdk.request_resources(bundles=[])  # the pending actors and tasks ask for what they need
            self.standing = False


def wait_for_first_node(
    config: JobConfig, asking: AutoscalerRequest, sleep: Callable[[float], None] = time.sleep
) -> Capacity:
    """Where the cluster has no CPU for work (a head of 0 CPUs) and says nothing of what its autoscaler adds, asks
    the autoscaler for a node of one CPU and waits up to ``compute.node_wait_s`` for it; then plans for nodes like
    the largest that joined, as many as ``capacity.UNBOUNDED_NODES``. The request stands until the next one
    replaces it, so that the node is not released as idle meanwhile.

    Raises:
        ConfigError: no node with a CPU joined in time.
    """
    capacity = cluster_capacity(config)
    if capacity.can_grow or capacity.planned()["CPU"] > 0 or not config.compute.node_wait_s:
        return capacity
    log.info(
        "the cluster has no CPU for work yet and does not say which nodes its autoscaler adds: asked it for a node "
        "of 1 CPU, waiting up to %g s (compute.node_cpus and compute.max_nodes say it instead)",
        config.compute.node_wait_s,
    )
    deadline = time.monotonic() + config.compute.node_wait_s
    asking.ask([{"CPU": 1.0}])
    while capacity.planned()["CPU"] <= 0:
        if time.monotonic() >= deadline:
            raise ConfigError(
                f"no node with a CPU joined the cluster in {config.compute.node_wait_s:g} s (compute.node_wait_s): "
                "start worker nodes, or check the autoscaler's log (ray status)"
            )
        sleep(NODE_POLL_S)
        capacity = cluster_capacity(config)
    return Capacity(capacity.alive, (NodeType(capacity.largest_node_cpus()),), "the node its autoscaler added")


def actor_demand(config: JobConfig, pool: ActorPool) -> dict[str, float]:
    """One model actor's resources, by Ray's resource names."""
    demand = {"CPU": pool.resources["num_cpus"], "memory": config.compute.actor_memory_gb * 2**30}
    if "num_gpus" in pool.resources:
        demand["GPU"] = pool.resources["num_gpus"]
    return demand


def fits(demand: dict[str, float], node: dict[str, float]) -> bool:
    """Whether a node has, in all, the resources ``demand`` asks for."""
    return all(node.get(name, 0.0) >= amount for name, amount in demand.items())


def describe_resources(resources: dict[str, float]) -> str:
    """``2 CPU, 1 GPU, 1.5 GB memory``: resources as a person reads them."""
    parts = [f"{resources.get(name, 0.0):g} {name}" for name in ("CPU", "GPU") if name in resources]
    return ", ".join([*parts, f"{resources.get('memory', 0.0) / 2**30:.1f} GB memory"])


def wait_for_room(
    config: JobConfig,
    pool: ActorPool,
    nodes: Callable[[], list[dict[str, float]]],
    decode_cpus: float,
    asking: AutoscalerRequest,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Returns once the cluster's nodes can hold the pool's least model actors beside a decode task.

    Ray keeps a task or actor that no node can hold pending forever, so a job that asks for more than the cluster
    has would hang. Where nodes can be added (an autoscaler, ``compute.node_wait_s`` > 0), the autoscaler is asked
    for those actors and the decode task, in one line of the log, and the job waits up to that long; the request
    stands until the pool's least actors run (``AutoscalerRequest``); then Ray Data's own demand drives the cluster
    (it adds actors up to the pool's bound, and the autoscaler nodes for them), and idle nodes can go.

    Raises:
        ConfigError: the nodes could not hold the least actors beside a decode task in ``compute.node_wait_s``.
    """
    demand = actor_demand(config, pool)
    needed = [demand] * pool.min_size + [{"CPU": decode_cpus}]
    deadline = time.monotonic() + config.compute.node_wait_s
    requested = False
    current = nodes()  # one cluster query per poll
    while not holds(current, needed):
        if time.monotonic() >= deadline:
            raise ConfigError(no_room(config, pool, demand, decode_cpus, current))
        if not requested:
            log.info(
                "asked the autoscaler for %d model actor(s) of %s and a decode task of %g CPUs; waiting up to %g s "
                "for nodes that hold them",
                pool.min_size,
                describe_resources(demand),
                decode_cpus,
                config.compute.node_wait_s,
            )
            asking.ask(needed)
            requested = True
        sleep(NODE_POLL_S)
        current = nodes()


def no_room(
    config: JobConfig, pool: ActorPool, demand: dict[str, float], decode_cpus: float, nodes: list[dict[str, float]]
) -> str:
    """The message for a cluster whose nodes cannot hold the pool's least actors beside a decode task."""
    fix = (
        "lower compute.actor_cpus, compute.actor_gpus or compute.actor_memory_gb, use compute.device=cpu without GPU "
        "nodes, or set compute.node_wait_s for nodes an autoscaler adds"
    )
    waited = f" (waited {config.compute.node_wait_s:g} s, compute.node_wait_s)" if config.compute.node_wait_s else ""
    if not any(holds([node], [demand]) for node in nodes):
        largest = max(nodes, key=lambda node: (node.get("GPU", 0.0), node.get("CPU", 0.0)), default={})
        return (
            f"no node of the cluster can hold a model actor ({describe_resources(demand)}){waited}; the largest has "
            f"{describe_resources(largest)}: {fix}"
        )
    cpus = sum(node.get("CPU", 0.0) for node in nodes)
    return (
        f"the cluster's {len(nodes)} node(s) ({cpus:g} CPUs) cannot hold {pool.min_size} model actor(s) of "
        f"{describe_resources(demand)} beside a decode task of {decode_cpus:g} CPUs{waited}: lower "
        f"compute.min_actors, or {fix}"
    )


def plan(
    config: JobConfig, model_share: float, asking: AutoscalerRequest, nodes: NodeWatch
) -> tuple[dict[str, float], ActorPool, float]:
    """Plans the job for the cluster it may become (an autoscaler's node types, ``cluster_capacity``), not only the
    nodes alive now, and waits for the nodes its least actors need (``wait_for_room``), asking for them. Each node
    that joins meanwhile is said by ``nodes``, as during labeling.

    Returns:
        The CPUs and GPUs planned for, the model actors' pool, and each decode task's CPUs.
    """

    def wait(seconds: float) -> None:
        time.sleep(seconds)
        nodes.look()

    capacity = wait_for_first_node(config, asking, sleep=wait)
    planned = capacity.planned()
    log.info("the cluster: %s", capacity.describe())
    pool = model_actor_pool(config, planned, capacity.node_cpus(), model_share)
    decode_cpus = decode_task_cpus(config, planned, pool, capacity.node_cpus())
    wait_for_room(config, pool, alive_nodes, decode_cpus, asking, sleep=wait)
    return planned, pool, decode_cpus


def ray_data_log_directory() -> str:
    """Where Ray Data writes its log files on this node (``logs/ray-data`` of the Ray session)."""
    from ray.data._internal.logging import get_log_directory  # no public API names it

    return get_log_directory() or "logs/ray-data in the Ray session directory"


class CountProgress:
    """The model actors' ``on_batch``: sends each output table's image and error counts, and the CPU time its
    images took to decode and in the model, to a ``ProgressCounter``."""

    def __init__(self, counter: ray.actor.ActorHandle):
        self.counter = counter

    def __call__(self, table: pa.Table, decode_ms: float = 0.0, model_ms: float = 0.0) -> None:
        errors = pc.sum(pc.equal(table["status"], "error")).as_py() or 0
        # Fire and forget: the count is for people watching, not worth a round trip per batch, and a
        # counter that is gone (its driver died) must not fail a batch whose rows are fine.
        with contextlib.suppress(Exception):
            self.counter.add.remote(table.num_rows, errors, decode_ms, model_ms)


class NodeWatch:
    """Says once, in the job's log, when a node of the cluster is lost.

    Ray notices a lost node by its missed health checks, restarts the model actors that ran there on other nodes
    and retries their batches and the tasks that ran there; that is Ray's to do, and Ray's own messages about it
    stay out of the job's log (``cluster.keep_ray_chatter_out``). This line tells people what happened instead.
    """

    def __init__(self, nodes: list[dict]):
        self.alive = self.alive_nodes(nodes)
        self.cpus = {node["NodeID"]: node.get("Resources", {}).get("CPU", 0.0) for node in nodes if node.get("Alive")}

    @staticmethod
    def alive_nodes(nodes: list[dict]) -> dict[str, str]:
        """``{node id: its address}`` of the alive ones among ``ray.nodes()``."""
        return {node["NodeID"]: node.get("NodeManagerAddress", "?") for node in nodes if node.get("Alive")}

    def look(self) -> None:
        """``update`` on ``ray.nodes()`` now. The lines are for people: a failed look is tried again at the next."""
        with contextlib.suppress(Exception):
            self.update(ray.nodes())

    def update(self, nodes: list[dict]) -> list[str]:
        """Takes ``ray.nodes()`` now; logs and returns a line for each node alive before and not now. A node that
        joined (an autoscaler's) is said in a line of its own, and watched from then on."""
        alive = self.alive_nodes(nodes)
        lines = [
            f"node {node_id[:12]} ({address}) lost: its work is retried on the remaining nodes"
            for node_id, address in self.alive.items()
            if node_id not in alive
        ]
        for line in lines:
            log.warning("%s", line)
        self.cpus = {node["NodeID"]: node.get("Resources", {}).get("CPU", 0.0) for node in nodes if node.get("Alive")}
        for node_id in alive.keys() - self.alive.keys():
            log.info(
                "node %s (%s, %g CPUs) joined: %d nodes alive, %g CPUs",
                node_id[:12],
                alive[node_id],
                self.cpus.get(node_id, 0.0),
                len(alive),
                sum(self.cpus.values()),
            )
        self.alive = alive
        return lines


# The states of an actor that Ray has not started yet, or is starting again (Ray's state API).
STARTING_STATES = ("DEPENDENCIES_UNREADY", "PENDING_CREATION", "RESTARTING")


class PoolWatch:
    """Says in the job's log, in one line each, when the pool of model actors changes size, and when the job
    waits for actors to start (for a node to hold them, or their start)."""

    def __init__(self, demand: str, min_size: int = 1, started: Callable[[], None] | None = None):
        self.demand = demand  # one actor's resources, as people read them
        self.min_size = min_size
        self.started = started  # called once, when the pool's least actors run
        self.running = 0
        self.waiting = False

    def update(self, states: list[str]) -> list[str]:
        """Takes the states of the pool's actors now (Ray's state API); logs and returns the lines it says."""
        running = sum(state == "ALIVE" for state in states)
        starting = sum(state in STARTING_STATES for state in states)
        lines = []
        if running != self.running:
            lines.append(f"model actors: {running} running (was {self.running})")
        if starting and not self.waiting:
            lines.append(
                f"waiting for {starting} model actor(s) of {self.demand} to start: on a node with room, or on one "
                "the autoscaler adds"
            )
        self.running, self.waiting = running, bool(starting)
        for line in lines:
            log.info("%s", line)
        if self.started is not None and running >= self.min_size:
            self.started, started = None, self.started
            started()
        return lines


def pool_actor_states() -> list[str]:
    """The states of this job's pool actors (Ray Data's), by Ray's state API."""
    from ray.util.state import list_actors

    filters = [("job_id", "=", ray.get_runtime_context().get_job_id())]
    actors = list_actors(filters=filters, limit=10_000, raise_on_missing_output=False)
    return [actor.state for actor in actors if POOL_ACTOR_CLASS in actor.class_name]


class Stalled(RuntimeError):
    """No image was labeled for ``progress.stall_s``: the run ends, failed and resumable (``StallAlarm``)."""


class StallAlarm:
    """Ends the labeling in the thread that runs it once it has stalled.

    That thread waits in Ray Data's iterator for the next block, with no bound and no way in; so the progress
    thread raises ``Stalled`` in it (CPython's ``PyThreadState_SetAsyncExc``: the exception lands at the thread's
    next Python instruction, and the iterator looks at its queue every 10 ms). The run is then closed as for any
    other failure, its labeled rows written first.
    """

    def __init__(self) -> None:
        self.thread_id = threading.get_ident()  # the thread to end: the one that made the alarm
        self.lock = threading.Lock()
        self.armed = True
        self.line = ""  # the first stall's

    def fire(self, line: str) -> None:
        """Raises ``Stalled`` with ``line`` (the first one's, when fired again) in the watched thread, unless it
        has disarmed the alarm."""
        with self.lock:
            if self.armed:
                self.line = self.line or line

                class StalledHere(Stalled):  # raised by its type, with no arguments: the line is its default
                    def __init__(self, message: str = self.line):
                        super().__init__(message)

                StalledHere.__name__ = StalledHere.__qualname__ = Stalled.__name__
                set_async_exception(self.thread_id, StalledHere)

    def disarm(self) -> None:
        """Called by the watched thread once the labeling ended: a stall raised too late to land there is cleared."""
        with self.lock:
            if self.armed and self.line:
                set_async_exception(self.thread_id, None)
            self.armed = False

    def cause(self, exc: Exception, stall_s: float) -> Stalled | None:
        """The stall that ended the labeling with ``exc``, if one did: this alarm's, once fired (landed in Ray Data's
        code, it comes back with a ``SystemException`` as its cause, which the job's error line would name), or
        Ray Data's own guard's, the backstop (``configure_context``), whose lines are said in one."""
        if self.line:
            return Stalled(self.line)
        if isinstance(exc, ExecutionTimeoutError):
            return Stalled(f"Ray Data saw no progress for {format_duration(stall_s)} or more: {cluster_waits()}")
        return None


def set_async_exception(thread_id: int, exception: type[BaseException] | None) -> None:
    """Raises ``exception`` in thread ``thread_id`` at its next Python instruction; None clears one not raised yet."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exception) if exception is not None else None
    )


def resources_text(resources: dict[str, float]) -> str:
    """``{CPU: 1.5, memory: 1.5 GB}``: a task's or actor's resources as a person reads them."""
    shown = (
        f"{name}: {amount / 2**30:.1f} GB" if name == "memory" else f"{name}: {amount:g}"
        for name, amount in sorted(resources.items())
    )
    return "{" + ", ".join(shown) + "}"


def describe_waits(demands: list[tuple[dict[str, float], int]], nodes: list[tuple[str, dict, dict]]) -> str:
    """What tasks and actors wait for against what the nodes alive have free: ``demands``, each resources asked
    and how many ask for them; ``nodes``, each a node's name, its total resources and those free (Ray's names)."""
    names = sorted({name for bundle, _ in demands for name in bundle if name != "memory"} | {"CPU"})
    alive = "; ".join(
        f"{node} " + ", ".join(f"{name} {free.get(name, 0.0):g}/{total.get(name, 0.0):g} free" for name in names)
        for node, total, free in nodes
    )
    alive = f"nodes alive: {alive or 'none'}"
    if not demands:
        return f"no task or actor waits for resources: those running make no progress ({alive})"
    waits = ", ".join(f"{count} x {resources_text(bundle)}" for bundle, count in demands)
    return f"tasks or actors wait for {waits} ({alive})"


def cluster_waits() -> str:
    """``describe_waits`` of the cluster now, from the state the GCS keeps for autoscaling (what `ray status`
    shows); what went wrong asking, where it did."""
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status  # Ray's state API lists no resource demands

        status = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=30)
        demands = status.resource_demands.ray_task_actor_demand
        nodes = [*status.active_nodes, *status.idle_nodes]
        return describe_waits(
            [(request.bundle, request.count) for demand in demands for request in demand.bundles_by_count],
            [
                (f"{(n.node_id or '?')[:12]} ({n.ip_address})", n.total_resources(), n.available_resources())
                for n in nodes
            ],
        )
    except Exception as exc:
        return f"what waits is unknown: the cluster's state could not be read ({type(exc).__name__}: {exc})"


def look_at_cluster(nodes: NodeWatch, pool: PoolWatch | None, next_pool_look: float) -> float:
    """One look at the nodes (``NodeWatch``), and at the pool of model actors once ``next_pool_look`` (a
    ``time.monotonic``) has come; returns when to look at the pool next. Like progress, the lines are for people:
    a failed look is tried again at the next tick."""
    nodes.look()
    if pool is not None and time.monotonic() >= next_pool_look:
        next_pool_look = time.monotonic() + ACTOR_POLL_S
        with contextlib.suppress(Exception):
            pool.update(pool_actor_states())
    return next_pool_look


@contextlib.contextmanager
def reporting_progress(
    counter: ray.actor.ActorHandle,
    total: int,
    interval_s: float,
    nodes: NodeWatch,
    stall_s: float = math.inf,
    pool: PoolWatch | None = None,
) -> Iterator[None]:
    """Polls ``counter`` from a driver thread while the body runs: a bar at a terminal, else log lines; says
    when a node is lost or joins (``nodes``) and when the pool of model actors changes (``pool``, every
    ``ACTOR_POLL_S``); and ends the body with ``Stalled`` once no image was labeled for ``stall_s`` seconds
    (``StallWatch``), saying what waits."""
    reporter = ProgressReporter(total, interval_s, terminal=sys.stderr if sys.stderr.isatty() else None)
    stop = threading.Event()
    stalls, alarm = StallWatch(stall_s, total), StallAlarm()

    def poll() -> None:
        next_pool_look = 0.0
        done, unread = 0, None
        while not stop.wait(min(1.0, interval_s)):
            next_pool_look = look_at_cluster(nodes, pool, next_pool_look)
            try:
                done, errors = ray.get(counter.counts.remote(), timeout=30)
            except Exception as exc:
                # A slow or lost answer is asked again at the next tick, said once; meanwhile no image counts as
                # labeled, so that the stall bound holds even when progress cannot be read.
                if unread is None:
                    log.warning("progress could not be read, trying again: %s: %s", type(exc).__name__, exc)
                unread = exc
            else:
                unread = None
                reporter.update(done, errors)
            waited = stalls.stalled(done)
            if waited is not None:
                line = f"no image labeled for {format_duration(waited)} (progress.stall_s): {cluster_waits()}"
                # Again while the labeling goes on: code of Ray's may have swallowed it.
                while not stop.is_set():
                    alarm.fire(line)
                    stop.wait(STALL_REFIRE_S)
                return

    thread = threading.Thread(target=poll, name="progress", daemon=True)
    thread.start()
    try:
        yield
    except Exception as exc:
        stalled = alarm.cause(exc, stall_s)
        if stalled is None:
            raise
        log.debug("the stall ended the labeling as %s: %s", type(exc).__name__, exc)
        raise stalled from None  # the job's error line names the first of a chain (cli.root_cause): the stall
    finally:
        alarm.disarm()
        stop.set()
        thread.join()
        reporter.close()
        ray.kill(counter)


def configure_context(config: JobConfig, spec: PreprocessSpec, pool: ActorPool) -> None:
    """Sets Ray Data's context for this job: its logs, block sizes and buffering."""
    context = ray.data.DataContext.get_current()
    # Ray Data's per-operator bars flood the logs of `ray job submit`; ProgressReporter draws one bar
    # at a terminal and logs one line every progress.interval_s elsewhere.
    context.enable_progress_bars = False
    # Ray Data's console lines (execution plans, sink summaries, and each failed task's tracebacks, twice) stay in
    # its own log file of the Ray session: the job's log is for people, and the job reports a failure in one line.
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(logging.CRITICAL)
    log.info(
        "Ray Data's log, with the traceback of any failed task: %s; Ray's own messages (node health, retries) are in "
        "the folder above it, on each node",
        ray_data_log_directory(),
    )
    batch_bytes = config.compute.batch_size * spec.crop_size**2 * 3  # one model batch of uint8 crops
    # A decode task hands on each batch as soon as it is done. Left at Ray Data's 128 MiB, its yields gather into
    # blocks of hundreds of crops, and the model waited for each: decoding and the model took turns instead of
    # overlapping.
    context.target_max_block_size = batch_bytes
    # Decoding outruns the model on CPU; left alone, Ray Data buffers decoded crops up to half the object store,
    # so memory grows with the corpus. Enough for BUFFERED_BATCHES model batches per actor keeps every actor fed
    # and memory flat.
    context.execution_options.resource_limits = context.execution_options.resource_limits.copy(
        object_store_memory=max(MIN_BUFFER_BYTES, pool.max_size * BUFFERED_BATCHES * batch_bytes)
    )
    # Ray Data's own guard against a run that makes no progress (30 minutes by default) ends one whose blocks stopped
    # moving, in many lines. The job's watch (progress.stall_s, on labeled images) comes first and says what waits;
    # the guard is kept, later, for a stall that did not land (StallAlarm).
    context.execution_no_progress_timeout_s = config.progress.stall_s + STALL_REFIRE_S


def predict(
    dataset: ray.data.Dataset,
    config: JobConfig,
    checkpoint: Checkpoint,
    spec: PreprocessSpec,
    pool: ActorPool,
    counter: ray.actor.ActorHandle,
    kept_schema: pa.Schema = NO_COLUMNS,
) -> ray.data.Dataset:
    """Output rows (``postprocess.output_schema``: ``OUTPUT_SCHEMA`` and the input's ``kept_schema``) from the pool
    of model actors.

    With ONNX Runtime (``compute.engine``), the driver exports the model once and ships the graph to every actor,
    as it ships the checkpoint.
    """
    # The actors import torch; nothing else in the graph does.
    from mnasnet_batch.model.engine import choose_engine, export_onnx
    from mnasnet_batch.model.postprocess import output_schema
    from mnasnet_batch.model.predictor import Predictor

    try:
        output_schema(kept_schema)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    gpu_actors = "num_gpus" in pool.resources
    engine = choose_engine(config.compute.engine, gpu_actors, config.compute.precision)
    onnx_graph = export_onnx(checkpoint) if engine == "onnxruntime" else None
    log.info("the model runs on %s", {"torch": "torch", "onnxruntime": "ONNX Runtime"}[engine])
    # CPU actors run as many threads as the CPUs they hold, rounded up (1.2 CPUs -> 2 threads): a thread more than
    # the CPUs shares a core with a decode task, where one fewer would leave the actor's part of a core unused.
    num_threads = 0 if gpu_actors else max(1, math.ceil(pool.resources["num_cpus"] - 1e-6))
    return dataset.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "checkpoint": checkpoint,
            "top_k": config.model.top_k,
            "num_threads": num_threads,
            "on_batch": CountProgress(counter),
            "precision": config.compute.precision,
            "spec": spec,
            "micro_batch": config.compute.micro_batch,
            "onnx_graph": onnx_graph,
            "kept_schema": kept_schema,
        },
        compute=pool.strategy(),
        batch_size=config.compute.batch_size,
        batch_format="numpy",
        # The memory reservation keeps Ray from packing more actors on a node than fit, and, since decode
        # tasks reserve none, also keeps Ray Data from fusing decoding into the actors, where it would run
        # serially with inference instead of on the other CPUs.
        memory=config.compute.actor_memory_gb * 2**30,
        **pool.resources,
    )


def run(
    config: JobConfig,
    storage: Storage,
    checkpoint: Checkpoint,
    inputs: InputPlan,
    run_uri: str,
    costs: StageCosts | None = None,
    fence: Fence | None = None,
) -> Labeling:
    """Labels the planned input and writes its rows as Parquet parts under ``run_uri``; Ray must be initialised.

    ``fence``: each part is published only while the output's lease is still the job's (``outputs.lease.Fence``).

    Rows an earlier attempt labeled are not labeled again when ``inputs`` is what ``InputPlan.remaining`` left.
    ``costs``: what an image costs each stage (``costs.measure``), by which a cluster's CPUs are divided between
    them; None: by ``MODEL_CPU_SHARE``.

    Returns:
        The labeling rate and where the stages ran (``Labeling``).
    """
    spec = PreprocessSpec.for_config(config.model.name, config.preprocess)
    # Actors that decode too (decode_on=actor) leave the read tasks little to do, whatever decoding costs.
    share = costs.model_share if costs is not None and spec.decode_on == "workers" else MODEL_CPU_SHARE
    asking = AutoscalerRequest()
    # Watched from before the autoscaler is asked, so that every node it adds for this job is said as it joins.
    nodes = NodeWatch(ray.nodes())
    try:
        planned = plan(config, share, asking, nodes)
        return label(config, storage, checkpoint, inputs, run_uri, costs, spec, planned, asking, nodes, fence)
    finally:
        asking.withdraw()


def label(
    config: JobConfig,
    storage: Storage,
    checkpoint: Checkpoint,
    inputs: InputPlan,
    run_uri: str,
    costs: StageCosts | None,
    spec: PreprocessSpec,
    planned_pool: tuple[dict[str, float], ActorPool, float],
    asking: AutoscalerRequest,
    nodes: NodeWatch,
    fence: Fence | None = None,
) -> Labeling:
    """``run``'s labeling, on the plan (``plan``): withdraws the autoscaler request once the least actors run;
    ``nodes`` goes on saying which nodes join or are lost.

    Over 60 lines: the graph's stages, built in the order the data goes through them.
    """
    planned, pool, decode_cpus = planned_pool
    configure_context(config, spec, pool)
    if costs is not None:
        log.info("%s", costs.describe())
    log.info(
        "labeling %s (%s) with %s: %d-%d model actors (%d at start) with %s, %s tasks of %g CPUs",
        inputs.describe(),
        inputs.layout.name,
        config.model.name,
        pool.min_size,
        pool.max_size,
        pool.initial_size,
        pool.resources,
        "read" if spec.decode_on == "actor" else "decode",
        decode_cpus,
    )
    # No CPU: it only adds numbers, and must not take a slot from decoding or the model. On the driver's node: on
    # another, the counts would be lost with that node (the driver's node lost ends the job anyway).
    counter = ray.remote(num_cpus=0, scheduling_strategy=driver_node())(ProgressCounter).remote()
    batch_size, block_images = config.preprocess.batch_size, MAX_INPUT_BLOCK
    if costs is not None:
        batch_size, block_images = costs.read_batch(batch_size), costs.block_images(batch_size)
    slots = decode_slots(planned, pool, decode_cpus)
    block_images = min(block_images, spread_block(inputs.image_count, slots, batch_size))
    dataset = read(inputs, batch_size, block_images, decode_cpus, run_uri)
    dataset = decode(dataset, spec, decode_cpus)
    dataset = predict(dataset, config, checkpoint, spec, pool, counter, inputs.layout.kept)
    stages = {
        "decode_on": f"tasks of {decode_cpus:g} CPUs" if spec.decode_on == "workers" else "the model actors",
        "model_on": f"{pool.min_size}-{pool.max_size} actors of "
        + ", ".join(f"{amount:g} {name.removeprefix('num_').upper()[:-1]}" for name, amount in pool.resources.items()),
    }
    watch = PoolWatch(describe_resources(actor_demand(config, pool)), pool.min_size, asking.withdraw)
    stall_s = config.progress.stall_s
    with reporting_progress(counter, inputs.image_count, config.progress.interval_s, nodes, stall_s, watch):
        write(dataset, config, run_uri, storage, fence)
        try:
            asked = [counter.labeling_span.remote(), counter.stage_costs.remote()]
            (images, seconds), in_job = ray.get(asked, timeout=30)
        except Exception as exc:  # the rate is for people; the rows are written
            log.warning("the labeling rate is unknown: %s: %s", type(exc).__name__, exc)
            (images, seconds), in_job = (0, 0.0), None
    if in_job is not None:
        # What the stages took in the job itself, each on the CPUs it held: beside the sample's, where a mixed
        # corpus, other nodes' CPUs or threads contending for cores show.
        stages["in_job"] = in_job
        log.info(
            "in the job, an image took %.1f ms to decode and %.1f ms in the model (CPU time)",
            in_job["decode_ms"],
            in_job["model_ms"],
        )
    return Labeling(images, seconds, stages)
