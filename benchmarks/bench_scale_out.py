"""Scale-out from zero: images/s against time as Ray's autoscaler adds nodes (0 to ``--max-workers``), and the seconds
from a node joining to its first task.

A head of 0 CPUs under Ray's own autoscaler with its fake multi-node provider (tests/autoscaling.py: worker nodes of
``--node-cpus`` CPUs started as local processes, min 0, max ``--max-workers``; autoscaler v2 unless ``--v1``). The
job is submitted with ``conf/cpu-cluster.yaml`` and no setting but ``output.part_interval_s=2`` (a Parquet part at
least every 2 s), over ``--images`` photo crops. The parts' rows and times give the images labeled against time, and
Ray's state API each worker node's start and the start of the first task or actor method that ran on it.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_scale_out.py --images 3000 --json bench_scale_out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import support  # noqa: E402
from tests.autoscaling import autoscaling_cluster  # noqa: E402
from tests.cluster import checkout_copy, submit_job, wait_job  # noqa: E402


def timeline(output: Path, joined_s: list[float], start_s: float, window_s: float) -> list[dict]:
    """Images labeled (the rows of the parts written by then) and worker nodes alive (``joined_s``: each one's
    start) against seconds since ``start_s`` (the submission), with the rate over the last ``window_s``."""
    parts = sorted((path.stat().st_mtime, pq.ParquetFile(path).metadata.num_rows) for path in output.rglob("*.parquet"))
    points, labeled = [], 0
    for written, rows in parts:
        labeled += rows
        workers = sum(joined <= written for joined in joined_s)
        points.append({"t": written, "images": labeled, "workers": workers})
    for point in points:
        earlier = [p for p in points if point["t"] - window_s <= p["t"] < point["t"]]
        first = earlier[0] if earlier else point
        span = point["t"] - first["t"]
        point["images_per_s"] = round((point["images"] - first["images"]) / span, 1) if span else 0.0
    return [{**point, "t": round(point["t"] - start_s, 1)} for point in points]


def first_work(cluster, job_id: str) -> list[dict]:
    """Each worker node: when it started, and the seconds to the first of this job's tasks (or actor tasks) that
    started on it."""
    tasks = cluster.state("tasks", job_id=job_id)
    nodes = []
    for node in cluster.state("nodes"):
        if node["is_head_node"]:
            continue
        starts = [t["start_time_ms"] for t in tasks if t.get("node_id") == node["node_id"] and t.get("start_time_ms")]
        joined_ms = node.get("start_time_ms") or 0
        nodes.append(
            {
                "node": node["node_id"][-5:],
                "joined_ms": joined_ms,
                "first_task_s": round((min(starts) - joined_ms) / 1000, 1) if starts else None,
                "tasks": len(starts),
            }
        )
    return sorted(nodes, key=lambda node: node["joined_ms"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--long-side", type=int, default=500, help="photo crops' long side in pixels")
    parser.add_argument("--max-workers", type=int, default=3)
    parser.add_argument("--node-cpus", type=int, default=1)
    parser.add_argument("--v1", action="store_true", help="autoscaler v1 (default: v2)")
    parser.add_argument("--window-s", type=float, default=30.0, help="the rate is taken over this many seconds")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    work = Path(__import__("tempfile").mkdtemp(prefix="scale-out-"))
    images = support.write_corpus(work / "images", args.images, seed=5, long_side=args.long_side)
    weights = work / "weights.pth"
    weights.write_bytes(support.checkpoint_bytes(support.make_model("mnasnet0_5")))
    worker = {"CPU": args.node_cpus, "memory": 3 * 2**30}
    with autoscaling_cluster(worker, args.max_workers, v2=not args.v1) as cluster:
        submitted, submitted_at = time.monotonic(), time.time()
        submission_id = submit_job(
            cluster,
            checkout_copy(cluster),
            *["--runtime-env", "conf/runtime_env.yaml", "--"],
            *["python", "jobs/label_images.py", "--config", "conf/cpu-cluster.yaml"],
            *support.job_argv(images[0].parent, work / "labels", weights, "output.part_interval_s=2"),
        )
        job, _logs = wait_job(cluster, submission_id, timeout_s=1800)
        seconds = time.monotonic() - submitted
        nodes = first_work(cluster, job["job_id"])
    joined = [node["joined_ms"] / 1000 for node in nodes]
    points = timeline(work / "labels", joined, submitted_at, args.window_s)
    result = {
        "machine": platform.node(),
        "autoscaler": "v1" if args.v1 else "v2",
        "images": args.images,
        "long_side": args.long_side,
        "worker_type": worker,
        "max_workers": args.max_workers,
        "submission_to_succeeded_s": round(seconds, 1),
        "nodes": nodes,
        "timeline": points,
    }
    for point in points[:: max(1, len(points) // 40)]:
        t, workers, labeled, rate = point["t"], point["workers"], point["images"], point["images_per_s"]
        print(f"t={t:6.1f} s  workers={workers}  images={labeled:6d}  {rate} images/s")
    for node in nodes:
        at = round(node["joined_ms"] / 1000 - submitted_at, 1)
        print(f"node …{node['node']}: joined {at} s after submission, its first task {node['first_task_s']} s later")
    print(f"{args.images} images, submission to SUCCEEDED {seconds:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
