"""Decoding and preprocessing on the model's device: JPEG bytes -> uint8 crops, batched.

Used when ``preprocess.decode_on`` is ``actor``: on a GPU, nvJPEG decodes a whole batch and the resize runs as
batched gathers and integer multiply-adds, so CPU cores stop limiting throughput. torchvision's own tensor
resize differs from Pillow's by up to 2 grey levels; this one reproduces Pillow's fixed-point bilinear filter
(Resample.c) bit for bit, so the crops differ from the Pillow path's only where the JPEG decoders differ
(libjpeg-turbo on CPU agrees with Pillow exactly; nvJPEG does not, see docs/gpu.md). On a CPU it is far slower
than Pillow (docs/benchmarks.md), so CPU actors decode with Pillow instead (``Predictor``); the tests run this
path on CPU.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torchvision.io

from mnasnet_batch.decode.preprocess import (
    PreprocessSpec,
    decodable_on_device,
    error_message,
    preprocess_image,
    resize_geometry,
)

# Pillow's Resample.c keeps 8-bit coefficients as integers with this many fractional bits (32 - 8 - 2).
PRECISION_BITS = 22
# Padded pixels per resize chunk: bounds the working set (x3 channels, 1 byte in, 4 bytes per partial sum).
CHUNK_PIXELS = 2**26


def resize_coefficients(
    in_sizes: torch.Tensor, out_sizes: torch.Tensor, starts: torch.Tensor, count: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pillow's bilinear (triangle, antialiased) filter taps, per image, for output pixels
    ``start .. start+count`` of a resize from ``in_size`` to ``out_size`` pixels.

    Follows Resample.c's ``precompute_coeffs`` and ``normalize_coeffs_8bpc`` one float64 operation at a
    time (separate kernels, so nothing is fused into a multiply-add) and sums the weights left to right as
    its loop does, so the integer coefficients come out identical.

    Args:
        in_sizes, out_sizes, starts: (N,) int64 tensors on the device.
        length: the padded input length (at least every ``in_size``).

    Returns:
        Per image and output pixel, the int32 coefficients of its taps, scaled by 2**PRECISION_BITS, and the
        input pixel of each tap (N, count, taps); taps beyond an image's filter carry 0 and a valid index.
    """
    scale = in_sizes.double() / out_sizes.double()
    filterscale = scale.clamp(min=1.0)
    support = filterscale * 1.0  # the triangle filter's support is 1
    ksize = int(math.ceil(float(support.max()))) * 2 + 1
    center = (torch.arange(count, device=scale.device)[None, :] + starts[:, None] + 0.5) * scale[:, None]
    # C's (int) truncates toward zero; both bounds are then clamped to the image.
    xmin = torch.trunc((center - support[:, None]) + 0.5).clamp(min=0)
    xmax = torch.minimum(torch.trunc((center + support[:, None]) + 0.5), in_sizes[:, None].double()) - xmin
    taps = torch.arange(ksize, device=scale.device, dtype=torch.float64)
    x = (((taps + xmin[..., None]) - center[..., None]) + 0.5) * (1.0 / filterscale)[:, None, None]
    distance = x.abs()
    weights = torch.where((taps < xmax[..., None]) & (distance < 1.0), 1.0 - distance, 0.0)
    total = weights[..., 0].clone()
    for tap in range(1, ksize):
        total = total + weights[..., tap]
    weights = torch.where(total[..., None] != 0.0, weights / total[..., None], weights)
    fixed = torch.floor(0.5 + weights * (1 << PRECISION_BITS))  # every weight is >= 0: (int)(0.5 + w) is floor
    index = (taps + xmin[..., None]).long().clamp(max=length - 1)  # clamped taps all carry weight 0
    return fixed.int(), index


