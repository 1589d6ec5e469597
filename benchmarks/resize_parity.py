"""How far torchvision's antialiased tensor resize is from device_preprocess's exact (Pillow) resize, in grey levels.

Decodes the fixture photos' JPEG crops with Pillow, then resizes + centre-crops each image three ways:
``device_preprocess.resize_crops`` (Pillow's fixed-point filter, bit for bit), torchvision's
``transforms.v2.functional.resize(antialias=True)`` + ``center_crop`` on the uint8 tensor (on a CPU, torch's native
uint8 kernel), and the same on float32 then rounded (what torchvision does with uint8 on a GPU, which has no uint8
antialiased kernel). Prints the level differences and per-image CPU times, and writes them as JSON.

    python benchmarks/resize_parity.py --images 300 --out /tmp/resize_parity.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.transforms.v2 import InterpolationMode  # noqa: E402
from torchvision.transforms.v2 import functional as F  # noqa: E402

from mnasnet_batch.decode.device_preprocess import resize_crops  # noqa: E402
from mnasnet_batch.decode.preprocess import PreprocessSpec, preprocess_image, resize_geometry  # noqa: E402
from tests import support  # noqa: E402


def library_crop(image: torch.Tensor, spec: PreprocessSpec, as_float: bool) -> torch.Tensor:
    """torchvision's resize (short side, antialiased bilinear) + center crop of one (3, H, W) uint8 image, as HWC."""
    x = image.float() if as_float else image
    x = F.resize(x, [spec.resize_size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    x = F.center_crop(x, [spec.crop_size])
    if as_float:  # torchvision's own cast back for uint8 input on a GPU: round, then uint8
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    return x.permute(1, 2, 0)


def pillow_crop(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Pillow's resize + crop of a decoded RGB image, as ``preprocess_image`` does after decoding."""
    height, width, top, left = resize_geometry(image.height, image.width, spec)
    resized = image.resize((width, height), resample=spec.resample)
    return np.asarray(resized.crop((left, top, left + spec.crop_size, top + spec.crop_size)))


def differences(a: np.ndarray, b: np.ndarray) -> dict:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {
        "max_levels": int(diff.max()),
        "mean_levels": float(diff.mean()),
        "share_of_values_differing": float((diff > 0).mean()),
        "histogram": {str(level): int((diff == level).sum()) for level in range(int(diff.max()) + 1)},
    }


def timed(function, repeat: int = 3) -> float:
    """Best of ``repeat`` wall times of ``function()``, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def ms_per_image(spec: PreprocessSpec, images: list[Image.Image], pixels: list[torch.Tensor]) -> dict[str, float]:
    """CPU milliseconds per image of each resize + crop, best of three passes over all images."""
    passes = {
        "pillow_resize_crop": lambda: [pillow_crop(image, spec) for image in images],
        "exact_resize_crop": lambda: resize_crops(pixels, spec),
        "library_uint8_resize_crop": lambda: [library_crop(p, spec, as_float=False) for p in pixels],
        "library_float32_resize_crop": lambda: [library_crop(p, spec, as_float=True) for p in pixels],
    }
    return {name: 1000 * timed(function) / len(pixels) for name, function in passes.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300, help="JPEG crops of the fixture photos (default 300)")
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        # The benchmark corpus's recipe: ~500 px long side, quality 95, a little sensor grain.
        paths = support.write_corpus(Path(tmp), args.images, seed=0, png_every=0, quality=95, grain=3.0)
        contents = [p.read_bytes() for p in paths]
    images = [Image.open(io.BytesIO(c)).convert("RGB") for c in contents]
    decoded = [np.asarray(image) for image in images]
    pixels = [torch.from_numpy(a.copy()).permute(2, 0, 1) for a in decoded]  # (H, W, 3) -> (3, H, W)

    results = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "torch": torch.__version__,
        "torchvision": __import__("torchvision").__version__,
        "pillow": Image.__version__,
        "images": len(paths),
        "sizes_min_max": [list(min(a.shape[:2] for a in decoded)), list(max(a.shape[:2] for a in decoded))],
        "models": {},
    }
    for model in ("mnasnet0_5", "mnasnet0_75"):  # resize 256 and 232, both crop 224
        spec = PreprocessSpec.for_model(model, max_pixels=10**9)
        pillow = np.stack([preprocess_image(c, spec) for c in contents])
        exact = resize_crops(pixels, spec).numpy()
        native = np.stack([library_crop(p, spec, as_float=False).numpy() for p in pixels])
        via_float = np.stack([library_crop(p, spec, as_float=True).numpy() for p in pixels])
        n = len(pixels)
        entry = {
            "resize_size": spec.resize_size,
            "crop_size": spec.crop_size,
            "exact_vs_pillow": differences(exact, pillow),
            "library_uint8_vs_exact": differences(native, exact),
            "library_float32_vs_exact": differences(via_float, exact),
            "ms_per_image": ms_per_image(spec, images, pixels),
        }
        results["models"][model] = entry
        print(f"{model} (resize {spec.resize_size}, crop {spec.crop_size}), {n} images:")
        for name in ("exact_vs_pillow", "library_uint8_vs_exact", "library_float32_vs_exact"):
            d = entry[name]
            print(
                f"  {name:26s} max {d['max_levels']} levels, mean {d['mean_levels']:.4f}, "
                f"{100 * d['share_of_values_differing']:.2f} % of values differ"
            )
        print("  ms per image: " + ", ".join(f"{k} {v:.2f}" for k, v in entry["ms_per_image"].items()))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
