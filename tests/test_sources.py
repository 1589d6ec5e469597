"""Input layouts and storage without a cluster: WebDataset shards, planning, manifests, options, secrets."""

import gzip
import importlib
import os
import pathlib
import sys
import tarfile

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from mnasnet_batch import storage
from mnasnet_batch.config import REDACTED, StorageConfig, load_config, parse_override, to_dict
from mnasnet_batch.decode.preprocess import PreprocessSpec, decode_batch
from mnasnet_batch.inputs import manifests, spool
from mnasnet_batch.inputs.files import FilesLayout
from mnasnet_batch.inputs.layout import InputPlan
from mnasnet_batch.inputs.listing import layout_of_rows, plan_input
from mnasnet_batch.inputs.manifests import ManifestLayout, manifest_chunks, resolve_relative
from mnasnet_batch.inputs.parquet import ParquetLayout
from mnasnet_batch.inputs.webdataset import WebDatasetLayout, record_finished, recorded_images, sample_key, shard_images
from mnasnet_batch.outputs import folder as output
from mnasnet_batch.storage import Storage, StorageError
from tests.support import make_tar

EXTENSIONS = ("jpg", "png")
# fsspec's loaded implementations (the fsspec.registry attribute is a read-only view of it).
REGISTRY = importlib.import_module("fsspec.registry")._registry
NO_STORAGE = Storage()


# Offsets: x1.jpg header 0, data 512-3512; x1.json header 3584; x2.cls header 4608, data 5120;
# x3.png header 5632, data 6144-9144; x3.txt header 9216, data 9728-11728; x4.jpg header 11776.
SHARD = make_tar(
    [
        ("a/x1.jpg", b"J" * 3000),
        ("a/x1.json", b"{}"),
        ("a/x2.cls", b"3"),
        ("a/x3.png", b"P" * 3000),
        ("a/x3.txt", b"t" * 2000),
        ("a/x4.jpg", b"Q" * 3000),
    ]
)


def read(path, data):
    path.write_bytes(data)
    return [
        (uri.split("#", 1)[1] if "#" in uri else "", item)
        for uri, item in shard_images(str(path), EXTENSIONS, NO_STORAGE)
    ]


def test_a_whole_shard_yields_one_item_per_sample(tmp_path):
    items = read(tmp_path / "s.tar", SHARD)
    assert [name for name, _ in items] == ["a/x1.jpg", "a/x2", "a/x3.png", "a/x4.jpg"]
    assert items[0][1] == b"J" * 3000 and items[2][1] == b"P" * 3000
    assert isinstance(items[1][1], ValueError) and "no image member (members: x2.cls)" in str(items[1][1])
    gzipped = read(tmp_path / "s.tar.gz", gzip.compress(SHARD))
    assert [(name, str(item)) for name, item in gzipped] == [(name, str(item)) for name, item in items]


@pytest.mark.parametrize(
    "cut, expected",
    [
        (2024, [("a/x1.jpg", "inside member a/x1.jpg")]),
        (4708, [("a/x1.jpg", None), ("", "after member a/x1.json")]),
        (5632, [("a/x1.jpg", None), ("a/x2", "after member a/x2.cls")]),
        (9728, [("a/x1.jpg", None), ("a/x2", "no image member"), ("a/x3.png", None), ("a/x3.txt", "inside member")]),
        (100, [("", "truncated header")]),
    ],
    ids=["inside-image", "inside-header", "at-block-boundary", "inside-later-member", "first-header"],
)
def test_a_truncated_shard_yields_what_can_be_read_then_one_error(tmp_path, cut, expected):
    items = read(tmp_path / "s.tar", SHARD[:cut])
    assert [name for name, _ in items] == [name for name, _ in expected]
    for (_, item), (_, message) in zip(items, expected, strict=True):
        if message is None:
            assert isinstance(item, bytes)
        else:
            assert isinstance(item, Exception) and message in str(item)
    if expected[-1][1] != "no image member":
        assert all(isinstance(item, bytes) for _, item in items[:-1] if not isinstance(item, ValueError))
        assert type(items[-1][1]).__name__ == "ReadError"


def test_a_missing_shard_is_one_error_naming_it(tmp_path):
    [(uri, error)] = list(shard_images(str(tmp_path / "gone.tar"), EXTENSIONS, NO_STORAGE))
    assert uri == str(tmp_path / "gone.tar") and isinstance(error, FileNotFoundError)


def test_sample_keys_follow_webdataset():
    assert sample_key("a/b/img_01.seg.png") == "a/b/img_01"
    assert sample_key("img_01.jpg") == "img_01"
    assert sample_key("README") is None


@pytest.fixture()
def layouts(tmp_path):
    root = tmp_path / "layouts"
    (root / "images" / "sub").mkdir(parents=True)
    (root / "images" / "sub" / "b.JPG").write_bytes(b"x")
    (root / "images" / "a.png").write_bytes(b"x")
    (root / "images" / "notes.txt").write_text("ignored")
    (root / "shards").mkdir()
    for i in range(2):
        (root / "shards" / f"{i:06d}.tar").write_bytes(SHARD)
    (root / "table").mkdir()
    pq.write_table(pa.table({"id": ["a"], "image": [b"x"]}), root / "table" / "part-0.parquet")
    (root / "list").mkdir()
    pq.write_table(pa.table({"uri": ["s3://b/a.jpg"]}), root / "list" / "m.parquet")
    (root / "urls.txt").write_text("/x/a.jpg\n")
    return root


def config(uri, **values):
    overrides = [parse_override(f"input.{key}={value}") for key, value in values.items()]
    return load_config(overrides=[{"input": {"uri": str(uri)}}, *overrides])


