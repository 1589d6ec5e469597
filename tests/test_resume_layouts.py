"""Every input layout, every image exactly once: a killed run resumed by the same command, then incremental."""

import hashlib
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mnasnet_batch.cli import main
from mnasnet_batch.inputs import spool
from mnasnet_batch.inputs.webdataset import FINISHED_INPUTS
from tests import hf_data, support
from tests.support import ROOT, kill_session, make_shard, poll, rows_by_uri

# Parts of 4 rows: 16 images make 4 parts, more than the stalled run below can publish.
SMALL_BATCHES = ("output.rows_per_file=4", "compute.batch_size=4", "preprocess.batch_size=4")
IMAGES_PER_INPUT = 4

def write_shards(folder: Path, images: list[Path], first: int) -> dict[str, Path]:
    """Shards of IMAGES_PER_INPUT images (with json, cls and txt members), numbered from ``first``.

    Returns:
        Each image's expected ``uri`` (``SHARD#MEMBER``) and its file.
    """
    folder.mkdir(exist_ok=True)
    expected = {}
    for i in range(0, len(images), IMAGES_PER_INPUT):
        shard = folder / f"{first + i // IMAGES_PER_INPUT:06d}.tar"
        shard.write_bytes(make_shard(images[i : i + IMAGES_PER_INPUT]))
        expected.update({f"{shard}#{path.name}": path for path in images[i : i + IMAGES_PER_INPUT]})
    return expected


def write_parquet(folder: Path, images: list[Path], first: int) -> dict[str, Path]:
    """Parquet files of IMAGES_PER_INPUT images, numbered from ``first``, every file with the ids 0, 1, 2, 3.

    Returns:
        Each image's expected ``uri`` (``FILE#ID``) and its file.
    """
    folder.mkdir(exist_ok=True)
    expected = {}
    for i in range(0, len(images), IMAGES_PER_INPUT):
        chunk = images[i : i + IMAGES_PER_INPUT]
        path = folder / f"part-{first + i // IMAGES_PER_INPUT}.parquet"
        pq.write_table(pa.table({"id": range(len(chunk)), "image": [p.read_bytes() for p in chunk]}), path)
        expected.update({f"{path}#{row}": image for row, image in enumerate(chunk)})
    return expected


def write_manifest(folder: Path, images: list[Path], first: int) -> dict[str, Path]:
    """A text manifest listing the images, the first one twice.

    Returns:
        Each image's expected ``uri`` (its path) and its file.
    """
    folder.mkdir(exist_ok=True)
    lines = [str(path) for path in images]
    (folder / f"list-{first}.txt").write_text("\n".join([*lines, lines[0]]) + "\n")
    return {line: path for line, path in zip(lines, images, strict=True)}


def write_files(folder: Path, images: list[Path], first: int) -> dict[str, Path]:
    """The images as loose files, numbered from ``first``.

    Returns:
        Each image's expected ``uri`` (its copy's path) and its file.
    """
    folder.mkdir(exist_ok=True)
    expected = {}
    for i, image in enumerate(images):
        copy = folder / f"{first + i:04d}-{image.name}"
        copy.write_bytes(image.read_bytes())
        expected[str(copy)] = image
    return expected


def write_hub_parquet(folder: Path, images: list[Path], first: int) -> dict[str, Path]:
    """Parquet files as ``datasets`` writes them for the Hub (``data/train-XXXXX-of-YYYYY.parquet``: an Image
    feature, a label, no id column), IMAGES_PER_INPUT images each, numbered from ``first``.

    Returns:
        Each image's expected ``uri`` (``FILE#N``, N its row) and its file.
    """
    expected = {}
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for i in range(0, len(images), IMAGES_PER_INPUT):
        chunk = images[i : i + IMAGES_PER_INPUT]
        path = folder / "data" / f"train-{first + i // IMAGES_PER_INPUT:05d}-of-00099.parquet"
        hf_data.hf_dataset(chunk).to_parquet(str(path))
        expected.update({f"{path}#{row}": image for row, image in enumerate(chunk)})
    return expected


