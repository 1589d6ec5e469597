"""An output's lease: ``_lease.json``, which says a job writes there, renewed while its run is open; no clocks compared.

A lease names its holder (a token) and a generation that every renewal bumps. Whether it is stale is judged by the
job that finds it, on its own monotonic clock only (``judge``): a lease whose generation does not move while that job
watches it for the holder's declared period is stale; one that moves is alive, whatever any clock says. On the same
machine, a holder whose process lives is never stale. Every change of the lease is a compare-and-swap on what was
read (``_swap``): a lock file on local disk, ``If-Match`` / ``If-None-Match`` on S3; other stores write and read back.
A holder that finds its lease taken stops writing (``Lease.held``, ``Fence.held`` around each part and record).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fsspec.implementations.local import LocalFileSystem

from mnasnet_batch.outputs import files
from mnasnet_batch.outputs.files import join, now, one_line
from mnasnet_batch.storage import Storage, StorageError

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
# Local disk only: held (flock) for the moment of each read-compare-write of the lease, so that two jobs cannot both
# replace the version they read. The kernel lets it go when a process dies: it never needs taking over.
LOCK_FILE = "_lease.lock"
# Seconds between the renewals of a running job's lease: a small read and write each, cheap on any store.
LEASE_HEARTBEAT_S = 30.0
# A lease not renewed for this many of its holder's heartbeats is stale: four, so that a slow storage request or a
# driver starved of CPU for a minute does not let a second job in; 2 minutes is also how long a killed job's output
# stays locked from another machine.
STALE_BEATS = 4
# The default lease's period; the lease a job writes declares its own (``output.lease_heartbeat_s``).
LEASE_STALE_S = STALE_BEATS * LEASE_HEARTBEAT_S
# Seconds between a waiting job's reads of a lease it watches: a live holder is seen within one of its heartbeats
# and this; a few requests a minute.
WATCH_POLL_S = 5.0
# The tokens of the leases this process holds (until released): a lease naming this pid with another token was
# written by an earlier process.
_HELD: set[str] = set()


class LeaseLost(StorageError):
    """Another job took this job's lease: this job writes nothing more; its message names the other run."""


@dataclass(frozen=True)
class Here:
    """The machine a contender runs on, as a lease names its holder's (host name and PID namespace); the
    contender's own pid, and the tokens of the leases this process holds: a lease of this machine naming this pid
    with another token is an earlier process's (a PID namespace's pid 1 again)."""

    host: str
    pid_namespace: str
    pid: int = 0
    held: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Sighting:
    """A version of another job's lease (its token and generation) and when this job first read it, on this
    job's monotonic clock."""

    version: tuple[str, int]
    since: float


@dataclass(frozen=True)
class Verdict:
    """What a job that finds a lease does: ``take`` (none there), ``take_over`` (stale), ``watch`` (read again in
    ``wait_s``) or ``refuse`` (alive); ``left_s``: seconds, at the earliest, until the lease may be taken."""

    action: str
    wait_s: float = 0.0
    left_s: float = 0.0


def stale_after_s(holder: dict) -> float:
    """How long the holder's lease may go unrenewed before it is stale: the period it declares (4 heartbeats)."""
    try:
        declared = float(holder["stale_after_s"])
    except (KeyError, TypeError, ValueError):  # a lease written before the period was declared
        declared = LEASE_STALE_S
    return declared if math.isfinite(declared) and declared > 0 else LEASE_STALE_S


def version(holder: dict) -> tuple[str, int] | None:
    """A lease's version, (token, generation); None for a file that is not a lease (no job can be renewing it)."""
    try:
        return str(holder["token"]), int(holder.get("generation", 0))
    except (KeyError, TypeError, ValueError):
        return None


def judge(
    current: dict | None, seen: Sighting | None, now_s: float, here: Here, alive: Callable[[int], bool]
) -> tuple[Verdict, Sighting | None]:
    """Decides what a job does with the lease it read (``current``), from what it saw before (``seen``) and its own
    monotonic clock (``now_s``), never from the times written in the lease.

    Args:
        current: the lease as read; None: there is none.
        seen: the version this job read earlier and since when; None: it has not watched one.
        now_s: this job's monotonic clock.
        here: this job's machine; a holder on it is judged by its process (``alive(pid)``), not by time.

    Returns:
        The verdict, and the sighting to pass the next call.
    """
    if current is None:
        return Verdict("take"), None
    held = version(current)
    if held is None:
        return Verdict("take_over"), None
    period = stale_after_s(current)
    if current.get("host") == here.host and current.get("pid_namespace") == here.pid_namespace:
        pid = int(current.get("pid") or 0)
        if held[0] in here.held if pid == here.pid else alive(pid):
            return Verdict("refuse", left_s=math.inf), None
        return Verdict("take_over"), None
    if seen is None:
        return Verdict("watch", wait_s=min(WATCH_POLL_S, period), left_s=period), Sighting(held, now_s)
    if seen.version != held:  # renewed (or taken by a third job) while this job watched: alive
        return Verdict("refuse", left_s=period), Sighting(held, now_s)
    left = period - (now_s - seen.since)
    if left <= 0:
        return Verdict("take_over"), seen
    return Verdict("watch", wait_s=min(WATCH_POLL_S, left), left_s=left), seen


