"""Ends the local Ray a job started once the job's driver is gone, even killed by SIGKILL.

A local Ray's GCS and raylet notice a dead driver, but the processes they started (the dashboard and runtime-env
agents, workers, even new workers started after the driver died) can outlive it by a minute or more. The driver
starts this module as a separate process holding the read end of a pipe whose write end only the driver holds.
While the driver lives, the watchdog notes the driver's descendants every ``WATCH_S``; when the driver exits,
however it exits, the pipe ends, and the watchdog stops every process it noted that is still the same process
(SIGSTOP: none can start another meanwhile), adds their descendants, and kills them all. The driver also marks
its environment before it starts Ray, which Ray's processes inherit: a process started too late to be noted is
found by its mark, where its title (``setproctitle`` may write over the environment's memory) has not hidden it.

Standard library only, and run as a script (``python watchdog.py MARK``): it must start without the package being
importable from the driver's working directory. Linux: it reads ``/proc``; elsewhere it only waits.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import uuid

# The environment variable whose value marks a job's local Ray processes.
MARK_VARIABLE = "MNASNET_BATCH_LOCAL_RAY"
# Seconds the watchdog keeps killing marked processes after the driver ended: a raylet may start a worker while it
# dies, and a process busy in the kernel on a loaded machine takes a while to go; the kills are retried until none
# is left or this passes.
KILL_WINDOW_S = 30.0

# Seconds between the watchdog's notes of the driver's descendants: Ray starts its GCS and raylet once, and a
# process started later by one of them is found as their descendant when they are stopped.
WATCH_S = 0.5

# The running watchdog: holding the Popen holds the pipe's write end open for as long as this process lives.
_watchdog: subprocess.Popen | None = None


def watch_local_ray() -> None:
    """Marks this process's environment for the Ray it is about to start and starts the watchdog (once)."""
    global _watchdog
    if _watchdog is not None or not os.path.isdir("/proc"):
        return
    mark = uuid.uuid4().hex
    os.environ[MARK_VARIABLE] = mark
    environment = {key: value for key, value in os.environ.items() if key != MARK_VARIABLE}
    _watchdog = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), mark],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=environment,
        cwd="/",
    )


def marked(mark: str) -> list[int]:
    """The processes whose environment carries ``mark`` (those of other users cannot be read and are left)."""
    needle = f"{MARK_VARIABLE}={mark}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as environ:
                    if needle in environ.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:  # gone meanwhile, or not ours to read
                pass
    return found


def process_table() -> dict[int, tuple[int, str]]:
    """Every live process's parent and start time (which tells a process from a later one given the same pid)."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                if fields[0] != "Z":  # a zombie has ended; only its parent's wait is left
                    table[int(entry)] = (int(fields[1]), fields[19])  # ppid, starttime
            except (OSError, IndexError, ValueError):
                pass
    return table


def descendants(roots: set[int], table: dict[int, tuple[int, str]]) -> set[int]:
    """The processes below ``roots`` in ``table`` (roots excluded)."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def signal_all(pids, signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def end_noted(noted: dict[int, str], mark: str, window_s: float = KILL_WINDOW_S) -> None:
    """Stops the ``noted`` processes (pid: start time) that are still those processes, then SIGKILLs them, their
    descendants and every process carrying ``mark``, until none is left or ``window_s`` has passed."""
    table = process_table()
    alive = {pid for pid, started in noted.items() if table.get(pid, (0, ""))[1] == started}
    signal_all(alive, signal.SIGSTOP)
    targets = alive | descendants(alive, process_table())
    deadline = time.monotonic() + window_s
    while True:
        table = process_table()
        targets = {pid for pid in targets if pid in table} | descendants(targets, table) | set(marked(mark))
        targets.discard(os.getpid())
        if not targets or time.monotonic() >= deadline:
            return
        signal_all(targets, signal.SIGKILL)
        time.sleep(0.1)  # let the kernel reap them before looking again


def main(mark: str) -> None:
    # The driver handles Ctrl-C and SIGTERM sent to its whole process group; the watchdog waits for it to end.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    driver, noted = os.getppid(), {}
    # Readable only once the driver's end of the pipe is closed: the driver has exited.
    while not select.select([sys.stdin], [], [], WATCH_S)[0]:
        table = process_table()
        for pid in descendants({driver}, table) - {os.getpid()}:
            noted[pid] = table[pid][1]
    end_noted(noted, mark)


if __name__ == "__main__":
    main(sys.argv[1])
