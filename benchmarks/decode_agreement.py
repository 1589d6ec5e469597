"""How far fast decoding and decoding on a CPU model actor are from the exact path, on 12 MP phone photos.

For each variant against the exact path (Pillow on the decode tasks, every pixel decoded): the 224 crops' mean and
max absolute difference in grey levels, and top-1 / top-5 agreement of a test checkpoint. The published weights
cannot be fetched here, and a checkpoint fitted to a few photos is fragile (tiny input noise flips its top-1), which
would say nothing about decoding; so this script fits a robust one (many augmented crops, noise copies, a
regularised classifier, batch norm recalibrated), measures how often Gaussian noise of std 0.001 on the normalised
input flips its top-1, and stops unless that is under 2 %.

    .venv/bin/python benchmarks/decode_agreement.py --photos 96 --workdir /tmp/decode-agreement
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnasnet_batch.decode.preprocess import (  # noqa: E402
    FAST_DECODE_MARGIN,
    PreprocessSpec,
    decode_batch,
    decoded_image,
    open_image,
    preprocess_image,
    resize_geometry,
)
from mnasnet_batch.inputs.layout import encoded_batch  # noqa: E402
from mnasnet_batch.model.predictor import Predictor  # noqa: E402
from mnasnet_batch.model.weights import Checkpoint, torchvision_weights  # noqa: E402
from tests import support  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The noise test: Gaussian noise of this std on the normalised input, drawn this many times per photo; a checkpoint
# whose top-1 it flips this often or more is too fragile for agreement to mean anything.
NOISE_STD = 0.001
NOISE_DRAWS = 8
MOST_FLIPS = 0.02
# Photos decoded at once: a 12 MP photo is ~36 MB decoded.
# The shift of every batch norm's output: with 0 (an untrained network's), half of each ReLU's inputs are cut, and
# the untrained MnasNet amplifies input noise layer after layer (std 0.001 moved its pooled features by a quarter of
# their spread between photos); shifted by 2 standard deviations most pass, and the network is smooth, as a trained
# one is, while its features still tell the photos apart.
BATCH_NORM_BIAS = 2.0
DECODE_BATCH = 8
# The other formats photos come in, as --formats saves them: (suffix, Pillow's save options). PNG and TIFF are
# lossless (their pixels are the same at any compression; the quickest to write is used), WebP lossy at a
# camera-like quality.
FORMATS = {
    "png": (".png", {"compress_level": 1}),
    "tiff": (".tiff", {}),
    "webp": (".webp", {"quality": 90, "method": 2}),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=96, help="12 MP photos in the corpus")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/decode-agreement"))
    parser.add_argument("--model", default="mnasnet0_5")
    parser.add_argument("--fit-crops", type=int, default=96, help="augmented crops per source photo to fit on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "decode_agreement.json")
    parser.add_argument(
        "--formats",
        nargs="+",
        choices=sorted(FORMATS),
        default=[],
        help="also measure fast_decode on the same photos saved in these formats (pixels decoded from the JPEGs)",
    )
    return parser


def normalise(crops: np.ndarray, model_name: str) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float, as torchvision's ToTensor + Normalize."""
    transforms = torchvision_weights(model_name).transforms()
    mean = torch.tensor(transforms.mean).view(1, 3, 1, 1)
    std = torch.tensor(transforms.std).view(1, 3, 1, 1)
    return (torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float() / 255 - mean) / std


def logits_of(model: torch.nn.Module, x: torch.Tensor, step: int = 32) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(x[i : i + step]) for i in range(0, len(x), step)])


