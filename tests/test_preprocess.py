"""Preprocessing parity with torchvision's reference transform, and bad images as error values."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mnasnet_batch.config import InputConfig
from mnasnet_batch.decode.preprocess import PreprocessSpec, decode_batch, preprocess_image
from mnasnet_batch.inputs.files import FilesLayout
from mnasnet_batch.inputs.layout import encoded_batch
from mnasnet_batch.storage import Storage
from tests import support

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def encode(image: Image.Image, format: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **params)
    return buffer.getvalue()


def max_level_difference(data: bytes, model_name: str) -> float:
    """How far our uint8 crop is from the reference's normalised tensor, in uint8 levels."""
    spec = PreprocessSpec.for_model(model_name, max_pixels=10**9)
    ours = torch.from_numpy(preprocess_image(data, spec).copy()).permute(2, 0, 1).float() / 255
    ours = (ours - MEAN) / STD
    reference = support.reference_tensor(Image.open(io.BytesIO(data)), model_name)
    assert ours.shape == reference.shape == (3, 224, 224)
    return float(((ours - reference).abs() * STD * 255).max())


def varied_crops(photos, count):
    rng = np.random.default_rng(1)
    images = []
    for i in range(count):
        photo = list(photos.values())[i % len(photos)]
        # Long sides from 120 px (upsampled) to 900 px (downsampled), every aspect ratio the crops give.
        images.append(support.random_crop(photo, rng, long_side=int(rng.integers(120, 900))))
    return images


@pytest.mark.parametrize("model_name", ["mnasnet0_5", "mnasnet0_75"])  # resize 256 and 232
def test_photos_match_reference_within_one_level(photos, model_name):
    worst = 0.0
    for i, image in enumerate(varied_crops(photos, 16)):
        data = encode(image, "JPEG", quality=90) if i % 2 else encode(image, "PNG")
        worst = max(worst, max_level_difference(data, model_name))
    # The contract is one level; observed here: 0.0 (the same Pillow resize and crop as the reference).
    assert worst <= 1.0


def odd_modes(photo: Image.Image) -> dict[str, bytes]:
    small = photo.resize((300, 200))
    rgba = small.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(small.size))
    sixteen = Image.fromarray(np.asarray(small.convert("L"), dtype=np.uint16) * 257)
    return {
        "L": encode(small.convert("L"), "PNG"),
        "P": encode(small.convert("P", palette=Image.ADAPTIVE), "PNG"),
        "RGBA": encode(rgba, "PNG"),
        "CMYK": encode(small.convert("CMYK"), "JPEG"),
        "I;16": encode(sixteen, "PNG"),
    }


@pytest.mark.parametrize("model_name", ["mnasnet0_5", "mnasnet1_3"])
def test_odd_modes_match_reference(photos, model_name):
    for mode, data in odd_modes(photos["coffee"]).items():
        assert Image.open(io.BytesIO(data)).mode == mode
        assert max_level_difference(data, model_name) <= 1.0, mode


def test_bad_images_become_error_values(photos):
    spec = PreprocessSpec.for_model("mnasnet0_5", max_pixels=500 * 500)
    good = encode(photos["chelsea"], "JPEG")
    contents = [
        good,
        b"",
        good[: len(good) // 2],
        b"<html><body>404 Not Found</body></html>",
        encode(Image.new("RGB", (600, 600)), "PNG"),  # over max_pixels
        FileNotFoundError("/gone.jpg"),
    ]
    uris = np.asarray([f"u{i}" for i in range(len(contents))], dtype=object)
    read = encoded_batch(uris, contents)
    batch = decode_batch(read, spec)
    assert batch["image"].shape == (6, 224, 224, 3) and batch["image"].dtype == np.uint8
    errors = list(batch["error"])
    assert errors[0] == ""
    assert errors[1].startswith("UnidentifiedImageError")
    assert errors[2].startswith("OSError") and "truncated" in errors[2]
    assert errors[3].startswith("UnidentifiedImageError")
    # The same bytes give the same message on every run (Pillow's own names the buffer's memory address).
    assert errors[1] == errors[3] == decode_batch(read, spec)["error"][3] and "0x" not in errors[3]
    assert errors[4] == "ValueError: image is 600x600 = 360000 pixels, over preprocess.max_pixels=250000"
    assert errors[5].startswith("FileNotFoundError")
    assert batch["image"][0].any() and not batch["image"][1:].any()
    assert list(batch["uri"]) == list(uris)


def test_decode_and_write_tasks_do_not_import_torch(tmp_path):
    # Each Ray worker that imports torch spends seconds of CPU on it; only the model actors need it.
    import pickle
    import subprocess
    import sys

    from mnasnet_batch.parts import PartWriter

    spec = PreprocessSpec.for_model("mnasnet0_5", max_pixels=10**9)
    layout = FilesLayout(InputConfig(uri=str(tmp_path)), Storage())
    payload = tmp_path / "task.pickle"
    payload.write_bytes(pickle.dumps((layout.read, decode_batch, spec, PartWriter(str(tmp_path), Storage()))))
    code = (
        "import pickle, sys; read, decode, spec, writer = pickle.load(open(sys.argv[1], 'rb'));"
        "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code, str(payload)], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
