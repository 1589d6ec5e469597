"""What every input layout is (``Layout``; image URIs: ``ImageURILayout``) and what a job reads (``InputPlan``).

One module per layout subclasses ``Layout`` (``files``, ``manifests``, ``webdataset``, ``parquet``); ``listing``
lists the input once and chooses the layout.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mnasnet_batch.config import InputConfig
from mnasnet_batch.decode.preprocess import error_message
from mnasnet_batch.inputs.kept import KEPT, NO_COLUMNS
from mnasnet_batch.inputs.spool import Spool, SpooledURIs, read_spooled
from mnasnet_batch.storage import Storage

if TYPE_CHECKING:
    from mnasnet_batch.outputs.folder import Labeled

# Member names a warning about dropped members shows; the count says how many there are in all.
SHOWN_MEMBERS = 3
# URIs per block handed from the driver to Ray: the first block holds one decode batch, each next one twice
# as many, up to 4,096, so the first decode tasks start at once and 10^5 URIs take ~30 object puts, not 3,000.
MAX_INPUT_BLOCK = 4_096
# Encoded bytes a read task holds for decoding at a time, at most (beyond one image larger than this): 32 MiB is
# a decode batch (preprocess.batch_size) of 32 ImageNet-sized JPEGs many times over, and ~10 phone photos; more
# would only grow each task's memory, since decoding takes one image at a time.
READ_BATCH_BYTES = 32 * 2**20
# Seconds a sample of image URIs (``ImageURILayout.sample``) waits for its reads: a slow server delays the job's
# start by no more than this, and its images are left out of the sample.
SAMPLE_READ_S = 3.0
# Blocks of files (shards, Parquet files) handed to Ray: one file each up to this many files, else as many files
# each as spread them over this many blocks. The driver puts each block into the object store one by one: a put
# per file of 10^5 shards delayed the first task the longest of anything (docs/benchmarks.md, corpus scale).
MAX_FILE_BLOCKS = 1_024


def encoded_batch(
    uris: Sequence[str], contents: Sequence[bytes | Exception], kept: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """A batch as the read stage hands it on: ``uri``; ``data``, the encoded image (b"" where reading failed);
    ``error``, "" or ``"<ExceptionType>: <message>"`` of the failed read; with ``input.keep_columns``, ``kept``,
    each row's kept values (``kept.pack_rows``)."""
    data = np.full(len(contents), b"", dtype=object)
    errors = np.full(len(contents), "", dtype=object)
    for i, content in enumerate(contents):
        if isinstance(content, Exception):
            errors[i] = error_message(content)
        else:
            data[i] = bytes(content)
    batch = {"uri": np.asarray(uris, dtype=object), "data": data, "error": errors}
    if kept is not None:
        batch[KEPT] = kept
    return batch


def has_extensions(files: pa.Array, extensions: tuple[str, ...]) -> pa.BooleanArray:
    """Which of ``files`` (URIs) end in one of ``extensions``, ignoring case: ``storage.has_extension`` in Arrow."""
    lower = pc.utf8_lower(files)
    matched = pa.array(np.zeros(len(files), bool))
    for extension in extensions:
        matched = pc.or_(matched, pc.ends_with(lower, f".{extension}"))
    return matched


