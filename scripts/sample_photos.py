"""Writes the README quickstart's sample photos, offline: scikit-image's eight colour photos, as JPEG and PNG.

    .venv/bin/python scripts/sample_photos.py ./sample
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# scikit-image's colour photos (its data module's loaders), and the format each is written in: JPEG and PNG, as
# photo folders hold them.
PHOTOS = {
    "astronaut": "jpg",
    "chelsea": "jpg",
    "coffee": "jpg",
    "rocket": "jpg",
    "stereo_motorcycle": "png",
    "hubble_deep_field": "jpg",
    "immunohistochemistry": "png",
    "retina": "jpg",
}


def write_samples(folder: Path) -> list[Path]:
    """Writes the photos into ``folder`` (created if absent); returns their paths."""
    try:
        import skimage.data
    except ImportError:
        raise SystemExit("error: the sample photos come from scikit-image: pip install scikit-image") from None
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, extension in PHOTOS.items():
        array = getattr(skimage.data, name)()
        image = Image.fromarray(array[0] if isinstance(array, tuple) else array).convert("RGB")
        path = folder / f"{name}.{extension}"
        image.save(path, quality=90) if extension == "jpg" else image.save(path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where to write them")
    args = parser.parse_args(argv)
    written = write_samples(args.folder)
    print(f"wrote {len(written)} photos to {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
