"""Input layouts: finding what to read (loose images, WebDataset shards, Parquet, manifests) and reading it."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import posixpath
import re
import sys
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.core import split_protocol

from mnasnet_batch import spool
from mnasnet_batch.config import InputConfig
from mnasnet_batch.decode.preprocess import error_message
from mnasnet_batch.spool import Spool, SpooledURIs, first_occurrences, read_spooled
from mnasnet_batch.storage import LISTING_THREADS, READ_CHUNK, OverByteLimit, Storage, StorageError, has_extension

if TYPE_CHECKING:
    from mnasnet_batch.outputs.folder import Labeled

log = logging.getLogger(__name__)

SHARD_EXTENSIONS = ("tar", "tar.gz", "tgz")
PARQUET_EXTENSIONS = ("parquet",)
MANIFEST_EXTENSIONS = ("txt", "csv", "tsv", "parquet")
# WebDataset's sample key: the member's directory plus its base name up to the first dot.
_SAMPLE_KEY = re.compile(r"^((?:.*/|)[^./]+)\.[^/]*$")
# Member names a warning about dropped members shows; the count says how many there are in all.
SHOWN_MEMBERS = 3
# Bytes of a manifest turned into URIs at a time: its lines never exist as Python strings all at once, and each
# step's Arrow temporaries (a dozen copies of the chunk) stay small.
TEXT_CHUNK_BYTES = 4 * 2**20
# What a manifest lists in place of a line (text) or row (CSV, TSV) that is not UTF-8, after the manifest's URI.
_NOT_UTF8 = re.compile(r"#(?P<unit>line|row)=(?P<number>[0-9]+)$")
# Where a run records the inputs (WebDataset shards) it read to their end, in its folder: one empty file each,
# named ``<sha256 of the input's URI, 32 hex digits>.<images it holds>``, so planning lists them and reads none.
FINISHED_INPUTS = "_inputs"
# URIs per block handed from the driver to Ray: the first block holds one decode batch, each next one twice
# as many, up to 4,096, so the first decode tasks start at once and 10^5 URIs take ~30 object puts, not 3,000.
MAX_INPUT_BLOCK = 4_096
# Blocks of files (shards, Parquet files) handed to Ray: one file each up to this many files, else as many files
# each as spread them over this many blocks. The driver puts each block into the object store one by one: a put
# per file of 10^5 shards delayed the first task the longest of anything (docs/benchmarks.md, corpus scale).
MAX_FILE_BLOCKS = 1_024


def encoded_batch(uris: Sequence[str], contents: Sequence[bytes | Exception]) -> dict[str, np.ndarray]:
    """A batch as the read stage hands it on: ``uri``; ``data``, the encoded image (b"" where reading failed);
    ``error``, "" or ``"<ExceptionType>: <message>"`` of the failed read."""
    data = np.full(len(contents), b"", dtype=object)
    errors = np.full(len(contents), "", dtype=object)
    for i, content in enumerate(contents):
        if isinstance(content, Exception):
            errors[i] = error_message(content)
        else:
            data[i] = bytes(content)
    return {"uri": np.asarray(uris, dtype=object), "data": data, "error": errors}


def has_extensions(files: pa.Array, extensions: tuple[str, ...]) -> pa.BooleanArray:
    """Which of ``files`` (URIs) end in one of ``extensions``, ignoring case: ``storage.has_extension`` in Arrow."""
    lower = pc.utf8_lower(files)
    matched = pa.array(np.zeros(len(files), bool))
    for extension in extensions:
        matched = pc.or_(matched, pc.ends_with(lower, f".{extension}"))
    return matched


def input_block_bounds(count: int, first: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the URI blocks handed to Ray: doubling from ``first`` to MAX_INPUT_BLOCK."""
    bounds, start, size = [], 0, first
    while start < count:
        bounds.append((start, min(count, start + size)))
        start, size = start + size, max(first, min(2 * size, MAX_INPUT_BLOCK))
    return bounds


