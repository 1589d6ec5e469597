"""Apache Iceberg through pyiceberg, for the table output and its readers: the catalog, the table's schema and
snapshots, the listed sources' stats, what each mode labels, and a commit that replaces rows as one snapshot."""

from __future__ import annotations

import datetime
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from fsspec.implementations.local import LocalFileSystem

from mnasnet_batch.config import ConfigError, JobConfig, OutputConfig, StorageConfig
from mnasnet_batch.inputs.kept import output_fields
from mnasnet_batch.outputs import files
from mnasnet_batch.storage import Storage, StorageError, scheme

STAGING = "_staging"
CATALOG_FILE = "_catalog.db"
WAREHOUSE = "warehouse"
# The embedded catalog's name: pyiceberg's SqlCatalog keys its tables by it, and "default" is what a reader's
# ``load_catalog("default", ...)`` names.
EMBEDDED_CATALOG = "default"


@functools.cache
def table_schema() -> pa.Schema:
    """The table's columns: the Parquet schema's, then which run wrote the row, and the source's size and version
    (its ETag where the store has one, else its modification time) when it was listed, which ``changed`` compares.

    A function, so that choosing the output (in the command's main thread) does not import torch (``postprocess``).
    """
    from mnasnet_batch.model.postprocess import OUTPUT_SCHEMA

    return pa.schema(
        [
            pa.field("uri", pa.string(), nullable=False),  # the table's key: required, and its identifier field
            *list(OUTPUT_SCHEMA)[1:],
            ("run_id", pa.string()),
            ("source_size", pa.int64()),
            ("source_version", pa.string()),
        ]
    )


def new_table_schema(kept: pa.Schema) -> pa.Schema:
    """A new table's columns: ``table_schema()``, then the dataset's kept columns (``input.keep_columns``),
    nullable, in the input's types."""
    return pa.schema([*table_schema(), *output_fields(kept)])


SOURCE_SCHEMA = pa.schema([("source", pa.string()), ("source_size", pa.int64()), ("source_version", pa.string())])
# Snapshot summary properties are named with this prefix (Iceberg's own have none).
PROPERTY = "mnasnet."
# The settings that decide the labels; a table holds the labels of one setting, replaced by relabel or overwrite.
LABEL_SETTINGS = ("model", "weights", "top_k", "max_pixels", "apply_exif_orientation", "fast_decode")
# What a commit from before a setting existed labeled with: fast_decode came later, and every earlier run was exact.
UNRECORDED_LABELS = {"fast_decode": "false"}
# Source files examined at once on an object store (one HEAD request each).
STAT_THREADS = 16


def fileio_properties(config: StorageConfig) -> dict[str, str]:
    """pyiceberg FileIO properties from the storage settings, so the warehouse is reached like every other URI.

    Credentials not given in ``storage.options`` (``key``, ``secret``, ``token``) come from the standard chains,
    as for fsspec.
    """
    properties: dict[str, str] = {}
    if config.endpoint_url:
        properties["s3.endpoint"] = config.endpoint_url
        properties["gcs.service.host"] = config.endpoint_url
    if config.region:
        properties["s3.region"] = config.region
    if config.anonymous:
        properties["s3.anonymous"] = "true"
        properties["gcs.token"] = "anon"
    options = {**config.options, **(config.options.get("s3") or {})}
    for option, name in (
        ("key", "s3.access-key-id"),
        ("secret", "s3.secret-access-key"),
        ("token", "s3.session-token"),
    ):
        if options.get(option):
            properties[name] = str(options[option])
    return properties


def catalog_properties(config: OutputConfig, storage_config: StorageConfig) -> tuple[str, dict[str, str]]:
    """The catalog's name and ``load_catalog`` properties: ``output.catalog``, else the embedded SQLite catalog.

    Raises:
        ConfigError: no ``output.catalog`` and an output on an object store, where a SQLite file cannot live.
    """
    fileio = fileio_properties(storage_config)
    if config.catalog:
        properties = {k: str(v) for k, v in config.catalog.items() if k != "name"}
        return str(config.catalog.get("name", EMBEDDED_CATALOG)), {**fileio, **properties}
    if scheme(config.uri) != "file":
        raise ConfigError(
            f"output.table on {config.uri}: the embedded SQLite catalog needs a local output; set output.catalog "
            "(a REST, Glue, Hive or SQL catalog; see docs/table.md) or use a local --output"
        )
    root = os.path.abspath(config.uri)
    return EMBEDDED_CATALOG, {
        **fileio,
        "type": "sql",
        "uri": f"sqlite:///{os.path.join(root, CATALOG_FILE)}",
        "warehouse": f"file://{os.path.join(root, WAREHOUSE)}",
    }