def test_each_layout_makes_its_own_blocks(tmp_path):
    uris = [f"/x/{i}.jpg" for i in range(10)]
    # Loose files double from one batch, even of one image; shards and Parquet files are one block (task) each.
    assert [b.num_rows for b in FilesLayout(config(tmp_path).input, NO_STORAGE).blocks(pa.array(uris), 1)] == [
        1,
        2,
        4,
        3,
    ]
    assert [
        b.num_rows for b in ManifestLayout(config(tmp_path).input, NO_STORAGE).blocks(pa.array(uris), 3)
    ] == [3, 6, 1]
    shards = WebDatasetLayout(config(tmp_path).input, NO_STORAGE).blocks(pa.array(["/x/a.tar", "/x/b.tar"]), 64)
    assert [b.column("uri").to_pylist() for b in shards] == [["/x/a.tar"], ["/x/b.tar"]]
    many = ParquetLayout(config(tmp_path).input, NO_STORAGE).blocks(
        pa.array([f"/p/{i}" for i in range(2050)]), 64
    )
    assert [b.num_rows for b in many] == [3] * 683 + [1]


def test_output_rows_name_their_input_and_layout(tmp_path):
    shards = WebDatasetLayout(config(tmp_path).input, NO_STORAGE)
    assert shards.row_input("s3://b/a#1.TAR#x#2.jpg") == "s3://b/a#1.TAR"  # the shard ends at its extension
    assert shards.row_input("/d/s.tar.gz#k.jpg") == "/d/s.tar.gz" and shards.row_input("/d/s.tar") == "/d/s.tar"
    assert ParquetLayout(config(tmp_path).input, NO_STORAGE).row_input("/t/p.parquet#42") == "/t/p.parquet"
    files = FilesLayout(config(tmp_path).input, NO_STORAGE)
    assert files.row_inputs(["/p/a#1.jpg", "/p/b.jpg"]) == {"/p/a#1.jpg": ["/p/a#1.jpg"], "/p/b.jpg": ["/p/b.jpg"]}
    assert shards.row_inputs(["/s/0.tar#a.jpg", "/s/1.tar#b.jpg", "/s/0.tar#c.jpg"]) == {
        "/s/0.tar": ["/s/0.tar#a.jpg", "/s/0.tar#c.jpg"],
        "/s/1.tar": ["/s/1.tar#b.jpg"],
    }
    auto = config(tmp_path).input
    assert layout_of_rows(auto, NO_STORAGE, ["/s/0.tar#a.jpg"]).name == "webdataset"
    assert layout_of_rows(auto, NO_STORAGE, ["/t/p.parquet#1", "/t/p.parquet#2"]).name == "parquet"
    assert layout_of_rows(auto, NO_STORAGE, ["/p/a#1.jpg", "s3://b/c.jpg"]).name == "files"
    assert layout_of_rows(config(tmp_path, format="webdataset").input, NO_STORAGE, ["/s/data.bin#a.jpg"]).name == (
        "webdataset"
    )


def test_shard_rows_are_read_back_from_one_pass_over_the_shard(tmp_path):
    layout = WebDatasetLayout(config(tmp_path).input, NO_STORAGE)
    shard = str(tmp_path / "s.tar")
    (tmp_path / "s.tar").write_bytes(SHARD)
    found = layout.read_rows(shard, [f"{shard}#a/x3.png", f"{shard}#a/x1.jpg", f"{shard}#a/gone.jpg"])
    assert found[f"{shard}#a/x1.jpg"] == b"J" * 3000 and found[f"{shard}#a/x3.png"] == b"P" * 3000
    assert isinstance(found[f"{shard}#a/gone.jpg"], FileNotFoundError)
    # Cut inside a/x3.png's data: what comes before is read, the rest gets the error that stopped the read.
    (tmp_path / "s.tar").write_bytes(SHARD[:7000])
    found = layout.read_rows(shard, [f"{shard}#a/x1.jpg", f"{shard}#a/x4.jpg"])
    assert found[f"{shard}#a/x1.jpg"] == b"J" * 3000
    assert isinstance(found[f"{shard}#a/x4.jpg"], tarfile.ReadError)
    assert all(isinstance(v, FileNotFoundError) for v in layout.read_rows(str(tmp_path / "no.tar"), ["x"]).values())


def test_parquet_rows_are_read_back_from_their_row_groups(tmp_path):
    path = tmp_path / "t.parquet"
    table = pa.table({"key": [7, 8, 9, 10, 11], "jpg": [b"a", b"b", None, b"d", b"e"]})
    pq.write_table(table, path, row_group_size=2)
    layout = ParquetLayout(config(tmp_path, image_column="jpg", id_column="key").input, NO_STORAGE)
    uris = [f"{path}#{i}" for i in (11, 7, 9, 12)]
    found = layout.read_rows(str(path), uris)
    assert found[uris[0]] == b"e" and found[uris[1]] == b"a"
    assert isinstance(found[uris[2]], ValueError) and "jpg is null" in str(found[uris[2]])
    assert isinstance(found[uris[3]], FileNotFoundError) and "key 12" in str(found[uris[3]])


def test_layouts_are_detected(layouts):
    plan = plan_input(config(layouts / "images").input, NO_STORAGE)
    assert plan.layout.name == "files" and [p.rsplit("/", 1)[1] for p in plan.uris.to_pylist()] == ["a.png", "b.JPG"]
    plan = plan_input(config(layouts / "shards").input, NO_STORAGE)
    assert plan.layout.name == "webdataset" and len(plan.uris) == 2 and plan.describe() == "2 tar shards"
    assert plan_input(config(layouts / "table").input, NO_STORAGE).layout.name == "parquet"
    assert plan_input(config(layouts / "list").input, NO_STORAGE).layout.name == "manifest"
    plan = plan_input(config(layouts / "urls.txt").input, NO_STORAGE)
    assert plan.layout.name == "manifest" and plan.uris.to_pylist() == ["/x/a.jpg"]
    assert plan.describe() == "1 image URIs from manifests"
    # Images win over other layouts in one tree; input.format picks another.
    assert plan_input(config(layouts).input, NO_STORAGE).layout.name == "files"
    assert plan_input(config(layouts, format="webdataset").input, NO_STORAGE).uris[0].as_py().endswith("000000.tar")
    assert plan_input(config(f"{layouts}/shards/*.tar").input, NO_STORAGE).layout.name == "webdataset"


