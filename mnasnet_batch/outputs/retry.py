"""A Parquet folder's retry-errors: its error rows labeled again, then replaced in the parts that hold them.

A retry run writes its rows under ``run=<id>/_retried/`` (``RETRIED``), which readers of the folder skip, as they
skip every name starting with ``_``. Once labeled, each part holding a retried image's error row is written again
with that row replaced, under its own name (a part's name is a hash of its URIs, which do not change), by the
whole-file write every part gets: a reader sees the old part or the new one, so every image is there exactly once
at every moment. Once the run's record says what was retried, the retried rows' own parts are removed. A run
stopped at any point before resumes: its retried rows stay where they were written, and replacing a row twice
changes nothing.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mnasnet_batch.outputs import files

# The folder, inside a retry run's own, of the rows it labeled, until they replace the error rows.
RETRIED = "_retried"


def error_uris(parts) -> pa.Array:
    """The URIs whose row is an error in ``parts`` (``folder.read_parts``; None: no parts), a batch at a time."""
    if parts is None:
        return pa.array([], pa.string())
    found = [
        batch.column(0).filter(pc.equal(batch.column(1), "error"))
        for batch in parts.to_batches(columns=["uri", "status"])
    ]
    return pa.concat_arrays([a.cast(pa.string()) for a in found]) if found else pa.array([], pa.string())


def not_retried(listed: pa.Array | pa.ChunkedArray, errors: pa.Array, held: pa.Array) -> pa.Array:
    """The listed URIs a retry run does not label (``RunPlan.done``): all but those with an error row, and those
    it holds already (``held``, its rows written before it was stopped)."""
    listed, errors, held = (_whole(a) for a in (listed, errors, held))
    retried = errors.filter(pc.invert(pc.is_in(errors, value_set=held)))
    return pa.concat_arrays([listed.filter(pc.invert(pc.is_in(listed, value_set=retried))), held])


def _whole(uris: pa.Array | pa.ChunkedArray) -> pa.Array:
    uris = uris.cast(pa.string())
    return uris.combine_chunks() if isinstance(uris, pa.ChunkedArray) else uris


def latest_per_uri(rows: pa.Table) -> pa.Table:
    """One row per URI, the last: a part rewritten by a retried write task may repeat URIs of another."""
    if pc.count_distinct(rows["uri"]).as_py() == rows.num_rows:
        return rows
    positions = pa.table({"uri": rows["uri"], "at": pa.array(range(rows.num_rows), pa.int64())})
    return rows.take(positions.group_by("uri").aggregate([("at", "max")])["at_max"])


def replaced(part: pa.Table, rows: pa.Table) -> pa.Table | None:
    """``part`` with its rows of ``rows``' URIs replaced by those (cast to the part's schema); None when it holds
    none of them."""
    hit = pc.is_in(part["uri"], value_set=rows["uri"])
    if not pc.any(hit).as_py():
        return None
    found = pc.index_in(part["uri"].filter(hit), value_set=rows["uri"])
    new = rows.take(found).select(part.schema.names).cast(part.schema)
    return pa.concat_tables([part.filter(pc.invert(hit)), new])


def parquet_bytes(table: pa.Table) -> bytes:
    """A part's bytes: ``table`` as Parquet, zstd-compressed."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def replace_errors(fs, root: str, parts, retried, guard=None) -> tuple[dict[str, object], pa.Table]:
    """Replaces the rows of ``retried`` (``folder.read_parts`` of a retry run's ``RETRIED`` folder) in ``parts``
    (the folder's, which do not hold ``retried``'s own), one part at a time, each a whole-file write published
    under ``guard`` (``files.write_bytes``: the output's lease still the job's).

    Returns:
        What was retried, for the run's record (images, ok, error, and the parts replaced, as paths under
        ``root``); and the retried rows no part holds (a part removed by hand since), which the caller writes.
    """
    rows = latest_per_uri(retried.to_table()) if retried is not None else None
    if rows is None or not rows.num_rows:
        return {"images": 0, "ok": 0, "error": 0, "parts_replaced": []}, pa.table({"uri": pa.array([], pa.string())})
    placed = pa.array([], pa.string())
    written = []
    for path in parts.files if parts is not None else []:
        with fs.open(path, "rb") as f:
            new = replaced(pq.read_table(f), rows)
        if new is not None:
            files.write_bytes(fs, path, parquet_bytes(new), guard)
            placed = pa.concat_arrays([placed, new["uri"].combine_chunks().cast(pa.string())])
            written.append(under(path, root))
    errors = pc.sum(pc.equal(rows["status"], "error")).as_py() or 0
    retried_record = {"images": rows.num_rows, "ok": rows.num_rows - errors, "error": errors, "parts_replaced": written}
    return retried_record, rows.filter(pc.invert(pc.is_in(rows["uri"], value_set=placed)))


def under(path: str, root: str) -> str:
    """``path`` relative to ``root`` (a folder above it), without asking the working directory."""
    prefix = root.rstrip("/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) else path
