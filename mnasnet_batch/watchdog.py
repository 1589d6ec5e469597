"""Ends the local Ray a job started once the job's driver is gone, even killed by SIGKILL.

A local Ray's GCS and raylet notice a dead driver, but the processes they started (the dashboard and runtime-env
agents, workers, even new workers started after the driver died) can outlive it by a minute or more. The driver
marks its environment before it starts Ray, so that every process of that Ray inherits the mark, and starts this
module as a separate process holding the read end of a pipe whose write end only the driver holds. When the
driver exits, however it exits, the pipe ends, and the watchdog kills every process that carries the mark.

Standard library only, and run as a script (``python watchdog.py MARK``): it must start without the package being
importable from the driver's working directory. Linux: it reads ``/proc``; elsewhere it only waits.
"""

from __future__ import annotations

import os
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


def end_marked(mark: str, window_s: float = KILL_WINDOW_S) -> None:
    """SIGKILLs the processes carrying ``mark`` until none is left, or ``window_s`` has passed."""
    deadline = time.monotonic() + window_s
    while (pids := marked(mark)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)  # let the kernel reap them before looking again


def main(mark: str) -> None:
    # The driver handles Ctrl-C and SIGTERM sent to its whole process group; the watchdog waits for it to end.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    sys.stdin.buffer.read()  # returns once the driver's end of the pipe is closed: the driver has exited
    end_marked(mark)


if __name__ == "__main__":
    main(sys.argv[1])
