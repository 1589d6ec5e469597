"""The output location: runs, their records, atomic Parquet parts, and what is already labeled.

Layout under the output root (readers such as ``pyarrow.dataset``, pandas and DuckDB skip names
starting with ``_``)::

    run=<run_id>/part-<hash>.parquet   rows of one run; a part appears whole or not at all
    run=<run_id>/_run.json             that run's record: status, counts, config, versions
    run=<run_id>/_config.yaml          its resolved configuration, secrets removed
    _run.json                          the record of the latest run
    _SUCCESS                           present only while the latest run is complete
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import io
import json
import logging
import os
import platform
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import yaml
from fsspec.implementations.local import LocalFileSystem

from mnasnet_batch.config import JobConfig, StorageConfig, to_dict
from mnasnet_batch.storage import StorageError, filesystem

log = logging.getLogger(__name__)

RUN_RECORD = "_run.json"
SUCCESS_MARKER = "_SUCCESS"
CONFIG_FILE = "_config.yaml"
TEMP_PREFIX = "_inprogress-"


@dataclass(frozen=True)
class Summary:
    """What a run wrote, over all its attempts."""

    images: int
    errors: int
    seconds: float
    error_kinds: dict[str, int] = field(default_factory=dict)
    # Images predicted by this attempt; fewer than ``images`` when it resumed an interrupted run.
    labeled_now: int = 0

    def line(self) -> str:
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(self.error_kinds.items()))
        rate = self.labeled_now / self.seconds if self.seconds > 0 else 0.0
        resumed = f", {self.images - self.labeled_now} from before the resume" if self.labeled_now < self.images else ""
        return (
            f"labeled {self.images} images ({self.errors} errors{': ' + kinds if kinds else ''}{resumed}) "
            f"in {self.seconds:.1f} s, {rate:.1f} images/s"
        )


@dataclass(frozen=True)
class RunPlan:
    """Where a run writes and what it can skip."""

    run_id: str
    run_uri: str
    resumed: bool
    # Input URIs that already have a row under the output (this run's, or every run's when incremental).
    done: pa.Array


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


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


def _write_bytes(fs, path: str, data: bytes) -> None:
    """Writes a whole file so that readers see the old content or the new, never a part."""
    if isinstance(fs, LocalFileSystem):
        temp = _join(os.path.dirname(path), f"{TEMP_PREFIX}{uuid.uuid4().hex}")
        fs.pipe_file(temp, data)
        os.replace(temp, path)
    else:
        # Object stores publish an object only once its upload is complete.
        fs.pipe_file(path, data)


def _parts(fs, root: str) -> pads.Dataset | None:
    """The published Parquet parts under ``root`` (recursively) as one dataset; None when there are none."""
    files = sorted(p for p in fs.find(root) if os.path.basename(p).startswith("part-") and p.endswith(".parquet"))
    return pads.dataset(files, filesystem=fs, format="parquet") if files else None


def labeled_uris(fs, root: str) -> pa.Array:
    """The ``uri`` of every row in the Parquet parts under ``root``."""
    parts = _parts(fs, root)
    if parts is None:
        return pa.array([], pa.string())
    return parts.to_table(columns=["uri"])["uri"].combine_chunks()


def plan_run(config: JobConfig, weights_id: str) -> RunPlan:
    """Decides the run from ``output.mode`` and what the output holds, and opens its record.

    Raises:
        StorageError: the output holds a finished run (mode auto), or runs of another configuration, or
            cannot be written; the message names the flag to use.
    """
    uri, mode = config.output.uri, config.output.mode
    current = fingerprint(config, weights_id)
    try:
        fs, root = filesystem(uri, config.storage)
        if mode == "overwrite" and fs.exists(root):
            # Only what this job writes: anything else a user keeps there stays.
            for name in fs.ls(root, detail=False):
                if os.path.basename(name.rstrip("/")).startswith(("run=", RUN_RECORD, SUCCESS_MARKER)):
                    fs.rm(name, recursive=True)
        latest = _read_json(fs, _join(root, RUN_RECORD))
        finished = fs.exists(_join(root, SUCCESS_MARKER))
        if latest is None and fs.exists(root) and any(p.endswith(".parquet") for p in fs.find(root)):
            raise StorageError(f"output {uri} holds Parquet files that no run of this job wrote; choose a new --output")
        if latest is not None and latest.get("fingerprint") != current:
            differing = sorted(k for k in current if latest.get("fingerprint", {}).get(k) != current[k])
            raise StorageError(
                f"output {uri} holds run {latest['run_id']} of a different configuration "
                f"({', '.join(differing)} differ); use the same settings, a new --output, or --mode overwrite"
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
        for stale in fs.glob(_join(run_root, f"{TEMP_PREFIX}*")):
            fs.rm(stale)  # left by a writer that was killed; its rows were never visible
        # Incremental runs skip what any run labeled; others only what this run wrote before it was stopped.
        incremental = mode == "incremental" or (resumed and latest.get("mode") == "incremental")
        done = labeled_uris(fs, root if incremental else run_root)
        if fs.exists(_join(root, SUCCESS_MARKER)):
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
    except StorageError:
        raise
    except Exception as exc:
        raise StorageError(f"output {uri} cannot be written: {type(exc).__name__}: {exc}") from None
    if resumed:
        log.info("resuming run %s: %d images already written", run_id, len(done))
    return RunPlan(run_id=run_id, run_uri=run_uri, resumed=resumed, done=done)


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
    """The configuration as YAML-ready data with anything secret-looking replaced by ``***``."""
    secret_words = ("secret", "password", "token", "credential", "key_id", "access_key", "session")

    def redact(value: object, key: str = "") -> object:
        if isinstance(value, dict):
            return {k: redact(v, k) for k, v in value.items()}
        if value and any(word in key.lower() for word in secret_words):
            return "***"
        return value

    return redact(to_dict(config))


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


def write_part(table: pa.Table, run_uri: str, storage_config: StorageConfig | None = None) -> str:
    """Writes one Parquet part atomically, named by the URIs it holds.

    The name is a hash of the sorted URIs, so a write that is retried (after a worker died) replaces its
    own earlier file instead of adding a copy of its rows.

    Returns:
        The part's path.
    """
    digest = hashlib.sha256("\n".join(sorted(table["uri"].to_pylist())).encode()).hexdigest()[:24]
    fs, root = filesystem(run_uri, storage_config or StorageConfig())
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    path = _join(root, f"part-{digest}.parquet")
    _write_bytes(fs, path, buffer.getvalue())
    return path


def finish_run(
    config: JobConfig, plan: RunPlan, seconds: float, labeled_now: int, error: str = "", interrupted: bool = False
) -> Summary:
    """Counts what the run wrote, closes its record, and marks the output complete unless it failed.

    A run that failed (``error``) or was stopped (``interrupted``, by a signal) is resumed by the same command.
    """
    fs, root = filesystem(config.output.uri, config.storage)
    record = _read_json(fs, _join(root, f"run={plan.run_id}", RUN_RECORD)) or {}
    summary = summarize(plan.run_uri, seconds, labeled_now, config.storage)
    record.update(
        status="interrupted" if interrupted else "failed" if error else "succeeded",
        error=error or None,
        ended_at=_now(),
        counts={
            "images": summary.images,
            "ok": summary.images - summary.errors,
            "error": summary.errors,
            "error_kinds": summary.error_kinds,
            "labeled_this_attempt": labeled_now,
        },
        seconds=round(seconds, 3),
        images_per_s=round(labeled_now / seconds, 2) if seconds > 0 else None,
    )
    write_record(fs, root, plan.run_id, record)
    if not error:
        _write_bytes(fs, _join(root, SUCCESS_MARKER), plan.run_id.encode())
    return summary


def summarize(run_uri: str, seconds: float, labeled_now: int, storage_config: StorageConfig | None = None) -> Summary:
    """Counts rows and error kinds in the Parquet parts under ``run_uri``."""
    fs, root = filesystem(run_uri, storage_config or StorageConfig())
    dataset = _parts(fs, root)
    if dataset is None:
        return Summary(images=0, errors=0, seconds=seconds, labeled_now=labeled_now)
    errors = dataset.to_table(columns=["error"])["error"].drop_null().to_pylist()
    kinds = collections.Counter(message.split(":", 1)[0] for message in errors)
    return Summary(
        images=dataset.count_rows(),
        errors=len(errors),
        seconds=seconds,
        error_kinds=dict(kinds),
        labeled_now=labeled_now,
    )


def remaining(uris: list[str], done: pa.Array) -> list[str]:
    """The URIs that have no row yet, in their original order."""
    if len(done) == 0:
        return uris
    candidates = pa.array(uris, pa.string())
    return candidates.filter(pc.invert(pc.is_in(candidates, value_set=done))).to_pylist()