@dataclass(frozen=True)
class Layout:
    """One input layout: which listed files are its inputs, how they become Ray blocks, how a block is read.

    ``plan_input`` chooses the layout once; the pipeline and the job ask it, never which layout it is. The base
    class reads one file per block (a tar shard, a Parquet file), streaming out batches of its images.
    """

    config: InputConfig
    storage: Storage
    # The folder (``spool.spool_folder``) where a list of image URIs longer than ``spool.SPOOL_URIS`` is written
    # instead of being held by the driver; "" holds every list in memory.
    spool_folder: str = ""

    name: ClassVar[str]
    # What its listed inputs are, for people: "12 image files".
    noun: ClassVar[str]
    # The other files of a listing, which it ignores, are "not <kind>".
    kind: ClassVar[str]
    # Each listed URI is one image: the images are counted before reading, and those an earlier attempt labeled
    # are left out of the listing (``InputPlan.remaining``) instead of being read and dropped (``drop_done``).
    uri_per_image: ClassVar[bool] = False
    # The extensions of its files (not of the images in them).
    file_extensions: ClassVar[tuple[str, ...]] = ()

    @property
    def image_extensions(self) -> tuple[str, ...]:
        """``input.extensions`` in lower case, without dots."""
        return tuple(e.lower().lstrip(".") for e in self.config.extensions)

    def wanted(self) -> str:
        """What a location of this layout holds, for the message saying it holds none."""
        return f"{self.kind} (*.{', *.'.join(self.file_extensions)})"

    @property
    def extensions(self) -> tuple[str, ...]:
        """The extensions of the listed files that are its inputs."""
        return self.file_extensions

    def selects(self, files: pa.Array, single: bool) -> pa.BooleanArray:
        """Which listed files are its inputs (by their extension); a single file named explicitly with
        ``input.format`` set is taken whatever its extension."""
        if single and self.config.format == self.name:
            return pa.array(np.ones(len(files), bool))
        return has_extensions(files, self.extensions)

    def detects(self, selected: pa.ChunkedArray) -> bool:
        """Whether a listing whose files it selects are ``selected`` (not empty) holds its inputs
        (``input.format=auto`` takes the first layout that does)."""
        return True

    def listing(self) -> Spool:
        """Where its inputs are collected as they are listed: held in memory, or for image URIs (given a
        ``spool_folder``) written under the output past ``spool.SPOOL_URIS``."""
        written = self.uri_per_image and bool(self.spool_folder)
        return Spool(self.storage, self.spool_folder, "listed", limit=None if written else sys.maxsize)

    def plan(self, uris: pa.Array) -> InputPlan:
        """What the job reads of the selected files (checked, or expanded); the files themselves here.

        Raises:
            StorageError: they cannot be read as this layout.
        """
        return InputPlan(self, uris)

    def blocks(self, uris: pa.Array, batch_size: int) -> list[pa.Table]:
        """The blocks of ``uris`` handed to Ray's read tasks, each read file after file, streaming out batches:
        one file each, or as many as make ``MAX_FILE_BLOCKS`` blocks."""
        table = pa.table({"uri": uris})
        size = -(-len(uris) // MAX_FILE_BLOCKS)
        return [table.slice(i, size) for i in range(0, len(uris), size)]

    def read(
        self, batch: dict[str, np.ndarray], batch_size: int, run_uri: str | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Reads the inputs of a block, yielding at most ``batch_size`` images at a time (``encoded_batch``).

        ``run_uri``: the run being written, where a layout records the inputs it read to their end.
        """
        raise NotImplementedError

    def recorded_images(self, uris: pa.Array, done_uri: str) -> pa.Array:
        """The images in each of ``uris`` as far as the runs under ``done_uri`` know (null: not known).

        Where a layout knows its inputs' images before reading (``InputPlan.images``), this is not asked.
        """
        return pa.nulls(len(uris), pa.int64())


class ImageURILayout(Layout):
    """Inputs that are image URIs, each one image, read a batch at a time by ``Storage.read_waves``."""

    uri_per_image = True

    def collect(self, chunks: Iterable[pa.Array]) -> pa.ChunkedArray | SpooledURIs:
        """Image URIs, a chunk at a time: held in Arrow, or written to the spool folder past ``spool.SPOOL_URIS``."""
        listing = self.listing()
        listing.extend(chunks)
        return listing.finish()

    def blocks(self, uris: pa.Array | SpooledURIs, batch_size: int) -> list[pa.Table]:
        """Blocks of URIs doubling from one batch (``input_block_bounds``); of a written list, blocks of its row
        groups (``SpooledURIs.units``), at most ``MAX_FILE_BLOCKS``.

        The first blocks are small so reading and decoding start on every CPU at once; later ones are large
        because the driver puts each block into the object store one by one, and one block per batch would keep
        it putting for a long time on millions of images. Ray Data's streaming repartition, which cuts big blocks
        on the workers, stalled the job on 2 CPUs (model actor 1.5, decode tasks 0.5 each).
        """
        if isinstance(uris, SpooledURIs):
            units = uris.units()
            size = max(1, -(-len(units) // MAX_FILE_BLOCKS))
            return [units.slice(i, size) for i in range(0, len(units), size)]
        table = pa.table({"uri": uris})
        return [table.slice(start, stop - start) for start, stop in input_block_bounds(len(uris), batch_size)]

    def read(
        self, batch: dict[str, np.ndarray], batch_size: int, run_uri: str | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        if "plan" in batch:  # row groups of a written list
            lists = (
                read_spooled(self.storage, str(plan), ["uri"], [int(group)])["uri"].to_pylist()
                for plan, group in zip(batch["plan"], batch["row_group"], strict=True)
            )
        else:
            lists = iter([[str(u) for u in batch["uri"]]])
        for uris in lists:
            for start in range(0, len(uris), batch_size):
                chunk = uris[start : start + batch_size]
                for wave in self.read_waves(chunk):  # a slow read does not hold the rest of its batch
                    yield encoded_batch([chunk[i] for i, _ in wave], [content for _, content in wave])

    def read_waves(self, uris: list[str]) -> Iterator[list[tuple[int, bytes | Exception]]]:
        """Each image's bytes or what reading it raised, by index in ``uris``, in waves (``Storage.read_waves``)."""
        return self.storage.read_waves(uris)


class FilesLayout(ImageURILayout):
    """Loose image files."""

    name = "files"
    noun = "image files"
    kind = "images"

    def wanted(self) -> str:
        return f"image files with extensions {', '.join(self.image_extensions)}"

    @property
    def extensions(self) -> tuple[str, ...]:
        return self.image_extensions

    def selects(self, files: pa.Array, single: bool) -> pa.BooleanArray:
        return has_extensions(files, self.extensions)  # a single file named explicitly must be an image too


@dataclass(frozen=True)
class ManifestLayout(ImageURILayout):
    """Manifests (text, CSV, TSV, Parquet) listing image URIs.

    A line (text) or row (CSV, TSV) that is not UTF-8 is listed as ``<manifest>#line=<N>`` (``#row=<N>``), which
    is not read but becomes an error row naming it (``read_waves``): the other lines are labeled.
    """

    name = "manifest"
    noun = "image URIs from manifests"
    kind = "manifests"
    file_extensions = MANIFEST_EXTENSIONS
    # The manifests listed (``plan``): a URI ``<one of them>#line=<N>`` stands for a line that is not UTF-8.
    manifests: tuple[str, ...] = ()

    def plan(self, uris: pa.Array) -> InputPlan:
        """The image URIs the manifests list, each once, in the order first listed.

        The driver reads manifests as it lists files: it holds only URIs, in Arrow (never as Python strings), and
        the image reads are spread over read tasks exactly as for loose files (so a resumed run skips what it
        already labeled).
        """
        column = self.config.uri_column
        manifests = uris.to_pylist()
        listed = self.collect(c for m in manifests for c in manifest_chunks(m, column, self.storage))
        if not len(listed):
            raise StorageError(f"input {self.config.uri}: the manifests list no URIs")
        # An image listed twice is one input: one row, not two rows (or two parts) of the same uri.
        if isinstance(listed, SpooledURIs):
            unique, repeats = listed.unique()
        else:
            unique = first_occurrences(listed)
            repeats = len(listed) - len(unique)
        if repeats:
            log.warning(
                "input %s: %d URIs are listed more than once; each image is labeled once", self.config.uri, repeats
            )
        return InputPlan(dataclasses.replace(self, manifests=tuple(manifests)), unique)

    def read_waves(self, uris: list[str]) -> Iterator[list[tuple[int, bytes | Exception]]]:
        """Reads the images; a URI standing for a manifest line that is not UTF-8 is not read but gets an error
        naming the line (``UnicodeError: line 3 of manifest /data/m.txt is not UTF-8 ...``)."""
        manifests = set(self.manifests)
        not_utf8: list[tuple[int, bytes | Exception]] = []
        for i, uri in enumerate(uris):
            match = _NOT_UTF8.search(uri)
            if match and uri[: match.start()] in manifests:
                error = UnicodeError(
                    f"{match['unit']} {match['number']} of manifest {uri[: match.start()]} is not UTF-8; "
                    "save the manifest as UTF-8 to label it"
                )
                not_utf8.append((i, error))
        skipped = {i for i, _ in not_utf8}
        read = [i for i in range(len(uris)) if i not in skipped]
        for wave in super().read_waves([uris[i] for i in read]):
            # The errors go with the first wave, in the batch's order.
            yield sorted(not_utf8 + [(read[j], content) for j, content in wave], key=lambda item: item[0])
            not_utf8 = []
        if not_utf8:  # nothing else to read
            yield not_utf8


class WebDatasetLayout(Layout):
    """WebDataset tar shards, each read front to back by one task."""

    name = "webdataset"
    noun = "tar shards"
    kind = "tar shards"
    file_extensions = SHARD_EXTENSIONS

    def read(
        self, batch: dict[str, np.ndarray], batch_size: int, run_uri: str | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Reads each shard of the block front to back; once all its samples are handed on, records the shard as
        read to its end in ``run_uri``, with its sample count (``record_finished``)."""
        for shard in batch["uri"]:
            uris: list[str] = []
            contents: list[bytes | Exception] = []
            images = 0
            for uri, content in shard_images(str(shard), self.image_extensions, self.storage):
                uris.append(uri)
                contents.append(content)
                images += 1
                if len(uris) == batch_size:
                    yield encoded_batch(uris, contents)
                    uris, contents = [], []
            if uris:
                yield encoded_batch(uris, contents)
            if run_uri is not None:
                record_finished(run_uri, str(shard), images, self.storage)

    def recorded_images(self, uris: pa.Array, done_uri: str) -> pa.Array:
        """The sample counts the runs under ``done_uri`` recorded for the shards they read to their end."""
        return recorded_images(uris, done_uri, self.storage)


class ParquetLayout(Layout):
    """Parquet files of encoded images (``input.image_column``), a row's ``uri`` being ``FILE#ID``."""

    name = "parquet"
    noun = "Parquet files"
    kind = "Parquet files"
    file_extensions = PARQUET_EXTENSIONS

    def detects(self, selected: pa.ChunkedArray) -> bool:
        # Parquet files without the image column are manifests.
        return self.config.image_column in _parquet_columns(selected[0].as_py(), self.storage)

    def plan(self, uris: pa.Array) -> InputPlan:
        """The Parquet files, checked, with each one's row count (so a file whose rows are all written is skipped)."""
        files = uris.to_pylist()
        columns = _parquet_columns(files[0], self.storage)
        missing = [c for c in (self.config.image_column, self.config.id_column) if c not in columns]
        if missing:
            raise StorageError(
                f"input {files[0]} has no column {', '.join(missing)}; its columns: {', '.join(columns)}; "
                "set input.image_column and input.id_column"
            )
        rows = check_parquet_ids(files, self.config.id_column, self.storage)
        return InputPlan(self, uris, images=pa.array(rows, pa.int64()))

    def read(
        self, batch: dict[str, np.ndarray], batch_size: int, run_uri: str | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Reads the Parquet files of a block ``batch_size`` rows at a time.

        Ray Data's ``read_parquet`` is not used: in Ray 2.60 it plans a ``ListFiles`` operator whose tasks
        reserve a whole CPU and cannot be configured; beside a model actor holding 1.5 of 2 CPUs and a decode
        task holding the rest, that task is never scheduled and the job hangs (observed on the CI machine).
        """
        import pyarrow.parquet as pq

        id_column, image_column = self.config.id_column, self.config.image_column
        for uri in batch["uri"]:
            fs, path = self.storage.filesystem(str(uri))
            with fs.open(path, "rb") as f:
                for record_batch in pq.ParquetFile(f).iter_batches(
                    batch_size=batch_size, columns=[id_column, image_column]
                ):
                    columns = {
                        name: record_batch.column(name).to_numpy(zero_copy_only=False)
                        for name in (id_column, image_column)
                    }
                    yield parquet_batch(columns, id_column, image_column, str(uri))


# In the order ``input.format=auto`` tries them.
LAYOUTS = (FilesLayout, WebDatasetLayout, ParquetLayout, ManifestLayout)


class _Selection:
    """What one layout selects of a listing, taken a chunk at a time: its inputs (image files past
    ``spool.SPOOL_URIS`` written to the spool folder, as a manifest's URIs are), and how many files it ignores."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.inputs = layout.listing()
        self.ignored = 0
        self.shown: list[str] = []  # the first few ignored, for the log

    def add(self, files: pa.Array, single: bool) -> None:
        selected = self.layout.selects(files, single)
        self.inputs.add(files.filter(selected))
        others = len(files) - pc.sum(selected).as_py() if len(files) else 0
        if others:
            self.ignored += others
            if len(self.shown) < SHOWN_MEMBERS:
                self.shown += files.filter(pc.invert(selected))[: SHOWN_MEMBERS - len(self.shown)].to_pylist()

    def finish(self) -> pa.ChunkedArray | SpooledURIs:
        """The inputs: sorted when held (so runs are reproducible); a written list is in hash partitions anyway."""
        inputs = self.inputs.finish()
        if isinstance(inputs, SpooledURIs):
            return inputs
        return inputs.take(pc.sort_indices(inputs)) if len(inputs) else inputs


def select_inputs(
    config: InputConfig, storage: Storage, spool_folder: str = ""
) -> tuple[Layout, pa.ChunkedArray | SpooledURIs]:
    """Lists the input once (``Storage.list_files``), chunk by chunk, and decides its layout: the one
    ``input.format`` names, or with ``auto`` the first whose inputs the listing holds; and selects its inputs.

    Detection takes image files, then tar shards, then Parquet files with ``input.image_column`` (else those
    Parquet files are a manifest), then text or CSV manifests. A single file named explicitly is taken whatever
    its extension when the format is set (and is not ``files``).

    ``spool_folder``: where a long list of image files is written (``Layout.spool_folder``).

    Raises:
        StorageError: the input does not exist, or holds nothing of its layout (of any layout, with ``auto``).
    """
    chunks, single = storage.list_files(config.uri)
    layouts = [layout(config, storage, spool_folder) for layout in LAYOUTS]
    if config.format != "auto":
        layouts = [layout for layout in layouts if layout.name == config.format]
    selections = [_Selection(layout) for layout in layouts]
    for chunk in chunks:
        files = pa.array(chunk, pa.large_string())
        for selection in selections:
            selection.add(files, single)
        if len(selections[0].inputs):
            # Image files come first: once one is listed, the other layouts need not collect their inputs.
            selections = selections[:1]
    found = {id(selection.layout): selection for selection in selections}
    for layout in layouts:
        selection = found.get(id(layout))
        if selection is None:
            continue
        inputs = selection.finish()
        if config.format != "auto":
            break
        if len(inputs) and layout.detects(inputs):
            log.info("input format %s (detected from %s)", layout.name, config.uri)
            break
    else:
        extensions = layouts[0].image_extensions
        raise StorageError(
            f"input {config.uri} holds no image files ({', '.join(extensions)}), tar shards, Parquet files "
            "or manifests (txt, csv, tsv)"
        )
    if selection.ignored:
        log.info(
            "input %s: ignoring %d other files (not %s): %s%s",
            config.uri,
            selection.ignored,
            layout.kind,
            ", ".join(posixpath.basename(f) for f in selection.shown),
            ", ..." if selection.ignored > SHOWN_MEMBERS else "",
        )
    if not len(inputs):
        raise StorageError(f"input {config.uri} holds no {layout.wanted()}")
    return layout, inputs


@dataclass(frozen=True)
class InputPlan:
    """What the job reads: the layout and what was listed for it (image URIs, shards, or Parquet files).

    ``uris`` are Arrow strings (a list of str is taken and converted): the driver never holds the corpus as
    Python strings. A list of image URIs longer than ``spool.SPOOL_URIS`` is not held at all but written under
    the output (``SpooledURIs``), which ``release`` removes.
    """

    layout: Layout
    uris: pa.ChunkedArray | SpooledURIs
    # Images in each input, where known before reading (Parquet files' rows); each URI of an image layout is one.
    images: pa.Array | None = None
    # Rows an earlier attempt wrote of the inputs still to read, which the pipeline drops after reading
    # (``drop_done``): only those of unfinished shards or files, not every labeled row.
    skip: pa.Array | None = None

    def __post_init__(self) -> None:
        uris = self.uris
        if isinstance(uris, SpooledURIs):
            return
        if isinstance(uris, pa.Array):
            uris = pa.chunked_array([uris])
        elif not isinstance(uris, pa.ChunkedArray):
            uris = pa.chunked_array([pa.array(list(uris), pa.large_string())])
        object.__setattr__(self, "uris", uris.cast(pa.large_string()))

    def describe(self) -> str:
        return f"{len(self.uris)} {self.layout.noun}"

    def listed(self) -> pa.ChunkedArray:
        """Every input in the driver's memory, written or not (for the few who need them whole)."""
        return self.uris.to_arrow() if isinstance(self.uris, SpooledURIs) else self.uris

    def release(self) -> None:
        """Removes the list of inputs this plan (or one it was derived from) wrote under the output, if any."""
        if isinstance(self.uris, SpooledURIs):
            self.uris.remove()

    @property
    def image_count(self) -> int:
        """How many images the input holds where that is known before reading, else 0."""
        if self.layout.uri_per_image:
            return len(self.uris)
        return pc.sum(self.images).as_py() or 0 if self.images is not None else 0

    def remaining(self, done: Labeled | pa.Array) -> InputPlan:
        """What is left to read after earlier attempts wrote the rows of ``done`` (``folder.Labeled``).

        Where each URI is one image, the URIs without a row, in their order (those labeled are not even read).
        Otherwise (shards, Parquet files) an input is skipped without reading it when all its images have a row:
        its image count is known (``images``, or recorded by the run that read it to its end, the layout's
        ``recorded_images``) and that many rows start with ``INPUT#``. The others are read, and the rows already
        written of them, ``skip``, are dropped after reading. The written rows are read a batch at a time for
        this: the driver holds counts per input, and the rows of unfinished inputs, not every labeled row.
        """
        if len(done) == 0:
            return self
        if isinstance(done, pa.Array):  # an Iceberg table's: URIs, without the records of finished shards
            done = _Written(done)
        if isinstance(self.uris, SpooledURIs):  # compared a partition at a time, both lists written
            return InputPlan(self.layout, self.uris.without(done.batches()))
        if self.layout.uri_per_image:
            return InputPlan(self.layout, self.uris.filter(_not_done(self.uris, done.uris())))
        if pc.any(pc.match_substring(self.uris, "#")).as_py():
            # A row's input is its uri up to the first '#': with a '#' in an input's own URI rows cannot be told
            # apart by input, so every input is read and every written row dropped after reading.
            return dataclasses.replace(self, skip=done.uris())
        counts = [pc.value_counts(_input_of(batch)) for batch in done.batches()]
        per_input = pa.Table.from_struct_array(pa.chunked_array(counts)) if counts else None
        if per_input is None or not per_input.num_rows:
            return self
        per_input = per_input.group_by("values").aggregate([("counts", "sum")])
        index = pc.index_in(self.uris, value_set=per_input["values"].cast(pa.large_string()))
        written = pc.fill_null(pc.take(per_input["counts_sum"], index), 0).combine_chunks()
        known = self.images if self.images is not None else self.layout.recorded_images(self.uris, done.uri)
        unfinished = pc.invert(pc.fill_null(pc.equal(written, known), False))
        uris = self.uris.filter(unfinished)
        images = None if self.images is None else self.images.filter(unfinished)
        value_set = uris.cast(pa.string()).combine_chunks()
        skip = [batch.filter(pc.is_in(_input_of(batch), value_set=value_set)) for batch in done.batches()]
        return InputPlan(self.layout, uris, images, skip=pa.chunked_array(skip, pa.string()).combine_chunks())


def plan_input(config: InputConfig, storage: Storage, spool_folder: str = "") -> InputPlan:
    """Lists the input once, decides its layout and selects its inputs (``select_inputs``), and plans them.

    ``spool_folder``: where a list of image URIs longer than ``spool.SPOOL_URIS`` is written (``Layout.spool_folder``).

    Raises:
        StorageError: the input does not exist, holds nothing of its layout, or lacks the configured columns.
    """
    try:
        layout, inputs = select_inputs(config, storage, spool_folder)
        return layout.plan(inputs)
    except BaseException:
        if spool_folder:  # what was written of a list before its manifest failed, say
            spool.remove_folder(storage, spool_folder)
        raise


def _parquet_columns(uri: str, storage: Storage) -> list[str]:
    import pyarrow.parquet as pq

    fs, path = storage.pyarrow_filesystem(uri)
    try:
        return pq.read_schema(path, filesystem=fs).names
    except Exception as exc:
        raise StorageError(f"input {uri} cannot be read as Parquet: {type(exc).__name__}: {exc}") from None


def check_parquet_ids(uris: list[str], id_column: str, storage: Storage) -> list[int]:
    """Refuses Parquet input whose ids do not name each row of a file once (a row's ``uri`` is ``FILE#ID``).

    Only the id column is read, from every file at once.

    Returns:
        Each file's row count.

    Raises:
        StorageError: a file lacks the id column, has a null id, or repeats an id; the message names one.
    """
    import pyarrow.parquet as pq

    def problem(uri: str) -> tuple[str, int]:
        fs, path = storage.pyarrow_filesystem(uri)
        try:
            ids = pq.read_table(path, columns=[id_column], filesystem=fs).column(id_column)
        except Exception as exc:
            return f"its column {id_column} cannot be read: {type(exc).__name__}: {exc}", 0
        if ids.null_count:
            return f"{ids.null_count} rows have a null {id_column}", 0
        if pc.count_distinct(ids).as_py() < len(ids):
            counts = pc.value_counts(ids)
            repeated = counts.filter(pc.greater(counts.field("counts"), 1))
            first = repeated[0].as_py()
            return (
                f"{len(repeated)} values of {id_column} are on more than one row "
                f"(e.g. {first['values']!r} on {first['counts']} rows)"
            ), 0
        return "", len(ids)

    rows = []
    with ThreadPoolExecutor(min(LISTING_THREADS, len(uris))) as pool:
        for uri, (found, count) in zip(uris, pool.map(problem, uris), strict=True):
            if found:
                raise StorageError(
                    f"input {uri}: {found}; a row's uri is FILE#ID, so input.id_column must name each row of a "
                    "file once"
                )
            rows.append(count)
    return rows


def manifest_kind(uri: str) -> str:
    """``parquet``, ``csv`` (also ``tsv``) or ``text`` (one URI per line), from the manifest's extension."""
    if has_extension(uri, ("parquet",)):
        return "parquet"
    if has_extension(uri, ("csv", "tsv")):
        return "csv"
    return "text"


def manifest_chunks(uri: str, column: str, storage: Storage) -> Iterator[pa.Array]:
    """The image URIs a manifest lists, one per line (text), or its ``column`` (CSV, TSV, Parquet), in Arrow,
    about ``TEXT_CHUNK_BYTES`` of the manifest at a time.

    Leading and trailing whitespace is stripped and blanks are skipped, and in text manifests lines starting with
    ``#`` (comments). A relative path is resolved against the manifest's folder (``resolve_relative``); URIs with
    a scheme and absolute paths stay as they are. A text line, or a CSV or TSV row's value, that is not UTF-8 is
    listed as ``<uri>#line=<N>`` (``#row=<N>``, counting the rows after the header), for ``ManifestLayout`` to
    give an error row, and logged: one such line does not refuse the whole manifest.

    Raises:
        StorageError: the manifest cannot be read, or has no such column.
    """
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    kind = manifest_kind(uri)
    try:
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as f:
            if kind == "parquet":
                batches = (b.column(0) for b in pq.ParquetFile(f).iter_batches(batch_size=2**16, columns=[column]))
            elif kind == "csv":
                delimiter = "\t" if has_extension(uri, ("tsv",)) else ","
                batches = (
                    b.column(0)
                    for b in pacsv.open_csv(
                        f,
                        read_options=pacsv.ReadOptions(block_size=TEXT_CHUNK_BYTES),
                        parse_options=pacsv.ParseOptions(delimiter=delimiter),
                        # Bytes, checked a value at a time by _utf8: Arrow's strings refuse the whole block.
                        convert_options=pacsv.ConvertOptions(
                            include_columns=[column], column_types={column: pa.large_binary()}
                        ),
                    )
                )
            else:
                batches = _text_lines(f)
            unit = "line" if kind == "text" else "row"
            listed = 0  # lines or rows before the batch
            not_utf8: list[int] = []  # their numbers
            for values in batches:
                if kind != "parquet":
                    values = _utf8(values, f"{uri}#{unit}=", listed, not_utf8, comments=kind == "text")
                listed += len(values)
                yield _cleaned(values, uri, kind == "text")
            if not_utf8:
                log.warning(
                    "manifest %s: %d %ss are not UTF-8 (%s %s%s); each becomes an error row naming it, and the "
                    "others are labeled; save the manifest as UTF-8 to label them",
                    uri,
                    len(not_utf8),
                    unit,
                    unit,
                    ", ".join(map(str, not_utf8[:SHOWN_MEMBERS])),
                    ", ..." if len(not_utf8) > SHOWN_MEMBERS else "",
                )
    except Exception as exc:
        raise StorageError(f"manifest {uri} cannot be read: {type(exc).__name__}: {exc}") from None


def _cleaned(values: pa.Array, manifest: str, text: bool) -> pa.Array:
    """A chunk of a manifest's values as URIs: stripped, without blanks (and comments in text), resolved."""
    values = pc.utf8_trim_whitespace(values.cast(pa.large_string()).drop_null())  # also a CRLF's CR
    keep = pc.not_equal(values, "")
    if text:
        keep = pc.and_(keep, pc.invert(pc.starts_with(values, "#")))
    values = values.filter(keep)
    # Relative: not absolute, and no scheme (fsspec's: text before the first "://", of two characters or more).
    # The search for "://" runs only where some path is not absolute: it reads every byte of every URI.
    relative = pc.invert(pc.or_(pc.starts_with(values, "/"), pc.starts_with(values, "data:")))
    if pc.any(relative).as_py():
        relative = pc.and_(relative, pc.less(pc.find_substring(values, "://"), 2))
    if pc.any(relative).as_py():
        resolved = [resolve_relative(v, manifest) for v in values.filter(relative).to_pylist()]
        values = pc.replace_with_mask(values, relative, pa.array(resolved, pa.large_string()))
    return values


def _text_lines(f) -> Iterator[pa.Array]:
    """The lines of a text file, ``TEXT_CHUNK_BYTES`` at a time, as Arrow bytes (``_utf8`` makes them strings)."""

    def lines(data: bytes) -> pa.Array:
        offsets = pa.py_buffer(np.array([0, len(data)], np.int64))
        text = pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(data)])
        split = pc.list_flatten(pc.split_pattern(text, "\n"))
        return split[:-1] if data.endswith(b"\n") else split  # not the "line" after the last line's end

    rest = b""
    while chunk := f.read(TEXT_CHUNK_BYTES):
        data = rest + chunk
        end = data.rfind(b"\n") + 1  # a chunk is cut after a line's end, never inside a character
        rest = data[end:]
        if end:
            yield lines(data[:end])
    if rest:
        yield lines(rest)


def _utf8(values: pa.Array, marker: str, before: int, not_utf8: list[int], comments: bool) -> pa.Array:
    """A manifest's lines (or a CSV column's values) as strings, where ``before`` lines came before them; one that
    is not UTF-8 becomes ``<marker><its number>`` and its number is added to ``not_utf8`` (with ``comments``, a
    comment that is not UTF-8 is left out instead)."""
    try:
        return values.cast(pa.large_string())  # checks the UTF-8 of every value at once
    except pa.ArrowInvalid:
        pass
    decoded: list[str | None] = []
    for i, value in enumerate(values.to_pylist()):
        try:
            decoded.append(None if value is None else value.decode())
        except UnicodeDecodeError:
            if comments and value.strip().startswith(b"#"):
                decoded.append("")
            else:
                decoded.append(f"{marker}{before + i + 1}")
                not_utf8.append(before + i + 1)
    return pa.array(decoded, pa.large_string())


def resolve_relative(uri: str, manifest: str) -> str:
    """``uri`` as listed in ``manifest``: as it is with a scheme or an absolute path, else in the manifest's folder.

    ``img/a.jpg`` in ``s3://b/lists/m.txt`` is ``s3://b/lists/img/a.jpg``; in ``/data/m.txt``, ``/data/img/a.jpg``.
    """
    if split_protocol(uri)[0] or uri.startswith("/"):
        return uri
    protocol, path = split_protocol(manifest)
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), uri))
    return f"{protocol}://{resolved}" if protocol else resolved


