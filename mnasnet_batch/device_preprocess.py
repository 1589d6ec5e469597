"""Decoding and preprocessing on the model's device: JPEG bytes -> uint8 crops equal to the Pillow path.

Used when ``preprocess.decode_on`` is ``actor``: on a GPU, nvJPEG decodes a whole batch and the resize runs as
two matrix products, so CPU cores stop limiting throughput. torchvision's own tensor resize differs from
Pillow's by up to 2 grey levels; this one reproduces Pillow's fixed-point bilinear filter (Resample.c) bit for
bit, so both decode paths feed the model the same pixels wherever the decoders agree.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torchvision.io

from mnasnet_batch.preprocess import PreprocessSpec, preprocess_image

# Pillow's Resample.c keeps 8-bit coefficients as integers with this many fractional bits (32 - 8 - 2).
PRECISION_BITS = 22


@functools.lru_cache(maxsize=8192)
def resize_coefficients(in_size: int, out_size: int, start: int, count: int) -> np.ndarray:
    """Pillow's bilinear (triangle, antialiased) coefficients for output pixels ``start .. start+count``.

    Follows Resample.c's ``precompute_coeffs`` and ``normalize_coeffs_8bpc`` operation for operation in
    float64, including its sequential sum of the weights, so the integer coefficients come out identical.

    Returns:
        A (count, in_size) float64 matrix of integer coefficients (scaled by 2**PRECISION_BITS).
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the triangle filter's support is 1
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(start, start + count) + 0.5) * scale
    # C's (int) truncates toward zero; both bounds are then clamped to the image.
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - xmin
    taps = np.arange(ksize)
    used = taps[None, :] < xmax[:, None]
    distance = np.abs(((taps[None, :] + xmin[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale))
    weights = np.where(used & (distance < 1.0), 1.0 - distance, 0.0)
    # cumsum adds left to right, as the C loop does; a pairwise sum could round differently.
    total = np.cumsum(weights, axis=1)[:, -1:]
    weights = np.divide(weights, total, out=weights, where=total != 0.0)
    fixed = np.floor(0.5 + weights * (1 << PRECISION_BITS))  # every weight is >= 0: (int)(0.5 + w) is floor
    matrix = np.zeros((count, in_size), dtype=np.float64)
    rows = np.repeat(np.arange(count), ksize).reshape(count, ksize)
    columns = np.minimum(taps[None, :] + xmin[:, None], in_size - 1)
    np.add.at(matrix, (rows[used], columns[used]), fixed[used])
    return matrix


def _fixed_point_to_uint8(sums: torch.Tensor) -> torch.Tensor:
    # Resample.c starts each sum at half a unit, shifts right (a floor) and clips to 0..255.
    return (sums + (1 << (PRECISION_BITS - 1))).div_(1 << PRECISION_BITS, rounding_mode="floor").clamp_(0, 255)


@functools.lru_cache(maxsize=512)  # ~1 MB each for photos of ~500 px: one upload per image size seen
def _coefficients(in_size: int, out_size: int, start: int, count: int, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(resize_coefficients(in_size, out_size, start, count)).to(device)


def resize_crop(image: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """Resizes the short side to ``spec.resize_size`` and centre-crops, exactly as Pillow and torchvision do.

    Args:
        image: a (3, H, W) uint8 tensor on any device.

    Returns:
        The (crop, crop, 3) uint8 crop on the same device.
    """
    _, height, width = image.shape
    short, long = min(height, width), max(height, width)
    # torchvision's _compute_resized_output_size: the long side is truncated, not rounded.
    new_long = int(spec.resize_size * long / short)
    new_height, new_width = (spec.resize_size, new_long) if height <= width else (new_long, spec.resize_size)
    crop = spec.crop_size
    # torchvision's center_crop rounds the offsets (half to even, as Python's round).
    top, left = int(round((new_height - crop) / 2.0)), int(round((new_width - crop) / 2.0))
    x = image.to(torch.float64)

    def horizontal_pass(x: torch.Tensor) -> torch.Tensor:  # (3, rows, W) -> (3, rows, crop)
        if new_width == width:  # Pillow skips a pass that keeps the size
            return x[:, :, left : left + crop]
        return _fixed_point_to_uint8(x @ _coefficients(width, new_width, left, crop, x.device).T)

    def vertical_pass(x: torch.Tensor) -> torch.Tensor:  # (3, H, columns) -> (3, crop, columns)
        if new_height == height:
            return x[:, top : top + crop]
        return _fixed_point_to_uint8(_coefficients(height, new_height, top, crop, x.device) @ x)

    # Each pass rounds to 8 bits, so the order matters. Pillow 13 shrinks images more than twice as tall as
    # wide vertically first, all others horizontally first: found by comparing both orders with Pillow over
    # 400 random sizes; tests/test_device_preprocess.py keeps comparing.
    if height > 2 * width and new_height < height:
        x = horizontal_pass(vertical_pass(x))
    else:
        x = vertical_pass(horizontal_pass(x))
    return x.to(torch.uint8).permute(1, 2, 0)  # (3, H, W) -> (H, W, 3), like the Pillow path's arrays


def decode_crops(
    contents: list[bytes], on_device: np.ndarray, spec: PreprocessSpec, device: torch.device
) -> tuple[torch.Tensor, list[str]]:
    """Decodes and preprocesses a batch on ``device``: JPEGs with torchvision.io (nvJPEG on CUDA), the rest,
    and any JPEG the device decoder refuses, with the Pillow path.

    Args:
        contents: encoded images.
        on_device: per image, whether ``preprocess.decodable_on_device`` said yes.

    Returns:
        ``images`` (N, crop, crop, 3) uint8 on ``device``, zeros where the image failed, and per image ""
        or ``"<ExceptionType>: <message>"``.
    """
    images = torch.zeros((len(contents), spec.crop_size, spec.crop_size, 3), dtype=torch.uint8, device=device)
    errors = [""] * len(contents)
    jpegs = [i for i in range(len(contents)) if on_device[i]]
    pillow = [i for i in range(len(contents)) if not on_device[i]]
    for i, image in zip(jpegs, _decode_jpegs([contents[i] for i in jpegs], device), strict=True):
        if image is None:
            pillow.append(i)
        else:
            images[i] = resize_crop(image, spec)
    for i in pillow:
        try:
            images[i] = torch.from_numpy(preprocess_image(contents[i], spec).copy()).to(device)  # Pillow's is read-only
        except Exception as exc:
            errors[i] = f"{type(exc).__name__}: {exc}"
    return images, errors


def _decode_jpegs(contents: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """Decodes JPEGs to (3, H, W) uint8 on ``device`` in one batch; None for any the decoder refuses."""
    if not contents:
        return []
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in contents]
    try:
        return list(torchvision.io.decode_jpeg(encoded, mode=torchvision.io.ImageReadMode.RGB, device=device))
    except RuntimeError:
        # One bad image fails the whole batch: decode one by one to find it.
        decoded = []
        for tensor in encoded:
            try:
                decoded.append(torchvision.io.decode_jpeg(tensor, mode=torchvision.io.ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
        return decoded
