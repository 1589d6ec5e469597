"""Decoding and preprocessing on CPU workers: image bytes -> uint8 HWC crops, or an error per image."""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mnasnet_batch.decode.formats import register_openers

if TYPE_CHECKING:
    from mnasnet_batch.config import PreprocessConfig

log = logging.getLogger(__name__)

# Decode tasks import this module, and nothing here imports torch: a worker process that loads torch spends
# seconds of CPU on it, which on a small machine are taken from the model. The driver reads the geometry from
# torchvision (``PreprocessSpec.for_model``) and ships it as plain numbers.

# With fast decoding, a JPEG is decoded to a short side of at least this many times the resize target
# (512 px for Resize 256): the antialiased resize after it still averages two or more decoded pixels into each of
# its own, so what the DCT scale leaves out is detail the resize would have averaged away anyway.
FAST_DECODE_MARGIN = 2
# The scales at which libjpeg decodes in the DCT domain (Pillow's ``Image.draft``), largest first.
DRAFT_SCALES = (8, 4, 2)


@dataclass(frozen=True)
class PreprocessSpec:
    """The geometry of torchvision's eval transform for one model, plus the decompression-bomb cap."""

    resize_size: int
    crop_size: int
    resample: int  # Pillow's filter for torchvision's interpolation mode (Image.Resampling.BILINEAR for MnasNet)
    max_pixels: int
    apply_exif_orientation: bool = False
    # "workers": the pipeline's decode stage decodes; "actor": the model actor does (``Predictor``).
    decode_on: str = "workers"
    # Decode large JPEGs at a DCT scale first (``decoded_image``); Pillow's paths only, nvJPEG stays exact.
    fast_decode: bool = False

    @classmethod
    def for_model(
        cls,
        model_name: str,
        max_pixels: int,
        apply_exif_orientation: bool = False,
        decode_on: str = "workers",
        fast_decode: bool = False,
    ) -> PreprocessSpec:
        """Reads resize, crop and interpolation from the model's torchvision weights, never by hand."""
        from torchvision.transforms.functional import pil_modes_mapping

        from mnasnet_batch.model.weights import torchvision_weights

        transforms = torchvision_weights(model_name).transforms()
        return cls(
            resize_size=transforms.resize_size[0],
            crop_size=transforms.crop_size[0],
            resample=int(pil_modes_mapping[transforms.interpolation]),
            max_pixels=max_pixels,
            apply_exif_orientation=apply_exif_orientation,
            decode_on=decode_on,
            fast_decode=fast_decode,
        )

    @classmethod
    def for_config(cls, model_name: str, preprocess: PreprocessConfig) -> PreprocessSpec:
        """``for_model`` with every setting of the ``preprocess`` section that decides how an image is decoded."""
        return cls.for_model(
            model_name,
            preprocess.max_pixels,
            apply_exif_orientation=preprocess.apply_exif_orientation,
            decode_on=preprocess.decode_on,
            fast_decode=preprocess.fast_decode,
        )


# The image each decoding thread is on, for ``_show_warning``.
_decoding = threading.local()
_shown_by_python = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python's ``showwarning`` in decoding processes: a warning raised while a thread decodes an image (Pillow's
    "Corrupt EXIF data", "Truncated File Read") goes to the debug log, once per image and message, named by the
    image's uri; any other is shown as Python shows it."""
    said = getattr(_decoding, "said", None)
    if said is None:
        _shown_by_python(message, category, filename, lineno, file, line)
        return
    text = f"{category.__name__}: {message}"
    if text not in said:
        said.add(text)
        log.debug("%s: %s", _decoding.uri, text)


@contextlib.contextmanager
def warnings_named_by(uri: str) -> Iterator[None]:
    """Routes the warnings raised in this thread while it decodes ``uri`` to the debug log (``_show_warning``)."""
    if warnings.showwarning is not _show_warning:
        warnings.showwarning = _show_warning
        # Every time, not once per place in Pillow's code: each image that has the problem is named.
        warnings.filterwarnings("always", module=r"PIL\.")
    _decoding.uri, _decoding.said = uri, set()
    try:
        yield
    finally:
        _decoding.said = None


@contextlib.contextmanager
def open_image(data: bytes, spec: PreprocessSpec) -> Iterator[Image.Image]:
    """Opens an image from its header only, refusing more than ``spec.max_pixels`` before anything is decoded."""
    # Pillow's own bomb guard warns and raises at fixed thresholds; ours (max_pixels) replaces it.
    Image.MAX_IMAGE_PIXELS = None
    register_openers()  # HEIC / HEIF where pillow-heif is installed; once per process
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if width * height > spec.max_pixels:
            raise ValueError(
                f"image is {width}x{height} = {width * height} pixels, over preprocess.max_pixels={spec.max_pixels}"
            )
        yield image


