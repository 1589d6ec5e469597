"""Evaluation: the ImageNet-1k class list, each ground-truth layout, and metrics against an independent count."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torchvision

from jobs.evaluate import main
from mnasnet_batch.config import StorageConfig
from mnasnet_batch.evaluation import ground_truth, imagenet, metrics
from mnasnet_batch.evaluation.ground_truth import GroundTruthError, load_ground_truth
from mnasnet_batch.storage import Storage
from tests import support

CATEGORIES = torchvision.models.MNASNet0_5_Weights.IMAGENET1K_V1.meta["categories"]
# The fixture model's classes (tests/support.PHOTOS) by WordNet id, written out here so that labels do not
# come from the list under test.
PHOTO_WNIDS = {
    "space shuttle": "n04266014",
    "Egyptian cat": "n02124075",
    "espresso": "n07920052",
    "missile": "n03773504",
    "moped": "n03785016",
    "planetarium": "n03956157",
    "Petri dish": "n03920288",
    "orange": "n07747607",
}
TENCH, GOLF_BALL = "n01440764", "n03445777"


def test_wnid_list_is_imagenet_1k_in_torchvision_order():
    from torchvision.datasets.imagenette import Imagenette

    wnids = imagenet.wnids()
    assert len(wnids) == len(set(wnids)) == 1000 and list(wnids) == sorted(wnids)
    assert all(imagenet.is_wnid(w) for w in wnids)
    # torchvision's Imagenette names 10 ImageNet classes by wnid; each must sit at its category's index.
    for wnid, names in Imagenette._WNID_TO_CLASS.items():
        assert imagenet.wnid_to_index()[wnid] == CATEGORIES.index(names[0]), wnid
    for name, wnid in PHOTO_WNIDS.items():
        assert imagenet.wnid_to_index()[wnid] == CATEGORIES.index(name), name


def photo_class(path) -> str:
    return support.PHOTOS[path.name.rsplit("_", 1)[0]]


def expected_scores(labels: list[int], ref_ids: np.ndarray, unreadable: int = 0) -> tuple[float, float]:
    """Top-1/top-5 in percent, counted directly; unreadable images count as wrong."""
    n = len(labels) + unreadable
    top1 = sum(label == ids[0] for label, ids in zip(labels, ref_ids, strict=True))
    top5 = sum(label in ids[:5] for label, ids in zip(labels, ref_ids, strict=True))
    return 100.0 * top1 / n, 100.0 * top5 / n


@pytest.fixture(scope="module")
def reference(corpus, fixture_model):
    """The first 12 corpus images and their reference top-5 ids."""
    paths = corpus[:12]
    ids, _ = support.reference_predictions(paths, fixture_model, "mnasnet0_5", 5)
    return paths, ids


def mixed_labels(paths, ref_ids) -> list[int]:
    """Per image: its photo's class (a top-1 hit), its third prediction (top-5 only), or tench (a miss)."""
    labels = []
    for i, (path, ids) in enumerate(zip(paths, ref_ids, strict=True)):
        if i % 3 == 0:
            labels.append(CATEGORIES.index(photo_class(path)))
        elif i % 3 == 1:
            labels.append(int(ids[2]))
        else:
            labels.append(CATEGORIES.index("tench"))
    return labels


def run(argv, output) -> dict:
    assert main([*argv, "--output", str(output)]) == 0
    return json.loads((output / "metrics.json").read_text())


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory, local_ray, reference, checkpoint_path):
    """ImageNet-val layout: <wnid>/<image>; plus an unreadable image in a class folder."""
    paths, ref_ids = reference
    labels = mixed_labels(paths, ref_ids)
    root = tmp_path_factory.mktemp("val")
    for path, label in zip(paths, labels, strict=True):
        wnid = {CATEGORIES.index(n): w for n, w in PHOTO_WNIDS.items()}.get(label)
        wnid = wnid or (TENCH if label == 0 else imagenet.wnids()[label])
        (root / wnid).mkdir(exist_ok=True)
        shutil.copy(path, root / wnid / path.name)
    (root / GOLF_BALL).mkdir()
    (root / GOLF_BALL / "truncated.JPEG").write_bytes(b"\xff\xd8\xff")
    output = tmp_path_factory.mktemp("eval") / "classes"
    result = run(["--input", str(root), "--weights", str(checkpoint_path), "--top-k", "1"], output)
    return result, output, labels, root


def test_class_folders_metrics_equal_an_independent_count(class_folders, reference):
    result, _, labels, _ = class_folders
    _, ref_ids = reference
    top1, top5 = expected_scores(labels, ref_ids, unreadable=1)
    assert 0 < top1 < top5 < 100  # the set mixes hits, top-5-only hits and misses
    assert result["top1"] == pytest.approx(top1) and result["top5"] == pytest.approx(top5)
    assert (result["images"], result["errors"]) == (13, 1)
    assert result["ground_truth"] == "class folders" and result["model"] == "mnasnet0_5"
    assert result["published"] is None  # a fixture checkpoint, not torchvision's weights


