"""Hugging Face datasets (Parquet and save_to_disk Arrow) and img2dataset shards: read, labeled, their columns kept."""

from __future__ import annotations

import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mnasnet_batch.cli import main
from mnasnet_batch.config import load_config, parse_override
from mnasnet_batch.evaluation.ground_truth import GroundTruthError, from_label_column
from mnasnet_batch.inputs.arrow import ArrowLayout
from mnasnet_batch.inputs.kept import KEPT, pack_rows
from mnasnet_batch.inputs.listing import plan_input
from mnasnet_batch.inputs.parquet import ParquetLayout
from mnasnet_batch.inputs.tables import choose_image_column, holds_images, split_of
from mnasnet_batch.inputs.webdataset import WebDatasetLayout
from mnasnet_batch.storage import Storage, StorageError
from tests import hf_data, support
from tests.support import assert_predictions_match_the_reference, rows_by_uri

pytest.importorskip("datasets")
STORAGE = Storage()
SMALL_BATCHES = ("compute.batch_size=4", "preprocess.batch_size=4")


def config(uri, **values):
    overrides = [parse_override(f"input.{key}={value}") for key, value in values.items()]
    return load_config(overrides=[{"input": {"uri": str(uri)}}, *overrides])


def read_all(layout, uris: list[str] | dict, batch_size: int = 2) -> dict[str, np.ndarray]:
    """Every batch a layout reads of ``uris`` (or of a block, given as a dict), joined."""
    block = uris if isinstance(uris, dict) else {"uri": uris}
    batches = list(layout.read({k: np.asarray(v, dtype=object) for k, v in block.items()}, batch_size))
    return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}


def test_the_image_column_is_found_by_type_and_a_column_that_cannot_hold_images_is_named():
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert holds_images(image) and holds_images(pa.large_binary()) and not holds_images(pa.string())
    assert not holds_images(pa.struct([("bytes", pa.struct([("x", pa.binary())]))]))
    assert choose_image_column(pa.schema([("label", pa.int64()), ("image", image)]), "", "f") == "image"
    assert choose_image_column(pa.schema([("img", pa.binary()), ("x", pa.binary())]), "", "f") == "img"
    # Exactly one column that can hold images needs no setting, whatever its name.
    assert choose_image_column(pa.schema([("key", pa.string()), ("jpg", pa.binary())]), "", "f") == "jpg"
    cases = [
        (pa.schema([("image", pa.string())]), "", r"column image \(string\) cannot hold encoded images; set "),
        (pa.schema([("pixels", pa.list_(pa.uint8()))]), "", r"no column can hold them; its columns: pixels \(list"),
        (pa.schema([("a", pa.binary()), ("b", pa.binary())]), "", "columns a, b could each hold them"),
        (pa.schema([("image", image)]), "photo", r"has no column photo; its columns: image \(struct<bytes"),
        (
            pa.schema([("image", pa.struct([("meta", pa.struct([("bytes", pa.binary())]))]))]),
            "",
            r"column image \(struct<meta: struct<bytes: binary>>\) cannot hold encoded images; set input.image_column",
        ),
    ]
    for schema, configured, message in cases:
        with pytest.raises(StorageError, match=message):
            choose_image_column(schema, configured, "f")


def test_splits_are_named_as_the_hub_names_files():
    assert split_of("/d/data/train-00000-of-00003.parquet") == "train"
    assert split_of("/d/data/validation-00001-of-00002-5f1a.parquet") == "validation"
    assert split_of("/d/test/data-00000-of-00001.arrow") == "test"
    assert split_of("s3://b/default/train/0000.parquet") == "train"


