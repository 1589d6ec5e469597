"""The output location: runs, their records, atomic Parquet parts, and what is already labeled.

The output target is decided once (``target_for``): this module's Parquet folder (``ParquetFolder``), or an
Apache Iceberg table (``mnasnet_batch.table.IcebergTable``) whose runs stage their parts here before committing.

Layout under the output root (readers such as ``pyarrow.dataset``, pandas and DuckDB skip names
starting with ``_``)::

    run=<run_id>/part-<hash>.parquet   rows of one run; a part appears whole or not at all
    run=<run_id>/_run.json             that run's record: status, counts, config, versions
    run=<run_id>/_config.yaml          its resolved configuration, secrets removed
    run=<run_id>/_inputs/<hash>.<n>    a WebDataset shard this run read to its end, holding n samples (sources)
    _run.json                          the record of the latest run
    _SUCCESS                           present only while the latest run is complete
    _lease.json                        present while a job writes here: its run, host, pid and last heartbeat
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import logging
import math
import os
import platform
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import yaml
from fsspec.implementations.local import LocalFileSystem

from mnasnet_batch import spool
from mnasnet_batch.config import TABLE_ONLY_MODES, ConfigError, JobConfig, to_dict
from mnasnet_batch.spool import SPOOL_FOLDER
from mnasnet_batch.storage import Storage, StorageError

log = logging.getLogger(__name__)

RUN_RECORD = "_run.json"
SUCCESS_MARKER = "_SUCCESS"
CONFIG_FILE = "_config.yaml"
TEMP_PREFIX = "_inprogress-"
_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + "[0-9a-f]{32}")
LEASE_FILE = "_lease.json"
# Seconds between the heartbeats of a running job's lease: a small read and write each, cheap on any store.
LEASE_HEARTBEAT_S = 30.0
# A lease that has not beaten for this long is stale: its job ended without releasing it (killed, machine lost),
# and the next job takes the output over. Four intervals, so that a slow storage request or a driver starved of
# CPU for a minute does not let a second job in; it is also how long a crashed job's output stays locked.
# The hosts' clocks must agree to well within it.
LEASE_STALE_S = 4 * LEASE_HEARTBEAT_S


@dataclass(frozen=True)
class Summary:
    """What a run wrote, over all its attempts."""

    images: int
    errors: int
    seconds: float
    error_kinds: dict[str, int] = field(default_factory=dict)
    # Images predicted by this attempt; fewer than ``images`` when it resumed an interrupted run.
    labeled_now: int = 0
    # Of ``images``, rows that other jobs' commits replaced since (a table written by two jobs at once).
    replaced_by_other_jobs: int = 0
    # Images labeled after this attempt's first batch, and the seconds from its first batch to its last
    # (``pipeline.run``): the labeling rate, which ``seconds`` (Ray's and the model's start-up included) is not.
    labeling_images: int = 0
    labeling_s: float = 0.0

    def line(self) -> str:
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(self.error_kinds.items()))
        resumed = f", {self.images - self.labeled_now} from before the resume" if self.labeled_now < self.images else ""
        others = self.replaced_by_other_jobs
        replaced = f", {others} replaced since by other jobs" if others else ""
        rate = ""
        if self.labeling_s > 0 and self.labeling_images > 0:
            rate = f", labeling {self.labeling_images / self.labeling_s:.1f} images/s (first batch to last)"
        return (
            f"labeled {self.images} images ({self.errors} errors{': ' + kinds if kinds else ''}{resumed}{replaced}) "
            f"in {self.seconds:.1f} s{rate}"
        )


@dataclass(frozen=True)
class RunPlan:
    """Where a run writes and what it can skip."""

    run_id: str
    run_uri: str
    resumed: bool
    # Input URIs that already have a row under the output (this run's, or every run's when incremental).
    done: Labeled
    # Rows the run held before this attempt: what this attempt labeled is at most the rest.
    rows_before: int = 0
    # This job's hold on the output while the run is open; finish_run releases it.
    lease: Lease | None = field(default=None, compare=False, repr=False)
    # The job's storage handle, for the run's parts and records.
    storage: Storage = field(default_factory=Storage, compare=False, repr=False)
    # The output target that opened the run, and closes it (``target.finish_run``).
    target: OutputTarget | None = field(default=None, compare=False, repr=False)


class OutputTarget:
    """Where a job's rows end up: ``plan_run`` opens a run before any image is read, ``finish_run`` closes it."""

    def plan_run(self, config: JobConfig, weights_id: str, inputs, storage: Storage) -> RunPlan:
        """Opens the run for ``inputs`` (a ``sources.InputPlan``) through the job's ``storage`` handle:
        ``RunPlan.done`` are the URIs not to label."""
        raise NotImplementedError

    def finish_run(
        self,
        config: JobConfig,
        plan: RunPlan,
        seconds: float,
        labeled_now: int | None = None,
        error: str = "",
        interrupted: bool = False,
    ) -> Summary:
        """Closes the run (see ``finish_run``) and returns what it holds."""
        raise NotImplementedError


