"""Decoding on the model actor (preprocess.decode_on=actor), run here on CPU: the same crops as the Pillow path."""

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from mnasnet_batch.decode.device_preprocess import decode_batch_on_device, decode_crops, resize_crops
from mnasnet_batch.decode.preprocess import PreprocessSpec, decodable_on_device, decode_batch, preprocess_image
from mnasnet_batch.inputs.layout import encoded_batch
from mnasnet_batch.model.predictor import Predictor
from mnasnet_batch.model.weights import resolve_checkpoint
from tests import support

SPEC = PreprocessSpec.for_model("mnasnet0_5", max_pixels=10**8)
CPU = torch.device("cpu")

# (width, height): landscape and portrait, shrunk and enlarged, more than 2:1 both ways (Pillow changes the
# order of its two passes for tall images), already 256 on one side, and thin strips.
SIZES = [(500, 375), (375, 500), (256, 300), (300, 256), (120, 90), (90, 200), (301, 700), (700, 301), (260, 1000)]
SIZES += [(1000, 260), (40, 900), (900, 40), (257, 515), (300, 600), (300, 601), (999, 999), (256, 256)]


def encode(image: Image.Image, format: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **params)
    return buffer.getvalue()


def test_resize_crops_equal_pillow_to_the_bit(photos):
    images = [photos[name].resize(size, Image.BICUBIC) for name, size in zip(list(photos) * 3, SIZES, strict=False)]
    expected = [preprocess_image(encode(image, "PNG"), SPEC) for image in images]
    pixels = [torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1) for image in images]  # (3, H, W)
    # All sizes in one batch (padded matrix products), and each alone.
    batched = resize_crops(pixels, SPEC).numpy()
    for i, size in enumerate(SIZES):
        np.testing.assert_array_equal(batched[i], expected[i], err_msg=f"{size} in a batch")
        np.testing.assert_array_equal(resize_crops(pixels[i : i + 1], SPEC)[0].numpy(), expected[i], err_msg=str(size))


def test_resize_crops_in_chunks(photos, monkeypatch):
    from mnasnet_batch.decode import device_preprocess

    monkeypatch.setattr(device_preprocess, "CHUNK_PIXELS", 300 * 600)  # a few images per chunk
    images = [photos["coffee"].resize(size, Image.BICUBIC) for size in SIZES]
    pixels = [torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1) for image in images]
    for crop, image in zip(resize_crops(pixels, SPEC).numpy(), images, strict=True):
        np.testing.assert_array_equal(crop, preprocess_image(encode(image, "PNG"), SPEC))


def test_decode_crops_equals_the_pillow_path(photos):
    rng = np.random.default_rng(3)
    contents = []
    for photo in photos.values():
        crop = support.random_crop(photo, rng)
        contents += [encode(crop, "JPEG", quality=90), encode(crop.convert("L"), "JPEG", quality=80)]
    chelsea = photos["chelsea"]
    contents += [
        encode(chelsea, "JPEG", quality=75, progressive=True),
        encode(chelsea.convert("CMYK"), "JPEG"),  # CMYK: Pillow's conversion, not the device decoder's
        encode(chelsea, "PNG"),
        encode(chelsea, "JPEG")[:3000],  # truncated: whatever Pillow makes of it
    ]
    on_device = np.asarray([decodable_on_device(c, SPEC) for c in contents])
    assert on_device[:-3].all() and not on_device[-3:-1].any()
    images, errors = decode_crops(contents, on_device, SPEC, CPU)
    for i, content in enumerate(contents):
        try:
            expected, expected_error = preprocess_image(content, SPEC), ""
        except Exception as exc:
            expected, expected_error = np.zeros_like(images[i].numpy()), type(exc).__name__
        assert errors[i].split(":")[0] == expected_error
        np.testing.assert_array_equal(images[i].numpy(), expected, err_msg=f"image {i}")


def test_unreadable_jpeg_becomes_an_error_and_the_batch_survives(photos):
    good = encode(photos["coffee"], "JPEG")
    broken = good[:200] + bytes(len(good) - 200)  # a valid header over zeroed image data
    contents = [good, broken, good]
    images, errors = decode_crops(contents, np.array([True, True, True]), SPEC, CPU)
    expected = preprocess_image(good, SPEC)
    np.testing.assert_array_equal(images[0].numpy(), expected)
    np.testing.assert_array_equal(images[2].numpy(), expected)
    assert errors[0] == errors[2] == ""
    try:  # the broken one ends as the Pillow path ends it: an image, or an error row
        np.testing.assert_array_equal(images[1].numpy(), preprocess_image(broken, SPEC))
    except Exception as exc:
        assert errors[1].startswith(type(exc).__name__)


