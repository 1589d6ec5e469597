"""Phone photos: the 12 MP corpus the benchmarks use, HEIC / HEIF and AVIF files, fast decoding on a CPU actor."""

import dataclasses
import io
import logging
import posixpath
from pathlib import Path

import numpy as np
import pillow_heif
import pyarrow.dataset as pads
import pytest
import torch
import torchvision
import torchvision.transforms.functional as F
from PIL import Image, ImageOps

from mnasnet_batch.cli import main
from mnasnet_batch.config import InputConfig, load_config
from mnasnet_batch.decode import formats
from mnasnet_batch.decode.preprocess import PreprocessSpec, decode_batch, preprocess_image
from mnasnet_batch.inputs.layout import encoded_batch
from mnasnet_batch.inputs.listing import plan_input
from mnasnet_batch.model.predictor import Predictor
from mnasnet_batch.model.weights import resolve_checkpoint
from mnasnet_batch.storage import Storage
from tests import support


def test_photo_corpus_holds_landscapes_portraits_and_sideways_portraits(tmp_path):
    paths = support.write_photo_corpus(tmp_path, 4, size=(400, 300), heic_every=4)
    jpegs = [p for p in paths if p.suffix == ".jpg"]
    assert len(jpegs) == 4 and [p.suffix for p in paths].count(".heic") == 1
    shown = {}
    for path in jpegs:
        with Image.open(path) as image:
            orientation = image.getexif().get(support.ORIENTATION_TAG, 1)
            shown[int(path.stem[-5:])] = (image.size, orientation, ImageOps.exif_transpose(image).size)
    assert shown == {
        0: ((400, 300), 1, (400, 300)),
        1: ((400, 300), 1, (400, 300)),
        2: ((300, 400), 1, (300, 400)),
        3: ((400, 300), support.SIDEWAYS, (300, 400)),  # stored sideways, shown upright
    }
    # The HEIC copy is the sideways photo's upright picture, near its JPEG (two lossy codecs apart).
    heic = next(p for p in paths if p.suffix == ".heic")
    assert heic.stem == jpegs[3].stem
    upright = np.asarray(ImageOps.exif_transpose(Image.open(jpegs[3])).convert("RGB"), np.float32)
    copy = np.asarray(pillow_heif.open_heif(heic).to_pillow().convert("RGB"), np.float32)
    assert copy.shape == upright.shape and np.abs(copy - upright).mean() < 8


def heic_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    pillow_heif.from_pillow(image).save(buffer, quality=90)
    return buffer.getvalue()


def reference_crop(image: Image.Image, model_name: str) -> np.ndarray:
    """torchvision's own Resize and CenterCrop of the model's weights on a PIL image, as uint8."""
    transforms = torchvision.models.get_model_weights(model_name).IMAGENET1K_V1.transforms()
    resized = F.resize(image.convert("RGB"), transforms.resize_size, interpolation=transforms.interpolation)
    return np.asarray(F.center_crop(resized, transforms.crop_size))


@pytest.mark.parametrize("fast_decode", [False, True])
def test_heic_decodes_as_pillow_heif_reads_it(photos, fast_decode):
    spec = PreprocessSpec.for_model("mnasnet0_5", max_pixels=10**9, fast_decode=fast_decode)
    rng = np.random.default_rng(3)
    # Landscape and portrait, and one large enough that fast decoding would reduce it if it reduced other formats
    # than JPEG: a HEIC is decoded exactly either way.
    images = [support.random_crop(photos["chelsea"], rng), support.random_crop(photos["coffee"], rng)]
    images.append(photos["retina"].resize((1100, 1030)))
    for image in images:
        data = heic_bytes(image)
        theirs = pillow_heif.open_heif(io.BytesIO(data)).to_pillow()
        assert np.array_equal(preprocess_image(data, spec), reference_crop(theirs, "mnasnet0_5")), image.size


def test_avif_decodes_as_pillow_reads_it(photos):
    spec = PreprocessSpec.for_model("mnasnet0_75", max_pixels=10**9)  # Resize 232
    buffer = io.BytesIO()
    support.random_crop(photos["astronaut"], np.random.default_rng(4)).save(buffer, format="AVIF", quality=80)
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as theirs:
        assert theirs.format == "AVIF"
        assert np.array_equal(preprocess_image(data, spec), reference_crop(theirs, "mnasnet0_75"))


def write_folder(folder, photos) -> None:
    folder.mkdir()
    photo = photos["chelsea"].resize((200, 150))
    photo.save(folder / "a.jpg")
    photo.save(folder / "b.avif", format="AVIF")
    for name in ("c.heic", "d.HEIC", "e.heif"):
        (folder / name).write_bytes(heic_bytes(photo))


def listed(folder) -> list[str]:
    plan = plan_input(InputConfig(uri=str(folder)), Storage())
    return sorted(posixpath.basename(uri) for uri in plan.uris.to_pylist())


