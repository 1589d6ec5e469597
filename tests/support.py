"""Test data made offline: real photos from scikit-image, and a MnasNet checkpoint with well-separated predictions.

A freshly initialised MnasNet predicts a nearly uniform softmax (scores ~0.001, gaps ~1e-9), which makes
top-k comparisons meaningless. ``make_checkpoint`` recalibrates batch-norm statistics on real photos and
fits the classifier so each source photo maps to its own ImageNet class with a clear margin, and every
other class gets a distinct, photo-dependent logit so the whole top-k is well ordered.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
import torchvision
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# Small parts and batches, so a run of a few hundred images writes as it goes and can be interrupted.
SMALL_BATCHES = ("output.rows_per_file=8", "compute.batch_size=8", "preprocess.batch_size=8")

# (scikit-image loader, ImageNet class the fixture model maps its crops to)
PHOTOS = {
    "astronaut": "space shuttle",
    "chelsea": "Egyptian cat",
    "coffee": "espresso",
    "rocket": "missile",
    "stereo_motorcycle": "moped",
    "hubble_deep_field": "planetarium",
    "immunohistochemistry": "Petri dish",
    "retina": "orange",
}


def load_photos() -> dict[str, Image.Image]:
    """The colour photos scikit-image ships, as RGB PIL images."""
    import skimage.data

    photos = {}
    for name in PHOTOS:
        array = getattr(skimage.data, name)()
        photos[name] = Image.fromarray(array[0] if isinstance(array, tuple) else array).convert("RGB")
    return photos


def random_crop(photo: Image.Image, rng: np.random.Generator, long_side: int = 500) -> Image.Image:
    """A random crop of 40-100 % of each side, scaled so its long side is about ``long_side`` pixels."""
    width, height = photo.size
    crop_w = int(width * rng.uniform(0.4, 1.0))
    crop_h = int(height * rng.uniform(0.4, 1.0))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    crop = photo.crop((left, top, left + crop_w, top + crop_h))
    scale = long_side * rng.uniform(0.6, 1.2) / max(crop.size)
    return crop.resize((max(1, round(crop_w * scale)), max(1, round(crop_h * scale))), Image.BICUBIC)


def write_corpus(
    directory: Path,
    count: int,
    seed: int = 0,
    long_side: int = 500,
    png_every: int = 5,
    quality: int = 90,
    grain: float = 0.0,
) -> list[Path]:
    """Writes ``count`` varied crops of the photos as JPEG (and every ``png_every``-th as PNG; 0: none) files.

    ``grain`` adds Gaussian noise of that standard deviation (grey levels), like a camera sensor's: the
    scaled-up crops are smoother than photos, and their JPEGs smaller, than ImageNet's.

    Returns:
        The written paths, sorted.
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = load_photos()
    names = list(photos)
    paths = []
    for i in range(count):
        name = names[i % len(names)]
        crop = random_crop(photos[name], rng, long_side)
        if grain:
            noisy = np.asarray(crop, np.float32) + rng.normal(0, grain, (crop.height, crop.width, 3))
            crop = Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8))
        suffix = "png" if png_every and i % png_every == png_every - 1 else "jpg"
        path = directory / f"{name}_{i:05d}.{suffix}"
        crop.save(path, quality=quality) if suffix == "jpg" else crop.save(path)
        paths.append(path)
    return sorted(paths)


# What a phone camera saves: 12 MP (4032x3024), landscape or portrait.
PHONE_SIZE = (4032, 3024)
# EXIF's orientation tag, and the value a phone writes for a portrait it stores sideways ("rotate 90 CW to show").
ORIENTATION_TAG = 0x0112
SIDEWAYS = 6
# HEIC copies: quality 60 with x265's fastest preset gives files of a phone's size (1-3 MB at 12 MP) in seconds;
# the default preset takes over 10 s an image.
HEIC_QUALITY = 60
HEIC_ENCODER = {"preset": "ultrafast"}


