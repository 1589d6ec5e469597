"""Sizing the model actor pool from the configuration and the cluster's resources."""

import pytest

from mnasnet_batch.config import ConfigError, load_config, parse_override
from mnasnet_batch.job import ActorPool, model_actor_pool

GPU_CLUSTER = {"CPU": 96.0, "GPU": 4.0, "memory": 4e11}
CPU_CLUSTER = {"CPU": 64.0, "memory": 2e11}


def config(**compute):
    return load_config(overrides=[{"compute": compute}])


def test_gpu_cluster_derives_one_actor_per_gpu():
    assert model_actor_pool(config(), GPU_CLUSTER) == ActorPool({"num_gpus": 1, "num_cpus": 1.0}, 1, 4, 1)


def test_cpu_cluster_derives_actors_of_four_cpus_in_three_quarters_of_them():
    assert model_actor_pool(config(), CPU_CLUSTER) == ActorPool({"num_cpus": 4.0}, 1, 12, 1)
    pool = model_actor_pool(config(actor_cpus=2, min_actors=2, initial_actors=3), CPU_CLUSTER)
    assert pool == ActorPool({"num_cpus": 2.0}, 2, 24, 3)


def test_configured_bounds_win_over_the_cluster():
    pool = model_actor_pool(config(min_actors=2, max_actors=3, initial_actors=3), GPU_CLUSTER)
    assert (pool.min_size, pool.max_size, pool.initial_size) == (2, 3, 3)


def test_device_gpu_asks_for_gpus_before_any_gpu_node_exists():
    # A GPU group scaling from zero: the cluster shows no GPU when the job starts.
    pool = model_actor_pool(config(device="gpu", max_actors=4, actor_cpus=2), CPU_CLUSTER)
    assert pool == ActorPool({"num_gpus": 1, "num_cpus": 2.0}, 1, 4, 1)
    assert "num_gpus" not in model_actor_pool(config(device="cpu"), GPU_CLUSTER).resources


def test_fractional_gpus_pack_several_actors_per_gpu():
    pool = model_actor_pool(config(actor_gpus=0.5), GPU_CLUSTER)
    assert pool == ActorPool({"num_gpus": 0.5, "num_cpus": 1.0}, 1, 8, 1)


def test_fp16_refused_where_actors_would_run_on_cpu():
    with pytest.raises(ConfigError, match="fp16 needs GPU actors"):
        model_actor_pool(config(precision="fp16"), CPU_CLUSTER)
    assert model_actor_pool(config(precision="fp16"), GPU_CLUSTER).resources["num_gpus"] == 1
    with pytest.raises(ConfigError, match="fp16 needs GPU actors"):
        config(precision="fp16", device="cpu")


def test_initial_size_is_clamped_to_a_derived_maximum():
    pool = model_actor_pool(config(initial_actors=8, actor_cpus=1), {"CPU": 4.0})
    assert (pool.min_size, pool.max_size, pool.initial_size) == (1, 3, 3)


def test_a_tiny_cluster_still_gets_min_actors():
    assert model_actor_pool(config(min_actors=1, actor_cpus=1), {"CPU": 1.0}).max_size == 1


def test_the_strategy_carries_all_three_bounds():
    strategy = ActorPool({"num_cpus": 1.0}, 1, 4, 2).strategy()
    assert (strategy.min_size, strategy.max_size, strategy.initial_size) == (1, 4, 2)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["compute.device=tpu"], "compute.device: 'tpu' is not one of auto, cpu, gpu"),
        (["compute.min_actors=2", "compute.initial_actors=1"], "initial_actors: must be 0 (min_actors) or at least"),
        (["compute.max_actors=2", "compute.initial_actors=3"], "initial_actors: must be at most compute.max_actors"),
        (["progress.interval_s=0"], "progress.interval_s: must be more than 0"),
        (["compute.precision=fp8"], "compute.precision: 'fp8' is not one of fp32, fp16, bf16"),
        (["compute.actor_gpus=1.5"], "compute.actor_gpus: must be a fraction in (0, 1] or a whole number"),
        (["compute.actor_gpus=0"], "compute.actor_gpus: must be a fraction"),
        (["preprocess.decode_on=gpu"], "preprocess.decode_on: 'gpu' is not one of workers, actor"),
    ],
)
def test_bad_pool_settings_are_rejected(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[parse_override(o) for o in overrides])
    assert message in str(info.value)