def open_catalog(config: OutputConfig, storage: Storage):
    """The table's pyiceberg catalog (``catalog_properties``), its FileIO configured from ``storage``.

    Raises:
        StorageError: the catalog cannot be reached.
    """
    from pyiceberg.catalog import load_catalog

    name, properties = catalog_properties(config, storage.config)
    if properties.get("type") == "sql" and properties.get("uri", "").startswith("sqlite:///"):
        os.makedirs(os.path.dirname(properties["uri"][len("sqlite:///") :]), exist_ok=True)
    try:
        return load_catalog(name, **properties)
    except Exception as exc:
        raise StorageError(f"catalog of output.table cannot be opened: {files.one_line(exc)}") from None


def load_table(config: OutputConfig, storage: Storage):
    """The existing table ``output.table`` (for readers: runs.py, report.py).

    Raises:
        StorageError: the catalog cannot be reached, or holds no such table.
    """
    from pyiceberg.exceptions import NoSuchTableError

    catalog = open_catalog(config, storage)
    try:
        return catalog.load_table(config.table)
    except NoSuchTableError:
        raise StorageError(f"table {config.table} does not exist in the catalog of {config.uri}") from None


def current_rows(table, columns: tuple[str, ...], row_filter=None) -> pa.Table:
    """The table's current rows, only ``columns``; an empty table of them when it has no snapshot yet."""
    if table.current_snapshot() is None:
        return pa.table({c: pa.array([], table_schema().field(c).type) for c in columns})
    scan = (
        table.scan(selected_fields=columns) if row_filter is None else table.scan(row_filter, selected_fields=columns)
    )
    return scan.to_arrow()


def label_settings(config: JobConfig, weights_id: str) -> dict[str, str]:
    """The settings that decide the labels (``LABEL_SETTINGS``), as snapshot summary values."""
    values = {
        "model": config.model.name,
        "weights": weights_id,
        "top_k": config.model.top_k,
        "max_pixels": config.preprocess.max_pixels,
        "apply_exif_orientation": config.preprocess.apply_exif_orientation,
        "fast_decode": config.preprocess.fast_decode,
    }
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in values.items()}


def latest_labels(table) -> dict[str, str]:
    """The label settings of the table's latest commit by this job; empty when it has none."""
    for snapshot in reversed(table.snapshots()):
        summary = snapshot.summary.additional_properties if snapshot.summary else {}
        if PROPERTY + "run_id" in summary:
            return {k: summary.get(PROPERTY + k, UNRECORDED_LABELS.get(k, "")) for k in LABEL_SETTINGS}
    return {}


def run_snapshots(table, run_id: str) -> list:
    """The snapshots of the run ``run_id``'s commits, oldest first."""
    return [
        snapshot
        for snapshot in table.snapshots()
        if snapshot.summary and snapshot.summary.additional_properties.get(PROPERTY + "run_id") == run_id
    ]


def source_key(uris: pa.Array, uri_per_image: bool) -> pa.Array:
    """The listed file each row comes from: the image itself, or the shard / Parquet file before ``#``."""
    if uri_per_image:
        return uris
    return pa.array([u.split("#", 1)[0] for u in uris.to_pylist()], pa.string())


