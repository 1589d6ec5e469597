"""Lists of image URIs longer than the driver should hold: partitioned by a hash of each URI into Parquet files."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mnasnet_batch.storage import Storage

log = logging.getLogger(__name__)

# URIs a list keeps in the driver's memory (~30 MB of Arrow at ~60 bytes a URI). Shorter lists, nearly every job's,
# are never written; a longer one is written out this many at a time, so the driver holds this many at most (and
# twice that while it sorts them into partitions).
SPOOL_URIS = 2**19
# Hash partitions of a written list. A URI repeated, or written by an earlier attempt, is always in the same
# partition, so repeats and written rows are found one partition at a time: at 10^8 URIs ~1.6 * 10^6 of them.
# At most 256: a partition's number is a byte.
PARTITIONS = 64
# URIs per Parquet row group of a written list: the unit a read task reads (``SpooledURIs.units``).
ROW_GROUP_URIS = 4_096
# The folder of the output under which a job writes its long lists, one folder per job, removed when it ends.
SPOOL_FOLDER = "_spool"
# The name of one job's folder under SPOOL_FOLDER (``spool_folder``): a uuid's hex.
_JOB_FOLDER = re.compile("[0-9a-f]{32}")


def spool_folder(output_uri: str) -> str:
    """A new folder for one job's written lists, under the output (which every node of a cluster can read)."""
    return f"{output_uri.rstrip('/')}/{SPOOL_FOLDER}/{uuid.uuid4().hex}"


# The base of ``uri_hashes``'s polynomial: odd, so invertible modulo 2^64.
_HASH_BASE = 0x100000001B3 * 2 + 1
# Bytes of strings hashed per numpy step: its temporaries (~16 bytes per byte, 2 MB) stay in a core's cache.
_HASH_BYTES = 2**17
# Pieces of a partition read at once: enough to hide an object store's latency.
READ_THREADS = 8


def uri_hashes(strings: pa.Array) -> np.ndarray:
    """A 64-bit hash of each string of a large_string array (equal strings, equal hashes).

    A polynomial in the base ``_HASH_BASE`` modulo 2^64 of each string's bytes, so that a whole step of strings
    costs two numpy passes over their bytes: each byte times the base's power of its place in the step, summed per
    string, then divided by the power of the string's own start (times the inverse's). splitmix64's finalizer then
    mixes every bit into the low ones that pick a partition. Such a polynomial has known colliding strings; a
    collision costs time, never exactness (``first_occurrence_mask`` compares the strings).
    """
    offsets = np.frombuffer(strings.buffers()[1], np.int64)[strings.offset : strings.offset + len(strings) + 1]
    data = np.frombuffer(strings.buffers()[2], np.uint8) if strings.buffers()[2] is not None else np.empty(0, np.uint8)
    result = np.empty(len(strings), np.uint64)
    first = 0
    while first < len(strings):
        # At least one string per step, however long, else as many as fit in _HASH_BYTES.
        last = max(first + 1, int(np.searchsorted(offsets, offsets[first] + _HASH_BYTES, "right")) - 1)
        ends = offsets[first : last + 1]
        starts = ends[:-1] - ends[0]
        size = int(ends[-1] - ends[0])
        powers, inverses = _hash_powers(size + 1)
        # One zero past the bytes: every start, an empty string's at the end too, is a valid index for reduceat.
        weighted = np.zeros(size + 1, np.uint64)
        np.multiply(powers[:size], data[ends[0] : ends[-1]], out=weighted[:size])
        sums = np.add.reduceat(weighted, starts)
        sums[ends[1:] == ends[:-1]] = 0  # reduceat gives an empty string the next byte
        result[first:last] = sums * inverses[starts]
        first = last
    result ^= np.diff(offsets).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        result ^= result >> np.uint64(shift)
        result *= np.uint64(factor)
    result ^= result >> np.uint64(31)
    return result


def _power_tables(size: int) -> tuple[np.ndarray, np.ndarray]:
    powers = np.full(size, _HASH_BASE, np.uint64)
    powers[0] = 1
    inverses = np.full(size, pow(_HASH_BASE, -1, 2**64), np.uint64)
    inverses[0] = 1
    return np.cumprod(powers, dtype=np.uint64), np.cumprod(inverses, dtype=np.uint64)


_step_power_tables = functools.cache(lambda: _power_tables(_HASH_BYTES + 1))


