"""Lists the labeling runs under an output root (each run's record), or of an Iceberg table (its snapshots)."""

import argparse
import json
import sys
from pathlib import Path

# Importable from a checkout where the package is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runs.py",
        description="List the runs under a labeling job's --output: status, mode, times, images, errors, images/s; "
        "with --table (or output.table in --config), the runs that committed into that Iceberg table, from its "
        "snapshots.",
    )
    parser.add_argument("--output", required=True, help="the labeling job's --output (directory or URI prefix)")
    parser.add_argument("--format", choices=("table", "json"), default="table", help="table (default) or json")
    from mnasnet_batch.evaluation.runs import add_storage_arguments

    add_storage_arguments(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from mnasnet_batch.config import ConfigError
    from mnasnet_batch.evaluation import runs
    from mnasnet_batch.storage import StorageError

    try:
        settings, storage = runs.settings_from_args(args)
        if settings.table:
            records = runs.list_table_runs(settings, storage)
        else:
            records = runs.list_runs(args.output, storage)
    except (ConfigError, StorageError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps(records, indent=2))
    else:
        print(runs.format_table_runs(records) if settings.table else runs.format_table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