def _filter(x: torch.Tensor, dim: int, coefficients: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One pass of the separable filter along ``dim`` (2: rows, 3: columns) of (N, 3, H, W) 8-bit values.

    A sum over the filter's taps of gathered pixels times integer coefficients, in int32 as Resample.c does
    (the coefficients of one output add up to 2**22, so a sum stays below 2**31): exact in any order.
    """
    weights, index = coefficients  # (N, count, taps) each
    n, _, height, width = x.shape
    count = weights.shape[1]
    shape = (n, 3, count, width) if dim == 2 else (n, 3, height, count)
    total = torch.full(shape, 1 << (PRECISION_BITS - 1), dtype=torch.int32, device=x.device)  # the rounding half
    for tap in range(weights.shape[2]):
        if dim == 2:
            taken = x.gather(2, index[:, None, :, tap, None].expand(n, 3, count, width))
            total += taken.int() * weights[:, None, :, tap, None]
        else:
            taken = x.gather(3, index[:, None, None, :, tap].expand(n, 3, height, count))
            total += taken.int() * weights[:, None, None, :, tap]
    # Resample.c shifts right (a floor) and clips to 0..255.
    return (total >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def resize_crops(images: list[torch.Tensor], spec: PreprocessSpec) -> torch.Tensor:
    """Resizes each image's short side to ``spec.resize_size`` and centre-crops, as Pillow and torchvision do.

    Args:
        images: (3, H, W) uint8 tensors, all on one device, of any sizes.

    Returns:
        (N, crop, crop, 3) uint8 crops on the same device.
    """
    crop = spec.crop_size
    device = images[0].device if images else torch.device("cpu")
    out = torch.empty((len(images), crop, crop, 3), dtype=torch.uint8, device=device)
    geometry = []
    for image in images:
        _, height, width = image.shape
        geometry.append((height, width, *resize_geometry(height, width, spec)))
    # Each pass rounds to 8 bits, so the order matters. Pillow 13 shrinks images more than twice as tall as
    # wide vertically first, all others horizontally first: found by comparing both orders with Pillow over
    # 400 random sizes; tests/test_device_preprocess.py keeps comparing.
    tall = [h > 2 * w and new_h < h for h, w, new_h, *_ in geometry]
    for vertical_first in (True, False):
        group = [i for i in range(len(images)) if tall[i] == vertical_first]
        group.sort(key=lambda i: geometry[i][0] * geometry[i][1])  # similar sizes pad less
        while group:
            chunk = [group.pop(0)]
            while group and (len(chunk) + 1) * _padded(geometry, chunk + group[:1]) <= CHUNK_PIXELS:
                chunk.append(group.pop(0))
            out[chunk] = _resize_chunk([images[i] for i in chunk], [geometry[i] for i in chunk], crop, vertical_first)
    return out


def _padded(geometry: list[tuple[int, ...]], chunk: list[int]) -> int:
    return max(geometry[i][0] for i in chunk) * max(geometry[i][1] for i in chunk)


def _resize_chunk(images: list[torch.Tensor], geometry: list[tuple[int, ...]], crop: int, vertical_first: bool):
    device = images[0].device
    height = max(g[0] for g in geometry)
    width = max(g[1] for g in geometry)
    x = torch.zeros((len(images), 3, height, width), dtype=torch.uint8, device=device)
    for j, image in enumerate(images):
        x[j, :, : image.shape[1], : image.shape[2]] = image
    h, w, new_h, new_w, top, left = (torch.tensor(column, device=device) for column in zip(*geometry, strict=True))
    horizontal = resize_coefficients(w, new_w, left, crop, width)
    vertical = resize_coefficients(h, new_h, top, crop, height)
    if vertical_first:
        x = _filter(_filter(x, 2, vertical), 3, horizontal)
    else:
        x = _filter(_filter(x, 3, horizontal), 2, vertical)
    return x.permute(0, 2, 3, 1)  # (N, 3, crop, crop) -> (N, crop, crop, 3)


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
    decoded = []
    for i, image in zip(jpegs, _decode_jpegs([contents[i] for i in jpegs], device), strict=True):
        if image is None:
            pillow.append(i)
        else:
            decoded.append((i, image))
    if decoded:
        images[[i for i, _ in decoded]] = resize_crops([image for _, image in decoded], spec)
    for i in pillow:
        try:
            images[i] = torch.from_numpy(preprocess_image(contents[i], spec).copy()).to(device)  # Pillow's is read-only
        except Exception as exc:
            errors[i] = error_message(exc)
    return images, errors


def decode_batch_on_device(
    batch: dict[str, np.ndarray], spec: PreprocessSpec, device: torch.device
) -> dict[str, np.ndarray]:
    """The decode stage on the model actor's device (``preprocess.decode_on=actor``), as ``preprocess.decode_batch``.

    Each image's header says whether the device decoder takes it (``decodable_on_device``) or refuses it as
    no image or over ``max_pixels``; ``decode_crops`` decodes the rest.

    Returns:
        ``uri``; ``image`` (N, crop, crop, 3) uint8 on ``device``, zeros where the image failed; ``error``;
        ``kept``, as read, where the input keeps columns.
    """
    errors = np.array(batch["error"], dtype=object)  # a copy: decoding adds errors
    on_device = np.zeros(len(errors), dtype=bool)
    for i in np.flatnonzero(errors == ""):
        try:
            on_device[i] = decodable_on_device(batch["data"][i], spec)
        except Exception as exc:
            errors[i] = error_message(exc)
    readable = np.flatnonzero(errors == "")
    crops, decode_errors = decode_crops([batch["data"][i] for i in readable], on_device[readable], spec, device)
    images = torch.zeros((len(errors), spec.crop_size, spec.crop_size, 3), dtype=torch.uint8, device=device)
    images[torch.from_numpy(readable)] = crops
    errors[readable] = decode_errors
    decoded = {"uri": np.asarray(batch["uri"], dtype=object), "image": images, "error": errors}
    if "kept" in batch:  # the dataset's kept values go on to the output rows (inputs.kept)
        decoded["kept"] = batch["kept"]
    return decoded


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