def source_stats(uris: list[str], storage: Storage) -> pa.Table:
    """Each listed file's size and version (``SOURCE_SCHEMA``); nulls for one that cannot be examined.

    The version is the ETag where the store gives one (S3, Azure; GCS's generation), else the modification time.
    Local files take one ``stat`` each; object stores one HEAD request each, ``STAT_THREADS`` at a time.
    """
    sizes: list[int | None] = []
    versions: list[str | None] = []
    if uris and isinstance(storage.filesystem(uris[0])[0], LocalFileSystem):
        for uri in uris:
            try:
                stat = os.stat(storage.filesystem(uri)[1])
            except OSError:
                sizes.append(None)
                versions.append(None)
                continue
            sizes.append(stat.st_size)
            versions.append(_utc(stat.st_mtime_ns / 1e9))
    else:

        def info(uri: str) -> dict:
            try:
                fs, path = storage.filesystem(uri)
                return fs.info(path)
            except Exception:
                return {}

        with ThreadPoolExecutor(STAT_THREADS) as pool:
            for found in pool.map(info, uris):
                sizes.append(found.get("size"))
                versions.append(_version(found))
    return pa.table(
        [pa.array(uris, pa.string()), pa.array(sizes, pa.int64()), pa.array(versions, pa.string())],
        schema=SOURCE_SCHEMA,
    )


def _utc(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="microseconds")


def _version(info: dict) -> str | None:
    """An object's version from fsspec's ``info``: its ETag (or generation), else its modification time."""
    for key in ("ETag", "etag", "generation"):
        if info.get(key):
            return str(info[key]).strip('"')
    for key in ("LastModified", "last_modified", "mtime", "updated"):
        value = info.get(key)
        if isinstance(value, datetime.datetime):
            return value.astimezone(datetime.timezone.utc).isoformat(timespec="microseconds")
        if isinstance(value, (int, float)):
            return _utc(float(value))
        if value:
            return str(value)
    return None


def to_label(mode: str, listed: list[str], rows: pa.Table, sources: pa.Table | None) -> pa.Array:
    """Of the listed images (one URI each), those ``mode`` labels, given the table's current ``rows``.

    ``incremental``: those without a row; ``retry-errors``: those whose row is an error; ``changed``: those
    without a row or whose size or version differ from the row's (``sources``: the listed images' stats);
    otherwise all.
    """
    candidates = pa.array(listed, pa.string())
    if mode == "incremental":
        return candidates.filter(pc.invert(pc.is_in(candidates, value_set=rows["uri"])))
    if mode == "retry-errors":
        errors = rows.filter(pc.equal(rows["status"], "error"))["uri"]
        return candidates.filter(pc.is_in(candidates, value_set=errors))
    if mode == "changed":
        joined = sources.join(
            rows.select(["uri", "source_size", "source_version"]).rename_columns(["source", "size", "version"]),
            "source",
            join_type="left outer",
        )
        # No row (the join found none), or a row whose size or version could not be recorded, counts as changed.
        unknown = pc.and_(pc.is_null(joined["size"]), pc.is_null(joined["version"]))
        differs = pc.or_(
            unknown,
            pc.or_(
                _differ(joined["source_size"], joined["size"]), _differ(joined["source_version"], joined["version"])
            ),
        )
        return joined["source"].filter(differs).combine_chunks()
    return candidates


def _differ(now: pa.ChunkedArray, before: pa.ChunkedArray) -> pa.ChunkedArray:
    """Per row, whether two values differ, a null differing from a value and equal to a null."""
    return pc.if_else(pc.is_null(now), pc.is_valid(before), pc.fill_null(pc.not_equal(now, before), True))


# pyiceberg retries a conflicting commit itself (4 times by default), rebuilding it from its own producers; the job
# rebuilds each try from the refreshed table instead (table.COMMIT_ATTEMPTS), so pyiceberg's are off: tries counted
# once, and the error says how many were made.
NO_COMMIT_RETRIES = {"commit.retry.num-retries": "0"}


