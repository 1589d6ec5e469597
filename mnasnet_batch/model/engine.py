"""The model as the actors run it: torch, or ONNX Runtime on CPU actors, chosen once by the driver."""

from __future__ import annotations

import functools
import io
import logging
import warnings

import numpy as np
import torch

from mnasnet_batch.config import ONNXRUNTIME_EXTRA, ComputeConfig, ConfigError, onnxruntime_installed, require_installed
from mnasnet_batch.model.weights import Checkpoint, build_model, torchvision_weights

log = logging.getLogger(__name__)

# Images per forward pass on a CPU: a run of 8 keeps the activations of each layer in the core's caches, which
# a whole model batch overflows (docs/benchmarks.md).
CPU_MICRO_BATCH = 8
# Images per ONNX Runtime run: its blocked (NCHWc) convolutions use larger runs better than torch's
# (docs/benchmarks.md, "ONNX Runtime").
ONNXRUNTIME_MICRO_BATCH = 16
# 17: what the TorchScript-based exporter writes for MnasNet as it is (torch 2.14's dynamo exporter writes 18 and
# failed converting the graph down to 17), and what the ONNX Runtime releases in pyproject.toml's range run.
ONNX_OPSET = 17


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


class NormalisedModel(torch.nn.Module):
    """MnasNet (BN folded) behind torchvision's normalisation: (N, H, W, 3) uint8 crops in, logits out."""

    def __init__(self, checkpoint: Checkpoint):
        super().__init__()
        transforms = torchvision_weights(checkpoint.model_name).transforms()
        self.model = fold_batchnorm(build_model(checkpoint))
        self.register_buffer("mean", torch.tensor(transforms.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(transforms.std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # (N, H, W, C) -> (N, C, H, W) as a view: memory in channels_last stays so, which MnasNet's depthwise
        # convolutions run fastest on.
        x = images.permute(0, 3, 1, 2).float().div(255)
        # The same operations, in the same order, as torchvision's ToTensor + Normalize.
        return self.model(x.sub(self.mean).div(self.std))


class TorchModel:
    """The model on torch, on the actor's device, in fp32 or under fp16/bf16 autocast."""

    def __init__(self, checkpoint: Checkpoint, device: torch.device, precision: str = "fp32"):
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("compute.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
        self.device = device
        self.autocast_dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.model = NormalisedModel(checkpoint).eval().to(device, memory_format=torch.channels_last)
        self.micro_batch = CPU_MICRO_BATCH if device.type == "cpu" else 0

    def prepare(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A whole batch of (N, H, W, 3) uint8 crops, from host memory or the device, on the device."""
        x = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
        if self.device.type == "cuda" and x.device.type == "cpu":
            # Page-locked memory lets the copy run asynchronously, overlapping the previous batch.
            x = x.pin_memory()
        return x.to(self.device, non_blocking=True)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of one run of crops from ``prepare``."""
        if self.autocast_dtype is None:
            return self.model(images)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            return self.model(images)


class OnnxRuntimeModel:
    """The model as an ONNX graph (``export_onnx``) on ONNX Runtime's CPU provider.

    Args:
        graph: the exported graph.
        num_threads: intra-op threads: the CPUs the actor holds; 0 leaves ONNX Runtime's default (every core).
    """

    def __init__(self, graph: bytes, num_threads: int = 0):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        # All optimisations: the layout transform to blocked NCHWc convolutions is where the speed is.
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL  # one chain of layers: nothing to overlap
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        # Idle threads sleep instead of spinning: the actor shares its node with decode tasks, whose CPU time a
        # spinning thread would take between runs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.device = torch.device("cpu")
        self.micro_batch = ONNXRUNTIME_MICRO_BATCH

    def prepare(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """A whole batch of (N, H, W, 3) uint8 crops as one contiguous array in host memory."""
        return np.ascontiguousarray(images.numpy() if isinstance(images, torch.Tensor) else images)

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        """Logits of one run of crops from ``prepare``."""
        (logits,) = self.session.run(None, {"images": images})
        return torch.from_numpy(logits)


@functools.lru_cache(maxsize=1)
def export_onnx(checkpoint: Checkpoint) -> bytes:
    """The checkpoint's model behind its normalisation, as an ONNX graph with a dynamic batch dimension.

    The legacy (TorchScript) exporter, pinned: it writes the same bytes for the same weights every time, at the
    opset asked for, in less time than the dynamo exporter (docs/benchmarks.md). The last graph is kept, so the
    driver exports a job's model once (``export_ahead``).
    """
    model = NormalisedModel(checkpoint).eval()
    example = torch.zeros(2, 224, 224, 3, dtype=torch.uint8)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # torch announces the legacy exporter's deprecation on every call; the graph it writes is what is tested.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )
    return buffer.getvalue()


def export_ahead(compute: ComputeConfig, checkpoint: Checkpoint) -> bytes | None:
    """Exports the model where the actors are likely to run it on ONNX Runtime (``choose_engine`` decides once the
    cluster is known), so that the driver does it while Ray starts, not after.

    Returns:
        The graph (``export_onnx``, which keeps it), or None where the actors are likely to run torch.
    """
    cpu_actors = compute.device == "cpu" or (compute.device == "auto" and not torch.cuda.is_available())
    if compute.engine == "onnxruntime" or (
        compute.engine == "auto" and cpu_actors and compute.precision == "fp32" and onnxruntime_installed()
    ):
        return export_onnx(checkpoint)
    return None


def choose_engine(engine: str, gpu_actors: bool, precision: str = "fp32") -> str:
    """The engine the model actors run: ``torch`` or ``onnxruntime``.

    ``auto`` is ONNX Runtime on CPU actors in fp32 where it is installed, torch otherwise (GPU actors, fp16/bf16
    autocast, no ONNX Runtime).

    Raises:
        ConfigError: ``onnxruntime`` for GPU actors, or where it is not installed.
    """
    if engine == "onnxruntime" and gpu_actors:
        raise ConfigError(
            "compute.engine=onnxruntime runs the model on CPU actors, and this cluster's actors hold GPUs: "
            "use compute.engine=auto or torch, or compute.device=cpu"
        )
    require_installed(engine)
    if engine != "auto":
        return engine
    if gpu_actors or precision != "fp32":
        return "torch"
    if not onnxruntime_installed():
        log.info(
            "compute.engine=auto: ONNX Runtime is not installed, so the model runs on torch (pip install '%s')",
            ONNXRUNTIME_EXTRA,
        )
        return "torch"
    return "onnxruntime"
