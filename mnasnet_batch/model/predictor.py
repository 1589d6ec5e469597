"""The model actor: uint8 crops in, top-k predictions out, on whatever device the actor holds."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import torch

from mnasnet_batch.decode.device_preprocess import decode_batch_on_device
from mnasnet_batch.decode.preprocess import PreprocessSpec, decode_batch
from mnasnet_batch.model.engine import OnnxRuntimeModel, TorchModel
from mnasnet_batch.model.postprocess import output_table, top_k
from mnasnet_batch.model.weights import Checkpoint, torchvision_weights


def decoded(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The decoder of an actor whose batches the pipeline's decode stage already decoded."""
    return batch


class Predictor:
    """Holds one MnasNet; called with batches of images, returns output rows.

    Args:
        checkpoint: verified weights (the driver checked them before any image was read).
        top_k: how many classes to keep per image.
        device: ``cuda``, ``cpu``, or "" for CUDA when this process sees a GPU.
        num_threads: CPU threads of torch (and of ONNX Runtime); 0 leaves their defaults. Set it to the CPUs the actor
            holds.
        on_batch: called with every output table, the CPU milliseconds its images took to decode, and those the
            model took (all the actor's threads), e.g. to count progress; None calls nothing.
        precision: ``fp32``, or ``fp16`` / ``bf16`` to run the model under autocast (fp16 on CUDA only).
        spec: the preprocessing geometry; with ``spec.decode_on == "actor"`` the actor is called with read batches
            (``uri``, ``data``, ``error``) and decodes them, on a GPU with ``device_preprocess``, on a CPU with
            Pillow on as many threads as torch's. Otherwise (or None) it is called with decoded batches.
        micro_batch: images per forward pass; a batch is split into runs of this many. 0: the engine's own (the
            whole batch on a GPU, ``engine.CPU_MICRO_BATCH`` on a CPU, ``engine.ONNXRUNTIME_MICRO_BATCH`` on ONNX
            Runtime).
        onnx_graph: the checkpoint's model as ``engine.export_onnx`` exported it: the model runs on ONNX Runtime
            (CPU, fp32) instead of torch. None: on torch.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        top_k: int,
        device: str = "",
        num_threads: int = 0,
        on_batch: Callable[[pa.Table, float, float], None] | None = None,
        precision: str = "fp32",
        spec: PreprocessSpec | None = None,
        micro_batch: int = 0,
        onnx_graph: bytes | None = None,
    ):
        on_gpu = torch.cuda.is_available() and onnx_graph is None
        self.device = torch.device(device or ("cuda" if on_gpu else "cpu"))
        if self.device.type == "cuda":
            # fp32 means fp32: on Ampere and later cuDNN would otherwise convolve in TF32 (10-bit mantissa),
            # which moved the fixture's scores by up to 0.08 on an H200.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.benchmark = True  # batches have one shape but the last: pick the fastest kernels
        if self.device.type == "cpu" and num_threads:
            torch.set_num_threads(num_threads)
        if onnx_graph is not None:
            if self.device.type != "cpu" or precision != "fp32":
                raise ValueError("the onnxruntime engine runs fp32 on a CPU")
            self.model = OnnxRuntimeModel(onnx_graph, num_threads)
        else:
            self.model = TorchModel(checkpoint, self.device, precision)
        self.categories = torchvision_weights(checkpoint.model_name).meta["categories"]
        self.top_k = top_k
        self.model_name = checkpoint.model_name
        self.weights_id = checkpoint.weights_id
        self.on_batch = on_batch
        self.micro_batch = micro_batch or self.model.micro_batch
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
        with torch.inference_mode():
            x = self.model.prepare(images)
            step = self.micro_batch or len(x)
            logits = torch.cat([self.model(x[i : i + step]) for i in range(0, len(x), step)])
            return top_k(logits, self.top_k)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        start = time.process_time()
        with torch.inference_mode():
            batch = self.decode(batch)
        decoded_at = time.process_time()
        # CPU time of each image's decoding where the decode stage measured it; else this process's, where the
        # actor's own threads decoded the batch.
        if "decode_ms" in batch:
            decode_ms = float(batch["decode_ms"].sum())
        else:
            decode_ms = (decoded_at - start) * 1000 if self.decode is not decoded else 0.0
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
            self.on_batch(table, decode_ms, (time.process_time() - decoded_at) * 1000)
        return table


def model_ms(checkpoint: Checkpoint, onnx_graph: bytes | None, crop_size: int, images: int = 16) -> float:
    """CPU milliseconds per image of the model on one thread (torch, or ONNX Runtime given ``onnx_graph``), timed
    once after a warm-up on ``images`` crops, as the job's split of CPUs between the stages needs it
    (``costs.split_cpus``). The process's torch threads are as before afterwards."""
    threads = torch.get_num_threads()
    try:
        predictor = Predictor(checkpoint, top_k=1, device="cpu", num_threads=1, onnx_graph=onnx_graph)
        crops = np.random.default_rng(0).integers(0, 256, (images, crop_size, crop_size, 3), dtype=np.uint8)
        predictor.predict(crops)  # warm-up: first calls allocate and pick kernels
        start = time.thread_time()
        predictor.predict(crops)
        return (time.thread_time() - start) * 1000 / images
    finally:
        torch.set_num_threads(threads)