def write_arrow(folder: Path, images: list[Path], first: int) -> dict[str, Path]:
    """A dataset saved by ``datasets.save_to_disk`` in ``ds-<first>/``, IMAGES_PER_INPUT images an Arrow file.

    Returns:
        Each image's expected ``uri`` (``FILE#N``, N its row) and its file.
    """
    saved = folder / f"ds-{first}"
    hf_data.hf_dataset(images).save_to_disk(str(saved), num_shards=len(images) // IMAGES_PER_INPUT)
    files = sorted(saved.glob("data-*.arrow"))
    return {
        f"{file}#{row}": images[n * IMAGES_PER_INPUT + row]
        for n, file in enumerate(files)
        for row in range(IMAGES_PER_INPUT)
    }


def write_img2dataset(folder: Path, images: list[Path], first: int) -> dict[str, Path]:
    """img2dataset's WebDataset output in ``i2d-<first>/`` (IMAGES_PER_INPUT samples a shard, each with its
    ``.parquet`` and ``_stats.json`` beside it), downloaded from a loopback server, each image kept as served.

    Returns:
        Each image's expected ``uri`` (``SHARD#KEY.EXT``) and its file.
    """
    try:
        hf_data.ensure_img2dataset()
    except Exception as exc:  # no package index: the producer cannot be installed here
        pytest.skip(f"img2dataset cannot be installed: {exc}")
    folder.mkdir(exist_ok=True)
    served = {f"/{first + i}-{path.name}": path for i, path in enumerate(images)}
    url_list = folder.parent / f"urls-{first}.csv"  # beside the input, not in it
    output = folder / f"i2d-{first}"
    with support.ImageServer({name: path.read_bytes() for name, path in served.items()}) as server:
        by_url = {server.url(name): path for name, path in served.items()}
        url_list.write_text("url,caption\n" + "".join(f"{url},a photo\n" for url in by_url))
        hf_data.run_img2dataset(url_list, output, per_shard=IMAGES_PER_INPUT)
    expected = {}
    for shard in sorted(output.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in members:
                stem, ext = os.path.splitext(name)
                if ext not in (".json", ".txt"):
                    url = json.load(tar.extractfile(members[f"{stem}.json"]))["url"]
                    expected[f"{shard}#{name}"] = by_url[url]
    assert sorted(expected.values()) == sorted(images), "img2dataset did not download every image"
    return expected


WRITERS = {
    "webdataset": write_shards,
    "parquet": write_parquet,
    "hub-parquet": write_hub_parquet,
    "arrow": write_arrow,
    "manifest": write_manifest,
    "files": write_files,
    "img2dataset": write_img2dataset,
}
NOUNS = {
    "webdataset": "tar shards",
    "parquet": "Parquet files",
    "hub-parquet": "Parquet files",
    "arrow": "Arrow files",
    "manifest": "image URIs from manifests",
    "files": "image files",
    "img2dataset": "tar shards",
}
# Layouts whose every listed URI is one image: their lists are written under the output past spool.SPOOL_URIS.
ONE_URI_PER_IMAGE = ("manifest", "files")
# Layouts whose files' images are counted once read to their end, and recorded by the run (record_finished).
RECORDED = ("webdataset", "img2dataset", "arrow")
# The extensions of the inputs of the layouts that read files of images.
INPUT_SUFFIXES = (".tar", ".parquet", ".arrow")


def finished_inputs(layout: str, inputs: Path, output: Path, written: set[str]) -> list[str]:
    """The inputs a resumed run need not read: all their rows are written and, for shards, the run recorded the
    shard as read to its end (``record_finished``; a Parquet file's rows are known before reading)."""
    files = sorted(str(p) for p in inputs.rglob("*") if p.suffix in INPUT_SUFFIXES)
    if layout in ONE_URI_PER_IMAGE:
        return sorted(written)
    if layout in RECORDED:
        recorded = {p.name.split(".")[0] for p in output.glob(f"run=*/{FINISHED_INPUTS}/*")}
        files = [f for f in files if hashlib.sha256(f.encode()).hexdigest()[:32] in recorded]
    return [f for f in files if sum(uri.startswith(f"{f}#") for uri in written) == IMAGES_PER_INPUT]


@pytest.mark.parametrize(
    "layout", ["webdataset", "img2dataset", "parquet", "hub-parquet", "arrow", "manifest", "files"]
)
def test_killed_run_resumes_then_incremental_labels_only_the_new_input(
    layout, local_ray, corpus, tmp_path, checkpoint_path, fixture_model, capsys, monkeypatch, job_process
):
    inputs = tmp_path / "inputs"
    expected = WRITERS[layout](inputs, corpus[:16], 0)
    output = tmp_path / "out"
    argv = support.job_argv(inputs, output, checkpoint_path, *SMALL_BATCHES)
    # Once the run holds two parts, publishing another stalls, so the job is killed with some of its rows written
    # and the rest not.
    hooks = support.replace_hook(tmp_path / "hooks", support.STALL_AFTER_TWO_PARTS)
    job = job_process.start(
        argv, env={"PYTHONPATH": os.pathsep.join([str(hooks), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    )
    try:
        poll(lambda: len(list(output.glob("run=*/part-*.parquet"))) >= 2 or job.poll() is not None, 180, "two parts")
        assert job.poll() is None, "the run finished before it could be killed"
    finally:
        kill_session(job)
    before = {p.name: p.stat().st_mtime_ns for p in output.glob("run=*/part-*.parquet")}
    rows_before = len(rows_by_uri(output))
    assert 0 < rows_before < len(expected)
    assert json.loads((output / "_run.json").read_text())["status"] == "running"
    finished = finished_inputs(layout, inputs, output, set(rows_by_uri(output)))
    if layout in ("webdataset", "img2dataset"):
        # A finished shard is not read again: one that could no longer be read would make error rows.
        for shard in finished:
            Path(shard).write_bytes(b"not a tar file")
    capsys.readouterr()
    if layout in ONE_URI_PER_IMAGE:
        # The resumed run holds at most 3 URIs in memory: the listed and the written ones are written under the
        # output by hash partition, and compared a partition at a time (spool.SPOOL_URIS).
        monkeypatch.setattr(spool, "SPOOL_URIS", 3)

    # The same command resumes the run: what is missing is labeled, what was written is kept, nothing twice.
    # Inputs whose rows are all written are skipped without reading them.
    assert main(argv) == 0
    noun = NOUNS[layout]
    captured = capsys.readouterr()
    per_input = 1 if layout in ONE_URI_PER_IMAGE else IMAGES_PER_INPUT
    inputs_left = len(expected) // per_input - len(finished)
    assert f"{inputs_left} {noun} to label" in captured.err
    if layout in ONE_URI_PER_IMAGE:
        assert "more than 3 listed URIs: writing them under" in captured.err
        assert "more than 3 written URIs: writing them under" in captured.err
    rows = rows_by_uri(output)
    assert set(rows) == set(expected)
    support.assert_predictions_match_the_reference(rows, expected, fixture_model)
    assert {p.name: p.stat().st_mtime_ns for p in output.glob("run=*/part-*.parquet") if p.name in before} == before
    assert f"labeled {len(expected)} images (0 errors, {rows_before} from before the resume)" in captured.out
    assert len(list(output.glob("run=*"))) == 1 and (output / "_SUCCESS").exists()

    # One more shard or Parquet file (Parquet: with the same ids as every other file); only it is labeled, and
    # only it is read.
    added = WRITERS[layout](inputs, corpus[16:20], 4)
    assert main([*argv, "--mode", "incremental", "--run-id", "more"]) == 0
    captured = capsys.readouterr()
    new_inputs = 4 if layout in ONE_URI_PER_IMAGE else 1
    assert "labeled 4 images (0 errors)" in captured.out and f"{new_inputs} {noun} to label" in captured.err
    everything = rows_by_uri(output)
    assert set(everything) == set(expected) | set(added)
    assert {uri: everything[uri] for uri in rows} == rows
    support.assert_predictions_match_the_reference(everything, added, fixture_model)
    assert json.loads((output / "_run.json").read_text())["status"] == "succeeded"
    if layout in ONE_URI_PER_IMAGE:
        assert not list(output.glob(f"{spool.SPOOL_FOLDER}/*")), "the job leaves no list behind"
