"""A labeling run's output rows as the tools around the job read them (report, review): Parquet folder or table."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from mnasnet_batch.config import OutputConfig
from mnasnet_batch.outputs.folder import read_parts
from mnasnet_batch.outputs.run import RUN_RECORD
from mnasnet_batch.storage import Storage

# What the Iceberg table holds beside the Parquet schema's columns (``iceberg.table_schema``): the run that wrote
# a row, and its source's size and version when listed. Read from a Parquet folder, ``run_id`` is the part's
# ``run=<id>/`` folder and the source's size and version are null: the folder's rows do not record them.
RUN_COLUMNS = ("run_id", "source_size", "source_version")


@dataclass(frozen=True)
class OutputRows:
    """The rows of an output (the columns asked for) and the records (``_run.json``) of the runs that wrote them."""

    rows: pa.Table
    # Oldest first.
    runs: list[dict]

    def run(self, run_id: str | None) -> dict:
        """The record of the run ``run_id``; empty when it has none (parts copied without their records)."""
        return next((r for r in self.runs if r.get("run_id") == run_id), {}) if run_id else {}


def read_rows(output: OutputConfig, columns: tuple[str, ...], storage: Storage | None = None) -> OutputRows:
    """The rows of a labeling job's output: the Parquet parts under ``output.uri``, or with ``output.table`` the
    Iceberg table's current snapshot (the records then are those of the runs staged under ``output.uri``).

    Args:
        output: the job's output settings (``uri``; ``table`` and ``catalog`` for a table).
        columns: of the output schema (``model.postprocess.OUTPUT_SCHEMA``) and ``RUN_COLUMNS``.
        storage: the job's storage handle; None: local files and anonymous URIs.

    Raises:
        FileNotFoundError: no Parquet parts under ``output.uri``.
        StorageError: the table's catalog cannot be reached, or holds no such table.
    """
    storage = storage or Storage()
    if output.table:
        from mnasnet_batch.outputs.iceberg import STAGING, current_rows, load_table

        rows = current_rows(load_table(output, storage), columns)
        fs, root = storage.filesystem(output.uri)
        return OutputRows(rows, run_records(fs, f"{root.rstrip('/')}/{STAGING}"))
    fs, root = storage.filesystem(output.uri)
    root = root.rstrip("/")
    dataset = read_parts(fs, root)
    if dataset is None:
        raise FileNotFoundError(f"no Parquet parts under {output.uri}")
    stored = [c for c in columns if c not in RUN_COLUMNS]
    table = dataset.to_table(columns=[*stored, "__filename"])  # the part each row is in
    added = {
        "run_id": pc.struct_field(pc.extract_regex(table["__filename"], r"/run=(?P<run_id>[^/]+)/[^/]+$"), [0]),
        "source_size": pa.nulls(table.num_rows, pa.int64()),
        "source_version": pa.nulls(table.num_rows, pa.string()),
    }
    arrays = [table[c] if c in stored else added[c] for c in columns]
    return OutputRows(pa.table(arrays, names=list(columns)), run_records(fs, root))


def run_records(fs, root: str) -> list[dict]:
    """The records (``run=<id>/_run.json``) of the runs under ``root``, oldest first; ``root`` may be one run's."""
    found = fs.find(root, maxdepth=2) if fs.exists(root) else []
    record_paths = [p for p in found if p.endswith(f"/{RUN_RECORD}") and p.rsplit("/", 2)[-2].startswith("run=")]
    return sorted((json.loads(fs.cat_file(p)) for p in record_paths), key=lambda r: r.get("started_at") or "")


def top1_scores(rows: pa.Table) -> pa.ChunkedArray:
    """Each row's top-1 score (``top_k_scores``' first); null on an error row."""
    return pc.list_element(rows["top_k_scores"], 0)


def least_confident(rows: pa.Table, limit: int | None = None, below: float | None = None) -> pa.Table:
    """The labeled rows (``status`` ok) by top-1 score, least confident first (ties by ``uri``, so the order does
    not depend on how the rows were read), at most ``limit``, only those under ``below`` when given."""
    ok = rows.filter(pc.equal(rows["status"], "ok"))
    scores = top1_scores(ok)
    if below is not None:
        ok, scores = ok.filter(pc.less(scores, below)), scores.filter(pc.less(scores, below))
    order = pc.sort_indices(
        pa.table({"score": scores, "uri": ok["uri"]}), sort_keys=[("score", "ascending"), ("uri", "ascending")]
    )
    if limit is not None:
        order = order[:limit]
    return ok.take(order)
