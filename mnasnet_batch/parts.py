"""Parts of the run's rows: the driver cuts the graph's labeled blocks into parts by rows and by time, and one
actor on the driver's node writes them (``write``)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data.block import Block, BlockAccessor
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from mnasnet_batch.config import JobConfig
from mnasnet_batch.outputs import files
from mnasnet_batch.outputs.folder import write_part
from mnasnet_batch.outputs.lease import Fence
from mnasnet_batch.storage import Storage

log = logging.getLogger(__name__)

# The part writer's CPUs: writing a part (serialising and uploading a few MB) is light, and any CPU it reserved
# would have to wait for Ray Data, which keeps every CPU busy, to give one back.
WRITE_CPUS = 0
# Parts the writer writes at once: an upload to an object store is mostly waiting, so a few overlap.
WRITE_THREADS = 4
# Restarts of a writer that died, and retries of each write on it: Ray's own default for tasks.
WRITE_RETRIES = 3
# Seconds a stopped or failed run waits for its last parts to be written: they are a few MB each, and the record
# must still be closed within Kubernetes' default grace period of 30 s.
STOP_WRITE_WAIT_S = 20.0
# A taken-over run's writer re-reads the run's parts before each part: one part at a time (the writer's threads).
_REREADING = threading.Lock()


class PartWriter:
    """The run's part writer, one actor for the run: it starts, and imports what writing needs, once, beside the model
    actors. A Ray task per part started a new worker process for almost every part while decode tasks held the
    others, and the parts came long after their rows."""

    def __init__(self, run_uri: str, storage: Storage, fence: Fence | None = None):
        self.run_uri = run_uri
        self.storage = storage
        self.fence = fence
        # A run taken over from a job that stopped renewing: the parts seen so far, and the URIs of those this
        # writer did not write (the previous holder's last), which it leaves out.
        self._seen = set(fence.parts_at_takeover) if fence is not None and fence.parts_at_takeover is not None else None
        self._others: set[str] = set()

    def write(self, *blocks: Block) -> str | None:
        """The rows of ``blocks`` as one atomic Parquet part of the run (``outputs.folder.write_part``).

        Returns:
            The part's path; None when the blocks hold no rows.
        """
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return None
        if self._seen is None:
            return write_part(pa.concat_tables(tables), self.run_uri, self.storage, self.fence)
        with _REREADING:
            rows = self._not_written_by_others(pa.concat_tables(tables))
            if not rows.num_rows:
                return None
            path = write_part(rows, self.run_uri, self.storage, self.fence)
            self._seen.add(path)
            return path

    def _not_written_by_others(self, rows: pa.Table) -> pa.Table:
        """``rows`` but those whose URIs a part this writer did not write holds (read again before each part)."""
        fs, root = self.storage.filesystem(self.run_uri)
        fs.invalidate_cache()
        for part in files.parts_under(fs, root):
            if part not in self._seen:
                self._seen.add(part)
                with fs.open(part, "rb") as f:
                    self._others.update(pq.read_table(f, columns=["uri"])["uri"].to_pylist())
        if not self._others:
            return rows
        return rows.filter(pc.invert(pc.is_in(rows["uri"], value_set=pa.array(sorted(self._others), pa.string()))))


class PartCutter:
    """Cuts the labeled rows, as the driver receives them, into parts, and hands each part's blocks to ``launch``.

    A part is cut once it holds ``rows_per_file`` rows, or once its oldest row has waited ``interval_s``: a thread
    of its own watches the time, so a part is cut on time even while no rows come. A run slower than
    ``rows_per_file`` rows per ``interval_s`` still writes as it goes, and a killed one loses at most the last
    ``interval_s`` of its labeling. Each block goes into exactly one part.
    """

    def __init__(self, launch: Callable[[list], None], rows_per_file: int, interval_s: float):
        self._launch = launch
        self._rows_per_file = rows_per_file
        self._interval_s = interval_s
        self._blocks: list = []
        self._rows = 0
        self._oldest = 0.0  # time.monotonic() when the first block held arrived
        self._closed = False
        self._failure: BaseException | None = None  # what the timer's launch raised, for the driver to raise
        self._changed = threading.Condition()
        self._timer = threading.Thread(target=self._cut_on_time, name="part-timer", daemon=True)
        self._timer.start()

    def add(self, blocks: list, rows: int) -> None:
        """Holds ``blocks`` (of ``rows`` rows in all) for the part being filled; cuts it once it is full.

        Raises:
            BaseException: what launching a part raised, here or on the timer's thread.
        """
        with self._changed:
            self._raise_failure()
            if not self._blocks:
                self._oldest = time.monotonic()
                self._changed.notify()  # the timer waits for the first block of a part
            self._blocks += blocks
            self._rows += rows
            if self._rows >= self._rows_per_file:
                self._cut()

    def close(self) -> None:
        """Stops the timer and cuts the blocks held, if any, into a last part."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._timer.join()
        with self._changed:
            self._raise_failure()
            if self._blocks:
                self._cut()

    def _cut(self) -> None:
        blocks, self._blocks, self._rows = self._blocks, [], 0
        self._launch(blocks)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _cut_on_time(self) -> None:
        with self._changed:
            while not self._closed:
                due = self._oldest + self._interval_s - time.monotonic()
                if not self._blocks or due > 0:
                    self._changed.wait(due if self._blocks else None)
                    continue
                try:
                    self._cut()
                except BaseException as exc:
                    self._failure = exc
                    return