def _hash_powers(count: int) -> tuple[np.ndarray, np.ndarray]:
    """The base's first ``count`` powers and its inverse's: a step's from a kept table, a longer string's (a
    ``data:`` URI, say) made for it."""
    powers, inverses = _step_power_tables() if count <= _HASH_BYTES + 1 else _power_tables(count)
    return powers[:count], inverses[:count]


def _chunk_hashes(uris: pa.ChunkedArray) -> np.ndarray:
    if not uris.num_chunks:
        return np.empty(0, np.uint64)
    return np.concatenate([uri_hashes(chunk) for chunk in uris.cast(pa.large_string()).chunks])


def first_occurrences(uris: pa.ChunkedArray) -> pa.ChunkedArray:
    """``uris`` without repeats, each at its first place."""
    firsts = first_occurrence_mask(uris, _chunk_hashes(uris))
    return uris if firsts is None else uris.filter(pa.array(firsts))


def first_occurrence_mask(uris: pa.ChunkedArray, hashes: np.ndarray) -> np.ndarray | None:
    """Per URI, whether it is the first of its value; None when all are.

    Exact, in 8 bytes per URI beside them rather than a hash table of the strings (``pc.unique``'s, ~2x their
    size): their 64-bit hashes (``uri_hashes``) find the URIs that may be repeats, and only those are compared
    as strings.
    """
    repeated = _repeated(hashes)
    if not len(repeated):
        return None
    suspects = np.flatnonzero(np.isin(hashes, repeated))
    table = pa.table({"uri": uris.take(pa.array(suspects)), "row": suspects})
    first = table.group_by("uri", use_threads=False).aggregate([("row", "min")])["row_min"].to_numpy()
    keep = np.ones(len(uris), dtype=bool)
    keep[np.setdiff1d(suspects, first)] = False
    return keep


def _repeated(hashes: np.ndarray) -> np.ndarray:
    ordered = np.sort(hashes)
    return ordered[1:][ordered[1:] == ordered[:-1]]


