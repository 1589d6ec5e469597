"""Image formats Pillow reads only with an optional package (HEIC / HEIF) or build (AVIF): which are readable here."""

from __future__ import annotations

import functools
from dataclasses import dataclass

# What `pip install` needs for HEIC / HEIF (pyproject.toml's extra): pillow-heif, whose opener Pillow then uses.
HEIF_EXTRA = "mnasnet-batch[heif]"


@dataclass(frozen=True)
class OptionalFormat:
    """An image format whose files are labeled only where its decoder is installed."""

    extensions: tuple[str, ...]  # lower case, no dot
    install: str  # the command that makes them readable

    def describe(self) -> str:
        """``.heic/.heif``: its extensions, for the log."""
        return "/".join(f".{extension}" for extension in self.extensions)


HEIF = OptionalFormat(("heic", "heif"), f"pip install '{HEIF_EXTRA}'")
# Pillow reads AVIF itself where it was built with libavif (its recent wheels are); an older Pillow does not.
AVIF = OptionalFormat(("avif",), "pip install --upgrade Pillow")


@functools.cache
def heif_installed() -> bool:
    """Whether pillow-heif (the ``heif`` extra) can be imported here."""
    try:
        import pillow_heif  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def avif_readable() -> bool:
    """Whether this Pillow reads AVIF."""
    from PIL import features

    return bool(features.check("avif"))


def unreadable_formats() -> list[OptionalFormat]:
    """The optional formats this process cannot decode; the input listing leaves their files out and counts them."""
    readable = {HEIF: heif_installed(), AVIF: avif_readable()}
    return [image_format for image_format, ok in readable.items() if not ok]


@functools.cache
def register_openers() -> None:
    """Lets Pillow open HEIC / HEIF where pillow-heif is installed: once per process (cached), before the first
    image is opened, so decode tasks and model actors alike read them. Without it, nothing: the listing left such
    files out."""
    if heif_installed():
        import pillow_heif

        pillow_heif.register_heif_opener()