@pytest.fixture()
def hub_folder(tmp_path, corpus):
    """A dataset folder as ``huggingface_hub`` downloads one: ``data/{split}-XXXXX-of-YYYYY.parquet`` written by
    ``datasets`` (``to_parquet``), two train files and a test file; train's second row has no bytes, only its
    absolute path, and the test file's last row only a path relative to the file's folder (outside the dataset's)."""
    root = tmp_path / "hub"
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text("---\nlicense: cc0\n---\n")
    files = {
        "train-00000-of-00002.parquet": (corpus[0:3], (1,)),
        "train-00001-of-00002.parquet": (corpus[3:6], ()),
        "test-00000-of-00001.parquet": (corpus[6:9], ()),
    }
    expected = {}
    for name, (images, by_path) in files.items():
        path = root / "data" / name
        hf_data.hf_dataset(images, [7 + i for i in range(len(images))], by_path).to_parquet(str(path))
        expected.update({f"{path}#{row}": image for row, image in enumerate(images)})
    test = root / "data" / "test-00000-of-00001.parquet"
    table = pq.read_table(test)
    relative = table.column("image").to_pylist()
    # Outside the dataset folder: image files inside it would make it a folder of loose images.
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "last.jpg").write_bytes(corpus[8].read_bytes())
    relative[2] = {"bytes": None, "path": "../../pics/last.jpg"}
    column = pa.array(relative, table.schema.field("image").type)
    pq.write_table(table.set_column(0, "image", column).replace_schema_metadata(table.schema.metadata), test)
    return root, expected


def test_a_hub_parquet_folder_is_read_whole_with_row_index_ids_and_images_by_path(hub_folder):
    root, expected = hub_folder
    plan = plan_input(config(root).input, STORAGE)
    assert isinstance(plan.layout, ParquetLayout) and plan.layout.image_column == "image"
    assert plan.images.to_pylist() == [3, 3, 3]
    read = read_all(plan.layout, plan.uris.to_pylist())
    assert sorted(read["uri"]) == sorted(expected) and not any(read["error"])
    for uri, data in zip(read["uri"], read["data"], strict=True):
        assert data == expected[uri].read_bytes(), uri
    # One split, by input.split or by a glob.
    test_only = plan_input(config(root, split="test").input, STORAGE)
    assert [split_of(u) for u in test_only.uris.to_pylist()] == ["test"]
    assert len(plan_input(config(f"{root}/data/train-*").input, STORAGE).uris) == 2


def test_kept_columns_come_with_each_row_in_the_inputs_types(hub_folder, tmp_path):
    root, _ = hub_folder
    plan = plan_input(config(root, keep_columns="label,split").input, STORAGE)
    assert plan.layout.kept == pa.schema([("label", pa.int64()), ("split", pa.string())])
    read = read_all(plan.layout, plan.uris.to_pylist())
    kept = {uri: pickle.loads(packed) for uri, packed in zip(read["uri"], read[KEPT], strict=True)}
    for path in plan.uris.to_pylist():
        labels = pq.read_table(path, columns=["label"]).column("label").to_pylist()
        for row, label in enumerate(labels):
            assert kept[f"{path}#{row}"] == {"label": label, "split": split_of(path)}
    with pytest.raises(StorageError, match="has no column caption; its columns: image"):
        plan_input(config(root, keep_columns="caption").input, STORAGE)
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "a.jpg").write_bytes(b"x")
    with pytest.raises(StorageError, match="input.keep_columns: image files have no columns to keep"):
        plan_input(config(tmp_path / "loose", keep_columns="label").input, STORAGE)


