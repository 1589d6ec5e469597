"""Arrow files as ``datasets.save_to_disk`` writes them (``data-00000-of-00001.arrow``): read a record batch at a
time, never whole."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pyarrow as pa

from mnasnet_batch.inputs.tables import TableLayout

ARROW_EXTENSIONS = ("arrow",)


class ArrowLayout(TableLayout):
    """Arrow IPC files of encoded images (the stream format ``datasets`` writes, or the file format), a row's ``uri``
    being ``FILE#ID``. A stream's row count is only known once it is read, so a run records each file it read to
    its end (as it does tar shards), and a resumed run skips those whose rows are all written."""

    name = "arrow"
    noun = "Arrow files"
    kind = "Arrow files"
    file_extensions = ARROW_EXTENSIONS
    rows_known = False

    @contextlib.contextmanager
    def _reader(self, uri: str):
        """The file's IPC reader: a stream (what ``datasets`` writes) or, where that fails, a file."""
        fs, path = self.storage.pyarrow_filesystem(uri)
        with fs.open_input_file(path) as f:
            try:
                reader = pa.ipc.open_stream(f)
            except pa.ArrowInvalid:
                f.seek(0)
                reader = pa.ipc.open_file(f)
            yield reader

    def schema_and_rows(self, uri: str) -> tuple[pa.Schema, int | None]:
        with self._reader(uri) as reader:
            return reader.schema, None

    def record_batches(self, uri: str, columns: list[str], batch_size: int) -> Iterator[pa.RecordBatch]:
        """The file's ``columns``, one record batch of the file at a time, sliced to ``batch_size`` rows."""
        with self._reader(uri) as reader:
            if isinstance(reader, pa.ipc.RecordBatchFileReader):
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = iter(reader)
            for record_batch in batches:
                record_batch = record_batch.select(columns)
                for start in range(0, record_batch.num_rows, batch_size):
                    yield record_batch.slice(start, batch_size)
