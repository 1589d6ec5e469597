"""The report's gallery: thumbnails of a run's images, read again from its inputs as the job read them.

Which images: for each of the most frequent top-1 labels a seeded sample, the least confident, and a few error
rows (``choose``). Their bytes come from the inputs through the layout the run read them with
(``inputs.listing.layout_of_rows``, ``Layout.read_rows``: a shard or Parquet file read once for all its images)
and the one storage handle, in a thread pool. An input that is gone, or changed since the run, gets a placeholder
that says so instead of a thumbnail (``look``).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import io
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.implementations.local import LocalFileSystem

from mnasnet_batch.config import ConfigError, JobConfig, PreprocessConfig, load_config
from mnasnet_batch.decode.preprocess import error_message
from mnasnet_batch.evaluation import pages
from mnasnet_batch.evaluation.rows import OutputRows, least_confident
from mnasnet_batch.inputs.listing import layout_of_rows
from mnasnet_batch.storage import Storage

# The columns the gallery reads of the output's rows (``rows.read_rows``).
COLUMNS = ("uri", "status", "error", "top_k_scores", "top_k_labels", "run_id", "source_size", "source_version")
# Thumbnails per label: one row of a 60em page.
PER_LABEL = 8
# The least confident images shown: three rows of a 60em page.
LEAST_CONFIDENT = 24
# Error rows shown: one row.
ERRORS = 8
# Labels and scores shown under each least confident image: what a person weighs the top guess against.
SHOWN_LABELS = 3
# The samples' seed: the same rows give the same gallery, render after render.
SEED = 0
# Pixels on a thumbnail's long side: eight fit across the page, and each is a few KB as a JPEG.
THUMBNAIL_PX = 128
# JPEG quality of a thumbnail: 75 is Pillow's default, sharp at 128 px and about 4 KB a photo.
THUMBNAIL_QUALITY = 75
# Inputs read at once: on an object store each read waits on the network, not on a CPU.
READ_THREADS = 16
# Bytes of the thumbnails' data URIs on the page: the charts take a few hundred KB more, and the page stays under
# 5 MB (one file to mail or attach); labels past this are named, not shown.
GALLERY_BYTES = 4 * 2**20
# A file modified at least this long after its run's recorded start (whole seconds) was modified after the start.
START_RESOLUTION_S = 1.0

# Why an image has no thumbnail: its input is gone or changed since the run; an error row's cannot be read, or
# its bytes do not decode (as when it was labeled). The placeholder says it in these words.
GONE, CHANGED, UNREADABLE, UNDECODABLE = "gone", "changed", "unreadable", "undecodable"
SAYS = {
    GONE: "gone since the run",
    CHANGED: "changed since the run",
    UNREADABLE: "cannot be read",
    UNDECODABLE: "does not decode",
}


@dataclass(frozen=True)
class Picture:
    """One image the gallery shows: its row, and its thumbnail or why it has none."""

    uri: str
    labels: tuple[str, ...] = ()
    scores: tuple[float, ...] = ()
    error: str = ""
    # A JPEG of THUMBNAIL_PX on the long side; empty when there is none.
    jpeg: bytes = b""
    # Why there is no thumbnail (GONE, CHANGED, UNREADABLE, UNDECODABLE), and what was found.
    missing: str = ""
    reason: str = ""


@dataclass(frozen=True)
class Gallery:
    """The images of the report's gallery, thumbnails made."""

    # (label, images of that label), most frequent label first.
    labels: list[tuple[str, list[Picture]]]
    least_confident: list[Picture]
    errors: list[Picture]