def write_photo_corpus(
    directory: Path,
    count: int,
    seed: int = 0,
    heic_every: int = 0,
    size: tuple[int, int] = PHONE_SIZE,
    grain: float = 4.5,
) -> list[Path]:
    """Writes ``count`` phone-like photos: ``size`` (12 MP) JPEGs made from the scikit-image photos.

    Each is a random crop of a scikit-image photo scaled up to ``size``, with sensor grain (Gaussian noise of std
    ``grain`` grey levels, which makes the files about 2-4 MB at 12 MP as a phone's are), saved once at a quality
    drawn from 88 to 95. Photo ``i`` is, by ``i % 4``: 0 and 1 landscape; 2 a portrait stored upright;
    3 a portrait stored sideways (landscape pixels) with EXIF orientation 6, as phones save portraits, so that only
    ``ImageOps.exif_transpose`` shows it upright. Every ``heic_every``-th photo (0: none) is also written as
    ``.heic`` through pillow_heif (which must then be installed), upright (a HEIF reader applies the container's
    rotation itself), under the same name.

    Returns:
        The written paths (the JPEGs and the HEIC copies), sorted.
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = load_photos()
    names = list(photos)
    long_side, short_side = max(size), min(size)
    # One field of grain, drawn once, and each photo takes a window of it at a random offset: drawing 36 M normal
    # values per photo would cost more than the rest of its making.
    margin = 64
    bank = np.rint(rng.standard_normal((long_side + margin,) * 2 + (3,), dtype=np.float32) * grain).astype(np.int8)
    paths = []
    for i in range(count):
        # Each next round of the names starts one further, so that every photo comes in every kind.
        name = names[(i + i // len(names)) % len(names)]
        kind = i % 4
        width, height = (short_side, long_side) if kind >= 2 else (long_side, short_side)
        top, left = rng.integers(0, margin + long_side - np.array([height, width]) + 1)
        pixels = np.asarray(_phone_crop(photos[name], rng, width, height), np.int16)
        pixels += bank[top : top + height, left : left + width]
        upright = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        exif = Image.Exif()
        stored = upright
        if kind == 3:
            # Orientation 6 shows the stored pixels turned 90 degrees clockwise: store them turned counter-clockwise.
            stored = upright.transpose(Image.Transpose.ROTATE_90)
            exif[ORIENTATION_TAG] = SIDEWAYS
        path = directory / f"{name}_{i:05d}.jpg"
        stored.save(path, format="JPEG", quality=int(rng.integers(88, 96)), exif=exif)
        paths.append(path)
        if heic_every and i % heic_every == heic_every - 1:
            import pillow_heif

            heic = path.with_suffix(".heic")
            pillow_heif.from_pillow(upright).save(heic, quality=HEIC_QUALITY, enc_params=HEIC_ENCODER)
            paths.append(heic)
    return sorted(paths)


def _phone_crop(photo: Image.Image, rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A crop of ``photo`` in the aspect of ``width`` x ``height``, 50-100 % as wide as the widest, scaled to it."""
    aspect = width / height
    full_w, full_h = photo.size
    most_w = min(full_w, full_h * aspect)
    crop_w = most_w * rng.uniform(0.5, 1.0)
    crop_h = crop_w / aspect
    left = rng.uniform(0, full_w - crop_w)
    top = rng.uniform(0, full_h - crop_h)
    return photo.resize((width, height), Image.BICUBIC, box=(left, top, left + crop_w, top + crop_h))


def reference_tensor(image: Image.Image, model_name: str) -> torch.Tensor:
    """torchvision's reference preprocessing: ``weights.transforms()`` on the RGB PIL image."""
    weights = torchvision.models.get_model_weights(model_name).IMAGENET1K_V1
    return weights.transforms()(image.convert("RGB"))


def reference_predictions(paths: list[Path], model: torch.nn.Module, model_name: str, k: int):
    """The independent reference: PIL open -> transforms() -> eager NCHW forward -> softmax -> topk.

    Returns:
        (ids, scores), each (N, k) numpy arrays, in the order of ``paths``.
    """
    batch = torch.stack([reference_tensor(Image.open(p), model_name) for p in paths])
    with torch.no_grad():
        probabilities = torch.softmax(model.eval()(batch), dim=1)
    scores, ids = torch.topk(probabilities, k, dim=1)
    return ids.numpy(), scores.numpy()


