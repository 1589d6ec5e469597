"""Ground-truth labels of an evaluation set: class folders, LOC_val_solution.csv, or the devkit's index file."""

from __future__ import annotations

import csv
import io
import posixpath
from dataclasses import dataclass

from mnasnet_batch.evaluation.imagenet import is_wnid, wnid_to_index
from mnasnet_batch.storage import Storage

# File names of the ImageNet validation images that the devkit's ground truth lists, line i being image i.
DEVKIT_IMAGE_NAME = "ILSVRC2012_val_{:08d}"
# The devkit keeps the class table (data/meta.mat) next to its ground truth file (data/*_ground_truth.txt).
DEVKIT_META_FILE = "meta.mat"


class GroundTruthError(ValueError):
    """Labels that are missing, unreadable or contradict the images; the message says what to do."""


@dataclass(frozen=True)
class GroundTruth:
    """The class index (0-999, torchvision's order) of every image URI, and where the labels came from."""

    labels: dict[str, int]
    layout: str


def from_label_column(rows: list[dict], column: str) -> GroundTruth:
    """The labels an output kept from its dataset (``input.keep_columns``): each row's ``column``, an ImageNet-1k
    class index (0-999), which is how ImageNet copies on the Hugging Face Hub store it.

    Raises:
        GroundTruthError: a row has no such value, or one outside 0-999; the message counts them and names one.
    """
    wrong = [row for row in rows if not isinstance(row.get(column), int) or not 0 <= row[column] <= 999]
    if wrong:
        first = wrong[0]
        raise GroundTruthError(
            f"--label-column {column}: {len(wrong)} of {len(rows)} rows hold no ImageNet-1k class index 0-999 "
            f"(e.g. {first.get(column)!r} on {first['uri']}); evaluate a dataset labeled with ImageNet-1k's classes"
        )
    return GroundTruth(labels={row["uri"]: row[column] for row in rows}, layout=f"the output's column {column}")


def image_key(uri: str) -> str:
    """An image's name without folder and extension (``ILSVRC2012_val_00000001``), what label files refer to."""
    return posixpath.splitext(posixpath.basename(uri.rstrip("/")))[0]


def load_ground_truth(
    uris: list[str], labels_uri: str = "", synsets_uri: str = "", storage: Storage | None = None
) -> GroundTruth:
    """Finds the label of every image.

    Without ``labels_uri`` each image's parent folder must be its ImageNet wnid (``val/n01440764/x.JPEG``).
    With it, images are matched by file name (without extension) to either a ``LOC_val_solution.csv``
    (``ImageId,PredictionString``, the first wnid of the string is the class) or the devkit's
    ``ILSVRC2012_validation_ground_truth.txt`` (line i holds the ILSVRC2012_ID of ``ILSVRC2012_val_0000000i``).
    The devkit's IDs follow its own class order, not the sorted one, so they are translated through the
    devkit's ``meta.mat`` (or a text file with one wnid per line in ID order): ``synsets_uri``, by default
    ``meta.mat`` beside the ground truth file.

    Args:
        uris: the images to evaluate.
        labels_uri: a label file's path or URI; empty for class folders.
        synsets_uri: the devkit class table, only for the devkit form.
        storage: the job's storage handle, for the label files' URIs; None: local files and anonymous URIs.

    Returns:
        A label for every URI.

    Raises:
        GroundTruthError: an image has no label, a label names no ImageNet-1k class, or a file is unreadable.
    """
    if not labels_uri:
        labels = _from_class_folders(uris)
        layout = "class folders"
    else:
        storage = storage or Storage()
        text = _read_text(labels_uri, "--labels", storage)
        first_line = text.lstrip().split("\n", 1)[0]
        if first_line.startswith("ImageId"):
            by_name, layout = _from_solution_csv(text, labels_uri), "LOC_val_solution.csv"
        else:
            synsets_uri = synsets_uri or posixpath.join(posixpath.dirname(labels_uri), DEVKIT_META_FILE)
            by_name, layout = _from_devkit(text, labels_uri, synsets_uri, storage), "devkit ground truth"
        labels = _match_by_name(uris, by_name, labels_uri)
    return GroundTruth(labels=labels, layout=layout)


def _class_index(wnid: str, where: str) -> int:
    index = wnid_to_index().get(wnid)
    if index is None:
        raise GroundTruthError(f"{where}: {wnid} is not one of the 1000 ImageNet-1k classes")
    return index


def _from_class_folders(uris: list[str]) -> dict[str, int]:
    labels, unlabeled = {}, []
    for uri in uris:
        folder = posixpath.basename(posixpath.dirname(uri))
        if is_wnid(folder):
            labels[uri] = _class_index(folder, uri)
        else:
            unlabeled.append(uri)
    if unlabeled:
        raise GroundTruthError(
            f"{len(unlabeled)} images are not in a class folder named by its wnid (e.g. {unlabeled[0]}); "
            f"put each image under <wnid>/ like n01440764/, or pass --labels with LOC_val_solution.csv or the "
            f"devkit's ILSVRC2012_validation_ground_truth.txt"
        )
    return labels