def replace_rows(table, rows: pa.Table, condition, properties: dict[str, str]) -> int:
    """Commits ``rows`` into ``table`` in place of the rows ``condition`` matches, as ONE snapshot; returns its id.

    pyiceberg's ``Transaction.overwrite`` commits a delete snapshot (and one more for the files it rewrites) before
    the append's, in one catalog commit but each a table of its own: time travel to a timestamp, or to the snapshot
    before the current one, can land on one that holds part of the labels. Here, copy-on-write: the files holding a
    replaced row are read, their other rows are written with ``rows`` into new files, and one snapshot drops the
    old files and adds the new ones: an overwrite, or an append when it drops none (what readers that follow a
    table's appends take). Its condition is the snapshot's conflict filter, so a commit of another job that added
    or dropped rows it matches makes this one fail (``ValidationException``): the caller rebuilds it.

    Raises:
        CommitFailedException, ValidationException: another job's commit conflicted.
    """
    # The reader, filter and writer that pyiceberg's own delete and overwrite use, and the snapshot's operation:
    # private names, which is why pyiceberg's version is pinned in pyproject.toml.
    from pyiceberg.expressions import AlwaysTrue
    from pyiceberg.expressions.visitors import bind
    from pyiceberg.io.pyarrow import ArrowScan, _dataframe_to_data_files, _expression_to_complementary_pyarrow
    from pyiceberg.table.snapshots import Operation

    with table.transaction() as transaction:
        if any(table.metadata.properties.get(k) != v for k, v in NO_COMMIT_RETRIES.items()):
            # A table created elsewhere, or by an earlier version: from its next commit on, the job's tries only.
            transaction.set_properties(NO_COMMIT_RETRIES)
        metadata = transaction.table_metadata
        schema = metadata.schema()
        dropped, written = [], [rows]
        if table.current_snapshot() is not None:
            # Rows the condition does not match, or cannot decide (a null): kept, as pyiceberg's delete keeps them.
            keep = _expression_to_complementary_pyarrow(bind(schema, condition, case_sensitive=True), schema)
            for task in table.scan(row_filter=condition).plan_files():  # files whose column bounds allow a match
                held = ArrowScan(metadata, table.io, schema, AlwaysTrue()).to_table([task])
                kept = held.filter(keep)
                if kept.num_rows < held.num_rows:
                    dropped.append(task.file)
                    written.append(kept)
        with transaction.update_snapshot(snapshot_properties=properties).overwrite() as snapshot:
            if not dropped:
                snapshot._operation = Operation.APPEND
            snapshot.delete_by_predicate(condition)
            for data_file in dropped:
                snapshot.delete_data_file(data_file)
            new = pa.concat_tables([t.cast(rows.schema) for t in written])
            if new.num_rows:
                for data_file in _dataframe_to_data_files(
                    table_metadata=metadata, df=new, io=table.io, write_uuid=snapshot.commit_uuid
                ):
                    snapshot.append_data_file(data_file)
    return snapshot.snapshot_id


@dataclass(frozen=True)
class KeptFit:
    """How the kept columns (``input.keep_columns``) fit an existing table's columns (``kept_fit``)."""

    # Kept columns the table lacks: added, nullable, when the schema may evolve.
    missing: tuple[str, ...] = ()
    # Kept columns the table holds in a type that the input's widens (the table int, the input long): widened
    # when the schema may evolve.
    widened: tuple[str, ...] = ()
    # Kept columns the table holds in a type no evolution turns into the input's, each "name (table T, input T)".
    clashes: tuple[str, ...] = ()
    # The table's columns besides its own (kept by earlier runs) that this run does not keep: its rows hold nulls.
    unkept: tuple[str, ...] = ()

    @property
    def evolves(self) -> bool:
        """Whether the table's schema must change to hold the kept columns."""
        return bool(self.missing or self.widened)


def kept_types(kept: pa.Schema):
    """The kept columns as an Iceberg schema (its field ids unassigned): what a table would hold them as.

    Raises:
        StorageError: a column is named like one of the table's own, or has a type Iceberg has none for (a null
            column, a timestamp in nanoseconds); the message names it.
    """
    # A private name of pyiceberg's (what its catalogs convert an Arrow schema with), pinned in pyproject.toml.
    from pyiceberg.io.pyarrow import _pyarrow_to_schema_without_ids

    taken = [name for name in kept.names if name in table_schema().names]
    if taken:
        raise StorageError(
            f"input.keep_columns: {', '.join(taken)} would replace the table's own column of that name; keep the "
            "others, or rename the column in the input"
        )
    for field in kept:
        try:
            _pyarrow_to_schema_without_ids(pa.schema([field]))
        except Exception as exc:  # pyiceberg's own, for each type it has no Iceberg type for
            raise StorageError(
                f"input.keep_columns: {field.name} is {field.type} in the input, which an Iceberg table cannot hold "
                f"({files.one_line(exc)}); keep other columns, or write the Parquet folder output (no output.table)"
            ) from None
    return _pyarrow_to_schema_without_ids(kept)


