"""MnasNet variants, torchvision's weights for them, and verified checkpoint loading."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torchvision.models import WeightsEnum, get_model_weights

from mnasnet_batch.storage import Storage

log = logging.getLogger(__name__)

# Seconds a download may stall before it counts as offline; torch.hub itself waits forever.
DOWNLOAD_TIMEOUT_S = 30
# What every refusal to load a file says the file must be.
STATE_DICT_ADVICE = "the file must be a state_dict saved with torch.save(model.state_dict(), path)"


class WeightsError(RuntimeError):
    """Weights that cannot be found, read, verified or fitted to the model; the message says what to do."""


@dataclass(frozen=True)
class Checkpoint:
    """A verified state_dict file, kept as bytes so the driver can ship it to every model actor."""

    model_name: str
    data: bytes
    # The enum member name for torchvision's weights (``IMAGENET1K_V1``), else the file's sha256.
    weights_id: str
    source: str


def torchvision_weights(model_name: str) -> WeightsEnum:
    """The weights enum member that defines ``model_name``'s preprocessing, classes and published accuracy."""
    return get_model_weights(model_name).IMAGENET1K_V1


def hub_path(weights: WeightsEnum) -> Path:
    """Where torch.hub keeps (or would download) torchvision's file for ``weights``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _published_file_names() -> dict[str, str]:
    """torchvision's MnasNet file names mapped to the sha256 prefix each name carries."""
    names = {}
    for model_name in ("mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3"):
        for member in get_model_weights(model_name):
            name = os.path.basename(member.url)
            names[name] = torch.hub.HASH_REGEX.search(name).group(1)
    return names


def resolve_checkpoint(
    model_name: str,
    weights: str,
    sha256: str = "",
    download: bool = True,
    storage: Storage | None = None,
) -> Checkpoint:
    """Finds, reads and verifies the weights for a job, before any image is read.

    Args:
        model_name: one of torchvision's MnasNet builders, e.g. ``mnasnet0_5``.
        weights: an enum member name of the model's weights (``IMAGENET1K_V1``, ``DEFAULT``), or a local
            path or fsspec URI of a state_dict file.
        sha256: when set, the file's full sha256 must equal it.
        download: fetch torchvision's file into the torch hub cache when it is absent.
        storage: the job's storage handle, for a ``weights`` URI; None reads local files and anonymous URIs.

    Returns:
        The verified checkpoint; its state_dict is known to fit the architecture.

    Raises:
        WeightsError: the file is absent, unreadable, fails a hash check or does not fit ``model_name``.
    """
    members = get_model_weights(model_name).__members__
    if weights in members:
        member = members[weights]
        path = hub_path(member)
        if not path.exists():
            _download(member.url, path, download)
        source, weights_id = str(path), member.name
    else:
        source, weights_id = weights, ""
    data = _read(source, storage or Storage())
    if not data:
        raise WeightsError(
            f"weights file {source} is empty (0 bytes), e.g. from an interrupted copy or download; {STATE_DICT_ADVICE}"
        )
    digest = hashlib.sha256(data).hexdigest()
    prefix = _published_file_names().get(os.path.basename(source.rstrip("/")))
    if prefix and not digest.startswith(prefix):
        raise WeightsError(
            f"weights {source} fail verification: sha256 {digest[:12]}... does not start with {prefix}, "
            f"the prefix in torchvision's file name; the file is corrupt or altered, delete it and download it again"
        )
    if sha256 and digest != sha256.lower():
        raise WeightsError(
            f"weights {source} fail verification: sha256 is {digest}, model.sha256 expects {sha256.lower()}"
        )
    checkpoint = Checkpoint(model_name=model_name, data=data, weights_id=weights_id or digest, source=source)
    build_model(checkpoint)  # a file that does not fit the architecture fails here, not in the actors
    return checkpoint


def _download(url: str, path: Path, allowed: bool) -> None:
    instructions = (
        f"download {url} and put it at {path} (the torch hub cache; TORCH_HOME moves it), "
        f"or pass --weights PATH_OR_URI of a state_dict"
    )
    if not allowed:
        raise WeightsError(f"weights file {path} not found and model.download is false: {instructions}")
    log.info("downloading %s to %s", url, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=None, progress=False)
    except Exception as exc:  # offline, proxy refused, DNS failure, HTTP error: all end the same way
        raise WeightsError(f"weights file {path} not found and the download failed ({exc}): {instructions}") from None
    finally:
        socket.setdefaulttimeout(previous)


def _read(source: str, storage: Storage) -> bytes:
    try:
        return storage.read_bytes(source)
    except FileNotFoundError:
        raise WeightsError(f"weights file {source} not found; pass --weights with an existing path or URI") from None
    except Exception as exc:
        raise WeightsError(f"cannot read weights {source}: {type(exc).__name__}: {exc}") from None


def _load_failure(exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in our words.

    torch's own messages advise retrying with ``weights_only=False``, which runs whatever code the file holds;
    none of their text is passed on to users.
    """
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if refused:
        return f"it holds a pickled {refused.group(1).rstrip('.')}, not only tensors (unpickling it would run code)"
    if "Weights only load failed" in str(exc) or type(exc).__name__ == "UnpicklingError":
        return "it holds pickled data that is not tensors (unpickling it would run code)"
    if isinstance(exc, EOFError):
        return "it ends before its data does (truncated)"
    return f"it is not a file torch.save writes ({type(exc).__name__})"


def build_model(checkpoint: Checkpoint) -> torch.nn.Module:
    """Builds torchvision's architecture and loads the checkpoint into it, strictly.

    Returns:
        The model in eval mode on the CPU.

    Raises:
        WeightsError: the file is not a plain state_dict, or its keys or shapes do not fit the architecture.
    """
    try:
        state_dict = torch.load(io.BytesIO(checkpoint.data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"weights {checkpoint.source} cannot be loaded: {_load_failure(exc)}; {STATE_DICT_ADVICE}"
        ) from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise WeightsError(
            f"weights {checkpoint.source} are not a state_dict (a mapping of names to tensors); {STATE_DICT_ADVICE}"
        )
    model = torchvision.models.get_model(checkpoint.model_name, weights=None)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or mismatched:
        problems = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        details = ", ".join(f"{len(keys)} {what} (e.g. {keys[0]})" for what, keys in problems if keys)
        raise WeightsError(
            f"weights {checkpoint.source} do not fit {checkpoint.model_name}: {details}; "
            f"pass the --model the checkpoint was trained as"
        )
    model.load_state_dict(state_dict)
    return model.eval()