class ParquetFolder(OutputTarget):
    """The output as a folder of runs of Parquet parts (this module's layout); readers take every run's rows."""

    def plan_run(self, config: JobConfig, weights_id: str, inputs=None, storage: Storage | None = None) -> RunPlan:
        return dataclasses.replace(plan_run(config, weights_id, storage), target=self)

    def finish_run(self, config, plan, seconds, labeled_now=None, error="", interrupted=False) -> Summary:
        return finish_run(config, plan, seconds, labeled_now, error, interrupted)


def target_for(config: JobConfig) -> OutputTarget:
    """The output target ``output.table`` chooses, checked before anything is read.

    Raises:
        ConfigError: a mode the Parquet folder cannot do, or a table output that cannot be used (pyiceberg
            missing, an object-store output without ``output.catalog``).
    """
    if config.output.table:
        from mnasnet_batch.table import IcebergTable

        return IcebergTable.for_config(config)
    if config.output.mode in TABLE_ONLY_MODES:
        raise ConfigError(
            f"--mode {config.output.mode} needs the table output: in a Parquet folder it would leave two rows for "
            f"one image; set output.table (e.g. --set output.table=labels.images)"
        )
    return ParquetFolder()


def _now(timespec: str = "seconds") -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec=timespec)


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message``: what a one-line error says about a cause."""
    line = _first_line(str(exc))
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def fingerprint(config: JobConfig, weights_id: str) -> dict[str, object]:
    """The settings that decide the predictions; runs into one output must agree on them."""
    return {
        "input": config.input.uri,
        "model": config.model.name,
        "weights": weights_id,
        "top_k": config.model.top_k,
        "max_pixels": config.preprocess.max_pixels,
        "apply_exif_orientation": config.preprocess.apply_exif_orientation,
    }


def _join(root: str, *names: str) -> str:
    return "/".join([root.rstrip("/"), *names])


def _read_json(fs, path: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def _temp_path(path: str) -> str:
    return _join(os.path.dirname(path), f"{TEMP_PREFIX}{uuid.uuid4().hex}")


def _remove_quietly(fs, path: str) -> None:
    """Removes a file if it can (a full disk still allows it); a temporary left behind is removed by the next run."""
    with contextlib.suppress(OSError):
        fs.rm(path)


def _write_bytes(fs, path: str, data: bytes) -> None:
    """Writes a whole file so that readers see the old content or the new, never a part.

    Raises:
        OSError: the write failed (e.g. the disk is full); the temporary file is removed first.
    """
    if isinstance(fs, LocalFileSystem):
        temp = _temp_path(path)
        try:
            fs.pipe_file(temp, data)
            os.replace(temp, path)
        except BaseException:
            _remove_quietly(fs, temp)
            raise
    else:
        # Object stores publish an object only once its upload is complete.
        fs.pipe_file(path, data)


def _create_exclusively(fs, path: str, data: bytes) -> None:
    """Writes a whole file only if ``path`` does not exist yet.

    Raises:
        FileExistsError: ``path`` exists. Stores that cannot create exclusively (S3-compatible stores without
            conditional writes) may overwrite instead: callers read the file back to see whose it is.
    """
    if isinstance(fs, LocalFileSystem):
        # Not a TEMP_PREFIX name: the job holding the lease clears those, and this one may be a racing job's.
        temp = f"{path}.{uuid.uuid4().hex}"
        try:
            fs.pipe_file(temp, data)
            os.link(temp, path)  # fails if path exists, and the file appears whole
        finally:
            _remove_quietly(fs, temp)
    else:
        fs.pipe_file(path, data, mode="create")  # If-None-Match: * on S3


class Lease:
    """This job's hold on an output location: ``_lease.json``, refreshed by a daemon thread while the run is open.

    A second job on the same output finds the lease fresh and stops, instead of resuming (and labeling again) a
    run that is still going. A lease not refreshed for ``LEASE_STALE_S``, or whose process is gone from this
    machine, is stale and is taken over.
    """

    def __init__(self, fs, path: str, uri: str):
        self.fs, self.path, self.uri = fs, path, uri
        self.holder: dict[str, object] = {
            "run_id": "",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_namespace": _pid_namespace(),
            "token": uuid.uuid4().hex,
            "heartbeat_at": _now("milliseconds"),
        }
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, fs, root: str, uri: str) -> Lease:
        """Takes the lease of the output at ``root`` (``uri`` as the user wrote it), unless a live job holds it.

        Raises:
            StorageError: another job holds the output; the message names its run and when it last beat.
        """
        lease = cls(fs, _join(root, LEASE_FILE), uri)
        try:
            current = _read_json(fs, lease.path)
        except ValueError:  # not JSON: a lease no job can be refreshing
            current = {}
        if current is not None:
            if not _lease_is_stale(current):
                raise StorageError(_in_use(uri, current))
            log.warning("output %s: taking over the stale lease of %s", uri, _holder_text(current))
            with contextlib.suppress(FileNotFoundError):
                fs.rm(lease.path)
        with contextlib.suppress(FileExistsError):  # created by another job since the read: named below
            _create_exclusively(fs, lease.path, lease._data())
        # Two jobs racing on a store that cannot create exclusively both write; the last write is the one read.
        winner = _read_json(fs, lease.path)
        if (winner or {}).get("token") != lease.holder["token"]:
            raise StorageError(_in_use(uri, winner or {}))
        return lease

    def hold(self, run_id: str) -> None:
        """Names the run in the lease and refreshes it every ``LEASE_HEARTBEAT_S`` until ``release``."""
        self.holder["run_id"] = run_id
        self._beat()
        self._thread = threading.Thread(target=self._heartbeats, name=f"lease-{run_id}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stops the heartbeats and deletes the lease if it is still this job's; never raises."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=LEASE_HEARTBEAT_S)
        try:
            if (_read_json(self.fs, self.path) or {}).get("token") == self.holder["token"]:
                self.fs.rm(self.path)
        except Exception as exc:
            log.warning("output %s: cannot release the lease (%s); stale in %.0f s", self.uri, exc, LEASE_STALE_S)

    def _data(self) -> bytes:
        return json.dumps(self.holder, indent=2).encode()

    def _beat(self) -> None:
        current = _read_json(self.fs, self.path)
        if (current or {}).get("token") != self.holder["token"]:
            # Taken over while this job could not beat for LEASE_STALE_S: two jobs may now write the output.
            log.error("output %s: lost the lease to %s", self.uri, _holder_text(current or {}))
            self._stopped.set()
            return
        self.holder["heartbeat_at"] = _now("milliseconds")
        _write_bytes(self.fs, self.path, self._data())

    def _heartbeats(self) -> None:
        while not self._stopped.wait(LEASE_HEARTBEAT_S):
            try:
                self._beat()
            except Exception as exc:  # a storage hiccup: the next beat tries again, staleness allows a few
                log.warning("output %s: lease heartbeat failed: %s", self.uri, _one_line(exc))


def _pid_namespace() -> str:
    """This process's PID namespace (Linux), so that containers sharing a host name do not judge each other's pids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _lease_age_s(holder: dict) -> float:
    try:
        beat = datetime.datetime.fromisoformat(str(holder["heartbeat_at"]))
    except (KeyError, ValueError):
        return math.inf
    return (datetime.datetime.now(datetime.timezone.utc) - beat).total_seconds()


