"""Lists of image URIs longer than the driver should hold: partitioned by a hash of each URI into Parquet files."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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
PARTITIONS = 64
# URIs per Parquet row group of a written list: the unit a read task reads (``SpooledURIs.units``).
ROW_GROUP_URIS = 4_096
# The folder of the output under which a job writes its long lists, one folder per job, removed when it ends.
SPOOL_FOLDER = "_spool"


def spool_folder(output_uri: str) -> str:
    """A new folder for one job's written lists, under the output (which every node of a cluster can read)."""
    return f"{output_uri.rstrip('/')}/{SPOOL_FOLDER}/{uuid.uuid4().hex}"


# Random odd 64-bit multipliers, one per byte position (mod their count) of a string, for ``uri_hashes``.
_HASH_WEIGHTS = np.random.default_rng(20261201).integers(1, 2**63, 4096, dtype=np.uint64) * 2 + 1
# Strings hashed per numpy step: its temporaries are ~50 bytes per byte of the strings, ~20 MB for 8,192 URIs.
_HASH_ROWS = 8_192
# Files written (or read) at once: enough to hide an object store's latency; each holds its file's buffers.
WRITE_THREADS = 8


def uri_hashes(strings: pa.Array) -> np.ndarray:
    """A 64-bit hash of each string of a large_string array of non-empty strings (equal strings, equal hashes)."""
    offsets = np.frombuffer(strings.buffers()[1], np.int64)[strings.offset : strings.offset + len(strings) + 1]
    data = np.frombuffer(strings.buffers()[2], np.uint8) if strings.buffers()[2] is not None else np.empty(0, np.uint8)
    result = np.empty(len(strings), np.uint64)
    for first in range(0, len(strings), _HASH_ROWS):
        ends = offsets[first : first + _HASH_ROWS + 1]
        starts, lengths = ends[:-1] - ends[0], np.diff(ends)
        # Each byte's position in its string picks its weight; the products are summed per string.
        position = np.arange(ends[-1] - ends[0], dtype=np.int64)
        position -= np.repeat(starts, lengths)
        np.remainder(position, len(_HASH_WEIGHTS), out=position)
        weighted = _HASH_WEIGHTS[position]
        weighted *= data[ends[0] : ends[-1]]
        sums = np.add.reduceat(weighted, starts) if len(weighted) else np.zeros(len(starts), np.uint64)
        result[first : first + len(starts)] = sums ^ (lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    return result


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
class SpooledURIs:
    """A list of URIs written under ``folder``: Parquet files of ``uri`` and ``hash`` columns, each file holding
    URIs of one hash partition, in the order they were listed."""

    storage: Storage
    folder: str
    # (partition, file URI, rows) of every file.
    files: tuple[tuple[int, str, int], ...]

    def __len__(self) -> int:
        return sum(rows for _, _, rows in self.files)

    def partitions(self) -> Iterator[tuple[int, list[tuple[int, str, int]]]]:
        """Each partition's number and files, for the partitions that have any."""
        for number in range(PARTITIONS):
            mine = [f for f in self.files if f[0] == number]
            if mine:
                yield number, mine

    def partition(self, number: int, columns: list[str] | None = None) -> pa.Table:
        """The ``uri`` and ``hash`` (or ``columns``) of one partition, in order; its files are read concurrently."""
        uris = [uri for p, uri, _ in self.files if p == number]
        with ThreadPoolExecutor(WRITE_THREADS) as pool:
            tables = list(pool.map(lambda uri: self._read(uri, columns), uris))
        if not tables:
            return pa.table({"uri": pa.array([], pa.large_string()), "hash": pa.array([], pa.uint64())})
        return pa.concat_tables(tables)

    def chunks(self) -> Iterator[pa.Array]:
        """Every URI, a file at a time (partition by partition, not in the listed order)."""
        for _, uri, _ in self.files:
            yield from self._read(uri)["uri"].chunks

    def to_arrow(self) -> pa.ChunkedArray:
        """Every URI, in the driver's memory (for the few who need them whole)."""
        return pa.chunked_array(list(self.chunks()), pa.large_string())

    def units(self) -> pa.Table:
        """What read tasks read, a row group each: ``plan`` (a file) and ``row_group``."""
        files, groups = [], []
        for _, uri, rows in self.files:
            count = -(-rows // ROW_GROUP_URIS)
            files += [uri] * count
            groups += range(count)
        return pa.table({"plan": pa.array(files, pa.string()), "row_group": pa.array(groups, pa.int32())})

    def unique(self) -> tuple[SpooledURIs, int]:
        """The list without repeats (each URI at its first place in its partition), and how many were dropped.

        Only the hashes are read for a partition without repeated hashes; the others are read and rewritten.
        """
        kept, dropped = [], 0
        for number, mine in self.partitions():
            hashes = self.partition(number, ["hash"])["hash"].to_numpy()
            if not len(_repeated(hashes)):
                kept += mine
                continue
            table = self.partition(number)
            firsts = first_occurrence_mask(table["uri"], hashes)
            dropped += len(table) - int(firsts.sum())
            kept.append(self._write(number, "unique", table.filter(pa.array(firsts))))
        return SpooledURIs(self.storage, self.folder, tuple(kept)), dropped

    def without(self, written: Iterable[pa.Array]) -> SpooledURIs:
        """The list without the URIs in ``written`` (batches of URIs), compared one partition at a time.

        ``written`` is itself written under this list's folder, partitioned the same way, batch by batch.
        """
        spool = Spool(self.storage, self.folder, "written")
        for batch in written:
            spool.add(batch)
        done = spool.finish(write=True)
        left = []
        for number, mine in self.partitions():
            written_here = done.partition(number)["uri"]
            if not len(written_here):
                left += mine
                continue
            table = self.partition(number)
            remaining = table.filter(pc.invert(pc.is_in(table["uri"], value_set=written_here.combine_chunks())))
            if len(remaining) == len(table):
                left += mine
            elif len(remaining):
                left.append(self._write(number, "left", remaining))
        done.remove_files()
        return SpooledURIs(self.storage, self.folder, tuple(left))

    def remove(self) -> None:
        """Removes the folder of this list (and of every list written beside it)."""
        fs, path = self.storage.filesystem(self.folder)
        if fs.exists(path):
            fs.rm(path, recursive=True)

    def remove_files(self) -> None:
        """Removes this list's own files."""
        for _, uri, _ in self.files:
            fs, path = self.storage.filesystem(uri)
            fs.rm(path)

    def _read(self, uri: str, columns: list[str] | None = None) -> pa.Table:
        return read_spooled(self.storage, uri, columns=columns)

    def _write(self, number: int, name: str, table: pa.Table) -> tuple[int, str, int]:
        uri = f"{self.folder}/{name}/{number:03d}.parquet"
        write_spooled(self.storage, uri, table)
        return number, uri, len(table)


def read_spooled(
    storage: Storage, uri: str, columns: list[str] | None = None, row_group: int | None = None
) -> pa.Table:
    """A written list's file, or one of its row groups."""
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        return parquet.read_row_group(row_group, columns=columns) if row_group is not None else parquet.read(columns)


def write_spooled(storage: Storage, uri: str, table: pa.Table) -> None:
    fs, path = storage.filesystem(uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, row_group_size=ROW_GROUP_URIS, compression="zstd", use_dictionary=False)


class Spool:
    """Collects a list of URIs chunk by chunk: in memory up to ``limit`` URIs, then in files under ``folder``.

    Past the limit, what is held is written out partitioned by hash (``PARTITIONS`` files), and so is every
    further ``limit`` URIs: the driver never holds more than ``limit`` (plus a chunk) of them.
    """

    def __init__(self, storage: Storage, folder: str, name: str, limit: int | None = None):
        self.storage, self.folder, self.name = storage, folder, name
        self.limit = SPOOL_URIS if limit is None else limit
        self.held: list[pa.Array] = []
        self.count = 0
        self.files: list[tuple[int, str, int]] = []
        self.flushes = 0

    def add(self, uris: pa.Array) -> None:
        if len(uris):
            self.held.append(uris.cast(pa.large_string()))
            self.count += len(uris)
        if self.count > self.limit:
            self._flush()

    def finish(self, write: bool = False) -> pa.ChunkedArray | SpooledURIs:
        """The list: in memory if it never passed the limit (and not ``write``), else written (``SpooledURIs``)."""
        if not self.files and self.count <= self.limit and not write:
            return pa.chunked_array(self.held, pa.large_string())
        self._flush()
        return SpooledURIs(self.storage, self.folder, tuple(self.files))

    def _flush(self) -> None:
        if not self.count:
            return
        if not self.flushes and self.count > self.limit:
            log.info("more than %d %s URIs: writing them under %s", self.limit, self.name, self.folder)
        uris = pa.chunked_array(self.held, pa.large_string()).combine_chunks()
        self.held, self.count = [], 0
        hashes = uri_hashes(uris)
        partition = (hashes % np.uint64(PARTITIONS)).astype(np.int64)
        order = np.argsort(partition, kind="stable")  # listed order within each partition
        bounds = np.searchsorted(partition[order], np.arange(PARTITIONS + 1))
        table = pa.table({"uri": uris.take(pa.array(order)), "hash": hashes[order]})
        del uris, hashes
        writes = []
        for number in range(PARTITIONS):
            start, stop = int(bounds[number]), int(bounds[number + 1])
            if stop > start:
                uri = f"{self.folder}/{self.name}/{number:03d}-{self.flushes:06d}.parquet"
                writes.append((number, uri, table.slice(start, stop - start)))
        with ThreadPoolExecutor(WRITE_THREADS) as pool:
            list(pool.map(lambda w: write_spooled(self.storage, w[1], w[2]), writes))
        self.files += [(number, uri, len(part)) for number, uri, part in writes]
        self.flushes += 1
