"""Phone photos: the 12 MP corpus the benchmarks use, HEIC / HEIF and AVIF files."""

import numpy as np
from PIL import Image, ImageOps

from tests import support


def test_photo_corpus_holds_landscapes_portraits_and_sideways_portraits(tmp_path):
    paths = support.write_photo_corpus(tmp_path, 4, size=(400, 300), heic_every=4)
    jpegs = [p for p in paths if p.suffix == ".jpg"]
    assert len(jpegs) == 4 and [p.suffix for p in paths].count(".heic") == 1
    shown = {}
    for path in jpegs:
        with Image.open(path) as image:
            orientation = image.getexif().get(support.ORIENTATION_TAG, 1)
            shown[int(path.stem[-5:])] = (image.size, orientation, ImageOps.exif_transpose(image).size)
    assert shown == {
        0: ((400, 300), 1, (400, 300)),
        1: ((400, 300), 1, (400, 300)),
        2: ((300, 400), 1, (300, 400)),
        3: ((400, 300), support.SIDEWAYS, (300, 400)),  # stored sideways, shown upright
    }
    # The HEIC copy is the sideways photo's upright picture, near its JPEG (two lossy codecs apart).
    heic = next(p for p in paths if p.suffix == ".heic")
    assert heic.stem == jpegs[3].stem
    import pillow_heif

    upright = np.asarray(ImageOps.exif_transpose(Image.open(jpegs[3])).convert("RGB"), np.float32)
    copy = np.asarray(pillow_heif.open_heif(heic).to_pillow().convert("RGB"), np.float32)
    assert copy.shape == upright.shape and np.abs(copy - upright).mean() < 8
