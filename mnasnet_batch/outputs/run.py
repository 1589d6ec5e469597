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
from collections.abc import Mapping
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


# -- which run a job opens: one decision for every target -----------------------------------------------------------


@dataclass(frozen=True)
class PriorRun:
    """The output's latest run, as its record says."""

    run_id: str
    mode: str
    # What decides its labels: the folder's ``fingerprint``, the table's label settings.
    settings: Mapping[str, object]
    started_at: str | None = None
    # It ended complete: the folder's ``_SUCCESS`` marker, the table's record saying succeeded.
    finished: bool = False

    @classmethod
    def from_record(cls, record: dict | None, settings_key: str, finished: bool) -> PriorRun | None:
        """The run a ``record`` (a ``_run.json``; None: no run) describes, its settings under ``settings_key``."""
        if record is None:
            return None
        return cls(
            run_id=record["run_id"],
            mode=record.get("mode") or "auto",
            settings=record.get(settings_key) or {},
            started_at=record.get("started_at"),
            finished=finished,
        )


@dataclass(frozen=True)
class Holdings:
    """What an output holds, as far as ``decide_run`` needs it: read by the target, no decision taken."""

    # The output as messages name it: "output s3://b/labels", "table labels.photos".
    name: str
    latest: PriorRun | None = None
    # The settings of the labels the output holds, which a run adding to them must share; None: no labels.
    settings: Mapping[str, object] | None = None
    # Where ``settings`` come from, as messages name it: "run night", "the table's labels".
    settings_of: str = ""
    # Its current rows (the table's); None: not counted (the folder, where its latest run is what counts).
    rows: int | None = None
    # Run ids in use (run folders, committed rows): a new run takes none of them.
    taken: frozenset[str] = frozenset()
    # The runs this job recorded there, listed only when ``lists_everything`` (the folder's overwrite removes them).
    runs: tuple[str, ...] = ()
    # Parquet files there that no run of this job wrote, e.g. a user's dataset; listed as ``runs`` are.
    foreign: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResumeRules:
    """The choices in which targets differ when they open a run; everything else ``decide_run`` does the same."""

    # The modes the target offers, in the order its messages name them.
    modes: tuple[str, ...]
    # Modes whose new run adds to the labels held, and so must share their settings (``Holdings.settings``).
    same_settings: frozenset[str]
    # An unfinished run resumes whatever this command's mode, in its own (the folder: every mode skips what the
    # run wrote), or only in its own (the table: its modes label different images).
    resumes_in_any_mode: bool
    # --mode overwrite removes every run of this job and starts over (the folder, whose runs are its rows), or
    # discards only an unfinished run of another mode (the table, whose overwrite replaces rows at its last commit).
    overwrite_removes_runs: bool


@dataclass(frozen=True)
class RunDecision:
    """Which run a job opens and what it does first: ``decide_run``'s answer, which the target carries out."""

    run_id: str
    resumed: bool
    # The run's mode as its record keeps it: a resumed run's own, else this command's.
    mode: str
    # When the run first started: a resumed run's start; None: now.
    started_at: str | None
    # Runs whose rows are removed before this one opens (overwrite): every run of the folder, the table's
    # unfinished run's staged rows.
    discard: tuple[str, ...]
    # Of the listed images, those the run labels besides the rows it holds: "all"; "new": those without a row in
    # the output; "errors": those whose row is an error; "changed": those whose source changed since its row.
    labels: str


# What each mode labels (``RunDecision.labels``); the rest label every listed image.
MODE_LABELS = {"incremental": "new", "retry-errors": "errors", "changed": "changed"}
# Modes that pick images by their rows, so need one row per listed URI: not shards or files read whole.
PER_IMAGE_MODES = ("retry-errors", "changed")
# What each mode does, as a refusal names the modes a user can choose.
MODE_WORDS = {
    "incremental": "incremental to label only new images",
    "changed": "changed to label images that changed",
    "retry-errors": "retry-errors to label error rows again",
    "relabel": "relabel to label every image again in place",
    "overwrite": "overwrite to start over",
}


def lists_everything(latest: PriorRun | None, mode: str) -> bool:
    """Whether opening a run needs every file the output holds listed (``Holdings.runs``, ``Holdings.foreign``):
    an output no run of this job wrote yet, or an overwrite, which removes runs and must not remove a user's data.
    """
    return latest is None or mode == "overwrite"


def check_input_fits(mode: str, whole: str) -> None:
    """Refuses a mode that picks images by their rows (``PER_IMAGE_MODES``) for an input read ``whole`` (what it
    reads whole, e.g. "tar shards"; empty when every input URI is one image).

    Raises:
        StorageError: the mode cannot pick this input's images; the message names the modes that can.
    """
    if whole and mode in PER_IMAGE_MODES:
        raise StorageError(
            f"--mode {mode} needs an input whose every URI is one image (loose files or a manifest); "
            f"{whole} are read whole: use --mode incremental or relabel"
        )


