"""Files of rows holding encoded images (Parquet, Arrow): which column holds them, a row's ``uri``, reading a file."""

from __future__ import annotations

import dataclasses
import logging
import posixpath
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mnasnet_batch.inputs.kept import pack_rows
from mnasnet_batch.inputs.layout import InputPlan, Layout, encoded_batch
from mnasnet_batch.inputs.manifests import resolve_relative
from mnasnet_batch.inputs.webdataset import record_finished, recorded_images
from mnasnet_batch.storage import LISTING_THREADS, StorageError

log = logging.getLogger(__name__)

# The names datasets give their column of images, first found first taken: Hugging Face's ``Image`` feature is
# ``image`` in nearly every dataset on the Hub, and ``img`` in the rest (CIFAR's).
IMAGE_COLUMN_NAMES = ("image", "img")
# A kept column that the input's rows need not hold: the split each row's file belongs to (``split_of``).
SPLIT_COLUMN = "split"
# File name stems that say nothing of the split (``datasets.save_to_disk`` writes ``data-00000-of-00001.arrow``):
# the split is then the file's folder (``train/data-00000-of-00001.arrow``).
_ANONYMOUS_STEMS = ("data",)


def holds_images(data_type: pa.DataType) -> bool:
    """Whether a column of this type can hold encoded images: binary, or a struct with a binary ``bytes`` field
    (Hugging Face's ``Image`` feature, ``struct<bytes: binary, path: string>``)."""
    if pa.types.is_binary(data_type) or pa.types.is_large_binary(data_type):
        return True
    if pa.types.is_struct(data_type) and data_type.get_field_index("bytes") >= 0:
        return holds_images(data_type.field("bytes").type) and not pa.types.is_struct(data_type.field("bytes").type)
    return False


def describe_columns(schema: pa.Schema) -> str:
    """``image (struct<bytes: binary, path: string>), label (int64)``: a file's columns, for a message."""
    return ", ".join(f"{field.name} ({field.type})" for field in schema)


def choose_image_column(schema: pa.Schema, configured: str, uri: str) -> str:
    """The column of encoded images of a file with ``schema``: ``configured`` (``input.image_column``) where set,
    else the first of ``IMAGE_COLUMN_NAMES`` that can hold images, else the one column that can.

    Raises:
        StorageError: no such column, or one that cannot hold images (a string, a list, a nested struct), or
            several that could; the message names the columns, their types and what to set.
    """
    wanted = "set input.image_column to a binary column, or to a struct column with a binary bytes field"
    names = [configured] if configured else [name for name in IMAGE_COLUMN_NAMES if name in schema.names]
    if configured and configured not in schema.names:
        raise StorageError(f"input {uri} has no column {configured}; its columns: {describe_columns(schema)}; {wanted}")
    for name in names:
        data_type = schema.field(name).type
        if not holds_images(data_type):
            raise StorageError(
                f"input {uri}: column {name} ({data_type}) cannot hold encoded images; {wanted}"
                + (
                    "; a column of image URIs is a manifest: set input.format=manifest and input.uri_column"
                    if pa.types.is_string(data_type) or pa.types.is_large_string(data_type)
                    else ""
                )
            )
        return name
    candidates = [field.name for field in schema if holds_images(field.type)]
    if len(candidates) == 1:
        return candidates[0]
    found = f"columns {', '.join(candidates)} could each hold them" if candidates else "no column can hold them"
    raise StorageError(f"input {uri}: {found}; its columns: {describe_columns(schema)}; {wanted}")


def split_of(uri: str) -> str:
    """The split a dataset file belongs to, as the Hugging Face Hub names files: ``data/train-00000-of-00003.parquet``
    and ``train/0000.parquet`` are ``train``; ``test/data-00000-of-00001.arrow`` (``save_to_disk``) is ``test``."""
    folder, name = posixpath.split(uri.rstrip("/"))
    stem = re.split(r"[-.]", name, maxsplit=1)[0]
    if stem and not stem.isdigit() and stem not in _ANONYMOUS_STEMS:
        return stem
    return posixpath.basename(folder)