class PartWrites:
    """The run's part writes, on a ``PartWriter`` actor: each part is handed on without waiting, so the driver takes
    the next rows at once; a write that failed fails the run when the next part is launched, or at the end.

    The driver waits on each write's ``concurrent.futures`` future, never in ``ray.wait`` or ``ray.get``: a stop
    signal that lands in those is raised as a ``SystemError`` (Ray 2.60's ``check_signals``), so a stopped run
    would be recorded as failed.
    """

    def __init__(self, run_uri: str, storage: Storage, fence: Fence | None = None):
        # On the driver's node, as the progress counter: a writer on another node would be lost with it (the
        # driver's node lost ends the job anyway). A writer that dies all the same is restarted and its writes
        # retried: a retried write replaces its own part, which is named by its rows' URIs.
        self._writer = (
            ray.remote(PartWriter)
            .options(
                num_cpus=WRITE_CPUS,
                max_concurrency=WRITE_THREADS,
                max_restarts=WRITE_RETRIES,
                max_task_retries=WRITE_RETRIES,
                scheduling_strategy=driver_node(),
            )
            .remote(run_uri, storage, fence)
        )
        self._pending: set[futures.Future] = set()

    def launch(self, blocks: list[ray.ObjectRef]) -> None:
        """Starts writing ``blocks`` as one part; raises the error of an earlier write that failed."""
        self._pending.add(self._writer.write.remote(*blocks).future())
        self._settle({future for future in self._pending if future.done()})

    def wait(self, timeout_s: float | None = None) -> None:
        """Returns once every part launched is written (or after ``timeout_s``); raises a failed write's error."""
        done, _ = futures.wait(self._pending, timeout=timeout_s)
        self._settle(done)

    def close(self) -> None:
        """Ends the writer; a write still going is cut short (its part is published whole or not at all)."""
        ray.kill(self._writer, no_restart=True)

    def _settle(self, done: set[futures.Future]) -> None:
        self._pending -= done
        for future in done:
            future.result()


def driver_node() -> NodeAffinitySchedulingStrategy:
    """Places an actor on the driver's node."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def write(
    dataset: ray.data.Dataset, config: JobConfig, run_uri: str, storage: Storage, fence: Fence | None = None
) -> None:
    """Runs the dataset, writing its rows as Parquet parts under ``run_uri``, each only while ``fence`` holds.

    The driver takes the labeled rows as references to Ray Data's output blocks (``iter_internal_ref_bundles``: no
    rows pass through it) and cuts them into parts (``PartCutter``), which an actor writes (``PartWriter``).
    A Ray Data sink cannot do this: it gathers ``min_rows_per_write`` rows before a write, however long they take.
    When the run stops or fails, the rows already labeled are still written, for up to ``STOP_WRITE_WAIT_S``,
    before the error is raised: the run's record then counts every part it holds, and a resumed run keeps them.
    """
    writes = PartWrites(run_uri, storage, fence)
    cutter = PartCutter(writes.launch, config.output.rows_per_file, config.output.part_interval_s)
    try:
        # Runs the dataset up to its first rows.
        bundles = dataset.iter_internal_ref_bundles()
        for bundle in bundles:
            rows = bundle.num_rows()
            if rows != 0:
                cutter.add(list(bundle.block_refs), rows or 0)
        cutter.close()
        writes.wait()
    except BaseException:
        # Ray Data's executor stops with its iterator (here, or in Ray Data if it was waiting for rows): it starts
        # no more tasks while the last parts are written.
        bundles = None
        # The error that stopped the run is the one to report; a second stop signal ends the wait.
        with contextlib.suppress(Exception):
            cutter.close()
        with contextlib.suppress(Exception):
            writes.wait(STOP_WRITE_WAIT_S)
        raise
    finally:
        with contextlib.suppress(Exception):  # Ray may be gone with the run
            writes.close()
