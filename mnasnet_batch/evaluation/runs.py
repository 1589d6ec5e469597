"""The runs under an output root, from their ``_run.json`` records, or of an Iceberg table, from its snapshots."""

from __future__ import annotations

import argparse
import datetime
import json
import posixpath

from mnasnet_batch.config import ConfigError, OutputConfig, load_config, parse_override
from mnasnet_batch.outputs.run import RUN_RECORD, SUCCESS_MARKER
from mnasnet_batch.storage import Storage

COLUMNS = ("run", "status", "mode", "started (UTC)", "ended (UTC)", "images", "ok", "errors", "images/s", "seconds")


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    """The labeling job's ``--config``, ``--set`` and ``--table``, for the tools that read its output (runs.py,
    report.py)."""
    parser.add_argument(
        "--config",
        help="the job's YAML profile, e.g. conf/cpu-cluster.yaml; only its storage section and output.table / "
        "output.catalog are used",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="storage.KEY=VALUE",
        help="override a storage setting, e.g. --set storage.endpoint_url=http://minio:9000, or output.table / "
        "output.catalog (repeatable)",
    )
    parser.add_argument("--table", help="the job's output.table: read that Iceberg table instead of the Parquet folder")


# The settings of the job's configuration that say where and how to read its output.
READING_SETTINGS = {"storage": None, "output": {"table", "catalog"}}


def settings_from_args(args: argparse.Namespace) -> tuple[OutputConfig, Storage]:
    """The output settings (``output.table``, ``output.catalog``; ``output.uri`` is ``--output``) and the storage
    handle from ``add_storage_arguments``' options, read by the labeling job's own config code.

    Raises:
        ConfigError: a bad profile or value, or ``--set`` of another setting.
    """
    overrides = [parse_override(assignment) for assignment in args.set]
    for assignment, override in zip(args.set, overrides, strict=True):
        ((section, values),) = override.items()
        allowed = READING_SETTINGS.get(section, set())
        if section not in READING_SETTINGS or (allowed is not None and not set(values) <= allowed):
            raise ConfigError(
                f"--set {assignment!r}: only storage.* settings (and output.table, output.catalog) apply to "
                "reading an output"
            )
    flags = {"output": {"uri": args.output, **({"table": args.table} if args.table else {})}}
    config = load_config(args.config, [*overrides, flags])
    return config.output, Storage(config.storage)


def storage_from_args(args: argparse.Namespace) -> Storage:
    """The storage handle of ``settings_from_args``."""
    return settings_from_args(args)[1]


def list_runs(uri: str, storage: Storage | None = None) -> list[dict]:
    """Reads the record of every ``run=<id>/`` under ``uri``, oldest first.

    Only the latest run can say ``running``: the job resumes an unfinished run before starting another.
    It may be in progress, or interrupted and resumable by running the same command again.

    Args:
        uri: the labeling job's ``--output``.
        storage: the job's storage handle (its ``storage`` section); None: local files and anonymous URIs.

    Returns:
        The records, each with ``latest`` and ``complete`` (the latest run, finished: ``_SUCCESS``) added.

    Raises:
        FileNotFoundError: ``uri`` holds no run records.
    """
    fs, root = (storage or Storage()).filesystem(uri)
    root = root.rstrip("/")
    # A listing, not a glob: ``[`` or ``*`` in the output's own path are taken as they are.
    paths = [
        p
        for p in fs.find(root, maxdepth=2)
        if posixpath.basename(p) == RUN_RECORD and posixpath.basename(posixpath.dirname(p)).startswith("run=")
    ]
    if not paths:
        raise FileNotFoundError(f"no runs under {uri} (no run=*/{RUN_RECORD})")
    records = sorted((json.loads(fs.cat_file(p)) for p in paths), key=lambda r: r.get("started_at") or "")
    latest = json.loads(fs.cat_file(f"{root}/{RUN_RECORD}")) if fs.exists(f"{root}/{RUN_RECORD}") else records[-1]
    complete = fs.exists(f"{root}/{SUCCESS_MARKER}")
    for record in records:
        record["latest"] = record["run_id"] == latest["run_id"]
        record["complete"] = record["latest"] and complete
    return records