def test_per_class_and_per_image_results(class_folders, reference):
    result, output, labels, _ = class_folders
    paths, ref_ids = reference
    per_class = {c["wnid"]: c for c in result["per_class"]}
    golf = per_class[GOLF_BALL]
    assert (golf["index"], golf["name"], golf["images"], golf["top1"]) == (574, "golf ball", 1, 0.0)
    tench_images = [i for i, label in enumerate(labels) if label == 0]
    assert per_class[TENCH]["images"] == len(tench_images)
    assert per_class[TENCH]["top5"] == pytest.approx(100.0 * np.mean([0 in ref_ids[i] for i in tench_images]))
    assert sum(c["images"] for c in result["per_class"]) == 13
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in pq.read_table(output / "per_image.parquet").to_pylist()}
    assert len(rows) == 13 and rows["truncated.JPEG"]["status"] == "error"
    for path, label, ids in zip(paths, labels, ref_ids, strict=True):
        row = rows[path.name]
        assert (row["label"], row["top1_id"], row["top1_correct"]) == (label, ids[0], label == ids[0])
    # The labeling job's own output, with five classes per image although the flags asked for one.
    assert len(pq.read_table(output / "predictions").column("top_k_ids")[0]) == 5


def test_rerun_into_the_same_output_is_refused(class_folders, checkpoint_path, capsys):
    _, output, _, root = class_folders
    before = (output / "metrics.json").read_text()
    assert main(["--input", str(root), "--output", str(output), "--weights", str(checkpoint_path)]) == 2
    assert "holds the finished run" in capsys.readouterr().err
    assert (output / "metrics.json").read_text() == before


def write_meta_mat(path, order: list[str]) -> None:
    """A devkit-style meta.mat: ILSVRC2012_ID i is order[i - 1]; one WordNet ancestor entry, as the devkit has."""
    scipy_io = support.require("scipy.io", "devkit")
    fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    entries = [(i, wnid, CATEGORIES[imagenet.wnid_to_index()[wnid]], 0) for i, wnid in enumerate(order, start=1)]
    entries.append((1001, "n00001740", "entity", 1))
    scipy_io.savemat(path, {"synsets": np.array(entries, dtype=fields)})


@pytest.fixture(scope="module")
def devkit(tmp_path_factory, local_ray, reference, checkpoint_path):
    """Flat ILSVRC2012_val_*.JPEG files with the devkit's ground truth and a class table in another order."""
    paths, ref_ids = reference
    labels = mixed_labels(paths, ref_ids)
    root = tmp_path_factory.mktemp("devkit")
    images, data = root / "val", root / "ILSVRC2012_devkit_t12" / "data"
    images.mkdir()
    data.mkdir(parents=True)
    for i, path in enumerate(paths, start=1):
        shutil.copy(path, images / f"ILSVRC2012_val_{i:08d}.JPEG")
    # The devkit numbers classes in its own order; reversed here so that an ID read as an index fails.
    order = list(reversed(imagenet.wnids()))
    write_meta_mat(data / "meta.mat", order)
    devkit_ids = [1000 - label for label in labels]  # order[1000 - label - 1] is wnids()[label]
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{i}\n" for i in devkit_ids))
    output = tmp_path_factory.mktemp("eval") / "devkit"
    labels_file = str(data / "ILSVRC2012_validation_ground_truth.txt")
    result = run(["--input", str(images), "--weights", str(checkpoint_path), "--labels", labels_file], output)
    return result, output, labels, images


def test_devkit_ground_truth_metrics_equal_an_independent_count(devkit, reference):
    result, _, labels, _ = devkit
    top1, top5 = expected_scores(labels, reference[1])
    assert result["ground_truth"] == "devkit ground truth"
    assert (result["images"], result["errors"]) == (12, 0)
    assert result["top1"] == pytest.approx(top1) and result["top5"] == pytest.approx(top5)


