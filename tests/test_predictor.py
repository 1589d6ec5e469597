"""The model actor without Ray: predictions equal a direct torchvision forward on the reference tensor."""

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from mnasnet_batch.decode.preprocess import PreprocessSpec, decode_batch
from mnasnet_batch.inputs.layout import encoded_batch
from mnasnet_batch.model.postprocess import OUTPUT_SCHEMA
from mnasnet_batch.model.predictor import Predictor
from mnasnet_batch.model.weights import resolve_checkpoint
from tests import support


@pytest.fixture(scope="module")
def predictor(checkpoint_path):
    return Predictor(resolve_checkpoint("mnasnet0_5", str(checkpoint_path)), top_k=5, device="cpu", num_threads=2)


@pytest.mark.parametrize("micro_batch", [0, 5, 1000])
def test_top_k_matches_reference_forward(checkpoint_path, fixture_model, corpus, micro_batch):
    """Runs of 8 (the CPU default), of 5 (the last one short) and one pass over the whole batch."""
    predictor = Predictor(
        resolve_checkpoint("mnasnet0_5", str(checkpoint_path)), top_k=5, device="cpu", micro_batch=micro_batch
    )
    assert 8 < len(corpus) < 1000 and len(corpus) % 5
    spec = PreprocessSpec.for_model("mnasnet0_5", max_pixels=10**9)
    batch = decode_batch(encoded_batch([str(p) for p in corpus], [p.read_bytes() for p in corpus]), spec)
    ids, scores = predictor.predict(batch["image"])
    ref_ids, ref_scores = support.reference_predictions(corpus, fixture_model, "mnasnet0_5", 5)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-4)
    assert (np.diff(scores, axis=1) <= 0).all()
    # The fixture is only a fair test if its predictions are well separated, unlike a fresh model's.
    assert (ref_scores[:, 0] - ref_scores[:, 1]).min() > 1e-3


def test_error_rows_pass_through_with_null_predictions(predictor, corpus):
    spec = PreprocessSpec.for_model("mnasnet0_5", max_pixels=10**9)
    uris = np.asarray(["good", "bad", "good2"], dtype=object)
    contents = [corpus[0].read_bytes(), b"not an image", corpus[1].read_bytes()]
    table = predictor(decode_batch(encoded_batch(uris, contents), spec))
    assert isinstance(table, pa.Table) and table.schema == OUTPUT_SCHEMA
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert rows[1]["error"].startswith("UnidentifiedImageError") and rows[1]["top_k_ids"] is None
    assert rows[0]["error"] is None and len(rows[0]["top_k_labels"]) == 5
    categories = support.torchvision.models.MNASNet0_5_Weights.IMAGENET1K_V1.meta["categories"]
    assert rows[2]["top_k_labels"] == [categories[i] for i in rows[2]["top_k_ids"]]
    assert {r["model"] for r in rows} == {"mnasnet0_5"}


def test_all_error_batch(predictor):
    spec = PreprocessSpec.for_model("mnasnet0_5", max_pixels=10**9)
    table = predictor(decode_batch(encoded_batch(["x"], [b""]), spec))
    assert table.column("status").to_pylist() == ["error"]


def test_grayscale_photo_is_labeled(predictor, photos, tmp_path):
    path = tmp_path / "gray.png"
    photos["astronaut"].convert("L").save(path)
    spec = PreprocessSpec.for_model("mnasnet0_5", max_pixels=10**9)
    batch = decode_batch(encoded_batch([str(path)], [path.read_bytes()]), spec)
    assert batch["error"][0] == "" and Image.open(path).mode == "L"
    assert predictor(batch).column("status").to_pylist() == ["ok"]
