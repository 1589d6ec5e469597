"""Writes a labeling run's least confident images as Label Studio review tasks, or reads the reviewed labels back."""

import argparse
import json
import os
import sys
from pathlib import Path

# Importable from a checkout where the package is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="review.py",
        description="Send the images the model is least sure of to people: the ok rows whose top-1 score is under "
        "--below, most uncertain first, as Label Studio tasks (JSON) with the model's top-1 pre-filled, and the "
        "labeling config (XML, every ImageNet class) beside them. With --import, read the reviewed labels back "
        "from Label Studio's JSON export, one row per uri. docs/review.md says how to use both in Label Studio.",
    )
    parser.add_argument("--output", help="the labeling run's --output (directory or URI prefix)")
    parser.add_argument(
        "--to",
        required=True,
        help="the tasks file to write (JSON; the labeling config goes beside it as FILE.labeling.xml); with "
        "--import, the Parquet file of reviewed labels",
    )
    parser.add_argument(
        "--below", type=float, default=0.5, help="review the ok rows whose top-1 score is under this (default 0.5)"
    )
    parser.add_argument("--limit", type=positive_int, help="write at most this many tasks, the most uncertain")
    parser.add_argument(
        "--local-root",
        metavar="DIR",
        help="local images: Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, a folder above theirs; default: "
        "the folder above the one that holds every local image under the threshold",
    )
    parser.add_argument(
        "--import",
        dest="export",
        metavar="EXPORT.json",
        help="instead: read the review project's Label Studio export (Export > JSON) and write its labels to --to",
    )
    from mnasnet_batch.evaluation.runs import add_storage_arguments

    add_storage_arguments(parser)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.output is None) == (args.export is None):
        parser.error("give --output (write review tasks) or --import (read reviewed labels back)")
    from mnasnet_batch.config import ConfigError
    from mnasnet_batch.evaluation import review
    from mnasnet_batch.evaluation.runs import settings_from_args
    from mnasnet_batch.storage import StorageError

    try:
        settings, storage = settings_from_args(argparse.Namespace(**{**vars(args), "output": args.output or ""}))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.export is not None:
        return import_labels(args, storage)
    table = settings.table
    try:
        rows = review.read(settings, args.below, storage)
    except (FileNotFoundError, ValueError, StorageError) as exc:
        what = f"table {table}" if table else f"the run's Parquet files under {args.output}"
        print(f"error: cannot read {what}: {exc}", file=sys.stderr)
        return 2
    local_root = os.path.abspath(os.path.expanduser(args.local_root)) if args.local_root else None
    result = review.build_tasks(rows, local_root, args.limit)
    config_path = review.config_path(args.to)
    try:
        review.write_text(args.to, json.dumps(result.tasks, indent=1, ensure_ascii=False) + "\n", storage)
        review.write_text(config_path, review.labeling_config(review.categories_of(rows)), storage)
    except (OSError, StorageError) as exc:
        print(f"error: cannot write {args.to}: {exc}; give --to a file in a folder that exists", file=sys.stderr)
        return 2
    print(summary(result, args, config_path))
    return 0


def summary(result, args, config_path: str) -> str:
    """The one line a review run prints: tasks, threshold, what was left out and why, the files."""
    left_out = [f"{count} {why}" for why, count in sorted(result.skipped.items())]
    capped = result.candidates - sum(result.skipped.values()) - len(result.tasks)
    if capped:
        left_out.append(f"{capped} over --limit {args.limit}")
    line = (
        f"review tasks {args.to}: {len(result.tasks)} of {result.candidates} ok images with a top-1 score under "
        f"{args.below}, most uncertain first"
        + (f" ({', '.join(left_out)} left out)" if left_out else "")
        + f"; labeling config {config_path}"
    )
    if result.local_root is not None:
        line += (
            f"; local images: LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={result.local_root} and a Local Files storage "
            f"for {', '.join(result.local_folders)}"
        )
    return line


def import_labels(args, storage) -> int:
    """``--import``: the reviewed labels of a Label Studio JSON export, as Parquet at ``--to``."""
    import pyarrow.parquet as pq

    from mnasnet_batch.evaluation import review
    from mnasnet_batch.storage import StorageError

    try:
        labels = review.reviewed_labels(review.read_export(args.export, storage))
    except (FileNotFoundError, ValueError, StorageError) as exc:
        print(f"error: cannot read the Label Studio export {args.export}: {exc}", file=sys.stderr)
        return 2
    try:
        fs, path = storage.filesystem(args.to)
        with fs.open(path, "wb") as f:
            pq.write_table(labels, f)
    except (OSError, StorageError) as exc:
        print(f"error: cannot write {args.to}: {exc}; give --to a file in a folder that exists", file=sys.stderr)
        return 2
    skipped = labels.column("reviewed_label").null_count
    print(
        f"reviewed labels {args.to}: {labels.num_rows} reviewed tasks, {labels.num_rows - skipped} labeled, "
        f"{skipped} skipped"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
