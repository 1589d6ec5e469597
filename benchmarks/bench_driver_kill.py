"""How long a SIGKILLed driver's local Ray outlives it: with the job's watchdog, and with the watchdog killed too.

Runs the labeling job on a folder of copies of scikit-image's photos and a fixture checkpoint, SIGKILLs the driver
once the first part is written (the watchdog too, with ``--without-watchdog``), and prints the seconds until no
process of the job's session is left (Ray's GCS, raylet, agents and workers included), up to ``--wait``.

    python benchmarks/bench_driver_kill.py --repeats 3
    python benchmarks/bench_driver_kill.py --repeats 3 --without-watchdog
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.cluster import session_members  # noqa: E402


def watchdogs(session_id: int) -> list[int]:
    return [
        pid
        for pid in session_members(session_id)
        if b"watchdog.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def one_kill(images: Path, weights: Path, work: Path, without_watchdog: bool, wait_s: float) -> float | None:
    """Seconds from the driver's SIGKILL until its session is empty; None when processes outlived ``wait_s``."""
    output = work / f"out-{time.monotonic_ns()}"
    argv = ["--input", str(images), "--output", str(output), "--weights", str(weights)]
    for setting in ("output.rows_per_file=8", "compute.batch_size=8", "preprocess.batch_size=8"):
        argv += ["--set", setting]
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    job = subprocess.Popen(
        [sys.executable, str(ROOT / "jobs" / "label_images.py"), *argv],
        env=environment,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not list(output.glob("run=*/part-*.parquet")):
            if job.poll() is not None:
                raise SystemExit(f"the job ended (status {job.returncode}) before its first part")
            time.sleep(0.1)
        if without_watchdog:
            for pid in watchdogs(job.pid):
                os.kill(pid, signal.SIGKILL)
        os.kill(job.pid, signal.SIGKILL)
        killed = time.monotonic()
        job.wait()
        while session_members(job.pid):
            if time.monotonic() - killed > wait_s:
                return None
            time.sleep(0.1)
        return time.monotonic() - killed
    finally:
        for pid in session_members(job.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--without-watchdog", action="store_true", help="kill the job's watchdog with its driver")
    parser.add_argument("--wait", type=float, default=180.0, help="seconds to wait for the session to empty")
    args = parser.parse_args(argv)

    from tests import support

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        images = work / "images"
        images.mkdir()
        support.write_corpus(images, 192)
        weights = work / "fixture.pth"
        weights.write_bytes(support.checkpoint_bytes(support.make_model("mnasnet0_5")))
        seconds = [one_kill(images, weights, work, args.without_watchdog, args.wait) for _ in range(args.repeats)]
    print(json.dumps({"without_watchdog": args.without_watchdog, "seconds_until_none_left": seconds}))


if __name__ == "__main__":
    main()
