"""Keeps lines that Ray's C++ core worker writes straight to the driver's stderr, and that say nothing to a user of
the job, out of its log."""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading

# Ray Data puts each actor pool's transformer (the model actors' class and its arguments: the checkpoint) in the
# object store and passes it by reference, with restarts on, so the driver's core worker logs this error for every
# model actor (ray-project/ray#53727), whatever the job passes. Ray Data holds that reference while the dataset
# runs, so a restarted actor still finds its arguments: the line says nothing to a user of the job.
CONSTRUCTOR_ARGUMENTS = re.compile(
    r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store and "
    r"max_restarts > 0"
)


def is_noise(line: str) -> bool:
    """Whether a line of the driver's stderr is one of the core worker's lines left out (``CONSTRUCTOR_ARGUMENTS``)."""
    return bool(CONSTRUCTOR_ARGUMENTS.search(line))


class StderrFilter:
    """Puts a pipe in place of file descriptor 2, whose reader thread writes every line but ``is_noise`` ones to
    the stderr that was there. Python's own writes (``sys.stderr``, logging) pass through it in order.

    Start it after Ray's local processes are started, so that only the driver writes into the pipe; ``stop``
    (registered at exit) puts the stderr back and forwards what is left in the pipe.
    """

    def __init__(self):
        self.stderr = -1
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        sys.stderr.flush()
        self.stderr = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.thread = threading.Thread(target=self._forward, args=(read,), name="driver-stderr", daemon=True)
        self.thread.start()
        atexit.register(self.stop)

    def _forward(self, read: int) -> None:
        with os.fdopen(read, "rb") as pipe:
            for line in pipe:
                if not is_noise(line.decode(errors="replace")):
                    os.write(self.stderr, line)

    def stop(self) -> None:
        if self.thread is None:
            return
        sys.stderr.flush()
        os.dup2(self.stderr, 2)  # the pipe's last write end closes: the reader forwards the rest, then ends
        self.thread.join(timeout=5)
        self.thread = None


_filter = StderrFilter()


def filter_driver_stderr() -> None:
    """Starts the process's ``StderrFilter`` once; it stops at exit."""
    if _filter.thread is None:
        _filter.start()
