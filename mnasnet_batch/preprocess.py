"""Decoding and preprocessing on CPU workers: image bytes -> uint8 HWC crops, or an error per image."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mnasnet_batch import storage
from mnasnet_batch.config import StorageConfig

# Decode tasks import this module, and nothing here imports torch: a worker process that loads torch spends
# 5-8 s of CPU on it, which on a small machine is taken from the model. The driver reads the geometry from
# torchvision (``PreprocessSpec.for_model``) and ships it as plain numbers.


@dataclass(frozen=True)
class PreprocessSpec:
    """The geometry of torchvision's eval transform for one model, plus the decompression-bomb cap."""

    resize_size: int
    crop_size: int
    resample: int  # Pillow's filter for torchvision's interpolation mode (Image.Resampling.BILINEAR for MnasNet)
    max_pixels: int
    apply_exif_orientation: bool = False
    # "workers": decode here; "actor": hand the bytes on for the model actor to decode (device_preprocess).
    decode_on: str = "workers"

    @classmethod
    def for_model(
        cls, model_name: str, max_pixels: int, apply_exif_orientation: bool = False, decode_on: str = "workers"
    ) -> PreprocessSpec:
        """Reads resize, crop and interpolation from the model's torchvision weights, never by hand."""
        from torchvision.transforms.functional import pil_modes_mapping

        from mnasnet_batch.weights import torchvision_weights

        transforms = torchvision_weights(model_name).transforms()
        return cls(
            resize_size=transforms.resize_size[0],
            crop_size=transforms.crop_size[0],
            resample=int(pil_modes_mapping[transforms.interpolation]),
            max_pixels=max_pixels,
            apply_exif_orientation=apply_exif_orientation,
            decode_on=decode_on,
        )


