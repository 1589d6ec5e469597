"""The dataset's kept columns (input.keep_columns) in the Iceberg table: created with them, refused or evolved.

The units stage rows as the write tasks do and commit them on an SQLite catalog, without Ray; the end-to-end test
labels a Hugging Face Parquet folder into a table, killed after its first parts and resumed. The table is read back
with pyiceberg's own catalog and scans, not through the job's code.
"""

import dataclasses
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mnasnet_batch.cli import main
from mnasnet_batch.config import load_config
from mnasnet_batch.inputs.files import FilesLayout
from mnasnet_batch.inputs.kept import pack_rows
from mnasnet_batch.inputs.layout import InputPlan
from mnasnet_batch.model.postprocess import output_table
from mnasnet_batch.outputs import folder
from mnasnet_batch.storage import Storage, StorageError
from tests import hf_data, support
from tests.support import ROOT, kill_session, poll

support.require("pyiceberg", "iceberg")

TABLE = "labels.photos"
LABEL = pa.schema([("label", pa.int64())])


def catalog_of(tmp_path) -> dict:
    return {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": f"file://{tmp_path}/warehouse"}


def load(tmp_path):
    from pyiceberg.catalog import load_catalog

    return load_catalog("default", **catalog_of(tmp_path)).load_table(TABLE)


def rows_of(table) -> dict[str, dict]:
    """The table's current rows by uri, asserting that no uri has two."""
    rows = table.scan().to_arrow().to_pylist()
    assert len(rows) == len({r["uri"] for r in rows}), "an image has two rows"
    return {r["uri"]: r for r in rows}


def open_run(tmp_path, name: str, uris: list[str], kept: pa.Schema, **output_settings):
    """A table run planned as the job plans it, for an input whose layout keeps ``kept``, staging under its own
    output ``name``."""
    from mnasnet_batch.outputs.table import IcebergTable

    settings = {"uri": str(tmp_path / name), "table": TABLE, "catalog": catalog_of(tmp_path), "run_id": name}
    config = load_config(overrides=[{"input": {"uri": "/images"}, "output": settings | output_settings}])
    layout = dataclasses.replace(FilesLayout(config.input, Storage(config.storage)), kept=kept)
    target = IcebergTable.for_config(config)
    return config, target, target.plan_run(config, "weights-a", InputPlan(layout, uris))


def stage(plan, uris: list[str], kept: pa.Schema, values: list[dict], errors: list[str] | None = None) -> None:
    """Stages rows for ``uris`` as the write tasks do, each with its kept ``values``; ``errors``: each image's
    error message, "" for a usable one (default: all usable)."""
    errors = errors or [""] * len(uris)
    usable = sum(not e for e in errors)
    table = output_table(
        np.asarray(uris, object),
        np.asarray(errors, object),
        np.tile(np.arange(5, dtype=np.int32), (usable, 1)),
        np.full((usable, 5), 0.2, np.float32),
        [str(i) for i in range(1000)],
        "mnasnet0_5",
        "weights-a",
        pack_rows(values),
        kept,
    )
    folder.write_part(table, plan.run_uri)


def label(tmp_path, name: str, uris: list[str], kept: pa.Schema, values: list[dict], **output_settings) -> None:
    """One whole run: opened, its rows staged, committed and closed."""
    config, target, plan = open_run(tmp_path, name, uris, kept, **output_settings)
    stage(plan, uris, kept, values)
    target.finish_run(config, plan, 1.0)


def test_a_new_table_holds_the_kept_columns_after_its_own_and_error_rows_carry_them(tmp_path):
    from mnasnet_batch.outputs.iceberg import table_schema

    kept = pa.schema([("label", pa.int64()), ("caption", pa.string()), ("tags", pa.list_(pa.string()))])
    uris = [f"/images/{i}.jpg" for i in range(3)]
    values = [
        {"label": 2**40, "caption": "a cat", "tags": ["x"]},
        {"label": 7, "caption": None, "tags": []},
        {"label": None, "caption": "gone", "tags": None},
    ]
    config, target, plan = open_run(tmp_path, "a", uris, kept)
    stage(plan, uris, kept, values, errors=["", "", "OSError: unreadable"])
    target.finish_run(config, plan, 1.0)

    table = load(tmp_path)
    fields = table.schema().fields
    assert [f.name for f in fields] == [*table_schema().names, "label", "caption", "tags"]
    assert [(str(f.field_type), f.required) for f in fields[-3:]] == [
        ("long", False),
        ("string", False),
        ("list<string>", False),
    ]
    rows = rows_of(table)
    assert rows[uris[2]]["status"] == "error"  # an error row carries its kept values too
    assert [{k: rows[u][k] for k in kept.names} for u in uris] == values


def test_a_table_without_the_kept_columns_is_refused_in_one_line_then_evolved_when_asked(tmp_path):
    uris = [f"/images/{i}.jpg" for i in range(8)]
    label(tmp_path, "a", uris[:4], pa.schema([]), [None] * 4)
    before = load(tmp_path).schema()

    with pytest.raises(StorageError) as refused:
        open_run(tmp_path, "b", uris, LABEL, mode="incremental")
    assert str(refused.value) == (
        "table labels.photos has no column label of input.keep_columns; set output.evolve_schema=true to change "
        "its schema (added columns are nullable: earlier rows read null there), or keep other columns"
    )
    assert load(tmp_path).schema() == before and not (tmp_path / "b" / "_staging" / "run=b").exists()

    # Asked to, the run adds the column; the earlier rows read null there, the new ones their labels.
    label(tmp_path, "b", uris[4:], LABEL, [{"label": i} for i in range(4)], mode="incremental", evolve_schema=True)
    table = load(tmp_path)
    assert [f.name for f in table.schema().fields][-1] == "label"
    rows = rows_of(table)
    assert {u: (r["run_id"], r["label"]) for u, r in rows.items()} == {
        **{u: ("a", None) for u in uris[:4]},
        **{u: ("b", i) for i, u in enumerate(uris[4:])},
    }

    # One current row per image still: a relabel replaces the rows of its images, kept values with them; a run
    # that keeps nothing writes nulls there, and needs no setting.
    label(tmp_path, "c", uris[:2], LABEL, [{"label": 100}, {"label": 101}], mode="relabel")
    label(tmp_path, "d", uris[6:], pa.schema([]), [None, None], mode="relabel")
    rows = rows_of(load(tmp_path))
    assert len(rows) == 8
    assert [(rows[u]["run_id"], rows[u]["label"]) for u in uris] == [
        ("c", 100),
        ("c", 101),
        ("a", None),
        ("a", None),
        ("b", 0),
        ("b", 1),
        ("d", None),
        ("d", None),
    ]


def test_a_run_refused_for_its_mode_leaves_the_schema_as_it_was_though_asked_to_evolve_it(tmp_path):
    uris = [f"/images/{i}.jpg" for i in range(4)]
    label(tmp_path, "a", uris, pa.schema([]), [None] * 4)
    before = load(tmp_path).schema()
    # The table holds every image already: a new run is refused (the mode), and changes nothing on its way out.
    with pytest.raises(StorageError, match="already holds 4 labels"):
        open_run(tmp_path, "b", uris, LABEL, evolve_schema=True)
    assert load(tmp_path).schema() == before


def test_a_kept_column_of_another_type_is_refused_and_a_narrower_one_widened_when_asked(tmp_path):
    uris = [f"/images/{i}.jpg" for i in range(6)]
    label(tmp_path, "a", uris[:2], pa.schema([("label", pa.int32())]), [{"label": 1}, {"label": 2}])

    as_text = pa.schema([("label", pa.string())])
    with pytest.raises(StorageError, match=r"holds input.keep_columns label \(table int, input string\) in a type"):
        open_run(tmp_path, "b", uris, as_text, mode="incremental", evolve_schema=True)  # whatever the setting
    with pytest.raises(StorageError, match="holds label in a narrower type than the input of input.keep_columns"):
        open_run(tmp_path, "b", uris, LABEL, mode="incremental")
    assert str(load(tmp_path).schema().find_field("label").field_type) == "int"

    label(tmp_path, "b", uris[2:4], LABEL, [{"label": 2**40}, {"label": 4}], mode="incremental", evolve_schema=True)
    assert str(load(tmp_path).schema().find_field("label").field_type) == "long"
    # The table now holds a wider type than an int32 input's: it fits, its values widened.
    label(tmp_path, "c", uris[4:], pa.schema([("label", pa.int32())]), [{"label": 5}, {"label": 6}], mode="incremental")
    rows = rows_of(load(tmp_path))
    assert [rows[u]["label"] for u in uris] == [1, 2, 2**40, 4, 5, 6]


def test_a_run_that_commits_after_another_job_evolved_the_table_writes_nulls_in_the_added_column(tmp_path):
    uris = [f"/images/{i}.jpg" for i in range(4)]
    config, target, plan = open_run(tmp_path, "a", uris[:3], LABEL)
    # Another job, with its own staging output, adds a column and commits while run a is still labeling.
    caption = pa.schema([("caption", pa.string())])
    label(tmp_path, "b", uris[2:], caption, [{"caption": "c"}, {"caption": "d"}], mode="relabel", evolve_schema=True)
    # Run a's commit replaces a row of b's: b's file is written again, its other row with its caption.
    stage(plan, uris[:3], LABEL, [{"label": 1}, {"label": 2}, {"label": 3}])
    target.finish_run(config, plan, 1.0)
    rows = rows_of(load(tmp_path))
    assert [(rows[u]["run_id"], rows[u]["label"], rows[u]["caption"]) for u in uris] == [
        ("a", 1, None),
        ("a", 2, None),
        ("a", 3, None),
        ("b", None, "d"),
    ]


def test_a_kept_column_named_like_the_tables_own_or_of_a_type_iceberg_lacks_is_refused_before_the_table_is_made(
    tmp_path,
):
    with pytest.raises(StorageError, match="input.keep_columns: run_id would replace the table's own column"):
        open_run(tmp_path, "a", ["/images/0.jpg"], pa.schema([("run_id", pa.string())]))
    # A Parquet column with no value in the input's first file is of Arrow's null type, which Iceberg 2 has not.
    with pytest.raises(StorageError, match=r"input.keep_columns: caption is null in the input, which an Iceberg table"):
        open_run(tmp_path, "a", ["/images/0.jpg"], pa.schema([("label", pa.int64()), ("caption", pa.null())]))
    assert not (tmp_path / "warehouse").exists() and not (tmp_path / "catalog.db").exists()


def test_how_kept_columns_fit_a_table():
    from pyiceberg.schema import Schema
    from pyiceberg.types import DoubleType, FloatType, IntegerType, ListType, NestedField, StringType

    from mnasnet_batch.outputs.iceberg import KeptFit, kept_fit, kept_refusal, kept_types

    held = Schema(
        NestedField(1, "uri", StringType(), required=True),
        NestedField(2, "count", IntegerType()),
        NestedField(3, "score", DoubleType()),
        NestedField(4, "tags", ListType(5, StringType(), element_required=False)),
        NestedField(6, "old", StringType()),
    )
    kept = kept_types(
        pa.schema(
            [
                ("count", pa.int64()),  # wider than the table's: widened
                ("score", pa.float32()),  # narrower than the table's: fits
                ("tags", pa.list_(pa.string())),  # the same, field ids aside
                ("width", pa.int32()),  # missing
            ]
        )
    )
    fit = kept_fit(held, kept)
    assert fit == KeptFit(missing=("width",), widened=("count",), clashes=(), unkept=("old",))
    assert fit.evolves and kept_refusal("t", fit, evolve=True) == ""
    assert kept_refusal("t", fit, evolve=False).startswith(
        "table t has no column width and holds count in a narrower type than the input of input.keep_columns;"
    )
    clash = kept_fit(held, kept_types(pa.schema([("tags", pa.string()), ("score", pa.int64())])))
    assert clash.clashes == ("tags (table list<string>, input string)", "score (table double, input long)")
    assert kept_refusal("t", clash, evolve=True).startswith("table t holds input.keep_columns tags (table")
    assert kept_fit(held, kept_types(pa.schema([("score", pa.float64())]))) == KeptFit(unkept=("count", "tags", "old"))
    assert not kept_fit(held, kept_types(pa.schema([("count", pa.int32())]))).evolves
    assert kept_types(pa.schema([("x", pa.float32())])).find_field("x").field_type == FloatType()


@pytest.mark.timeout(300)
def test_the_command_refuses_a_table_without_the_kept_column_in_one_line_and_evolves_it_when_asked(
    local_ray, corpus, tmp_path, checkpoint_path, fixture_model, capsys
):
    output = tmp_path / "labels"
    earlier = [f"/images/{i}.jpg" for i in range(3)]
    label(tmp_path, "labels", earlier, pa.schema([]), [None] * 3, catalog={})  # the embedded catalog under output
    dataset = tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"
    dataset.parent.mkdir(parents=True)
    hf_data.hf_dataset(corpus[:4], [5, 6, 7, 8]).to_parquet(str(dataset))
    argv = support.job_argv(
        tmp_path / "hub",
        output,
        checkpoint_path,
        f"output.table={TABLE}",
        "input.keep_columns=label",
        extra=("--mode", "relabel"),
    )
    capsys.readouterr()
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: table labels.photos has no column label of input.keep_columns; set output.evolve_schema=true to "
        "change its schema (added columns are nullable: earlier rows read null there), or keep other columns"
    )

    assert main([*argv, "--set", "output.evolve_schema=true"]) == 0
    rows = rows_of(support.embedded_catalog(output).load_table(TABLE))
    expected = {f"{dataset}#{i}": image for i, image in enumerate(corpus[:4])}
    assert set(rows) == {*earlier, *expected}
    support.assert_predictions_match_the_reference(rows, expected, fixture_model)
    assert {u: r["label"] for u, r in rows.items()} == {
        **dict.fromkeys(earlier),
        **dict(zip(expected, [5, 6, 7, 8], strict=True)),
    }