def test_header_check_refuses_bombs_and_non_images(photos):
    spec = PreprocessSpec.for_model("mnasnet0_5", max_pixels=1000)
    with pytest.raises(ValueError, match="max_pixels=1000"):
        decodable_on_device(encode(photos["coffee"], "JPEG"), spec)
    contents = [encode(photos["coffee"].resize((20, 20)), "JPEG"), b"<html>", FileNotFoundError("gone")]
    read = encoded_batch(["a", "b", "c"], contents)
    assert read["data"][2] == b""
    actor_spec = PreprocessSpec.for_model("mnasnet0_5", max_pixels=1000, decode_on="actor")
    assert decodable_on_device(contents[0], actor_spec)
    batch = decode_batch_on_device(read, actor_spec, CPU)
    assert set(batch) == {"uri", "image", "error"}
    assert batch["error"][0] == "" and batch["error"][1].startswith("UnidentifiedImageError")
    assert batch["error"][2] == "FileNotFoundError: gone"


def test_device_decode_stage_gives_the_pillow_stage_crops(corpus):
    contents = [p.read_bytes() for p in corpus] + [b"not an image", OSError("unreadable")]
    read = encoded_batch([str(i) for i in range(len(contents))], contents)
    on_device = decode_batch_on_device(read, SPEC, CPU)
    on_workers = decode_batch(read, SPEC)
    assert on_device["error"].tolist() == on_workers["error"].tolist()
    assert on_device["error"][-1] == "OSError: unreadable" and sum(e == "" for e in on_device["error"]) == len(corpus)
    np.testing.assert_array_equal(on_device["image"].numpy(), on_workers["image"])


def test_predictor_decoding_gives_the_same_rows(checkpoint_path, corpus):
    checkpoint = resolve_checkpoint("mnasnet0_5", str(checkpoint_path))
    uris = np.asarray([str(p) for p in corpus] + ["bad"], dtype=object)
    contents = [p.read_bytes() for p in corpus] + [b"not an image"]
    actor_spec = PreprocessSpec.for_model("mnasnet0_5", max_pixels=10**9, decode_on="actor")
    read = encoded_batch(uris, contents)
    on_actor = Predictor(checkpoint, top_k=5, device="cpu", spec=actor_spec)(read)
    on_workers = Predictor(checkpoint, top_k=5, device="cpu", spec=SPEC)(decode_batch(read, SPEC))
    assert on_actor.to_pylist() == on_workers.to_pylist()
    assert on_actor.column("status").to_pylist() == ["ok"] * len(corpus) + ["error"]


def test_reduced_precision(checkpoint_path, corpus):
    checkpoint = resolve_checkpoint("mnasnet0_5", str(checkpoint_path))
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        Predictor(checkpoint, top_k=5, device="cpu", precision="fp16")
    batch = decode_batch(encoded_batch([str(p) for p in corpus], [p.read_bytes() for p in corpus]), SPEC)
    _, fp32 = Predictor(checkpoint, top_k=5, device="cpu").predict(batch["image"])
    ids, bf16 = Predictor(checkpoint, top_k=5, device="cpu", precision="bf16").predict(batch["image"])
    # Autocast is in effect (bf16 keeps 8 bits of mantissa, so the scores move) and the output is still a
    # sorted top-k of probabilities. How far they move depends on the weights: this fixture's ridge-fitted
    # classifier amplifies small feature errors, so closeness is measured with benchmarks/gpu_check.py instead.
    assert np.abs(fp32 - bf16).max() > 1e-4
    assert ids.dtype == np.int32 and (np.diff(bf16, axis=1) <= 0).all() and ((bf16 >= 0) & (bf16 <= 1)).all()


def test_decoding_on_threads_keeps_each_image_in_its_place(corpus):
    # CPU model actors decode their batches with Pillow on their own threads (decode_on=actor).
    contents = [p.read_bytes() for p in corpus] + [b"not an image", OSError("unreadable")]
    contents.insert(3, contents.pop(-2))
    read = encoded_batch([str(i) for i in range(len(contents))], contents)
    serial = decode_batch(read, SPEC)
    serial_images, serial_errors = serial["image"], serial["error"]
    with ThreadPoolExecutor(4) as threads:
        decoded = decode_batch(read, SPEC, threads)
    images, errors = decoded["image"], decoded["error"]
    assert errors.tolist() == serial_errors.tolist()
    assert errors[3].startswith("UnidentifiedImageError") and errors[-1] == "OSError: unreadable"
    assert sum(e == "" for e in errors) == len(corpus)
    np.testing.assert_array_equal(images, serial_images)
    assert images[~(errors == "")].max() == 0 and images[errors == ""].any(axis=(1, 2, 3)).all()
