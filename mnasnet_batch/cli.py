"""The labeling job's command line: parse, load config, verify weights and storage, run on Ray."""

from __future__ import annotations

import _thread
import argparse
import contextlib
import dataclasses
import gc
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from fsspec.implementations.local import LocalFileSystem

import mnasnet_batch
from mnasnet_batch.cluster import keep_ray_chatter_out, reach_cluster
from mnasnet_batch.config import MODEL_NAMES, OUTPUT_MODES, ConfigError, JobConfig, load_config, parse_override
from mnasnet_batch.driver_stderr import filter_driver_stderr
from mnasnet_batch.storage import GLOB_CHARACTERS, Storage, StorageError, absolute_location, bucket_of, scheme

if TYPE_CHECKING:
    from mnasnet_batch.costs import StageCosts
    from mnasnet_batch.inputs.layout import InputPlan
    from mnasnet_batch.model.weights import Checkpoint
    from mnasnet_batch.outputs.run import OutputTarget, RunPlan, Summary

log = logging.getLogger(__name__)

# The signals that stop a job: Ctrl-C, and what `ray job stop`, Kubernetes and systemd send.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# torchvision's weights are named like IMAGENET1K_V1 or DEFAULT; anything else is a file.
WEIGHTS_NAME = re.compile(r"[A-Z][A-Z0-9_]*")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnasnet-label",
        description="Label images with torchvision's MnasNet on Ray Data and write top-k predictions to Parquet.",
    )
    parser.add_argument("--input", help="directory, glob, file, or fsspec URI of the images (input.uri)")
    parser.add_argument("--output", help="directory or URI prefix for the Parquet files (output.uri)")
    parser.add_argument("--config", help="YAML profile, e.g. conf/local.yaml; flags and --set override it")
    parser.add_argument("--model", choices=MODEL_NAMES, help="model.name (default mnasnet0_5)")
    parser.add_argument("--weights", help="IMAGENET1K_V1 (default), or a path or URI of a state_dict (model.weights)")
    parser.add_argument("--top-k", type=int, help="classes kept per image (model.top_k, default 5)")
    parser.add_argument(
        "--mode",
        choices=OUTPUT_MODES,
        help="output.mode: auto (default: new run, or resume an unfinished one), incremental, retry-errors, "
        "overwrite; with a table (output.table) also changed, relabel",
    )
    parser.add_argument("--run-id", help="output.run_id (default: the job submission id, else a UTC timestamp)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any configuration value, e.g. --set compute.batch_size=32 (repeatable)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> JobConfig:
    """The job configuration from ``build_parser()``'s arguments: defaults, --config, flags, then --set.

    Raises:
        ConfigError: a bad value, or no input or output.
    """
    flags = {
        "input": {"uri": args.input},
        "output": {"uri": args.output, "mode": args.mode, "run_id": args.run_id},
        "model": {"name": args.model, "weights": args.weights, "top_k": args.top_k},
    }
    flags = {section: {k: v for k, v in values.items() if v is not None} for section, values in flags.items()}
    config = load_config(args.config, [flags, *(parse_override(s) for s in args.set)])
    if not config.input.uri or not config.output.uri:
        raise ConfigError("--input and --output are required (or input.uri and output.uri in --config)")
    # Relative paths are the user's, resolved against the directory the command was run from, once: the driver
    # leaves that directory before joining a cluster (see main), and runs into one output must name one input.
    weights = config.model.weights
    if not WEIGHTS_NAME.fullmatch(weights) and (scheme(weights) != "file" or os.path.exists(weights)):
        weights = absolute_location(weights)
    return dataclasses.replace(
        config,
        input=dataclasses.replace(config.input, uri=absolute_location(config.input.uri)),
        output=dataclasses.replace(config.output, uri=absolute_location(config.output.uri)),
        model=dataclasses.replace(config.model, weights=weights),
    )


def main(argv: list[str] | None = None) -> int:
    """Runs the labeling job; returns the process exit status.

    0: labeled; 1: the run failed (it can be resumed), or another job took the output over (its run now);
    2: bad configuration or inputs, nothing labeled; 130 / 143: stopped by SIGINT / SIGTERM, the run recorded as
    interrupted (it can be resumed). Whatever ends the command once its run is open (Ray's start, the cluster, the
    model, storage) closes the run first (``ended``).
    """
    started = time.monotonic()
    args = build_parser().parse_args(argv)
    configure_logging()
    # Which code ran: under `ray job submit --working-dir` this is the uploaded copy, not an installed one.
    log.info("mnasnet-batch %s from %s", mnasnet_batch.__version__, Path(mnasnet_batch.__file__).parent)
    try:
        config, target, storage, address = checked_command(args)
    except (ConfigError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    attempt = Attempt(started=started)
    try:
        with stop_on_signals():
            try:
                return run_command(config, target, storage, address, attempt)
            except (Stopped, Exception) as exc:
                return ended(config, attempt, exc)
    except Stopped as stop:  # a second signal before stops were held (``close_opened``)
        print(f"stopped by {stop.name}: run the same command again to resume", file=sys.stderr)
        return 128 + stop.signum
    finally:
        if attempt.inputs is not None:
            attempt.inputs.release()


def checked_command(args: argparse.Namespace) -> tuple[JobConfig, OutputTarget, Storage, str]:
    """The settings, output target, storage handle and cluster address of a command, checked before Ray starts
    or the output is touched (importing torch and Ray costs seconds; what a moment tells is told first).

    Raises:
        ConfigError: a bad setting, or a cluster that cannot be reached.
        StorageError: the input, the weights or the output cannot be used.
    """
    config = config_from_args(args)
    from mnasnet_batch.outputs import targets

    target = targets.target_for(config)  # the Parquet folder or a table, decided once
    # The job's one storage handle: the weights, the input and the output (its parts and records) go through it.
    storage = Storage(config.storage)
    check_locations(config, storage)
    address = cluster_address(config)
    if address:
        reach_cluster(address, config.ray.connect_timeout_s, "ray.address" if config.ray.address else "RAY_ADDRESS")
    return config, target, storage, address


@dataclasses.dataclass
class Attempt:
    """What a command has opened, so that whatever ends it closes it (``ended``)."""

    # When the command started (``time.monotonic``): the summary's time is the command's.
    started: float
    # The planned input, whose spooled lists the command removes as it ends.
    inputs: InputPlan | None = None
    # The run, once opened (its lease taken, its record written as running).
    plan: RunPlan | None = None
    # The run's record is closed, or closing it was tried and its failure said: nothing is left to close.
    closed: bool = False
    # This command started the local Ray it runs on (and so shuts it down).
    started_ray: bool = False


def run_command(config: JobConfig, target: OutputTarget, storage: Storage, address: str, attempt: Attempt) -> int:
    """``main`` once the command is checked: the run opened beside Ray's start, then labeled and closed.

    Returns:
        0 once labeled; 2 when the weights or the input cannot be used, no run opened.
    """
    # Every module the driver runs is imported before Ray starts, so none is imported from a working directory
    # that Ray replaces (below).
    from mnasnet_batch import job  # noqa: F401
    from mnasnet_batch.inputs import listing  # noqa: F401
    from mnasnet_batch.outputs import folder, run  # noqa: F401

    joining = bool(address) and not ray_initialized()
    with ThreadPoolExecutor(max_workers=1) as pool:
        prepared = pool.submit(prepare, config, target, storage, attempt)
        if not joining:
            # A local Ray starts in seconds of mostly waiting; importing torch, verifying weights and listing inputs
            # overlap it. It starts in this (the main) thread: its processes are tied to the thread that starts
            # them. Should it fail, leaving this block waits for prepare: a run it opened is then closed (``ended``).
            attempt.started_ray = not ray_initialized()
            start_ray(config)
        from mnasnet_batch.model.weights import WeightsError  # waits for prepare's import of torch

        try:
            checkpoint, inputs, plan, costs = prepared.result()
        except (WeightsError, StorageError) as exc:
            if attempt.plan is not None:  # the run was open: it failed, and is closed as such
                raise
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if joining:
        # Under `ray job submit`, Ray 2.60 unpacks the job's working dir again (rmtree, then extract) when it sets
        # the job's runtime env up on this node, under the driver running in it: from then on the directory this
        # process is in no longer exists, and os.getcwd() fails. Every path is absolute by now and every import
        # done, so the driver leaves for a directory nothing replaces (then joins).
        os.chdir(tempfile.gettempdir())
    attempt.closed = True  # label_remaining closes the run, however labeling ends
    summary = label_remaining(config, checkpoint, inputs, plan, costs, own_ray=attempt.started_ray)
    # Stops are held from here on (``hold_stops``): the run is closed, and a signal now stops nothing.
    if attempt.started_ray:
        import ray

        ray.shutdown()  # within the command's time, which the summary gives
    print(dataclasses.replace(summary, seconds=time.monotonic() - attempt.started).line())
    held = held_stop()
    if held is not None:
        closing = f"{held} arrived while run {plan.run_id} was closing"
        print(f"{closing}; it had succeeded: nothing to resume", file=sys.stderr)
    return 0


def ended(config: JobConfig, attempt: Attempt, exc: BaseException) -> int:
    """How a command that ``exc`` ended exits: the run it opened closed first (``close_opened``), then one line.

    Returns:
        2 for settings that do not fit the cluster; 128 + the signal's number for a stop; else 1.
    """
    cannot = close_opened(config, attempt, exc)
    plan = attempt.plan
    if plan is not None and plan.lease is not None and plan.lease.lost is not None:
        print(f"error: {plan.lease.lost}", file=sys.stderr)  # the run is the other job's now: nothing to resume
        return 1
    if cannot:  # says what failed, why its record cannot be written, and that the same command resumes it
        print(f"error: {cannot}", file=sys.stderr)
    elif isinstance(exc, Stopped):
        where = f"run {plan.run_id} is recorded as interrupted; " if plan is not None else ""
        print(f"stopped by {exc.name}: {where}run the same command again to resume", file=sys.stderr)
    elif isinstance(exc, ConfigError):  # settings that do not fit the cluster, found once it is known
        print(f"error: {exc}", file=sys.stderr)
    else:
        # One line for people; a failed task's traceback is in Ray Data's log (named when labeling started).
        where = f"run {plan.run_id} failed, run the same command again to resume: " if plan is not None else ""
        print(f"error: {where}{root_cause(exc)}", file=sys.stderr)
        log.debug("the job failed", exc_info=exc)
    if isinstance(exc, Stopped):
        return 128 + exc.signum
    return 2 if isinstance(exc, ConfigError) else 1


def close_opened(config: JobConfig, attempt: Attempt, exc: BaseException) -> str:
    """Closes the run ``attempt`` opened, where it is still open, as failed with ``exc`` (interrupted, for a stop),
    releasing its lease: a failure between the run's opening and its labeling (Ray's start, the model's costs)
    leaves no run recorded as running.

    Returns:
        Why the run's record cannot be written (the message keeps ``exc`` and says the run stays resumable); "" once
        closed, or when no run is open.
    """
    if attempt.plan is None or attempt.closed:
        return ""
    attempt.closed = True
    hold_stops()  # the run is recorded as what stopped it, whatever arrives meanwhile
    try:
        attempt.plan.target.finish_run(
            config,
            attempt.plan,
            time.monotonic() - attempt.started,
            error=root_cause(exc),
            interrupted=isinstance(exc, Stopped),
        )
    except StorageError as failed:
        return str(failed)
    return ""


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived: the job stops where it is, recording its run as interrupted."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.name = signal.Signals(signum).name


class _Stops:
    """What ``stop_on_signals``' handler does: raise ``Stopped``, or, once ``hold_stops`` was called, note it."""

    holding = False
    held: str | None = None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turns SIGINT and SIGTERM into ``Stopped`` in the main thread while the body runs (see ``hold_stops``).

    ``ray.init`` sets its own SIGTERM handler (``sys.exit``), so ``start_ray`` sets this one again after it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    _Stops.holding, _Stops.held = False, None
    install_stop_handlers()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def hold_stops() -> None:
    """From now until ``stop_on_signals`` ends, a stop signal is noted (``held_stop``), not raised: the run's
    record is being closed, and a record half written, or a run closed as succeeded and then reported as
    interrupted, would be untrue. Closing is bounded; SIGKILL still stops the job at once."""
    _Stops.holding = True


def held_stop() -> str | None:
    """The name of the first stop signal that arrived while stops were held, if any."""
    return _Stops.held


def install_stop_handlers() -> None:
    def stop(signum: int, frame: object) -> None:
        if not _Stops.holding:
            raise Stopped(signum)
        if _Stops.held is None:
            _Stops.held = signal.Signals(signum).name
            print(f"{_Stops.held}: closing the run's record first; SIGKILL stops at once", file=sys.stderr)

    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, stop)


def root_cause(exc: BaseException) -> str:
    """``Type: message`` of the exception that started a chain (a Ray task error's own cause included)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        # Ray Data re-raises a task's OSError with its retry report as the file name.
        message = [f"[Errno {exc.errno}] {exc.strerror}"]
    else:
        message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0] if message else ''}".rstrip(": ")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is logged (tests and tools swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging() -> None:
    """INFO lines of this package's loggers on stderr; the root logger, and so every other library's, is left
    as it is (configuring it would pull their INFO lines into the job's log)."""
    package = logging.getLogger("mnasnet_batch")
    if not any(isinstance(h, _StderrHandler) for h in package.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package.addHandler(handler)
    package.setLevel(logging.INFO)


def entrypoint() -> None:
    """``main`` as a command: exits with its status."""
    status = main()
    # Exiting, the interpreter collects garbage over every object torch and Ray created, which takes a noticeable
    # part of a short job's wall time. Freezing them skips that; atexit handlers (Ray's shutdown) run.
    gc.freeze()
    sys.exit(status)


def check_locations(config: JobConfig, storage: Storage) -> None:
    """Checks that the input, and a weights file, exist (one request each), and that a local output folder can be
    written, before anything slower starts.

    Raises:
        StorageError: one of them does not exist, its storage cannot be reached, or the output cannot be written.
    """
    weights = config.model.weights
    locations = [("input", config.input.uri)] + ([] if WEIGHTS_NAME.fullmatch(weights) else [("weights", weights)])
    for what, uri in locations:
        try:
            fs, path = storage.filesystem(uri)
            found = fs.lexists(path)
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(f"{what} {uri} cannot be reached: {root_cause(exc)}") from None
        if not found and not (what == "input" and any(c in path for c in GLOB_CHARACTERS)):  # matched later
            raise StorageError(f"{what} {uri} does not exist")
    check_bucket(config, storage)
    fs, path = storage.filesystem(config.output.uri)
    if isinstance(fs, LocalFileSystem):  # an object store's prefix is writable only as far as a write says
        folder = path
        while not os.path.lexists(folder) and os.path.dirname(folder) != folder:
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
            problem = "is not a folder" if not os.path.isdir(folder) else "is a folder this user cannot write to"
            raise StorageError(f"output {config.output.uri} cannot be written: {folder} {problem}")


def check_bucket(config: JobConfig, storage: Storage) -> None:
    """Stops a job whose output bucket or container does not exist, unless ``output.create_bucket`` lets the job
    create it: writing under a missing bucket creates it (s3fs' ``makedirs``), in whatever account the credentials
    reach. A store that will not say (no permission to look) is left to the first write.

    Raises:
        StorageError: the bucket does not exist, or creating it failed.
    """
    uri = config.output.uri
    bucket = bucket_of(uri)
    if not bucket:
        return
    fs, _ = storage.filesystem(uri)
    try:
        fs.info(bucket)
        return
    except FileNotFoundError:
        pass
    except Exception as exc:
        log.debug("output %s: cannot tell whether %s exists (%s); the first write will", uri, bucket, root_cause(exc))
        return
    if not config.output.create_bucket:
        raise StorageError(
            f"output {uri}: bucket {bucket} does not exist; check its name, create it, "
            "or set output.create_bucket=true to let the job create it"
        )
    try:
        fs.mkdir(bucket)
    except Exception as exc:
        raise StorageError(f"output {uri}: bucket {bucket} cannot be created: {root_cause(exc)}") from None
    log.info("created bucket %s for output %s (output.create_bucket)", bucket, uri)


def prepare(
    config: JobConfig,
    target: OutputTarget | None = None,
    storage: Storage | None = None,
    attempt: Attempt | None = None,
) -> tuple[Checkpoint, InputPlan, RunPlan, StageCosts | None]:
    """Verifies the weights, plans the input and opens the run: everything that can fail before any image is read;
    then measures what an image of the input costs each stage (``costs.job_costs``).

    ``target``: the output target (``targets.target_for``), chosen from ``config`` when None. ``storage``: the job's
    storage handle, built from ``config.storage`` when None. ``attempt``: given the input plan and the run as soon as
    the run is open, so that what fails after (here, or beside this) closes it.

    Raises:
        WeightsError: the weights cannot be found, read, verified or fitted.
        StorageError: the input or the output cannot be used.
        ConfigError: the configured engine is not installed.
    """
    from mnasnet_batch.costs import job_costs
    from mnasnet_batch.outputs import targets

    target = target or targets.target_for(config)
    storage = storage or Storage(config.storage)
    checkpoint, inputs = prepare_input(config, storage, spool=True)
    try:
        plan = target.plan_run(config, checkpoint.weights_id, inputs, storage)
    except BaseException:
        inputs.release()
        raise
    if attempt is not None:
        attempt.inputs, attempt.plan = inputs, plan
    costs = job_costs(config, checkpoint, inputs)
    if costs is not None:
        plan = dataclasses.replace(plan, stage_costs=costs.as_record())
    return checkpoint, inputs, plan, costs


def prepare_input(config: JobConfig, storage: Storage, spool: bool = False) -> tuple[Checkpoint, InputPlan]:
    """Verifies the weights and plans the input (``prepare`` without opening the run).

    ``spool``: a list of image URIs too long for the driver's memory is written under the output (removed by
    ``InputPlan.release``); otherwise every list is held.

    Raises:
        WeightsError: the weights cannot be found, read, verified or fitted.
        StorageError: the input cannot be used.
        ConfigError: the configured engine is not installed.
    """
    from mnasnet_batch.config import require_installed
    from mnasnet_batch.inputs.listing import plan_input
    from mnasnet_batch.inputs.spool import spool_folder

    require_installed(config.compute.engine)
    folder = spool_folder(config.output.uri) if spool else ""
    # The input is listed while torch loads and the weights are verified: a listing of millions of objects is mostly
    # waiting. A weights error still comes first, once the listing ended (its written lists removed).
    with ThreadPoolExecutor(max_workers=1) as pool:
        planned = pool.submit(plan_input, config.input, storage, folder)
        try:
            # predictor is the model actors' module, which the pipeline hands to Ray: imported here (off the main
            # thread, beside Ray's start) so that the driver imports nothing once Ray may replace its working
            # directory (see main).
            from mnasnet_batch.model import predictor  # noqa: F401
            from mnasnet_batch.model.engine import export_ahead
            from mnasnet_batch.model.weights import resolve_checkpoint

            checkpoint = resolve_checkpoint(
                config.model.name, config.model.weights, config.model.sha256, config.model.download, storage
            )
            export_ahead(config.compute, checkpoint)
        except BaseException:
            with contextlib.suppress(Exception):
                planned.result().release()
            raise
        return checkpoint, planned.result()


def ray_initialized() -> bool:
    import ray

    return ray.is_initialized()


def cluster_address(config: JobConfig) -> str:
    """The cluster to join: ``ray.address``, else ``RAY_ADDRESS`` (as ``ray job submit`` sets it); empty: none."""
    return config.ray.address or os.environ.get("RAY_ADDRESS", "")


# Ray 2.60's notice, on starting a local Ray where ~/.ray/auth_token exists, that it turned token authentication on.
RAY_TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"


@contextlib.contextmanager
def without_token_notice():
    """Leaves Ray's notice that it turned token authentication on out of the log while the job starts its own
    local Ray: the job keeps Ray's default (token authentication, with the user's token), and the Ray is the job's
    alone, ending with it. Setting ``RAY_AUTH_MODE`` instead would need it set before Ray reads its configuration."""
    notices = logging.getLogger("ray._private.authentication.authentication_token_setup")

    def not_the_notice(record: logging.LogRecord) -> bool:
        return RAY_TOKEN_NOTICE not in record.getMessage()

    notices.addFilter(not_the_notice)
    try:
        yield
    finally:
        notices.removeFilter(not_the_notice)


def start_ray(config: JobConfig) -> None:
    """Joins the configured cluster (``ray.address``, else ``RAY_ADDRESS``) or starts a local Ray in-process."""
    import ray

    if not ray.is_initialized():
        address = cluster_address(config)
        # A local Ray started here needs no dashboard; one we connect to keeps its own settings.
        # Ray's own INFO lines ("Started a local Ray instance") are not the job's; its warnings and errors are.
        options = {"logging_level": logging.WARNING}
        if not sys.stderr.isatty():
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no colour codes in workers' lines written to files
        # Set on a node (containers often do, for `kubectl logs`), it would send the driver's C++ core worker's
        # every line (liveness notices, lease retries) into the job's log; the driver's own file is in the Ray
        # session's logs folder. Read by ray.init only: the cluster's processes keep their own environment.
        os.environ.pop("RAY_LOG_TO_STDERR", None)
        if address:
            ray.init(address=address, **options)
        else:
            from mnasnet_batch.watchdog import watch_local_ray

            watch_local_ray()  # this Ray ends with this process, however it ends
            with without_token_notice():
                ray.init(include_dashboard=False, **options)
        keep_ray_chatter_out()
        # After ray.init: Ray's local processes keep the real stderr; only this process writes into the filter.
        filter_driver_stderr()
        install_stop_handlers()


def label_remaining(
    config: JobConfig,
    checkpoint: Checkpoint,
    inputs: InputPlan,
    plan: RunPlan,
    costs: StageCosts | None = None,
    own_ray: bool = False,
) -> Summary:
    """Labels what of ``inputs`` ``plan``'s run still lacks (``InputPlan.remaining``) on Ray and closes the run's
    record.

    When the labeling fails or is stopped and ``own_ray`` (this command started the local Ray), Ray is shut down
    before the record counts the rows: write tasks still running would otherwise publish parts after it.

    Returns:
        What the run holds, over all its attempts.
    """
    from mnasnet_batch.outputs.folder import ParquetFolder

    target = plan.target or ParquetFolder()
    if plan.lease is not None:
        # Another job took the output: the labeling stops at once (within a heartbeat), and the command ends with
        # the line that names that job (``ended``).
        plan.lease.on_lost(lambda line: _thread.interrupt_main(signal.SIGTERM))
    start = time.monotonic()
    labeling_images, labeling_s = 0, 0.0
    try:
        todo = inputs.remaining(plan.done)
        log.info(
            "weights %s verified (%s); %s (%s) under %s, %s to label in run %s",
            checkpoint.source,
            checkpoint.weights_id,
            inputs.describe(),
            inputs.layout.name,
            config.input.uri,
            todo.describe(),
            plan.run_id,
        )
        if len(todo.uris):
            from mnasnet_batch import job

            start_ray(config)
            fence = plan.lease.fence(plan.storage) if plan.lease is not None else None
            labeling = job.run(config, plan.storage, checkpoint, todo, plan.run_uri, costs, fence)
            labeling_images, labeling_s = labeling.images, labeling.seconds
            plan = dataclasses.replace(plan, stage_costs={**(plan.stage_costs or {}), **labeling.stages})
    except BaseException as exc:
        hold_stops()  # the run is recorded as what stopped it, whatever arrives meanwhile
        if own_ray:
            import ray

            ray.shutdown()
        target.finish_run(
            config, plan, time.monotonic() - start, error=root_cause(exc), interrupted=isinstance(exc, Stopped)
        )
        raise
    hold_stops()  # labeled: the run closes as succeeded, and says so
    summary = target.finish_run(config, plan, time.monotonic() - start)
    return dataclasses.replace(summary, labeling_images=labeling_images, labeling_s=labeling_s)