def test_plans_that_cannot_run_are_refused_with_what_to_set(layouts, tmp_path):
    with pytest.raises(StorageError, match=r"has no column picture; its columns: id \(string\), image \(binary\); set"):
        plan_input(config(layouts / "table", format="parquet", image_column="picture").input, NO_STORAGE)
    with pytest.raises(StorageError, match="holds no tar shards"):
        plan_input(config(layouts / "images", format="webdataset").input, NO_STORAGE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StorageError, match="holds no image files .* tar shards, Parquet or Arrow files, or manifests"):
        plan_input(config(tmp_path / "empty").input, NO_STORAGE)
    with pytest.raises(StorageError, match="does not exist"):
        plan_input(config(tmp_path / "nowhere").input, NO_STORAGE)


def manifest_uris(uri: str, column: str, storage: Storage) -> pa.ChunkedArray:
    """Every URI a manifest lists, in the chunks the job reads it in."""
    return pa.chunked_array(list(manifest_chunks(uri, column, storage)), pa.large_string())


def test_manifests_of_each_kind_list_their_uris(tmp_path):
    (tmp_path / "m.txt").write_text("s3://a/1.jpg\n\n  gs://b/2.png  \n")
    (tmp_path / "m.csv").write_text("id,uri\n1,s3://a/1.jpg\n2,\n3,/x/3.jpg\n")
    (tmp_path / "m.tsv").write_text("uri\tid\ns3://a/1.jpg\t1\n")
    pq.write_table(pa.table({"link": ["s3://a/1.jpg", None]}), tmp_path / "m.parquet")
    assert manifest_uris(str(tmp_path / "m.txt"), "uri", NO_STORAGE).to_pylist() == [
        "s3://a/1.jpg",
        "gs://b/2.png",
    ]
    assert manifest_uris(str(tmp_path / "m.csv"), "uri", NO_STORAGE).to_pylist() == ["s3://a/1.jpg", "/x/3.jpg"]
    assert manifest_uris(str(tmp_path / "m.tsv"), "uri", NO_STORAGE).to_pylist() == ["s3://a/1.jpg"]
    assert manifest_uris(str(tmp_path / "m.parquet"), "link", NO_STORAGE).to_pylist() == ["s3://a/1.jpg"]
    with pytest.raises(StorageError, match="manifest .*m.csv cannot be read"):
        manifest_uris(str(tmp_path / "m.csv"), "url", NO_STORAGE)


def test_image_reads_report_what_does_not_exist(corpus, tmp_path):
    spec = PreprocessSpec.for_model("mnasnet0_5", 10**8)
    uris = [str(corpus[0]), str(tmp_path / "missing.jpg"), "nope://bucket/x.jpg", f"file://{corpus[1]}"]
    layout = FilesLayout(config(tmp_path).input, NO_STORAGE)
    [read] = layout.read({"uri": np.asarray(uris, dtype=object)}, batch_size=len(uris))
    batch = decode_batch(read, spec)
    assert list(batch["uri"]) == uris
    assert batch["error"][0] == "" and batch["error"][3] == "" and batch["image"][0].any()
    assert batch["error"][1].startswith("FileNotFoundError")
    assert batch["error"][2].startswith("StorageError: nope://bucket/x.jpg: unknown URI scheme")


def test_parquet_rows_are_file_hash_id_and_a_null_image_is_an_error(corpus, tmp_path):
    spec = PreprocessSpec.for_model("mnasnet0_5", 10**8)
    rows = pa.record_batch({"key": [7, 8], "jpg": pa.array([corpus[0].read_bytes(), None])})
    layout = ParquetLayout(config(tmp_path, image_column="jpg", id_column="key").input, NO_STORAGE)
    out = decode_batch(layout.encoded(rows, "s3://b/t/part-0.parquet", 0, "jpg"), spec)
    assert list(out["uri"]) == ["s3://b/t/part-0.parquet#7", "s3://b/t/part-0.parquet#8"]
    assert out["error"][0] == "" and out["error"][1] == "ValueError: jpg is null"


@pytest.mark.parametrize(
    "ids, message",
    [
        ([0, 1, 1, 2, 2, 2], r"2 values of id are on more than one row \(e.g. 1 on 2 rows\)"),
        (["a", None, "b"], "1 rows have a null id"),
    ],
    ids=["repeated", "null"],
)
def test_parquet_ids_that_do_not_name_each_row_of_a_file_once_are_refused(tmp_path, ids, message):
    (tmp_path / "t").mkdir()
    # Another file with the same ids is fine: its rows' uris name their own file.
    pq.write_table(pa.table({"id": [0, 1, 2], "image": [b"x"] * 3}), tmp_path / "t" / "a.parquet")
    pq.write_table(pa.table({"id": ids, "image": [b"x"] * len(ids)}), tmp_path / "t" / "b.parquet")
    # Without input.id_column, files that all hold an id column are read by it (the job's earlier default).
    for id_column in ("id", ""):
        with pytest.raises(StorageError, match=rf"input {tmp_path}/t/b.parquet: {message}; a row's uri is FILE#ID"):
            plan_input(config(tmp_path / "t", id_column=id_column).input, NO_STORAGE)
    # Where one has none, a row's index in its file is its id, whatever the others' columns hold.
    pq.write_table(pa.table({"image": [b"x"] * 2}), tmp_path / "t" / "c.parquet")
    assert plan_input(config(tmp_path / "t").input, NO_STORAGE).images.to_pylist() == [3, len(ids), 2]
    (tmp_path / "t" / "c.parquet").unlink()
    (tmp_path / "t" / "b.parquet").unlink()
    pq.write_table(pa.table({"id": [0, 1, 2], "image": [b"x"] * 3}), tmp_path / "t" / "b.parquet")
    assert len(plan_input(config(tmp_path / "t", id_column="id").input, NO_STORAGE).uris) == 2