def parquet_batch(
    batch: dict[str, np.ndarray], id_column: str, image_column: str, file_uri: str
) -> dict[str, np.ndarray]:
    """A batch of rows of the Parquet file ``file_uri`` holding encoded images, as read (``encoded_batch``).

    A row's ``uri`` is ``FILE#ID``, as a tar member's is ``SHARD#MEMBER``: ids need only be unique in their
    file (``check_parquet_ids``), and two files with the same ids are still two sets of images.
    """
    ids = [f"{file_uri}#{i}" for i in batch[id_column]]
    contents = [ValueError(f"{image_column} is null") if data is None else bytes(data) for data in batch[image_column]]
    return encoded_batch(ids, contents)


def _not_done(uris: pa.Array, done: pa.Array) -> pa.Array:
    """Per URI, whether it has no row in ``done``."""
    done = done.cast(uris.type)
    return pc.invert(pc.is_in(uris, value_set=done.combine_chunks() if isinstance(done, pa.ChunkedArray) else done))


@dataclass(frozen=True)
class _Written:
    """Written URIs given as an array, asked like ``folder.Labeled`` (no shard records: ``uri`` is empty)."""

    written: pa.Array
    uri: str = ""

    def __len__(self) -> int:
        return len(self.written)

    def batches(self) -> Iterator[pa.Array]:
        yield self.written.cast(pa.string())

    def uris(self) -> pa.Array:
        return self.written


