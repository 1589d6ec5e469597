"""The Parquet folder output: runs of atomic Parquet parts, and what is already labeled.

The run lifecycle (lease, record, closing) is ``run``'s; this module adds the folder's layout, how its run is
opened and closed, and the Parquet parts that the Iceberg table (``table``) stages too.

Layout under the output root (readers such as ``pyarrow.dataset``, pandas and DuckDB skip names
starting with ``_``)::

    run=<run_id>/part-<hash>.parquet   rows of one run; a part appears whole or not at all
    run=<run_id>/_run.json             that run's record: status, counts, config, versions
    run=<run_id>/_config.yaml          its resolved configuration, secrets removed
    run=<run_id>/_inputs/<hash>.<n>    a WebDataset shard this run read to its end, holding n samples (inputs)
    run=<run_id>/_retried/part-*.parquet   a retry-errors run's rows, until they replace the error rows (retry)
    _run.json                          the record of the latest run
    _SUCCESS                           present only while the latest run is complete
    _lease.json                        present while a job writes here: its run, host, pid, token and generation
    _lease.lock                        local disk: locked for the moment of each change of the lease
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.dataset as pads
import yaml

from mnasnet_batch.config import JobConfig
from mnasnet_batch.inputs.spool import SPOOL_FOLDER
from mnasnet_batch.outputs import files, retry
from mnasnet_batch.outputs.files import join, named, now, read_json, stale_temporaries
from mnasnet_batch.outputs.lease import Fence
from mnasnet_batch.outputs.run import (
    CONFIG_FILE,
    RUN_RECORD,
    SUCCESS_MARKER,
    Holdings,
    OutputTarget,
    PriorRun,
    ResumeRules,
    RunPlan,
    Summary,
    close_record,
    decide_run,
    default_run_id,
    error_kinds,
    fingerprint,
    lists_everything,
    public_config,
    submission_id,
    versions,
    write_record,
)
from mnasnet_batch.storage import Storage, StorageError


class ParquetFolder(OutputTarget):
    """The output as a folder of runs of Parquet parts (this module's layout); readers take every run's rows."""

    def open_run(self, config: JobConfig, weights_id: str, inputs, storage: Storage, fs, root: str) -> RunPlan:
        return _open_run(config, weights_id, fs, root, inputs)

    def close_run(self, config, plan, seconds, labeled_now, error, interrupted) -> Summary:
        """Counts what the run wrote, closes its record, and marks the output complete unless the run failed."""
        fs, root = plan.storage.filesystem(config.output.uri)
        record = read_json(fs, join(root, f"run={plan.run_id}", RUN_RECORD)) or {}
        # Other processes wrote the parts: this one's cached listings (s3fs, gcsfs) have not seen them.
        fs.invalidate_cache()
        summary = close_record(
            record, summarize(plan.run_uri, seconds, 0, plan.storage), plan, labeled_now, error, interrupted
        )
        retried = None
        if not error and record.get("mode") == "retry-errors":
            retried = read_parts(*plan.storage.filesystem(plan.run_uri))
            record["retried"] = _replace_retried(fs, root, plan, retried)
        write_record(fs, root, plan.run_id, record, plan.lease)
        if not error:
            guard = plan.lease.held if plan.lease is not None else None
            files.write_bytes(fs, join(root, SUCCESS_MARKER), plan.run_id.encode(), guard)
        for path in retried.files if retried is not None else []:
            files.remove_quietly(fs, path)  # in place now, and recorded: a copy no reader needs
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
    are none. Temporaries (``_inprogress-*``) and records are not parts, nor is what a folder under ``root`` named
    ``_...`` holds (a retry run's rows not yet in place): a reader sees whole parts only, as ``pyarrow.dataset``
    would read the folder."""
    found = fs.find(root) if fs.exists(root) else []
    files = sorted(p for p in found if _is_part(retry.under(p, root)))
    return pads.dataset(files, filesystem=fs, format="parquet") if files else None


def _is_part(path: str) -> bool:
    """Whether ``path`` (under the root read) is a part readers see: ``part-*.parquet``, in no ``_`` or ``.``
    folder."""
    *folders, name = path.split("/")
    hidden = any(folder.startswith(("_", ".")) for folder in folders)
    return name.startswith("part-") and name.endswith(".parquet") and not hidden


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


# How the folder opens a run (``run.decide_run``): an unfinished run resumes in any mode, since every mode skips what
# the run wrote; overwrite removes every run of this job, the folder's rows being its runs' parts.
FOLDER_RULES = ResumeRules(
    modes=("auto", "incremental", "retry-errors", "overwrite"),
    same_settings=frozenset({"auto", "incremental", "retry-errors"}),
    resumes_in_any_mode=True,
    overwrite_removes_runs=True,
)


def holdings(config: JobConfig, fs, root: str) -> Holdings:
    """What the folder at ``root`` holds, as ``run.decide_run`` needs it; every file listed only when
    ``run.lists_everything`` (a new output, or overwrite)."""
    name = f"output {config.output.uri}"
    latest = PriorRun.from_record(
        read_json(fs, join(root, RUN_RECORD)), "fingerprint", fs.exists(join(root, SUCCESS_MARKER))
    )
    taken = frozenset(os.path.basename(p.rstrip("/"))[len("run=") :] for p in named(fs, root, "run="))
    runs, foreign = (), ()
    if lists_everything(latest, config.output.mode):
        # Checked before anything is removed: overwrite deletes this job's runs only, never a user's data.
        paths = recorded_runs(fs, root)
        runs = tuple(os.path.basename(p)[len("run=") :] for p in paths)
        foreign = tuple(foreign_parquet(fs, root, paths))
    if latest is None:
        return Holdings(name, taken=taken, runs=runs, foreign=foreign)
    settings_of = f"run {latest.run_id}"
    return Holdings(name, latest, latest.settings, settings_of, taken=taken, runs=runs, foreign=foreign)


def _open_run(config: JobConfig, weights_id: str, fs, root: str, inputs=None) -> RunPlan:
    """``plan_run`` once the lease is held (no other job writes the output meanwhile): what ``run.decide_run``
    decides, done. ``inputs``: the planned input (``inputs.InputPlan``); None for callers without one."""
    uri = config.output.uri
    whole = inputs.layout.noun if inputs is not None and not inputs.layout.uri_per_image else ""
    current = fingerprint(config, weights_id)
    new_run_id = config.output.run_id or submission_id() or default_run_id()
    decision = decide_run(holdings(config, fs, root), config.output.mode, current, new_run_id, FOLDER_RULES, whole)
    if decision.labels == "errors" and inputs is None:
        raise StorageError("--mode retry-errors needs the input's listing: run it with the labeling job")
    for run_id in decision.discard:
        fs.rm(join(root, f"run={run_id}"), recursive=True)
    if decision.discard:  # the latest run's record and marker go with it
        for name in (RUN_RECORD, SUCCESS_MARKER):
            with contextlib.suppress(FileNotFoundError):
                fs.rm(join(root, name))
    run_id = decision.run_id
    run_root = join(root, f"run={run_id}")
    # Where the run's rows go: its folder; a retry run's, out of readers' sight until they replace the error rows.
    rows_uri = join(uri, f"run={run_id}", *((retry.RETRIED,) if decision.labels == "errors" else ()))
    rows_root = join(run_root, *((retry.RETRIED,) if decision.labels == "errors" else ()))
    fs.makedirs(rows_root, exist_ok=True)
    for folder in dict.fromkeys((root, run_root, rows_root)):
        for stale in stale_temporaries(fs, folder):
            fs.rm(stale)  # left by a writer that was killed; its rows were never visible
    # What this run holds already: what this attempt labels is counted against the rest.
    held = Labeled(fs, rows_root, rows_uri)
    record = {
        "run_id": run_id,
        "status": "running",
        "mode": decision.mode,
        "started_at": decision.started_at or now(),
        "attempt_started_at": now(),
        "ended_at": None,
        "fingerprint": current,
        "config": public_config(config),
        "versions": versions(),
    }
    if not decision.resumed:  # the output is complete no longer; then the new run is the latest
        with contextlib.suppress(FileNotFoundError):
            fs.rm(join(root, SUCCESS_MARKER))
    write_record(fs, root, run_id, record)
    files.write_bytes(fs, join(run_root, CONFIG_FILE), yaml.safe_dump(public_config(config), sort_keys=False).encode())
    done = _done(fs, root, uri, decision.labels, held, inputs)
    return RunPlan(run_id=run_id, run_uri=rows_uri, resumed=decision.resumed, done=done, rows_before=len(held))


def _done(fs, root: str, uri: str, labels: str, held: Labeled, inputs) -> Labeled | pa.Array:
    """What a run labeling ``labels`` (``RunDecision.labels``) skips: incremental runs what any run labeled; retry
    runs all but the error rows; others only what the run wrote (``held``) before it was stopped."""
    if labels == "new":
        return Labeled(fs, root, uri)
    if labels == "errors":
        return retry.not_retried(inputs.listed(), retry.error_uris(read_parts(fs, root)), held.uris())
    return held


def _replace_retried(fs, root: str, plan: RunPlan, retried) -> dict[str, object]:
    """A retry run's rows (``retried``, its parts) put in place of the error rows they retried
    (``retry.replace_errors``); what was retried, for the run's record. Its own parts stay until that is recorded.
    """
    guard = plan.lease.held if plan.lease is not None else None  # each part replaced only while the lease is ours
    record, unplaced = retry.replace_errors(fs, root, read_parts(fs, root), retried, guard)
    if unplaced.num_rows:  # their error rows' parts were removed by hand: they join the folder as new rows
        home = plan.run_uri.rsplit("/", 1)[0]
        fence = plan.lease.fence(plan.storage) if plan.lease is not None else None
        record["parts_replaced"].append(retry.under(write_part(unplaced, home, plan.storage, fence), root))
    return record


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
    path = join(root, f"part-{digest}.parquet")
    files.write_bytes(fs, path, retry.parquet_bytes(table), fence.held if fence is not None else None)
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