def decide_run(
    holds: Holdings, mode: str, settings: Mapping[str, object], new_run_id: str, rules: ResumeRules, whole: str = ""
) -> RunDecision:
    """Which run a job in ``mode`` with ``settings`` opens in an output holding ``holds``: the latest run resumed,
    or a new one named ``new_run_id``; what goes first, and what the run labels.

    Args:
        whole: what the input reads whole (e.g. "tar shards"), whose rows a mode cannot pick one by one; empty
            when every input URI is one image.

    Raises:
        StorageError: the output cannot take this run (a user's files, another configuration's labels, a finished
            run in mode auto, an unfinished run of another mode, a run id in use); the message says what to do.
    """
    if holds.foreign:
        _refuse_foreign(holds, mode)
    check_input_fits(mode, whole)
    latest, discard = _overwritten(holds, mode, rules)
    if latest is not None and not latest.finished:
        _check_resumable(holds, latest, mode, settings, rules)
        return RunDecision(
            run_id=latest.run_id,
            resumed=True,
            mode=latest.mode,
            started_at=latest.started_at,
            discard=discard,
            # A run labels as its own mode does; one that labels every image skips every row under incremental.
            labels=MODE_LABELS.get(latest.mode) or ("new" if mode == "incremental" else "all"),
        )
    if mode in rules.same_settings and holds.settings and dict(holds.settings) != dict(settings):
        raise StorageError(_other_settings(holds, holds.settings, settings, rules))
    if mode == "auto":
        _refuse_labeled(holds, latest, rules)
    # Removed runs free their ids; a table's discarded run keeps its id (its record, and rows it committed).
    freed = set(discard) if rules.overwrite_removes_runs else set()
    if new_run_id in holds.taken - freed:
        raise StorageError(f"{holds.name} already has a run {new_run_id}; pass another --run-id")
    return RunDecision(
        run_id=new_run_id,
        resumed=False,
        mode=mode,
        started_at=None,
        discard=discard,
        labels=MODE_LABELS.get(mode, "all"),
    )


def _overwritten(holds: Holdings, mode: str, rules: ResumeRules) -> tuple[PriorRun | None, tuple[str, ...]]:
    """The latest run left once ``mode`` discarded what it discards, and the runs discarded."""
    latest = holds.latest
    if mode != "overwrite" or latest is None:
        return latest, ()
    if rules.overwrite_removes_runs:
        return None, holds.runs
    if not latest.finished and latest.mode != "overwrite":
        return None, (latest.run_id,)
    return latest, ()


def _refuse_labeled(holds: Holdings, latest: PriorRun | None, rules: ResumeRules) -> None:
    """Refuses a new run in mode auto where the output holds labels: a finished run (``latest``), or rows."""
    if (latest is None) if holds.rows is None else holds.rows == 0:
        return
    held = f"the finished run {latest.run_id}" if holds.rows is None else f"{holds.rows} labels"
    choices = ", ".join(MODE_WORDS[m] for m in rules.modes if m in MODE_WORDS)
    raise StorageError(f"{holds.name} already holds {held}; use --mode {choices}")


def _refuse_foreign(holds: Holdings, mode: str) -> None:
    removes = "; --mode overwrite removes only this job's runs" if mode == "overwrite" else ""
    raise StorageError(
        f"{holds.name} holds Parquet files that no run of this job wrote ({len(holds.foreign)}, e.g. "
        f"{holds.foreign[0]}){removes}; choose a new --output"
    )


def _check_resumable(
    holds: Holdings, latest: PriorRun, mode: str, settings: Mapping[str, object], rules: ResumeRules
) -> None:
    """Refuses to resume ``latest`` with other settings, or, where runs resume only in their own mode, another."""
    other_mode = not rules.resumes_in_any_mode and latest.mode != mode
    if dict(latest.settings) == dict(settings) and not other_mode:
        return
    differing = _differing(latest.settings, settings, f"run {latest.run_id}")
    raise StorageError(
        f"{holds.name} holds the unfinished run {latest.run_id} (--mode {latest.mode}"
        f"{f' here {mode}' if other_mode else ''}{'; ' + differing if differing else ''}); run its command again "
        f"to finish it, or use --mode overwrite"
    )


def _other_settings(
    holds: Holdings, held: Mapping[str, object], settings: Mapping[str, object], rules: ResumeRules
) -> str:
    keys = _differing_keys(held, settings)
    remedy = (
        "use --mode relabel to label every image again with these, or the held settings"
        if "relabel" in rules.modes
        else "use the same settings, a new --output, or --mode overwrite"
    )
    return (
        f"{holds.name} holds {holds.settings_of} of a different configuration ({', '.join(keys)} differ): "
        f"{_differing(held, settings, holds.settings_of)}; {remedy}"
    )


def _differing(held: Mapping[str, object], settings: Mapping[str, object], source: str) -> str:
    """The settings that differ, each as ``key: value (this run) vs value (source)``."""
    return ", ".join(
        f"{k}: {settings[k]} (this run) vs {held.get(k, '(not recorded)')} ({source})"
        for k in _differing_keys(held, settings)
    )


def _differing_keys(held: Mapping[str, object], settings: Mapping[str, object]) -> list[str]:
    return sorted(k for k in settings if held.get(k, "(not recorded)") != settings[k])


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