def _input_of(uris: pa.Array) -> pa.Array:
    """The input (shard, Parquet file) of each row's ``uri``: up to its first '#'."""
    return pc.replace_substring_regex(uris, pattern="#.*", replacement="", max_replacements=1)


def drop_done(batch: dict[str, np.ndarray], done: pa.Array) -> dict[str, np.ndarray]:
    """Drops the rows whose ``uri`` an earlier attempt already wrote (resuming a run of shards or Parquet)."""
    keep = _not_done(pa.array(batch["uri"].tolist(), pa.large_string()), done).to_numpy(False)
    return {name: values[keep] for name, values in batch.items()}


def sample_key(member: str) -> str | None:
    """The WebDataset sample key of a tar member (``a/img_01.seg.png`` -> ``a/img_01``), None without one."""
    match = _SAMPLE_KEY.match(member)
    return match.group(1) if match else None


def shard_images(shard: str, extensions: tuple[str, ...], storage: Storage) -> Iterator[tuple[str, bytes | Exception]]:
    """Streams a WebDataset shard, yielding each sample's image as ``(shard#member, bytes)``.

    A sample (consecutive members sharing a key) yields its first member with an image extension; a sample
    without one yields ``(shard#key, ValueError)``. Image members this convention drops (a sample's second
    image, as ``photo.2025.jpg`` after ``photo.2024.jpg``, both of key ``photo``; a name without a key, as
    ``.hidden.jpg``) are counted and logged, once per shard. An image member over ``storage.max_image_bytes``
    yields ``OverByteLimit``: it is read through, never held. When the shard cannot be read to its end (truncated,
    corrupt, or unreachable), the samples before that point are yielded as usual and one last item,
    ``(shard#member-being-read, error)`` or ``(shard, error)`` when no member was being read, says where
    reading stopped; what follows in the shard is unknown.

    Ray Data's ``read_webdataset`` is not used: its tar iterator raises on a truncated or corrupt shard,
    failing the whole read task (so every sample of the shard, not only the unreadable ones, would be lost or
    the job would stop), raises on a repeated key, and keeps only each member's extension, not its name.
    """
    key: str | None = None
    image: tuple[str, bytes | Exception] | None = None
    limit = storage.config.max_image_bytes
    members: list[str] = []
    reading: str | None = None
    dropped: list[str] = []  # image members that are not labeled

    def finish() -> tuple[str, bytes | Exception]:
        if image is None:
            found = ", ".join(posixpath.basename(m) for m in members)
            return f"{shard}#{key}", ValueError(f"sample {key} has no image member (members: {found})")
        return f"{shard}#{image[0]}", image[1]

    try:
        fs, path = storage.filesystem(shard)
        # Stream mode ("r|*") reads the shard front to back once, gzip or not, without seeking.
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                member_key = sample_key(info.name)
                if member_key is None:
                    if has_extension(info.name, extensions):
                        dropped.append(info.name)
                    continue
                if member_key != key:
                    if key is not None:
                        yield finish()
                    key, image, members = member_key, None, []
                members.append(info.name)
                reading = info.name
                # Every member is read, not skipped: skipping a truncated member goes unnoticed in stream mode.
                # Only the sample's image is kept, if it is within the byte limit; the others are read and let go.
                member = tar.extractfile(info)
                wanted = image is None and has_extension(info.name, extensions)
                if wanted and info.size <= limit:
                    image = (info.name, member.read())
                else:
                    while member.read(READ_CHUNK):
                        pass
                    if wanted:
                        image = (info.name, OverByteLimit(limit, info.size))
                    elif has_extension(info.name, extensions):
                        dropped.append(info.name)
                reading = None
            # Stream mode ends quietly where a header is cut short or missing; only a whole block of zeros
            # (tar's end-of-archive marker, which every tar writer emits) ends a shard that is complete.
            if tar.fileobj.tell() - tar.offset != tarfile.BLOCKSIZE:
                raise tarfile.ReadError("unexpected end of data (no end-of-archive marker)")
    except Exception as exc:
        where = f" inside member {reading}" if reading else f" after member {members[-1]}" if members else ""
        log.warning("shard %s cannot be read%s: %s: %s", shard, where, type(exc).__name__, exc)
        error = _with_context(exc, f"shard cannot be read{where}: {exc}")
        if key is not None and image is not None:
            yield finish()  # the sample's image is whole; only what follows it is lost
            yield (f"{shard}#{reading}" if reading else shard), error
        elif key is not None:
            yield f"{shard}#{reading or key}", error
        else:
            yield shard, error
        _log_dropped(shard, dropped)
        return
    if key is not None:
        yield finish()
    _log_dropped(shard, dropped)


