"""Losing the model actor's node: how long a `ray job submit` run takes with and without it, and what its log says.

A three-node `ray start` cluster on loopback (tests/cluster.py: token authentication, each node in its own session
and temp dir): a head with the driver and decoding, and two worker nodes that declare one GPU each (torch finds
none and runs the model on the CPU), so the one model actor runs on a worker node and never on the driver's. For
each case a fresh cluster labels ``--images`` photos into ``--parts`` Parquet parts with the GPU profile; in the
``node lost`` cases the node hosting the model actor is SIGKILLed (every process of it at once, as when a machine
is lost) once ``--kill-after`` parts are written. Each case reports the seconds from submission to SUCCEEDED and,
after the kill: until the GCS marks the node dead, until a new model actor is alive, until the job ends; whether
every image has exactly one row, and the job log's lines by origin.

The ``default profile`` cases run the embedded default profile instead (no ``--config``, no ``compute.*``
setting) on a head with no CPUs and two workers of 2 CPUs, the cluster where a restarted actor once took the whole
node left: a job that has not ended ``--give-up-s`` seconds after the kill is recorded as stalled, with its last
progress line, and stopped.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_node_loss.py --images 2000 --parts 20 --kill-after 3 \\
        --json bench_node_loss.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import support  # noqa: E402
from tests.cluster import checkout_copy, profile_health_checks, running_cluster, submit_job, wait_job  # noqa: E402

# What the GPU profile's actor asks for, cut to fit a worker node of this cluster (1 CPU, 1 "GPU").
SETTINGS = (
    "compute.max_actors=1",
    "compute.initial_actors=1",
    "compute.actor_cpus=1",
    "compute.actor_memory_gb=1",
    "compute.batch_size=32",
    "preprocess.batch_size=32",
    "progress.interval_s=5",
)


def count_parts(output: Path) -> int:
    return len(list(output.glob("run=*/part-*.parquet")))


def model_actors(cluster, job_id: str) -> list[dict]:
    actors = cluster.state("actors", job_id=job_id)
    return [a for a in actors if "MapBatches(Predictor)" in a["repr_name"] and a["state"] == "ALIVE"]


def line_origins(logs: str) -> dict[str, int]:
    """The job log's lines by origin: the job's own (its loggers, summary), Ray's raylets and core workers
    (``(raylet)`` lines, C++ ``[... I ...]`` lines), workers' other output, and the rest."""
    origins = {"job": 0, "raylet or core worker": 0, "worker output": 0, "other": 0}
    for line in logs.splitlines():
        if " mnasnet_batch." in line or line.startswith(("labeled ", "mnasnet-batch ")):
            origins["job"] += 1
        elif line.startswith("(raylet") or (line.startswith("[") and "] " in line and ".cc:" in line):
            origins["raylet or core worker"] += 1
        elif line.startswith("("):
            origins["worker output"] += 1
        else:
            origins["other"] += 1
    return origins


def stalled(cluster, submission_id: str, after_s: float) -> str | None:
    """Waits up to ``after_s`` for the job to end; if it has not, stops it and returns its last progress line."""
    deadline = time.monotonic() + after_s
    while time.monotonic() < deadline:
        if cluster.get(f"/api/jobs/{submission_id}")["status"] not in ("PENDING", "RUNNING"):
            return None
        time.sleep(1)
    logs = cluster.get(f"/api/jobs/{submission_id}/logs")["logs"]
    subprocess.run(["ray", "job", "stop", "--address", cluster.url, submission_id], env=cluster.env, check=False)
    return next((line for line in reversed(logs.splitlines()) if "progress: " in line), "no progress line")


