"""Accuracy of a run against ground truth: top-1/top-5, per class, per image; written as JSON and Parquet."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from mnasnet_batch.evaluation.imagenet import wnids
from mnasnet_batch.outputs.folder import read_parts
from mnasnet_batch.storage import Storage

METRICS_FILE = "metrics.json"
PER_IMAGE_FILE = "per_image.parquet"


def read_predictions(uri: str, uris: list[str] | None = None, storage: Storage | None = None) -> pa.Table:
    """The ``uri``, ``status`` and ``top_k_ids`` columns of the Parquet parts under ``uri``, all runs included.

    Args:
        uri: the labeling job's output (or one run's folder).
        uris: when given, only the rows of these images (an incremental output may hold others).
        storage: the job's storage handle (its ``storage`` section); None: local files and anonymous URIs.
    """
    dataset = read_parts(*(storage or Storage()).filesystem(uri))
    if dataset is None:
        raise FileNotFoundError(f"no Parquet parts under {uri}")
    wanted = None if uris is None else pads.field("uri").isin(pa.array(uris, pa.string()))
    return dataset.to_table(columns=["uri", "status", "top_k_ids"], filter=wanted)


def score(predictions: pa.Table, labels: dict[str, int], categories: list[str]) -> tuple[dict, pa.Table]:
    """Scores predictions against labels the way ImageNet accuracy is published.

    Every labeled image counts: an image that could not be read (an error row) counts as wrong, so
    top-1/top-5 are over all images, as the published figures over all 50,000 validation images are.

    Args:
        predictions: rows with ``uri``, ``status`` and ``top_k_ids`` (most probable first).
        labels: the class index of every image URI.
        categories: class names, indexed by class id.

    Returns:
        The metrics (percentages in 0-100) and a per-image table.

    Raises:
        ValueError: the predictions and the labels do not cover the same images.

    Over 60 lines: a third of them this docstring.
    """
    uris = predictions.column("uri").to_pylist()
    if len(set(uris)) != len(uris) or set(uris) != set(labels):
        missing, extra = set(labels) - set(uris), set(uris) - set(labels)
        raise ValueError(
            f"predictions and labels differ: {len(missing)} labeled images without a row, "
            f"{len(extra)} rows without a label, {len(uris) - len(set(uris))} duplicate rows"
        )
    label = np.array([labels[u] for u in uris], dtype=np.int64)
    top_k_ids = predictions.column("top_k_ids").to_pylist()
    ok = np.array([ids is not None for ids in top_k_ids], dtype=bool)
    top1_id = np.array([ids[0] if ids else -1 for ids in top_k_ids], dtype=np.int64)
    top1 = top1_id == label
    top5 = np.array([ids is not None and lab in ids[:5] for ids, lab in zip(top_k_ids, label, strict=True)])
    n = len(uris)

    per_class = []
    for index in np.unique(label):
        members = label == index
        per_class.append(
            {
                "index": int(index),
                "wnid": wnids()[index],
                "name": categories[index],
                "images": int(members.sum()),
                "top1": 100.0 * float(top1[members].mean()),
                "top5": 100.0 * float(top5[members].mean()),
            }
        )
    metrics = {
        "images": n,
        "errors": int((~ok).sum()),
        "top1": 100.0 * float(top1.sum()) / n if n else 0.0,
        "top5": 100.0 * float(top5.sum()) / n if n else 0.0,
        "correct_top1": int(top1.sum()),
        "correct_top5": int(top5.sum()),
        "classes": len(per_class),
        "mean_class_top1": float(np.mean([c["top1"] for c in per_class])) if per_class else 0.0,
        "per_class": per_class,
    }
    per_image = pa.table(
        {
            "uri": pa.array(uris, pa.string()),
            "status": predictions.column("status"),
            "label": pa.array(label, pa.int32()),
            "label_wnid": pa.array([wnids()[i] for i in label], pa.string()),
            "top1_id": pa.array(np.where(ok, top1_id, 0), pa.int32(), mask=~ok),
            "top1_correct": pa.array(top1),
            "top5_correct": pa.array(top5),
        }
    )
    return metrics, per_image


def write_results(uri: str, metrics: dict, per_image: pa.Table, storage: Storage | None = None) -> None:
    """Writes ``metrics.json`` and ``per_image.parquet`` under ``uri``, with the job's storage settings."""
    fs, root = (storage or Storage()).filesystem(uri)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root}/{METRICS_FILE}", "w") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    pq.write_table(per_image.sort_by("uri"), f"{root}/{PER_IMAGE_FILE}", filesystem=fs)
