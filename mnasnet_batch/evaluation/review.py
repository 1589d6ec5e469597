"""Review tasks: a run's least confident rows as Label Studio tasks with the model's guess, and the labels back."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import quote

import pyarrow as pa

from mnasnet_batch.config import ModelConfig, OutputConfig
from mnasnet_batch.evaluation.rows import least_confident, read_rows
from mnasnet_batch.inputs.parquet import PARQUET_EXTENSIONS
from mnasnet_batch.inputs.webdataset import SHARD_EXTENSIONS
from mnasnet_batch.storage import Storage, file_uri_path, has_extension, scheme

# The columns review reads of the job's rows.
COLUMNS = ("uri", "status", "top_k_scores", "top_k_labels", "model", "weights")

# The labeling config's Choices control and the Image object it labels: every prediction's from_name and to_name.
FROM_NAME = "label"
TO_NAME = "image"

# Label Studio serves a local file at this URL, ``d`` being its path under LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT
# (docs: guide/storage.html#Local-storage, "Tasks with local storage file references"; its server reads ``d`` with
# Django's request.GET, so the path is percent-encoded here and decoded there).
LOCAL_FILES_URL = "/data/local-files/?d="

# The schemes Label Studio's cloud source storages resolve in task data, for each fsspec scheme the job reads:
# its S3 storage resolves s3://, its GCS storage gs://, its Azure Blob storage azure-blob://CONTAINER/PATH (the
# url_scheme of io_storages' models); http(s) URLs are opened by the reviewer's browser as they are.
CLOUD_SCHEMES = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gs",
    "gcs": "gs",
    "az": "azure-blob",
    "abfs": "azure-blob",
    "abfss": "azure-blob",
    "http": "http",
    "https": "https",
}

# Why a row under the threshold is not a task.
IN_CONTAINER = "inside a tar shard or Parquet file"
NO_URL = "no URL Label Studio can open"
OUTSIDE_ROOT = "outside --local-root"
AT_ROOT = "directly in --local-root (Label Studio serves only from a folder under it)"

# Where the labeling config goes beside the tasks file: review.json -> review.labeling.xml.
CONFIG_SUFFIX = ".labeling.xml"


def in_container(uri: str) -> bool:
    """Whether the row's image is a member of a WebDataset shard (``SHARD#MEMBER``) or a row of a Parquet file
    (``FILE#ID``): no URL names those bytes. A loose file with ``#`` in its name is not: its part before the ``#``
    names no shard or Parquet file."""
    if "#" not in uri:
        return False
    container = uri.split("#", 1)[0]
    return has_extension(container, SHARD_EXTENSIONS) or has_extension(container, PARQUET_EXTENSIONS)


def local_path(uri: str) -> str | None:
    """The local path a row's ``uri`` names, None for a URI with another scheme."""
    if uri.startswith("file://"):
        return file_uri_path(uri)  # a name that is not UTF-8, written as its file:// URI (storage.local_uri)
    return uri if scheme(uri) == "file" else None


def default_local_root(uris: Iterable[str]) -> str | None:
    """The folder above the deepest one holding every local image of ``uris``; None when none is local.

    Label Studio serves a local file only under a Local Files storage whose path is a folder *below* its document
    root (it refuses a storage at the root itself), so the root is one level above the images' folder, which
    becomes the storage.
    """
    folders = [os.path.dirname(path) for path in map(local_path, uris) if path is not None]
    return os.path.dirname(os.path.commonpath(folders)) if folders else None


def cloud_url(uri: str) -> str | None:
    """The URI Label Studio resolves for an object (``s3://``, ``gs://``, ``azure-blob://``) or opens as it is
    (``http(s)://``); None for a scheme it has no storage for (``memory://``, ``adl://``)."""
    protocol = scheme(uri)
    target = CLOUD_SCHEMES.get(protocol)
    if target is None:
        return None
    if protocol in ("http", "https"):
        return uri
    path = uri.split("://", 1)[1]
    if target == "azure-blob":
        # abfs[s]://CONTAINER@ACCOUNT.dfs.core.windows.net/PATH names the account too; Label Studio's storage
        # holds the account, and its URIs are CONTAINER/PATH.
        container, _, rest = path.partition("/")
        path = f"{container.split('@', 1)[0]}/{rest}"
    return f"{target}://{path}"


def image_url(uri: str, local_root: str | None) -> tuple[str | None, str]:
    """The URL a reviewer's Label Studio opens for the row's image, or None and why there is none.

    Args:
        uri: the row's ``uri``.
        local_root: LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, the folder local paths are made relative to.
    """
    if in_container(uri):
        return None, IN_CONTAINER
    path = local_path(uri)
    if path is None:
        url = cloud_url(uri)
        return url, "" if url else NO_URL
    relative = os.path.relpath(path, local_root) if local_root is not None else os.pardir
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        return None, OUTSIDE_ROOT
    if os.sep not in relative:  # no Local Files storage can hold it: its path may not be the root
        return None, AT_ROOT
    try:
        relative.encode()
    except UnicodeEncodeError:  # the server decodes ``d`` as UTF-8: a name that is not cannot be asked for
        return None, NO_URL
    return LOCAL_FILES_URL + quote(relative.replace(os.sep, "/"), safe="/"), ""


def uncertain_rows(rows: pa.Table, below: float) -> list[dict]:
    """The ``ok`` rows whose top-1 score is under ``below``, most uncertain first (``rows.least_confident``), each
    with ``top1_score`` added."""
    return [{**row, "top1_score": row["top_k_scores"][0]} for row in least_confident(rows, below=below).to_pylist()]


def read(output: OutputConfig, below: float, storage: Storage | None = None) -> list[dict]:
    """``uncertain_rows`` of a labeling job's output (``rows.read_rows``: its Parquet parts, or with ``output.table``
    the Iceberg table's current rows).

    Raises:
        FileNotFoundError: a Parquet folder that holds no parts.
        StorageError: the table's catalog cannot be reached, or holds no such table.
    """
    return uncertain_rows(read_rows(output, COLUMNS, storage).rows, below)


def top_k_text(labels: list[str], scores: list[float]) -> str:
    """The model's top-k as one line a reviewer reads: ``tabby 0.412 | tiger cat 0.301 | ...``."""
    return " | ".join(f"{label} {score:.3f}" for label, score in zip(labels, scores, strict=True))


def task(row: dict, url: str) -> dict:
    """One Label Studio task: the image and the model's top-k in ``data``, and its top-1 as the prediction.

    The prediction follows Label Studio's pre-annotation format (docs: guide/predictions.html, "JSON format for
    pre-annotations"): ``model_version``, ``score`` (the Data Manager sorts tasks by it) and a ``result`` of one
    ``choices`` region whose ``from_name`` / ``to_name`` are the labeling config's Choices and Image names.
    """
    model_version = f"{row['model']} {row['weights']}"
    return {
        "data": {
            TO_NAME: url,
            "uri": row["uri"],  # the row's key: reviewed labels join back on it
            "top_k": top_k_text(row["top_k_labels"], row["top_k_scores"]),
            "top1_score": row["top1_score"],
            "model_version": model_version,
        },
        "predictions": [
            {
                "model_version": model_version,
                "score": row["top1_score"],
                "result": [
                    {
                        # A region id per image, the same in every file written for it: Label Studio's
                        # predictions guide asks for distinct result ids.
                        "id": "top1-" + hashlib.sha1(row["uri"].encode()).hexdigest()[:12],
                        "from_name": FROM_NAME,
                        "to_name": TO_NAME,
                        "type": "choices",
                        "value": {"choices": [row["top_k_labels"][0]]},
                    }
                ],
            }
        ],
    }


@dataclass(frozen=True)
class ReviewTasks:
    """The tasks of the rows under the threshold, and what became of the others."""

    tasks: list[dict]
    # Rows under the threshold (ok rows only); tasks are these, less skipped ones, up to the limit.
    candidates: int
    # Rows under the threshold that are not tasks, by why (IN_CONTAINER, NO_URL, OUTSIDE_ROOT, AT_ROOT).
    skipped: dict[str, int] = field(default_factory=dict)
    # LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT for the local-files URLs; None when no task is a local file.
    local_root: str | None = None
    # The folders under local_root that hold the local tasks' images: a Local Files storage each.
    local_folders: tuple[str, ...] = ()


def build_tasks(rows: list[dict], local_root: str | None = None, limit: int | None = None) -> ReviewTasks:
    """The Label Studio tasks of ``rows`` (``uncertain_rows``), in their order, up to ``limit``.

    Args:
        rows: the rows to review, most uncertain first.
        local_root: the folder local paths are relative to; None: ``default_local_root`` of the rows.
        limit: at most this many tasks; None: all.
    """
    if local_root is None:
        local_root = default_local_root(row["uri"] for row in rows if not in_container(row["uri"]))
    tasks, skipped = [], collections.Counter()
    for row in rows:
        if limit is not None and len(tasks) >= limit:
            break
        url, why = image_url(row["uri"], local_root)
        if url is None:
            skipped[why] += 1
        else:
            tasks.append(task(row, url))
    local = [local_path(t["data"]["uri"]) for t in tasks if t["data"][TO_NAME].startswith(LOCAL_FILES_URL)]
    if not local:
        return ReviewTasks(tasks, len(rows), dict(skipped))
    folders = sorted(
        {os.path.join(local_root, os.path.relpath(path, local_root).split(os.sep, 1)[0]) for path in local}
    )
    return ReviewTasks(tasks, len(rows), dict(skipped), local_root, tuple(folders))


def labeling_config(categories: list[str]) -> str:
    """Label Studio's labeling config: the image, the model's top-k as text, and one Choices control of every
    class name (XML-escaped by ElementTree).

    ``layout="select"`` shows the 1,000 names as one drop-down list rather than 1,000 radio buttons (docs:
    tags/choices.html, ``layout``); the result stays a ``choices`` region, which the predictions pre-fill. A
    Taxonomy would be searchable (the drop-down is not, in Label Studio 1.23.2), but its results are ``taxonomy``
    regions: docs/review.md.
    """
    view = ET.Element("View")
    ET.SubElement(view, "Image", name=TO_NAME, value="$image")
    ET.SubElement(view, "Header", value="The model's top-k (label score)")
    ET.SubElement(view, "Text", name="top_k", value="$top_k")
    choices = ET.SubElement(
        view, "Choices", name=FROM_NAME, toName=TO_NAME, choice="single", layout="select", required="true"
    )
    for name in categories:
        ET.SubElement(choices, "Choice", value=name)
    ET.indent(view)
    return ET.tostring(view, encoding="unicode") + "\n"


def categories_of(rows: list[dict]) -> list[str]:
    """The class names of the rows' model (torchvision's weights metadata; every MnasNet variant has the same
    1,000), the default model's when there are no rows."""
    from mnasnet_batch.model.weights import torchvision_weights

    model = rows[0]["model"] if rows else ModelConfig.name
    return list(torchvision_weights(model).meta["categories"])


def config_path(tasks_path: str) -> str:
    """Where the labeling config goes beside the tasks file ``tasks_path``."""
    base = tasks_path[: -len(".json")] if tasks_path.lower().endswith(".json") else tasks_path
    return base + CONFIG_SUFFIX


def write_text(uri: str, text: str, storage: Storage | None = None) -> None:
    """Writes ``text`` to a local path or fsspec URI, with the job's storage settings."""
    fs, path = (storage or Storage()).filesystem(uri)
    with fs.open(path, "w", encoding="utf-8") as f:
        f.write(text)


def reviewed_labels(export: list[dict], from_name: str = FROM_NAME) -> pa.Table:
    """The labels people gave, from a Label Studio JSON export of the review project (Export > JSON).

    One row per exported task that has an annotation: ``uri`` (the job's row), ``reviewed_label`` (the chosen
    class; null when the task was skipped), ``completed_by``, ``updated_at`` and ``annotations`` (how many). Of
    several annotations the one updated last is taken. The format is Label Studio's "JSON format of annotated
    tasks" (docs: guide/export.html): ``data``, and ``annotations`` with ``result``, ``was_cancelled``,
    ``completed_by``, ``updated_at``.

    Raises:
        ValueError: not a JSON export of these tasks (JSON_MIN and CSV exports lack the annotations' fields).
    """
    rows = []
    for item in export:
        if not isinstance(item, dict) or "data" not in item or "annotations" not in item:
            raise ValueError("not a Label Studio JSON export (tasks with data and annotations): export as JSON")
        uri = item["data"].get("uri")
        if uri is None:
            raise ValueError(f"task {item.get('id')} has no data.uri: not a task of jobs/review.py")
        annotations = item["annotations"] or []
        if not annotations:
            continue
        latest = max(annotations, key=lambda a: a.get("updated_at") or a.get("created_at") or "")
        label = None
        if not latest.get("was_cancelled"):
            for region in latest.get("result") or []:
                if region.get("from_name") == from_name and region.get("type") == "choices":
                    label = region["value"]["choices"][0]
        completed_by = latest.get("completed_by")
        if isinstance(completed_by, dict):  # some exports give the user, not its id
            completed_by = completed_by.get("email") or completed_by.get("id")
        rows.append(
            {
                "uri": uri,
                "reviewed_label": label,
                "completed_by": None if completed_by is None else str(completed_by),
                "updated_at": latest.get("updated_at"),
                "annotations": len(annotations),
            }
        )
    schema = pa.schema(
        [
            ("uri", pa.string()),
            ("reviewed_label", pa.string()),
            ("completed_by", pa.string()),
            ("updated_at", pa.string()),
            ("annotations", pa.int32()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def read_export(uri: str, storage: Storage | None = None) -> list[dict]:
    """A Label Studio JSON export, from a local path or fsspec URI.

    Raises:
        FileNotFoundError: no such file. ValueError: not JSON, or not a list of tasks.
    """
    fs, path = (storage or Storage()).filesystem(uri)
    export = json.loads(fs.cat_file(path))
    if not isinstance(export, list):
        raise ValueError("a Label Studio JSON export is a list of tasks")
    return export