def widens(held, wanted) -> bool:
    """Whether Iceberg's schema evolution turns a column of type ``held`` into one of type ``wanted``: int to long,
    float to double, a decimal to one of more precision (the specification's type promotions)."""
    from pyiceberg.types import DecimalType, DoubleType, FloatType, IntegerType, LongType

    if isinstance(held, DecimalType) and isinstance(wanted, DecimalType):
        return held.scale == wanted.scale and held.precision < wanted.precision
    return (isinstance(held, IntegerType) and isinstance(wanted, LongType)) or (
        isinstance(held, FloatType) and isinstance(wanted, DoubleType)
    )


def kept_fit(held, kept) -> KeptFit:
    """How the kept columns ``kept`` (Iceberg types, ``kept_types``) fit the table's schema ``held``.

    A column the table holds in the input's type fits, as does one it holds wider (long, the input int): the values
    are widened as they are written.
    """
    from pyiceberg.io.pyarrow import schema_to_pyarrow

    def same(a, b) -> bool:  # nested types compared without their field ids, which only the table's have
        return schema_to_pyarrow(a, include_field_ids=False) == schema_to_pyarrow(b, include_field_ids=False)

    columns = {f.name: f.field_type for f in held.fields}
    missing, widened, clashes = [], [], []
    for field in kept.fields:
        found = columns.get(field.name)
        if found is None:
            missing.append(field.name)
        elif widens(found, field.field_type):
            widened.append(field.name)
        elif not (same(found, field.field_type) or widens(field.field_type, found)):
            clashes.append(f"{field.name} (table {found}, input {field.field_type})")
    own = {*table_schema().names, *(f.name for f in kept.fields)}
    unkept = tuple(name for name in columns if name not in own)
    return KeptFit(tuple(missing), tuple(widened), tuple(clashes), unkept)


def kept_refusal(identifier: str, fit: KeptFit, evolve: bool) -> str:
    """Why a run cannot write its kept columns into table ``identifier`` (one line); "" when it can, ``evolve``
    (``output.evolve_schema``) telling whether it may change the table's schema."""
    if fit.clashes:
        return (
            f"table {identifier} holds input.keep_columns {', '.join(fit.clashes)} in a type Iceberg cannot change "
            "to the input's; keep other columns, or write another table (output.table)"
        )
    if fit.evolves and not evolve:
        lacks = [f"has no column {', '.join(fit.missing)}"] if fit.missing else []
        lacks += [f"holds {', '.join(fit.widened)} in a narrower type than the input"] if fit.widened else []
        return (
            f"table {identifier} {' and '.join(lacks)} of input.keep_columns; set output.evolve_schema=true to "
            "change its schema (added columns are nullable: earlier rows read null there), or keep other columns"
        )
    return ""


def evolve_schema(table, kept, fit: KeptFit) -> None:
    """Adds ``fit.missing`` to ``table`` (nullable, in their ``kept`` types) and widens ``fit.widened``, as one
    schema change.

    Raises:
        CommitFailedException: another job changed the table's schema first.
    """
    types = {f.name: f.field_type for f in kept.fields}
    with table.update_schema() as update:
        for name in fit.missing:
            update.add_column(name, types[name])
        for name in fit.widened:
            update.update_column(name, field_type=types[name])


def commit_schema(held) -> pa.Schema:
    """The Arrow schema of a commit's rows into a table of schema ``held``: ``table_schema()``, then the table's
    other columns (kept columns, of this run or earlier ones) in their Arrow types."""
    from pyiceberg.io.pyarrow import schema_to_pyarrow

    own = table_schema()
    types = schema_to_pyarrow(held, include_field_ids=False)
    return pa.schema([*own, *output_fields(pa.schema([f for f in types if f.name not in own.names]))])


def conform(rows: pa.Table, schema: pa.Schema) -> pa.Table:
    """``rows`` in ``schema`` (``commit_schema``): its columns in its order and types, nulls in those ``rows``
    lacks (a column another job added since, or one this run does not keep)."""
    arrays = [rows[f.name] if f.name in rows.column_names else pa.nulls(rows.num_rows, f.type) for f in schema]
    return pa.table(arrays, names=schema.names).cast(schema)


def run_filter(run_id: str):
    """The rows one run wrote, as a pyiceberg row filter."""
    from pyiceberg.expressions import EqualTo

    return EqualTo("run_id", run_id)
