"""The split of CPUs between decoding and the model, from what an image of the input costs each."""

import dataclasses
import io
import itertools

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from mnasnet_batch.config import InputConfig, StorageConfig
from mnasnet_batch.costs import (
    TASK_DECODE_S,
    CPUSplit,
    StageCosts,
    actors_beside_decoding,
    decode_ms,
    measure,
    split_cpus,
    spread_block,
    survivor_cpus,
)
from mnasnet_batch.decode.preprocess import PreprocessSpec
from mnasnet_batch.inputs.files import FilesLayout
from mnasnet_batch.inputs.layout import READ_BATCH_BYTES, encoded_batch
from mnasnet_batch.inputs.listing import plan_input
from mnasnet_batch.storage import Storage

SPEC = PreprocessSpec(resize_size=256, crop_size=224, resample=Image.Resampling.BILINEAR, max_pixels=89_478_485)


def jpeg(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_costly_decoding_gets_the_cpus_and_a_costly_model_gets_them():
    # 12 MP photos: decoding costs ~25x the model. Two decode tasks of nearly a core each, the actor the rest.
    photos = split_cpus([2.0], model_share=0.04)
    assert photos.actors == 1 and photos.actor_cpus == pytest.approx(0.08)
    assert photos.decode_cpus == pytest.approx(0.96)
    # ImageNet-sized JPEGs on ONNX Runtime: the model costs a little more than decoding. One decode task.
    small = split_cpus([2.0], model_share=0.6)
    assert (small.actors, small.actor_cpus, small.decode_cpus) == (1, 1.2, 0.8)


def test_a_cluster_gets_actors_of_at_most_four_cpus_and_decode_tasks_of_one():
    assert split_cpus([64.0], 0.75) == CPUSplit(actor_cpus=4.0, actors=12, decode_cpus=1.0)
    # Three 16-CPU nodes on phone photos: one actor of the model's 1.92 CPUs, the rest decodes a CPU a task.
    assert split_cpus([16.0] * 3, 0.04) == CPUSplit(actor_cpus=1.92, actors=1, decode_cpus=1.0)


def test_actors_leave_a_decode_task_room_on_the_nodes_left_after_a_loss():
    # Four 16-CPU nodes: 12 actors of 4 CPUs (the model's share) would take all of the three nodes left after a
    # loss. 12 of 3.75 leave a CPU on each.
    assert split_cpus([16.0] * 4, 0.75) == CPUSplit(actor_cpus=3.75, actors=12, decode_cpus=1.0)
    # The cluster: a head with no CPUs, two workers of 2. Measured before: one actor of 2 CPUs, which took
    # the whole node left and the decode tasks waited forever.
    split = split_cpus([0.0, 2.0, 2.0], 0.75)
    assert split.actors == 1 and split.actor_cpus + split.decode_cpus <= 2.0 and split.actor_cpus == 1.5
    # One worker: nothing is left after its loss; the plan is for that node, as for a laptop.
    assert split_cpus([0.0, 4.0], 0.75) == split_cpus([4.0], 0.75)
    assert survivor_cpus([0.0, 8.0, 2.0, 4.0]) == 4.0 and survivor_cpus([0.0, 2.0]) == 2.0
    assert actors_beside_decoding([2.0, 2.0], 1.0, 1.0) == 1  # one node left: one actor beside one task
    assert actors_beside_decoding([16.0] * 4, 3.75, 1.0) == 12 and actors_beside_decoding([16.0] * 4, 4.0, 1.0) == 9


# Cluster shapes (each node's CPUs; 0: a head that runs no tasks), laptops to clusters of uneven nodes.
SHAPES = [
    [1.0], [2.0], [3.0], [8.0], [96.0], [0.0, 4.0], [1.0, 1.0], [2.0, 2.0], [0.0, 2.0, 2.0], [0.0, 1.0, 1.0, 1.0],
    [4.0, 2.0], [8.0, 8.0, 4.0], [16.0] * 3, [16.0] * 4, [0.0, 16.0, 4.0], [2.0, 1.0, 1.0], [0.5, 0.5],
]  # fmt: skip
SHARES = [0.00005, 0.001, 0.04, 0.04175, 0.3, 0.6, 0.75, 0.9, 0.999]


def units(cpus: float) -> int:
    return round(cpus * 10_000)  # Ray's unit of a resource


def room_for_a_decode_task(nodes: list[float], split: CPUSplit) -> bool:
    """Whether, however Ray places up to ``split.actors`` actors on ``nodes``, a node is left with room for a
    decode task (and one actor fits beside one): counted in Ray's units, exactly."""
    actor, decode = units(split.actor_cpus), units(split.decode_cpus)
    if not any(units(cpus) >= actor + decode for cpus in nodes):
        return False
    most = [min(units(cpus) // actor, split.actors) for cpus in nodes]
    for held in itertools.product(*(range(n + 1) for n in most)):
        if sum(held) <= split.actors and all(units(c) - k * actor < decode for c, k in zip(nodes, held, strict=True)):
            return False
    return True


@pytest.mark.parametrize("nodes", SHAPES, ids=str)
@pytest.mark.parametrize("share", SHARES)
def test_the_split_never_asks_for_more_than_the_cluster_has(nodes, share):
    cpus = sum(nodes)
    split = split_cpus(nodes, share)
    free = cpus - split.actors * split.actor_cpus
    tasks = max(1, round(free))
    assert free >= 0.25 - 1e-9  # reading and decoding always go on
    # In Ray's units (1e-4 CPU), exactly: a sum over by one unit leaves a task unscheduled.
    assert units(split.actors * split.actor_cpus) + tasks * units(split.decode_cpus) <= units(cpus)
    assert 0 < split.decode_cpus <= 1.0 and 0 < split.actor_cpus <= 4.0 and split.actors >= 1
    assert split.actors * split.actor_cpus <= max(cpus * share, 1e-4) + 1e-9  # never more than the model's share


@pytest.mark.parametrize("nodes", SHAPES, ids=str)
@pytest.mark.parametrize("share", SHARES)
def test_after_any_one_node_is_lost_an_actor_and_a_decode_task_still_fit(nodes, share):
    split = split_cpus(nodes, share)
    assert room_for_a_decode_task(nodes, split)  # before any loss
    with_cpus = [cpus for cpus in nodes if cpus > 0]
    if len(with_cpus) < 2:
        return  # its only node with CPUs lost, nothing can run
    for lost in range(len(with_cpus)):
        left = with_cpus[:lost] + with_cpus[lost + 1 :]
        assert room_for_a_decode_task(left, split), f"lost node {lost}: {split}"


def test_decoding_costs_more_on_large_images_and_errors_are_not_counted():
    small = encoded_batch(["a", "b"], [jpeg(500, 375, 1), jpeg(375, 500, 2)])
    large = encoded_batch(["c", "d", "e"], [jpeg(2400, 1800, 3), b"not an image", jpeg(1800, 2400, 4)])
    small_ms, small_count, small_bytes = decode_ms(small, SPEC)
    large_ms, large_count, large_bytes = decode_ms(large, SPEC)
    assert (small_count, large_count) == (2, 2)
    assert large_ms > 4 * small_ms > 0  # 23x the pixels
    assert large_bytes == (len(large["data"][0]) + len(large["data"][2])) // 2 > small_bytes
    assert decode_ms(encoded_batch(["x"], [b"junk"]), SPEC) == (0.0, 0, 0)


def test_the_sample_is_spread_over_a_mixed_listing(tmp_path):
    # Sorted by name: the small images come first, and a sample of the first ones would see none of the large.
    for i in range(6):
        (tmp_path / f"a{i}.jpg").write_bytes(jpeg(400, 300, i))
        (tmp_path / f"b{i}.jpg").write_bytes(jpeg(2000, 1500, 10 + i))
    inputs = plan_input(InputConfig(uri=str(tmp_path)), Storage(StorageConfig()))
    sample = inputs.layout.sample(inputs.uris, 4)
    names = sorted(uri.rsplit("/", 1)[-1][0] for uri in sample["uri"])
    assert names.count("a") == 2 and names.count("b") == 2
    costs = measure(inputs, SPEC, model_ms=5.0, engine="torch")
    assert costs.images >= 2 and costs.model_ms == 5.0 and 0 < costs.model_share < 1


def test_no_decodable_image_in_the_sample_measures_nothing(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    inputs = plan_input(InputConfig(uri=str(tmp_path)), Storage(StorageConfig()))
    assert measure(inputs, SPEC, model_ms=5.0, engine="torch") is None


def test_a_read_batch_of_large_images_is_bounded_by_bytes():
    phone = StageCosts(130.0, 5.0, 8, image_bytes=3 * 2**20, engine="torch", host="h")
    assert phone.read_batch(32) == READ_BATCH_BYTES // (3 * 2**20) < 32
    small = dataclasses.replace(phone, image_bytes=70_000)
    assert small.read_batch(32) == 32


def test_read_tasks_hold_no_more_bytes_than_the_bound_once_they_see_the_sizes(tmp_path, monkeypatch):
    from mnasnet_batch.inputs import layout

    monkeypatch.setattr(layout, "READ_BATCH_BYTES", 100_000)
    for i in range(20):
        (tmp_path / f"{i:02d}.jpg").write_bytes(jpeg(160, 120, i) + bytes(40_000))  # ~45 KB each
    inputs = plan_input(InputConfig(uri=str(tmp_path)), Storage(StorageConfig()))
    batches = list(inputs.layout.read({"uri": np.asarray(inputs.uris.to_pylist(), dtype=object)}, batch_size=8))
    sizes = [sum(len(data) for data in batch["data"]) for batch in batches]
    assert len(batches[0]["uri"]) == 8  # planned for small images
    assert all(size <= 100_000 for size in sizes[1:]) and sum(len(b["uri"]) for b in batches) == 20


def test_costly_images_make_smaller_read_tasks():
    phone = StageCosts(130.0, 5.0, 8, image_bytes=3 * 2**20, engine="torch", host="h")
    small = dataclasses.replace(phone, decode_ms=3.0, image_bytes=70_000)
    assert phone.block_images(10) == int(TASK_DECODE_S * 1000 / 130.0) < small.block_images(32)
    assert dataclasses.replace(phone, decode_ms=10_000.0).block_images(10) == 10  # at least one batch
    uris = pa.array([f"/p/{i}.jpg" for i in range(1000)])
    layout = FilesLayout(InputConfig(uri="/p"), Storage(StorageConfig()))
    blocks = [block.num_rows for block in layout.blocks(uris, 10, phone.block_images(10))]
    assert sum(blocks) == 1000 and blocks[0] == 10 and max(blocks) == phone.block_images(10)


def test_a_run_makes_several_read_tasks_for_each_decode_task_at_a_time():
    # 400 photos, two decode tasks at a time: at least 4 tasks each, so the last ones end close together.
    assert spread_block(400, 2, 13) == 50
    assert spread_block(40, 2, 13) == 13  # never below a batch
    assert spread_block(0, 2, 13) > 10**9  # not known before reading (shards): no bound