def _lease_is_stale(holder: dict) -> bool:
    """Whether a lease no longer protects a live job: not refreshed for LEASE_STALE_S, or its process is gone."""
    if _lease_age_s(holder) > LEASE_STALE_S:
        return True
    here = holder.get("host") == socket.gethostname() and holder.get("pid_namespace") == _pid_namespace()
    return here and not _process_exists(int(holder.get("pid") or 0))


def _process_exists(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


def _holder_text(holder: dict) -> str:
    run = f"run {holder['run_id']}" if holder.get("run_id") else "a job still planning its run"
    return f"{run} (host {holder.get('host', '?')}, pid {holder.get('pid', '?')})"


def _in_use(uri: str, holder: dict) -> str:
    age = _lease_age_s(holder)
    beat = f"last heartbeat {age:.0f} s ago" if math.isfinite(age) else "no heartbeat yet"
    return (
        f"output {uri} is in use by {_holder_text(holder)}, {beat}; wait for it to end, or, if that job is gone, "
        f"run again once its lease is {LEASE_STALE_S:.0f} s old, or use another --output"
    )


def _named(fs, folder: str, prefix: str) -> list[str]:
    """The entries of ``folder`` whose names start with ``prefix``: a listing, not a glob, so that ``[``, ``?`` or
    ``*`` in the folder's own path are taken as they are."""
    try:
        names = fs.ls(folder, detail=False)
    except FileNotFoundError:  # an object store's "folder" exists only once an object is under it
        return []
    return [p for p in names if os.path.basename(p.rstrip("/")).startswith(prefix)]


def stale_temporaries(fs, folder: str) -> list[str]:
    """The temporaries that killed writers left in ``folder``: ``_temp_path``'s names exactly, so that a user's
    file that merely starts like one is never removed."""
    return [p for p in _named(fs, folder, TEMP_PREFIX) if _TEMP_NAME.fullmatch(os.path.basename(p.rstrip("/")))]


def read_parts(fs, root: str) -> pads.Dataset | None:
    """The published Parquet parts under ``root`` (an output, or one run's folder) as one dataset; None when there
    are none. Temporaries (``_inprogress-*``) and records are not parts: a reader sees whole parts only."""
    found = fs.find(root) if fs.exists(root) else []
    files = sorted(p for p in found if os.path.basename(p).startswith("part-") and p.endswith(".parquet"))
    return pads.dataset(files, filesystem=fs, format="parquet") if files else None


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


def plan_run(config: JobConfig, weights_id: str, storage: Storage | None = None) -> RunPlan:
    """Takes the output's lease, decides the run from ``output.mode`` and what the output holds, and opens its record.

    The lease is held (refreshed by a daemon thread) until ``finish_run``. ``storage``: the job's handle; None
    builds one from ``config.storage``.

    Raises:
        StorageError: another job is writing the output, or the output holds a finished run (mode auto), or runs
            of another configuration, or cannot be written; the message names the flag to use.
    """
    uri = config.output.uri
    storage = storage or Storage(config.storage)
    lease = None
    try:
        fs, root = storage.filesystem(uri)
        fs.makedirs(root, exist_ok=True)
        lease = Lease.acquire(fs, root, uri)
        spool.remove_abandoned(fs, root, LEASE_STALE_S)
        plan = _open_run(config, weights_id, fs, root)
        lease.hold(plan.run_id)
    except BaseException as exc:
        if lease is not None:
            lease.release()
        if isinstance(exc, StorageError) or not isinstance(exc, Exception):
            raise
        raise StorageError(f"output {uri} cannot be written: {_one_line(exc)}") from None
    if plan.resumed:
        log.info("resuming run %s: %d images already written", plan.run_id, plan.rows_before)
    return dataclasses.replace(plan, lease=lease, storage=storage)


def _open_run(config: JobConfig, weights_id: str, fs, root: str) -> RunPlan:
    """``plan_run`` once the lease is held: no other job writes the output meanwhile."""
    uri, mode = config.output.uri, config.output.mode
    current = fingerprint(config, weights_id)
    latest = _read_json(fs, _join(root, RUN_RECORD))
    finished = fs.exists(_join(root, SUCCESS_MARKER))
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
                        fs.rm(_join(root, name))
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
        run_id = config.output.run_id or submission_id() or _default_run_id()
    run_uri = _join(uri, f"run={run_id}")
    run_root = _join(root, f"run={run_id}")
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
        fs.rm(_join(root, SUCCESS_MARKER))
    record = {
        "run_id": run_id,
        "status": "running",
        "mode": latest["mode"] if resumed else mode,
        "started_at": (latest or {}).get("started_at") if resumed else _now(),
        "attempt_started_at": _now(),
        "ended_at": None,
        "fingerprint": current,
        "config": public_config(config),
        "versions": versions(),
    }
    write_record(fs, root, run_id, record)
    _write_bytes(fs, _join(run_root, CONFIG_FILE), yaml.safe_dump(public_config(config), sort_keys=False).encode())
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
    for path in _named(fs, root, "run="):
        run_id = os.path.basename(path.rstrip("/"))[len("run=") :]
        try:
            record = _read_json(fs, _join(path, RUN_RECORD))
        except (ValueError, OSError):  # not JSON, or not a file: not a record this job wrote
            record = None
        if isinstance(record, dict) and record.get("run_id") == run_id and "fingerprint" in record:
            runs.append(path.rstrip("/"))
    return runs


def foreign_parquet(fs, root: str, runs: list[str]) -> list[str]:
    """The Parquet files under ``root`` outside the job's recorded ``runs`` and its own lists of URIs (``spool``,
    written before the run is opened)."""
    own = tuple(f"{run}/" for run in runs) + (_join(root, SPOOL_FOLDER) + "/",)
    return sorted(p for p in fs.find(root) if p.endswith(".parquet") and not p.startswith(own))


def submission_id() -> str:
    """The Ray job submission id when this process is a job's driver (``ray job submit``, a KubeRay RayJob).

    Ray gives the driver no variable of its own for it: the id is in the job config Ray passes the driver in
    ``RAY_JOB_CONFIG_JSON_ENV_VAR``, under ``metadata.job_submission_id``. Empty when not under a job.
    """
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
        return str((config.get("metadata") or {}).get("job_submission_id") or "")
    except (ValueError, AttributeError):
        return ""


def _default_run_id() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def public_config(config: JobConfig) -> dict[str, dict[str, object]]:
    """The configuration as YAML-ready data, credentials redacted by ``config.redact`` (the one redaction)."""
    return to_dict(config)


def versions() -> dict[str, str]:
    import ray
    import torch
    import torchvision

    from mnasnet_batch import __version__

    return {
        "mnasnet_batch": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": ray.__version__,
        "python": platform.python_version(),
    }


def write_record(fs, root: str, run_id: str, record: dict) -> None:
    """Writes a run's record into its folder and, as the latest run's, at the output root."""
    data = json.dumps(record, indent=2).encode()
    _write_bytes(fs, _join(root, f"run={run_id}", RUN_RECORD), data)
    _write_bytes(fs, _join(root, RUN_RECORD), data)


def write_part(table: pa.Table, run_uri: str, storage: Storage | None = None) -> str:
    """Writes one Parquet part atomically, named by the URIs it holds.

    The name is a hash of the sorted URIs, so a write that is retried (after a worker died) replaces its
    own earlier file instead of adding a copy of its rows.

    Returns:
        The part's path.
    """
    digest = hashlib.sha256("\n".join(sorted(table["uri"].to_pylist())).encode()).hexdigest()[:24]
    fs, root = (storage or Storage()).filesystem(run_uri)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    path = _join(root, f"part-{digest}.parquet")
    _write_bytes(fs, path, buffer.getvalue())
    return path


def finish_run(
    config: JobConfig,
    plan: RunPlan,
    seconds: float,
    labeled_now: int | None = None,
    error: str = "",
    interrupted: bool = False,
) -> Summary:
    """Counts what the run wrote, closes its record, marks the output complete unless it failed, releases the lease.

    A run that failed (``error``) or was stopped (``interrupted``, by a signal) is resumed by the same command.

    Args:
        labeled_now: images this attempt labeled, as the caller counted them; recorded at most as the rows this
            attempt added, and never below 0. None: the rows this attempt added.
        error: why the attempt failed; empty when it succeeded.
        interrupted: a signal stopped the attempt.

    Raises:
        StorageError: the record cannot be written (e.g. a full disk); the message keeps ``error`` and says the
            run stays resumable.
    """
    try:
        fs, root = plan.storage.filesystem(config.output.uri)
        record = _read_json(fs, _join(root, f"run={plan.run_id}", RUN_RECORD)) or {}
        # Other processes wrote the parts: this one's cached listings (s3fs, gcsfs) have not seen them.
        fs.invalidate_cache()
        summary = close_record(
            record, summarize(plan.run_uri, seconds, 0, plan.storage), plan, labeled_now, error, interrupted
        )
        write_record(fs, root, plan.run_id, record)
        if not error:
            _write_bytes(fs, _join(root, SUCCESS_MARKER), plan.run_id.encode())
    except Exception as exc:
        failed = f"run {plan.run_id} failed ({_first_line(error)}) and " if error else ""
        raise StorageError(
            f"{failed}output {config.output.uri} cannot be written: {_one_line(exc)}; run {plan.run_id} stays "
            f"resumable: make the output writable again (e.g. free space) and run the same command"
        ) from None
    finally:
        if plan.lease is not None:
            plan.lease.release()
    return summary


def close_record(
    record: dict, summary: Summary, plan: RunPlan, labeled_now: int | None, error: str, interrupted: bool
) -> Summary:
    """Writes into a run's ``record`` how this attempt ended and what the run holds (``summary``).

    Returns:
        ``summary`` with ``labeled_now``: what the caller counted (``labeled_now``), at most the rows this attempt
        added, never below 0; None counts the rows added.
    """
    added = summary.images - plan.rows_before
    counted = added if labeled_now is None else min(labeled_now, added)
    summary = dataclasses.replace(summary, labeled_now=max(0, counted))
    seconds = summary.seconds
    record.update(
        status="interrupted" if interrupted else "failed" if error else "succeeded",
        error=error or None,
        ended_at=_now(),
        counts={
            "images": summary.images,
            "ok": summary.images - summary.errors,
            "error": summary.errors,
            "error_kinds": summary.error_kinds,
            "labeled_this_attempt": summary.labeled_now,
        },
        seconds=round(seconds, 3),
        images_per_s=round(summary.labeled_now / seconds, 2) if seconds > 0 else None,
    )
    return summary


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


def error_kinds(errors: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    """How many of the (non-null) ``error`` messages are of each kind, the text before the first ':'.

    Counted in Arrow: a million error rows never become a million Python strings.
    """
    messages = errors.drop_null()
    if not len(messages):
        return {}
    kinds = pc.list_element(pc.split_pattern(messages, ":", max_splits=1), 0)
    return {row["values"]: row["counts"] for row in pc.value_counts(kinds).to_pylist()}