def training_crops(spec: PreprocessSpec, per_photo: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Crops of the source photos made as the corpus's are seen: random crops and scales, grain, JPEG at 80-95,
    turned a quarter either way or not (the corpus's sideways portraits come in sideways without EXIF applied),
    mirrored or not; then the exact decode, resize and crop. Returns (crops, photo index)."""
    photos = support.load_photos()
    crops, labels = [], []
    for index, photo in enumerate(photos.values()):
        for _ in range(per_photo):
            image = support.random_crop(photo, rng, long_side=int(rng.integers(300, 1400)))
            turn = rng.integers(0, 3)
            if turn:
                image = image.transpose(Image.Transpose.ROTATE_90 if turn == 1 else Image.Transpose.ROTATE_270)
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            pixels = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(0, 6), (image.height, image.width, 3))
            buffer = io.BytesIO()
            Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8)).save(
                buffer, format="JPEG", quality=int(rng.integers(80, 96))
            )
            crops.append(preprocess_image(buffer.getvalue(), spec))
            labels.append(index)
    return np.stack(crops), np.asarray(labels)


def robust_model(model_name: str, spec: PreprocessSpec, per_photo: int, seed: int) -> torch.nn.Module:
    """A MnasNet that maps each source photo to its own class with a wide margin, whatever the crop.

    Batch norm is shifted (``BATCH_NORM_BIAS``) and recalibrated on the augmented crops (momentum=None: the mean
    over all of them); the classifier is a ridge regression on their features and on those of noisy copies (std 0.02
    on the normalised input, 20x the noise test's), to a target of +12 for the photo's class over a fixed random
    pattern (std 1) per photo, which orders the rest of its top-5. Fitting on hundreds of crops, regularised, leaves
    no direction of the features that noise can swing, unlike a fit to a few crops.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = torchvision.models.get_model(model_name, weights=None)
    categories = torchvision_weights(model_name).meta["categories"]
    crops, labels = training_crops(spec, per_photo, rng)
    x = normalise(crops, model_name)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
            torch.nn.init.constant_(module.bias, BATCH_NORM_BIAS)
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), 64):
            model(x[i : i + 64])
    model.eval()
    noisy = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    with torch.inference_mode():
        features = torch.cat([model.layers(batch).mean([2, 3]) for batch in (x, noisy) for batch in batch.split(64)])
    classes = torch.tensor([categories.index(name) for name in support.PHOTOS.values()])
    patterns = torch.randn(len(classes), len(categories), generator=torch.Generator().manual_seed(seed + 1))
    index = torch.from_numpy(np.concatenate([labels, labels]))
    target = patterns[index].clone()
    target[torch.arange(len(index)), classes[index]] += 12
    mean = features.mean(0)
    centred = features - mean
    gram = centred.T @ centred
    ridge = 0.1 * gram.trace() / gram.shape[0] * torch.eye(gram.shape[0])
    weight = torch.linalg.solve(gram + ridge, centred.T @ (target - target.mean(0)))
    with torch.no_grad():
        model.classifier[1].weight.copy_(weight.T)
        model.classifier[1].bias.copy_(target.mean(0) - mean @ weight)
    return model


def decoded(paths: list[Path], decode) -> np.ndarray:
    """The crops of ``paths`` as ``decode`` (a read batch -> a decoded batch) makes them, a few photos at a time."""
    crops = []
    for start in range(0, len(paths), DECODE_BATCH):
        chunk = paths[start : start + DECODE_BATCH]
        batch = decode(encoded_batch([str(p) for p in chunk], [p.read_bytes() for p in chunk]))
        assert not any(batch["error"]), batch["error"]
        crops.append(np.asarray(batch["image"]))
    return np.concatenate(crops)


def same_set(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row, whether two (N, k) tensors of class ids hold the same classes, in any order."""
    return (a.sort(1).values == b.sort(1).values).all(1)


def agreement(exact_logits: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """Top-1 the same; the top-5 the same set, and in the same order; how far the exact top-1's score moved."""
    exact_top5 = exact_logits.topk(5).indices
    top5 = logits.topk(5).indices
    # The score of the exact path's top-1 class, in both.
    exact_p = exact_logits.softmax(1).gather(1, exact_top5[:, :1]).squeeze(1)
    p = logits.softmax(1).gather(1, exact_top5[:, :1]).squeeze(1)
    return {
        "top1_agreement": float((top5[:, 0] == exact_top5[:, 0]).float().mean()),
        "top5_same_set": float(same_set(top5, exact_top5).float().mean()),
        "top5_same_order": float((top5 == exact_top5).all(1).float().mean()),
        "max_top1_score_difference": float((p - exact_p).abs().max()),
    }


def noise_changes(
    model: torch.nn.Module, x: torch.Tensor, logits: torch.Tensor, std: torch.Tensor, generator: torch.Generator
) -> dict[str, float]:
    """How often Gaussian noise of ``std`` (on the normalised input ``x``, per channel) changes the top-1, the top-5
    set and the top-5 order of ``logits`` (``x``'s), over ``NOISE_DRAWS`` draws per image."""
    top5 = logits.topk(5).indices
    flips = set_changes = order_changes = 0
    for _ in range(NOISE_DRAWS):
        noisy = logits_of(model, x + torch.randn(x.shape, generator=generator) * std).topk(5).indices
        flips += int((noisy[:, 0] != top5[:, 0]).sum())
        set_changes += int((~same_set(noisy, top5)).sum())
        order_changes += int((noisy != top5).any(1).sum())
    trials = NOISE_DRAWS * len(x)
    return {
        "trials": trials,
        "top1_flip_rate": flips / trials,
        "top5_set_change_rate": set_changes / trials,
        "top5_order_change_rate": order_changes / trials,
    }


def transcoded(paths: list[Path], name: str, directory: Path) -> list[Path]:
    """The photos' upright pixels (EXIF orientation applied, none recorded) saved in format ``name`` under
    ``directory``; files already there are kept."""
    suffix, options = FORMATS[name]
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for path in paths:
        target = directory / (path.stem + suffix)
        if not target.exists():
            with Image.open(path) as image:
                ImageOps.exif_transpose(image).convert("RGB").save(target, **options)
        out.append(target)
    return out


def reduced_crop(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """What fast decoding did to formats other than JPEG before 2026-12-07, for the comparison: a full decode, then
    ``Image.reduce`` by the largest integer factor keeping the short side at ``FAST_DECODE_MARGIN`` times the resize
    target, then the reference's resize and crop."""
    with open_image(data, spec) as image:
        rgb = decoded_image(image, spec)
    factor = max(1, min(rgb.size) // (FAST_DECODE_MARGIN * spec.resize_size))
    if factor > 1:
        rgb = rgb.reduce(factor)
    height, width, top, left = resize_geometry(rgb.height, rgb.width, spec)
    resized = rgb.resize((width, height), resample=spec.resample)
    return np.asarray(resized.crop((left, top, left + spec.crop_size, top + spec.crop_size)), dtype=np.uint8)


def by_format(
    model: torch.nn.Module, paths: list[Path], name: str, workdir: Path, exact: PreprocessSpec, model_name: str
) -> dict:
    """A reduced decode against the exact path on the photos saved as ``name``: for JPEG, ``fast_decode`` (DCT
    scaling); for the other formats, a full decode then ``Image.reduce`` (``reduced_crop``), which fast decoding
    no longer does. Crops, agreement, and each path's decode time (both timed in the same pass, photo by photo, so
    that other load on the machine falls on both alike)."""
    files = paths if name == "jpeg" else transcoded(paths, name, workdir / f"{paths[0].parent.name}-{name}")
    fast = dataclasses.replace(exact, fast_decode=True)
    variants = {
        "exact": lambda data: preprocess_image(data, exact),
        "reduced": (lambda data: preprocess_image(data, fast))
        if name == "jpeg"
        else (lambda d: reduced_crop(d, exact)),
    }
    crops = {variant: [] for variant in variants}
    seconds = dict.fromkeys(variants, 0.0)
    for path in files:
        data = path.read_bytes()
        for variant, crop in variants.items():
            started = time.perf_counter()
            crops[variant].append(crop(data))
            seconds[variant] += time.perf_counter() - started
    exact_crops, reduced_crops = (np.stack(crops[v]) for v in variants)
    difference = np.abs(reduced_crops.astype(np.int16) - exact_crops.astype(np.int16))
    megabytes = [p.stat().st_size / 2**20 for p in files]
    return {
        "format": name,
        "reduced_by": "fast_decode (Image.draft)" if name == "jpeg" else "full decode, then Image.reduce",
        "save_options": FORMATS.get(name, ("", "as written, quality 88-95"))[1],
        "megabytes_mean": float(np.mean(megabytes)),
        "mean_abs_pixel_difference": float(difference.mean()),
        "max_abs_pixel_difference": int(difference.max()),
        "largest_per_photo_mean": float(difference.reshape(len(files), -1).mean(1).max()),
        "ms_per_image": {v: 1000 * s / len(files) for v, s in seconds.items()},
        "fast_decode_is_exact": bool(
            name != "jpeg" and np.array_equal(preprocess_image(files[0].read_bytes(), fast), exact_crops[0])
        ),
        **agreement(
            logits_of(model, normalise(exact_crops, model_name)),
            logits_of(model, normalise(reduced_crops, model_name)),
        ),
    }


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    corpus = args.workdir / f"phone-{args.photos}"
    paths = sorted(corpus.glob("*.jpg"))
    if len(paths) != args.photos:
        started = time.monotonic()
        paths = support.write_photo_corpus(corpus, args.photos, seed=args.seed)
        print(f"wrote {len(paths)} 12 MP photos in {time.monotonic() - started:.0f} s to {corpus}")
    megabytes = [p.stat().st_size / 2**20 for p in paths]

    exact = PreprocessSpec.for_model(args.model, max_pixels=10**9)
    started = time.monotonic()
    model = robust_model(args.model, exact, args.fit_crops, args.seed).eval()
    print(
        f"fitted the robust checkpoint on {args.fit_crops * len(support.PHOTOS)} crops in "
        f"{time.monotonic() - started:.0f} s"
    )
    checkpoint = Checkpoint(args.model, support.checkpoint_bytes(model), "robust-test-checkpoint", "memory")

    # The variants, each against the exact path with the same orientation setting.
    turned = dataclasses.replace(exact, apply_exif_orientation=True)
    actor_spec = dataclasses.replace(exact, decode_on="actor")
    actor = Predictor(checkpoint, 5, device="cpu", num_threads=os.cpu_count() or 1, spec=actor_spec)
    crops = {
        "exact": decoded(paths, lambda b: decode_batch(b, exact)),
        "fast_decode": decoded(paths, lambda b: decode_batch(b, dataclasses.replace(exact, fast_decode=True))),
        # What a CPU model actor decodes with preprocess.decode_on=actor: its own decoder, on its threads.
        "decode_on=actor (CPU)": decoded(paths, actor.decode),
        "exact, EXIF applied": decoded(paths, lambda b: decode_batch(b, turned)),
        "fast_decode, EXIF applied": decoded(
            paths, lambda b: decode_batch(b, dataclasses.replace(turned, fast_decode=True))
        ),
    }
    baseline = {name: ("exact, EXIF applied" if "EXIF" in name else "exact") for name in crops}
    logits = {name: logits_of(model, normalise(c, args.model)) for name, c in crops.items()}

    # The noise test, on the exact crops.
    x = normalise(crops["exact"], args.model)
    generator = torch.Generator().manual_seed(args.seed + 2)
    noise = {"std": NOISE_STD, **noise_changes(model, x, logits["exact"], torch.tensor(NOISE_STD), generator)}
    flips, trials = noise["top1_flip_rate"], noise["trials"]
    best = logits["exact"].topk(2).values
    margin = best[:, 0] - best[:, 1]
    noise["top1_logit_margin_median_least"] = [float(margin.median()), float(margin.min())]
    print(
        f"noise test (std {NOISE_STD} on the normalised input, {trials} trials): top-1 flips {flips:.2%}, "
        f"top-5 set changes {noise['top5_set_change_rate']:.2%}, top-5 order changes "
        f"{noise['top5_order_change_rate']:.2%}; top-1 logit margin over top-2: median "
        f"{float(margin.median()):.2f}, least {float(margin.min()):.2f}"
    )
    if flips >= MOST_FLIPS:
        print(
            f"the checkpoint is too fragile: {flips:.2%} of top-1 flip under noise (at most "
            f"{MOST_FLIPS:.0%}); agreement would say nothing. Fit on more crops (--fit-crops)."
        )
        return 1

    results = {}
    for name in crops:
        if name == baseline[name]:
            continue
        difference = np.abs(crops[name].astype(np.int16) - crops[baseline[name]].astype(np.int16))
        results[name] = {
            "against": baseline[name],
            "mean_abs_pixel_difference": float(difference.mean()),
            "max_abs_pixel_difference": int(difference.max()),
            "largest_per_photo_mean": float(difference.reshape(len(paths), -1).mean(1).max()),
            **agreement(logits[baseline[name]], logits[name]),
        }
        if name == "fast_decode":
            # Random noise of the same mean size, for scale: does decoding's change move predictions more or less
            # than noise would? Gaussian noise of std s has a mean absolute value of s * sqrt(2 / pi).
            levels = float(difference.mean()) * np.sqrt(np.pi / 2)
            std = levels / 255 / torch.tensor(torchvision_weights(args.model).transforms().std).view(1, 3, 1, 1)
            same_size = noise_changes(model, x, logits["exact"], std, generator)
            results["Gaussian noise of that size"] = {
                "against": "exact",
                "std_levels": levels,
                "mean_abs_pixel_difference": float(difference.mean()),
                "top1_agreement": 1 - same_size["top1_flip_rate"],
                "top5_same_set": 1 - same_size["top5_set_change_rate"],
                "top5_same_order": 1 - same_size["top5_order_change_rate"],
                "trials": same_size["trials"],
            }
    # The actor's own output rows too, through its whole call (decode, normalise, forward, top-k).
    rows = [actor(encoded_batch([str(p)], [p.read_bytes()])) for p in paths]
    row_ids = torch.tensor([row.column("top_k_ids")[0].as_py() for row in rows])
    results["decode_on=actor (CPU)"]["rows_top5_same_order"] = float(
        (row_ids == logits["exact"].topk(5).indices).all(1).float().mean()
    )

    print(
        f"{'variant':28} {'against':20} {'mean |d|':>9} {'max |d|':>8} {'top-1':>7} {'top-5 set':>10} "
        f"{'top-5 order':>12}"
    )
    for name, r in results.items():
        most = str(r.get("max_abs_pixel_difference", "-"))
        print(
            f"{name:28} {r['against']:20} {r['mean_abs_pixel_difference']:9.3f} {most:>8} "
            f"{r['top1_agreement']:7.1%} {r['top5_same_set']:10.1%} {r['top5_same_order']:12.1%}"
        )
    report = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, no GPU",
        "command": "python benchmarks/decode_agreement.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "corpus": {
            "photos": len(paths),
            "size": list(support.PHONE_SIZE),
            "megabytes_min_mean_max": [min(megabytes), float(np.mean(megabytes)), max(megabytes)],
            "sideways_with_exif_6": sum(1 for i in range(len(paths)) if i % 4 == 3),
        },
        "model": args.model,
        "checkpoint": f"robust test checkpoint, fitted on {args.fit_crops * len(support.PHOTOS)} augmented crops",
        "noise_test": noise,
        "variants": results,
    }
    if args.formats:
        # The JPEG row for the table beside the others: the same comparison, with the EXIF orientation applied (the
        # other formats are saved upright), timed the same way.
        report["by_format"] = [by_format(model, paths, "jpeg", args.workdir, turned, args.model)] + [
            by_format(model, paths, name, args.workdir, turned, args.model) for name in args.formats
        ]
        print(
            f"{'format':8} {'MB':>5} {'mean |d|':>9} {'max |d|':>8} {'top-1':>7} {'top-5 set':>10} {'exact ms':>9} "
            f"{'reduced ms':>10}"
        )
        for r in report["by_format"]:
            ms = r["ms_per_image"]
            print(
                f"{r['format']:8} {r['megabytes_mean']:5.1f} {r['mean_abs_pixel_difference']:9.3f} "
                f"{r['max_abs_pixel_difference']:8} {r['top1_agreement']:7.1%} {r['top5_same_set']:10.1%} "
                f"{ms['exact']:9.0f} {ms['reduced']:8.0f}"
            )
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
