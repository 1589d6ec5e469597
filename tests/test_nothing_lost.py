"""Every input exactly once: bad images, a killed model actor, a killed driver, incremental runs."""

import contextlib
import io
import json
import os
import re
import shutil
import signal
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from PIL import Image

from mnasnet_batch.cli import main
from mnasnet_batch.inputs import layout as sources
from mnasnet_batch.storage import Storage
from tests import support
from tests.support import (
    ROOT,
    SMALL_BATCHES,
    end_session,
    kill_session,
    many_images,
    poll,
    rows_by_uri,
    served_in_part,
    session_members,
)


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header for a huge greyscale image, with a few KB of data: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(8192))) + chunk(b"IEND", b"")
    )


def encode(image: Image.Image, format: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **params)
    return buffer.getvalue()


def bad_input_corpus(directory: Path, photos) -> dict[str, str]:
    """Writes every case of the 'Nothing lost' list beside good photos; returns file name -> expected status."""
    coffee, cat = photos["coffee"], photos["chelsea"]
    jpeg = encode(coffee, "JPEG", quality=90)
    rotated = Image.Exif()
    rotated[0x0112] = 6  # "rotate 90° clockwise to display"
    sixteen = Image.fromarray(np.asarray(coffee.convert("L"), dtype=np.uint16) * 257)
    rgba = cat.copy()
    rgba.putalpha(128)
    files = {
        "good_coffee.jpg": (jpeg, "ok"),
        "good_cat.png": (encode(cat, "PNG"), "ok"),
        "zero_bytes.jpg": (b"", "error"),
        "truncated.jpg": (jpeg[: len(jpeg) // 3], "error"),
        "random_bytes.jpg": (np.random.default_rng(0).bytes(5000), "error"),
        "html_error_page.jpg": (b"<!DOCTYPE html><html><body><h1>503 Service Unavailable</h1></body></html>", "error"),
        "bomb_40000x40000.png": (png_claiming(40000, 40000), "error"),
        "one_pixel.png": (encode(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"), "ok"),
        "extreme_4000x12.png": (encode(coffee.resize((4000, 12)), "PNG"), "ok"),
        "sixteen_bit.png": (encode(sixteen, "PNG"), "ok"),
        "cmyk.jpg": (encode(coffee.convert("CMYK"), "JPEG"), "ok"),
        "palette.png": (encode(cat.convert("P", palette=Image.ADAPTIVE), "PNG"), "ok"),
        "rgba.png": (encode(rgba, "PNG"), "ok"),
        "animated.gif": (encode(cat.convert("P"), "GIF", save_all=True, append_images=[coffee.convert("P")]), "ok"),
        "exif_rotated.jpg": (encode(coffee, "JPEG", exif=rotated), "ok"),
    }
    assert len(files["bomb_40000x40000.png"][0]) < 20_000
    for name, (data, _) in files.items():
        (directory / name).write_bytes(data)
    return {name: status for name, (_, status) in files.items()}



def test_bad_inputs_become_error_rows_and_the_job_succeeds(local_ray, photos, tmp_path, checkpoint_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    expected = bad_input_corpus(images, photos)
    output = tmp_path / "out"
    assert main(["--input", str(images), "--output", str(output), "--weights", str(checkpoint_path)]) == 0
    rows = rows_by_uri(output)
    assert len(rows) == len(expected)
    for name, status in expected.items():
        row = rows[str(images / name)]
        assert row["status"] == status, (name, row["error"])
        assert (row["error"] is None) == (status == "ok")
    assert "over preprocess.max_pixels" in rows[str(images / "bomb_40000x40000.png")]["error"]
    assert "truncated" in rows[str(images / "truncated.jpg")]["error"]
    line = capsys.readouterr().out
    assert "labeled 15 images (5 errors: OSError 1, UnidentifiedImageError 3, ValueError 1)" in line
    record = json.loads((output / "_run.json").read_text())
    assert record["status"] == "succeeded" and record["counts"]["error_kinds"]["UnidentifiedImageError"] == 3
    assert (output / "_SUCCESS").exists()


def test_file_deleted_between_listing_and_reading(local_ray, corpus, tmp_path, checkpoint_path):
    from mnasnet_batch import job as pipeline
    from mnasnet_batch.config import load_config, parse_override
    from mnasnet_batch.inputs.files import FilesLayout
    from mnasnet_batch.inputs.layout import InputPlan
    from mnasnet_batch.model.weights import resolve_checkpoint

    gone = tmp_path / "listed_then_deleted.jpg"
    config = load_config(overrides=[parse_override(f"output.uri={tmp_path / 'out'}")])
    run_uri = str(tmp_path / "out" / "run=x")
    os.makedirs(run_uri)
    storage = Storage(config.storage)
    inputs = InputPlan(FilesLayout(config.input, storage), [str(corpus[0]), str(gone)])
    pipeline.run(config, storage, resolve_checkpoint("mnasnet0_5", str(checkpoint_path)), inputs, run_uri)
    rows = rows_by_uri(Path(run_uri))
    assert rows[str(corpus[0])]["status"] == "ok"
    assert rows[str(gone)]["status"] == "error" and rows[str(gone)]["error"].startswith("FileNotFoundError")


def test_silent_urls_fifos_and_huge_files_in_a_manifest_are_error_rows(local_ray, corpus, tmp_path, checkpoint_path):
    shutil.copy(corpus[1], tmp_path / "local.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")
    with open(tmp_path / "huge.jpg", "wb") as f:
        f.truncate(20 * 2**20)  # sparse; over the 10 MB limit set below
    output = tmp_path / "out"
    result = {}
    with support.ImageServer({"/good.jpg": corpus[0].read_bytes()}) as server:
        listed = [server.url("/good.jpg"), server.url("/hang.jpg"), server.url("/missing.jpg")]
        listed += [str(tmp_path / name) for name in ("local.jpg", "pipe.jpg", "huge.jpg")]
        (tmp_path / "list.txt").write_text("\n".join(listed) + "\n")
        limits = ("storage.http_timeout_s=2", "storage.max_image_bytes=10000000")
        argv = support.job_argv(tmp_path / "list.txt", output, checkpoint_path, *limits)
        job = threading.Thread(target=lambda: result.setdefault("status", main(argv)), daemon=True)
        job.start()
        try:
            job.join(timeout=300)
        finally:
            support.unblock_fifo_readers(tmp_path / "pipe.jpg")
    assert result.get("status") == 0, "the job did not finish"
    rows = rows_by_uri(output)
    assert set(rows) == set(listed)
    assert [rows[uri]["status"] for uri in listed] == ["ok", "error", "error", "ok", "error", "error"]
    errors = [rows[uri]["error"] or "" for uri in listed]
    assert errors[1] == "TimeoutError: the server sent nothing for 2 s (storage.http_timeout_s=2)"
    assert errors[2].startswith("FileNotFoundError")
    assert errors[4].startswith("NotARegularFile") and "is a FIFO, not a regular file" in errors[4]
    assert errors[5] == "OverByteLimit: over the byte limit (20971520 bytes > storage.max_image_bytes=10000000)"


def ray_worker_pids(title: str) -> list[int]:
    """Our own Ray's processes whose title (as Ray sets it) contains ``title``.

    Only descendants of this process count: other Ray clusters on the machine are none of this test's business.
    """
    parents, titles = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                titles[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace")
            except (OSError, IndexError, ValueError):
                pass

    def ours(pid: int) -> bool:
        while pid > 1:
            if pid == os.getpid():
                return True
            pid = parents.get(pid, 0)
        return False

    return [pid for pid, text in titles.items() if title in text and ours(pid)]


def test_killed_model_actor_loses_and_duplicates_nothing(local_ray, corpus, tmp_path, checkpoint_path):
    images = sorted(many_images(tmp_path, corpus, 8).iterdir())  # 192 images
    output = tmp_path / "out"
    title = "MapWorker(MapBatches(Predictor))"
    # Earlier runs on this Ray may leave actors exiting; this run's actor is the one that was not there.
    earlier = set(ray_worker_pids(title))
    killed = []
    # The second half of the images is served only once the actor is killed: the run cannot end before.
    with served_in_part(images[0].parent, {p.name for p in images[:96]}) as (url, rest):
        manifest = manifest_of(images, url, tmp_path / "images.txt")
        argv = support.job_argv(manifest, output, checkpoint_path, *SMALL_BATCHES)

        def kill_the_actor():
            try:
                actors = poll(lambda: [p for p in ray_worker_pids(title) if p not in earlier], 240, "the model actor")
                os.kill(actors[0], signal.SIGKILL)
                killed.append(actors[0])
            finally:
                rest.set()

        killer = threading.Thread(target=kill_the_actor)
        killer.start()
        status = main(argv)
        killer.join()
    assert killed, "the model actor was not found"
    assert status == 0
    rows = rows_by_uri(output)
    assert set(rows) == {f"{url}/{p.name}" for p in images}
    assert all(r["status"] == "ok" for r in rows.values())
    assert (output / "_SUCCESS").exists()


def process_titles(pids: list[int]) -> list[str]:
    titles = []
    for pid in pids:
        with contextlib.suppress(OSError):
            titles.append(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace"))
    return titles


def test_a_sigkilled_drivers_local_ray_ends_with_it(corpus, tmp_path, checkpoint_path, job_process):
    images = many_images(tmp_path, corpus, 8)  # 192 images
    output = tmp_path / "out"
    job = job_process.start(support.job_argv(images, output, checkpoint_path, *SMALL_BATCHES))
    try:
        poll(lambda: list(output.glob("run=*/part-*.parquet")), 300, "the job's first part")
        os.kill(job.pid, signal.SIGKILL)  # the driver alone, as the OOM killer does
        job.wait(timeout=30)
        # Ray's own processes outlived such a driver by a minute or more, and started new workers meanwhile.
        deadline = time.monotonic() + 30
        while (left := session_members(job.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"still running 30 s after the driver was killed: {process_titles(left)}"
    finally:
        end_session(job.pid)


def test_killed_driver_then_same_command_finishes_the_rest(
    local_ray, corpus, tmp_path, checkpoint_path, capsys, job_process
):
    images = many_images(tmp_path, corpus, 8)  # 192 images
    output = tmp_path / "out"
    argv = support.job_argv(images, output, checkpoint_path, *SMALL_BATCHES)
    # The third part's publishing stalls, so the run is still going when it is killed, however fast the machine.
    hooks = support.replace_hook(tmp_path / "hooks", support.STALL_AFTER_TWO_PARTS)
    job = job_process.start(argv, env={"PYTHONPATH": os.pathsep.join([str(hooks), str(ROOT)])})
    try:
        poll(lambda: len(list(output.glob("run=*/part-*.parquet"))) >= 2, 180, "two written parts")
        assert job.poll() is None, "the run finished before it could be killed"
    finally:
        kill_session(job)
    before = {p.name: p.stat().st_mtime_ns for p in output.glob("run=*/part-*.parquet")}
    assert json.loads((output / "_run.json").read_text())["status"] == "running"
    assert not (output / "_SUCCESS").exists()
    rows_before = len(rows_by_uri(output))  # whatever is visible is whole and unique

    assert main(argv) == 0
    rows = rows_by_uri(output)
    assert set(rows) == {str(p) for p in images.iterdir()}
    # The parts written before the kill were kept as they were, not predicted again.
    assert {p.name: p.stat().st_mtime_ns for p in output.glob("run=*/part-*.parquet") if p.name in before} == before
    printed = capsys.readouterr().out
    assert f"{rows_before} from before the resume" in printed
    # Beside the command's whole time, the rate of labeling alone (Ray's start and the model's load left out).
    labeling = re.search(r"\) in ([0-9.]+) s, labeling ([0-9.]+) images/s \(first batch to last\)", printed)
    assert labeling and float(labeling.group(2)) > (len(rows) - rows_before) / float(labeling.group(1))
    assert len(list(output.glob("run=*"))) == 1 and (output / "_SUCCESS").exists()
    assert json.loads((output / "_run.json").read_text())["status"] == "succeeded"


def test_driver_killed_while_a_part_is_being_written(local_ray, corpus, tmp_path, checkpoint_path, job_process):
    # The first part's publishing rename stalls, so the kill lands while that Parquet file is being written.
    hooks = support.replace_hook(
        tmp_path / "hooks",
        "    if os.path.basename(str(src)).startswith('_inprogress-') and str(dst).endswith('.parquet'):\n"
        "        time.sleep(600)\n",
    )
    images = many_images(tmp_path, corpus, 1)
    output = tmp_path / "out"
    argv = support.job_argv(images, output, checkpoint_path, "output.rows_per_file=8", "compute.batch_size=8")
    pythonpath = os.pathsep.join([str(hooks), str(ROOT), os.environ.get("PYTHONPATH", "")])
    job = job_process.start(argv, env={"PYTHONPATH": pythonpath})
    try:
        poll(lambda: list(output.glob("run=*/_inprogress-*")), 180, "a part being written")
    finally:
        kill_session(job)
    assert not list(output.glob("run=*/part-*.parquet")), "no part may be visible before its write completes"
    assert pads.dataset(output, format="parquet").count_rows() == 0

    assert main(argv) == 0
    rows = rows_by_uri(output)
    assert set(rows) == {str(p) for p in images.iterdir()}
    assert not list(output.glob("run=*/_inprogress-*"))


def written_rows(output: Path) -> int:
    """Rows in the parts published under ``output`` (none while a part is being written)."""
    return sum(pq.read_metadata(part).num_rows for part in output.glob("run=*/part-*.parquet"))


def manifest_of(images, url: str, path: Path) -> Path:
    path.write_text("".join(f"{url}/{image.name}\n" for image in images))
    return path


# One image per model call, and parts far larger than the run. The held-back images answer only when the test lets
# them, which may take minutes on a loaded machine.
ONE_BY_ONE = (
    "compute.batch_size=1",
    "preprocess.batch_size=1",
    "output.rows_per_file=10000",
    "storage.http_timeout_s=600",
)


def first_read_tasks(images: list[Path]) -> set[str]:
    """The names of the images the first two read tasks read (blocks of 1 and 2 images with ONE_BY_ONE): served
    alone, they become 3 rows, as a read task that waits for an image holds back those it read before it."""
    _, end_of_second = sources.input_block_bounds(len(images), 1)[1]
    return {image.name for image in images[:end_of_second]}


def test_a_run_slower_than_its_parts_writes_them_on_time_and_a_stop_keeps_them(
    local_ray, corpus, tmp_path, checkpoint_path, capsys
):
    output = tmp_path / "out"
    with served_in_part(corpus[0].parent, first_read_tasks(corpus)) as (url, rest):
        manifest = manifest_of(corpus, url, tmp_path / "images.txt")
        argv = support.job_argv(manifest, output, checkpoint_path, *ONE_BY_ONE, "output.part_interval_s=1")
        stopped = []

        def stop_once_a_part_is_written():
            # Only 3 of 10,000 rows come: they are written because a part's first row waited 1 s.
            try:
                poll(lambda: written_rows(output) == 3, 120, "parts holding the 3 rows served")
                stopped.append(True)
                os.kill(os.getpid(), signal.SIGINT)
            finally:
                if not stopped:
                    rest.set()  # the job ends, and the test fails below

        stopper = threading.Thread(target=stop_once_a_part_is_written)
        stopper.start()
        status = main(argv)
        stopper.join()
        assert stopped, "the rows held back were not written"
        assert status == 130
        record = json.loads((output / "_run.json").read_text())
        assert record["status"] == "interrupted" and record["counts"]["labeled_this_attempt"] == 3
        before = {p.name: p.stat().st_mtime_ns for p in output.glob("run=*/part-*.parquet")}
        assert len(rows_by_uri(output)) == 3
        capsys.readouterr()

        rest.set()
        assert main(argv) == 0
    rows = rows_by_uri(output)
    assert set(rows) == {f"{url}/{p.name}" for p in corpus} and all(r["status"] == "ok" for r in rows.values())
    # The parts written before the stop were kept as they were; the resumed run labeled only the rest.
    assert {p.name: p.stat().st_mtime_ns for p in output.glob("run=*/part-*.parquet") if p.name in before} == before
    assert "3 from before the resume" in capsys.readouterr().out
    assert json.loads((output / "_run.json").read_text())["counts"]["labeled_this_attempt"] == 21


def test_a_stopped_run_writes_the_rows_it_labeled_before_a_part_is_due(
    local_ray, corpus, tmp_path, checkpoint_path, monkeypatch
):
    from mnasnet_batch import parts

    held = []
    add = parts.PartCutter.add

    def add_then_stop_at_three_rows(self, blocks, rows):
        add(self, blocks, rows)
        held.append(rows)
        if sum(held) == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(parts.PartCutter, "add", add_then_stop_at_three_rows)
    output = tmp_path / "out"
    with served_in_part(corpus[0].parent, first_read_tasks(corpus)) as (url, _):
        manifest = manifest_of(corpus, url, tmp_path / "images.txt")
        argv = support.job_argv(manifest, output, checkpoint_path, *ONE_BY_ONE, "output.part_interval_s=3600")
        assert main(argv) == 130
    record = json.loads((output / "_run.json").read_text())
    assert record["status"] == "interrupted" and record["counts"]["labeled_this_attempt"] == 3
    assert len(rows_by_uri(output)) == 3


def test_incremental_labels_only_new_images_and_modes_guard_the_output(
    local_ray, corpus, tmp_path, checkpoint_path, capsys
):
    images = tmp_path / "images"
    images.mkdir()
    for path in corpus[:10]:
        shutil.copy(path, images / path.name)
    output = tmp_path / "out"
    argv = support.job_argv(images, output, checkpoint_path)
    assert main(argv) == 0
    first = rows_by_uri(output)
    assert len(first) == 10
    capsys.readouterr()

    for path in corpus[10:16]:
        shutil.copy(path, images / path.name)
    assert main(argv) == 2
    assert "--mode incremental" in capsys.readouterr().err
    assert main([*argv, "--mode", "incremental", "--top-k", "3"]) == 2
    assert "different configuration (top_k differ)" in capsys.readouterr().err

    assert main([*argv, "--mode", "incremental", "--run-id", "nightly-2"]) == 0
    assert "labeled 6 images (0 errors)" in capsys.readouterr().out
    rows = rows_by_uri(output)
    assert set(rows) == {str(p) for p in images.iterdir()}
    assert {uri: rows[uri] for uri in first} == first
    assert (output / "run=nightly-2" / "_run.json").exists() and len(list(output.glob("run=*"))) == 2
    assert json.loads((output / "_run.json").read_text())["run_id"] == "nightly-2"

    assert main([*argv, "--mode", "incremental"]) == 0  # nothing new: an empty run, still complete
    assert "labeled 0 images" in capsys.readouterr().out
    assert len(rows_by_uri(output)) == 16

    (output / "keep.txt").write_text("a user's file")
    (output / "run=keepme").mkdir()
    (output / "run=keepme" / "photo.jpg").write_bytes(b"a user's photo")
    assert main([*argv, "--mode", "overwrite", "--top-k", "3"]) == 0
    rows = rows_by_uri(output)
    assert len(rows) == 16 and all(len(r["top_k_ids"]) == 3 for r in rows.values())
    assert len(list(output.glob("run=*/_run.json"))) == 1 and (output / "keep.txt").exists()
    assert (output / "run=keepme" / "photo.jpg").exists()


def test_exif_orientation_option_rotates_before_cropping(photos):
    from mnasnet_batch.decode.preprocess import PreprocessSpec, preprocess_image

    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(photos["coffee"], "PNG", exif=exif)
    spec = PreprocessSpec.for_model("mnasnet0_5", 10**9)
    ignored = preprocess_image(data, spec)
    applied = preprocess_image(data, PreprocessSpec.for_model("mnasnet0_5", 10**9, apply_exif_orientation=True))
    upright = photos["coffee"].transpose(Image.Transpose.ROTATE_270)
    np.testing.assert_array_equal(applied, preprocess_image(encode(upright, "PNG"), spec))
    np.testing.assert_array_equal(ignored, preprocess_image(encode(photos["coffee"], "PNG"), spec))
