"""Progress reporting: the line's numbers, one log line per interval without a terminal, a bar with one."""

import io
import logging

import pytest

from mnasnet_batch.progress import ProgressReporter, format_duration, progress_line


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("seconds, text", [(0, "0 s"), (42.4, "42 s"), (185, "3 min 05 s"), (7620, "2 h 07 min")])
def test_durations(seconds, text):
    assert format_duration(seconds) == text


def test_line_has_done_rate_errors_and_eta():
    assert progress_line(120, 2, 300, 18.0) == "120/300 images (40%), 18.0 images/s, 2 errors, ETA 10 s"
    assert progress_line(0, 0, 300, 0.0).endswith("ETA unknown")
    assert progress_line(300, 0, 300, 5.0).endswith("done")


def test_without_a_terminal_one_line_per_interval(caplog):
    clock = Clock()
    reporter = ProgressReporter(total=100, interval_s=30, clock=clock)
    with caplog.at_level(logging.INFO, logger="mnasnet_batch.progress"):
        # Polled every second for 95 s, labeling one image a second after 5 s of actor start-up.
        for second in range(1, 96):
            clock.now += 1
            reporter.update(max(0, second - 5), 0)
        reporter.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    # The start-up before the first images does not drag the rate down: 1.0 images/s, not 55/85.
    assert lines[-1] == "progress: 85/100 images (85%), 1.0 images/s, 0 errors, ETA 15 s"


def test_the_rate_follows_the_last_minute():
    clock = Clock()
    reporter = ProgressReporter(total=10_000, interval_s=30, clock=clock)
    done = 0
    for second in range(300):
        clock.now += 1
        done += 1 if second < 150 else 10  # the pool scaled up after 150 s
        reporter.update(done, 0)
    assert reporter.rate(clock.now, done) == pytest.approx(10, rel=0.05)


def test_at_a_terminal_a_bar_redrawn_in_place(caplog):
    clock = Clock()
    terminal = io.StringIO()
    reporter = ProgressReporter(total=4, interval_s=30, terminal=terminal, clock=clock)
    with caplog.at_level(logging.INFO, logger="mnasnet_batch.progress"):
        for done in (1, 2, 4):
            clock.now += 1
            reporter.update(done, 1)
        reporter.close()
    assert not caplog.records
    frames = terminal.getvalue().split("\r")[1:]
    assert len(frames) == 3 and terminal.getvalue().endswith("\n")
    assert frames[1].startswith("[" + "#" * 15 + "." * 15 + "] 2/4 images (50%)")
    assert "4/4 images (100%)" in frames[2] and "1 errors, done" in frames[2]


def test_the_model_actor_reports_each_output_batch(checkpoint_path, photos):
    from types import SimpleNamespace

    import numpy as np

    from mnasnet_batch.job import CountProgress
    from mnasnet_batch.model.predictor import Predictor
    from mnasnet_batch.model.weights import resolve_checkpoint

    sent = []
    counter = SimpleNamespace(add=SimpleNamespace(remote=lambda *counts: sent.append(counts)))
    predictor = Predictor(
        resolve_checkpoint("mnasnet0_5", str(checkpoint_path)), top_k=5, device="cpu", on_batch=CountProgress(counter)
    )
    crop = np.asarray(next(iter(photos.values())).resize((224, 224)), dtype=np.uint8)
    batch = {
        "uri": np.asarray(["a.jpg", "b.jpg", "c.jpg"], dtype=object),
        "image": np.stack([crop, crop, np.zeros_like(crop)]),
        "error": np.asarray(["", "", "UnidentifiedImageError: no"], dtype=object),
    }
    assert predictor(batch).num_rows == 3
    ((images, errors, decode_ms, model_ms),) = sent
    assert (images, errors) == (3, 1) and model_ms > 0
    assert decode_ms == 0  # the batch came decoded, without the decode stage's times


def test_the_counter_keeps_what_an_image_took_each_stage():
    from mnasnet_batch.progress import ProgressCounter

    counter = ProgressCounter()
    counter.add(8, 0, decode_ms=80.0, model_ms=40.0)
    counter.add(4, 2, decode_ms=20.0, model_ms=10.0)  # two errors: neither decoded nor classified
    assert counter.stage_costs() == {"decode_ms": 10.0, "model_ms": 5.0}


def test_the_labeling_span_runs_from_the_first_batch_to_the_last():
    from mnasnet_batch.progress import ProgressCounter

    times = iter([30.0, 31.0, 34.0])  # the first batch came after 30 s of start-up
    counter = ProgressCounter(clock=lambda: next(times))
    for images in (8, 8, 4):
        counter.add(images, 0)
    assert counter.labeling_span() == (12, 4.0) and counter.counts() == (20, 0)