def choose(
    rows: pa.Table, labels: list[str], seed: int = SEED
) -> tuple[list[tuple[str, pa.Table]], pa.Table, pa.Table]:
    """The rows the gallery shows: per label in ``labels`` (top-1) a sample of up to ``PER_LABEL``, the
    ``LEAST_CONFIDENT`` least confident rows, and up to ``ERRORS`` error rows spread over the error kinds.

    Samples are seeded and taken from the rows sorted by ``uri``, so they do not depend on the order the rows were
    read in (parts, a table's files), and each label's from its own seed (one label's rows do not move another's).
    """
    ok = rows.filter(pc.equal(rows["status"], "ok"))
    top1 = pc.list_element(ok["top_k_labels"], 0)
    by_label = []
    for label in labels:
        of_label = ok.filter(pc.equal(top1, label))
        by_label.append((label, _sample(of_label, PER_LABEL, [seed, zlib.crc32(label.encode())])))
    errors = rows.filter(pc.equal(rows["status"], "error"))
    kinds = pc.list_element(pc.split_pattern(errors["error"], ":", max_splits=1), 0)
    # Each kind's sample, most frequent kind first; then one of each kind in turn, so every kind shows.
    samples = [
        _sample(errors.filter(pc.equal(kinds, entry["values"])), ERRORS, [seed, zlib.crc32(entry["values"].encode())])
        for entry in sorted(pc.value_counts(kinds).to_pylist(), key=lambda e: (-e["counts"], e["values"]))
    ]
    turns = [(turn, k) for k, sample in enumerate(samples) for turn in range(sample.num_rows)]
    shown = sorted(turns)[:ERRORS]
    error_rows = pa.concat_tables([samples[k].slice(turn, 1) for turn, k in shown]) if shown else errors.slice(0, 0)
    return by_label, least_confident(rows, LEAST_CONFIDENT), error_rows


def _sample(rows: pa.Table, count: int, seed: list[int]) -> pa.Table:
    """Up to ``count`` of ``rows``, a seeded sample, in ``uri`` order."""
    rows = rows.take(pc.sort_indices(rows["uri"]))
    if rows.num_rows <= count:
        return rows
    picked = np.sort(np.random.default_rng(seed).choice(rows.num_rows, count, replace=False))
    return rows.take(pa.array(picked))


def build(output: OutputRows, labels: list[str], storage: Storage, seed: int = SEED) -> Gallery:
    """The gallery of ``output``'s rows (``COLUMNS``) for the top-1 ``labels``, thumbnails made (``look``)."""
    by_label, unsure, errors = choose(output.rows, labels, seed)
    chosen = pa.concat_tables([*(t for _, t in by_label), unsure, errors])
    found = look(chosen, output, storage)

    def pictures(table: pa.Table) -> list[Picture]:
        return [found[row["uri"]] for row in table.select(["uri"]).to_pylist()]

    return Gallery([(label, pictures(t)) for label, t in by_label], pictures(unsure), pictures(errors))


def look(rows: pa.Table, output: OutputRows, storage: Storage) -> dict[str, Picture]:
    """Each row's picture: its image read from the input it was labeled from, and its thumbnail, or a placeholder
    saying why there is none.

    Each run's rows are read through the layout its recorded input settings give (``layout_of_rows``), grouped by
    input file (``Layout.row_inputs``), each input read once (``Layout.read_rows``), ``READ_THREADS`` at once.

    Whether an input changed since the run: a table's rows hold the size and version (ETag, else modification
    time) of their input when listed, compared with the input's now; a Parquet folder's rows hold neither, so
    there an input modified after its run began counts as changed (``START_RESOLUTION_S``), and a row labeled
    then whose bytes no longer decode is changed too. A change that keeps a file's size and modification time
    (``cp -p``, ``touch -r``), or on a store that reports no modification time, goes unseen in a folder's run.
    """
    records = {row_run: output.run(row_run) for row_run in set(rows["run_id"].to_pylist())}
    groups: dict[tuple, list[dict]] = {}
    for run_id, record in records.items():
        of_run = rows.filter(pc.equal(rows["run_id"], run_id) if run_id is not None else pc.is_null(rows["run_id"]))
        config = _recorded(record)
        layout = layout_of_rows(config.input, storage, of_run["uri"].to_pylist())
        by_uri = {row["uri"]: row for row in of_run.to_pylist()}
        for input_uri, uris in layout.row_inputs(by_uri).items():
            key = (layout.name, layout.config, input_uri)
            groups.setdefault(key, [])
            groups[key] += [
                {**by_uri[u], "layout": layout, "started_at": record.get("started_at"), "preprocess": config.preprocess}
                for u in uris
            ]

    def read(item: tuple[tuple, list[dict]]) -> list[Picture]:
        (_, _, input_uri), of_input = item
        return _pictures(input_uri, of_input, storage)

    pictures: dict[str, Picture] = {}
    with ThreadPoolExecutor(max(1, min(READ_THREADS, len(groups)))) as pool:
        for found in pool.map(read, groups.items()):
            pictures.update((p.uri, p) for p in found)
    return pictures