def test_save_to_disk_arrow_files_are_read_a_record_batch_at_a_time(tmp_path, corpus):
    import datasets

    folder = tmp_path / "disk"
    train = hf_data.hf_dataset(corpus[:5], [1, 2, 3, 4, 5], by_path=(2,))
    test = hf_data.hf_dataset(corpus[5:7], [6, 7])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(folder), num_shards={"train": 2, "test": 1})
    plan = plan_input(config(folder, keep_columns="label").input, STORAGE)
    assert isinstance(plan.layout, ArrowLayout) and plan.images is None  # counted once read, like shards
    assert [Path(u).relative_to(folder).as_posix() for u in plan.uris.to_pylist()] == [
        "test/data-00000-of-00001.arrow",
        "train/data-00000-of-00002.arrow",
        "train/data-00001-of-00002.arrow",
    ]
    first = plan.uris[1].as_py()
    batches = list(plan.layout.record_batches(first, ["image"], 2))
    assert [b.num_rows for b in batches] == [2, 1]
    read = read_all(plan.layout, plan.uris.to_pylist())
    by_uri = dict(zip(read["uri"], read["data"], strict=True))
    assert by_uri[f"{first}#2"] == corpus[2].read_bytes()  # bytes null: read from its path
    assert {pickle.loads(k)["label"] for k in read[KEPT]} == {1, 2, 3, 4, 5, 6, 7}
    assert plan.layout.read_rows(first, [f"{first}#1", f"{first}#9"])[f"{first}#1"] == corpus[1].read_bytes()


def test_webdataset_samples_keep_their_json_keys_and_txt(tmp_path):
    shard = tmp_path / "s" / "00000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for key, meta, caption in [
            ("000000", {"url": "http://x/a.jpg", "key": "000000", "width": 5}, "a cat"),
            ("000001", {"url": "http://x/b.jpg", "key": "000001"}, "a dog"),
        ]:
            for suffix, data in (("jpg", b"J"), ("json", json.dumps(meta).encode()), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, __import__("io").BytesIO(data))
    plan = plan_input(config(shard.parent, keep_columns="url,key,txt,width").input, STORAGE)
    assert isinstance(plan.layout, WebDatasetLayout)
    assert plan.layout.kept == pa.schema(
        [("url", pa.string()), ("key", pa.string()), ("txt", pa.string()), ("width", pa.int64())]
    )
    read = read_all(plan.layout, plan.uris.to_pylist())
    assert [pickle.loads(k) for k in read[KEPT]] == [
        {"url": "http://x/a.jpg", "key": "000000", "width": 5, "txt": "a cat"},
        {"url": "http://x/b.jpg", "key": "000001", "txt": "a dog"},
    ]


def test_output_rows_carry_kept_columns_typed_and_null_where_absent():
    from mnasnet_batch.model.postprocess import OUTPUT_SCHEMA, output_schema, output_table

    kept_schema = pa.schema([("label", pa.int64()), ("caption", pa.string())])
    packed = pack_rows([{"label": 2**60 + 1, "caption": "x"}, None, {"label": None, "caption": "z"}])
    table = output_table(
        np.array(["a", "b", "c"], dtype=object),
        np.array(["", "IOError: gone", ""], dtype=object),
        np.zeros((2, 1), np.int32),
        np.ones((2, 1), np.float32),
        ["tench"],
        "mnasnet0_5",
        "w",
        packed,
        kept_schema,
    )
    assert (
        table.schema == output_schema(kept_schema) and table.schema.names[: len(OUTPUT_SCHEMA)] == OUTPUT_SCHEMA.names
    )
    assert table.column("label").to_pylist() == [2**60 + 1, None, None]  # exact: no float on the way
    assert table.column("caption").to_pylist() == ["x", None, "z"]
    with pytest.raises(ValueError, match="input.keep_columns: status would replace the output's own column"):
        output_schema(pa.schema([("status", pa.string())]))


def test_labels_outside_imagenet_are_reported_in_one_line():
    rows = [{"uri": "f#0", "label": 3}, {"uri": "f#1", "label": 1000}, {"uri": "f#2", "label": None}]
    with pytest.raises(
        GroundTruthError,
        match=r"^--label-column label: 2 of 3 rows hold no ImageNet-1k class index "
        r"0-999 \(e.g. 1000 on f#1\)",
    ):
        from_label_column(rows, "label")
    assert from_label_column(rows[:1], "label").labels == {"f#0": 3}


