"""An output's lease: ``_lease.json``, which says a job writes there, refreshed while its run is open."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import socket
import threading
import uuid

from fsspec.implementations.local import LocalFileSystem

from mnasnet_batch.outputs import files
from mnasnet_batch.outputs.files import join, now, one_line, read_json, remove_quietly
from mnasnet_batch.storage import StorageError

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
# Seconds between the heartbeats of a running job's lease: a small read and write each, cheap on any store.
LEASE_HEARTBEAT_S = 30.0
# A lease that has not beaten for this long is stale: its job ended without releasing it (killed, machine lost),
# and the next job takes the output over. Four intervals, so that a slow storage request or a driver starved of
# CPU for a minute does not let a second job in; it is also how long a crashed job's output stays locked.
# The hosts' clocks must agree to well within it.
LEASE_STALE_S = 4 * LEASE_HEARTBEAT_S


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
            remove_quietly(fs, temp)
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
            "heartbeat_at": now("milliseconds"),
        }
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, fs, root: str, uri: str) -> Lease:
        """Takes the lease of the output at ``root`` (``uri`` as the user wrote it), unless a live job holds it.

        Raises:
            StorageError: another job holds the output; the message names its run and when it last beat.
        """
        lease = cls(fs, join(root, LEASE_FILE), uri)
        try:
            current = read_json(fs, lease.path)
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
        winner = read_json(fs, lease.path)
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
            if (read_json(self.fs, self.path) or {}).get("token") == self.holder["token"]:
                self.fs.rm(self.path)
        except Exception as exc:
            log.warning("output %s: cannot release the lease (%s); stale in %.0f s", self.uri, exc, LEASE_STALE_S)

    def _data(self) -> bytes:
        return json.dumps(self.holder, indent=2).encode()

    def _beat(self) -> None:
        current = read_json(self.fs, self.path)
        if (current or {}).get("token") != self.holder["token"]:
            # Taken over while this job could not beat for LEASE_STALE_S: two jobs may now write the output.
            log.error("output %s: lost the lease to %s", self.uri, _holder_text(current or {}))
            self._stopped.set()
            return
        self.holder["heartbeat_at"] = now("milliseconds")
        files.write_bytes(self.fs, self.path, self._data())

    def _heartbeats(self) -> None:
        while not self._stopped.wait(LEASE_HEARTBEAT_S):
            try:
                self._beat()
            except Exception as exc:  # a storage hiccup: the next beat tries again, staleness allows a few
                log.warning("output %s: lease heartbeat failed: %s", self.uri, one_line(exc))


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
