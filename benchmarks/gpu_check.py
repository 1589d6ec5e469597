"""GPU check without Ray: parity of the device paths and per-stage throughput of the model actor on one GPU.

The GPU machines this project is lent for a few minutes have torch and torchvision but not Ray, so this runs
the package's own stages (Pillow decode on a process pool as the CPU tasks would, ``Predictor`` as the actor
would, ``write_part``) in one process. It measures:

- parity: nvJPEG decode + exact resize vs Pillow (grey levels), CUDA fp32 vs CPU fp32, fp16/bf16 vs fp32;
- throughput of each stage: Pillow decode on all CPU cores, GPU decode + resize, the model alone, the write;
- end to end, both ``preprocess.decode_on`` settings, as the actor runs them.

Usage (prepare the inputs here, run there)::

    python benchmarks/gpu_check.py prepare --dir .gpu_check       # corpus + fixture checkpoints
    python benchmarks/gpu_check.py run --dir .gpu_check --out OUT  # on the GPU machine
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = ("mnasnet1_0", "mnasnet0_5")
# Actor calls profiled per end-to-end setting: enough to average over images of different sizes, few enough
# that the profiler's own overhead stays a few seconds.
PROFILED_BATCHES = 8


def prepare(directory: Path, images: int) -> None:
    import torch

    from tests import support

    support.write_corpus(directory / "corpus", images, seed=11, png_every=0)
    for name in MODELS:
        torch.save(support.make_model(name).state_dict(), directory / f"fixture_{name}.pth")


def _preprocess_chunk(args):
    """What the CPU tasks hand the model actor: read batches, decoded unless the actor decodes them."""
    from mnasnet_batch.decode.preprocess import decode_batch
    from mnasnet_batch.inputs.layout import encoded_batch

    uris, contents, spec = args
    batch = encoded_batch(uris, contents)
    return batch if spec.decode_on == "actor" else decode_batch(batch, spec)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def cycle(contents: list[bytes], count: int) -> list[bytes]:
    return [contents[i % len(contents)] for i in range(count)]


def chunks(contents: list[bytes], size: int, spec):
    import numpy as np

    for start in range(0, len(contents), size):
        part = contents[start : start + size]
        yield np.asarray([f"img{start + i}" for i in range(len(part))], dtype=object), part, spec


def run(directory: Path, out: Path, images: int, budget_s: float, device_name: str, skip: tuple[str, ...] = ()) -> dict:
    import numpy as np

    from mnasnet_batch.decode.preprocess import PreprocessSpec

    started = time.monotonic()
    results: dict = {"python": platform.python_version(), "cpus": os.cpu_count()}
    contents = [p.read_bytes() for p in sorted((directory / "corpus").glob("*.jpg"))]
    spec = PreprocessSpec.for_model("mnasnet1_0", max_pixels=10**9)
    actor_spec = PreprocessSpec.for_model("mnasnet1_0", max_pixels=10**9, decode_on="actor")
    stream = cycle(contents, images)
    # The pool forks before CUDA is initialised: a forked CUDA context is unusable.
    pool = multiprocessing.get_context("fork").Pool(os.cpu_count(), initializer=_init_worker)
    pool.map(_preprocess_chunk, list(chunks(contents[:64], 16, spec)))  # warm the workers' imports
    t = time.perf_counter()
    pool.map(_preprocess_chunk, list(chunks(stream[:4000], 64, spec)))
    results["cpu_pillow_decode_img_s"] = 4000 / (time.perf_counter() - t)
    print(json.dumps(results), flush=True)

    import pyarrow as pa
    import torch

    from mnasnet_batch.decode.device_preprocess import decode_batch_on_device, decode_crops, resize_crops
    from mnasnet_batch.decode.preprocess import decodable_on_device, preprocess_image
    from mnasnet_batch.model.postprocess import output_table
    from mnasnet_batch.model.predictor import Predictor
    from mnasnet_batch.model.weights import resolve_checkpoint
    from mnasnet_batch.outputs.folder import write_part

    cuda = torch.device(device_name)  # "cpu" only to try the script out on a machine without a GPU
    on_gpu = cuda.type == "cuda"
    precisions = ("fp32", "fp16", "bf16") if on_gpu else ("fp32", "bf16")
    # Stages and streams run in fp16 on a GPU; a CPU without bf16 instructions runs bf16 at 3 images/s, so a
    # try-out on CPU streams fp32 and finishes in minutes.
    stream_precision = "fp16" if on_gpu else "fp32"
    batch_sizes = (256, 512) if on_gpu else (16,)
    results.update(gpu=torch.cuda.get_device_name() if on_gpu else "none", torch=torch.__version__)
    torch.backends.cudnn.benchmark = True

    def sync_time(fn, repeat: int = 1) -> float:
        if on_gpu:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(repeat):
            fn()
        if on_gpu:
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / repeat

    # Parity: nvJPEG + exact resize vs Pillow.
    reference = np.stack([preprocess_image(c, spec) for c in contents])
    on_device = np.asarray([decodable_on_device(c, spec) for c in contents])
    crops, errors = decode_crops(contents, on_device, spec, cuda)
    difference = np.abs(crops.cpu().numpy().astype(int) - reference.astype(int))
    results["gpu_decode_parity"] = {
        "images": len(contents),
        "errors": sum(bool(e) for e in errors),
        "max_levels": int(difference.max()),
        "mean_levels": float(difference.mean()),
        "pixels_differing": float((difference > 0).mean()),
        "images_identical": int((difference.reshape(len(contents), -1).max(1) == 0).sum()),
    }
    decoded = torchvision_decode(contents, cuda)
    cpu_decoded = torchvision_decode(contents, torch.device("cpu"))
    same_size = [a.shape == b.shape for a, b in zip(decoded, cpu_decoded, strict=True)]
    results["nvjpeg_vs_libjpeg_max_levels"] = max(
        int((a.cpu().int() - b.int()).abs().max()) for a, b in zip(decoded, cpu_decoded, strict=True)
    )
    results["nvjpeg_same_sizes"] = all(same_size)
    exact = resize_crops(decoded, spec).cpu().numpy()
    results["gpu_resize_vs_pillow_on_nvjpeg_pixels_max_levels"] = int(
        np.abs(exact.astype(int) - np.stack([pillow_on(image, spec) for image in decoded]).astype(int)).max()
    )
    print(json.dumps(results), flush=True)

    # Model parity and precision, per model.
    for name in MODELS if "model" not in skip else ():
        checkpoint = resolve_checkpoint(name, str(directory / f"fixture_{name}.pth"))
        cpu_ids, cpu_scores = Predictor(checkpoint, 5, device="cpu", num_threads=os.cpu_count()).predict(reference)
        entry = {}
        fp32_scores = None
        for precision in precisions:
            predictor = Predictor(checkpoint, 5, device=device_name, precision=precision)
            ids, scores = predictor.predict(reference)
            fp32_scores = scores if precision == "fp32" else fp32_scores
            entry[precision] = {
                "top1_same_as_cpu_fp32": int((ids[:, 0] == cpu_ids[:, 0]).sum()),
                "top5_same_as_cpu_fp32": int((ids == cpu_ids).all(1).sum()),
                "max_score_diff_vs_cpu_fp32": float(np.abs(scores - cpu_scores).max()),
            }
            if precision == "fp32":
                gpu_ids, _ = predictor.predict(crops)
                entry["gpu_decoded_top1_same"] = int((gpu_ids[:, 0] == cpu_ids[:, 0]).sum())
        entry["images"] = len(contents)
        entry["cpu_top1_margin_min"] = float((cpu_scores[:, 0] - cpu_scores[:, 1]).min())
        results[f"parity_{name}"] = entry
        print(json.dumps({name: entry}), flush=True)

    # The model alone on crops already on the GPU.
    for name in MODELS if "model" not in skip else ():
        checkpoint = resolve_checkpoint(name, str(directory / f"fixture_{name}.pth"))
        for precision in precisions:
            predictor = Predictor(checkpoint, 5, device=device_name, precision=precision)
            for batch in batch_sizes:
                x = crops[torch.arange(batch) % len(contents)].contiguous()
                predictor.predict(x)
                seconds = sync_time(lambda x=x, predictor=predictor: predictor.predict(x), repeat=10)
                results[f"model_{name}_{precision}_b{batch}_img_s"] = batch / seconds
        print(json.dumps({k: round(v) for k, v in results.items() if k.startswith(f"model_{name}")}), flush=True)

    # GPU decode and resize, per stage, in batches of 256.
    batch_contents = cycle(contents, 256)
    torchvision_decode(batch_contents, cuda)
    results["gpu_nvjpeg_decode_b256_img_s"] = 256 / sync_time(lambda: torchvision_decode(batch_contents, cuda), 3)
    decoded256 = torchvision_decode(batch_contents, cuda)
    results["gpu_resize_crop_img_s"] = 256 / sync_time(lambda: resize_crops(decoded256, spec), 3)
    # torchvision's antialiased resize instead of the exact one (issues 15 and 19): its speed and its distance here.
    from resize_parity import library_crop

    def library_crops(images):
        return torch.stack([library_crop(image, spec, as_float=False) for image in images])

    results["gpu_library_resize_crop_img_s"] = 256 / sync_time(lambda: library_crops(decoded256), 3)
    results["gpu_library_resize_vs_exact_max_levels"] = int(
        (library_crops(decoded256).int() - resize_crops(decoded256, spec).int()).abs().max()
    )
    flags = np.ones(256, dtype=bool)
    results["gpu_decode_crops_b256_img_s"] = 256 / sync_time(lambda: decode_crops(batch_contents, flags, spec, cuda), 3)
    # Where an actor's time goes, per batch of 256 (decode_on=actor, fp16), each stage synchronised.
    checkpoint = resolve_checkpoint("mnasnet1_0", str(directory / "fixture_mnasnet1_0.pth"))
    predictor = Predictor(checkpoint, 5, device=device_name, precision=stream_precision, spec=actor_spec)
    stage_batch = 256 if on_gpu else 8
    batches = [
        _preprocess_chunk(args)
        for args in chunks(cycle(contents, stage_batch * (21 if on_gpu else 2)), stage_batch, actor_spec)
    ]
    stage_s = {"decode_on_device": 0.0, "model": 0.0, "output_table": 0.0, "whole_call": 0.0}
    for i, batch in enumerate(batches):
        seconds = {
            "decode_on_device": sync_time(lambda b=batch: decode_batch_on_device(b, actor_spec, cuda)),
            "model": sync_time(lambda: predictor.predict(crops[torch.arange(stage_batch) % len(contents)])),
            "whole_call": sync_time(lambda b=batch: predictor(b)),
        }
        ids, scores = predictor.predict(crops[torch.arange(stage_batch) % len(contents)])
        seconds["output_table"] = sync_time(
            lambda b=batch, ids=ids, scores=scores: output_table(
                b["uri"], b["error"], ids, scores, predictor.categories, "m", "w"
            )
        )
        if i:  # the first batch warms up
            stage_s = {k: v + seconds[k] for k, v in stage_s.items()}
    results[f"actor_stage_ms_per_batch_{stage_batch}"] = {
        k: round(1000 * v / (len(batches) - 1), 2) for k, v in stage_s.items()
    }
    print(json.dumps(results[f"actor_stage_ms_per_batch_{stage_batch}"]), flush=True)
    speeds = {k: round(v) for k, v in results.items() if k.startswith("gpu_") and k.endswith("img_s")}
    print(json.dumps(speeds), flush=True)

    # End to end as the actor runs it: CPU pool -> Predictor(batch) -> Parquet part, per decode_on setting.
    checkpoint = resolve_checkpoint("mnasnet1_0", str(directory / "fixture_mnasnet1_0.pth"))
    with tempfile.TemporaryDirectory() as scratch:
        settings = (
            ("actor", actor_spec, stream_precision),
            ("actor", actor_spec, "fp32"),
            ("workers", spec, stream_precision),
        )
        for decode_on, chunk_spec, precision in dict.fromkeys(settings):  # on a CPU the first two are one
            if time.monotonic() - started > budget_s:
                results[f"e2e_{decode_on}_{precision}"] = "skipped: out of time"
                continue
            predictor = Predictor(checkpoint, 5, device=device_name, precision=precision, spec=chunk_spec)
            predictor(_preprocess_chunk(next(chunks(contents[:64], 64, chunk_spec))))
            stages = {"wait_cpu": 0.0, "actor": 0.0, "write": 0.0}
            t0 = time.perf_counter()
            rows = 0
            pending = []  # tables waiting to fill a part, as output.rows_per_file would cut them
            batches = pool.imap(_preprocess_chunk, chunks(stream, 256, chunk_spec))
            while True:
                t = time.perf_counter()
                batch = next(batches, None)
                stages["wait_cpu"] += time.perf_counter() - t
                if batch is None:
                    break
                t = time.perf_counter()
                pending.append(predictor(batch))
                stages["actor"] += time.perf_counter() - t
                rows += pending[-1].num_rows
                if sum(table.num_rows for table in pending) >= 2560 or rows == len(stream):
                    t = time.perf_counter()
                    write_part(pa.concat_tables(pending), scratch)
                    pending = []
                    stages["write"] += time.perf_counter() - t
            wall = time.perf_counter() - t0
            results[f"e2e_{decode_on}_{precision}"] = {
                "images": rows,
                "img_s": rows / wall,
                "seconds": {k: round(v, 2) for k, v in stages.items()},
            }
            print(json.dumps({f"e2e_{decode_on}_{precision}": results[f"e2e_{decode_on}_{precision}"]}), flush=True)
            # Where a streamed actor call spends its time (one call on a repeated batch runs 2.4x faster).
            profiled = list(chunks(stream[: PROFILED_BATCHES * 256], 256, chunk_spec))
            batches = pool.map(_preprocess_chunk, profiled)
            profile_calls(predictor, batches, out / f"gpu_profile_{decode_on}_{precision}.txt")
    pool.close()

    # Several actors sharing the GPU (compute.actor_gpus < 1), each its own process as Ray would run them,
    # decoding on the GPU; the images are read before the clock starts.
    context = multiprocessing.get_context("spawn")
    for actors in (1, 2, 4):
        if time.monotonic() - started > budget_s:
            results[f"e2e_actor_{stream_precision}_{actors}_actors"] = "skipped: out of time"
            continue
        barrier, queue = context.Barrier(actors), context.Queue()
        args = (directory, device_name, stream_precision, images // actors, 256, barrier, queue)
        processes = [context.Process(target=_actor_process, args=args) for _ in range(actors)]
        for process in processes:
            process.start()
        done = [queue.get(timeout=300) for _ in processes]
        for process in processes:
            process.join()
        rows = sum(d[0] for d in done)
        wall = max(d[2] for d in done) - min(d[1] for d in done)
        results[f"e2e_actor_{stream_precision}_{actors}_actors"] = {"images": rows, "img_s": rows / wall}
        print(json.dumps({f"e2e_actor_{stream_precision}_{actors}_actors": rows / wall}), flush=True)
    results["total_s"] = time.monotonic() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    return results


def profile_calls(predictor, batches: list, path: Path) -> None:
    """Writes torch.profiler's tables (by device time, then by CPU time) for ``predictor`` called on ``batches``."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    sort_by = "self_cpu_time_total"
    if predictor.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        sort_by = "self_cuda_time_total"
    with torch.profiler.profile(activities=activities) as profile:
        for batch in batches:
            with torch.profiler.record_function("actor_call"):
                predictor(batch)
    averages = profile.key_averages()
    tables = [averages.table(sort_by=key, row_limit=30) for key in dict.fromkeys((sort_by, "self_cpu_time_total"))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{len(batches)} calls of {len(batches[0]['uri'])} images\n\n" + "\n\n".join(tables))
    print(f"profile: {path}", flush=True)


def _actor_process(directory, device_name, precision, count, batch_size, barrier, queue) -> None:
    """One model actor: decodes (on the device), classifies and writes ``count`` images after the barrier."""
    import pyarrow as pa

    from mnasnet_batch.decode.preprocess import PreprocessSpec
    from mnasnet_batch.model.predictor import Predictor
    from mnasnet_batch.model.weights import resolve_checkpoint
    from mnasnet_batch.outputs.folder import write_part

    spec = PreprocessSpec.for_model("mnasnet1_0", max_pixels=10**9, decode_on="actor")
    contents = cycle([p.read_bytes() for p in sorted((directory / "corpus").glob("*.jpg"))], count)
    batches = [_preprocess_chunk(args) for args in chunks(contents, batch_size, spec)]
    checkpoint = resolve_checkpoint("mnasnet1_0", str(directory / "fixture_mnasnet1_0.pth"))
    predictor = Predictor(checkpoint, 5, device=device_name, precision=precision, spec=spec)
    predictor(batches[0])
    with tempfile.TemporaryDirectory() as scratch:
        barrier.wait()
        start, rows, pending = time.time(), 0, []
        for batch in batches:
            pending.append(predictor(batch))
            rows += pending[-1].num_rows
            if len(pending) == 10 or rows == count:
                write_part(pa.concat_tables(pending), scratch)
                pending = []
        queue.put((rows, start, time.time()))


def torchvision_decode(contents: list[bytes], device) -> list:
    import torch
    import torchvision.io

    encoded = [torch.frombuffer(bytearray(c), dtype=torch.uint8) for c in contents]
    return list(torchvision.io.decode_jpeg(encoded, mode=torchvision.io.ImageReadMode.RGB, device=device))


def pillow_on(image, spec):
    """The Pillow path's resize and crop applied to already-decoded pixels (isolates the resize)."""
    import io

    import numpy as np
    from PIL import Image

    from mnasnet_batch.decode.preprocess import preprocess_image

    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(buffer, "PNG")
    return np.asarray(preprocess_image(buffer.getvalue(), spec))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("prepare", "run"))
    parser.add_argument("--dir", type=Path, default=Path(".gpu_check"))
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--images", type=int, default=None, help="prepare: corpus size (300); run: stream (20000)")
    parser.add_argument("--device", default="cuda", help="cpu: only to try the script out")
    parser.add_argument("--skip", nargs="*", default=(), choices=("model",), help="model: no model parity or speed")
    parser.add_argument("--budget-s", type=float, default=300.0, help="skip the end-to-end runs after this")
    args = parser.parse_args(argv)
    if args.action == "prepare":
        prepare(args.dir, args.images or 300)
    else:
        run(args.dir, args.out, args.images or 20_000, args.budget_s, args.device, tuple(args.skip))
    return 0


if __name__ == "__main__":
    sys.exit(main())
