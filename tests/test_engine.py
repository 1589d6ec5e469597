"""The engines that run the model: torch and ONNX Runtime give the reference's top-k on every MnasNet variant, the
export is deterministic, and the engine is chosen once, with one line when it cannot be had."""

import logging
import sys

import numpy as np
import pytest

from mnasnet_batch.cli import main
from mnasnet_batch.config import MODEL_NAMES, ConfigError
from mnasnet_batch.decode.preprocess import PreprocessSpec, decode_batch
from mnasnet_batch.inputs.layout import encoded_batch
from mnasnet_batch.model.engine import ONNXRUNTIME_MICRO_BATCH, choose_engine, export_onnx
from mnasnet_batch.model.predictor import Predictor
from mnasnet_batch.model.weights import Checkpoint
from tests import support
from tests.support import rows_by_uri

support.require("onnxruntime", "onnx")
support.require("onnx", "onnx")


# The first seed whose fixture model separates every corpus image's top-1 from its second class by over 1e-3.
FIXTURE_SEEDS = {"mnasnet0_5": 0, "mnasnet0_75": 0, "mnasnet1_0": 3, "mnasnet1_3": 1}


@pytest.fixture(scope="module", params=MODEL_NAMES)
def variant(request):
    """Each MnasNet variant with a fixture model of its own (well-separated predictions) and its checkpoint."""
    model = support.make_model(request.param, seed=FIXTURE_SEEDS[request.param])
    checkpoint = Checkpoint(request.param, support.checkpoint_bytes(model), "fixture", "memory")
    return request.param, model, checkpoint


def crops(corpus, model_name):
    spec = PreprocessSpec.for_model(model_name, max_pixels=10**9)
    return decode_batch(encoded_batch([str(p) for p in corpus], [p.read_bytes() for p in corpus]), spec)["image"]


@pytest.mark.parametrize("engine", ["onnxruntime", "torch"])
def test_every_variant_gives_the_reference_top_k(variant, engine, corpus):
    """The real-photo fixtures through each engine's default run size (the last run short) and the whole batch."""
    model_name, model, checkpoint = variant
    graph = export_onnx(checkpoint) if engine == "onnxruntime" else None
    ref_ids, ref_scores = support.reference_predictions(corpus, model, model_name, 5)
    # The fixture is only a fair test if its predictions are well separated, unlike a fresh model's.
    assert (ref_scores[:, 0] - ref_scores[:, 1]).min() > 1e-3
    assert ONNXRUNTIME_MICRO_BATCH < len(corpus) and len(corpus) % ONNXRUNTIME_MICRO_BATCH
    images = crops(corpus, model_name)
    for micro_batch in (0, len(corpus)):
        predictor = Predictor(checkpoint, 5, device="cpu", num_threads=2, micro_batch=micro_batch, onnx_graph=graph)
        ids, scores = predictor.predict(images)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-4)


def test_the_export_is_the_same_graph_every_time(checkpoint_path, fixture_model):
    checkpoint = Checkpoint("mnasnet0_5", checkpoint_path.read_bytes(), "fixture", str(checkpoint_path))
    graph = export_onnx(checkpoint)
    assert export_onnx(checkpoint) == graph
    other = support.make_model("mnasnet0_5", seed=1)
    assert export_onnx(Checkpoint("mnasnet0_5", support.checkpoint_bytes(other), "other", "memory")) != graph


def test_the_onnx_predictor_labels_a_batch_with_error_rows(checkpoint_path, corpus):
    checkpoint = Checkpoint("mnasnet0_5", checkpoint_path.read_bytes(), "fixture", str(checkpoint_path))
    predictor = Predictor(checkpoint, 5, device="cpu", onnx_graph=export_onnx(checkpoint))
    spec = PreprocessSpec.for_model("mnasnet0_5", max_pixels=10**9)
    batch = decode_batch(encoded_batch(["good", "bad"], [corpus[0].read_bytes(), b"not an image"]), spec)
    assert predictor(batch).column("status").to_pylist() == ["ok", "error"]
    with pytest.raises(ValueError, match="fp32"):
        Predictor(checkpoint, 5, device="cpu", precision="bf16", onnx_graph=b"")


def test_auto_is_onnxruntime_on_cpu_actors_in_fp32_and_torch_elsewhere():
    assert choose_engine("auto", gpu_actors=False) == "onnxruntime"
    assert choose_engine("auto", gpu_actors=True) == "torch"
    assert choose_engine("auto", gpu_actors=False, precision="bf16") == "torch"
    assert choose_engine("torch", gpu_actors=False) == "torch"
    assert choose_engine("onnxruntime", gpu_actors=False) == "onnxruntime"
    with pytest.raises(ConfigError, match="onnxruntime runs the model on CPU actors"):
        choose_engine("onnxruntime", gpu_actors=True)


def test_without_onnxruntime_auto_says_it_runs_torch(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` finds where it is absent
    # The handler on the module's own logger: Ray Data, once imported, reconfigures how records reach the root.
    logger = logging.getLogger("mnasnet_batch.model.engine")
    monkeypatch.setattr(logger, "handlers", [caplog.handler])
    with caplog.at_level(logging.INFO, logger="mnasnet_batch.model.engine"):
        assert choose_engine("auto", gpu_actors=False) == "torch"
    assert "ONNX Runtime is not installed, so the model runs on torch" in caplog.text
    with pytest.raises(ConfigError, match=r"pip install 'mnasnet-batch\[onnx\]'"):
        choose_engine("onnxruntime", gpu_actors=False)


def test_asking_for_onnxruntime_without_it_stops_before_reading(
    monkeypatch, local_ray, tmp_path, corpus, checkpoint_path, capsys
):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    output = tmp_path / "out"
    status = main(support.job_argv(corpus[0].parent, output, checkpoint_path, "compute.engine=onnxruntime"))
    assert status == 2
    err = capsys.readouterr().err
    # One line for people; the rest are the job's INFO lines.
    assert [line for line in err.splitlines() if " INFO " not in line] == [
        "error: compute.engine=onnxruntime: ONNX Runtime is not installed (or onnx, which exports the model); "
        "pip install 'mnasnet-batch[onnx]'"
    ]
    assert not output.exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("compute.engine=tensorrt", "compute.engine: 'tensorrt' is not one of auto, torch, onnxruntime"),
        ("compute.device=gpu", "onnxruntime runs the model on CPU actors"),
        ("compute.precision=bf16", "onnxruntime runs fp32 only"),
    ],
)
def test_engine_settings_that_cannot_run_are_refused(override, message):
    from mnasnet_batch.config import load_config, parse_override

    overrides = [parse_override("compute.engine=onnxruntime"), parse_override(override)]
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


@pytest.mark.parametrize("engine", ["onnxruntime", "torch"])
def test_the_job_labels_like_the_reference_on_each_engine(
    engine, local_ray, tmp_path, corpus, checkpoint_path, fixture_model, capsys
):
    images = tmp_path / "images"
    images.mkdir()
    for path in corpus[:8]:
        (images / path.name).write_bytes(path.read_bytes())
    output = tmp_path / "out"
    assert main(support.job_argv(images, output, checkpoint_path, f"compute.engine={engine}")) == 0
    support.assert_reference_rows(rows_by_uri(output), [images / p.name for p in corpus[:8]], fixture_model)
    assert {"onnxruntime": "the model runs on ONNX Runtime", "torch": "the model runs on torch"}[engine] in (
        capsys.readouterr().err
    )
