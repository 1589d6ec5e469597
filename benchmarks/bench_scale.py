"""Corpus scale: the job's planning time, driver memory and per-row overhead on synthetic inputs of N images.

Inputs, built once under ``--work`` and reused: for each N, a folder of two text manifests of N/2 URIs each, of
files that do not exist (every row is an error row, so the model costs nothing and what is measured is the
pipeline); for each N of ``--files``, a folder of N empty image files; and a folder of ``--shards`` WebDataset
shards of ``--samples`` one-byte members (hard links to one tar file, so 10^5 shards cost one shard's disk).

For each input the job runs as users run it (``jobs/label_images.py``'s ``main``, in its own process, with its
own local Ray), and each command reports: the seconds from its start until Ray Data executes (the job's
``pipeline.write`` is called), the driver's peak RSS, and what it was handed to read (inputs, and rows to drop
after reading). The cases:

- ``fresh``: a new run over the whole input, stopped (SIGTERM, as ``ray job stop`` does) once Ray Data executes;
  with N up to ``--full-run-upto`` also run to its end, for the whole time and the overhead rows/s.
- ``resume``: that run, interrupted, with the rows of the first half of the input written (parts written here,
  as a killed run leaves them), run again by the same command.
- ``incremental``: the same half as a finished run, then ``--mode incremental``.

    python benchmarks/bench_scale.py --sizes 100000,1000000,10000000 --shards 100000 --samples 100 \\
        --full-run-upto 1000000 --work /tmp/bench_scale --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Rows per Parquet part this script writes for the half "already labeled".
PART_ROWS = 100_000
SETTINGS = ("--set", "progress.interval_s=60")


# ---------------------------------------------------------------- the driver, in its own process


def driver(report: Path, stop_at_execution: bool, argv: list[str]) -> int:
    """Runs the job's ``main(argv)``; writes what it measured to ``report`` (JSON)."""
    from mnasnet_batch import cli
    from mnasnet_batch import job as pipeline

    started = float(os.environ["BENCH_T0"])
    figures: dict[str, object] = {}
    run, write = pipeline.run, pipeline.write

    def measured_run(config, storage, checkpoint, inputs, run_uri, *args, **kwargs):
        figures["inputs"] = len(inputs.uris)
        skip = getattr(inputs, "skip", None)  # rows to drop after reading, where the layout has them
        done = args[0] if args else kwargs.get("done", skip)
        figures["dropped_after_reading"] = 0 if done is None or inputs.layout.uri_per_image else len(done)
        return run(config, storage, checkpoint, inputs, run_uri, *args, **kwargs)

    def measured_write(*args, **kwargs):
        figures["executing_after_s"] = time.time() - started
        figures["rss_at_execution_mb"] = peak_rss_mb()
        if stop_at_execution:
            os.kill(os.getpid(), signal.SIGTERM)  # the job's own stop: the run is recorded as interrupted
        return write(*args, **kwargs)

    class Phases(logging.Handler):
        """The driver's peak RSS so far at each of the job's log lines: where planning's memory goes."""

        def emit(self, record: logging.LogRecord) -> None:
            figures.setdefault("peak_rss_mb_by_log_line", []).append(
                [round(time.time() - started, 2), round(peak_rss_mb()), record.getMessage()[:80]]
            )

    logging.getLogger("mnasnet_batch").addHandler(Phases())
    pipeline.run, pipeline.write = measured_run, measured_write
    status = cli.main(argv)
    figures.update(
        status=status,
        whole_s=time.time() - started,
        peak_rss_mb=peak_rss_mb(),
    )
    report.write_text(json.dumps(figures))
    return 0


