"""Throughput on Parquet input (a Hugging Face dataset's layout) against the same images as loose files.

The 500-px corpus of ``benchmark.py`` (``make_corpus``), written once as loose JPEGs and once as Parquet files the
way ``datasets`` writes an ``Image`` feature (``struct<bytes, path>``, ``to_parquet``, ``--rows-per-file`` rows a
file, as ``data/train-XXXXX-of-YYYYY.parquet``). Each is labeled by the job's command (local Ray, the fixture
checkpoint), the two layouts taking turns, ``--repeats`` times; the figure is the job's own labeling rate (its
summary line: first batch to last, start-up left out), and the whole command's images/s and seconds beside it;
then the Parquet rate over the files' rate. Each run's rows are counted: a run that did not label every image
stops the benchmark rather than give a figure.

    .venv/bin/python benchmarks/bench_parquet_input.py --images 1200 --repeats 2

``--rows-per-file`` at ``--images`` or more writes the whole corpus as one Parquet file (one read task).

The stages that differ between the two layouts are reading and decoding (the model's work is the same crops);
``--stages`` measures them alone, in this process, without Ray: the CPU time per image of the layout's ``read``
of every input and ``decode_batch`` of what it read, as the job's read tasks run them. CPU time, not wall time,
so that a machine shared with other work still gives the figure:

    .venv/bin/python benchmarks/bench_parquet_input.py --images 1200 --repeats 3 --stages
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.benchmark import machine, make_corpus, subset, time_command  # noqa: E402

# The job's engine here: what benchmark.py's ``job`` contender runs (torch), so the two figures are comparable.
CONTENDER = "job"
# Tries of a run whose local Ray did not start in time ("The current node timed out during startup"), which on a
# machine shared with other work happens; the figure is of the try that ran.
TRIES = 3


def write_parquet(images: list[Path], folder: Path, rows_per_file: int) -> Path:
    """``images`` as a Hugging Face dataset folder of Parquet files (``datasets``' ``Image`` feature), written once."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets

    files = -(-len(images) // rows_per_file)
    if folder.exists() and len(list(folder.glob("data/*.parquet"))) == files:
        return folder
    features = datasets.Features({"image": datasets.Image()})
    for n in range(files):
        chunk = images[n * rows_per_file : (n + 1) * rows_per_file]
        rows = [{"bytes": path.read_bytes(), "path": path.name} for path in chunk]
        dataset = datasets.Dataset.from_dict({"image": rows}, features)
        dataset.to_parquet(str(folder / "data" / f"train-{n:05d}-of-{files:05d}.parquet"))
    return folder


def stage_cpu_ms(folder: Path, batch_size: int = 32) -> float:
    """CPU milliseconds per image of reading and decoding ``folder`` as the job's read tasks do, in this process."""
    import time

    import numpy as np

    from mnasnet_batch.config import load_config
    from mnasnet_batch.decode.preprocess import PreprocessSpec, decode_batch
    from mnasnet_batch.inputs.listing import plan_input
    from mnasnet_batch.storage import Storage

    config = load_config(overrides=[{"input": {"uri": str(folder)}}])
    plan = plan_input(config.input, Storage())
    spec = PreprocessSpec.for_config(config.model.name, config.preprocess)
    images = 0
    start = time.process_time()
    for block in plan.layout.blocks(plan.uris, batch_size):
        batch = {name: np.asarray(block[name].to_pylist(), dtype=object) for name in block.column_names}
        for read in plan.layout.read(batch, batch_size):
            decoded = decode_batch(read, spec)
            assert not any(decoded["error"]), decoded["error"]
            images += len(decoded["uri"])
    return (time.process_time() - start) * 1000 / images


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mnasnet-bench"))
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--rows-per-file", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="mnasnet0_5")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "bench_parquet_input.json")
    parser.add_argument("--stages", action="store_true", help="reading and decoding alone, CPU time, without Ray")
    args = parser.parse_args(argv)

    from tests import support

    args.workdir.mkdir(parents=True, exist_ok=True)
    weights = args.workdir / f"fixture_{args.model}.pth"
    if not weights.exists():
        weights.write_bytes(support.checkpoint_bytes(support.make_model(args.model)))
    corpus = make_corpus(args.workdir, args.images)
    inputs = {
        "files": subset(corpus, args.images),
        "parquet": write_parquet(
            corpus, args.workdir / f"hub-parquet-{args.images}-{args.rows_per_file}", args.rows_per_file
        ),
    }
    if args.stages:
        return stages(args, inputs)
    runs: dict[str, list[dict]] = {layout: [] for layout in inputs}
    for repeat in range(args.repeats):
        for layout, folder in inputs.items():
            result = whole_command(folder, args.workdir / f"out-{layout}", args.model, weights, args.images)
            runs[layout].append(result | {"load_average": os.getloadavg()[0]})
            print(f"repeat {repeat + 1} {layout}: {result}", flush=True)
    summary = {layout: medians(results) for layout, results in runs.items()}
    results = {
        "machine": machine(),
        "images": args.images,
        "rows_per_file": args.rows_per_file,
        "model": args.model,
        "runs": runs,
        "median": summary,
    }
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    for layout, figures in summary.items():
        labeling = figures.get("labeling_images_per_s")
        print(
            f"{layout}: {labeling if labeling is not None else 'no'} images/s labeling (first batch to last), "
            f"{figures['command_images_per_s']} images/s the whole command ({figures['seconds']} s)"
        )
    rate = (
        "labeling_images_per_s"
        if all("labeling_images_per_s" in f for f in summary.values())
        else "command_images_per_s"
    )
    print(f"parquet / files: {summary['parquet'][rate] / summary['files'][rate]:.2f} ({rate}, medians)")
    return 0


def whole_command(folder: Path, output: Path, model: str, weights: Path, images: int) -> dict:
    """One labeling command on ``folder`` (``benchmark.time_command``), tried again when its local Ray did not start
    in time; its figures, and the whole command's images/s.

    Raises:
        RuntimeError: the command failed, or its output does not hold a usable row for each of ``images``.
    """
    for attempt in range(1, TRIES + 1):
        try:
            result = time_command(CONTENDER, folder, output, model, weights)
            break
        except RuntimeError as exc:
            if attempt == TRIES or "timed out during startup" not in str(exc):
                raise
            print(f"{folder.name}: Ray did not start in time, again", flush=True)
    from fsspec.implementations.local import LocalFileSystem

    from mnasnet_batch.outputs.folder import read_parts

    rows = read_parts(LocalFileSystem(), str(output)).to_table(columns=["uri", "status"])
    usable = rows.filter(pc.equal(rows["status"], "ok"))
    if usable.num_rows != images or len(set(usable["uri"].to_pylist())) != images:
        raise RuntimeError(f"{folder}: {usable.num_rows} usable rows of {rows.num_rows}, not one for each of {images}")
    return result | {"command_images_per_s": round(images / result["seconds"], 1)}


def medians(results: list[dict]) -> dict[str, float]:
    """The medians of a layout's runs: the command's seconds and images/s, and the job's labeling rate where every
    run's summary gave one (a run of one batch has no rate from its first batch to its last)."""
    figures = {
        "seconds": round(statistics.median(r["seconds"] for r in results), 1),
        "command_images_per_s": round(statistics.median(r["command_images_per_s"] for r in results), 1),
    }
    if all("labeling_images_per_s" in r for r in results):
        figures["labeling_images_per_s"] = round(statistics.median(r["labeling_images_per_s"] for r in results), 1)
    return figures


def stages(args: argparse.Namespace, inputs: dict[str, Path]) -> int:
    """``--stages``: each layout's read and decode CPU time per image, ``--repeats`` times in turn."""
    figures: dict[str, list[float]] = {layout: [] for layout in inputs}
    for repeat in range(args.repeats):
        for layout, folder in inputs.items():
            figures[layout].append(round(stage_cpu_ms(folder), 3))
            print(f"repeat {repeat + 1} {layout}: {figures[layout][-1]} CPU ms an image", flush=True)
    results = {
        "machine": machine(),
        "load_average": os.getloadavg()[0],
        "images": args.images,
        "rows_per_file": args.rows_per_file,
        "read_decode_cpu_ms_per_image": figures,
        "median": {layout: statistics.median(values) for layout, values in figures.items()},
    }
    args.results.with_name(args.results.stem + "_stages.json").write_text(json.dumps(results, indent=2) + "\n")
    for layout, value in results["median"].items():
        print(f"{layout}: {value:.2f} CPU ms an image read and decoded ({1000 / value:.0f} images/s on one core)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
