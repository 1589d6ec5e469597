"""What an image costs each stage (decoding, the model), measured on a sample of the input, and the CPU split of a
cluster without GPUs that follows from it: each stage gets CPUs in proportion to its cost, so neither waits."""

from __future__ import annotations

import dataclasses
import logging
import math
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mnasnet_batch.decode.preprocess import PreprocessSpec, decode_batch
from mnasnet_batch.inputs.layout import READ_BATCH_BYTES

if TYPE_CHECKING:  # the model's modules import torch, which read and decode tasks never load
    from mnasnet_batch.config import JobConfig
    from mnasnet_batch.inputs.layout import InputPlan
    from mnasnet_batch.model.weights import Checkpoint

log = logging.getLogger(__name__)

# Images read and decoded to measure decoding: enough to average a mixed corpus's sizes, few enough that the driver
# reads 12 phone photos (~40 MB) once; they are spread over the listing where it is held.
SAMPLE_IMAGES = 12
# CPU seconds the driver decodes the sample for at most (it stops after the image that passes it, having decoded
# at least two): a 12 MP JPEG costs ~0.13 s, so a sample of phone photos stops near 8 images.
SAMPLE_DECODE_S = 1.0
# Seconds of decoding a read task's block of image URIs holds at most: long enough that the driver puts few blocks
# into the object store, short enough that 10^5 phone photos (~0.13 s each) make enough tasks for every CPU of a
# cluster, and the last tasks of a run end close together.
TASK_DECODE_S = 10.0
# Read tasks at least for each decode task that runs at a time: the blocks of a run double in size, and with fewer,
# its last, largest task decodes on one CPU while the others have nothing left to do.
TASKS_PER_SLOT = 4
# CPUs decoding keeps however cheap it is: reading goes on beside the model however costly that is.
MIN_DECODE_CPUS = 0.25
# Model actors of one size that a node may hold, as the split tries sizes: a lost node's actors are restarted on the
# nodes left, and smaller actors pack those nodes' CPUs more closely (4 actors of 3.75 CPUs on 16-CPU nodes leave
# room for a decode task beside them, where 3 of 4 CPUs are the most that do); more, and small actors cost an
# actor's memory each for little more of the model's share.
ACTORS_PER_NODE = 4
# Ray counts a resource in steps of 1e-4.
UNITS_PER_CPU = 10_000
# Crops the model is timed on, once after a warm-up: its cost per image hardly depends on the content.
MODEL_SAMPLE = 16