def test_storage_section_becomes_fsspec_options():
    config = StorageConfig(
        endpoint_url="http://127.0.0.1:9000",
        anonymous=True,
        region="eu-west-3",
        options={"client_kwargs": {"verify": False}, "s3": {"requester_pays": True}, "gs": {"project": "p"}},
    )
    assert storage.fsspec_options("s3", config) == {
        "endpoint_url": "http://127.0.0.1:9000",
        "anon": True,
        "client_kwargs": {"region_name": "eu-west-3", "verify": False},
        "requester_pays": True,
    }
    assert storage.fsspec_options("gs", config) == {
        "endpoint_url": "http://127.0.0.1:9000",
        "token": "anon",
        "client_kwargs": {"verify": False},
        "project": "p",
    }
    assert storage.fsspec_options("file", config) == {} and storage.fsspec_options("memory", config) == {}


class RecordingFileSystem(fsspec.AbstractFileSystem):
    """Stands in for gcsfs and adlfs, which cannot reach a real GCS or Azure from here (mocked on purpose)."""

    protocol = ("gs", "az")
    cachable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.kwargs = kwargs


def test_gcs_and_azure_get_the_storage_section_mocked(monkeypatch):
    for protocol in ("gs", "az"):
        monkeypatch.setitem(REGISTRY, protocol, RecordingFileSystem)
    fs, path = Storage(StorageConfig(anonymous=True, endpoint_url="http://gcs:4443")).filesystem("gs://bucket/a.jpg")
    assert fs.kwargs == {"token": "anon", "endpoint_url": "http://gcs:4443"} and path == "bucket/a.jpg"
    fs, _ = Storage(StorageConfig(anonymous=True, options={"account_name": "acct"})).filesystem("az://container/a.jpg")
    assert fs.kwargs == {"anon": True, "account_name": "acct"}


@pytest.mark.parametrize("uri, extra", [("s3://b/x", "s3"), ("gs://b/x", "gcs"), ("abfs://c/x", "azure")])
def test_a_missing_filesystem_package_names_the_extra(monkeypatch, uri, extra):
    # gcsfs and adlfs are not installed here; s3fs is, so it is hidden for this test.
    monkeypatch.delitem(REGISTRY, "s3", raising=False)
    monkeypatch.setitem(sys.modules, "s3fs", None)
    with pytest.raises(StorageError, match=rf"pip install 'mnasnet-batch\[{extra}\]'"):
        NO_STORAGE.filesystem(uri)


def test_credentials_are_redacted_from_the_written_config():
    config = load_config(
        overrides=[
            parse_override("storage.endpoint_url=http://user:pa55@minio:9000"),
            parse_override("storage.options={key: AKIA1, secret: s3cr3t, client_kwargs: {aws_session_token: t0k}}"),
        ]
    )
    assert config.storage.options["secret"] == "s3cr3t"
    written = yaml.safe_dump(to_dict(config))
    for secret in ("AKIA1", "s3cr3t", "t0k", "pa55"):
        assert secret not in written
    assert to_dict(config)["storage"]["options"]["client_kwargs"] == {"aws_session_token": REDACTED}
    assert to_dict(config)["storage"]["endpoint_url"] == f"http://{REDACTED}@minio:9000"


def test_listed_paths_with_glob_characters_are_read_as_they_are(tmp_path):
    trip = tmp_path / "2024 [trip]"
    trip.mkdir()
    names = ["br[1].jpg", "a?.jpg", "star*.jpg", "plain.jpg"]
    for name in names:
        (trip / name).write_bytes(name.encode())
    (trip / "br1.jpg").write_bytes(b"what br[1].jpg would match as a glob")
    uris = [str(trip / name) for name in names]
    assert NO_STORAGE.read_many(uris) == [name.encode() for name in names]
    # A folder whose name looks like a glob is the folder; a glob that names nothing literally is a glob.
    plan = plan_input(config(trip).input, NO_STORAGE)
    assert plan.layout.name == "files" and sorted(plan.uris.to_pylist()) == sorted([*uris, str(trip / "br1.jpg")])
    assert plan_input(config(f"{tmp_path}/2024 ?trip?/br*.jpg").input, NO_STORAGE).uris.to_pylist() == [
        str(trip / "br1.jpg"),
        str(trip / "br[1].jpg"),
    ]


def test_reads_on_s3_are_literal_too(s3_server):
    config = StorageConfig(**s3_server)
    fs, _ = Storage(config).filesystem("s3://globs")
    fs.mkdir("globs")
    names = ["br[1].jpg", "a?.jpg", "star*.jpg"]
    for name in names:
        fs.pipe(f"globs/shots [2024]/{name}", name.encode())
    fs.pipe("globs/shots [2024]/br1.jpg", b"a decoy")
    uris = [f"s3://globs/shots [2024]/{name}" for name in names]
    assert Storage(config).read_many([*uris, "s3://globs/missing[1].jpg"])[:3] == [n.encode() for n in names]
    assert isinstance(Storage(config).read_many(["s3://globs/missing[1].jpg"])[0], FileNotFoundError)
    chunks, single = Storage(config).list_files("s3://globs/shots [2024]")
    assert not single and sorted(u for c in chunks for u in c) == sorted([*uris, "s3://globs/shots [2024]/br1.jpg"])