def _recorded(record: dict) -> JobConfig:
    """The input and preprocessing settings a run recorded; the defaults where it recorded none."""
    recorded = record.get("config") or {}
    sections = {name: recorded[name] for name in ("input", "preprocess") if isinstance(recorded.get(name), dict)}
    try:
        return load_config(overrides=[sections])
    except ConfigError:  # a record of another version of the job
        return load_config()


def _pictures(input_uri: str, rows: list[dict], storage: Storage) -> list[Picture]:
    """The pictures of ``rows``, all read from ``input_uri`` by the same layout."""
    layout = rows[0]["layout"]
    changed = _changed(input_uri, rows, storage)
    try:
        contents = layout.read_rows(input_uri, [row["uri"] for row in rows])
    except Exception as exc:  # the input cannot be opened at all
        contents = {row["uri"]: exc for row in rows}
    return [_picture(row, contents[row["uri"]], changed.get(row["uri"], "")) for row in rows]


def _picture(row: dict, content: bytes | Exception, changed: str) -> Picture:
    labeled = row["status"] == "ok"
    picture = Picture(
        uri=row["uri"],
        labels=tuple(row["top_k_labels"] or ()),
        scores=tuple(row["top_k_scores"] or ()),
        error=row["error"] or "",
    )
    if isinstance(content, Exception):
        return _missing(picture, GONE if labeled else UNREADABLE, error_message(content))
    if changed:
        return _missing(picture, CHANGED, changed)
    try:
        jpeg = thumbnail(content, row["preprocess"])
    except Exception as exc:
        if labeled:  # the run decoded these bytes
            return _missing(picture, CHANGED, f"the bytes no longer decode: {error_message(exc)}")
        return _missing(picture, UNDECODABLE, error_message(exc))
    return dataclasses.replace(picture, jpeg=jpeg)


def _missing(picture: Picture, missing: str, reason: str) -> Picture:
    return dataclasses.replace(picture, missing=missing, reason=reason)


def _changed(input_uri: str, rows: list[dict], storage: Storage) -> dict[str, str]:
    """Of ``rows`` (of one input), those whose input changed since their run, and how (see ``look``)."""
    recorded = [r for r in rows if r["source_size"] is not None or r["source_version"] is not None]
    changed: dict[str, str] = {}
    if recorded:  # a table's rows
        from mnasnet_batch.outputs.iceberg import source_stats

        now = source_stats([input_uri], storage).to_pylist()[0]
        if now["source_size"] is None and now["source_version"] is None:
            return {}  # cannot be examined: reading it says why
        for row in recorded:
            if (row["source_size"], row["source_version"]) != (now["source_size"], now["source_version"]):
                changed[row["uri"]] = (
                    f"size {row['source_size']}, version {row['source_version']} when labeled; "
                    f"now {now['source_size']}, {now['source_version']}"
                )
        return changed
    started = [r for r in rows if r["started_at"]]
    modified = _modified(input_uri, storage) if started else None
    if modified is None:
        return {}
    for row in started:
        began = datetime.datetime.fromisoformat(row["started_at"])
        if (modified - began).total_seconds() >= START_RESOLUTION_S:
            changed[row["uri"]] = (
                f"modified {modified.isoformat(timespec='seconds')}, after run {row['run_id']} began "
                f"({row['started_at']})"
            )
    return changed


