"""MnasNet variants, torchvision's weights for them, and verified checkpoint loading."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import socket
from collections import OrderedDict
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
# Entries of a training checkpoint that hold the model's weights, looked for in this order (timm's, less its EMA
# entries): a checkpoint with both weights and an EMA of them holds two models, and which one was meant is a guess.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
# Prefixes a training wrapper puts before every key: DistributedDataParallel's and DataParallel's ``module.``,
# torch.compile's ``_orig_mod.`` (nested in either order when both wrap the model).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


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
    _, adapted = _fitted_model(checkpoint)  # a file that does not fit the architecture fails here, not in the actors
    if adapted:
        log.info("weights %s adapted to load into %s: %s", source, model_name, "; ".join(adapted))
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

    The driver (``resolve_checkpoint``) and every model actor load through here, so they adapt a training loop's
    checkpoint the same way (``WRAPPER_KEYS``, ``WRAPPER_PREFIXES``, a missing MNASNet version).

    Returns:
        The model in eval mode on the CPU.

    Raises:
        WeightsError: the file is not a state_dict (nor a training checkpoint holding one), or its keys or shapes
            do not fit the architecture.
    """
    return _fitted_model(checkpoint)[0]


def _fitted_model(checkpoint: Checkpoint) -> tuple[torch.nn.Module, list[str]]:
    """The model with the checkpoint loaded, and what was adapted to load it (empty for a plain state_dict)."""
    try:
        loaded = torch.load(io.BytesIO(checkpoint.data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"weights {checkpoint.source} cannot be loaded: {_load_failure(exc)}; {STATE_DICT_ADVICE}"
        ) from None
    state_dict, adapted = _unwrapped(loaded, checkpoint.source)
    state_dict, stripped = _without_wrapper_prefixes(state_dict)
    adapted += stripped
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
    metadata = getattr(state_dict, "_metadata", None) or {}
    if "version" not in metadata.get("", {}):
        # A state_dict rebuilt as a plain dict (a prefix-stripping comprehension) loses the module versions that
        # torch.save keeps, and torchvision's MNASNet refuses to load without its own. Every key and shape fits the
        # current layout, so the current versions describe the file; any the file has are kept.
        current = expected._metadata
        state_dict = OrderedDict(state_dict)
        state_dict._metadata = {name: {**entry, **metadata.get(name, {})} for name, entry in current.items()}
        adapted.append(f"took the missing MNASNet version as {current['']['version']} (the current layout)")
    model.load_state_dict(state_dict)
    return model.eval(), adapted


def _is_state_dict(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values())


def _unwrapped(loaded: object, source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state_dict in what ``torch.load`` returned: itself, or a training checkpoint's ``WRAPPER_KEYS`` entry."""
    if _is_state_dict(loaded):
        return loaded, []
    key = next((k for k in WRAPPER_KEYS if isinstance(loaded, dict) and k in loaded), None)
    if key is None:
        entries = " or ".join(repr(k) for k in WRAPPER_KEYS)
        raise WeightsError(
            f"weights {source} are not a state_dict (a mapping of names to tensors), nor a training checkpoint "
            f"with one under {entries}; {STATE_DICT_ADVICE}"
        )
    if not _is_state_dict(loaded[key]):
        raise WeightsError(
            f"weights {source} hold a {key!r} entry that is not a state_dict (a mapping of names to tensors); "
            f"{STATE_DICT_ADVICE}"
        )
    return loaded[key], [f"took the training checkpoint's {key!r} entry"]


def _without_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state_dict with each ``WRAPPER_PREFIXES`` prefix that every key shares removed, its versions kept."""
    adapted = []
    while state_dict:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state_dict)), None)
        if prefix is None:
            break
        metadata = getattr(state_dict, "_metadata", None)
        state_dict = OrderedDict((k.removeprefix(prefix), v) for k, v in state_dict.items())
        if metadata is not None:
            # The wrapper's own entry ("") goes; the wrapped model's ("module") becomes the root.
            wrapped = prefix.removesuffix(".")
            state_dict._metadata = {
                "" if name == wrapped else name.removeprefix(prefix): entry
                for name, entry in metadata.items()
                if name == wrapped or name.startswith(prefix)
            }
        adapted.append(f"stripped the {prefix!r} prefix from every key")
    return state_dict, adapted