def run_case(
    name: str,
    images: list[Path],
    weights: Path,
    args: argparse.Namespace,
    kill_after: int | None,
    head_env: dict,
    default_profile: bool = False,
):
    """One job on a fresh cluster; returns its figures."""
    rows_per_file = -(-len(images) // args.parts)
    if default_profile:  # a head with no CPUs, two workers of 2; the embedded profile, nothing of compute.* set
        shape, profile, settings = (0, "--num-cpus", "2"), [], ("progress.interval_s=5",)
    else:
        shape, profile, settings = (
            (1, "--num-cpus", "1", "--num-gpus", "1"),
            ["--config", "conf/gpu-cluster.yaml"],
            SETTINGS,
        )
    with running_cluster(*shape, workers=2, head_env=head_env) as cluster:
        checkout = checkout_copy(cluster)
        output = cluster.root / "labels"
        started = time.monotonic()
        submission_id = submit_job(
            cluster,
            checkout,
            *["--runtime-env", "conf/runtime_env.yaml", "--", "python", "jobs/label_images.py", *profile],
            *["--input", str(images[0].parent), "--output", str(output), "--weights", str(weights)],
            *[arg for setting in (*settings, f"output.rows_per_file={rows_per_file}") for arg in ("--set", setting)],
        )
        figures: dict[str, object] = {"case": name, "health_check": head_env or "Ray's defaults"}
        if kill_after is not None:
            job_id = None
            while True:
                job = cluster.get(f"/api/jobs/{submission_id}")
                if job["status"] not in ("PENDING", "RUNNING"):
                    raise SystemExit(f"{name}: the job ended ({job['status']}) before {kill_after} parts were written")
                job_id = job_id or job.get("job_id")
                written = count_parts(output)
                if job_id and written >= kill_after:
                    actors = model_actors(cluster, job_id)
                    if actors:
                        break
                time.sleep(0.2)
            victim = cluster.node_of(actors[0]["pid"])
            node_id = actors[0]["node_id"]
            cluster.kill_node(victim)
            killed = time.monotonic()
            figures.update(killed_after_s=round(killed - started, 1), parts_at_kill=written, node=victim)
            while "node_dead_after_kill_s" not in figures or "new_actor_after_kill_s" not in figures:
                if "node_dead_after_kill_s" not in figures:
                    states = {n["node_id"]: n["state"] for n in cluster.state("nodes")}
                    if states.get(node_id) == "DEAD":
                        figures["node_dead_after_kill_s"] = round(time.monotonic() - killed, 1)
                if "new_actor_after_kill_s" not in figures:
                    if any(a["node_id"] != node_id for a in model_actors(cluster, job_id)):
                        figures["new_actor_after_kill_s"] = round(time.monotonic() - killed, 1)
                if cluster.get(f"/api/jobs/{submission_id}")["status"] not in ("PENDING", "RUNNING"):
                    break
                time.sleep(0.5)
        if default_profile and kill_after is not None:
            last = stalled(cluster, submission_id, args.give_up_s)
            if last is not None:
                figures.update(stalled_after_kill_s=args.give_up_s, last_progress=last, parts=count_parts(output))
                return figures
        job, logs = wait_job(cluster, submission_id, timeout_s=900)
        ended = time.monotonic()
        figures["submission_to_succeeded_s"] = round(ended - started, 1)
        if kill_after is not None:
            figures["job_end_after_kill_s"] = round(ended - killed, 1)
        import pyarrow.dataset as pads

        uris = pads.dataset(output, format="parquet").to_table(columns=["uri"])["uri"].to_pylist()
        figures["rows"] = len(uris)
        figures["every_image_exactly_once"] = sorted(uris) == sorted(str(p) for p in images)
        figures["parts"] = count_parts(output)
        figures["log_lines"] = line_origins(logs)
        figures["log_lines_about_the_loss"] = [line for line in logs.splitlines() if " lost: " in line]
        figures["plan"] = next((line.split(": ", 1)[-1] for line in logs.splitlines() if "model actors (" in line), "")
        if args.keep_logs:
            kept = Path(args.keep_logs) / name.replace(" ", "_").replace(",", "")
            shutil.rmtree(kept, ignore_errors=True)
            kept.mkdir(parents=True)
            (kept / "job.log").write_text(logs)
            for node in cluster.nodes:
                logs_dir = cluster.root / node / "session_latest" / "logs"
                shutil.copytree(logs_dir, kept / node, ignore_dangling_symlinks=True)
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--parts", type=int, default=20)
    parser.add_argument("--kill-after", type=int, default=3, help="parts written when the node is killed")
    parser.add_argument(
        "--cases", default="no loss,node lost,node lost (profile health checks)", help="comma-separated"
    )
    parser.add_argument("--give-up-s", type=float, default=600, help="default profile: a stall after the kill")
    parser.add_argument("--dir", default="/tmp/bench_node_loss", help="where the corpus is made (kept, reused)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--keep-logs", help="copy each case's job log and the nodes' Ray logs under this folder")
    args = parser.parse_args()
    work = Path(args.dir)
    images = sorted((work / f"images-{args.images}").glob("*.*"))
    if len(images) != args.images:
        images = support.write_corpus(work / f"images-{args.images}", args.images, seed=11)
    weights = work / "weights.pth"
    if not weights.exists():
        weights.write_bytes(support.checkpoint_bytes(support.make_model()))
    cases = {
        "no loss": (None, {}, False),
        "node lost": (args.kill_after, {}, False),
        "node lost (profile health checks)": (args.kill_after, profile_health_checks(), False),
        "default profile no loss": (None, profile_health_checks(), True),
        "default profile node lost": (args.kill_after, profile_health_checks(), True),
    }
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node()} {os.cpu_count()} CPUs",
        "load_average_at_start": os.getloadavg(),
        "command": " ".join(sys.argv),
        "cases": [],
    }
    for name in args.cases.split(","):
        kill_after, head_env, default_profile = cases[name.strip()]
        figures = run_case(name.strip(), images, weights, args, kill_after, head_env, default_profile)
        print(json.dumps(figures), flush=True)
        results["cases"].append(figures)
    results["load_average_at_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
