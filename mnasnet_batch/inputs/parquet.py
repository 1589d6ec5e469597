"""Parquet files of encoded images (Hugging Face datasets' among them): a row's ``uri`` is ``FILE#ID``."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from mnasnet_batch.inputs.tables import TableLayout

PARQUET_EXTENSIONS = ("parquet",)


class ParquetLayout(TableLayout):
    """Parquet files of encoded images (``tables.choose_image_column``), each file's rows counted from its footer."""

    name = "parquet"
    noun = "Parquet files"
    kind = "Parquet files"
    file_extensions = PARQUET_EXTENSIONS

    def schema_and_rows(self, uri: str) -> tuple[pa.Schema, int | None]:
        import pyarrow.parquet as pq

        fs, path = self.storage.pyarrow_filesystem(uri)
        with fs.open_input_file(path) as f:
            metadata = pq.ParquetFile(f).metadata
            return metadata.schema.to_arrow_schema(), metadata.num_rows

    def record_batches(self, uri: str, columns: list[str], batch_size: int) -> Iterator[pa.RecordBatch]:
        """The file's ``columns`` a row group's slice at a time.

        Ray Data's ``read_parquet`` is not used: in Ray 2.60 it plans a ``ListFiles`` operator whose tasks
        reserve a whole CPU and cannot be configured; beside a model actor holding 1.5 of 2 CPUs and a decode
        task holding the rest, that task is never scheduled and the job hangs (observed on the CI machine).
        """
        import pyarrow.parquet as pq

        fs, path = self.storage.filesystem(uri)
        with fs.open(path, "rb") as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)