@dataclass(frozen=True)
class Piece:
    """The URIs of one hash partition in one written file: ``rows`` of them, in row groups from ``first_group``."""

    partition: int
    file: str
    first_group: int
    rows: int

    @property
    def groups(self) -> list[int]:
        return list(range(self.first_group, self.first_group + -(-self.rows // ROW_GROUP_URIS)))


@dataclass(frozen=True)
class SpooledURIs:
    """A list of URIs written under ``folder``: Parquet files of ``uri`` and ``hash`` columns, in pieces of one hash
    partition each (``Piece``), each piece in the order its URIs were listed."""

    storage: Storage
    folder: str
    pieces: tuple[Piece, ...]
    # The footer of each file read so far: a partition is a few row groups of each file, read one partition at a
    # time, so each file is opened ``PARTITIONS`` times and parsing its footer each time would cost more than that.
    footers: dict[str, pq.FileMetaData] = field(default_factory=dict, compare=False, repr=False)

    def __len__(self) -> int:
        return sum(piece.rows for piece in self.pieces)

    def partitions(self) -> Iterator[tuple[int, list[Piece]]]:
        """Each partition's number and pieces, for the partitions that have any."""
        for number in range(PARTITIONS):
            mine = [piece for piece in self.pieces if piece.partition == number]
            if mine:
                yield number, mine

    def partition(self, number: int, columns: list[str] | None = None) -> pa.Table:
        """The ``uri`` and ``hash`` (or ``columns``) of one partition, in order."""
        return self.read([piece for piece in self.pieces if piece.partition == number], columns)

    def read(self, pieces: list[Piece], columns: list[str] | None = None) -> pa.Table:
        """The ``uri`` and ``hash`` (or ``columns``) of ``pieces``, in order; read concurrently."""
        with ThreadPoolExecutor(READ_THREADS) as pool:
            tables = list(pool.map(lambda piece: self._read(piece, columns), pieces))
        if not tables:
            return pa.table({"uri": pa.array([], pa.large_string()), "hash": pa.array([], pa.uint64())})
        return pa.concat_tables(tables)

    def chunks(self) -> Iterator[pa.Array]:
        """Every URI, a piece at a time (partition by partition, not in the listed order)."""
        for piece in self.pieces:
            yield from self._read(piece, ["uri"])["uri"].chunks

    def to_arrow(self) -> pa.ChunkedArray:
        """Every URI, in the driver's memory (for the few who need them whole)."""
        return pa.chunked_array(list(self.chunks()), pa.large_string())

    def units(self) -> pa.Table:
        """What read tasks read, a row group each: ``plan`` (a file) and ``row_group``."""
        files, groups = [], []
        for piece in self.pieces:
            files += [piece.file] * len(piece.groups)
            groups += piece.groups
        return pa.table({"plan": pa.array(files, pa.string()), "row_group": pa.array(groups, pa.int32())})

    def unique(self) -> tuple[SpooledURIs, int]:
        """The list without repeats (each URI at its first place in its partition), and how many were dropped.

        Only the hashes are read for a partition without repeated hashes; the others are read and rewritten.
        """
        kept, dropped = [], 0
        for number, mine in self.partitions():
            hashes = self.read(mine, ["hash"])["hash"].to_numpy()
            if not len(_repeated(hashes)):
                kept += mine
                continue
            table = self.read(mine)
            firsts = first_occurrence_mask(table["uri"], hashes)
            dropped += len(table) - int(firsts.sum())
            kept.append(self._write(number, "unique", table.filter(pa.array(firsts))))
        return SpooledURIs(self.storage, self.folder, tuple(kept), self.footers), dropped

    def without(self, written: Iterable[pa.Array]) -> SpooledURIs:
        """The list without the URIs in ``written`` (batches of URIs), compared one partition at a time.

        ``written`` is itself written under this list's folder, partitioned the same way, batch by batch.
        """
        spool = Spool(self.storage, self.folder, "written")
        spool.extend(written)
        done = spool.finish(write=True)
        left = []
        for number, mine in self.partitions():
            written_here = done.partition(number)["uri"]
            if not len(written_here):
                left += mine
                continue
            table = self.read(mine)
            remaining = table.filter(pc.invert(pc.is_in(table["uri"], value_set=written_here.combine_chunks())))
            if len(remaining) == len(table):
                left += mine
            elif len(remaining):
                left.append(self._write(number, "left", remaining))
        done.remove_files()
        return SpooledURIs(self.storage, self.folder, tuple(left), self.footers)

    def remove(self) -> None:
        """Removes the folder of this list (and of every list written beside it)."""
        remove_folder(self.storage, self.folder)

    def remove_files(self) -> None:
        """Removes this list's own files."""
        for uri in dict.fromkeys(piece.file for piece in self.pieces):
            fs, path = self.storage.filesystem(uri)
            fs.rm(path)

    def _read(self, piece: Piece, columns: list[str] | None = None) -> pa.Table:
        return read_spooled(self.storage, piece.file, columns, piece.groups, self.footers)

    def _write(self, number: int, name: str, table: pa.Table) -> Piece:
        uri = f"{self.folder}/{name}/{number:03d}.parquet"
        write_spooled(self.storage, uri, [table])
        return Piece(number, uri, 0, len(table))


def remove_folder(storage: Storage, folder: str) -> None:
    """Removes a job's folder of written lists (``spool_folder``), if there is one."""
    fs, path = storage.filesystem(folder)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def remove_abandoned(fs, output_root: str, older_than_s: float) -> None:
    """Removes the written lists of jobs that ended without removing them (a driver killed by SIGKILL, a lost
    machine): each folder under the output's ``SPOOL_FOLDER`` with no file written for ``older_than_s``.

    For the job that holds the output's lease (``fs``, ``output_root``: its filesystem and path). Any other live
    job's folder is one still being listed into, by a job that has not got the lease yet: its newest file is
    seconds old, as is this job's own.
    """
    try:
        folders = fs.ls(f"{output_root.rstrip('/')}/{SPOOL_FOLDER}", detail=False)
    except FileNotFoundError:
        return
    now = time.time()
    for folder in folders:
        if not _JOB_FOLDER.fullmatch(os.path.basename(folder.rstrip("/"))):
            continue  # not a name spool_folder gives: a user's, kept
        files = fs.find(folder)
        if not all(path.endswith(".parquet") for path in files):
            continue  # only this job's lists of URIs are removed, never a file it did not write
        written = [fs.modified(path).timestamp() for path in files]
        if written and now - max(written) > older_than_s:
            log.warning("removing %s: lists of URIs a job left when it was killed", folder)
            fs.rm(folder, recursive=True)


def read_spooled(
    storage: Storage,
    uri: str,
    columns: list[str] | None = None,
    row_groups: list[int] | None = None,
    footers: dict[str, pq.FileMetaData] | None = None,
) -> pa.Table:
    """A written list's file, or some of its row groups; ``footers``: the files' footers already read, by URI
    (this file's is added)."""
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f, metadata=footers.get(uri) if footers is not None else None)
        if footers is not None:
            footers[uri] = parquet.metadata
        return parquet.read(columns) if row_groups is None else parquet.read_row_groups(row_groups, columns)


def write_spooled(storage: Storage, uri: str, tables: list[pa.Table]) -> None:
    """Writes ``tables`` (of one schema) to one file, each in row groups of its own of ``ROW_GROUP_URIS``."""
    fs, path = storage.filesystem(uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    # URIs compress ~5x; random hashes not at all, so compressing them only costs time (both ways).
    compression = {name: "none" if name == "hash" else "zstd" for name in tables[0].column_names}
    with (
        fs.open(path, "wb") as f,
        pq.ParquetWriter(f, tables[0].schema, compression=compression, use_dictionary=False) as writer,
    ):
        for table in tables:
            writer.write_table(table, row_group_size=ROW_GROUP_URIS)  # never shares a row group with the one before


class Spool:
    """Collects a list of URIs chunk by chunk: in memory up to ``limit`` URIs, then in files under ``folder``.

    Past the limit, what is held is written out, sorted into hash partitions, to one file (one ``Piece`` per
    partition), and so is every further ``limit`` URIs: the driver never holds more than ``limit`` of them (plus
    a chunk, and the one file still being written while the next ``limit`` are listed).
    """

    def __init__(self, storage: Storage, folder: str, name: str, limit: int | None = None):
        self.storage, self.folder, self.name = storage, folder, name
        self.limit = SPOOL_URIS if limit is None else limit
        self.held: list[pa.Array] = []
        self.count = 0
        self.pieces: list[Piece] = []
        self.written = 0  # URIs in the pieces
        self.flushes = 0
        self.writing: Future | None = None

    def __len__(self) -> int:
        """The URIs added so far."""
        return self.count + self.written

    def add(self, uris: pa.Array) -> None:
        if len(uris):
            self.held.append(uris.cast(pa.large_string()))
            self.count += len(uris)
        if self.count > self.limit:
            self._flush()

    def extend(self, chunks: Iterable[pa.Array]) -> None:
        """Adds every chunk; if one cannot be had, waits for the file being written (nothing writes on) and raises."""
        try:
            for chunk in chunks:
                self.add(chunk)
        except BaseException:
            with contextlib.suppress(Exception):
                self._written()
            raise

    def finish(self, write: bool = False) -> pa.ChunkedArray | SpooledURIs:
        """The list: in memory if it never passed the limit (and not ``write``), else written (``SpooledURIs``)."""
        if not self.pieces and self.count <= self.limit and not write:
            return pa.chunked_array(self.held, pa.large_string())
        self._flush()
        self._written()
        return SpooledURIs(self.storage, self.folder, tuple(self.pieces))

    def _flush(self) -> None:
        if not self.count:
            return
        if not self.flushes and self.count > self.limit:
            log.info("more than %d %s URIs: writing them under %s", self.limit, self.name, self.folder)
        uris = pa.chunked_array(self.held, pa.large_string()).combine_chunks()
        self.held, self.count = [], 0
        hashes = uri_hashes(uris)
        partition = (hashes % np.uint64(PARTITIONS)).astype(np.uint8)
        order = np.argsort(partition, kind="stable")  # listed order within each partition (a radix sort of bytes)
        bounds = np.searchsorted(partition[order], np.arange(PARTITIONS + 1))
        table = pa.table({"uri": uris.take(pa.array(order)), "hash": hashes[order]})
        self.written += len(uris)
        del uris, hashes
        uri = f"{self.folder}/{self.name}/{self.flushes:06d}.parquet"
        parts = []
        for number in range(PARTITIONS):
            start, stop = int(bounds[number]), int(bounds[number + 1])
            if stop > start:
                part = table.slice(start, stop - start)
                first = self.pieces[-1].first_group + len(self.pieces[-1].groups) if parts else 0
                self.pieces.append(Piece(number, uri, first, len(part)))
                parts.append(part)
        # Written while the next URIs are listed; one file at a time, so at most one is held for it.
        self._written()
        pool = ThreadPoolExecutor(1)
        self.writing = pool.submit(write_spooled, self.storage, uri, parts)
        pool.shutdown(wait=False)
        self.flushes += 1

    def _written(self) -> None:
        """Waits for the file being written, if any (raising its error)."""
        if self.writing is not None:
            writing, self.writing = self.writing, None
            writing.result()