# -- the store: a versioned read, and a compare-and-swap on the version read ---------------------------------------


def _is_s3(fs) -> bool:
    return "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


@contextlib.contextmanager
def _locked(fs, path: str):
    """On local disk, holds the lease's lock file while the body reads and replaces the lease; elsewhere nothing."""
    if not isinstance(fs, LocalFileSystem):
        yield
        return
    with open(join(os.path.dirname(path), LOCK_FILE), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read(fs, path: str) -> tuple[dict | None, str | None]:
    """The lease at ``path`` and the store's version of it (S3's ETag; None elsewhere); ``{}`` for a file that is
    not JSON."""
    try:
        if _is_s3(fs):
            fs.invalidate_cache(path)
            with fs.open(path, "rb") as f:  # s3fs reads with If-Match on the ETag it found: one version, whole
                data, etag = f.read(), f.details.get("ETag")
        else:
            data, etag = fs.cat_file(path), None
    except FileNotFoundError:
        return None, None
    try:
        holder = json.loads(data)
    except ValueError:
        return {}, etag
    return (holder if isinstance(holder, dict) else {}), etag


def _precondition_failed(exc: Exception) -> bool:
    """Whether a conditional write failed on its condition (S3's 412, which s3fs turns into an ``OSError``)."""
    text = f"{type(exc).__name__} {exc} {exc.__cause__}".lower().replace("-", "")
    return isinstance(exc, FileExistsError) or "precondition" in text


def _swap(fs, path: str, expected: dict | None, etag: str | None, data: bytes) -> str | bool:
    """Writes ``data`` as the lease only if the lease is still ``expected`` (None: only if there is none).

    Returns:
        False when another job changed the lease first; otherwise True, or on S3 the new version's ETag.
    """
    if _is_s3(fs):
        if expected is not None and etag is None:  # the ETag of this job's own write was not returned: read it
            current, etag = _read(fs, path)
            if current is None or etag is None or version(current) != version(expected):
                return False
        condition = {"IfMatch": etag} if expected is not None else {"IfNoneMatch": "*"}
        try:
            fs.pipe_file(path, data, **condition)
        except Exception as exc:
            if _precondition_failed(exc) or (expected is not None and isinstance(exc, FileNotFoundError)):
                return False
            raise
        # A store that ignores the condition (some S3-compatible ones) lets the last writer win: read who that was.
        current, etag = _read(fs, path)
        return (etag or True) if version(current or {}) == version(json.loads(data)) else False
    with _locked(fs, path):
        current, _ = _read(fs, path)
        if (current is None) != (expected is None) or (expected is not None and version(current) != version(expected)):
            return False
        if isinstance(fs, LocalFileSystem):
            files.write_bytes(fs, path, data)
            return True
        # A store with no conditional write (nor lock): the last writer wins; a reader finds out who that was.
        fs.pipe_file(path, data)
    return version(_read(fs, path)[0] or {}) == version(json.loads(data))


def _delete(fs, path: str, expected: dict) -> None:
    """Removes the lease if it is still ``expected`` (on S3, if it is still the version read: ``If-Match``)."""
    with _locked(fs, path):
        current, etag = _read(fs, path)
        if current is None or version(current) != version(expected):
            return
        if _is_s3(fs) and etag:
            bucket, key, _ = fs.split_path(path)
            with contextlib.suppress(FileNotFoundError):
                try:
                    fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)
                except Exception as exc:
                    if not _precondition_failed(exc):
                        raise
        else:
            fs.rm(path)