def test_symlinked_folders_are_followed_once_and_loops_are_skipped(tmp_path, caplog):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "c.jpg").write_bytes(b"c")
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "a.jpg").write_bytes(b"a")
    (images / "sub" / "b.jpg").write_bytes(b"b")
    (images / "linked").symlink_to(elsewhere, target_is_directory=True)
    (images / "sub" / "back_up").symlink_to(images, target_is_directory=True)  # a loop
    (images / "file_link.jpg").symlink_to(elsewhere / "c.jpg")
    (images / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    (images / "through_a_file.jpg").symlink_to(images / "a.jpg" / "gone")  # stat fails with ENOTDIR
    with caplog.at_level("WARNING", logger="mnasnet_batch.storage"):
        chunks, _ = NO_STORAGE.list_files(str(images))
        listed = sorted(u for c in chunks for u in c)
    expected = ("a.jpg", "broken.jpg", "file_link.jpg", "linked/c.jpg", "sub/b.jpg", "through_a_file.jpg")
    assert listed == [str(images / name) for name in expected]
    assert f"not following {images}/sub/back_up: a symlink loop back to {os.path.realpath(images)}" in caplog.text


def test_image_members_a_webdataset_sample_drops_are_counted_and_logged(tmp_path, caplog):
    shard = make_tar(
        [
            ("photo.2024.jpg", b"A"),
            ("photo.2025.jpg", b"B"),
            ("photo.json", b"{}"),
            ("a/.hidden.jpg", b"C"),
            ("other.png", b"D"),
        ]
    )
    with caplog.at_level("WARNING", logger="mnasnet_batch.inputs"):
        items = read(tmp_path / "s.tar", shard)
    assert items == [("photo.2024.jpg", b"A"), ("other.png", b"D")]
    assert f"shard {tmp_path}/s.tar: 2 image members not labeled (photo.2025.jpg, a/.hidden.jpg)" in caplog.text


def test_files_a_layout_ignores_are_counted_and_logged(layouts, caplog):
    with caplog.at_level("INFO", logger="mnasnet_batch.inputs"):
        plan_input(config(layouts / "images").input, NO_STORAGE)
    assert f"input {layouts}/images: ignoring 1 other files (not images): notes.txt" in caplog.text


def test_manifests_skip_comments_resolve_relative_paths_and_decode_file_uris(tmp_path, corpus, caplog):
    spaced = tmp_path / "my photos" / "a b%.jpg"
    spaced.parent.mkdir()
    spaced.write_bytes(corpus[0].read_bytes())
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "m.txt").write_text(
        f"# images for the test\n  # indented comment\nimg/1.jpg\n../my photos/a b%.jpg\n{spaced.as_uri()}\n"
        "s3://b/x.jpg\n/abs/2.jpg\nimg/1.jpg\n"
    )
    resolved = [str(lists / "img" / "1.jpg"), str(spaced), spaced.as_uri(), "s3://b/x.jpg", "/abs/2.jpg"]
    assert manifest_uris(str(lists / "m.txt"), "uri", NO_STORAGE).to_pylist() == [*resolved, resolved[0]]
    (lists / "m.csv").write_text("uri\nimg/1.jpg\ns3://b/x.jpg\n")
    assert manifest_uris(str(lists / "m.csv"), "uri", NO_STORAGE).to_pylist() == [resolved[0], "s3://b/x.jpg"]
    pq.write_table(pa.table({"uri": ["img/1.jpg"]}), lists / "m.parquet")
    assert manifest_uris(str(lists / "m.parquet"), "uri", NO_STORAGE).to_pylist() == [resolved[0]]
    assert resolve_relative("img/1.jpg", "s3://b/lists/m.txt") == "s3://b/lists/img/1.jpg"
    assert resolve_relative("../1.jpg", "gs://b/lists/m.txt") == "gs://b/1.jpg"
    # A percent-encoded file:// URI (Path.as_uri()) reads the file it names.
    assert NO_STORAGE.read_many([spaced.as_uri()]) == [spaced.read_bytes()]
    # The same image listed twice is one input.
    with caplog.at_level("WARNING", logger="mnasnet_batch.inputs"):
        plan = plan_input(config(lists / "m.txt").input, NO_STORAGE)
    assert plan.uris.to_pylist() == resolved and "1 URIs are listed more than once" in caplog.text


def test_text_manifests_in_arrow_keep_order_and_line_ends_across_chunks(tmp_path, monkeypatch):
    # Chunks of 16 bytes: lines, a CRLF and a multi-byte character are cut across chunk boundaries.
    monkeypatch.setattr(manifests, "TEXT_CHUNK_BYTES", 16)
    lines = [f"/data/d{i % 3}/ïmg_{i:04d}.jpg" for i in range(50)]
    (tmp_path / "m.txt").write_bytes(("\r\n".join(lines[:25]) + "\n# a comment\n\n" + "\n".join(lines[25:])).encode())
    uris = manifest_uris(str(tmp_path / "m.txt"), "uri", NO_STORAGE)
    assert isinstance(uris, pa.ChunkedArray) and uris.to_pylist() == lines
    # Lines that are not UTF-8, cut across chunks too, are numbered where they are; a comment is left out.
    bad = str(tmp_path / "bad.txt")
    (tmp_path / "bad.txt").write_bytes(b"/ok.jpg\r\n/caf\xe9.jpg\n# caf\xe9\n/ok2.jpg\n\n/\xff\xfe-long-name.jpg")
    expected = ["/ok.jpg", f"{bad}#line=2", "/ok2.jpg", f"{bad}#line=6"]
    assert manifest_uris(bad, "uri", NO_STORAGE).to_pylist() == expected


