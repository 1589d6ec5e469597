"""Manifests (text, CSV, TSV, Parquet) listing image URIs: read by the driver as it lists, a chunk at a time."""

from __future__ import annotations

import dataclasses
import logging
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.core import split_protocol

from mnasnet_batch.inputs.kept import KEPT, pack_table
from mnasnet_batch.inputs.layout import MAX_INPUT_BLOCK, SHOWN_MEMBERS, ImageURILayout, InputPlan
from mnasnet_batch.inputs.spool import SPOOL_URIS, SpooledURIs, first_occurrence_mask, first_occurrences, uri_hashes
from mnasnet_batch.storage import Storage, StorageError, has_extension

log = logging.getLogger(__name__)

MANIFEST_EXTENSIONS = ("txt", "csv", "tsv", "parquet")

# Bytes of a manifest turned into URIs at a time: its lines never exist as Python strings all at once, and each
# step's Arrow temporaries (a dozen copies of the chunk) stay small.
TEXT_CHUNK_BYTES = 4 * 2**20

# What a manifest lists in place of a line (text) or row (CSV, TSV) that is not UTF-8, after the manifest's URI.
_NOT_UTF8 = re.compile(r"#(?P<unit>line|row)=(?P<number>[0-9]+)$")

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
    # With ``input.keep_columns``: each listed URI (``uri``) and its row's kept values (``kept.KEPT``), which
    # ``blocks`` hands to the read tasks with the URIs. The driver's only: not pickled with the layout (``read``).
    kept_rows: pa.Table | None = None
    keeps_columns = True

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["kept_rows"] = None  # the read tasks get their URIs' kept values in their blocks
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

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
        layout = dataclasses.replace(self, manifests=tuple(manifests))
        if self.config.keep_columns:
            if isinstance(listed, SpooledURIs):
                raise StorageError(
                    f"input.keep_columns: the manifests of {self.config.uri} list more than {SPOOL_URIS} URIs, and "
                    "columns are kept only of shorter lists; split the manifest"
                )
            layout = layout.with_kept(manifests)
        return InputPlan(layout, unique)

    def with_kept(self, manifests: list[str]) -> ManifestLayout:
        """This layout with the kept values of every URI the manifests list (the first row of a URI listed twice)."""
        found = [manifest_kept(m, self.config.uri_column, self.config.keep_columns, self.storage) for m in manifests]
        rows = pa.concat_tables([table for table, _ in found]).combine_chunks()
        if rows.num_rows:
            firsts = first_occurrence_mask(rows["uri"], uri_hashes(rows["uri"].chunk(0)))
            rows = rows if firsts is None else rows.filter(pa.array(firsts))
        return dataclasses.replace(self, kept_rows=rows, kept=found[0][1])

    def blocks(
        self, uris: pa.Array | SpooledURIs, batch_size: int, largest: int = MAX_INPUT_BLOCK
    ) -> list[pa.Table]:
        """``ImageURILayout.blocks``, each with its URIs' kept values where columns are kept."""
        blocks = super().blocks(uris, batch_size, largest)
        if self.kept_rows is None:
            return blocks
        value_set = self.kept_rows["uri"]
        return [
            block.append_column(KEPT, self.kept_rows[KEPT].take(pc.index_in(block["uri"], value_set=value_set)))
            for block in blocks
        ]

    def read_waves(
        self, uris: list[str], within_s: float | None = None
    ) -> Iterator[list[tuple[int, bytes | Exception]]]:
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
        # Started now, as Storage.read_waves starts its reads: the caller may read ahead.
        return _with_errors(super().read_waves([uris[i] for i in read], within_s), read, not_utf8)

def _with_errors(
    waves: Iterator[list[tuple[int, bytes | Exception]]], read: list[int], errors: list[tuple[int, Exception]]
) -> Iterator[list[tuple[int, bytes | Exception]]]:
    """The ``waves`` of the URIs at indices ``read``, by index in the whole batch, with ``errors`` (by index too)
    in the first wave, in the batch's order."""
    for wave in waves:
        yield sorted(errors + [(read[j], content) for j, content in wave], key=lambda item: item[0])
        errors = []
    if errors:  # nothing else to read
        yield errors


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


def manifest_kept(uri: str, column: str, keep: tuple[str, ...], storage: Storage) -> tuple[pa.Table, pa.Schema]:
    """The rows of a CSV, TSV or Parquet manifest, for ``input.keep_columns``: each URI as ``manifest_chunks``
    lists it (``uri``) and its row's ``keep`` columns packed (``kept.KEPT``), and those columns' types.

    Raises:
        StorageError: a text manifest (no columns), or one that cannot be read or lacks a column; the message says
            which.
    """
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    kind = manifest_kind(uri)
    if kind == "text":
        raise StorageError(
            f"input.keep_columns: manifest {uri} lists one URI a line, with no columns to keep; use a CSV, TSV or "
            "Parquet manifest"
        )
    try:
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as f:
            if kind == "parquet":
                table = pq.read_table(f, columns=[column, *keep])
            else:
                delimiter = "\t" if has_extension(uri, ("tsv",)) else ","
                table = pacsv.read_csv(
                    f,
                    parse_options=pacsv.ParseOptions(delimiter=delimiter),
                    convert_options=pacsv.ConvertOptions(include_columns=[column, *keep]),
                )
    except Exception as exc:
        raise StorageError(
            f"input.keep_columns: manifest {uri} cannot be read with columns {', '.join([column, *keep])}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    values = table[column].cast(pa.large_string())
    table = table.filter(pc.fill_null(pc.not_equal(pc.utf8_trim_whitespace(values), ""), False))
    uris = _cleaned(table[column].combine_chunks(), uri, text=False)  # drops nothing more: blanks are gone
    return pa.table({"uri": uris, KEPT: pa.array(pack_table(table, keep), pa.binary())}), table.select(keep).schema


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
