"""Job progress for people: a bar at a terminal, otherwise one log line every N seconds."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from typing import TextIO

log = logging.getLogger(__name__)

BAR_WIDTH = 30
# The rate (and ETA) is measured over the last minute: steady enough to read, recent enough to follow
# autoscaling, and blind to the actor start-up before the first images were labeled.
RATE_WINDOW_S = 60.0


class ProgressCounter:
    """Images labeled so far: model actors add each batch's counts, the driver reads them.

    Run as a Ray actor by the pipeline; it lives here, away from torch, so its process starts in a blink.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.images = 0
        self.errors = 0
        self.clock = clock
        # When the first and the latest batch were counted, and the first batch's images.
        self.first_at = self.last_at = 0.0
        self.first_images = 0
        # CPU milliseconds the labeled images took to decode and in the model.
        self.decode_ms = self.model_ms = 0.0

    def add(self, images: int, errors: int, decode_ms: float = 0.0, model_ms: float = 0.0) -> None:
        now = self.clock()
        if not self.images:
            self.first_at, self.first_images = now, images
        self.last_at = now
        self.images += images
        self.errors += errors
        self.decode_ms += decode_ms
        self.model_ms += model_ms

    def stage_costs(self) -> dict[str, float]:
        """CPU milliseconds per labeled image (errors left out) that decoding and the model took in the job."""
        labeled = max(1, self.images - self.errors)
        return {"decode_ms": round(self.decode_ms / labeled, 2), "model_ms": round(self.model_ms / labeled, 2)}

    def counts(self) -> tuple[int, int]:
        return self.images, self.errors

    def labeling_span(self) -> tuple[int, float]:
        """Images labeled after the first batch, and the seconds from the first batch to the last: the labeling
        rate without the start-up (Ray, actors, the model) before the first batch was done."""
        return self.images - self.first_images, self.last_at - self.first_at


class StallWatch:
    """Says when labeling has stalled: no image counted for ``stall_s`` seconds while some are left.

    Args:
        stall_s: seconds without a newly labeled image that make a stall (``progress.stall_s``).
        total: images in the job; 0 when not known. Once every one is counted nothing stalls: what is left (the
            last parts' writes) is bounded on its own.
        clock: seconds, monotonic; replaceable in tests.
    """

    def __init__(self, stall_s: float, total: int = 0, clock: Callable[[], float] = time.monotonic):
        self.stall_s = stall_s
        self.total = total
        self.clock = clock
        self.done = 0
        self.since = clock()  # when the count last grew, or the watch started

    def stalled(self, done: int) -> float | None:
        """Takes the images counted so far; returns the seconds since the count last grew once they reach
        ``stall_s``, else None."""
        now = self.clock()
        if done > self.done:
            self.done, self.since = done, now
            return None
        if self.total and done >= self.total:
            return None
        waited = now - self.since
        return waited if waited >= self.stall_s else None


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s`` or ``2 h 07 min``: short enough for a log line, exact enough for an ETA."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress_line(done: int, errors: int, total: int, rate: float) -> str:
    """``120/300 images (40%), 16.3 images/s, 2 errors, ETA 11 s``; the ETA assumes ``rate`` holds."""
    percent = 100 * done // total if total else 100
    if done >= total:
        eta = "done"
    elif rate > 0:
        eta = f"ETA {format_duration((total - done) / rate)}"
    else:
        eta = "ETA unknown"
    return f"{done}/{total} images ({percent}%), {rate:.1f} images/s, {errors} errors, {eta}"


class ProgressReporter:
    """Turns running counts into a progress bar (terminal) or periodic log lines (job logs).

    Args:
        total: images in the job.
        interval_s: seconds between log lines when there is no terminal.
        terminal: the stream to draw the bar on, or None to log lines instead.
        clock: seconds, monotonic; replaceable in tests.
    """

    def __init__(
        self,
        total: int,
        interval_s: float,
        terminal: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total = total
        self.interval_s = interval_s
        self.terminal = terminal
        self.clock = clock
        self.last_log = clock()
        self.done = 0
        self.errors = 0
        # (time, images done) since the first images were labeled, at most RATE_WINDOW_S old.
        self.samples: collections.deque[tuple[float, int]] = collections.deque()

    def rate(self, now: float, done: int) -> float:
        """Images per second over the last RATE_WINDOW_S, counted from the first labeled images."""
        if done:
            self.samples.append((now, done))
        while len(self.samples) > 1 and now - self.samples[1][0] >= RATE_WINDOW_S:
            self.samples.popleft()
        if len(self.samples) < 2 or now <= self.samples[0][0]:
            return 0.0
        first_time, first_done = self.samples[0]
        return (done - first_done) / (now - first_time)

    def update(self, done: int, errors: int) -> None:
        """Records the counts so far; redraws the bar, or logs a line once ``interval_s`` has passed."""
        self.done, self.errors = done, errors
        now = self.clock()
        line = progress_line(done, errors, self.total, self.rate(now, done))
        if self.terminal is not None:
            filled = BAR_WIDTH * done // self.total if self.total else BAR_WIDTH
            self.terminal.write(f"\r[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {line}\x1b[K")
            self.terminal.flush()
        elif now - self.last_log >= self.interval_s:
            self.last_log = now
            log.info("progress: %s", line)

    def close(self) -> None:
        """Ends the bar's line so the summary starts on its own; log lines need no ending."""
        if self.terminal is not None:
            self.terminal.write("\n")
            self.terminal.flush()
