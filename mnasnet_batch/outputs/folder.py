"""The Parquet folder output: runs of atomic Parquet parts, and what is already labeled.

The run lifecycle (lease, record, closing) is ``run``'s; this module adds the folder's layout, how its run is
opened and closed, and the Parquet parts that the Iceberg table (``table``) stages too.

Layout under the output root (readers such as ``pyarrow.dataset``, pandas and DuckDB skip names
starting with ``_``)::

    run=<run_id>/part-<hash>.parquet   rows of one run; a part appears whole or not at all
    run=<run_id>/_run.json             that run's record: status, counts, config, versions
    run=<run_id>/_config.yaml          its resolved configuration, secrets removed
    run=<run_id>/_inputs/<hash>.<n>    a WebDataset shard this run read to its end, holding n samples (inputs)
    _run.json                          the record of the latest run
    _SUCCESS                           present only while the latest run is complete
    _lease.json                        present while a job writes here: its run, host, pid, token and generation
    _lease.lock                        local disk: locked for the moment of each change of the lease
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import os
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import yaml

from mnasnet_batch.config import JobConfig
from mnasnet_batch.inputs.spool import SPOOL_FOLDER
from mnasnet_batch.outputs import files
from mnasnet_batch.outputs.files import join, named, now, read_json, stale_temporaries
from mnasnet_batch.outputs.lease import Fence
from mnasnet_batch.outputs.run import (
    CONFIG_FILE,
    RUN_RECORD,
    SUCCESS_MARKER,
    OutputTarget,
    RunPlan,
    Summary,
    close_record,
    default_run_id,
    error_kinds,
    fingerprint,
    public_config,
    submission_id,
    versions,
    write_record,
)
from mnasnet_batch.storage import Storage, StorageError


class ParquetFolder(OutputTarget):
    """The output as a folder of runs of Parquet parts (this module's layout); readers take every run's rows."""

    def open_run(self, config: JobConfig, weights_id: str, inputs, storage: Storage, fs, root: str) -> RunPlan:
        return _open_run(config, weights_id, fs, root)

    def close_run(self, config, plan, seconds, labeled_now, error, interrupted) -> Summary:
        """Counts what the run wrote, closes its record, and marks the output complete unless the run failed."""
        fs, root = plan.storage.filesystem(config.output.uri)
        record = read_json(fs, join(root, f"run={plan.run_id}", RUN_RECORD)) or {}
        # Other processes wrote the parts: this one's cached listings (s3fs, gcsfs) have not seen them.
        fs.invalidate_cache()
        summary = close_record(
            record, summarize(plan.run_uri, seconds, 0, plan.storage), plan, labeled_now, error, interrupted
        )
        write_record(fs, root, plan.run_id, record, plan.lease)
        if not error:
            guard = plan.lease.held if plan.lease is not None else None
            files.write_bytes(fs, join(root, SUCCESS_MARKER), plan.run_id.encode(), guard)
        return summary

    def cannot_close(self, config: JobConfig, plan: RunPlan, exc: Exception) -> str:
        return (
            f"output {config.output.uri} cannot be written: {files.one_line(exc)}; run {plan.run_id} stays "
            f"resumable: make the output writable again (e.g. free space) and run the same command"
        )


def plan_run(config: JobConfig, weights_id: str, storage: Storage | None = None) -> RunPlan:
    """Opens a run of the Parquet folder (``OutputTarget.plan_run``), for callers with no input plan (evaluate)."""
    return ParquetFolder().plan_run(config, weights_id, None, storage)


def finish_run(config: JobConfig, plan: RunPlan, *args, **kwargs) -> Summary:
    """Closes ``plan``'s run through the target that opened it (``OutputTarget.finish_run``)."""
    return plan.target.finish_run(config, plan, *args, **kwargs)


def read_parts(fs, root: str) -> pads.Dataset | None:
    """The published Parquet parts under ``root`` (an output, or one run's folder) as one dataset; None when there
    are none. Temporaries (``_inprogress-*``) and records are not parts: a reader sees whole parts only."""
    parts = files.parts_under(fs, root)
    return pads.dataset(parts, filesystem=fs, format="parquet") if parts else None


class Labeled:
    """The rows a run skips, being written already: the ``uri`` column of the Parquet parts under ``uri`` (the run's
    folder, or the output's when incremental), read only when asked, and a batch at a time where that will do."""

    def __init__(self, fs, root: str, uri: str):
        self.uri = uri
        self.parts = read_parts(fs, root)
        self.rows = 0 if self.parts is None else self.parts.count_rows()

    def __len__(self) -> int:
        return self.rows

    def batches(self) -> Iterator[pa.Array]:
        """The ``uri`` column, a record batch at a time."""
        if self.parts is not None:
            for batch in self.parts.to_batches(columns=["uri"]):
                yield batch.column(0)

    def uris(self) -> pa.ChunkedArray:
        """The ``uri`` column, whole."""
        return pa.chunked_array(list(self.batches()), pa.string())


def _open_run(config: JobConfig, weights_id: str, fs, root: str) -> RunPlan:
    """``plan_run`` once the lease is held: no other job writes the output meanwhile."""
    uri, mode = config.output.uri, config.output.mode
    current = fingerprint(config, weights_id)
    latest = read_json(fs, join(root, RUN_RECORD))
    finished = fs.exists(join(root, SUCCESS_MARKER))
    if latest is None or mode == "overwrite":
        # Checked before anything is removed: overwrite deletes this job's runs only, never a user's data.
        runs = recorded_runs(fs, root)
        stray = foreign_parquet(fs, root, runs)
        if stray:
            removes = "; --mode overwrite removes only this job's runs" if mode == "overwrite" else ""
            raise StorageError(
                f"output {uri} holds Parquet files that no run of this job wrote ({len(stray)}, e.g. {stray[0]})"
                f"{removes}; choose a new --output"
            )
        if mode == "overwrite":
            for folder in runs:
                fs.rm(folder, recursive=True)
            if latest is not None:
                for name in (RUN_RECORD, SUCCESS_MARKER):
                    with contextlib.suppress(FileNotFoundError):
                        fs.rm(join(root, name))
            latest, finished = None, False
    if latest is not None and latest.get("fingerprint") != current:
        before = latest.get("fingerprint") or {}
        differing = sorted(k for k in current if before.get(k, "(not recorded)") != current[k])
        values = ", ".join(
            f"{k}: {current[k]} (this run) vs {before.get(k, '(not recorded)')} (run {latest['run_id']})"
            for k in differing
        )
        raise StorageError(
            f"output {uri} holds run {latest['run_id']} of a different configuration ({', '.join(differing)} differ): "
            f"{values}; use the same settings, a new --output, or --mode overwrite"
        )
    if latest is not None and finished and mode == "auto":
        raise StorageError(
            f"output {uri} holds the finished run {latest['run_id']}; use --mode incremental to label only "
            f"new images, or --mode overwrite to start over"
        )
    resumed = latest is not None and not finished
    if resumed:
        run_id = latest["run_id"]
    else:
        run_id = config.output.run_id or submission_id() or default_run_id()
    run_uri = join(uri, f"run={run_id}")
    run_root = join(root, f"run={run_id}")
    if not resumed and fs.exists(run_root):
        raise StorageError(f"output {uri} already has a run {run_id}; pass another --run-id")
    fs.makedirs(run_root, exist_ok=True)
    for stale in stale_temporaries(fs, root) + stale_temporaries(fs, run_root):
        fs.rm(stale)  # left by a writer that was killed; its rows were never visible
    # Incremental runs skip what any run labeled; others only what this run wrote before it was stopped.
    incremental = mode == "incremental" or (resumed and latest.get("mode") == "incremental")
    done = Labeled(fs, root, uri) if incremental else Labeled(fs, run_root, run_uri)
    # Rows this run holds already; what this attempt labels is counted against the rest.
    if not incremental:
        rows_before = len(done)
    else:
        rows_before = len(Labeled(fs, run_root, run_uri)) if resumed else 0
    if finished:
        fs.rm(join(root, SUCCESS_MARKER))
    record = {
        "run_id": run_id,
        "status": "running",
        "mode": latest["mode"] if resumed else mode,
        "started_at": (latest or {}).get("started_at") if resumed else now(),
        "attempt_started_at": now(),
        "ended_at": None,
        "fingerprint": current,
        "config": public_config(config),
        "versions": versions(),
    }
    write_record(fs, root, run_id, record)
    files.write_bytes(fs, join(run_root, CONFIG_FILE), yaml.safe_dump(public_config(config), sort_keys=False).encode())
    return RunPlan(
        run_id=run_id,
        run_uri=run_uri,
        resumed=resumed,
        done=done,
        rows_before=rows_before,
    )


def recorded_runs(fs, root: str) -> list[str]:
    """The run folders under ``root`` that this job wrote: ``run=<id>/`` holding a record (``_run.json``) of run
    ``<id>``. A folder of that name without such a record (a user's hive-style partition) is not one."""
    runs = []
    for path in named(fs, root, "run="):
        run_id = os.path.basename(path.rstrip("/"))[len("run=") :]
        try:
            record = read_json(fs, join(path, RUN_RECORD))
        except (ValueError, OSError):  # not JSON, or not a file: not a record this job wrote
            record = None
        if isinstance(record, dict) and record.get("run_id") == run_id and "fingerprint" in record:
            runs.append(path.rstrip("/"))
    return runs


def foreign_parquet(fs, root: str, runs: list[str]) -> list[str]:
    """The Parquet files under ``root`` outside the job's recorded ``runs`` and its own lists of URIs (``spool``,
    written before the run is opened)."""
    own = tuple(f"{run}/" for run in runs) + (join(root, SPOOL_FOLDER) + "/",)
    return sorted(p for p in fs.find(root) if p.endswith(".parquet") and not p.startswith(own))


def write_part(table: pa.Table, run_uri: str, storage: Storage | None = None, fence: Fence | None = None) -> str:
    """Writes one Parquet part atomically, named by the URIs it holds.

    The name is a hash of the sorted URIs, so a write that is retried (after a worker died) replaces its
    own earlier file instead of adding a copy of its rows. With ``fence``, the part is published only while the
    output's lease is still the job's (``Fence.held`` raises ``LeaseLost`` otherwise, and nothing is published).

    Returns:
        The part's path.
    """
    digest = hashlib.sha256("\n".join(sorted(table["uri"].to_pylist())).encode()).hexdigest()[:24]
    fs, root = (storage or Storage()).filesystem(run_uri)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    path = join(root, f"part-{digest}.parquet")
    files.write_bytes(fs, path, buffer.getvalue(), fence.held if fence is not None else None)
    return path


def summarize(run_uri: str, seconds: float, labeled_now: int, storage: Storage | None = None) -> Summary:
    """Counts rows and error kinds in the Parquet parts under ``run_uri``, a record batch at a time."""
    fs, root = (storage or Storage()).filesystem(run_uri)
    dataset = read_parts(fs, root)
    if dataset is None:
        return Summary(images=0, errors=0, seconds=seconds, labeled_now=labeled_now)
    kinds: collections.Counter[str] = collections.Counter()
    for batch in dataset.to_batches(columns=["error"]):
        kinds.update(error_kinds(batch.column(0)))
    return Summary(
        images=dataset.count_rows(),
        errors=sum(kinds.values()),
        seconds=seconds,
        error_kinds=dict(kinds),
        labeled_now=labeled_now,
    )
