"""The labeling rate from S3 under faults: a moto server on 127.0.0.1 behind the fault proxy (tests/faultproxy.py).

N small JPEGs are put in a bucket; the job reads them through the proxy, output local, once per scenario: no
faults; 20 % of object GETs answered 503 SlowDown; +80 ms on every request; 10 % of GETs reset mid-body. Each
command runs as users run it, one after another in this invocation, so the rates compare; all of them on one
local Ray that this script starts (and starts again while Ray's 30 s start-up bound fails on a loaded machine),
so that what is measured is labeling, not Ray's start.
Printed per scenario: the job's own `labeling R images/s (first batch to last)`, its ratio to the clean run's,
the error rows, and what the proxy did.

    python benchmarks/bench_faults.py --images 2000 --dir /tmp/bench_faults --json bench_faults.json

``--root`` runs another checkout's job (its jobs/label_images.py, with ``--python``), to measure a commit before
this change against the same server and proxy.
"""

from __future__ import annotations

import argparse
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

BUCKET = "bench-faults"
CREDENTIALS = {"key": "testing", "secret": "testing"}
# Tries at starting the local Ray, whose start-up bound (30 s, fixed in Ray) a loaded machine can miss.
STARTS = 5
# (name, fault kind, share of GETs, added latency in seconds)
SCENARIOS = [
    ("clean", None, 0.0, 0.0),
    ("503 SlowDown on 20 % of GETs", "503", 0.2, 0.0),
    ("+80 ms on every request", None, 0.0, 0.08),
    ("10 % of GETs reset mid-body", "reset", 0.1, 0.0),
]


def label(root: Path, python: str, endpoint: str, output: Path, weights: Path, address: str) -> dict:
    """Runs the job once through ``endpoint``; returns its rate, error rows and wall time."""
    argv = [python, str(root / "jobs" / "label_images.py"), "--input", f"s3://{BUCKET}/images/"]
    argv += ["--output", str(output), "--weights", str(weights), "--set", f"storage.endpoint_url={endpoint}"]
    argv += ["--set", f"storage.options={json.dumps(CREDENTIALS)}"]
    environment = {**os.environ, "RAY_ADDRESS": address}
    started = time.time()
    result = subprocess.run(argv, env=environment, capture_output=True, text=True, cwd=root)
    wall = time.time() - started
    if result.returncode != 0:
        raise SystemExit(f"the job failed:\n{result.stderr[-3000:]}")
    summary = result.stdout.strip().splitlines()[-1]
    rate = float(re.search(r"labeling ([0-9.]+) images/s", summary).group(1))
    errors = int(re.search(r"\((\d+) errors", summary).group(1))
    return {"rate": rate, "errors": errors, "wall_s": round(wall, 1), "summary": summary}


def start_ray(temp_dir: Path) -> str:
    """Starts a local Ray of 2 CPUs for the jobs to join; returns its address."""
    import ray

    for attempt in range(1, STARTS + 1):
        try:
            context = ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(temp_dir))
            return context.address_info["gcs_address"]
        except Exception as exc:
            print(f"Ray's start failed ({exc}); try {attempt} of {STARTS}", flush=True)
            ray.shutdown()
    raise SystemExit("Ray did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench_faults"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose job runs (default: this one)")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs it (its venv's)")
    parser.add_argument("--seed", type=int, default=0, help="which GETs get a fault (faultproxy.share_of_gets)")
    args = parser.parse_args()
    from moto.server import ThreadedMotoServer

    from mnasnet_batch.config import StorageConfig
    from mnasnet_batch.storage import Storage
    from tests import support
    from tests.faultproxy import FaultProxy, share_of_gets

    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    weights = args.dir / "weights.pth"
    weights.write_bytes(support.checkpoint_bytes(support.make_model("mnasnet0_5")))
    address = start_ray(args.dir / "ray")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    upstream = f"http://{host}:{port}"
    try:
        fs, _ = Storage(StorageConfig(endpoint_url=upstream, options=CREDENTIALS)).filesystem(f"s3://{BUCKET}")
        fs.mkdir(BUCKET)
        for path in support.write_corpus(args.dir / "corpus", args.images, long_side=400, png_every=0):
            fs.pipe(f"{BUCKET}/images/{path.name}", path.read_bytes())
        results = []
        for i, (name, kind, share, latency) in enumerate(SCENARIOS):
            fault = share_of_gets(kind, share, args.seed) if kind else None
            with FaultProxy(upstream, fault, latency_s=latency) as proxy:
                result = label(args.root, args.python, proxy.url, args.dir / f"out{i}", weights, address)
            result |= {"scenario": name, "gets": sum(proxy.gets.values()), "faults": dict(proxy.faults)}
            result["of_clean"] = round(result["rate"] / results[0]["rate"], 2) if results else 1.0
            results.append(result)
            print(json.dumps(result), flush=True)
    finally:
        server.stop()
        import ray

        ray.shutdown()
    if args.json:
        record = {"images": args.images, "root": str(args.root), "load": os.getloadavg(), "runs": results}
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