def _log_dropped(shard: str, dropped: list[str]) -> None:
    if dropped:
        log.warning(
            "shard %s: %d image members not labeled (%s%s): a WebDataset sample is the consecutive members "
            "sharing a key (the name up to its first dot), and only its first image is labeled",
            shard,
            len(dropped),
            ", ".join(dropped[:SHOWN_MEMBERS]),
            ", ..." if len(dropped) > SHOWN_MEMBERS else "",
        )


def _with_context(exc: Exception, message: str) -> Exception:
    """The same exception type with ``message`` (so error kinds stay ``ReadError`` etc.), or ``exc`` itself."""
    try:
        return type(exc)(message)
    except Exception:
        return exc


def _finished_name(input_uri: str) -> str:
    return hashlib.sha256(input_uri.encode()).hexdigest()[:32]


def record_finished(run_uri: str, input_uri: str, images: int, storage: Storage) -> None:
    """Records in the run's folder that ``input_uri`` was read to its end and holds ``images`` images."""
    fs, root = storage.filesystem(run_uri)
    folder = f"{root.rstrip('/')}/{FINISHED_INPUTS}"
    fs.makedirs(folder, exist_ok=True)
    fs.pipe_file(f"{folder}/{_finished_name(input_uri)}.{images}", b"")


def recorded_images(uris: pa.Array, done_uri: str, storage: Storage) -> pa.Array:
    """For each of ``uris``, the image count a run under ``done_uri`` recorded (``record_finished``), else null.

    One recursive listing of ``done_uri`` (a run's folder, or the output's for every run), no reads.
    """
    if not done_uri:
        return pa.nulls(len(uris), pa.int64())
    fs, root = storage.filesystem(done_uri)
    found = fs.find(root) if fs.exists(root) else []
    counts: dict[str, int] = {}
    for path in found:
        folder, name = posixpath.split(path)
        digest, _, images = name.partition(".")
        if posixpath.basename(folder) == FINISHED_INPUTS and images.isdigit():
            counts[digest] = int(images)
    return pa.array([counts.get(_finished_name(u)) for u in uris.to_pylist()], pa.int64())