def input_block_bounds(count: int, first: int, largest: int = MAX_INPUT_BLOCK) -> list[tuple[int, int]]:
    """``(start, stop)`` of the URI blocks handed to Ray: doubling from ``first`` to ``largest`` (at most
    MAX_INPUT_BLOCK)."""
    largest = min(largest, MAX_INPUT_BLOCK)
    bounds, start, size = [], 0, first
    while start < count:
        bounds.append((start, min(count, start + size)))
        start, size = start + size, max(first, min(2 * size, largest))
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
    # The dataset's own columns copied into each output row (``input.keep_columns``), in the input's types: known
    # once the input is planned (``plan``), empty until then or without the setting.
    kept: pa.Schema = NO_COLUMNS

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
    # Its inputs have columns of their own that ``input.keep_columns`` can copy into the output rows.
    keeps_columns: ClassVar[bool] = False

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

    def blocks(self, uris: pa.Array, batch_size: int, largest: int = MAX_INPUT_BLOCK) -> list[pa.Table]:
        """The blocks of ``uris`` handed to Ray's read tasks, each read file after file, streaming out batches:
        one file each, or as many as make ``MAX_FILE_BLOCKS`` blocks. ``largest``: the most images a block of
        image URIs holds (``ImageURILayout``)."""
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

    def sample(self, uris: pa.ChunkedArray | SpooledURIs, count: int) -> dict[str, np.ndarray]:
        """Up to ``count`` images of the input as read (``encoded_batch``), to measure what decoding them costs
        (``costs.measure``): the first of its first file."""
        reads = self.read({"uri": np.asarray(uris[:1].to_pylist(), dtype=object)}, count)
        try:
            return next(reads, encoded_batch([], []))
        finally:
            reads.close()  # the rest of the file is not read

    def recorded_images(self, uris: pa.Array, done_uri: str) -> pa.Array:
        """The images in each of ``uris`` as far as the runs under ``done_uri`` know (null: not known).

        Where a layout knows its inputs' images before reading (``InputPlan.images``), this is not asked.
        """
        return pa.nulls(len(uris), pa.int64())

    def row_input(self, uri: str) -> str:
        """The input file a row's ``uri`` was read from: the shard of ``SHARD#MEMBER``, the file of ``FILE#ID``.

        The input ends where one of its file extensions is followed by ``#`` (``a#1.tar#b.jpg`` is of ``a#1.tar``),
        else at the first ``#``; a row naming a whole input (a shard that could not be read) is that input.
        """
        lower = uri.lower()
        ends = [lower.find(f".{extension}#") for extension in self.file_extensions]
        found = [(end, extension) for end, extension in zip(ends, self.file_extensions, strict=True) if end >= 0]
        if found:
            end, extension = min(found)
            return uri[: end + 1 + len(extension)]
        return uri.split("#", 1)[0]

    def row_inputs(self, uris: Iterable[str]) -> dict[str, list[str]]:
        """Rows' ``uri`` grouped by the input file each was read from (``row_input``), in first-seen order, so that
        ``read_rows`` reads each input once for all of them."""
        grouped: dict[str, list[str]] = {}
        for uri in uris:
            grouped.setdefault(self.row_input(uri), []).append(uri)
        return grouped

    def read_rows(self, input_uri: str, uris: Sequence[str]) -> dict[str, bytes | Exception]:
        """The encoded images that the output rows ``uris``, all of ``input_uri``, were labeled from, read again as
        the job read them (for a report's thumbnails): the input is read once, for all of them.

        Returns:
            For each of ``uris``, its bytes or what reading it raised; ``FileNotFoundError`` for an image the input
            no longer holds.
        """
        raise NotImplementedError


