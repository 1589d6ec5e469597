"""What each MnasNet variant costs and scores: parameters, MACs and FLOPs at 224x224, weights file, accuracy."""

from __future__ import annotations

import functools
import os

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from mnasnet_batch.config import MODEL_NAMES
from mnasnet_batch.model.weights import hub_path, torchvision_weights

# The eval crop every MnasNet weights' transforms() produce, and the resolution published figures refer to.
INPUT_SIZE = 224


@functools.cache
def _count(model_name: str) -> tuple[int, int]:
    """Parameters and FLOPs of the architecture (the weights do not change them), measured once per process."""
    model = torchvision.models.get_model(model_name, weights=None).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE))
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops()


def describe(model_name: str) -> dict:
    """Measures one variant on a (1, 3, 224, 224) input; nothing is downloaded.

    torch.utils.flop_counter counts the convolutions and the classifier's matrix product (batch norm,
    activations and pooling are not counted) and reports 2 FLOPs per multiply-accumulate, so
    ``macs = flops / 2``.

    Returns:
        ``model``, ``params``, ``macs``, ``flops``, ``input_size``, ``resize_size``, ``crop_size``, the weights
        ``file`` name, ``file_size_mb`` (torchvision's metadata), ``file_bytes`` (when the file is in the torch hub
        cache, else None), ``top1`` / ``top5`` (torchvision's published ImageNet-1k accuracy) and
        ``torchvision_gflops`` (the ``_ops`` figure of torchvision's model card).
    """
    weights = torchvision_weights(model_name)
    transforms = weights.transforms()
    params, flops = _count(model_name)
    path = hub_path(weights)
    accuracy = weights.meta["_metrics"]["ImageNet-1K"]
    return {
        "model": model_name,
        "params": params,
        "macs": flops // 2,
        "flops": flops,
        "input_size": INPUT_SIZE,
        "resize_size": transforms.resize_size[0],
        "crop_size": transforms.crop_size[0],
        "file": os.path.basename(weights.url),
        "file_size_mb": weights.meta["_file_size"],
        "file_bytes": path.stat().st_size if path.exists() else None,
        "top1": accuracy["acc@1"],
        "top5": accuracy["acc@5"],
        "torchvision_gflops": weights.meta["_ops"],
    }


def describe_all() -> list[dict]:
    """``describe`` for the four variants, smallest first."""
    return [describe(name) for name in MODEL_NAMES]


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table, for a terminal or docs/model-info.md."""
    header = (
        "| model | params | MACs (M) | FLOPs (M) | torchvision GFLOPS | weights file (MB) | resize -> crop | "
        "top-1 | top-5 |"
    )
    lines = [header, "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['params']:,} | {row['macs'] / 1e6:.2f} | {row['flops'] / 1e6:.2f} | "
            f"{row['torchvision_gflops']} | {row['file_size_mb']} | {row['resize_size']} -> {row['crop_size']} | "
            f"{row['top1']} | {row['top5']} |"
        )
    return "\n".join(lines)