def test_a_manifest_line_that_is_not_utf8_is_an_error_row_naming_it_and_the_others_are_read(tmp_path, corpus, caplog):
    lists = tmp_path / "lists"
    lists.mkdir()
    good = [str(corpus[0]), str(corpus[1])]
    (lists / "m.txt").write_bytes(f"{good[0]}\n".encode() + b"/photos/caf\xe9.jpg\n" + f"{good[1]}\n".encode())
    with caplog.at_level("WARNING", logger="mnasnet_batch.inputs"):
        plan = plan_input(config(lists / "m.txt").input, NO_STORAGE)
    manifest = str(lists / "m.txt")
    assert sorted(plan.uris.to_pylist()) == sorted([*good, f"{manifest}#line=2"])
    assert f"manifest {manifest}: 1 lines are not UTF-8 (line 2)" in caplog.text
    [read] = plan.layout.read({"uri": plan.uris.to_numpy()}, batch_size=8)
    rows = {uri: (data, error) for uri, data, error in zip(read["uri"], read["data"], read["error"], strict=True)}
    assert rows[good[0]] == (corpus[0].read_bytes(), "") and rows[good[1]] == (corpus[1].read_bytes(), "")
    assert rows[f"{manifest}#line=2"] == (
        b"",
        f"UnicodeError: line 2 of manifest {manifest} is not UTF-8; save the manifest as UTF-8 to label it",
    )
    # A CSV's value: its row, counted after the header.
    (lists / "m.txt").unlink()
    (lists / "m.csv").write_bytes(f"uri\n{good[0]}\n".encode() + b"/photos/caf\xe9.jpg\n")
    plan = plan_input(config(lists).input, NO_STORAGE)
    [read] = plan.layout.read({"uri": plan.uris.to_numpy()}, batch_size=8)
    assert list(read["error"]) == [
        "",
        f"UnicodeError: row 2 of manifest {lists / 'm.csv'} is not UTF-8; save the manifest as UTF-8 to label it",
    ]
    # The same fragment on a URI that is not the manifest's is an image URI, read as any other.
    other = f"{tmp_path}/elsewhere.txt#line=2"
    assert [[index for index, _ in wave] for wave in plan.layout.read_waves([other])] == [[0]]
    [[(_, error)]] = list(plan.layout.read_waves([other]))
    assert isinstance(error, FileNotFoundError)


def test_a_file_name_that_is_not_utf8_is_listed_as_its_file_uri_and_read_back(tmp_path, corpus):
    folder = tmp_path / "card"
    folder.mkdir()
    latin1 = os.path.join(os.fsencode(folder), b"caf\xe9.jpg")  # a Latin-1 byte, as on old shares
    with open(latin1, "wb") as f:
        f.write(corpus[0].read_bytes())
    # Names that are UTF-8 stay as they are, '%' included, even one that reads like the other's escaped name.
    for name, source in [("caf%E9.jpg", corpus[1]), ("100% ok.jpg", corpus[2]), ("ça.jpg", corpus[3])]:
        (folder / name).write_bytes(source.read_bytes())
    plan = plan_input(config(folder).input, NO_STORAGE)
    uris = plan.uris.to_pylist()
    escaped = pathlib.Path(os.fsdecode(latin1)).as_uri()  # RFC 8089: file:///.../card/caf%E9.jpg
    assert escaped.startswith("file:///") and escaped.endswith("/card/caf%E9.jpg")
    assert sorted(uris) == sorted([escaped, *(str(folder / name) for name in ("caf%E9.jpg", "100% ok.jpg", "ça.jpg"))])
    assert all(uri.encode() for uri in uris)  # UTF-8, as the output's strings must be
    [read] = plan.layout.read({"uri": plan.uris.to_numpy()}, batch_size=8)
    assert list(read["error"]) == [""] * 4
    rows = dict(zip(read["uri"], read["data"], strict=True))
    assert rows[escaped] == corpus[0].read_bytes() and rows[str(folder / "caf%E9.jpg")] == corpus[1].read_bytes()
    # Named directly, or as a single file, the name is the same URI.
    chunks, single = NO_STORAGE.list_files(os.fsdecode(latin1))
    assert single and [u for c in chunks for u in c] == [escaped]
    assert storage.file_uri_path(escaped) == os.fsdecode(latin1)


def test_files_that_are_not_regular_files_are_never_read_but_named(tmp_path, caplog):
    folder = tmp_path / "shots"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(b"x")
    (folder / "3.jpg").symlink_to(folder / "0.jpg")  # read, as is a broken symlink (an error row)
    (folder / "4.jpg").symlink_to(folder / "gone.jpg")
    os.mkfifo(folder / "x.jpg")
    (folder / "z.jpg").symlink_to("/dev/zero")
    with caplog.at_level("WARNING", logger="mnasnet_batch.storage"):
        plan = plan_input(config(folder).input, NO_STORAGE)
    assert sorted(plan.uris.to_pylist()) == [str(folder / f"{i}.jpg") for i in range(5)]
    assert f"input {folder}: ignoring 2 other files (not regular files, never read): " in caplog.text
    assert "x.jpg (a FIFO)" in caplog.text and "z.jpg (a symlink to /dev/zero, a character device)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mnasnet_batch.storage"):
        plan = plan_input(config(f"{folder}/*.jpg").input, NO_STORAGE)
    assert sorted(plan.uris.to_pylist()) == [str(folder / f"{i}.jpg") for i in range(5)]
    assert "ignoring 2 other files (not regular files, never read)" in caplog.text
    with pytest.raises(StorageError, match=r"x.jpg is not a regular file \(a FIFO\)"):
        plan_input(config(folder / "x.jpg").input, NO_STORAGE)
    with pytest.raises(StorageError, match=r"z.jpg is not a regular file \(a symlink to /dev/zero"):
        plan_input(config(folder / "z.jpg").input, NO_STORAGE)