def test_heic_heif_and_avif_are_listed_where_they_can_be_decoded(tmp_path, photos, caplog):
    write_folder(tmp_path / "photos", photos)
    with caplog.at_level(logging.INFO, logger="mnasnet_batch"):
        assert listed(tmp_path / "photos") == ["a.jpg", "b.avif", "c.heic", "d.HEIC", "e.heif"]
    assert "skipped" not in caplog.text


def test_heic_files_without_pillow_heif_are_counted_in_the_log_and_left_out(tmp_path, photos, caplog, monkeypatch):
    write_folder(tmp_path / "photos", photos)
    # pillow-heif is installed here (the test extra), and a package cannot be uninstalled cleanly from a running
    # test session; formats.heif_installed is the one place that asks whether it is, so it stands in for its absence.
    monkeypatch.setattr(formats, "heif_installed", lambda: False)
    with caplog.at_level(logging.INFO, logger="mnasnet_batch"):
        assert listed(tmp_path / "photos") == ["a.jpg", "b.avif"]
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skipped == ["skipped 3 .heic/.heif files: pip install 'mnasnet-batch[heif]' to label them"]
    assert "ignoring" not in caplog.text  # counted once, as skipped, not also as other files


def test_a_heic_photo_is_labeled_as_the_reference_labels_pillow_heifs_image(
    tmp_path, local_ray, photos, checkpoint_path, fixture_model
):
    images = tmp_path / "images"
    images.mkdir()
    photo = support.random_crop(photos["stereo_motorcycle"], np.random.default_rng(5))
    (images / "phone.heic").write_bytes(heic_bytes(photo))
    output = tmp_path / "labels"
    assert main(support.job_argv(images, output, checkpoint_path, "preprocess.batch_size=4")) == 0
    (row,) = pads.dataset(output, format="parquet").to_table().to_pylist()
    assert row["uri"] == str(images / "phone.heic") and row["status"] == "ok", row["error"]
    decoded = pillow_heif.open_heif(images / "phone.heic").to_pillow()
    reference = support.reference_tensor(decoded, "mnasnet0_5")
    with torch.no_grad():
        scores, ids = torch.topk(torch.softmax(fixture_model.eval()(reference[None]), dim=1), 5)
    assert row["top_k_ids"] == ids[0].tolist()
    np.testing.assert_allclose(row["top_k_scores"], scores[0].numpy(), atol=1e-4)


def test_a_cpu_model_actor_decoding_itself_decodes_fast_too(tmp_path, checkpoint_path):
    paths = support.write_photo_corpus(tmp_path, 2, size=(2000, 1500))
    batch = encoded_batch([str(p) for p in paths], [p.read_bytes() for p in paths])
    spec = PreprocessSpec.for_model("mnasnet0_5", max_pixels=10**9, decode_on="actor", fast_decode=True)
    checkpoint = resolve_checkpoint("mnasnet0_5", str(checkpoint_path))
    actor = Predictor(checkpoint, top_k=5, device="cpu", num_threads=2, spec=spec)
    fast = decode_batch(batch, spec)["image"]
    exact = decode_batch(batch, dataclasses.replace(spec, fast_decode=False))["image"]
    assert np.array_equal(actor.decode(batch)["image"], fast) and not np.array_equal(fast, exact)


def test_the_photos_profile_labels_phone_photos_upright_from_fast_decoded_crops(
    tmp_path, local_ray, checkpoint_path, fixture_model
):
    profile = Path(__file__).resolve().parents[1] / "conf" / "photos.yaml"
    images = tmp_path / "images"
    # Landscape, landscape, portrait, and a portrait stored sideways (EXIF 6); large enough to decode at DCT 1/2.
    paths = support.write_photo_corpus(images, 4, size=(2000, 1500))
    output = tmp_path / "labels"
    assert main(support.job_argv(images, output, checkpoint_path, extra=("--config", str(profile)))) == 0
    rows = {row["uri"]: row for row in pads.dataset(output, format="parquet").to_table().to_pylist()}
    # What the job must have labeled: the crops as the profile decodes them (upright, fast), through the model.
    spec = PreprocessSpec.for_config("mnasnet0_5", load_config(profile).preprocess)
    assert spec.fast_decode and spec.apply_exif_orientation
    crops = np.stack([preprocess_image(p.read_bytes(), spec) for p in paths])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        scores, ids = torch.topk(torch.softmax(fixture_model.eval()(x), dim=1), 5)
    for path, row_ids, row_scores in zip(paths, ids, scores, strict=True):
        row = rows[str(path)]
        assert row["status"] == "ok" and row["top_k_ids"] == row_ids.tolist(), path.name
        np.testing.assert_allclose(row["top_k_scores"], row_scores.numpy(), atol=1e-4)
