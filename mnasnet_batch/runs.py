"""The runs under an output root, read from their ``_run.json`` records: status, counts, throughput."""

from __future__ import annotations

import json

from fsspec.core import url_to_fs

from mnasnet_batch.output import RUN_RECORD, SUCCESS_MARKER

COLUMNS = ("run", "status", "mode", "started (UTC)", "ended (UTC)", "images", "ok", "errors", "images/s", "seconds")


def list_runs(uri: str) -> list[dict]:
    """Reads the record of every ``run=<id>/`` under ``uri``, oldest first.

    Only the latest run can say ``running``: the job resumes an unfinished run before starting another.
    It may be in progress, or interrupted and resumable by running the same command again.

    Returns:
        The records, each with ``latest`` and ``complete`` (the latest run, finished: ``_SUCCESS``) added.

    Raises:
        FileNotFoundError: ``uri`` holds no run records.
    """
    fs, root = url_to_fs(uri)
    root = root.rstrip("/")
    paths = fs.glob(f"{root}/run=*/{RUN_RECORD}")
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