# -- the holder ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fence:
    """What a writer in another process (the part writer) checks as it publishes anything: that the output's
    lease still carries this job's token. Picklable: the job's storage handle, the output and the token."""

    storage: Storage
    output_uri: str
    token: str
    run_id: str
    # A lease taken over: the parts under the output when it was taken (the run resumed from them); any other part
    # that appears since is the previous holder's last, whose rows the writer leaves out (``PartWriter``). None:
    # the lease was free, and no other job writes here.
    parts_at_takeover: frozenset[str] | None = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Runs the body (a publish) only if the output's lease is still this job's (one small read), else raises
        ``LeaseLost``. On local disk the body runs under the lease's lock, which a job taking the lease over holds
        too: a part is then published before the takeover, and seen by the taker, or not at all."""
        fs, root = self.storage.filesystem(self.output_uri)
        path = join(root, LEASE_FILE)
        with _locked(fs, path):
            current, _ = _read(fs, path)
            if (current or {}).get("token") != self.token:
                raise LeaseLost(_lost_text(self.output_uri, self.run_id, current))
            yield


class Lease:
    """This job's hold on an output location: ``_lease.json``, renewed by a daemon thread while the run is open.

    A second job on the same output finds the lease alive and stops, instead of resuming (and labeling again) a run
    that is still going; one that is stale (``judge``) is taken over, and its holder, should it still run, finds
    that out at its next renewal or write and stops (``check``, ``lost``).
    """

    def __init__(self, fs, path: str, uri: str, heartbeat_s: float = LEASE_HEARTBEAT_S, clock=time.monotonic):
        self.fs, self.path, self.uri, self.clock = fs, path, uri, clock
        self.heartbeat_s = heartbeat_s
        self.holder: dict[str, object] = {
            "run_id": "",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_namespace": _pid_namespace(),
            "token": uuid.uuid4().hex,
            "generation": 0,
            "heartbeat_s": heartbeat_s,
            "stale_after_s": STALE_BEATS * heartbeat_s,
            # For people only: no job compares its clock with it.
            "heartbeat_at": now("milliseconds"),
        }
        self.etag: str | None = None
        self.taken_over = False  # from a job that ended without releasing it
        self.parts_at_takeover: frozenset[str] | None = None  # see ``Fence``
        self.lost: str | None = None  # the line that says who took it
        self._renewed = clock()
        self._on_lost: list[Callable[[str], None]] = []
        self._beating = threading.Lock()  # one renewal at a time: the heartbeat thread's and ``hold``'s
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(
        cls,
        fs,
        root: str,
        uri: str,
        heartbeat_s: float = LEASE_HEARTBEAT_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> Lease:
        """Takes the lease of the output at ``root`` (``uri`` as the user wrote it), unless a live job holds it.

        A lease of another machine is watched for its holder's period (``judge``) on ``clock``, re-read every
        ``WATCH_POLL_S`` (``sleep``): a live holder renews it and this job stops; a gone one does not, and its lease
        is taken over.

        Raises:
            StorageError: another job holds the output; the message names its run and when it may be taken.
        """
        lease = cls(fs, join(root, LEASE_FILE), uri, heartbeat_s, clock)
        seen = None
        while True:
            current, etag = _read(fs, lease.path)
            machine = str(lease.holder["host"]), str(lease.holder["pid_namespace"])
            here = Here(*machine, pid=os.getpid(), held=frozenset(_HELD.copy()))
            before = seen
            verdict, seen = judge(current, seen, clock(), here, _process_exists)
            if verdict.action == "refuse":
                raise StorageError(_in_use(uri, current, verdict.left_s))
            if verdict.action == "watch":
                if before is None:
                    log.warning(
                        "output %s: held by %s on another machine; watching its lease for up to %.0f s on this "
                        "machine's clock: a live job renews it every %g s, a gone one's is then taken over",
                        uri,
                        _holder_text(current),
                        verdict.left_s,
                        float(current.get("heartbeat_s") or LEASE_HEARTBEAT_S),
                    )
                sleep(verdict.wait_s)
                continue
            if verdict.action == "take_over":
                log.warning("output %s: taking over the stale lease of %s", uri, _holder_text(current))
            token = str(lease.holder["token"])
            _HELD.add(token)  # before it can be read: another thread of this process then sees it held
            try:
                written = _swap(fs, lease.path, current, etag, lease._data())
            except BaseException:
                _HELD.discard(token)
                raise
            if written:
                lease.etag = written if isinstance(written, str) else None
                lease.taken_over = verdict.action == "take_over"
                lease._renewed = clock()
                return lease
            _HELD.discard(token)
            seen = None  # another job changed it first: judged afresh

    def hold(self, run_id: str = "") -> None:
        """Renews the lease now and every heartbeat until ``release`` (from the first call on), naming ``run_id``
        when given: a job holds it from the moment it is taken, while it plans its run, then names the run."""
        with self._beating:
            if run_id:
                self.holder["run_id"] = run_id
        self._beat()
        if self._thread is None:
            self._thread = threading.Thread(target=self._heartbeats, name=f"lease-{self.uri}", daemon=True)
            self._thread.start()

    def on_lost(self, callback: Callable[[str], None]) -> None:
        """Calls ``callback`` with the line naming the other job, on the heartbeat's thread, if the lease is lost."""
        self._on_lost.append(callback)
        if self.lost is not None:
            callback(self.lost)

    def fence(self, storage: Storage) -> Fence:
        """What the run's writers in other processes check, through the job's ``storage`` handle, before each write
        (``Fence.held``)."""
        token, run_id = str(self.holder["token"]), str(self.holder["run_id"])
        return Fence(storage, self.uri, token, run_id, self.parts_at_takeover)

    def check(self) -> None:
        """Raises ``LeaseLost`` unless the lease is still this job's: not lost, and read back with its token."""
        if self.lost is None:
            current, _ = _read(self.fs, self.path)
            if (current or {}).get("token") != self.holder["token"]:
                self._lose(_lost_text(self.uri, str(self.holder["run_id"]), current))
        if self.lost is not None:
            raise LeaseLost(self.lost)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """``check``, then the body (a publish), under the lease's lock on local disk (``Fence.held``)."""
        with _locked(self.fs, self.path):
            self.check()
            yield

    def release(self) -> None:
        """Stops the heartbeats and deletes the lease if it is still this job's; never raises."""
        self._stopped.set()
        _HELD.discard(str(self.holder["token"]))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.heartbeat_s)
        if self.lost is not None:
            return
        try:
            _delete(self.fs, self.path, self.holder)
        except Exception as exc:
            log.warning(
                "output %s: cannot release the lease (%s); another machine's job takes it over after watching it "
                "for %.0f s",
                self.uri,
                exc,
                STALE_BEATS * self.heartbeat_s,
            )

    def _data(self) -> bytes:
        return json.dumps(self.holder, indent=2).encode()

    def _beat(self) -> None:
        """Renews the lease, a generation up, if it is still the version this job wrote; else it is lost."""
        with self._beating:
            if self.lost is not None:
                return
            generation = int(self.holder["generation"]) + 1
            renewed = {**self.holder, "generation": generation, "heartbeat_at": now("milliseconds")}
            written = _swap(self.fs, self.path, self.holder, self.etag, json.dumps(renewed, indent=2).encode())
            if written:
                self.holder, self.etag = renewed, written if isinstance(written, str) else None
                self._renewed = self.clock()
                return
        self._lose(_lost_text(self.uri, str(renewed["run_id"]), _read(self.fs, self.path)[0]))

    def _heartbeats(self) -> None:
        while not self._stopped.wait(self.heartbeat_s):
            try:
                self._beat()
            except Exception as exc:  # a storage hiccup: the next beat tries again, staleness allows a few
                log.warning("output %s: lease heartbeat failed: %s", self.uri, one_line(exc))
                unrenewed = self.clock() - self._renewed
                # Another machine may take the lease once it went unrenewed for its period: stop a beat before.
                if unrenewed >= (STALE_BEATS - 1) * self.heartbeat_s:
                    self._lose(
                        f"output {self.uri}: run {self.holder['run_id']} could not renew its lease for "
                        f"{unrenewed:.0f} s ({one_line(exc)}), and another job may take the output: it stopped writing"
                    )

    def _lose(self, line: str) -> None:
        if self.lost is not None:
            return
        self.lost = line
        self._stopped.set()
        log.error("%s", line)
        for callback in self._on_lost:
            callback(line)


def _pid_namespace() -> str:
    """This process's PID namespace (Linux), so that containers sharing a host name do not judge each other's pids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


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


def _holder_text(holder: dict | None) -> str:
    holder = holder or {}
    run = f"run {holder['run_id']}" if holder.get("run_id") else "a job still planning its run"
    return f"{run} (host {holder.get('host', '?')}, pid {holder.get('pid', '?')})"


def _lost_text(uri: str, run_id: str, holder: dict | None) -> str:
    taker = f"taken over by {_holder_text(holder)}" if holder else "removed"
    return (
        f"output {uri}: the lease of run {run_id} was {taker} while this job wrote it; this job stopped writing "
        f"(the parts it wrote stay, and are not labeled again)"
    )


def _in_use(uri: str, holder: dict | None, left_s: float) -> str:
    if math.isinf(left_s):
        when = "its process runs on this machine: wait for it to end"
    else:
        when = (
            f"it renewed its lease while this job watched; should that job end without releasing it, its lease may "
            f"be taken once unrenewed for {stale_after_s(holder or {}):.0f} s, in about {left_s:.0f} s at the "
            f"earliest: wait for it to end"
        )
    return f"output {uri} is in use by {_holder_text(holder)}: {when}, or use another --output"