def row(record: dict) -> tuple[str, ...]:
    """One table row: the columns of ``COLUMNS`` as text, ``-`` where the run has not said yet."""
    counts = record.get("counts") or {}
    rate = record.get("images_per_s")
    seconds = record.get("seconds")
    values = (
        record["run_id"] + (" *" if record["latest"] else ""),
        record["status"],
        record.get("mode"),
        (record.get("started_at") or "")[:19],
        (record.get("ended_at") or "")[:19],
        counts.get("images"),
        counts.get("ok"),
        counts.get("error"),
        f"{rate:.1f}" if rate is not None else None,
        f"{seconds:.1f}" if seconds is not None else None,
    )
    return tuple("-" if v in (None, "") else str(v) for v in values)


def format_table(records: list[dict]) -> str:
    """A plain-text table, one line per run, with the latest run marked ``*``."""
    return format_rows(COLUMNS, [row(r) for r in records], names=5)


def format_rows(columns: tuple[str, ...], rows: list[tuple[str, ...]], names: int) -> str:
    """A plain-text table of ``rows``: the first ``names`` columns left-aligned, the numbers after them right."""
    rows = [columns, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    lines = [
        "  ".join(
            cell.ljust(w) if i < names else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


TABLE_COLUMNS = (
    "run",
    "state",
    "mode",
    "model",
    "weights",
    "first commit (UTC)",
    "last commit (UTC)",
    "commits",
    "images",
    "errors",
    "current",
    "snapshot",
)


def list_table_runs(output_config: OutputConfig, storage: Storage) -> list[dict]:
    """The runs that committed into the Iceberg table ``output_config.table``, oldest first, from its snapshots.

    Each run: its id, mode, model, weights, first and last commit times, commits (its snapshots), the images and
    errors it committed up to its last commit, the rows of it still current (others replaced them since), the snapshot
    id of its last commit (for time travel), and ``state``: ``complete`` when its final commit is in, else
    ``partial`` (interval commits of a run that is going, or was stopped: the same command finishes it).

    Raises:
        StorageError: the catalog cannot be reached, or holds no such table.
    """
    from mnasnet_batch.outputs.iceberg import PROPERTY, current_rows, load_table

    table = load_table(output_config, storage)
    runs: dict[str, dict] = {}
    for snapshot in sorted(table.snapshots(), key=lambda s: s.timestamp_ms):
        summary = snapshot.summary
        properties = summary.additional_properties if summary is not None else {}
        run_id = properties.get(PROPERTY + "run_id")
        if not run_id:
            continue
        at = datetime.datetime.fromtimestamp(snapshot.timestamp_ms / 1000, datetime.timezone.utc)
        run = runs.setdefault(
            run_id, {"run_id": run_id, "first_commit": at.isoformat(timespec="seconds"), "commits": 0}
        )
        run.update(
            mode=properties.get(PROPERTY + "mode"),
            model=properties.get(PROPERTY + "model"),
            weights=properties.get(PROPERTY + "weights"),
            last_commit=at.isoformat(timespec="seconds"),
            images=int(properties.get(PROPERTY + "run.images", 0)),
            errors=int(properties.get(PROPERTY + "run.errors", 0)),
            state="complete" if properties.get(PROPERTY + "run.final") == "true" else "partial",
            snapshot_id=snapshot.snapshot_id,
        )
        run["commits"] += 1  # each commit is one snapshot (iceberg.replace_rows)
    current = current_rows(table, ("run_id",))["run_id"].value_counts().to_pylist()
    counts = {entry["values"]: entry["counts"] for entry in current}
    for run in runs.values():
        run["current"] = counts.get(run["run_id"], 0)
    return list(runs.values())


def table_row(run: dict) -> tuple[str, ...]:
    """One line of ``TABLE_COLUMNS`` for a run of ``list_table_runs``."""
    values = (
        run["run_id"],
        run["state"],
        run["mode"],
        run["model"],
        run["weights"][:12],  # a sha256 or a torchvision name: its start tells runs apart
        run["first_commit"][:19],
        run["last_commit"][:19],
        run["commits"],
        run["images"],
        run["errors"],
        run["current"],
        run["snapshot_id"],
    )
    return tuple("-" if v in (None, "") else str(v) for v in values)


def format_table_runs(runs: list[dict]) -> str:
    """A plain-text table of ``list_table_runs``, one line per run."""
    return format_rows(TABLE_COLUMNS, [table_row(r) for r in runs], names=7)