class ImageURILayout(Layout):
    """Inputs that are image URIs, each one image, read a batch at a time by ``Storage.read_waves``."""

    uri_per_image = True

    def collect(self, chunks: Iterable[pa.Array]) -> pa.ChunkedArray | SpooledURIs:
        """Image URIs, a chunk at a time: held in Arrow, or written to the spool folder past ``spool.SPOOL_URIS``."""
        listing = self.listing()
        listing.extend(chunks)
        return listing.finish()

    def blocks(
        self, uris: pa.Array | SpooledURIs, batch_size: int, largest: int = MAX_INPUT_BLOCK
    ) -> list[pa.Table]:
        """Blocks of URIs doubling from one batch (``input_block_bounds``); of a written list, blocks of its row
        groups (``SpooledURIs.units``), at most ``MAX_FILE_BLOCKS``.

        The first blocks are small so reading and decoding start on every CPU at once; later ones are large
        because the driver puts each block into the object store one by one, and one block per batch would keep
        it putting for a long time on millions of images. Images costly to decode make smaller blocks
        (``largest``, ``StageCosts.block_images``): a task of 4,096 phone photos would decode for ten minutes on
        one CPU, and a cluster would run fewer tasks than it has CPUs. Ray Data's streaming repartition, which
        cuts big blocks on the workers, stalled the job on 2 CPUs (model actor 1.5, decode tasks 0.5 each).
        """
        if isinstance(uris, SpooledURIs):
            units = uris.units()
            size = max(1, -(-len(units) // MAX_FILE_BLOCKS))
            return [units.slice(i, size) for i in range(0, len(units), size)]
        table = pa.table({"uri": uris})
        bounds = input_block_bounds(len(uris), batch_size, largest)
        return [table.slice(start, stop - start) for start, stop in bounds]

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
        # A manifest's kept values come with its URIs' block (``ManifestLayout.blocks``).
        kept = batch.get(KEPT)
        size = batch_size
        for uris in lists:
            offset, chunk = 0, uris[:size]
            waves = self.read_waves(chunk) if chunk else iter(())
            while chunk:
                chunk_kept = None if kept is None else kept[offset : offset + len(chunk)]
                read = seen = 0
                following = None
                for wave in waves:  # a slow read does not hold the rest of its batch
                    read += sum(len(content) for _, content in wave if isinstance(content, bytes))
                    seen += len(wave)
                    if following is None:
                        # The next batch's reads start once this one's first images show their sizes, before they
                        # are handed on: objects and URLs are read while this batch is decoded, and a throttled
                        # read's retries overlap the decoding too. Batches of images larger than the job planned
                        # for (a mixed corpus) hold READ_BATCH_BYTES at most.
                        size = max(1, min(batch_size, READ_BATCH_BYTES * seen // max(1, read)))
                        start = offset + len(chunk)
                        following = (start, uris[start : start + size])
                        following_waves = self.read_waves(following[1]) if following[1] else iter(())
                    wave_kept = None if chunk_kept is None else np.asarray([chunk_kept[i] for i, _ in wave], object)
                    yield encoded_batch([chunk[i] for i, _ in wave], [content for _, content in wave], wave_kept)
                if following is None:
                    break
                (offset, chunk), waves = following, following_waves

    def sample(self, uris: pa.ChunkedArray | SpooledURIs, count: int) -> dict[str, np.ndarray]:
        """Up to ``count`` images spread evenly over the listing, so that a mixed corpus is measured as mixed; of a
        written list, the first of its first part."""
        if isinstance(uris, SpooledURIs):
            plan, groups = _first_unit(uris)
            chosen = read_spooled(self.storage, plan, ["uri"], groups)["uri"].to_pylist()[:count]
        else:
            positions = np.unique(np.linspace(0, len(uris) - 1, min(count, len(uris))).astype(np.int64))
            chosen = uris.take(pa.array(positions)).to_pylist() if len(uris) else []
        read = [item for wave in self.read_waves(chosen, SAMPLE_READ_S) for item in wave]
        return encoded_batch([chosen[i] for i, _ in read], [content for _, content in read])

    def read_waves(
        self, uris: list[str], within_s: float | None = None
    ) -> Iterator[list[tuple[int, bytes | Exception]]]:
        """Each image's bytes or what reading it raised, by index in ``uris``, in waves (``Storage.read_waves``)."""
        return self.storage.read_waves(uris, within_s)

    def row_input(self, uri: str) -> str:
        """Each row's ``uri`` is its own input: the image's URI."""
        return uri

    def read_rows(self, input_uri: str, uris: Sequence[str]) -> dict[str, bytes | Exception]:
        """The images' bytes within ``storage.max_image_bytes``, as the job reads them (``read_waves``)."""
        uris = list(uris)
        return {uris[i]: content for wave in self.read_waves(uris) for i, content in wave}


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


def _first_unit(uris: SpooledURIs) -> tuple[str, list[int]]:
    """The written part and row group that a written list's first block starts with (``SpooledURIs.units``)."""
    first = uris.units().slice(0, 1).to_pylist()[0]
    return str(first["plan"]), [int(first["row_group"])]


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
