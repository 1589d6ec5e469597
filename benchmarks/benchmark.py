"""Throughput benchmark: this job against the usual alternatives, on the same corpus and checkpoint.

Contenders, each timed as a whole command (start-up included) on the first 500 and the first 2,000 images:

- ``job``: this job, ``python jobs/label_images.py`` (local Ray started by the command), the model on torch
  (``compute.engine=torch``);
- ``job-onnxruntime``: the same command with the model on ONNX Runtime (``compute.engine=onnxruntime``);
- ``torch``: a plain PyTorch script: Dataset + DataLoader + ``weights.transforms()`` on PIL images + eager model;
- ``raydoc``: the Ray Data documentation pattern: ``read_images`` -> per-image torchvision transforms in
  ``map_batches`` -> callable-class actor, float32 NCHW, eager -> ``write_parquet``;
- ``ceiling``: this job's own decode, preprocessing and model code in one plain Python loop, without Ray.

Steady state is ``1500 / (T(2000) - T(500))``. Also measured: the model alone on decoded uint8 crops (each
engine), the CPU time per image of each stage (decoding, the model on each engine, writing), the time from command
start to the first written row, and, in one more run of the large set, the peak memory of all of a command's
processes.

    .venv/bin/python benchmarks/benchmark.py --workdir /tmp/bench --models mnasnet0_5 mnasnet1_0

With ``--photos SMALL LARGE``, also a corpus of 12 MP phone photos (``tests.support.write_photo_corpus``), side by
side with the above in one invocation: this machine's exact-decode ceiling (cores x images/s of one core's plain
Pillow decode, Resize and crop), the job's steady state on the photos exact and with ``preprocess.fast_decode``, and
the peak PSS of the job on LARGE photos against LARGE images of the 500-px corpus:

    .venv/bin/python benchmarks/benchmark.py --models mnasnet0_5 --contenders job torch raydoc --photos 40 160
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONTENDERS = ("job", "job-onnxruntime", "torch", "raydoc", "ceiling")
# The job contenders: the engine each runs the model on.
JOB_ENGINES = {"job": "torch", "job-onnxruntime": "onnxruntime"}
ENGINES = tuple(JOB_ENGINES.values())
# The stages whose CPU time per image stage_cpu_ms measures.
STAGES = ("decode", *(f"model ({engine})" for engine in ENGINES), "write")


# ---------------------------------------------------------------- contenders (each runs in its own process)


def run_torch(input_dir: Path, output: Path, model_name: str, weights: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    import torchvision
    from PIL import Image

    meta = torchvision.models.get_model_weights(model_name).IMAGENET1K_V1
    transform = meta.transforms()

    class Images(torch.utils.data.Dataset):
        def __init__(self, paths):
            self.paths = paths

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            return transform(Image.open(self.paths[i]).convert("RGB")), str(self.paths[i])

    model = torchvision.models.get_model(model_name)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    paths = sorted(input_dir.iterdir())
    loader = torch.utils.data.DataLoader(Images(paths), batch_size=64, num_workers=os.cpu_count())
    uris, ids, scores = [], [], []
    with torch.inference_mode():
        for batch, names in loader:
            top = torch.topk(torch.softmax(model(batch), 1), 5)
            uris += names
            ids += top.indices.tolist()
            scores += top.values.tolist()
    pq.write_table(pa.table({"uri": uris, "top_k_ids": ids, "top_k_scores": scores}), output / "part-0.parquet")


def run_raydoc(input_dir: Path, output: Path, model_name: str, weights: Path) -> None:
    import numpy as np
    import ray
    import torch
    import torchvision
    from torchvision import transforms

    meta = torchvision.models.get_model_weights(model_name).IMAGENET1K_V1
    preset = meta.transforms()
    transform = transforms.Compose(
        [
            transforms.ToTensor(),
            transforms.Resize(preset.resize_size, antialias=True),
            transforms.CenterCrop(preset.crop_size),
            transforms.Normalize(preset.mean, preset.std),
        ]
    )

    def preprocess(batch):
        batch["transformed"] = np.stack([transform(image).numpy() for image in batch["image"]])
        del batch["image"]
        return batch

    class Classifier:
        def __init__(self):
            self.model = torchvision.models.get_model(model_name)
            self.model.load_state_dict(torch.load(weights, weights_only=True))
            self.model.eval()

        def __call__(self, batch):
            with torch.inference_mode():
                top = torch.topk(torch.softmax(self.model(torch.from_numpy(batch["transformed"])), 1), 5)
            return {"uri": batch["path"], "top_k_ids": top.indices.numpy(), "top_k_scores": top.values.numpy()}

    ray.init()
    dataset = ray.data.read_images(str(input_dir), mode="RGB", include_paths=True)
    dataset = dataset.map_batches(preprocess, batch_size=16)
    dataset = dataset.map_batches(Classifier, compute=ray.data.ActorPoolStrategy(size=1), batch_size=64)
    dataset.write_parquet(str(output))


def run_ceiling(input_dir: Path, output: Path, model_name: str, weights: Path) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    from mnasnet_batch.decode.preprocess import PreprocessSpec, decode_batch
    from mnasnet_batch.inputs.layout import encoded_batch
    from mnasnet_batch.model.predictor import Predictor
    from mnasnet_batch.model.weights import resolve_checkpoint
    from mnasnet_batch.outputs.folder import write_part

    predictor = Predictor(resolve_checkpoint(model_name, str(weights)), top_k=5, num_threads=os.cpu_count())
    spec = PreprocessSpec.for_model(model_name, max_pixels=89_478_485)
    paths = sorted(input_dir.iterdir())
    for start in range(0, len(paths), 64):
        chunk = paths[start : start + 64]
        uris = np.asarray([str(p) for p in chunk], dtype=object)
        write_part(predictor(decode_batch(encoded_batch(uris, [p.read_bytes() for p in chunk]), spec)), str(output))
    assert pq  # parts are Parquet, as the job writes them


def job_predictor(model_name: str, weights: Path, engine: str):
    """The job's predictor on ``engine``, with as many threads as the machine has cores."""
    from mnasnet_batch.model.engine import export_onnx
    from mnasnet_batch.model.predictor import Predictor
    from mnasnet_batch.model.weights import resolve_checkpoint

    checkpoint = resolve_checkpoint(model_name, str(weights))
    graph = export_onnx(checkpoint) if engine == "onnxruntime" else None
    return Predictor(checkpoint, top_k=5, device="cpu", num_threads=os.cpu_count(), onnx_graph=graph)


