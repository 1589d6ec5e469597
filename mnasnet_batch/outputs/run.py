"""The run lifecycle every output target shares: the lease, the run's plan and record, atomic writes, closing.

A target (``folder.ParquetFolder``, ``table.IcebergTable``; ``targets.target_for`` chooses) subclasses
``OutputTarget`` and adds only what differs. What every target writes at the output root::

    _lease.json                        present while a job writes here: its run, host, pid, token and generation
    _lease.lock                        local disk: locked for the moment of each change of the lease (``lease``)
    _inprogress-<hex>                  a file being written (``write_bytes``); one a killed writer left is removed
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import platform
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from mnasnet_batch.config import JobConfig, to_dict
from mnasnet_batch.inputs import spool
from mnasnet_batch.outputs import files
from mnasnet_batch.outputs.files import first_line, join, now, one_line
from mnasnet_batch.outputs.lease import LEASE_STALE_S, Lease, LeaseLost
from mnasnet_batch.storage import Storage, StorageError

log = logging.getLogger(__name__)

RUN_RECORD = "_run.json"
SUCCESS_MARKER = "_SUCCESS"
CONFIG_FILE = "_config.yaml"


@dataclass(frozen=True)
class Summary:
    """What a run wrote, over all its attempts."""

    images: int
    errors: int
    seconds: float
    error_kinds: dict[str, int] = field(default_factory=dict)
    # Images predicted by this attempt; fewer than ``images`` when it resumed an interrupted run.
    labeled_now: int = 0
    # Of ``images``, rows that other jobs' commits replaced since (a table written by two jobs at once), as of this
    # run's close: jobs still writing may replace more, so the summary says "so far".
    replaced_by_other_jobs: int = 0
    # Images labeled after this attempt's first batch, and the seconds from its first batch to its last
    # (``job.run``): the labeling rate, which ``seconds`` (Ray's and the model's start-up included) is not.
    labeling_images: int = 0
    labeling_s: float = 0.0

    def line(self) -> str:
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(self.error_kinds.items()))
        resumed = f", {self.images - self.labeled_now} from before the resume" if self.labeled_now < self.images else ""
        others = self.replaced_by_other_jobs
        replaced = f", {others} replaced by other jobs so far" if others else ""
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
    # Input URIs that already have a row under the output (this run's, or every run's when incremental): the
    # folder's ``folder.Labeled``, the table's an array of them.
    done: object
    # Rows the run held before this attempt: what this attempt labeled is at most the rest.
    rows_before: int = 0
    # This job's hold on the output while the run is open; finish_run releases it.
    lease: Lease | None = field(default=None, compare=False, repr=False)
    # The job's storage handle, for the run's parts and records.
    storage: Storage = field(default_factory=Storage, compare=False, repr=False)
    # The output target that opened the run, and closes it (``target.finish_run``).
    target: OutputTarget | None = field(default=None, compare=False, repr=False)
    # What an image cost each stage in this attempt and where each ran (``costs.StageCosts.as_record``, completed
    # by ``job.run``), written into the run's record; None: not measured.
    stage_costs: dict[str, object] | None = None


class OutputTarget:
    """Where a job's rows end up, and the run lifecycle every target shares, written once here.

    ``plan_run`` takes the output's lease (``self.lease`` while the run is open), clears what stopped jobs left and
    opens (or resumes) the run before any
    image is read; ``finish_run`` closes it and releases the lease, whatever happens. A target adds only what
    differs: ``open_run`` (its layout, modes and record), ``close_run`` (what the run holds, its record closed), and
    the words of its messages (``describe``, ``cannot_close``).
    """

    lease: Lease | None = None

    def plan_run(
        self, config: JobConfig, weights_id: str, inputs=None, storage: Storage | None = None
    ) -> RunPlan:
        """Opens the run for ``inputs`` (an ``inputs.InputPlan``) through the job's ``storage`` handle (None builds
        one from ``config.storage``): ``RunPlan.done`` are the URIs not to label. The lease is held (refreshed by a
        daemon thread) until ``finish_run``.

        Raises:
            StorageError: another job is writing the output, or the run cannot be opened there (a finished run in
                mode auto, another configuration's runs, a store that cannot be written); the message says what to
                do.
        """
        uri = config.output.uri
        storage = storage or Storage(config.storage)
        lease = None
        try:
            fs, root = storage.filesystem(uri)
            fs.makedirs(root, exist_ok=True)
            lease = Lease.acquire(fs, root, uri, config.output.lease_heartbeat_s)
            lease.hold()  # renewed while the run is planned, however long that takes
            if lease.taken_over:
                # Listed before the run is opened: a part that the previous holder publishes after it is left out
                # by this run's writer (``Fence.parts_at_takeover``).
                lease.parts_at_takeover = frozenset(files.parts_under(fs, root))
            spool.remove_abandoned(fs, root, LEASE_STALE_S)
            plan = self.open_run(config, weights_id, inputs, storage, fs, root)
            lease.hold(plan.run_id)
            self.lease = lease
        except BaseException as exc:
            if lease is not None:
                lease.release()
            if isinstance(exc, StorageError) or not isinstance(exc, Exception):
                raise
            raise StorageError(f"{self.describe(config)} cannot be written: {one_line(exc)}") from None
        if plan.resumed:
            log.info("resuming run %s: %d images already written", plan.run_id, plan.rows_before)
        plan = dataclasses.replace(plan, lease=lease, storage=storage, target=self)
        self.opened(config)
        return plan

    def finish_run(
        self,
        config: JobConfig,
        plan: RunPlan,
        seconds: float,
        labeled_now: int | None = None,
        error: str = "",
        interrupted: bool = False,
    ) -> Summary:
        """Closes the run (``close_run``) and releases the lease; returns what the run holds.

        A run that failed (``error``) or was stopped (``interrupted``, by a signal) is resumed by the same command.

        Args:
            labeled_now: images this attempt labeled, as the caller counted them; recorded at most as the rows this
                attempt added, and never below 0. None: the rows this attempt added.
            error: why the attempt failed; empty when it succeeded.
            interrupted: a signal stopped the attempt.

        Raises:
            StorageError: the run cannot be closed (e.g. a full disk); the message keeps ``error`` and says the
                run stays resumable.
        """
        try:
            if plan.lease is not None:
                plan.lease.check()  # a job that lost its lease writes no record: the run is the taker's now
            summary = self.close_run(config, plan, seconds, labeled_now, error, interrupted)
        except LeaseLost:
            raise
        except Exception as exc:
            failed = f"run {plan.run_id} failed ({first_line(error)}) and " if error else ""
            raise StorageError(f"{failed}{self.cannot_close(config, plan, exc)}") from None
        finally:
            if plan.lease is not None:
                plan.lease.release()
        return summary

    def open_run(self, config: JobConfig, weights_id: str, inputs, storage: Storage, fs, root: str) -> RunPlan:
        """``plan_run`` once the lease is held (no other job writes the output meanwhile): the run opened under
        ``root`` of ``fs``, its record written."""
        raise NotImplementedError

    def opened(self, config: JobConfig) -> None:
        """Called once the run is open and its lease held: what the target starts for the run's duration."""

    def close_run(
        self, config: JobConfig, plan: RunPlan, seconds: float, labeled_now: int | None, error: str, interrupted: bool
    ) -> Summary:
        """``finish_run`` before the lease is released: the run's record closed (``close_record``)."""
        raise NotImplementedError

    def describe(self, config: JobConfig) -> str:
        """The output, as the lifecycle's messages name it."""
        return f"output {config.output.uri}"

    def cannot_close(self, config: JobConfig, plan: RunPlan, exc: Exception) -> str:
        """What a run that cannot be closed (``exc``) says of the output, and what the user does next."""
        raise NotImplementedError


def fingerprint(config: JobConfig, weights_id: str) -> dict[str, object]:
    """The settings that decide the predictions; runs into one output must agree on them."""
    return {
        "input": config.input.uri,
        "model": config.model.name,
        "weights": weights_id,
        "top_k": config.model.top_k,
        "max_pixels": config.preprocess.max_pixels,
        "apply_exif_orientation": config.preprocess.apply_exif_orientation,
        # Only when on: the outputs of runs from before the setting existed (exact, all of them) still match.
        **({"fast_decode": True} if config.preprocess.fast_decode else {}),
    }


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


def default_run_id() -> str:
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


def write_record(fs, root: str, run_id: str, record: dict, lease: Lease | None = None) -> None:
    """Writes a run's record into its folder and, as the latest run's, at the output root; each write only while
    ``lease`` (when given) is still this job's (``Lease.held``, raising ``LeaseLost``)."""
    data = json.dumps(record, indent=2).encode()
    guard = lease.held if lease is not None else None
    files.write_bytes(fs, join(root, f"run={run_id}", RUN_RECORD), data, guard)
    files.write_bytes(fs, join(root, RUN_RECORD), data, guard)


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
        ended_at=now(),
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
    if plan.stage_costs is not None:
        record["stage_costs"] = plan.stage_costs
    return summary


def error_kinds(errors: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    """How many of the (non-null) ``error`` messages are of each kind, the text before the first ':'.

    Counted in Arrow: a million error rows never become a million Python strings.
    """
    messages = errors.drop_null()
    if not len(messages):
        return {}
    kinds = pc.list_element(pc.split_pattern(messages, ":", max_splits=1), 0)
    return {row["values"]: row["counts"] for row in pc.value_counts(kinds).to_pylist()}
