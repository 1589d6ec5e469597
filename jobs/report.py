"""Writes an HTML report for a labeling run's Parquet output, or an Iceberg table's current state: PNG charts and a
gallery of thumbnails read from the run's inputs."""

import argparse
import sys
from pathlib import Path

# Importable from a checkout where the package is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="report.py",
        description="Report on a labeling run: most frequent labels, top-1 confidence, low-confidence share, "
        "error kinds and throughput, and thumbnails by label, of the least confident images and of errors, read "
        "from the run's inputs; one HTML page with inline images (no network needed to view it).",
    )
    parser.add_argument("--output", required=True, help="the labeling run's --output (directory or URI prefix)")
    parser.add_argument("--report", help="where to write the page (default OUTPUT/_report.html)")
    parser.add_argument(
        "--low-confidence", type=float, default=0.5, help="top-1 scores under this are low confidence (default 0.5)"
    )
    parser.add_argument(
        "--top-labels", type=int, default=20, help="labels in the frequency chart and the gallery (default 20)"
    )
    parser.add_argument(
        "--thumbnails",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="read the gallery's images from the run's inputs (default); --no-thumbnails: charts only",
    )
    from mnasnet_batch.evaluation.runs import add_storage_arguments

    add_storage_arguments(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from mnasnet_batch.config import ConfigError
    from mnasnet_batch.evaluation import report
    from mnasnet_batch.evaluation.runs import settings_from_args
    from mnasnet_batch.storage import StorageError

    destination = args.report or f"{args.output.rstrip('/')}/{report.REPORT_FILE}"
    try:
        settings, storage = settings_from_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = settings.table
    try:
        stats = report.read(settings, args.low_confidence, storage, args.top_labels, args.thumbnails)
    except (FileNotFoundError, ValueError, StorageError) as exc:
        what = f"table {table}" if table else f"the run's Parquet files under {args.output}"
        print(f"error: cannot read {what}: {exc}", file=sys.stderr)
        return 2
    page = report.render(stats, f"table {table}" if table else args.output, args.top_labels)
    report.write(destination, page, storage)
    print(
        f"report {destination}: {stats.images} images, {stats.errors} errors, "
        f"{stats.low_confidence_share:.1f} % low confidence, {report.describe_gallery(stats)}"
        f"{len(page.encode()) / 2**20:.2f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