@dataclass(frozen=True)
class TableLayout(Layout):
    """Files whose rows hold encoded images, one task per file, a row's ``uri`` being ``FILE#ID``.

    ID is the row's ``input.id_column`` where set, else the row's index within its file (stable for an unchanged
    file). A subclass says how a file's schema, row count and record batches are read.
    """

    # The column of encoded images, chosen when the input is planned (``choose_image_column``); "" until then.
    image_column: str = ""
    keeps_columns = True
    # Whether ``schema_and_rows`` counts a file's rows (Parquet's footer), else a run records them once read.
    rows_known: ClassVar[bool] = True

    def schema_and_rows(self, uri: str) -> tuple[pa.Schema, int | None]:
        """A file's schema, and its row count where known without reading its rows."""
        raise NotImplementedError

    def record_batches(self, uri: str, columns: list[str], batch_size: int) -> Iterator[pa.RecordBatch]:
        """A file's ``columns``, ``batch_size`` rows at a time at most, front to back."""
        raise NotImplementedError

    def selects(self, files: pa.Array, single: bool) -> pa.BooleanArray:
        """Its files, and with ``input.split`` only those of that split (``split_of``)."""
        selected = super().selects(files, single)
        if not self.config.split or not len(files):
            return selected
        splits = pa.array([split_of(uri) == self.config.split for uri in files.to_pylist()])
        return pc.and_(selected, splits)

    def detects(self, selected: pa.ChunkedArray) -> bool:
        """Files with a column that can hold images, or one named as such (refused later, with what to set);
        others (a Parquet file of URIs) are manifests."""
        schema, _ = self.schema_and_rows(selected[0].as_py())
        named = [self.config.image_column] if self.config.image_column else IMAGE_COLUMN_NAMES
        return any(holds_images(field.type) or field.name in named for field in schema)

    def plan(self, uris: pa.Array) -> InputPlan:
        """The files, each checked (its image, id and kept columns), with its row count where known.

        Raises:
            StorageError: a file cannot be read, or lacks a column it needs; the message names it.
        """
        files = uris.to_pylist()
        with ThreadPoolExecutor(min(LISTING_THREADS, len(files))) as pool:
            found = list(pool.map(self._schema_and_rows, files))
        image_column = choose_image_column(found[0][0], self.config.image_column, files[0])
        for uri, (schema, _) in zip(files, found, strict=True):
            choose_image_column(schema, image_column, uri)
            needed = [self.config.id_column] if self.config.id_column else []
            needed += [c for c in self.config.keep_columns if c != SPLIT_COLUMN or c in schema.names]
            missing = [c for c in needed if c not in schema.names]
            if missing:
                raise StorageError(
                    f"input {uri} has no column {', '.join(missing)}; its columns: {describe_columns(schema)}; "
                    "set input.id_column and input.keep_columns to columns it has"
                )
        schema = found[0][0]  # the kept columns' types: the first file's
        kept = [schema.field(n) if n in schema.names else pa.field(n, pa.string()) for n in self.config.keep_columns]
        if self.config.id_column:
            check_ids(files, self.config.id_column, self)
        else:
            log.info("input %s: no input.id_column, so a row's uri is FILE#N, N its index in its file", self.config.uri)
        rows = [count for _, count in found]
        images = None if any(count is None for count in rows) else pa.array(rows, pa.int64())
        layout = dataclasses.replace(self, image_column=image_column, kept=pa.schema(kept))
        return InputPlan(layout, uris, images=images)

    def _schema_and_rows(self, uri: str) -> tuple[pa.Schema, int | None]:
        try:
            return self.schema_and_rows(uri)
        except Exception as exc:
            raise StorageError(f"input {uri} cannot be read as {self.kind}: {type(exc).__name__}: {exc}") from None

    def columns(self, uri: str) -> tuple[str, list[str]]:
        """The image column and the columns read of file ``uri``: it, the id column, the kept columns it holds."""
        image_column = self.image_column
        names: set[str] = set()
        if not image_column or SPLIT_COLUMN in self.config.keep_columns:
            schema = self.schema_and_rows(uri)[0]
            image_column, names = image_column or choose_image_column(schema, "", uri), set(schema.names)
        wanted = [image_column, self.config.id_column, *self.config.keep_columns]
        columns = [c for c in dict.fromkeys(wanted) if c and (c != SPLIT_COLUMN or c in names)]
        return image_column, columns

    def read(
        self, batch: dict[str, np.ndarray], batch_size: int, run_uri: str | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Reads the files of a block ``batch_size`` rows at a time; a file whose rows were not counted before
        reading is recorded in ``run_uri`` once read to its end, with its row count (``record_finished``)."""
        for uri in (str(u) for u in batch["uri"]):
            image_column, columns = self.columns(uri)
            start = 0
            for record_batch in self.record_batches(uri, columns, batch_size):
                yield self.encoded(record_batch, uri, start, image_column)
                start += record_batch.num_rows
            if run_uri is not None and not self.rows_known:
                record_finished(run_uri, uri, start, self.storage)

    def recorded_images(self, uris: pa.Array, done_uri: str) -> pa.Array:
        """The row counts the runs under ``done_uri`` recorded for the files they read to their end."""
        return recorded_images(uris, done_uri, self.storage)

    def encoded(self, rows: pa.RecordBatch, uri: str, start: int, image_column: str) -> dict[str, np.ndarray]:
        """Rows of file ``uri``, the first its row ``start``, as read (``encoded_batch``), with their kept values."""
        if self.config.id_column:
            ids = rows.column(self.config.id_column).to_pylist()
        else:
            ids = range(start, start + rows.num_rows)
        contents = self.images(rows.column(image_column), image_column, uri)
        kept = None
        if self.config.keep_columns:
            values = {
                name: rows.column(name).to_pylist() if name in rows.schema.names else [split_of(uri)] * rows.num_rows
                for name in self.config.keep_columns
            }
            kept = pack_rows([{name: column[i] for name, column in values.items()} for i in range(rows.num_rows)])
        return encoded_batch([f"{uri}#{i}" for i in ids], contents, kept)

    def images(self, column: pa.Array, name: str, uri: str) -> list[bytes | Exception]:
        """The encoded images of a column: binary values, or a struct's ``bytes``, else the image its ``path``
        names (absolute, or relative to the file's folder), read through the storage handle; null: an error."""
        paths: list[str | None] = [None] * len(column)
        if pa.types.is_struct(column.type):
            children = dict(zip([f.name for f in column.type], column.flatten(), strict=True))  # parent nulls kept
            if "path" in children and pa.types.is_string(children["path"].type):
                paths = children["path"].to_pylist()
            column = children["bytes"]
        contents: list[bytes | Exception] = [
            bytes(data) if data is not None else ValueError(f"{name} is null") for data in column.to_pylist()
        ]
        by_path = [i for i, data in enumerate(contents) if isinstance(data, Exception) and paths[i]]
        if by_path:
            resolved = [resolve_relative(str(paths[i]), uri) for i in by_path]
            for wave in self.storage.read_waves(resolved):
                for j, content in wave:
                    contents[by_path[j]] = content
        return contents

    def read_rows(self, input_uri: str, uris: Sequence[str]) -> dict[str, bytes | Exception]:
        """The images of the rows ``uris`` (``FILE#ID``) of file ``input_uri``, reading it front to back once, up
        to the last of them. An id the file no longer holds is a ``FileNotFoundError``."""
        prefix = len(input_uri) + 1
        wanted = set(uris)
        found: dict[str, bytes | Exception] = {}
        try:
            image_column, columns = self.columns(input_uri)
            start = 0
            for rows in self.record_batches(input_uri, columns, 1024):
                batch = self.encoded(rows, input_uri, start, image_column)
                start += rows.num_rows
                for uri, data, error in zip(batch["uri"], batch["data"], batch["error"], strict=True):
                    if uri in wanted:
                        found[uri] = ValueError(error) if error else data
                if len(found) == len(wanted):
                    break
        except Exception as exc:
            return {uri: found.get(uri, exc) for uri in uris}
        missing = f"{input_uri} no longer holds a row of {self.config.id_column or 'index'} "
        return {uri: found.get(uri, FileNotFoundError(missing + uri[prefix:])) for uri in uris}


def check_ids(uris: list[str], id_column: str, layout: TableLayout) -> None:
    """Refuses input whose ids do not name each row of a file once (a row's ``uri`` is ``FILE#ID``); only the id
    column is read, of every file at once.

    Raises:
        StorageError: a file has a null id, or repeats an id; the message names one.
    """

    def problem(uri: str) -> str:
        try:
            ids = pa.chunked_array(
                [b.column(0) for b in layout.record_batches(uri, [id_column], 2**16)],
                layout.schema_and_rows(uri)[0].field(id_column).type,
            )
        except Exception as exc:
            return f"its column {id_column} cannot be read: {type(exc).__name__}: {exc}"
        if ids.null_count:
            return f"{ids.null_count} rows have a null {id_column}"
        if pc.count_distinct(ids).as_py() < len(ids):
            counts = pc.value_counts(ids)
            repeated = counts.filter(pc.greater(counts.field("counts"), 1))
            first = repeated[0].as_py()
            return (
                f"{len(repeated)} values of {id_column} are on more than one row "
                f"(e.g. {first['values']!r} on {first['counts']} rows)"
            )
        return ""

    with ThreadPoolExecutor(min(LISTING_THREADS, len(uris))) as pool:
        for uri, found in zip(uris, pool.map(problem, uris), strict=True):
            if found:
                raise StorageError(
                    f"input {uri}: {found}; a row's uri is FILE#ID, so input.id_column must name each row of a "
                    "file once (or leave it unset: a row's index in its file is its id)"
                )
