"""The runs under an output root, read from their ``_run.json`` records: status, counts, throughput."""

from __future__ import annotations

import argparse
import json
import posixpath

from mnasnet_batch.config import ConfigError, load_config, parse_override
from mnasnet_batch.output import RUN_RECORD, SUCCESS_MARKER
from mnasnet_batch.storage import Storage

COLUMNS = ("run", "status", "mode", "started (UTC)", "ended (UTC)", "images", "ok", "errors", "images/s", "seconds")


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    """The labeling job's ``--config`` and ``--set``, for the tools that read its output (runs.py, report.py)."""
    parser.add_argument(
        "--config", help="the job's YAML profile, e.g. conf/cpu-cluster.yaml; only its storage section is used"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="storage.KEY=VALUE",
        help="override a storage setting, e.g. --set storage.endpoint_url=http://minio:9000 (repeatable)",
    )


def storage_from_args(args: argparse.Namespace) -> Storage:
    """The storage handle from ``add_storage_arguments``' options, read by the labeling job's own config code.

    Raises:
        ConfigError: a bad profile or value, or ``--set`` of a setting other than ``storage.*``.
    """
    overrides = [parse_override(assignment) for assignment in args.set]
    for assignment, override in zip(args.set, overrides, strict=True):
        if set(override) != {"storage"}:
            raise ConfigError(f"--set {assignment!r}: only storage.* settings apply to reading an output")
    return Storage(load_config(args.config, overrides).storage)


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
    rows = [COLUMNS] + [row(r) for r in records]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    # Names left-aligned, numbers right-aligned.
    lines = [
        "  ".join(cell.ljust(w) if i < 5 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    return "\n".join(line.rstrip() for line in lines)
