"""The dataset's own columns (``input.keep_columns``) carried from the read stage to the output rows."""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

# The batch column that carries each row's kept values from the read stage, through decoding and the model actor,
# to its output row: one pickled ``{column: value}`` per row (b"" where the input gave none, as for a shard that
# could not be read). Pickled Python values, not Arrow columns: Ray Data's numpy batches turn an integer column
# with nulls into floats, and the values must reach the output exactly as the input held them.
KEPT = "kept"
# No kept columns: the default of every setting that takes them.
NO_COLUMNS = pa.schema([])


def pack_rows(rows: Sequence[dict[str, object] | None]) -> np.ndarray:
    """Each row's kept values as the read stage hands them on (``KEPT``)."""
    packed = np.full(len(rows), b"", dtype=object)
    for i, row in enumerate(rows):
        if row is not None:
            packed[i] = pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL)
    return packed


def pack_table(table: pa.Table | pa.RecordBatch, columns: Sequence[str]) -> np.ndarray:
    """The rows of ``columns`` of ``table`` packed (``pack_rows``)."""
    values = {name: table.column(name).to_pylist() for name in columns}
    return pack_rows([{name: values[name][i] for name in columns} for i in range(table.num_rows)])


def kept_arrays(packed: np.ndarray | None, schema: pa.Schema) -> list[pa.Array]:
    """The kept columns of a batch's rows, in ``schema``'s types (null where a row carries none)."""
    rows = [pickle.loads(p) if p else {} for p in (packed if packed is not None else [])]
    return [_typed([row.get(field.name) for row in rows], field.type) for field in schema]


def _typed(values: list[object], data_type: pa.DataType) -> pa.Array:
    """``values`` as an array of ``data_type``; into a string column (a WebDataset key typed from one sample as
    null), values of another type go as JSON text rather than fail the batch."""
    try:
        return pa.array(values, data_type)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        if not pa.types.is_string(data_type):
            raise
        return pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values], data_type)


def output_fields(schema: pa.Schema) -> list[pa.Field]:
    """The kept columns as output columns: nullable, in the input's types (a row without them has nulls)."""
    return [pa.field(field.name, field.type, nullable=True) for field in schema]