def model_alone(model_name: str, weights: Path, engine: str, images: int = 256) -> float:
    """Images/s of the job's predictor on ``engine`` on already-decoded uint8 crops, after one warm-up batch."""
    import numpy as np

    predictor = job_predictor(model_name, weights, engine)
    crops = np.random.default_rng(0).integers(0, 256, (64, 224, 224, 3), dtype=np.uint8)
    predictor.predict(crops)
    start = time.perf_counter()
    for _ in range(images // 64):
        predictor.predict(crops)
    return images // 64 * 64 / (time.perf_counter() - start)


def stage_cpu_ms(model_name: str, weights: Path, paths: list[Path], workdir: Path) -> dict[str, float]:
    """CPU time per image of each of the job's stages, in this process, outside Ray: where an image's time goes.

    Decoding (Pillow, one thread, as a decode task runs it), the model on each engine (all its threads' time),
    and writing the rows as a Parquet part. Reading the files is left out: the page cache holds them.
    """
    import numpy as np

    from mnasnet_batch.decode.preprocess import PreprocessSpec, decode_batch
    from mnasnet_batch.inputs.layout import encoded_batch
    from mnasnet_batch.outputs.folder import write_part

    spec = PreprocessSpec.for_model(model_name, max_pixels=89_478_485)
    uris = np.asarray([str(p) for p in paths], dtype=object)
    read = encoded_batch(uris, [p.read_bytes() for p in paths])
    start = time.process_time()
    decoded = decode_batch(read, spec)
    costs = {"decode": time.process_time() - start}
    for engine in ENGINES:
        predictor = job_predictor(model_name, weights, engine)
        predictor(decoded)  # warm-up
        start = time.process_time()
        table = predictor(decoded)
        costs[f"model ({engine})"] = time.process_time() - start
    output = workdir / "stage-out"
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    start = time.process_time()
    write_part(table, str(output))
    costs["write"] = time.process_time() - start
    return {stage: round(seconds * 1000 / len(paths), 2) for stage, seconds in costs.items()}


# ---------------------------------------------------------------- harness


def tree_memory(root_pid: int) -> int:
    """Memory of a process and everything in its session (Ray's processes included), in bytes.

    Proportional set sizes: a page shared by n processes (Ray's object store, which every worker maps; torch's
    libraries) counts 1/n in each, so the sum counts it once, where a sum of resident sizes counts it n times.
    """
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == root_pid:  # session id
                for line in (entry / "smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
        except (OSError, IndexError, ValueError):
            pass
    return total


def first_row_seen(output: Path) -> bool:
    return any(p.suffix == ".parquet" for p in output.rglob("*.parquet"))


def time_command(
    contender: str,
    input_dir: Path,
    output: Path,
    model: str,
    weights: Path,
    sample_memory: bool = False,
    settings: tuple[str, ...] = (),
) -> dict:
    """Runs one contender as a whole command: its wall time, when its first row was written, and whether it spilled.

    With ``sample_memory``, also the peak PSS of its processes. Timed runs do not sample: reading the PSS of a
    Ray job's processes costs ~0.25 CPU-s per sample here (the kernel walks every process's mapping of the
    object store), which on two cores slowed the Ray contenders by a fifth. ``settings``: more ``--set`` overrides
    of a job.
    """
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    if contender in JOB_ENGINES:
        command = [
            sys.executable,
            str(ROOT / "jobs" / "label_images.py"),
            "--input",
            str(input_dir),
            "--output",
            str(output),
            "--model",
            model,
            "--weights",
            str(weights),
            "--set",
            f"compute.engine={JOB_ENGINES[contender]}",
            *(item for setting in settings for item in ("--set", setting)),
        ]
    else:
        command = [
            sys.executable,
            __file__,
            "--run-one",
            contender,
            "--input",
            str(input_dir),
            "--output",
            str(output),
            "--models",
            model,
            "--weights",
            str(weights),
        ]
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.monotonic()
    process = subprocess.Popen(
        command,
        env=environment,
        start_new_session=True,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(process.stdout))
    reader.start()
    peak, first_row = 0, None
    while process.poll() is None:
        if sample_memory:
            peak = max(peak, tree_memory(process.pid))
        if first_row is None and first_row_seen(output):
            first_row = time.monotonic() - start
        time.sleep(0.2)
    seconds = time.monotonic() - start
    reader.join()
    if process.returncode != 0:
        raise RuntimeError(f"{contender} failed:\n{''.join(log[-40:])}")
    text = "".join(log)
    # The job's own rate from its summary line, first batch to last: start-up left out, which the difference of two
    # whole commands leaves out only up to its variation.
    rate = re.search(r"labeling ([\d.]+) images/s", text)
    result = {
        "seconds": round(seconds, 2),
        "first_row_s": round(first_row if first_row is not None else seconds, 2),
        "spilled": "Spilled" in text or "spilled" in text,
        **({"labeling_images_per_s": float(rate.group(1))} if rate else {}),
    }
    return result | ({"peak_pss_gb": round(peak / 2**30, 2)} if sample_memory else {})


# ImageNet-like JPEGs: long side about 500 px; quality 95 and a little sensor grain put 80 % of the files at 38-107 KB
# (median 67 KB), where the bare scaled-up crops at quality 90 were 12-70 KB.
CORPUS_QUALITY = 95
CORPUS_GRAIN = 4.0


def make_corpus(workdir: Path, count: int) -> list[Path]:
    """At least ``count`` corpus images under ``workdir``, written once and reused by later invocations."""
    from tests import support

    directory = workdir / f"corpus-q{CORPUS_QUALITY}-grain{CORPUS_GRAIN:g}"
    existing = sorted(directory.glob("*.jpg")) if directory.exists() else []
    if len(existing) >= count:
        return existing[:count]
    shutil.rmtree(directory, ignore_errors=True)
    return support.write_corpus(
        directory, count, seed=5, long_side=500, png_every=0, quality=CORPUS_QUALITY, grain=CORPUS_GRAIN
    )


def subset(corpus: list[Path], count: int) -> Path:
    """A folder holding links to the corpus's first ``count`` images, so every contender lists the same files."""
    directory = corpus[0].parent.with_name(f"{corpus[0].parent.name}-first{count}")
    if directory.exists() and len(list(directory.iterdir())) == count:
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    for path in corpus[:count]:
        os.symlink(path, directory / path.name)
    return directory


def make_photo_corpus(workdir: Path, count: int) -> list[Path]:
    """At least ``count`` 12 MP phone photos (JPEG) under ``workdir``, written once and reused by later invocations."""
    from tests import support

    directory = workdir / "photos-12mp"
    existing = sorted(directory.glob("*.jpg")) if directory.exists() else []
    if len(existing) >= count:
        return existing[:count]
    shutil.rmtree(directory, ignore_errors=True)
    return support.write_photo_corpus(directory, count, seed=7)


def one_core_decode_rate(paths: list[Path], model: str) -> float:
    """Images/s of plain Pillow on one core: read, decode, Resize and centre crop as the reference does (the job's
    exact path, ``preprocess_image``), one image after the other in this process."""
    from mnasnet_batch.decode.preprocess import PreprocessSpec, preprocess_image

    spec = PreprocessSpec.for_model(model, max_pixels=89_478_485)
    preprocess_image(paths[0].read_bytes(), spec)  # warm-up
    start = time.thread_time()
    for path in paths:
        preprocess_image(path.read_bytes(), spec)
    return len(paths) / (time.thread_time() - start)


def photo_rows(args: argparse.Namespace, model: str, weights: Path, corpus: list[Path]) -> dict:
    """The phone-photo section: the exact-decode ceiling, the job exact and fast on the photos, and peak PSS."""
    small, large = args.photos
    photos = make_photo_corpus(args.workdir, large)
    sizes_mb = sorted(p.stat().st_size / 2**20 for p in photos)
    one_core = one_core_decode_rate(photos[:24], model)
    rows = {
        "photos": large,
        "mb_p10_p50_p90": [round(sizes_mb[len(sizes_mb) * q // 10], 2) for q in (1, 5, 9)],
        "one_core_exact_images_per_s": round(one_core, 2),
        "ceiling_images_per_s": round(one_core * os.cpu_count(), 2),
    }
    print(f"{model} photos: {rows}", flush=True)
    for name, settings in (("job exact", ()), ("job fast_decode", ("preprocess.fast_decode=true",))):
        timings = {}
        for count in (small, large):
            timings[count] = time_command(
                "job", subset(photos, count), args.workdir / "out", model, weights, settings=settings
            )
            print(f"{model} photos {name} {count}: {timings[count]}", flush=True)
        rows[name] = {
            "whole_s": timings[large]["seconds"],
            "steady_images_per_s": round((large - small) / (timings[large]["seconds"] - timings[small]["seconds"]), 2),
            "labeling_images_per_s": timings[large].get("labeling_images_per_s"),
        }
    rows["job exact"]["of_ceiling"] = round(rows["job exact"]["steady_images_per_s"] / rows["ceiling_images_per_s"], 2)
    rows["job fast_decode"]["of_exact"] = round(
        rows["job fast_decode"]["steady_images_per_s"] / rows["job exact"]["steady_images_per_s"], 2
    )
    for name, folder in (("photos", subset(photos, large)), ("500px", subset(corpus, large))):
        sampled = time_command("job", folder, args.workdir / "out", model, weights, sample_memory=True)
        rows.setdefault("peak_pss_gb", {})[name] = sampled["peak_pss_gb"]
        print(f"{model} job on {large} {name} images, memory sampled: {sampled}", flush=True)
    rows["peak_pss_gb"]["ratio"] = round(rows["peak_pss_gb"]["photos"] / rows["peak_pss_gb"]["500px"], 2)
    return rows


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores, {cpu}, {gpu}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mnasnet-bench"))
    parser.add_argument("--models", nargs="+", default=["mnasnet0_5", "mnasnet1_0"])
    parser.add_argument("--contenders", nargs="*", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument(
        "--photos",
        nargs=2,
        type=int,
        metavar=("SMALL", "LARGE"),
        help="also the 12 MP phone-photo section, on these numbers of photos, e.g. 40 160",
    )
    parser.add_argument("--sizes", nargs=2, type=int, default=[500, 2000], metavar=("SMALL", "LARGE"))
    parser.add_argument(
        "--memory-sizes",
        nargs="*",
        type=int,
        default=[],
        help="also run the job on these corpus sizes for peak memory, e.g. 2000 20000",
    )
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "benchmark.json")
    parser.add_argument("--run-one", choices=("torch", "raydoc", "ceiling"), help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.run_one:
        runner = {"torch": run_torch, "raydoc": run_raydoc, "ceiling": run_ceiling}[args.run_one]
        runner(args.input, args.output, args.models[0], args.weights)
        return 0

    from tests import support

    small, large = args.sizes
    corpus = make_corpus(args.workdir, max([large, *args.memory_sizes, *(args.photos or [])]))
    sizes_kb = sorted(p.stat().st_size / 1024 for p in corpus[:large])
    results = {
        "machine": machine(),
        "images": {
            "small": small,
            "large": large,
            # the 10th, 50th and 90th percentiles of the file sizes of the large set
            "kb_p10_p50_p90": [round(sizes_kb[len(sizes_kb) * q // 10], 1) for q in (1, 5, 9)],
        },
        "models": {},
    }
    for model in args.models:
        weights = args.workdir / f"fixture-{model}.pth"
        if not weights.exists():
            weights.write_bytes(support.checkpoint_bytes(support.make_model(model)))
        rows = {}
        for contender in args.contenders:
            timings = {}
            for count in (small, large):
                folder = subset(corpus, count)
                timings[count] = time_command(contender, folder, args.workdir / "out", model, weights)
                print(f"{model} {contender} {count} images: {timings[count]}", flush=True)
            rows[contender] = {
                "whole_s": timings[large]["seconds"],
                "steady_images_per_s": round(
                    (large - small) / (timings[large]["seconds"] - timings[small]["seconds"]), 1
                ),
                "first_row_s": timings[large]["first_row_s"],
                "spilled": timings[large]["spilled"],
            }
            sampled = time_command(
                contender, subset(corpus, large), args.workdir / "out", model, weights, sample_memory=True
            )
            rows[contender]["peak_pss_gb"] = sampled["peak_pss_gb"]
            print(f"{model} {contender} {large} images, memory sampled: {sampled}", flush=True)
        rows["model_alone_images_per_s"] = {engine: round(model_alone(model, weights, engine), 1) for engine in ENGINES}
        rows["cpu_ms_per_image"] = stage_cpu_ms(model, weights, corpus[:256], args.workdir)
        print(f"{model} model alone: {rows['model_alone_images_per_s']}; CPU ms per image: {rows['cpu_ms_per_image']}")
        if args.photos:
            rows["photos"] = photo_rows(args, model, weights, corpus)
        for count in args.memory_sizes:
            folder = subset(corpus, count)
            rows.setdefault("job_memory", {})[count] = time_command(
                "job", folder, args.workdir / "out", model, weights, sample_memory=True
            )
            print(f"{model} job memory {count} images: {rows['job_memory'][count]}", flush=True)
        results["models"][model] = rows
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2))
    print(table(results))
    chart(results, args.results.with_suffix(".png"))
    return 0


def table(results: dict) -> str:
    lines = [
        f"machine: {results['machine']}",
        "",
        "| model | contender | steady images/s | whole command s | first row s | peak PSS GB | job steady / this |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, rows in results["models"].items():
        job = rows.get("job", {}).get("steady_images_per_s")
        for contender in CONTENDERS:
            if contender in rows:
                row = rows[contender]
                ratio = f"{job / row['steady_images_per_s']:.2f}x" if job else ""
                lines.append(
                    f"| {model} | {contender} | {row['steady_images_per_s']} | {row['whole_s']} | "
                    f"{row['first_row_s']} | {row['peak_pss_gb']} | {ratio} |"
                )
        for engine, speed in rows.get("model_alone_images_per_s", {}).items():
            lines.append(f"| {model} | model alone on {engine} (uint8 crops in memory) | {speed} | | | | |")
    lines += [
        "",
        "| model | CPU ms per image: " + " | ".join(STAGES) + " |",
        "|---" * (len(STAGES) + 1) + "|",
    ]
    for model, rows in results["models"].items():
        if "cpu_ms_per_image" in rows:
            costs = rows["cpu_ms_per_image"]
            lines.append(f"| {model} | " + " | ".join(str(costs.get(stage, "")) for stage in STAGES) + " |")
    for model, rows in results["models"].items():
        if "photos" in rows:
            photos = rows["photos"]
            pss = photos["peak_pss_gb"]
            lines += [
                "",
                f"{model}, {photos['photos']} 12 MP photos (MB p10/p50/p90 {photos['mb_p10_p50_p90']}):",
                f"- exact-decode ceiling: {photos['ceiling_images_per_s']} images/s "
                f"({photos['one_core_exact_images_per_s']} on one core)",
                f"- job exact: {photos['job exact']['steady_images_per_s']} images/s steady "
                f"({photos['job exact']['of_ceiling']} of the ceiling), labeling "
                f"{photos['job exact']['labeling_images_per_s']} images/s first batch to last",
                f"- job fast_decode: {photos['job fast_decode']['steady_images_per_s']} images/s steady "
                f"({photos['job fast_decode']['of_exact']}x exact), labeling "
                f"{photos['job fast_decode']['labeling_images_per_s']} images/s first batch to last",
                f"- peak PSS: {pss['photos']} GB on the photos, {pss['500px']} GB on as many 500-px images "
                f"({pss['ratio']}x)",
            ]
    return "\n".join(lines)


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(CONTENDERS)
    for i, contender in enumerate(CONTENDERS):
        values = [results["models"][m].get(contender, {}).get("steady_images_per_s", 0) for m in models]
        bars = ax.bar([x + i * width for x in range(len(models))], values, width, label=contender)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks([x + width * (len(CONTENDERS) - 1) / 2 for x in range(len(models))], models)
    ax.set_ylabel("steady-state images/s")
    ax.set_title(f"Batch labeling throughput ({results['machine']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
