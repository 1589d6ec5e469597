"""The model actor: uint8 crops in, top-k predictions out, on whatever device the actor holds."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import torch

from mnasnet_batch.device_preprocess import decode_batch_on_device
from mnasnet_batch.postprocess import output_table, top_k
from mnasnet_batch.preprocess import PreprocessSpec, decode_batch
from mnasnet_batch.weights import Checkpoint, build_model, torchvision_weights

# Images per forward pass on a CPU: a run of 8 keeps the activations of each layer in the core's caches, which
# a whole model batch overflows.
CPU_MICRO_BATCH = 8


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Folds every eval-mode BatchNorm2d that directly follows a Conv2d into that convolution.

    MnasNet is built from ``nn.Sequential`` runs of conv -> BN (-> ReLU); folding removes one pass over
    every activation map per layer, with outputs equal to float rounding.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Sequential):
            for i in range(len(module) - 1):
                conv, bn = module[i], module[i + 1]
                if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
                    module[i] = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
                    module[i + 1] = torch.nn.Identity()
    return model


def decoded(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The decoder of an actor whose batches the pipeline's decode stage already decoded."""
    return batch


class Predictor:
    """Holds one MnasNet; called with batches of images, returns output rows.

    Args:
        checkpoint: verified weights (the driver checked them before any image was read).
        top_k: how many classes to keep per image.
        device: ``cuda``, ``cpu``, or "" for CUDA when this process sees a GPU.
        num_threads: torch CPU threads; 0 leaves torch's default. Set it to the CPUs the actor holds.
        on_batch: called with every output table, e.g. to count progress; None calls nothing.
        precision: ``fp32``, or ``fp16`` / ``bf16`` to run the model under autocast (fp16 on CUDA only).
        spec: the preprocessing geometry; with ``spec.decode_on == "actor"`` the actor is called with read batches
            (``uri``, ``data``, ``error``) and decodes them, on a GPU with ``device_preprocess``, on a CPU with
            Pillow on as many threads as torch's. Otherwise (or None) it is called with decoded batches.
        micro_batch: images per forward pass; a batch is split into runs of this many. 0: the whole batch
            on a GPU, ``CPU_MICRO_BATCH`` on a CPU.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        top_k: int,
        device: str = "",
        num_threads: int = 0,
        on_batch: Callable[[pa.Table], None] | None = None,
        precision: str = "fp32",
        spec: PreprocessSpec | None = None,
        micro_batch: int = 0,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("compute.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
        self.autocast_dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        if self.device.type == "cuda":
            # fp32 means fp32: on Ampere and later cuDNN would otherwise convolve in TF32 (10-bit mantissa),
            # which moved the fixture's scores by up to 0.08 on an H200.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.benchmark = True  # batches have one shape but the last: pick the fastest kernels
        if self.device.type == "cpu" and num_threads:
            torch.set_num_threads(num_threads)
        weights = torchvision_weights(checkpoint.model_name)
        transforms = weights.transforms()
        self.model = fold_batchnorm(build_model(checkpoint)).to(self.device, memory_format=torch.channels_last)
        self.mean = torch.tensor(transforms.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(transforms.std, device=self.device).view(1, 3, 1, 1)
        self.categories = weights.meta["categories"]
        self.top_k = top_k
        self.model_name = checkpoint.model_name
        self.weights_id = checkpoint.weights_id
        self.on_batch = on_batch
        self.micro_batch = micro_batch or (CPU_MICRO_BATCH if self.device.type == "cpu" else 0)
        self.decode = decoded
        if spec is not None and spec.decode_on == "actor" and self.device.type == "cpu":
            # Pillow, the reference's decoder, on the actor's threads: decoding and the model take turns on the
            # same cores instead of contending for them.
            threads = ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="decode")
            self.decode = functools.partial(decode_batch, spec=spec, threads=threads)
        elif spec is not None and spec.decode_on == "actor":
            self.decode = functools.partial(decode_batch_on_device, spec=spec, device=self.device)

    def predict(self, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Classifies (N, H, W, 3) uint8 crops, from host memory or already on the device.

        Returns:
            ``top_k_ids`` (N, k) int32 and ``top_k_scores`` (N, k) float32, scores descending.
        """
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            x = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
            if self.device.type == "cuda" and x.device.type == "cpu":
                # Page-locked memory lets the copy run asynchronously, overlapping the previous batch.
                x = x.pin_memory()
            x = x.to(self.device, non_blocking=True)
            step = self.micro_batch or len(x)
            logits = torch.cat([self.forward(x[i : i + step]) for i in range(0, len(x), step)])
            return top_k(logits, self.top_k)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of (n, H, W, 3) uint8 crops on the model's device."""
        # (N, H, W, C) -> (N, C, H, W) as a view: the memory stays channels_last, which MnasNet's
        # depthwise convolutions run fastest on.
        x = images.permute(0, 3, 1, 2).float().div_(255)
        # The same operations, in the same order, as torchvision's ToTensor + Normalize.
        x = x.sub_(self.mean).div_(self.std)
        return self.model(x)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        with torch.inference_mode():
            batch = self.decode(batch)
        ok = batch["error"] == ""
        if ok.any():
            ids, scores = self.predict(batch["image"][ok])
        else:
            ids = np.zeros((0, self.top_k), np.int32)
            scores = np.zeros((0, self.top_k), np.float32)
        table = output_table(
            batch["uri"], batch["error"], ids, scores, self.categories, self.model_name, self.weights_id
        )
        if self.on_batch is not None:
            self.on_batch(table)
        return table