def test_a_hub_folder_is_labeled_with_only_input_then_evaluated_on_its_kept_label(
    local_ray, hub_folder, tmp_path, checkpoint_path, fixture_model, capsys
):
    root, expected = hub_folder
    output = tmp_path / "out"
    assert main(support.job_argv(root, output, checkpoint_path, *SMALL_BATCHES)) == 0
    rows = rows_by_uri(output)
    assert set(rows) == set(expected)  # every image once, both splits, the rows by path too
    assert_predictions_match_the_reference(rows, expected, fixture_model)
    assert "no input.id_column, so a row's uri is FILE#N" in capsys.readouterr().err

    # evaluate.py --label-column: the run keeps the dataset's label, and scores the predictions against it.
    from jobs import evaluate

    evaluation = tmp_path / "evaluation"
    argv = support.job_argv(root, evaluation, checkpoint_path, *SMALL_BATCHES, "input.split=train")
    assert evaluate.main([*argv, "--label-column", "label"]) == 0
    kept = rows_by_uri(evaluation / evaluate.PREDICTIONS_DIR)
    for uri, row in kept.items():
        path, index = uri.rsplit("#", 1)
        assert row["label"] == pq.read_table(path).column("label")[int(index)].as_py()
    metrics = json.loads((evaluation / "metrics.json").read_text())
    hits = sum(row["top_k_ids"][0] == row["label"] for row in kept.values())
    assert metrics["images"] == 6 and metrics["correct_top1"] == hits
    assert "the output's column label" in json.dumps(metrics)


def test_save_to_disk_and_img2dataset_output_are_labeled_with_their_columns_kept(
    local_ray, corpus, tmp_path, checkpoint_path, fixture_model
):
    import datasets

    disk = tmp_path / "disk"
    train = hf_data.hf_dataset(corpus[:5], [1, 2, 3, 4, 5], by_path=(4,))
    test = hf_data.hf_dataset(corpus[5:8], [6, 7, 8])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(disk), num_shards={"train": 2, "test": 1})
    output = tmp_path / "disk-out"
    assert main(support.job_argv(disk, output, checkpoint_path, *SMALL_BATCHES, "input.keep_columns=label,split")) == 0
    rows = rows_by_uri(output)
    expected, labels = {}, {}
    for split, images, split_labels in (("train", corpus[:5], [1, 2, 3, 4, 5]), ("test", corpus[5:8], [6, 7, 8])):
        files = sorted((disk / split).glob("data-*.arrow"))
        row = 0
        for file in files:
            count = len(list(datasets.Dataset.from_file(str(file))))
            for index in range(count):
                expected[f"{file}#{index}"] = images[row]
                labels[f"{file}#{index}"] = (split_labels[row], split)
                row += 1
    assert set(rows) == set(expected)
    assert_predictions_match_the_reference(rows, expected, fixture_model)
    assert {uri: (row["label"], row["split"]) for uri, row in rows.items()} == labels

    # img2dataset's WebDataset output, downloaded from a loopback server; one URL answers 404.
    try:
        hf_data.ensure_img2dataset()
    except Exception as exc:  # no package index: the producer cannot be installed here
        pytest.skip(f"img2dataset cannot be installed: {exc}")
    served = {f"/{path.name}": path for path in corpus[8:14]}
    shards = tmp_path / "i2d"
    with support.ImageServer({name: path.read_bytes() for name, path in served.items()}) as server:
        urls = {server.url(name): path for name, path in served.items()}
        lines = [f"{url},caption {i}" for i, url in enumerate([*urls, server.url("/missing.jpg")])]
        (tmp_path / "urls.csv").write_text("url,caption\n" + "\n".join(lines) + "\n")
        hf_data.run_img2dataset(tmp_path / "urls.csv", shards, per_shard=4)
    assert sorted(p.name for p in shards.glob("*.parquet")) and sorted(shards.glob("*_stats.json"))
    output = tmp_path / "i2d-out"
    assert (
        main(support.job_argv(shards, output, checkpoint_path, *SMALL_BATCHES, "input.keep_columns=url,key,txt")) == 0
    )
    rows = rows_by_uri(output)
    assert sorted(row["url"] for row in rows.values()) == sorted(urls)  # the 404 is img2dataset's, not a row
    by_url = {row["url"]: uri for uri, row in rows.items()}
    assert_predictions_match_the_reference(rows, {by_url[url]: path for url, path in urls.items()}, fixture_model)
    for uri, row in rows.items():
        shard, member = uri.split("#")
        with tarfile.open(shard) as tar:
            meta = json.load(tar.extractfile(member.replace(".jpg", ".json")))
            caption = tar.extractfile(member.replace(".jpg", ".txt")).read().decode()
        assert (row["url"], row["key"], row["txt"]) == (meta["url"], meta["key"], caption)