def preprocess_image(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """Decodes one image and applies torchvision's eval geometry exactly as its PIL path does.

    Pillow decodes (``decoded_image``); the short side is resized with antialiased bilinear (Pillow's) and the
    centre cropped. Normalisation happens later, on the model's device.

    Returns:
        A (crop, crop, 3) uint8 array.

    Raises:
        Exception: whatever makes the image unusable; callers turn it into an error row.
    """
    with open_image(data, spec) as image:
        rgb = decoded_image(image, spec)
    height, width, top, left = resize_geometry(rgb.height, rgb.width, spec)
    # What torchvision's resize and center_crop do with a PIL image: Image.resize (antialiased), Image.crop.
    resized = rgb.resize((width, height), resample=spec.resample)
    cropped = resized.crop((left, top, left + spec.crop_size, top + spec.crop_size))
    return np.asarray(cropped, dtype=np.uint8)


def decoded_image(image: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """An opened image (``open_image``) decoded as the resize takes it: turned upright by its EXIF orientation if
    ``spec.apply_exif_orientation``, in RGB (``convert("RGB")`` handles L, P, RGBA, CMYK and 16-bit modes as
    torchvision's ImageFolder loader does).

    With ``spec.fast_decode``, a JPEG is decoded at the smallest DCT scale whose short side stays at least
    ``FAST_DECODE_MARGIN`` times the resize target (``Image.draft``, ``draft_scale``); smaller JPEGs and every other
    format are decoded exactly. Reducing other formats after a full decode (a box filter) saved 1-16 % of their
    decode time for 4.4x the JPEG path's pixel error (docs/benchmarks.md), so it is not done.
    """
    if spec.fast_decode and image.format == "JPEG":
        scale = draft_scale(*image.size, spec)
        if scale > 1:
            # Requesting the scaled size makes Pillow pick exactly this scale (it picks the largest DCT scale whose
            # image is at least the size asked); the image is then decoded at ceil(side / scale).
            image.draft(image.mode, (image.width // scale, image.height // scale))
    oriented = ImageOps.exif_transpose(image) if spec.apply_exif_orientation else image
    return oriented.convert("RGB")


def draft_scale(width: int, height: int, spec: PreprocessSpec) -> int:
    """The DCT scale (8, 4, 2, or 1: none) fast decoding decodes a JPEG of this size at: the largest whose short
    side is still at least ``FAST_DECODE_MARGIN`` times ``spec.resize_size``."""
    least = FAST_DECODE_MARGIN * spec.resize_size
    return next((scale for scale in DRAFT_SCALES if min(width, height) >= least * scale), 1)


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


def decode_batch(
    batch: dict[str, np.ndarray], spec: PreprocessSpec, threads: Executor | None = None
) -> dict[str, np.ndarray]:
    """The decode stage: each image of a read batch through ``preprocess_image``, an unusable one into an error.

    Runs on ``threads`` if given (Pillow releases the GIL while it decodes and resizes), else one image after the
    other.

    Args:
        batch: as read (``inputs.layout.encoded_batch``): ``uri``, ``data`` and ``error``.

    Returns:
        ``uri``; ``image`` (N, crop, crop, 3) uint8, zeros where the image failed; ``error``, "" where the image
        is usable, else the read's error or ``"<ExceptionType>: <message>"`` of the decode; ``decode_ms``, the CPU
        milliseconds each usable image took (0 for the others), which the job records (``ProgressCounter``);
        ``kept``, as read, where the input keeps columns.
    """
    images = np.zeros((len(batch["uri"]), spec.crop_size, spec.crop_size, 3), dtype=np.uint8)
    spent = np.zeros(len(images), dtype=np.float32)

    def decode(i: int) -> str:
        if batch["error"][i]:  # the read failed
            return batch["error"][i]
        try:
            start = time.thread_time()
            with warnings_named_by(batch["uri"][i]):
                images[i] = preprocess_image(batch["data"][i], spec)
            spent[i] = (time.thread_time() - start) * 1000
            return ""
        except Exception as exc:
            return error_message(exc)

    indices = range(len(images))
    errors = list(threads.map(decode, indices) if threads is not None else map(decode, indices))
    decoded = {
        "uri": np.asarray(batch["uri"], dtype=object),
        "image": images,
        "error": np.asarray(errors, dtype=object),
        "decode_ms": spent,
    }
    return _with_kept(decoded, batch)


def _with_kept(decoded: dict[str, np.ndarray], read: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``decoded`` with the read batch's kept values (``inputs.kept.KEPT``), which go on to the output rows."""
    if "kept" in read:
        decoded["kept"] = read["kept"]
    return decoded
