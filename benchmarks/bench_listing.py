"""Listing and planning at corpus scale: N small images on local disk and on a moto S3 server.

For each backend it times the job's own steps on the driver: listing (``plan_input``), planning
(``pipeline.read`` + ``decode``: the Ray Data graph up to preprocessing), and the time from there to the first
preprocessed batch leaving a decode task (labeling has started), with the decode workers already started.
With ``--compare-ray`` it also times Ray Data's own path expansion (``read_binary_files``) to its first row
on the same objects.

    python benchmarks/bench_listing.py --objects 100000 --backends local,s3 --compare-ray local \
        --json bench_listing.json
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tiny_jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 80, 40)).save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def object_names(count: int) -> list[str]:
    # 1,000 objects per "directory", as sharded corpora are laid out.
    return [f"d{i // 1000:04d}/img_{i:08d}.jpg" for i in range(count)]


def serve_moto(names: list[str], data: bytes, ready) -> None:
    """Runs in a child process: moto's S3 server with bucket ``corpus`` already holding ``names``.

    The objects are put straight into moto's backend (100,000 PUTs over HTTP take many minutes on two
    cores); listing them, which is what is measured, goes through the S3 API like any client's.
    """
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    backend.create_bucket("corpus", "us-east-1")
    for name in names:
        backend.put_object("corpus", name, data)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    ready.put(f"http://{host}:{port}")
    threading.Event().wait()


def measure(uri: str, storage: dict, compare_ray: bool) -> dict[str, float]:
    import ray

    from mnasnet_batch import job as pipeline
    from mnasnet_batch.config import load_config
    from mnasnet_batch.decode.preprocess import PreprocessSpec
    from mnasnet_batch.inputs.layout import InputPlan
    from mnasnet_batch.inputs.listing import plan_input
    from mnasnet_batch.storage import Storage

    config = load_config(overrides=[{"input": {"uri": uri}, "output": {"uri": "unused"}, "storage": storage}])
    spec = PreprocessSpec.for_model(config.model.name, config.preprocess.max_pixels)
    storage_handle = Storage(config.storage)
    t0 = time.perf_counter()
    plan = plan_input(config.input, storage_handle)
    t1 = time.perf_counter()
    # Start-up of the decode workers (Python, torch, torchvision imports) is paid once per worker whatever
    # the input; a warm-up over one image, not timed, takes it out of the figures, which are about the input.
    first = InputPlan(plan.layout, plan.uris[:1])
    pipeline.decode(pipeline.read(config, first, None), config, spec).take_all()
    t2 = time.perf_counter()
    dataset = pipeline.decode(pipeline.read(config, plan, None), config, spec)
    t3 = time.perf_counter()
    batch = next(iter(dataset.iter_batches(batch_size=None, batch_format="numpy")))
    t4 = time.perf_counter()
    assert not any(batch["error"]), batch["error"][:3]
    figures = {
        "objects": len(plan.uris),
        "listing_s": t1 - t0,
        "planning_s": t3 - t2,
        "to_first_batch_s": t4 - t3,
    }
    if compare_ray:
        filesystem, path = storage_handle.pyarrow_filesystem(uri)
        t5 = time.perf_counter()
        ray_dataset = ray.data.read_binary_files(path, filesystem=filesystem)
        next(iter(ray_dataset.iter_rows()))
        figures["ray_read_binary_files_to_first_row_s"] = time.perf_counter() - t5
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--backends", default="local,s3", help="comma-separated: local, s3")
    parser.add_argument(
        "--compare-ray", default="", help="backends on which to also time ray.data.read_binary_files, e.g. local"
    )
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args(argv)

    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    data = tiny_jpeg()
    names = object_names(args.objects)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "local" in args.backends:
            root = Path(tmp) / "corpus"
            t0 = time.perf_counter()
            for i, name in enumerate(names):
                path = root / name
                if i % 1000 == 0:
                    path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            print(f"local: wrote {len(names)} files in {time.perf_counter() - t0:.1f} s", flush=True)
            results["local"] = measure(str(root), {}, "local" in args.compare_ray)
            print("local:", json.dumps(results["local"]), flush=True)
        if "s3" in args.backends:
            context = multiprocessing.get_context("spawn")
            ready = context.Queue()
            t0 = time.perf_counter()
            server = context.Process(target=serve_moto, args=(names, data, ready), daemon=True)
            server.start()
            try:
                endpoint = ready.get(timeout=1800)
                print(f"s3: moto holds {len(names)} objects after {time.perf_counter() - t0:.1f} s", flush=True)
                storage = {"endpoint_url": endpoint, "options": {"key": "bench", "secret": "bench"}}
                results["s3"] = measure("s3://corpus/", storage, "s3" in args.compare_ray)
                print("s3:", json.dumps(results["s3"]), flush=True)
            finally:
                server.terminate()
                server.join(timeout=30)
    ray.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
