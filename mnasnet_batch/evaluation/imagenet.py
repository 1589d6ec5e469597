"""ImageNet-1k class identity: the sorted wnid list shipped as package data, and its index order."""

from __future__ import annotations

import functools
import re
from importlib import resources

WNIDS_FILE = "imagenet1k_wnids.txt"
WNID_PATTERN = re.compile(r"^n\d{8}$")


@functools.cache
def wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids; position = class index, the order torchvision's category names follow.

    The list is sorted (the convention of class-folder datasets, where index = rank of the folder name);
    ``mnasnet_batch/evaluation/data/imagenet1k_wnids.txt`` names where it was copied from.
    """
    text = resources.files(__package__).joinpath("data", WNIDS_FILE).read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


@functools.cache
def wnid_to_index() -> dict[str, int]:
    """Maps each ImageNet-1k wnid to its class index (0-999)."""
    return {wnid: index for index, wnid in enumerate(wnids())}


def is_wnid(text: str) -> bool:
    """True for a WordNet noun id such as ``n01440764`` (ImageNet-1k's or not)."""
    return bool(WNID_PATTERN.match(text))