@pytest.mark.timeout(600)
def test_a_hub_parquet_folder_labeled_into_a_table_keeps_its_columns_through_a_kill_and_resume(
    local_ray, corpus, tmp_path, checkpoint_path, fixture_model, capsys, job_process
):
    # Four Parquet files of 4 photos each, as datasets writes them for the Hub (an Image feature, a label, no id).
    root = tmp_path / "hub"
    (root / "data").mkdir(parents=True)
    expected, labels = {}, {}
    for n in range(4):
        images = corpus[4 * n : 4 * n + 4]
        path = root / "data" / f"train-{n:05d}-of-00004.parquet"
        hf_data.hf_dataset(images, [10 * n + i for i in range(4)]).to_parquet(str(path))
        expected.update({f"{path}#{i}": image for i, image in enumerate(images)})
        labels.update(
            {f"{path}#{i}": (value, "train") for i, value in enumerate(pq.read_table(path)["label"].to_pylist())}
        )
    output = tmp_path / "labels"
    settings = ("output.rows_per_file=4", "compute.batch_size=4", "preprocess.batch_size=4")
    argv = support.job_argv(
        root, output, checkpoint_path, f"output.table={TABLE}", "input.keep_columns=label,split", *settings
    )
    # Publishing a third part stalls: the job is killed with two parts staged and the rest not labeled.
    hooks = support.replace_hook(tmp_path / "hooks", support.STALL_AFTER_TWO_PARTS)
    job = job_process.start(
        argv, env={"PYTHONPATH": os.pathsep.join([str(hooks), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    )
    try:
        poll(
            lambda: len(list(output.glob("_staging/run=*/part-*.parquet"))) >= 2 or job.poll() is not None,
            300,
            "two staged parts",
        )
        assert job.poll() is None, "the run finished before it could be killed"
    finally:
        kill_session(job)
    staged = len(folder.read_parts(*Storage().filesystem(str(output / "_staging"))).to_table(columns=["uri"]))
    assert 0 < staged < len(expected)

    capsys.readouterr()
    assert main(argv) == 0  # the same command: commits what was staged, labels the rest
    assert f"{staged} from before the resume" in capsys.readouterr().out
    table = support.embedded_catalog(output).load_table(TABLE)
    assert [f.name for f in table.schema().fields][-2:] == ["label", "split"]
    assert str(table.schema().find_field("label").field_type) == "long"
    rows = rows_of(table)
    assert set(rows) == set(expected)  # each image once
    support.assert_predictions_match_the_reference(rows, expected, fixture_model)
    assert {uri: (row["label"], row["split"]) for uri, row in rows.items()} == labels