@dataclass(frozen=True)
class StageCosts:
    """CPU milliseconds per image of each stage on one thread, and where they were measured."""

    decode_ms: float  # decoding and preprocessing (Pillow), on the sample's images that decoded
    model_ms: float  # the model's forward pass and top-k, on crops
    images: int  # images of the sample that decoded
    image_bytes: int  # their mean encoded size
    engine: str  # what ran the model: torch or onnxruntime
    host: str  # the machine that measured them (the driver's)

    @property
    def model_share(self) -> float:
        """The model's share of an image's CPU time: the share of the CPUs its actors should hold."""
        return self.model_ms / (self.model_ms + self.decode_ms)

    def read_batch(self, batch_size: int) -> int:
        """Images a read task hands to decoding at a time: ``batch_size``, fewer where that many would hold more
        than ``layout.READ_BATCH_BYTES`` of encoded images (32 phone photos are ~100 MB)."""
        return max(1, min(batch_size, READ_BATCH_BYTES // max(1, self.image_bytes)))

    def block_images(self, batch_size: int) -> int:
        """The most image URIs a read task gets (``ImageURILayout.blocks``): ``TASK_DECODE_S`` of decoding, at
        least one batch."""
        return max(batch_size, int(TASK_DECODE_S * 1000 / max(self.decode_ms, 1e-3)))

    def describe(self) -> str:
        return (
            f"an image costs {self.decode_ms:.1f} ms to decode and {self.model_ms:.1f} ms in the model "
            f"({self.engine}) on one core ({self.images} images of {self.image_bytes / 2**20:.1f} MB on average, "
            f"sampled on {self.host})"
        )

    def as_record(self) -> dict[str, object]:
        record = dataclasses.asdict(self)
        return record | {"decode_ms": round(self.decode_ms, 2), "model_ms": round(self.model_ms, 2)}


def decode_ms(batch: dict[str, np.ndarray], spec: PreprocessSpec) -> tuple[float, int, int]:
    """CPU milliseconds per image of ``decode_batch`` on this thread, over the images of ``batch`` (as read) that
    decode, one at a time until ``SAMPLE_DECODE_S`` is spent; how many that was (0: none decoded), and their mean
    encoded size."""
    spent, decoded, size = 0.0, 0, 0
    for i in range(len(batch["uri"])):
        if spent >= SAMPLE_DECODE_S and decoded >= 2:
            break
        one = {name: values[i : i + 1] for name, values in batch.items()}
        start = time.thread_time()
        result = decode_batch(one, spec)
        if not result["error"][0]:
            spent += time.thread_time() - start
            decoded += 1
            size += len(one["data"][0])
    if not decoded:
        return 0.0, 0, 0
    return spent * 1000 / decoded, decoded, size // decoded


def measure(inputs: InputPlan, spec: PreprocessSpec, model_ms: float, engine: str) -> StageCosts | None:
    """The stage costs of ``inputs``: decoding measured on its ``Layout.sample``, beside the
    model's ``model_ms`` (``predictor.model_ms``). None when no image of the sample decodes, or it cannot be read:
    the labeling reports those images' errors itself."""
    try:
        sample = inputs.layout.sample(inputs.uris, SAMPLE_IMAGES)
    except Exception as exc:
        log.info("the input's sample could not be read (%s: %s)", type(exc).__name__, exc)
        return None
    per_image, decoded, size = decode_ms(sample, spec)
    if not decoded:
        return None
    return StageCosts(per_image, model_ms, decoded, size, engine, socket.gethostname())


def job_costs(config: JobConfig, checkpoint: Checkpoint, inputs: InputPlan) -> StageCosts | None:
    """What an image of ``inputs`` costs decoding and the model on one core (``measure``) with the job's settings,
    the model on the engine the driver prepared for its actors; None where the sample tells nothing."""
    from mnasnet_batch.model.engine import export_ahead
    from mnasnet_batch.model.predictor import model_ms

    spec = PreprocessSpec.for_config(config.model.name, config.preprocess)
    graph = export_ahead(config.compute, checkpoint)  # the graph exported before, if any
    per_image = model_ms(checkpoint, graph, spec.crop_size, MODEL_SAMPLE)
    costs = measure(inputs, spec, per_image, "onnxruntime" if graph is not None else "torch")
    if costs is None:
        log.info("no image of the input's sample decoded: its CPUs are divided as for ImageNet-sized JPEGs")
    return costs


def spread_block(images: int, slots: int, batch_size: int) -> int:
    """The most images a read task gets so that ``images`` make ``TASKS_PER_SLOT`` tasks or more for each of the
    ``slots`` decode tasks that run at a time (at least one batch); 0 images (not known before reading): no bound."""
    if not images:
        return sys.maxsize
    return max(batch_size, -(-images // (TASKS_PER_SLOT * max(1, slots))))


@dataclass(frozen=True)
class CPUSplit:
    """The CPUs of a cluster without GPUs for the model actors, and each decode task's."""

    actor_cpus: float  # each model actor's
    actors: int  # how many fit in the model's share, and still after a node is lost
    decode_cpus: float  # each decode task's


def split_cpus(node_cpus: Sequence[float], model_share: float) -> CPUSplit:
    """Divides the CPUs of a cluster's nodes (``node_cpus``, one entry a node) between the model and decoding by
    the model's share of an image's CPU time, so that the job goes on after any one node is lost.

    The model's share becomes actors of up to 4 CPUs (MnasNet's small convolutions gain little from more threads),
    on one node each; the rest is decode tasks of about one CPU each (Pillow decodes on one thread), as many as
    fill it: 1.92 CPUs are two tasks of 0.96, and 0.6 one task of 0.6.

    Ray restarts a lost node's actors on the nodes left, where they hold their CPUs for the rest of the run. So an
    actor leaves room for a decode task on the largest node left after any loss (``survivor_cpus``), and there are
    no more actors than the nodes left hold with room for a decode task beside them, however Ray places them
    (``actors_beside_decoding``): otherwise the actors would take every CPU and the decode tasks wait forever.
    Of the actor sizes that fill that node by 1 to ``ACTORS_PER_NODE`` actors, the one that gives the model the
    most CPUs is chosen (the first tried on a tie: the larger, fewer actors to start and feed).
    """
    cpus = sum(node_cpus)
    model = min(cpus * model_share, cpus - MIN_DECODE_CPUS)
    if model <= 0:  # too few CPUs for a model actor beside a decode task
        return CPUSplit(0.0, 0, task_cpus(cpus))
    room = survivor_cpus(node_cpus)
    decode = task_cpus(cpus - model)
    if room - decode < 1 / UNITS_PER_CPU:  # nodes of a CPU or less: an actor and a decode task share one
        decode = room / 2
    best = CPUSplit(0.0, 0, 0.0)
    # Actors that fill the node left by 1 to ACTORS_PER_NODE, beside a decode task of the planned size, of a CPU,
    # or of decoding's share of that node.
    besides = (decode, 1.0, max(MIN_DECODE_CPUS, room * (1 - model_share)))
    sizes = [(room - beside) / per_node for per_node in range(1, ACTORS_PER_NODE + 1) for beside in besides]
    for size in filter(lambda size: size > 0, sizes):
        actor_cpus = max(1 / UNITS_PER_CPU, floor_cpus(min(4.0, model, size)))
        # A decode task asks for at most a CPU, and for no more than the actor leaves on that node (task_cpus).
        fit = actors_beside_decoding(node_cpus, actor_cpus, min(1.0, room - actor_cpus))
        actors = max(1, min(math.floor(model / actor_cpus + 1e-9), fit))
        if actors * actor_cpus > best.actors * best.actor_cpus + 1e-9:
            best = CPUSplit(actor_cpus, actors, task_cpus(cpus - actors * actor_cpus, most=room - actor_cpus))
    return best


def survivor_cpus(node_cpus: Sequence[float]) -> float:
    """The CPUs of the largest node left after any one node with CPUs is lost: the second largest; a cluster with
    one such node (a head with no CPUs and one worker, a laptop) has nothing left after its loss, and plans for
    that node."""
    with_cpus = sorted((cpus for cpus in node_cpus if cpus > 0), reverse=True)
    return (with_cpus[1] if len(with_cpus) > 1 else with_cpus[0]) if with_cpus else 0.0


def actors_beside_decoding(node_cpus: Sequence[float], actor_cpus: float, decode_cpus: float) -> int:
    """The most actors of ``actor_cpus`` that leave a node with room for a decode task of ``decode_cpus``
    wherever Ray places them, on the nodes left after any one node (with CPUs) is lost; on all of them when only
    one node has CPUs.

    A node of ``c`` CPUs holding more than ``(c - decode_cpus) / actor_cpus`` actors has no such room; if every
    node did, the actors would number more than the sum of those quotients. So that sum, less the largest (the
    node lost), is the bound.
    """
    with_cpus = [cpus for cpus in node_cpus if cpus > 0]
    beside = [max(0, math.floor((cpus - decode_cpus) / actor_cpus + 1e-9)) for cpus in with_cpus]
    return sum(beside) - (max(beside) if len(beside) > 1 else 0)


def task_cpus(free: float, most: float = 1.0) -> float:
    """Each decode task's CPUs in ``free`` CPUs: about one each (at most ``most``), as many tasks as fill them (0
    where none is free)."""
    return floor_cpus(min(1.0, most, free / max(1, round(free)))) if free > 0 else 0.0


def floor_cpus(cpus: float) -> float:
    """``cpus`` rounded down to Ray's unit of a resource (1e-4). Rounded up, two tasks of half of 1.9165 CPUs
    (0.95825 -> 0.9583) asked for more than the 1.9165 there are: Ray Data then ran one where two fit."""
    return math.floor(cpus * UNITS_PER_CPU + 1e-6) / UNITS_PER_CPU