def test_repeated_uris_are_dropped_exactly_at_their_first_place(monkeypatch):
    uris = pa.chunked_array([["/a", "/b", "/a"], ["/c", "/b", "/d", "/a"]], pa.large_string())
    expected = ["/a", "/b", "/c", "/d"]
    assert spool.first_occurrences(uris).to_pylist() == expected
    assert spool.first_occurrences(pa.chunked_array([["/x", "/y"]], pa.large_string())).to_pylist() == ["/x", "/y"]
    # Equal hashes are only suspects: the strings decide (every URI hashing alike, as if all collided).
    monkeypatch.setattr(spool, "uri_hashes", lambda chunk: np.zeros(len(chunk), np.uint64))
    assert spool.first_occurrences(uris).to_pylist() == expected


def test_uri_hashes_depend_on_the_string_only(monkeypatch):
    # Steps of 64 bytes: strings fall across steps, and one is longer than a step.
    monkeypatch.setattr(spool, "_HASH_BYTES", 64)
    long = "data:image/png;base64," + "A" * 200
    values = ["", "/a/1.jpg", "s3://b/1.jpg", long, "/a/1.jpg", "", "/a/2.jpg", long, "/a/1.jpg"]
    strings = pa.array(values * 5, pa.large_string())
    hashes = spool.uri_hashes(strings)
    by_value = {}
    for value, hashed in zip(values * 5, hashes.tolist(), strict=True):
        assert by_value.setdefault(value, hashed) == hashed, value
    assert len(set(by_value.values())) == len(by_value)
    # A slice (an offset into the same buffers) hashes each string as the whole array does.
    assert spool.uri_hashes(strings.slice(3, 20)).tolist() == hashes[3:23].tolist()
    # The partition bits are spread: 64 partitions of 64,000 URIs listed in order are each ~1/64 of them.
    counts = np.bincount(spool.uri_hashes(pa.array([f"/d/{i:06d}.jpg" for i in range(64_000)], pa.large_string())) % 64)
    assert counts.min() > 800 and counts.max() < 1200