def _from_solution_csv(text: str, source: str) -> dict[str, int]:
    reader = csv.DictReader(io.StringIO(text))
    if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or ()):
        raise GroundTruthError(f"{source}: expected the columns ImageId,PredictionString of LOC_val_solution.csv")
    by_name = {}
    for line_number, row in enumerate(reader, start=2):
        tokens = (row["PredictionString"] or "").split()
        if not tokens:
            raise GroundTruthError(f"{source} line {line_number}: empty PredictionString for {row['ImageId']}")
        # Every box of a validation image carries the image's one class; the first is enough.
        by_name[row["ImageId"].strip()] = _class_index(tokens[0], f"{source} line {line_number}")
    return by_name


def _from_devkit(text: str, source: str, synsets_uri: str, storage: Storage) -> dict[str, int]:
    id_to_wnid = load_devkit_synsets(synsets_uri, storage)
    by_name = {}
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            devkit_id = int(line)
        except ValueError:
            raise GroundTruthError(
                f"{source} line {line_number}: {line.strip()!r} is not a class number; expected LOC_val_solution.csv "
                f"(ImageId,PredictionString) or the devkit's ground truth (one ILSVRC2012_ID per line)"
            ) from None
        if devkit_id not in id_to_wnid:
            raise GroundTruthError(f"{source} line {line_number}: ILSVRC2012_ID {devkit_id} is not in {synsets_uri}")
        by_name[DEVKIT_IMAGE_NAME.format(line_number)] = _class_index(id_to_wnid[devkit_id], synsets_uri)
    return by_name


def load_devkit_synsets(uri: str, storage: Storage | None = None) -> dict[int, str]:
    """The devkit's ILSVRC2012_ID -> wnid table for the 1000 leaf classes.

    Reads the devkit's ``meta.mat`` (with scipy, as torchvision's ImageNet dataset does), or a text file
    with one wnid per line, line i holding the wnid of ILSVRC2012_ID i.
    """
    storage = storage or Storage()
    if uri.endswith(".mat"):
        try:
            import scipy.io
        except ImportError:
            raise GroundTruthError(
                f"reading {uri} needs scipy (pip install scipy), or pass --synsets with a text file listing "
                f"one wnid per line in ILSVRC2012_ID order"
            ) from None
        data = _read_bytes(uri, "--synsets (the devkit's class table, by default meta.mat beside --labels)", storage)
        try:
            synsets = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)["synsets"]
            # Entries with children are WordNet ancestors, not classes; the 1000 leaves are the classes.
            return {
                int(devkit_id): str(wnid)
                for devkit_id, wnid, children in zip(
                    synsets["ILSVRC2012_ID"], synsets["WNID"], synsets["num_children"], strict=True
                )
                if int(children) == 0
            }
        except Exception as exc:
            raise GroundTruthError(f"{uri} is not the devkit's meta.mat: {type(exc).__name__}: {exc}") from None
    lines = [
        line.strip()
        for line in _read_text(uri, "--synsets (the devkit's class table)", storage).splitlines()
        if line.strip()
    ]
    bad = [line for line in lines if not is_wnid(line)]
    if bad:
        raise GroundTruthError(f"{uri}: {bad[0]!r} is not a wnid; expected one wnid per line in ILSVRC2012_ID order")
    return {devkit_id: wnid for devkit_id, wnid in enumerate(lines, start=1)}


def _match_by_name(uris: list[str], by_name: dict[str, int], source: str) -> dict[str, int]:
    labels, unlabeled, seen = {}, [], {}
    for uri in uris:
        key = image_key(uri)
        if key in seen:
            raise GroundTruthError(f"{seen[key]} and {uri} have the same name; {source} cannot tell them apart")
        seen[key] = uri
        if key in by_name:
            labels[uri] = by_name[key]
        else:
            unlabeled.append(uri)
    if unlabeled:
        raise GroundTruthError(
            f"{len(unlabeled)} images have no label in {source} (e.g. {unlabeled[0]}); "
            f"remove them from --input or pass the ground truth that covers them"
        )
    return labels


def _read_bytes(uri: str, option: str, storage: Storage) -> bytes:
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        raise GroundTruthError(f"{option} {uri} not found") from None
    except Exception as exc:
        raise GroundTruthError(f"{option} {uri} cannot be read: {type(exc).__name__}: {exc}") from None


def _read_text(uri: str, option: str, storage: Storage) -> str:
    return _read_bytes(uri, option, storage).decode("utf-8-sig")