def make_model(model_name: str = "mnasnet0_5", seed: int = 0) -> torch.nn.Module:
    """A MnasNet whose predictions on the photos are confident and well ordered (see module docstring)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = torchvision.models.get_model(model_name, weights=None)
    categories = torchvision.models.get_model_weights(model_name).IMAGENET1K_V1.meta["categories"]
    photos = load_photos()
    crops, targets = [], []
    for index, photo in enumerate(photos.values()):
        for _ in range(6):
            crops.append(reference_tensor(random_crop(photo, rng), model_name))
            targets.append(index)
    x = torch.stack(crops)
    # momentum=None averages over everything seen; MnasNet's own 3e-4 would barely move the statistics.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    with torch.no_grad():
        features = model.layers(x).mean([2, 3])  # (N, 1280), what the classifier sees
    classes = [categories.index(PHOTOS[name]) for name in photos]
    # Target logits: 12 for the photo's class, plus a fixed random pattern per photo so that
    # the ranks after the first are distinct and stable across crops.
    patterns = torch.randn(len(photos), len(categories), generator=torch.Generator().manual_seed(seed)) * 2
    target = patterns[targets].clone()
    target[torch.arange(len(targets)), torch.tensor([classes[t] for t in targets])] += 12
    mean = features.mean(0)
    centred = features - mean
    ridge = 1e-2 * torch.eye(centred.shape[1])
    weight = torch.linalg.solve(centred.T @ centred + ridge, centred.T @ (target - target.mean(0)))
    linear = model.classifier[1]
    with torch.no_grad():
        linear.weight.copy_(weight.T)
        linear.bias.copy_(target.mean(0) - mean @ weight)
    return model


def checkpoint_bytes(model: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def job_argv(images: Path, output: Path, weights: Path, *settings: str, extra: tuple[str, ...] = ()) -> list[str]:
    """The labeling job's command line for a test: input, output, weights, then ``--set`` per setting."""
    argv = ["--input", str(images), "--output", str(output), "--weights", str(weights), *extra]
    for setting in settings:
        argv += ["--set", setting]
    return argv


def assert_reference_rows(rows: dict[str, dict], images: list[Path], model: torch.nn.Module) -> None:
    """Every image (rows keyed by its path) is ``ok`` with the reference's top-5: ids identical, scores within 1e-4."""
    ref_ids, ref_scores = reference_predictions(images, model, "mnasnet0_5", 5)
    for path, ids, scores in zip(images, ref_ids, ref_scores, strict=True):
        row = rows[str(path)]
        assert row["status"] == "ok" and row["top_k_ids"] == ids.tolist(), path.name
        np.testing.assert_allclose(row["top_k_scores"], scores, atol=1e-4)


# A ``replace_hook`` body: publishing a third part stalls (10 minutes), so a run of many parts is still running when
# a test stops or kills it, however fast the machine.
STALL_AFTER_TWO_PARTS = (
    "    folder, name = os.path.split(str(dst))\n"
    "    if name.startswith('part-') and sum(n.startswith('part-') for n in os.listdir(folder)) >= 2:\n"
    "        time.sleep(600)\n"
)


def stall_after_two_parts_until(gate: Path) -> str:
    """A ``replace_hook`` body: like ``STALL_AFTER_TWO_PARTS``, but the stalled parts go on once ``gate`` exists, so
    a test can stop the job while it runs, then let it close however fast the machine is."""
    return (
        "    folder, name = os.path.split(str(dst))\n"
        "    if name.startswith('part-') and sum(n.startswith('part-') for n in os.listdir(folder)) >= 2:\n"
        f"        while not os.path.exists({str(gate)!r}):\n"
        "            time.sleep(0.05)\n"
    )


def replace_hook(folder: Path, body: str) -> Path:
    """Test-only fault injection: a ``sitecustomize`` in ``folder`` that runs ``body`` (statements over ``src`` and
    ``dst``, indented 4 spaces; ``errno``, ``os`` and ``time`` imported) before every ``os.replace``. Put ``folder``
    on a job's PYTHONPATH and every Ray worker of the job inherits it.

    Returns:
        ``folder``.
    """
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import errno, os, time\n"
        "_replace = os.replace\n"
        "def _hooked_replace(src, dst, *args, **kwargs):\n"
        f"{body}"
        "    return _replace(src, dst, *args, **kwargs)\n"
        "os.replace = _hooked_replace\n"
    )
    return folder


