"""The table output's nightly modes on a corpus of N images: a first run, then retry-errors and changed.

The first run labels N images of which 10 are missing (broken symlinks: error rows). The 10 files are then
restored and ``--mode retry-errors`` runs; then 10 images are rewritten and ``--mode changed`` runs. Each command
runs as users run it (its own local Ray); the script prints each one's wall time and, from the job's own log
lines, its phases: start to the run's plan (listing, weights, table scan, source stats), labeling, and the commit.

    python benchmarks/bench_table.py --images 2000 --dir /tmp/bench_table --json bench_table.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TABLE = "labels.bench"
BROKEN = 10


def stamp(line: str) -> float:
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def run(images: Path, output: Path, weights: Path, mode: str) -> dict[str, float]:
    """Runs the job once; returns its wall time and phases (seconds)."""
    argv = [sys.executable, str(ROOT / "jobs" / "label_images.py"), "--input", str(images), "--output", str(output)]
    argv += ["--weights", str(weights), "--mode", mode, "--set", f"output.table={TABLE}"]
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.time()
    result = subprocess.run(argv, env=environment, capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - started
    if result.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{result.stderr[-3000:]}")
    lines = [line for line in result.stderr.splitlines() if line[:4].isdigit()]
    planned = next(stamp(line) for line in lines if " to label in run " in line)
    commit = next((line for line in lines if "committed" in line and "rows of run" in line), None)
    commit_s = float(re.search(r"in ([0-9.]+) s$", commit).group(1)) if commit else 0.0
    committed = stamp(commit) if commit else planned
    todo = int(re.search(r"(\d+) image files to label", next(x for x in lines if " to label in run " in x)).group(1))
    return {
        "mode": mode,
        "labeled": todo,
        "wall_s": round(wall, 1),
        "start_to_plan_s": round(planned - started, 1),
        "labeling_s": round(committed - commit_s - planned, 1),
        "commit_s": round(commit_s, 2),
        "after_commit_s": round(started + wall - committed, 1),
        "summary": result.stdout.strip(),
    }


def planning(images: Path, output: Path) -> dict[str, float]:
    """The table's own share of planning a run, in this process: listing the input, scanning the table's current
    rows, examining every listed file (what ``changed`` compares), and choosing what each mode labels."""
    from mnasnet_batch.config import InputConfig, OutputConfig
    from mnasnet_batch.inputs.listing import plan_input
    from mnasnet_batch.outputs.iceberg import current_rows, load_table, source_stats, to_label
    from mnasnet_batch.storage import Storage

    storage = Storage()
    timings = {"mode": "planning (in-process)"}
    started = time.perf_counter()
    inputs = plan_input(InputConfig(uri=str(images)), storage)
    timings["listing_s"] = round(time.perf_counter() - started, 3)
    started = time.perf_counter()
    table = load_table(OutputConfig(uri=str(output), table=TABLE), storage)
    rows = current_rows(table, ("uri", "status", "run_id", "source_size", "source_version"))
    timings["table_scan_s"] = round(time.perf_counter() - started, 3)
    started = time.perf_counter()
    sources = source_stats(inputs.uris, storage)
    timings["source_stats_s"] = round(time.perf_counter() - started, 3)
    for mode in ("retry-errors", "changed"):
        started = time.perf_counter()
        to_label(mode, inputs.uris, rows, sources)
        timings[f"select_{mode}_s"] = round(time.perf_counter() - started, 4)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench_table"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from tests import support

    shutil.rmtree(args.dir, ignore_errors=True)
    images, output = args.dir / "images", args.dir / "labels"
    paths = support.write_corpus(images, args.images, long_side=400)
    weights = args.dir / "weights.pth"
    weights.write_bytes(support.checkpoint_bytes(support.make_model("mnasnet0_5")))
    hidden = args.dir / "hidden"
    hidden.mkdir()
    for path in paths[:BROKEN]:  # listed, unreadable: error rows
        path.rename(hidden / path.name)
        path.symlink_to(hidden / f"{path.name}.gone")
    results = [run(images, output, weights, "auto")]
    for path in paths[:BROKEN]:
        path.unlink()
        (hidden / path.name).rename(path)
    results.append(run(images, output, weights, "retry-errors"))
    for path in paths[BROKEN : 2 * BROKEN]:
        path.write_bytes(paths[-1].read_bytes())  # other content, other size
    results.append(run(images, output, weights, "changed"))
    results.append(planning(images, output))
    for result in results:
        print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps({"images": args.images, "load": os.getloadavg(), "runs": results}, indent=2))


if __name__ == "__main__":
    main()