def test_a_shard_read_to_its_end_is_recorded_with_its_sample_count(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    members = [(f"s{i}.jpg", b"x") for i in range(3)]
    for name in ("a.tar", "b.tar"):
        (shards / name).write_bytes(make_tar(members))
    layout = WebDatasetLayout(config(shards).input, NO_STORAGE)
    run = tmp_path / "out" / "run=r"
    batches = list(layout.read({"uri": np.array([str(shards / "a.tar")], dtype=object)}, 2, str(run)))
    assert [len(b["uri"]) for b in batches] == [2, 1]
    uris = pa.array([str(shards / "a.tar"), str(shards / "b.tar")])
    # The run's folder, and the output's (every run's, for incremental runs): a.tar holds 3 samples, b.tar unknown.
    assert recorded_images(uris, str(run), NO_STORAGE).to_pylist() == [3, None]
    assert layout.recorded_images(uris, str(tmp_path / "out")).to_pylist() == [3, None]
    assert layout.recorded_images(uris, str(tmp_path / "nothing")).to_pylist() == [None, None]


def written(folder: str, uris: list[str]) -> output.Labeled:
    """``uris`` as the rows of a run's folder, in two parts (so they are read in more than one batch)."""
    os.makedirs(folder, exist_ok=True)
    half = len(uris) // 2
    for i, chunk in enumerate((uris[:half], uris[half:])):
        pq.write_table(pa.table({"uri": pa.array(chunk, pa.string())}), f"{folder}/part-{i}.parquet")
    return output.Labeled(fsspec.filesystem("file"), folder, folder)


def test_remaining_skips_the_inputs_whose_rows_are_all_written_and_filters_only_the_others(tmp_path):
    run = str(tmp_path / "out" / "run=r")
    layout = WebDatasetLayout(config(tmp_path).input, NO_STORAGE)
    plan = InputPlan(layout, ["/s/a.tar", "/s/b.tar", "/s/c.tar", "/s/d.tar"])
    # a: 2 of 2 written; b: 1 of 2; c: read to its end (recorded) but none written; d: never read to its end.
    for shard in ("/s/a.tar", "/s/b.tar", "/s/c.tar"):
        record_finished(run, shard, 2, NO_STORAGE)
    done = written(run, ["/s/a.tar#1.jpg", "/s/b.tar#1.jpg", "/s/a.tar#2.jpg", "/s/d.tar#1.jpg", "/other.tar#1.jpg"])
    todo = plan.remaining(done)
    assert todo.uris.to_pylist() == ["/s/b.tar", "/s/c.tar", "/s/d.tar"]
    assert sorted(todo.skip.to_pylist()) == ["/s/b.tar#1.jpg", "/s/d.tar#1.jpg"]
    # Without records (another run's folder) no shard is known to be complete: all are read, all rows dropped.
    unknown = plan.remaining(written(str(tmp_path / "out" / "run=other"), done.uris().to_pylist()))
    assert len(unknown.uris) == 4 and len(unknown.skip) == 4
    # Parquet files know their rows before reading: no record needed.
    parquet = InputPlan(
        ParquetLayout(config(tmp_path).input, NO_STORAGE), ["/p/x", "/p/y"], pa.array([2, 2])
    )
    todo = parquet.remaining(written(str(tmp_path / "p"), ["/p/x#0", "/p/x#1", "/p/y#1"]))
    assert todo.uris.to_pylist() == ["/p/y"] and todo.skip.to_pylist() == ["/p/y#1"] and todo.image_count == 2
    # A '#' in an input's own URI: rows cannot be told apart by input, so nothing is skipped before reading.
    hashed = InputPlan(layout, ["/s/#a.tar"]).remaining(written(str(tmp_path / "h"), ["/s/#a.tar#1.jpg"]))
    assert hashed.uris.to_pylist() == ["/s/#a.tar"] and hashed.skip.to_pylist() == ["/s/#a.tar#1.jpg"]
    # One URI per image: those written are left out, the order kept, nothing dropped after reading.
    files = InputPlan(
        FilesLayout(config(tmp_path).input, NO_STORAGE), ["/i/3.jpg", "/i/1.jpg", "/i/2.jpg"]
    )
    todo = files.remaining(written(str(tmp_path / "i"), ["/i/1.jpg"]))
    assert todo.uris.to_pylist() == ["/i/3.jpg", "/i/2.jpg"] and todo.skip is None


def test_a_list_longer_than_the_driver_holds_is_written_and_read_back_exactly_once(tmp_path, monkeypatch, caplog):
    # 300 listed URIs of 200 images (100 repeats) over two manifests, past a limit of 16 held URIs, in row groups
    # of 2 (so a partition's piece of a file spans row groups, and files hold many partitions).
    monkeypatch.setattr(spool, "SPOOL_URIS", 16)
    monkeypatch.setattr(spool, "ROW_GROUP_URIS", 2)
    lists = tmp_path / "lists"
    lists.mkdir()
    listed = [f"/x/d{i % 200 % 7}/img_{i % 200:03d}.jpg" for i in range(300)]
    (lists / "a.txt").write_text("\n".join(listed[:150]) + "\n")
    pq.write_table(pa.table({"uri": listed[150:]}), lists / "b.parquet")
    folder = spool.spool_folder(str(tmp_path / "out"))
    with caplog.at_level("WARNING", logger="mnasnet_batch.inputs"):
        plan = plan_input(config(lists).input, NO_STORAGE, folder)
    assert isinstance(plan.uris, spool.SpooledURIs) and len(plan.uris) == 200 and plan.image_count == 200
    assert sorted(plan.listed().to_pylist()) == sorted(set(listed))
    assert "100 URIs are listed more than once" in caplog.text
    # The same plan held in memory, as a shorter list is.
    assert sorted(plan_input(config(lists).input, NO_STORAGE).uris.to_pylist()) == sorted(set(listed))

    # Written rows (some of them listed, one not) are left out, partition by partition.
    done = written(str(tmp_path / "done"), [*listed[:120:2], "/elsewhere.jpg"])
    todo = plan.remaining(done)
    left = sorted(set(listed) - set(listed[:120:2]))
    assert len(todo.uris) == len(left) == 140

    # Read tasks get row groups of the written list: every URI left is read once, a batch at a time.
    blocks = todo.layout.blocks(todo.uris, 8)
    batches = [
        batch
        for block in blocks
        for batch in todo.layout.read({k: block[k].to_numpy(zero_copy_only=False) for k in block.column_names}, 8)
    ]
    assert max(len(b["uri"]) for b in batches) <= 8
    assert sorted(u for b in batches for u in b["uri"]) == left
    assert all(e.startswith("FileNotFoundError") for b in batches for e in b["error"])

    todo.release()
    assert not os.path.exists(folder)


def test_a_list_whose_manifest_fails_midway_leaves_nothing_written(tmp_path, monkeypatch):
    monkeypatch.setattr(spool, "SPOOL_URIS", 16)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "a.txt").write_text("".join(f"/x/img_{i:03d}.jpg\n" for i in range(100)))
    (lists / "b.csv").write_text("url\n/ok.jpg\n")  # not the column input.uri_column names
    folder = spool.spool_folder(str(tmp_path / "out"))
    with pytest.raises(StorageError, match="manifest .*b.csv cannot be read"):
        plan_input(config(lists).input, NO_STORAGE, folder)
    assert not os.path.exists(folder)


def test_a_long_listing_of_loose_files_is_written_a_chunk_at_a_time(tmp_path, monkeypatch, caplog):
    # 60 images and 5 other files in folders, listed 7 paths at a time, past a limit of 16 held URIs.
    monkeypatch.setattr(spool, "SPOOL_URIS", 16)
    monkeypatch.setattr(storage, "LISTING_CHUNK", 7)
    images = []
    for i in range(60):
        path = tmp_path / "in" / f"d{i % 4}" / f"img_{i:02d}.{'JPG' if i % 5 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        images.append(str(path))
    for i in range(5):
        (tmp_path / "in" / f"d{i % 4}" / f"n{i}.tar").write_bytes(b"x")  # shards, which images outrank
    folder = spool.spool_folder(str(tmp_path / "out"))
    with caplog.at_level("INFO", logger="mnasnet_batch"):
        plan = plan_input(config(tmp_path / "in").input, NO_STORAGE, folder)
    assert plan.layout.name == "files" and isinstance(plan.uris, spool.SpooledURIs)
    assert sorted(plan.listed().to_pylist()) == sorted(images) and plan.image_count == 60
    assert "ignoring 5 other files (not images)" in caplog.text and "more than 16 listed URIs" in caplog.text
    # A file each time more than 16 were held: never more than 16 and a chunk of 7.
    written = [pq.read_metadata(f"{folder}/listed/{name}").num_rows for name in os.listdir(f"{folder}/listed")]
    assert sum(written) == 60 and len(written) >= 3 and max(written) <= 16 + 7
    plan.release()
    assert not os.path.exists(folder)
    # Held in memory, the same files come sorted, as every short listing does.
    held = plan_input(config(tmp_path / "in").input, NO_STORAGE)
    assert held.uris.to_pylist() == sorted(images)
    # The shards alone, when the format says so.
    shards = plan_input(config(tmp_path / "in", format="webdataset").input, NO_STORAGE, folder)
    assert len(shards.uris) == 5 and not os.path.exists(folder)