class ImageServer:
    """A real HTTP server on 127.0.0.1, in a thread, serving ``images`` by path, and these that misbehave:

    ``/missing.jpg`` 404; ``/page.jpg`` an HTML page; ``/hang.jpg`` never answers (until the server stops);
    ``/flaky.jpg`` 503 the first time, then ``images["/flaky.jpg"]``; ``/reset.jpg`` drops the first connection
    unanswered, then serves ``images["/reset.jpg"]``; ``/always503.jpg`` 503 every time; ``/endless.jpg`` a body
    without a length that never ends. ``hits`` counts the requests per path.
    """

    def __init__(self, images: dict[str, bytes]):
        import collections
        import contextlib
        import http.server
        import threading

        self.images = images
        self.hits: collections.Counter[str] = collections.Counter()
        self.stopping = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.hits[self.path] += 1
                first = server.hits[self.path] == 1
                if self.path == "/hang.jpg":
                    server.stopping.wait()
                elif self.path == "/reset.jpg" and first:
                    self.close_connection = True
                elif self.path == "/always503.jpg" or (self.path == "/flaky.jpg" and first):
                    self.send_error(503)
                elif self.path == "/page.jpg":
                    self.answer(b"<!DOCTYPE html><html><body>Not the image you are looking for</body></html>")
                elif self.path == "/endless.jpg":
                    self.send_response(200)
                    self.end_headers()
                    with contextlib.suppress(ConnectionError):  # until the client hangs up
                        while not server.stopping.is_set():
                            self.wfile.write(bytes(2**16))
                elif self.path in server.images:
                    self.answer(server.images[self.path])
                else:
                    self.send_error(404)

            def answer(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def __enter__(self) -> ImageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def unblock_fifo_readers(fifo: Path) -> None:
    """Lets a reader blocked opening ``fifo`` go on (to an empty read), so that no process is left waiting on it."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # no reader (ENXIO): nothing is waiting


def require(module: str, extra: str):
    """Imports ``module``, or skips the test where the ``extra`` is not installed; in CI (``CI=true``) a missing
    module fails the run instead, so that no test is skipped silently there."""
    if os.environ.get("CI", "").lower() in ("1", "true"):
        import importlib

        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"needs {module}: pip install -e '.[{extra}]'")


def poll(condition, timeout_s: float, what: str, interval_s: float = 0.05):
    """Returns the first truthy ``condition()``, or fails after ``timeout_s`` saying what was awaited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def rows_by_uri(output: Path) -> dict[str, dict]:
    """Every row written under ``output``, by uri; fails if a uri appears twice."""
    rows = pads.dataset(sorted(str(p) for p in output.rglob("*.parquet")), format="parquet").to_table().to_pylist()
    uris = [r["uri"] for r in rows]
    assert len(uris) == len(set(uris)), "a row appears twice"
    return {r["uri"]: r for r in rows}


def many_images(tmp_path: Path, corpus, copies: int) -> Path:
    """``copies`` copies of the corpus in ``tmp_path/images``."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(copies):
        for path in corpus:
            shutil.copy(path, images / f"{i}_{path.name}")
    return images


def make_tar(members: list[tuple[str, bytes]]) -> bytes:
    """A tar archive of (name, data) members, in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_shard(paths, cut_inside_last=False, no_image_sample=False):
    """A WebDataset shard: each image with json, cls and txt members; optionally a sample without image."""
    import json

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:

        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            return buffer.tell()

        for path in paths:
            stem = path.name.rsplit(".", 1)[0]
            add(f"{stem}.json", json.dumps({"source": path.name}).encode())
            end_of_image = add(path.name, path.read_bytes())
            add(f"{stem}.cls", b"7")
            add(f"{stem}.txt", b"a caption")
        if no_image_sample:
            add("no_image_99.json", b"{}")
            add("no_image_99.cls", b"1")
    data = buffer.getvalue()
    return data[: end_of_image - 700] if cut_inside_last else data


def session_members(session_id: int) -> list[int]:
    """The live (not zombie) processes of a session."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == session_id and fields[0] != "Z":  # fields[3]: session id
                    members.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return members


def end_session(session_id: int, timeout_s: float = 30) -> None:
    """SIGKILLs every process of a session until none is left: Ray's workers and job drivers run in process groups
    of their own, so killing a node's process group leaves them running."""

    def none_left() -> bool:
        members = session_members(session_id)
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return not members

    poll(none_left, timeout_s, f"the processes of session {session_id} to exit", interval_s=0.1)


def kill_session(process: subprocess.Popen) -> None:
    """SIGKILLs the driver's whole session (driver and the Ray it started) and waits until none is left."""
    with contextlib.suppress(ProcessLookupError):  # the group is gone when every member already exited
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    end_session(process.pid)


class JobProcesses:
    """The job as users run it (``jobs/label_images.py``) in subprocesses, each in its own session; the
    ``job_process`` fixture ends every session it started when the test ends."""

    def __init__(self):
        self.started: list[subprocess.Popen] = []

    def start(
        self, argv: list[str], env: dict | None = None, local_ray: bool = True, program: list | None = None, **popen
    ) -> subprocess.Popen:
        """Starts the job (or ``program``, another way to run it, with ``argv``); with ``local_ray`` it starts its own
        local Ray (RAY_ADDRESS is dropped, unless ``env`` sets it).

        Returns:
            The driver's process, silent unless ``popen`` says where its output goes.
        """
        environment = dict(os.environ)
        if local_ray:
            environment.pop("RAY_ADDRESS", None)
        popen = {"cwd": ROOT, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL} | popen
        process = subprocess.Popen(
            [*(program or [sys.executable, str(ROOT / "jobs" / "label_images.py")]), *argv],
            env=environment | (env or {}),
            start_new_session=True,
            **popen,
        )
        self.started.append(process)
        return process

    def run(self, argv: list[str], timeout_s: float, env: dict | None = None, **start) -> subprocess.CompletedProcess:
        """Runs the job to its end (``start``'s arguments), capturing its text output; fails after ``timeout_s``."""
        process = self.start(argv, env, **({"stdout": subprocess.PIPE, "stderr": subprocess.PIPE} | start), text=True)
        try:
            out, err = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_session(process)
            pytest.fail(f"the job ran past {timeout_s} s")
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    def end_all(self) -> None:
        for process in self.started:
            kill_session(process)


class GatedImages(http.server.ThreadingHTTPServer):
    """Serves a folder's images on loopback; those not in ``first`` wait until ``opened`` is set."""

    daemon_threads = True

    def __init__(self, folder, first: set[str]):
        self.folder, self.first, self.opened = folder, first, threading.Event()
        super().__init__(("127.0.0.1", 0), _GatedHandler)


class _GatedHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        name = self.path.lstrip("/")
        if name not in self.server.first:
            self.server.opened.wait(600)
        body = (self.server.folder / name).read_bytes()
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the reader was on a killed node, or its job was stopped

    def do_HEAD(self):
        # Metadata is never held: a table job looks up every input's size before it labels (iceberg.source_stats).
        size = (self.server.folder / self.path.lstrip("/")).stat().st_size
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def served_in_part(folder: Path, at_once: set[str]):
    """Serves ``folder``'s files over HTTP on loopback: those named in ``at_once`` at once, the others only once the
    yielded event is set, so a job's rows stop coming after those images, however long it waits.

    Yields:
        (the base URL, the event that serves the rest)
    """
    server = GatedImages(folder, at_once)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.opened
    finally:
        server.opened.set()
        server.shutdown()
        server.server_close()
        thread.join()


def assert_predictions_match_the_reference(rows: dict[str, dict], expected: dict[str, Path], model) -> None:
    """Each of ``rows`` (by uri) is ok with the top-5 of a direct torchvision forward of its image in ``expected``:
    ids identical, scores within 1e-4."""
    uris = sorted(expected)
    ids, scores = reference_predictions([expected[u] for u in uris], model, "mnasnet0_5", 5)
    for uri, ref_ids, ref_scores in zip(uris, ids, scores, strict=True):
        assert rows[uri]["status"] == "ok" and rows[uri]["top_k_ids"] == ref_ids.tolist(), uri
        np.testing.assert_allclose(rows[uri]["top_k_scores"], ref_scores, atol=1e-4)


def embedded_catalog(output):
    """The embedded catalog the job made under ``output``, opened as any reader would."""
    from pyiceberg.catalog import load_catalog

    return load_catalog("default", type="sql", uri=f"sqlite:///{output}/_catalog.db")