def peak_rss_mb() -> float:
    """This process's peak RSS since it started this program (``VmHWM``). Not ``ru_maxrss``: Linux carries that
    over ``execve`` from the forked copy of the parent, so it would count this script's own lists of URIs."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def run_driver(argv: list[str], stop_at_execution: bool, work: Path, log_path: Path, timeout: float) -> dict:
    """One job command in its own session, its output in ``log_path``; its whole session is killed once it ended."""
    report = work / "report.json"
    report.unlink(missing_ok=True)
    command = [sys.executable, __file__, "_driver", str(report), "1" if stop_at_execution else "0", *argv]
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    environment |= {"BENCH_T0": repr(time.time()), "PYTHONPATH": str(ROOT)}
    log = log_path.open("w")
    process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=log, stderr=log, start_new_session=True)
    try:
        process.wait(timeout=timeout)
    finally:
        # The job's local Ray may outlive its driver by a moment: nothing of this session may stay.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
        log.close()
    if not report.exists():
        raise RuntimeError(f"the job wrote no report; see {log_path}")
    return json.loads(report.read_text())


# ---------------------------------------------------------------- inputs


def missing_uris(start: int, stop: int, prefix: str) -> str:
    return "".join(f"{prefix}/d{i // 1000:05d}/img_{i:09d}.jpg\n" for i in range(start, stop))


def manifest_input(work: Path, count: int) -> Path:
    """A folder of two text manifests (halves ``a`` and ``b``) listing ``count`` URIs of missing files."""
    folder = work / "inputs" / f"manifest-{count}"
    if not (folder / "b.txt").exists():
        folder.mkdir(parents=True, exist_ok=True)
        prefix = str(work / "missing")
        with (folder / "a.txt").open("w") as f:
            for start in range(0, count // 2, 1_000_000):
                f.write(missing_uris(start, min(count // 2, start + 1_000_000), prefix))
        with (folder / "b.txt.tmp").open("w") as f:
            for start in range(count // 2, count, 1_000_000):
                f.write(missing_uris(start, min(count, start + 1_000_000), prefix))
        (folder / "b.txt.tmp").rename(folder / "b.txt")
    return folder


def file_names(count: int) -> list[str]:
    return [f"d{i // 1000:05d}/img_{i:09d}.jpg" for i in range(count)]


def files_input(work: Path, count: int) -> Path:
    """A folder of ``count`` empty image files, 1,000 to a sub-folder (each is an error row: nothing to decode)."""
    folder = work / "inputs" / f"files-{count}"
    done = folder.with_suffix(".complete")
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        for i, name in enumerate(file_names(count)):
            path = folder / name
            if i % 1000 == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        done.touch()
    return folder


def shard_bytes(samples: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for j in range(samples):
            info = tarfile.TarInfo(f"s{j:05d}.jpg")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    return buffer.getvalue()


def shard_names(count: int) -> list[str]:
    return [f"d{i // 1000:04d}/{i:07d}.tar" for i in range(count)]


def shard_input(work: Path, count: int, samples: int) -> Path:
    """``count`` shards of ``samples`` one-byte members each: hard links to one tar file per 1,000 (a file may
    have at most 65,000 links on ext4)."""
    folder = work / "inputs" / f"shards-{count}x{samples}"
    done = folder.with_suffix(".complete")
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        data = shard_bytes(samples)
        for name in shard_names(count):
            path = folder / name
            if name.endswith("000.tar"):
                path.parent.mkdir(parents=True, exist_ok=True)
                original = path.parent / "_original"
                original.write_bytes(data)
            os.link(original, path)
        done.touch()
    return folder


# ---------------------------------------------------------------- a run with half of it written


def write_labeled_half(output: Path, uris: list[str], finished_inputs: list[str], samples: int) -> None:
    """Turns ``output``'s one (interrupted, empty) run into one holding error rows for ``uris``, as a killed run
    leaves it; where the job records the inputs it read to their end, records ``finished_inputs`` as such."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mnasnet_batch.inputs import webdataset
    from mnasnet_batch.model.postprocess import OUTPUT_SCHEMA

    (run,) = output.glob("run=*")
    for i in range(0, len(uris), PART_ROWS):
        chunk = uris[i : i + PART_ROWS]
        columns = {"uri": chunk, "status": ["error"] * len(chunk), "error": ["FileNotFoundError: bench"] * len(chunk)}
        table = pa.table({f.name: columns.get(f.name, [None] * len(chunk)) for f in OUTPUT_SCHEMA}, OUTPUT_SCHEMA)
        pq.write_table(table, run / f"part-bench{i // PART_ROWS:06d}.parquet")
    record_finished = getattr(webdataset, "record_finished", None)
    if record_finished is not None:
        from mnasnet_batch.storage import Storage

        for uri in finished_inputs:
            record_finished(str(run), uri, samples, Storage())


def mark_finished(output: Path) -> None:
    """Records the output's run as succeeded, as a completed run leaves it."""
    (run,) = output.glob("run=*")
    for path in (output / "_run.json", run / "_run.json"):
        record = json.loads(path.read_text())
        record["status"] = "succeeded"
        path.write_text(json.dumps(record))
    (output / "_SUCCESS").write_text(record["run_id"])


# ---------------------------------------------------------------- cases


def job_argv(inputs: Path, output: Path, weights: Path, *extra: str) -> list[str]:
    return ["--input", str(inputs), "--output", str(output), "--weights", str(weights), *SETTINGS, *extra]


