"""Parquet files of encoded images: a row's ``uri`` is ``FILE#ID``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mnasnet_batch.inputs.layout import InputPlan, Layout, encoded_batch
from mnasnet_batch.storage import LISTING_THREADS, Storage, StorageError

PARQUET_EXTENSIONS = ("parquet",)

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

    def read_rows(self, input_uri: str, uris: Sequence[str]) -> dict[str, bytes | Exception]:
        """The images of the rows ``uris`` (``FILE#ID``) from the Parquet file ``input_uri``, read once: its id
        column, then the image column of only the row groups that hold them. An id the file no longer holds is a
        ``FileNotFoundError``."""
        import pyarrow.parquet as pq

        id_column, image_column = self.config.id_column, self.config.image_column
        prefix = len(input_uri) + 1
        fs, path = self.storage.filesystem(input_uri)
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            # The ids as the job wrote them into the uri (parquet_batch): str() of each numpy value.
            ids = parquet.read(columns=[id_column]).column(id_column).to_numpy(zero_copy_only=False)
            position = {str(value): i for i, value in enumerate(ids)}
            wanted = {uri: position.get(uri[prefix:]) for uri in uris}
            sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
            starts = np.cumsum([0, *sizes])
            group = {i: int(np.searchsorted(starts, i, side="right")) - 1 for i in wanted.values() if i is not None}
            groups = sorted(set(group.values()))
            images = parquet.read_row_groups(groups, columns=[image_column]).column(image_column) if groups else None
        # Where each row group read starts among the rows read.
        read_at = dict(zip(groups, np.cumsum([0, *[sizes[g] for g in groups]]).tolist(), strict=False))
        found: dict[str, bytes | Exception] = {}
        for uri, i in wanted.items():
            if i is None:
                found[uri] = FileNotFoundError(f"{input_uri} no longer holds a row of {id_column} {uri[prefix:]}")
                continue
            data = images[read_at[group[i]] + i - int(starts[group[i]])].as_py()
            found[uri] = ValueError(f"{image_column} is null") if data is None else bytes(data)
        return found

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