@contextlib.contextmanager
def open_image(data: bytes, spec: PreprocessSpec) -> Iterator[Image.Image]:
    """Opens an image from its header only, refusing more than ``spec.max_pixels`` before anything is decoded."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if width * height > spec.max_pixels:
            raise ValueError(
                f"image is {width}x{height} = {width * height} pixels, over preprocess.max_pixels={spec.max_pixels}"
            )
        yield image


def preprocess_image(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """Decodes one image and applies torchvision's eval geometry exactly as its PIL path does.

    Pillow decodes; ``convert("RGB")`` handles L, P, RGBA, CMYK and 16-bit modes as torchvision's
    ImageFolder loader does; the short side is resized with antialiased bilinear (Pillow's) and the
    centre cropped. Normalisation happens later, on the model's device.

    Returns:
        A (crop, crop, 3) uint8 array.

    Raises:
        Exception: whatever makes the image unusable; callers turn it into an error row.
    """
    with open_image(data, spec) as image:
        rgb = (ImageOps.exif_transpose(image) if spec.apply_exif_orientation else image).convert("RGB")
    height, width, top, left = resize_geometry(rgb.height, rgb.width, spec)
    # What torchvision's resize and center_crop do with a PIL image: Image.resize (antialiased), Image.crop.
    resized = rgb.resize((width, height), resample=spec.resample)
    cropped = resized.crop((left, top, left + spec.crop_size, top + spec.crop_size))
    return np.asarray(cropped, dtype=np.uint8)


def resize_geometry(height: int, width: int, spec: PreprocessSpec) -> tuple[int, int, int, int]:
    """The resized height and width, and the top and left of the centre crop, as torchvision computes them.

    The short side becomes ``resize_size`` and the long side is truncated (``_compute_resized_output_size``);
    the crop offsets are rounded half to even, as Python's round in ``center_crop``.
    """
    short, long = min(height, width), max(height, width)
    new_long = int(spec.resize_size * long / short)
    new_height, new_width = (spec.resize_size, new_long) if height <= width else (new_long, spec.resize_size)
    crop = spec.crop_size
    return new_height, new_width, int(round((new_height - crop) / 2.0)), int(round((new_width - crop) / 2.0))


def error_message(exc: Exception) -> str:
    """An error row's message: ``"<ExceptionType>: <message>"``, the same on every run for the same input."""
    if isinstance(exc, UnidentifiedImageError):
        # Pillow names the in-memory buffer by its address (``<_io.BytesIO object at 0x7f...>``): noise that
        # would make two runs over the same bytes disagree.
        return f"{type(exc).__name__}: cannot identify image data (not an image, or a format Pillow cannot read)"
    return f"{type(exc).__name__}: {exc}"


def decodable_on_device(data: bytes, spec: PreprocessSpec) -> bool:
    """Whether the model actor's JPEG decoder may take an image: a JPEG in RGB or greyscale.

    Other formats and modes (CMYK, PNG, ...), and images whose EXIF orientation is to be applied, take the
    Pillow path, whose conversions are the reference's.

    Raises:
        Exception: whatever Pillow raises reading the header (not an image), or ValueError over max_pixels.
    """
    with open_image(data, spec) as image:
        if image.format != "JPEG" or image.mode not in ("RGB", "L"):
            return False
        return not (spec.apply_exif_orientation and image.getexif().get(0x0112, 1) != 1)


def preprocess_batch(
    uris: np.ndarray, contents: list[bytes | Exception], spec: PreprocessSpec
) -> dict[str, np.ndarray]:
    """Preprocesses a batch, turning every unusable image into an error message instead of an exception.

    Returns:
        ``uri``; ``image`` (N, crop, crop, 3) uint8, zeros where the image failed; ``error``, "" where
        the image is usable, else ``"<ExceptionType>: <message>"``. With ``spec.decode_on == "actor"``,
        ``data`` (the encoded bytes, b"" on error) and ``on_device`` (``decodable_on_device``) replace
        ``image``: only the header is read here.
    """
    if spec.decode_on == "actor":
        return _check_batch(uris, contents, spec)
    images, errors = decode_batch(contents, spec)
    return {"uri": np.asarray(uris, dtype=object), "image": images, "error": errors}


def decode_batch(
    contents: list[bytes | Exception], spec: PreprocessSpec, threads: Executor | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decodes and preprocesses each image with ``preprocess_image``, on ``threads`` if given (Pillow releases
    the GIL while it decodes and resizes), else one after the other.

    Returns:
        ``images`` (N, crop, crop, 3) uint8, zeros where the image failed, and per image "" or
        ``"<ExceptionType>: <message>"`` (object array).
    """
    images = np.zeros((len(contents), spec.crop_size, spec.crop_size, 3), dtype=np.uint8)

    def decode(i: int, content: bytes) -> None:
        images[i] = preprocess_image(content, spec)

    return images, _each_image(contents, decode, threads)


def _check_batch(uris: np.ndarray, contents: list[bytes | Exception], spec: PreprocessSpec) -> dict[str, np.ndarray]:
    data = np.full(len(uris), b"", dtype=object)
    on_device = np.zeros(len(uris), dtype=bool)

    def check(i: int, content: bytes) -> None:
        on_device[i] = decodable_on_device(content, spec)
        data[i] = content

    errors = _each_image(contents, check)
    return {"uri": np.asarray(uris, dtype=object), "data": data, "on_device": on_device, "error": errors}


def _each_image(
    contents: list[bytes | Exception], work: Callable[[int, bytes], None], threads: Executor | None = None
) -> np.ndarray:
    """Calls ``work(i, content)`` for each readable image; per image "" or the error message (object array)."""
    # Pillow's own bomb guard warns and raises at fixed thresholds; ours (max_pixels) replaces it.
    Image.MAX_IMAGE_PIXELS = None

    def one(i: int) -> str:
        try:
            if isinstance(contents[i], Exception):  # the read failed
                raise contents[i]
            work(i, contents[i])
            return ""
        except Exception as exc:
            return error_message(exc)

    indices = range(len(contents))
    return np.asarray(list(threads.map(one, indices) if threads is not None else map(one, indices)), dtype=object)


def load_batch(
    batch: dict[str, np.ndarray], spec: PreprocessSpec, storage_config: StorageConfig | None = None
) -> dict[str, np.ndarray]:
    """Reads a batch of image URIs from storage and preprocesses them (the pipeline's CPU stage)."""
    uris = batch["uri"]
    return preprocess_batch(uris, storage.read_many([str(u) for u in uris], storage_config), spec)