def cases(
    name: str, inputs: Path, images: int, half: list[str], finished: list[str], samples: int, args, weights: Path
) -> list[dict]:
    """The fresh, resume and incremental cases of one input (see the module docstring)."""
    work = Path(args.work)
    output = work / "out" / name
    shutil.rmtree(output, ignore_errors=True)
    results = []

    def measure(case: str, argv: list[str], stop: bool) -> dict:
        uptime = os.getloadavg()
        log_path = work / "logs" / f"{name}, {case}.log".replace(" ", "_").replace(",", "")
        log_path.parent.mkdir(exist_ok=True)
        figures = run_driver(argv, stop, work, log_path, args.timeout)
        figures |= {"input": name, "images": images, "case": case, "load": [round(x, 1) for x in uptime]}
        if not stop:
            figures["rows_per_s"] = images / figures["whole_s"]
        print(json.dumps(figures), flush=True)
        results.append(figures)
        return figures

    argv = job_argv(inputs, output, weights)
    measure("fresh", argv, stop=True)
    write_labeled_half(output, half, finished, samples)
    measure("resume", argv, stop=True)
    mark_finished(output)
    measure("incremental", [*argv, "--mode", "incremental", "--run-id", "incremental"], stop=True)
    if images <= args.full_run_upto:
        shutil.rmtree(output)
        measure("fresh, to the end", argv, stop=False)
    shutil.rmtree(output, ignore_errors=True)
    return results


def random_weights(work: Path) -> Path:
    """A state_dict of a freshly initialised MnasNet: every row is an error row, the weights are never used."""
    import torch
    import torchvision

    path = work / "mnasnet0_5-random.pth"
    if not path.exists():
        torch.save(torchvision.models.mnasnet0_5().state_dict(), path)
    return path


def markdown(results: list[dict], command: str) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"{date}, {platform.node()} ({os.cpu_count()} cores), commit {git_commit()}:",
        "",
        "```bash",
        command,
        "```",
        "",
        "| input | images | case | Ray Data executing after | driver peak RSS | inputs read | rows dropped after "
        "reading | whole run | overhead rows/s | load (1, 5, 15 min) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        whole = f"{r['whole_s']:.0f} s" if "rows_per_s" in r else "–"
        rate = f"{r['rows_per_s']:,.0f}" if "rows_per_s" in r else "–"
        lines.append(
            f"| {r['input']} | {r['images']:,} | {r['case']} | {r.get('executing_after_s', float('nan')):.1f} s | "
            f"{r['peak_rss_mb'] / 1024:.2f} GB | {r.get('inputs', 0):,} | {r.get('dropped_after_reading', 0):,} | "
            f"{whole} | {rate} | {', '.join(str(x) for x in r['load'])} |"
        )
    return "\n".join(lines) + "\n"


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_driver":
        return driver(Path(argv[1]), argv[2] == "1", argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000", help="comma-separated N of manifest URIs")
    parser.add_argument("--files", default="", help="comma-separated N of loose (empty) image files")
    parser.add_argument("--shards", type=int, default=1000, help="WebDataset shards (0: none)")
    parser.add_argument("--samples", type=int, default=100, help="samples per shard")
    parser.add_argument("--full-run-upto", type=int, default=100_000, help="run to the end inputs up to this N")
    parser.add_argument("--work", default="/tmp/bench_scale", help="inputs (kept and reused) and outputs")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one job command may take")
    parser.add_argument("--json", help="write the figures here too")
    parser.add_argument("--markdown", help="append the figures as a table to this file (docs/benchmarks.md)")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    weights = random_weights(work)
    results = []
    for count in (int(n) for n in args.sizes.split(",") if n):
        inputs = manifest_input(work, count)
        half = (inputs / "a.txt").read_text().splitlines()
        results += cases(f"manifest of {count:,} URIs", inputs, count, half, [], 1, args, weights)
    for count in (int(n) for n in args.files.split(",") if n):
        inputs = files_input(work, count)
        half = [str(inputs / name) for name in file_names(count // 2)]
        results += cases(f"{count:,} loose files", inputs, count, half, [], 1, args, weights)
    if args.shards:
        inputs = shard_input(work, args.shards, args.samples)
        finished = [str(inputs / name) for name in shard_names(args.shards // 2)]
        members = [f"s{j:05d}.jpg" for j in range(args.samples)]
        half = [f"{shard}#{member}" for shard in finished for member in members]
        name = f"{args.shards:,} shards of {args.samples}"
        results += cases(name, inputs, args.shards * args.samples, half, finished, args.samples, args, weights)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results, "python benchmarks/bench_scale.py " + " ".join(argv))
    print(table)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
