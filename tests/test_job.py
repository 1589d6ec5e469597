"""End to end on a local Ray: files in, one Parquet row per file out, predictions equal the reference."""

import shutil

import numpy as np
import pyarrow.dataset as pads
import pytest
import yaml
from PIL import Image

from mnasnet_batch.cli import main
from mnasnet_batch.config import load_config
from mnasnet_batch.model.postprocess import OUTPUT_SCHEMA
from tests import support


@pytest.fixture(scope="module")
def labeled(tmp_path_factory, local_ray, corpus, checkpoint_path):
    """One job run over the corpus plus two bad files, in a nested folder."""
    images = tmp_path_factory.mktemp("images")
    for path in corpus:
        shutil.copy(path, images / path.name)
    (images / "nested").mkdir()
    (images / "nested" / "empty.jpg").write_bytes(b"")
    (images / "nested" / "html.JPG").write_text("<html>error</html>")
    (images / "notes.txt").write_text("not an image, not listed")
    output = tmp_path_factory.mktemp("out") / "labels"
    status = main(support.job_argv(images, output, checkpoint_path, "preprocess.batch_size=8", "compute.batch_size=16"))
    return status, images, output


def read_rows(output):
    table = pads.dataset(output, format="parquet").to_table()
    return table, {row["uri"]: row for row in table.to_pylist()}


# The fast lane's one end-to-end job: these two tests share one run of the job over the corpus on the local Ray.
@pytest.mark.fast_lane
def test_one_row_per_image_with_the_schema(labeled, corpus, capsys):
    status, images, output = labeled
    assert status == 0
    table, rows = read_rows(output)
    assert table.schema == OUTPUT_SCHEMA
    expected = {str(images / p.name) for p in corpus} | {
        str(images / "nested" / "empty.jpg"),
        str(images / "nested" / "html.JPG"),
    }
    assert table.num_rows == len(expected) == len(rows)
    assert set(rows) == expected


@pytest.mark.fast_lane
def test_predictions_equal_an_independent_torchvision_reference(labeled, corpus, fixture_model):
    _, images, output = labeled
    _, rows = read_rows(output)
    ref_ids, ref_scores = support.reference_predictions(corpus, fixture_model, "mnasnet0_5", 5)
    for path, ids, scores in zip(corpus, ref_ids, ref_scores, strict=True):
        row = rows[str(images / path.name)]
        assert row["status"] == "ok" and row["error"] is None
        assert row["top_k_ids"] == ids.tolist()
        np.testing.assert_allclose(row["top_k_scores"], scores, atol=1e-4)
        assert row["model"] == "mnasnet0_5" and len(row["weights"]) == 64


def test_bad_files_are_error_rows(labeled):
    _, images, output = labeled
    _, rows = read_rows(output)
    for name in ("nested/empty.jpg", "nested/html.JPG"):
        row = rows[str(images / name)]
        assert row["status"] == "error" and row["error"].startswith("UnidentifiedImageError")
        assert row["top_k_ids"] is None and row["top_k_scores"] is None


def test_resolved_config_is_written_and_reloads(labeled, checkpoint_path):
    _, images, output = labeled
    (written,) = output.glob("run=*/_config.yaml")
    config = load_config(written)
    assert config.input.uri == str(images) and config.model.weights == str(checkpoint_path)
    assert config.preprocess.batch_size == 8
    assert yaml.safe_load(written.read_text())["model"]["top_k"] == 5


def test_second_run_into_the_same_output_is_refused(labeled, checkpoint_path, capsys):
    _, images, output = labeled
    before = sorted(p.name for p in output.iterdir())
    assert main(["--input", str(images), "--output", str(output), "--weights", str(checkpoint_path)]) == 2
    assert "holds the finished run" in capsys.readouterr().err
    assert sorted(p.name for p in output.iterdir()) == before


def test_top_k_and_model_flags(local_ray, corpus, tmp_path, checkpoint_path, capsys):
    output = tmp_path / "top1"
    assert (
        main(["--input", str(corpus[0]), "--output", str(output), "--weights", str(checkpoint_path), "--top-k", "1"])
        == 0
    )
    table, _ = read_rows(output)
    assert table.num_rows == 1 and len(table.column("top_k_ids")[0]) == 1
    assert "labeled 1 images (0 errors)" in capsys.readouterr().out


def test_decoding_on_the_model_actor_gives_the_reference_predictions(
    local_ray, corpus, tmp_path, checkpoint_path, fixture_model
):
    # preprocess.decode_on=actor: the encoded bytes travel to the actor, which decodes them (here a CPU actor,
    # with Pillow on its threads; a GPU actor's path is tested in test_device_preprocess).
    images = tmp_path / "images"
    images.mkdir()
    for path in corpus:
        shutil.copy(path, images / path.name)
    (images / "broken.jpg").write_bytes(corpus[0].read_bytes()[:500])
    output = tmp_path / "labels"
    argv = support.job_argv(images, output, checkpoint_path, "preprocess.decode_on=actor", "compute.batch_size=16")
    assert main(argv) == 0
    _, rows = read_rows(output)
    assert len(rows) == len(corpus) + 1
    assert rows[str(images / "broken.jpg")]["status"] == "error"
    ref_ids, ref_scores = support.reference_predictions(corpus, fixture_model, "mnasnet0_5", 5)
    for path, ids, scores in zip(corpus, ref_ids, ref_scores, strict=True):
        row = rows[str(images / path.name)]
        assert row["top_k_ids"] == ids.tolist(), path.name
        np.testing.assert_allclose(row["top_k_scores"], scores, atol=1e-4)


def test_the_run_record_keeps_what_an_image_cost_each_stage_and_where_each_ran(labeled):
    import json

    _, _, output = labeled
    costs = json.loads((output / "_run.json").read_text())["stage_costs"]
    assert costs["decode_ms"] > 0 and costs["model_ms"] > 0 and costs["images"] >= 2
    assert costs["engine"] in ("torch", "onnxruntime") and costs["image_bytes"] > 0
    # On the 2-CPU test Ray: CPU actors, and decode tasks with what they leave.
    assert costs["model_on"].startswith("1-") and costs["model_on"].endswith(" CPU")
    actor_cpus = float(costs["model_on"].split(" of ")[1].split()[0])
    decode_cpus = float(costs["decode_on"].split(" of ")[1].split()[0])
    assert 0 < decode_cpus and actor_cpus + decode_cpus <= 2.0 + 1e-6


def test_photos_costly_to_decode_give_decoding_the_cpus(local_ray, tmp_path, checkpoint_path, photos):
    """The same command, no setting: large photos (decoding costs many times the model) turn the split around."""
    import json

    images = tmp_path / "photos"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, photo in enumerate(list(photos.values())[:3]):
        pixels = np.asarray(photo.resize((2400, 1800)), np.int16) + rng.integers(-6, 7, (1800, 2400, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(images / f"p{i}.jpg", quality=92)
    output = tmp_path / "labels"
    assert main(support.job_argv(images, output, checkpoint_path)) == 0
    costs = json.loads((output / "_run.json").read_text())["stage_costs"]
    assert costs["decode_ms"] > 4 * costs["model_ms"]
    actor_cpus = float(costs["model_on"].split(" of ")[1].split()[0])
    decode_cpus = float(costs["decode_on"].split(" of ")[1].split()[0])
    assert actor_cpus < 0.5 < decode_cpus and actor_cpus + decode_cpus <= 2.0 + 1e-6
    assert costs["in_job"]["decode_ms"] > costs["in_job"]["model_ms"] > 0