def test_kept_values_pass_through_decoding_on_workers_and_on_the_actor(corpus):
    import torch

    from mnasnet_batch.decode.device_preprocess import decode_batch_on_device
    from mnasnet_batch.decode.preprocess import PreprocessSpec, decode_batch
    from mnasnet_batch.inputs.layout import encoded_batch

    packed = pack_rows([{"label": 1}, {"label": 2}])
    read = encoded_batch(["a", "b"], [corpus[0].read_bytes(), ValueError("image is null")], packed)
    spec = PreprocessSpec.for_model("mnasnet0_5", 10**8)
    for decoded in (decode_batch(read, spec), decode_batch_on_device(read, spec, torch.device("cpu"))):
        assert list(decoded[KEPT]) == list(packed) and decoded["error"][1] == "ValueError: image is null"


def test_csv_and_parquet_manifests_keep_their_rows_columns(tmp_path, corpus):
    import pyarrow.csv as pacsv

    (tmp_path / "m").mkdir()
    (tmp_path / "pics").mkdir()
    local = tmp_path / "pics" / "a.jpg"
    local.write_bytes(corpus[0].read_bytes())
    # A relative path, a URI listed twice (its first row's values are kept), a blank row.
    (tmp_path / "m" / "list.csv").write_text(
        f"uri,label,caption\n../pics/a.jpg,3,first\n{corpus[1]},4,\n,5,blank\n../pics/a.jpg,6,again\n"
    )
    plan = plan_input(config(tmp_path / "m", keep_columns="label,caption").input, STORAGE)
    assert plan.layout.kept == pa.schema([("label", pa.int64()), ("caption", pa.string())])
    [block] = plan.layout.blocks(plan.uris, 8)
    read = read_all(plan.layout, block.to_pydict() | {KEPT: np.asarray(block[KEPT].to_pylist(), object)}, 8)
    kept = {uri: pickle.loads(k) for uri, k in zip(read["uri"], read[KEPT], strict=True)}
    assert kept == {str(local): {"label": 3, "caption": "first"}, str(corpus[1]): {"label": 4, "caption": ""}}
    assert pickle.loads(pickle.dumps(plan.layout)).kept_rows is None  # the read tasks get theirs in the blocks
    pq.write_table(pacsv.read_csv(tmp_path / "m" / "list.csv"), tmp_path / "m" / "list.parquet")
    (tmp_path / "m" / "list.csv").unlink()
    parquet = plan_input(config(tmp_path / "m", format="manifest", keep_columns="caption").input, STORAGE)
    assert parquet.layout.kept_rows.column("uri").to_pylist() == [str(local), str(corpus[1])]
    (tmp_path / "m" / "list.txt").write_text("../pics/a.jpg\n")
    with pytest.raises(StorageError, match="list.txt lists one URI a line, with no columns to keep"):
        plan_input(config(tmp_path / "m", format="manifest", keep_columns="caption").input, STORAGE)