def test_solution_csv_scores_the_same_predictions(devkit, reference, tmp_path):
    _, output, _, images = devkit
    paths, ref_ids = reference
    # Other labels than the devkit's: the photo's class for even images, tench for odd ones.
    names = [photo_class(p) if i % 2 == 0 else "tench" for i, p in enumerate(paths)]
    wnids = [PHOTO_WNIDS.get(name, TENCH) for name in names]
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text(
        "ImageId,PredictionString\n"
        + "".join(f"ILSVRC2012_val_{i:08d},{w} 1 2 30 40 {w} 5 6 70 80\n" for i, w in enumerate(wnids, start=1))
    )
    uris = sorted(str(p) for p in images.iterdir())
    truth = load_ground_truth(uris, str(csv))
    assert truth.layout == "LOC_val_solution.csv"
    result, _ = metrics.score(metrics.read_predictions(str(output / "predictions")), truth.labels, CATEGORIES)
    top1, top5 = expected_scores([CATEGORIES.index(n) for n in names], ref_ids)
    assert result["top1"] == pytest.approx(top1) and result["top5"] == pytest.approx(top5)


def test_devkit_synsets_as_text_and_errors(tmp_path):
    synsets = tmp_path / "synsets.txt"
    synsets.write_text(f"{GOLF_BALL}\n{TENCH}\n")
    assert ground_truth.load_devkit_synsets(str(synsets)) == {1: GOLF_BALL, 2: TENCH}
    truth_file = tmp_path / "gt.txt"
    truth_file.write_text("2\n1\n")
    uris = [str(tmp_path / "ILSVRC2012_val_00000001.JPEG"), str(tmp_path / "ILSVRC2012_val_00000002.JPEG")]
    assert load_ground_truth(uris, str(truth_file), str(synsets)).labels == {uris[0]: 0, uris[1]: 574}
    with pytest.raises(GroundTruthError, match="meta.mat"):
        load_ground_truth(uris, str(truth_file))  # no meta.mat beside it
    truth_file.write_text("2\n")
    with pytest.raises(GroundTruthError, match="1 images have no label"):
        load_ground_truth(uris, str(truth_file), str(synsets))
    truth_file.write_text("3\n1\n")
    with pytest.raises(GroundTruthError, match="ILSVRC2012_ID 3"):
        load_ground_truth(uris, str(truth_file), str(synsets))


def test_class_folder_errors(tmp_path):
    with pytest.raises(GroundTruthError, match="not in a class folder"):
        load_ground_truth([str(tmp_path / "n01440764" / "a.jpg"), str(tmp_path / "flat" / "b.jpg")])
    with pytest.raises(GroundTruthError, match="not one of the 1000"):
        load_ground_truth([str(tmp_path / "n00001740" / "a.jpg")])


def test_unlabeled_input_stops_before_any_image_is_read(tmp_path, corpus, checkpoint_path, capsys):
    images = tmp_path / "flat"
    images.mkdir()
    shutil.copy(corpus[0], images / corpus[0].name)
    output = tmp_path / "out"
    assert main(["--input", str(images), "--output", str(output), "--weights", str(checkpoint_path)]) == 2
    assert "not in a class folder" in capsys.readouterr().err
    assert not output.exists()


def test_evaluation_on_s3_reads_and_writes_with_the_storage_settings(local_ray, s3_server, reference, checkpoint_path):
    """Images, labels, weights and results all on S3, reachable only through the storage settings."""
    paths, ref_ids = reference
    paths, ref_ids = paths[:4], ref_ids[:4]
    fs, _ = Storage(StorageConfig(**s3_server)).filesystem("s3://eval-bucket")
    fs.mkdir("eval-bucket")
    for i, path in enumerate(paths, start=1):
        fs.pipe(f"eval-bucket/val/ILSVRC2012_val_{i:08d}.JPEG", path.read_bytes())
    wnids = [PHOTO_WNIDS[photo_class(p)] if i % 2 == 0 else TENCH for i, p in enumerate(paths)]
    rows = "".join(f"ILSVRC2012_val_{i:08d},{w} 1 2 3 4\n" for i, w in enumerate(wnids, start=1))
    fs.pipe("eval-bucket/LOC_val_solution.csv", f"ImageId,PredictionString\n{rows}".encode())
    fs.pipe("eval-bucket/fixture.pth", checkpoint_path.read_bytes())
    argv = ["--input", "s3://eval-bucket/val", "--output", "s3://eval-bucket/eval"]
    argv += ["--weights", "s3://eval-bucket/fixture.pth", "--labels", "s3://eval-bucket/LOC_val_solution.csv"]
    for key, value in s3_server.items():
        argv += ["--set", f"storage.{key}={json.dumps(value)}"]
    assert main([*argv, "--set", "preprocess.batch_size=4"]) == 0
    result = json.loads(fs.cat_file("eval-bucket/eval/metrics.json"))
    top1, top5 = expected_scores([imagenet.wnid_to_index()[w] for w in wnids], ref_ids)
    assert (result["images"], result["errors"], result["ground_truth"]) == (4, 0, "LOC_val_solution.csv")
    assert result["top1"] == pytest.approx(top1) and result["top5"] == pytest.approx(top5)
    assert fs.exists("eval-bucket/eval/per_image.parquet")
