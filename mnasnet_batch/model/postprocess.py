"""Softmax, top-k, and the output schema every Parquet file of a run follows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from mnasnet_batch.inputs.kept import NO_COLUMNS, kept_arrays, output_fields

OUTPUT_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("top_k_ids", pa.list_(pa.int32())),
        ("top_k_scores", pa.list_(pa.float32())),
        ("top_k_labels", pa.list_(pa.string())),
        ("model", pa.string()),
        ("weights", pa.string()),
    ]
)


def output_schema(kept: pa.Schema) -> pa.Schema:
    """The output's schema: ``OUTPUT_SCHEMA``, then the dataset's kept columns (``input.keep_columns``), nullable,
    in the input's types.

    Raises:
        ValueError: a kept column is named like one of the output's own; the message names it.
    """
    clashes = [name for name in kept.names if name in OUTPUT_SCHEMA.names]
    if clashes:
        raise ValueError(
            f"input.keep_columns: {', '.join(clashes)} would replace the output's own column of that name; "
            "keep the others, or rename the column in the input"
        )
    return pa.schema([*OUTPUT_SCHEMA, *output_fields(kept)])


def top_k(logits: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over classes, then the k most probable, sorted by descending probability.

    Returns:
        ``top_k_ids`` (N, k) int32 and ``top_k_scores`` (N, k) float32.
    """
    probabilities = torch.softmax(logits.float(), dim=1)
    scores, ids = torch.topk(probabilities, k, dim=1, largest=True, sorted=True)
    return ids.to(torch.int32).cpu().numpy(), scores.cpu().numpy()


def output_table(
    uris: np.ndarray,
    errors: np.ndarray,
    top_k_ids: np.ndarray,
    top_k_scores: np.ndarray,
    categories: list[str],
    model: str,
    weights: str,
    kept: np.ndarray | None = None,
    kept_schema: pa.Schema = NO_COLUMNS,
) -> pa.Table:
    """Builds one batch of output rows; rows whose ``error`` is non-empty carry nulls for predictions.

    Args:
        uris: (N,) input URIs.
        errors: (N,) "" for usable images, else the error message.
        top_k_ids: (M, k) ids for the M usable images, in order.
        top_k_scores: (M, k) probabilities for the same rows.
        categories: the 1000 class names, indexed by class id.
        model: the model name written to every row.
        weights: the weights id written to every row.
        kept: (N,) each row's kept values as the read stage packed them (``inputs.kept``), or None.
        kept_schema: the kept columns and their types (``Layout.kept``), appended to ``OUTPUT_SCHEMA``.
    """
    n = len(uris)
    ok = np.asarray([not e for e in errors], dtype=bool)
    k = top_k_ids.shape[1] if top_k_ids.ndim == 2 else 0
    # One flat values array plus offsets makes the list columns without per-row Python lists;
    # error rows get a null list (validity mask) and contribute no values.
    offsets = np.zeros(n + 1, dtype=np.int32)
    offsets[1:] = np.cumsum(ok * k)
    mask = pa.array(~ok)
    names = np.asarray(categories, dtype=object)[top_k_ids.reshape(-1)]

    def list_column(values: pa.Array) -> pa.Array:
        return pa.ListArray.from_arrays(pa.array(offsets), values, mask=mask)

    return pa.Table.from_arrays(
        [
            pa.array(uris.tolist(), pa.string()),
            pa.array(np.where(ok, "ok", "error").tolist(), pa.string()),
            pa.array([e if e else None for e in errors], pa.string()),
            list_column(pa.array(top_k_ids.reshape(-1), pa.int32())),
            list_column(pa.array(top_k_scores.reshape(-1), pa.float32())),
            list_column(pa.array(names.tolist(), pa.string())),
            pa.array([model] * n, pa.string()),
            pa.array([weights] * n, pa.string()),
            *kept_arrays(kept if kept is not None else np.full(n, b"", dtype=object), kept_schema),
        ],
        schema=pa.schema([*OUTPUT_SCHEMA, *output_fields(kept_schema)]),
    )
