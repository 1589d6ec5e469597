"""The labeling job's command line: parse, load config, verify weights and storage, run on Ray."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import mnasnet_batch
from mnasnet_batch.config import MODEL_NAMES, OUTPUT_MODES, ConfigError, JobConfig, load_config, parse_override
from mnasnet_batch.storage import StorageError

if TYPE_CHECKING:
    from mnasnet_batch.output import RunPlan, Summary
    from mnasnet_batch.sources import InputPlan
    from mnasnet_batch.weights import Checkpoint

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnasnet-label",
        description="Label images with torchvision's MnasNet on Ray Data and write top-k predictions to Parquet.",
    )
    parser.add_argument("--input", help="directory, glob, file, or fsspec URI of the images (input.uri)")
    parser.add_argument("--output", help="directory or URI prefix for the Parquet files (output.uri)")
    parser.add_argument("--config", help="YAML profile, e.g. conf/local.yaml; flags and --set override it")
    parser.add_argument("--model", choices=MODEL_NAMES, help="model.name (default mnasnet0_5)")
    parser.add_argument("--weights", help="IMAGENET1K_V1 (default), or a path or URI of a state_dict (model.weights)")
    parser.add_argument("--top-k", type=int, help="classes kept per image (model.top_k, default 5)")
    parser.add_argument(
        "--mode",
        choices=OUTPUT_MODES,
        help="output.mode: auto (default: new run, or resume an unfinished one), incremental, overwrite",
    )
    parser.add_argument("--run-id", help="output.run_id (default: the job submission id, else a UTC timestamp)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any configuration value, e.g. --set compute.batch_size=32 (repeatable)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> JobConfig:
    """The job configuration from ``build_parser()``'s arguments: defaults, --config, flags, then --set.

    Raises:
        ConfigError: a bad value, or no input or output.
    """
    flags = {
        "input": {"uri": args.input},
        "output": {"uri": args.output, "mode": args.mode, "run_id": args.run_id},
        "model": {"name": args.model, "weights": args.weights, "top_k": args.top_k},
    }
    flags = {section: {k: v for k, v in values.items() if v is not None} for section, values in flags.items()}
    config = load_config(args.config, [flags, *(parse_override(s) for s in args.set)])
    if not config.input.uri or not config.output.uri:
        raise ConfigError("--input and --output are required (or input.uri and output.uri in --config)")
    return config


def main(argv: list[str] | None = None) -> int:
    """Runs the labeling job; returns the process exit status (0 ok, 2 bad configuration or inputs)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Which code ran: under `ray job submit --working-dir` this is the uploaded copy, not an installed one.
    log.info("mnasnet-batch %s from %s", mnasnet_batch.__version__, Path(mnasnet_batch.__file__).parent)
    # Importing torch and Ray costs seconds; the configuration is checked before either is needed.
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from mnasnet_batch import output, sources

    # Starting a local Ray takes seconds of mostly waiting; importing torch (4-7 s), verifying weights and
    # listing inputs overlap it. Ray starts in this (the main) thread: its processes are tied to the thread
    # that starts them.
    with ThreadPoolExecutor(max_workers=1) as pool:
        prepared = pool.submit(prepare, config)
        start_ray(config)
        from mnasnet_batch.weights import WeightsError  # waits for prepare's import of torch, if still running

        try:
            checkpoint, inputs, plan = prepared.result()
        except (WeightsError, StorageError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    # Images already labeled are not even read; in shards and Parquet their rows are dropped after reading.
    todo = inputs
    if inputs.format in ("files", "manifest"):
        todo = sources.InputPlan(inputs.format, output.remaining(inputs.uris, plan.done))
    log.info(
        "weights %s verified (%s); %s (%s) under %s, %s to label in run %s",
        checkpoint.source,
        checkpoint.weights_id,
        inputs.describe(),
        inputs.format,
        config.input.uri,
        todo.describe(),
        plan.run_id,
    )

    try:
        summary = label(config, checkpoint, plan, todo)
    except ConfigError as exc:  # settings that do not fit the cluster, found once it is known
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


def entrypoint() -> None:
    """``main`` as a command: exits with its status."""
    status = main()
    # Exiting, the interpreter collects garbage over every object torch and Ray created: 1.4 s of the job's
    # wall time on the README's 2-core machine. Freezing them skips that; atexit handlers (Ray's shutdown) run.
    gc.freeze()
    sys.exit(status)


def prepare(config: JobConfig) -> tuple[Checkpoint, InputPlan, RunPlan]:
    """Verifies the weights, plans the input and opens the run: everything that can fail before any image is read.

    Raises:
        WeightsError: the weights cannot be found, read, verified or fitted.
        StorageError: the input or the output cannot be used.
    """
    from mnasnet_batch import output, sources
    from mnasnet_batch.weights import resolve_checkpoint

    checkpoint = resolve_checkpoint(
        config.model.name, config.model.weights, config.model.sha256, config.model.download, config.storage
    )
    inputs = sources.plan_input(config.input, config.storage)
    return checkpoint, inputs, output.plan_run(config, checkpoint.weights_id)


def start_ray(config: JobConfig) -> None:
    """Joins the configured cluster (``ray.address``, else ``RAY_ADDRESS``) or starts a local Ray in-process."""
    import ray

    if not ray.is_initialized():
        address = config.ray.address or os.environ.get("RAY_ADDRESS")
        # A local Ray started here needs no dashboard; one we connect to keeps its own settings.
        ray.init(address=address) if address else ray.init(include_dashboard=False)


def label(config: JobConfig, checkpoint: Checkpoint, plan: RunPlan, todo: list[str] | InputPlan) -> Summary:
    """Labels ``todo`` (image URIs, or a planned input) into ``plan``'s run on Ray and closes the run's record.

    Returns:
        What the run holds, over all its attempts.
    """
    from mnasnet_batch import output, sources, storage

    start = time.monotonic()
    todo = todo if isinstance(todo, sources.InputPlan) else sources.InputPlan("files", list(todo))
    # Only loose files are counted before reading; other layouts count the rows this attempt added.
    counted = todo.format in ("files", "manifest")
    labeled_now = len(todo.uris) if counted else 0
    try:
        if todo.uris:
            from mnasnet_batch import pipeline

            start_ray(config)
            if not counted:
                labeled_now = -output.summarize(plan.run_uri, 0, 0, config.storage).images
            pipeline.run(config, checkpoint, todo, plan.run_uri, plan.done)
            # Other processes wrote the parts: this one's cached listings (s3fs, gcsfs) have not seen them.
            storage.filesystem(plan.run_uri, config.storage)[0].invalidate_cache()
            if not counted:
                labeled_now += output.summarize(plan.run_uri, 0, 0, config.storage).images
    except BaseException as exc:
        output.finish_run(
            config, plan, time.monotonic() - start, max(0, labeled_now), error=f"{type(exc).__name__}: {exc}"
        )
        raise
    return output.finish_run(config, plan, time.monotonic() - start, labeled_now)