def _modified(uri: str, storage: Storage) -> datetime.datetime | None:
    """When ``uri`` was last modified, in UTC, where its store says; None otherwise."""
    try:
        fs, path = storage.filesystem(uri)
        if isinstance(fs, LocalFileSystem):
            return datetime.datetime.fromtimestamp(os.stat(path).st_mtime, datetime.timezone.utc)
        info = fs.info(path)
    except Exception:
        return None
    for key in ("LastModified", "last_modified", "mtime", "updated", "created"):
        value = info.get(key)
        if isinstance(value, datetime.datetime):
            return value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)
        if isinstance(value, (int, float)):
            return datetime.datetime.fromtimestamp(value, datetime.timezone.utc)
        if isinstance(value, str):
            try:
                return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
    return None


def thumbnail(data: bytes, preprocess: PreprocessConfig | None = None) -> bytes:
    """A JPEG of the image ``data``, ``THUMBNAIL_PX`` on its long side, turned upright by its EXIF orientation
    (people look at it; the model saw it as ``preprocess.apply_exif_orientation`` says).

    Raises:
        What Pillow raises on bytes that do not decode; ``ValueError`` for an image over ``preprocess.max_pixels``.
    """
    from PIL import Image, ImageOps

    max_pixels = (preprocess or PreprocessConfig()).max_pixels
    with Image.open(io.BytesIO(data)) as image:
        if image.width * image.height > max_pixels:
            raise ValueError(
                f"{image.width}x{image.height} pixels is over preprocess.max_pixels={max_pixels}; not decoded"
            )
        image.draft("RGB", (2 * THUMBNAIL_PX, 2 * THUMBNAIL_PX))  # a JPEG decoded at 1/2 to 1/8 scale
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            background = Image.new("RGB", image.size, "white")
            background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
            image = background
        image = image.convert("RGB")
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
        return buffer.getvalue()


def data_uri(jpeg: bytes) -> str:
    """A JPEG as a ``data:`` URI, which the page holds inline (one offline file)."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def _figure(picture: Picture, caption: list[str]) -> dict:
    """What the page shows of one picture: its thumbnail (a data: URI) or its placeholder, and its caption's lines."""
    return {
        "uri": picture.uri,
        "src": data_uri(picture.jpeg) if picture.jpeg else "",
        "alt": picture.labels[0] if picture.labels else "image",
        "missing": picture.missing,
        "says": SAYS.get(picture.missing, ""),
        # An error row's message is its caption already.
        "reason": picture.reason if picture.reason != picture.error else "",
        "caption": caption,
    }


def _scores(picture: Picture, count: int) -> list[str]:
    pairs = list(zip(picture.labels, picture.scores, strict=True))[:count]
    return [f"{label} {score:.3f}" for label, score in pairs]


def view(gallery: Gallery, counts: dict[str, int]) -> dict:
    """What the page's gallery sections show (templates/gallery.html): by label (``counts``: images per label), the
    least confident, the errors. Labels past ``GALLERY_BYTES`` of thumbnails are named, not shown."""
    shown = sum(len(p.jpeg) for p in gallery.least_confident + gallery.errors) * 4 // 3
    blocks, left_out = [], []
    for label, pictures in gallery.labels:
        size = sum(len(p.jpeg) for p in pictures) * 4 // 3
        if shown + size > GALLERY_BYTES:
            left_out.append(label)
            continue
        shown += size
        figures = [_figure(p, [f"{p.scores[0]:.3f}"] if p.scores else []) for p in pictures]
        blocks.append({"label": label, "count": counts.get(label, 0), "pictures": figures})
    return {
        "per_label": PER_LABEL,
        "labels": blocks,
        "left_out": left_out,
        "least_confident_count": LEAST_CONFIDENT,
        "shown_labels": SHOWN_LABELS,
        "least_confident": [_figure(p, _scores(p, SHOWN_LABELS)) for p in gallery.least_confident],
        "errors_count": ERRORS,
        "errors": [_figure(p, [p.error]) for p in gallery.errors],
    }


def render(gallery: Gallery, counts: dict[str, int]) -> str:
    """The gallery's sections of the report page (HTML, templates/gallery.html), as the page holds them."""
    return pages.template("gallery.html").render(gallery=view(gallery, counts))
