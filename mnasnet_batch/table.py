"""The Apache Iceberg table output: one current row per image, each run staged as Parquet parts, then committed.

A run writes its rows exactly as into the Parquet folder (``output``: lease, run record, atomic parts named by
their URIs), under ``<output.uri>/_staging/run=<id>/``; the driver commits the staged parts into the table (at the
end, or every ``output.commit_interval_s``), each commit one snapshot that replaces the rows of the committed URIs
(``replace_rows``: every snapshot holds a whole table), then deletes those parts. A killed run keeps its staged
parts and what it committed; the same command commits the rest and labels only what neither holds.

Ray Data's ``Dataset.write_iceberg`` (Ray 2.60) is not used: it commits once, when the whole dataset is written,
so a killed run loses everything it labeled; its write tasks open the catalog themselves, which an embedded SQLite
catalog on the driver's disk does not allow on a cluster; and its upsert knows nothing of this job's runs, modes,
errors or resume. Its Parquet writing is what ``pipeline.PartWriter`` already does.

Layout under ``output.uri`` (an embedded catalog only when ``output.catalog`` is empty)::

    _catalog.db                     the embedded SQLite catalog (pyiceberg's SqlCatalog, catalog name "default")
    warehouse/                      its tables' data and metadata
    _staging/run=<id>/part-*.parquet   rows of a run not yet committed
    _staging/run=<id>/_run.json     that run's record; _staging/_run.json the latest run's
    _lease.json                     present while a job writes here
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from mnasnet_batch import output, spool
from mnasnet_batch.config import ConfigError, JobConfig, OutputConfig, StorageConfig
from mnasnet_batch.output import OutputTarget, RunPlan, StorageError, Summary
from mnasnet_batch.storage import Storage, scheme

log = logging.getLogger(__name__)

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
    from mnasnet_batch.postprocess import OUTPUT_SCHEMA

    return pa.schema(
        [
            pa.field("uri", pa.string(), nullable=False),  # the table's key: required, and its identifier field
            *list(OUTPUT_SCHEMA)[1:],
            ("run_id", pa.string()),
            ("source_size", pa.int64()),
            ("source_version", pa.string()),
        ]
    )


SOURCE_SCHEMA = pa.schema([("source", pa.string()), ("source_size", pa.int64()), ("source_version", pa.string())])
# Snapshot summary properties are named with this prefix (Iceberg's own have none).
PROPERTY = "mnasnet."
# The settings that decide the labels; a table holds the labels of one setting, replaced by relabel or overwrite.
LABEL_SETTINGS = ("model", "weights", "top_k", "max_pixels", "apply_exif_orientation")
# Commits that conflict with another job's are rebuilt on the refreshed table this many times: replacing the
# rows of given URIs is right whatever the table holds, so a rebuilt commit is as correct as the first.
COMMIT_ATTEMPTS = 5
COMMIT_BACKOFF_S = 0.5
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
        raise StorageError(f"catalog of output.table cannot be opened: {output._one_line(exc)}") from None


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
    }
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in values.items()}


def latest_labels(table) -> dict[str, str]:
    """The label settings of the table's latest commit by this job; empty when it has none."""
    for snapshot in reversed(table.snapshots()):
        summary = snapshot.summary.additional_properties if snapshot.summary else {}
        if PROPERTY + "run_id" in summary:
            return {k: summary.get(PROPERTY + k, "") for k in LABEL_SETTINGS}
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


class IcebergTable(OutputTarget):
    """The output as an Iceberg table (``output.table``), one current row per image; see the module docstring.

    One object per job: it holds the open run's catalog, source stats and committer thread between ``plan_run``
    and ``finish_run``.
    """

    def __init__(self, config: JobConfig):
        self.identifier = config.output.table
        self.catalog = None
        self.table = None
        self.snapshot_id: int | None = None
        self.run_id = ""
        self.mode = config.output.mode
        self.labels: dict[str, str] = {}
        self.sources = SOURCE_SCHEMA.empty_table()
        self.uri_per_image = True
        self.fs, self.staging, self.run_root = None, "", ""
        self.lock = threading.Lock()  # one commit at a time: the committer thread's and finish_run's
        self._stopped = threading.Event()
        self._committer: threading.Thread | None = None

    @classmethod
    def for_config(cls, config: JobConfig) -> IcebergTable:
        """The table target, once its configuration is checked (nothing is read yet).

        Raises:
            ConfigError: pyiceberg is not installed, or an object-store output without ``output.catalog``.
        """
        try:
            import pyiceberg  # noqa: F401
        except ImportError:
            raise ConfigError(
                "output.table needs the optional package pyiceberg; "
                "install it with: pip install 'mnasnet-batch[iceberg]'"
            ) from None
        catalog_properties(config.output, config.storage)
        return cls(config)

    # -- opening a run --------------------------------------------------------------------------------------------

    def plan_run(self, config: JobConfig, weights_id: str, inputs, storage: Storage | None = None) -> RunPlan:
        """Takes the output's lease, opens (or resumes) the run in staging, and decides what it labels.

        Raises:
            StorageError: another job writes the output; the mode does not fit the table or the input; the
                catalog or the output cannot be used. The message says what to do.
        """
        uri = config.output.uri
        storage = storage or Storage(config.storage)
        lease = None
        try:
            self.fs, root = storage.filesystem(uri)
            self.staging = output._join(root, STAGING)
            self.fs.makedirs(self.staging, exist_ok=True)
            lease = output.Lease.acquire(self.fs, root, uri)
            spool.remove_abandoned(self.fs, root, output.LEASE_STALE_S)
            plan = self._open_run(config, weights_id, inputs, storage)
            lease.hold(plan.run_id)
        except BaseException as exc:
            if lease is not None:
                lease.release()
            if isinstance(exc, StorageError) or not isinstance(exc, Exception):
                raise
            raise StorageError(
                f"output {uri} (table {self.identifier}) cannot be written: {output._one_line(exc)}"
            ) from None
        if plan.resumed:
            log.info("resuming run %s: %d images already labeled", plan.run_id, plan.rows_before)
        if config.output.commit_interval_s > 0:
            self._committer = threading.Thread(
                target=self._commit_every, args=(config.output.commit_interval_s,), name="table-commits", daemon=True
            )
            self._committer.start()
        return dataclasses.replace(plan, lease=lease, storage=storage, target=self)

    def _open_run(self, config: JobConfig, weights_id: str, inputs, storage: Storage) -> RunPlan:
        from pyiceberg.exceptions import NamespaceAlreadyExistsError

        fs, mode = self.fs, config.output.mode
        self.labels = label_settings(config, weights_id)
        self.uri_per_image = inputs.layout.uri_per_image
        if not self.uri_per_image and mode in ("retry-errors", "changed"):
            raise StorageError(
                f"--mode {mode} needs an input whose every URI is one image (loose files or a manifest); "
                f"{inputs.layout.noun} are read whole: use --mode incremental or relabel"
            )
        self.catalog = open_catalog(config.output, storage)
        namespace = self.identifier.rsplit(".", 1)[0]
        try:
            self.catalog.create_namespace_if_not_exists(namespace)
        except NamespaceAlreadyExistsError:  # created by another job since the check
            pass
        self.table = self._create_or_load()
        latest = output._read_json(fs, output._join(self.staging, output.RUN_RECORD))
        unfinished = latest is not None and latest.get("status") != "succeeded"
        if unfinished and mode == "overwrite" and latest.get("mode") != "overwrite":
            log.warning("overwrite: discarding the staged rows of the unfinished run %s", latest["run_id"])
            for part in self._staged_parts(output._join(self.staging, f"run={latest['run_id']}")):
                fs.rm(part)
            unfinished = False
        if unfinished and (latest.get("mode") != mode or latest.get("labels") != self.labels):
            raise StorageError(
                f"output {config.output.uri} holds the unfinished run {latest['run_id']} (--mode {latest.get('mode')}, "
                f"{_settings_text(latest.get('labels') or {})}) of table {self.identifier}; run its command again "
                f"to finish it, or use --mode overwrite"
            )
        before = latest_labels(self.table)
        rows = current_rows(self.table, ("uri", "status", "run_id", "source_size", "source_version"))
        if not unfinished:
            if mode == "auto" and rows.num_rows:
                raise StorageError(
                    f"table {self.identifier} already holds {rows.num_rows} labels; use --mode incremental (new "
                    f"images), changed, retry-errors, relabel (every image again) or overwrite"
                )
            if mode in ("incremental", "retry-errors", "changed") and before and before != self.labels:
                differing = sorted(k for k in LABEL_SETTINGS if before.get(k) != self.labels[k])
                raise StorageError(
                    f"table {self.identifier} holds labels of other settings ({', '.join(differing)}: "
                    f"{_settings_text({k: before[k] for k in differing})} in the table, "
                    f"{_settings_text({k: self.labels[k] for k in differing})} here); use --mode relabel to label "
                    f"every image again with these, or the table's settings"
                )
        if unfinished:
            self.run_id = latest["run_id"]
        else:
            self.run_id = config.output.run_id or output.submission_id() or output._default_run_id()
        self.mode = mode
        self.run_root = output._join(self.staging, f"run={self.run_id}")
        if not unfinished and (fs.exists(self.run_root) or pc.any(pc.equal(rows["run_id"], self.run_id)).as_py()):
            raise StorageError(f"table {self.identifier} already has a run {self.run_id}; pass another --run-id")
        fs.makedirs(self.run_root, exist_ok=True)
        for stale in output.stale_temporaries(fs, self.run_root):
            fs.rm(stale)  # left by a writer that was killed; its rows were never visible
        # What this run holds already (committed, or staged by an attempt that was stopped): never labeled again.
        # What other jobs replaced of it since counts too: the run labeled it, and another job's label is newer.
        mine = rows.filter(pc.equal(rows["run_id"], self.run_id))["uri"].combine_chunks()
        staged = output.Labeled(fs, self.run_root, self.run_root).uris().combine_chunks()
        held = pa.concat_arrays([mine, staged.filter(pc.invert(pc.is_in(staged, value_set=mine)))])
        held = pa.concat_arrays([held, self._replaced(self.table, held)["uri"].combine_chunks()])
        # The table's modes need every listed URI as Python strings (stats per file): a table run holds them.
        uris = inputs.listed().to_pylist()
        if self.uri_per_image:
            if mode == "changed":
                self.sources = source_stats(uris, storage)
            wanted = to_label(mode, uris, rows, self.sources)
            wanted = wanted.filter(pc.invert(pc.is_in(wanted, value_set=held)))
            if mode != "changed":
                # Committed rows hold their stats already; staged ones get theirs when committed, like the rest.
                uncommitted = staged.filter(pc.invert(pc.is_in(staged, value_set=mine)))
                self.sources = source_stats(pa.concat_arrays([wanted, uncommitted]).to_pylist(), storage)
            listed = pa.array(uris, pa.string())
            done = pa.concat_arrays([listed.filter(pc.invert(pc.is_in(listed, value_set=wanted))), held])
        else:
            self.sources = source_stats(uris, storage)
            done = pa.concat_arrays([rows["uri"].combine_chunks(), held]) if mode == "incremental" else held
        record = {
            "run_id": self.run_id,
            "status": "running",
            "mode": mode,
            "table": self.identifier,
            "labels": self.labels,
            "started_at": latest.get("started_at") if unfinished else output._now(),
            "attempt_started_at": output._now(),
            "ended_at": None,
            "config": output.public_config(config),
            "versions": output.versions(),
        }
        output.write_record(fs, self.staging, self.run_id, record)
        run_uri = output._join(config.output.uri, STAGING, f"run={self.run_id}")
        return RunPlan(run_id=self.run_id, run_uri=run_uri, resumed=unfinished, done=done, rows_before=len(held))

    def _create_or_load(self):
        """The table, created with ``table_schema()`` and ``uri`` as its identifier field when it does not exist."""
        from pyiceberg.exceptions import NoSuchTableError, TableAlreadyExistsError

        try:
            return self.catalog.load_table(self.identifier)
        except NoSuchTableError:
            pass
        try:
            with self.catalog.create_table_transaction(self.identifier, schema=table_schema()) as transaction:
                with transaction.update_schema() as update:
                    update.set_identifier_fields("uri")
        except TableAlreadyExistsError:  # created by another job since the load
            pass
        return self.catalog.load_table(self.identifier)

    # -- committing -----------------------------------------------------------------------------------------------

    def _staged_parts(self, run_root: str) -> list[str]:
        found = self.fs.find(run_root) if self.fs.exists(run_root) else []
        return sorted(p for p in found if os.path.basename(p).startswith("part-") and p.endswith(".parquet"))

    def _commit_every(self, interval_s: float) -> None:
        while not self._stopped.wait(interval_s):
            try:
                self.commit(final=False)
            except Exception as exc:  # the next interval, or the final commit, tries again
                log.warning("table %s: interval commit failed: %s", self.identifier, output._one_line(exc))

    def commit(self, final: bool) -> int:
        """Commits the run's staged parts into the table in one transaction, then deletes them.

        The transaction replaces the rows of the staged URIs (and, on an overwrite run's final commit, every row
        of another run), so committing a part twice (a kill between the commit and the deletion) changes nothing.
        Each commit is one snapshot (``replace_rows``).

        Returns:
            The rows committed.

        Raises:
            StorageError: ``COMMIT_ATTEMPTS`` commits in a row conflicted with other jobs' commits.
        """
        from pyiceberg.exceptions import CommitFailedException, ValidationException
        from pyiceberg.expressions import AlwaysFalse, EqualTo, In, Not, Or

        started = time.monotonic()
        with self.lock:
            # Other processes wrote the parts: this one's cached listings (s3fs, gcsfs) have not seen them.
            self.fs.invalidate_cache()
            parts = self._staged_parts(self.run_root)
            rows = self._rows(parts)
            overwrite = final and self.mode == "overwrite"
            if not rows.num_rows and not overwrite:
                return 0
            uris = rows["uri"].to_pylist()
            condition = In("uri", uris) if uris else AlwaysFalse()
            if overwrite:
                condition = Or(condition, Not(EqualTo("run_id", self.run_id)))
            for attempt in range(1, COMMIT_ATTEMPTS + 1):
                table = self.catalog.load_table(self.identifier)
                properties = self._properties(table, rows, final)
                try:
                    self.snapshot_id = replace_rows(table, rows, condition, properties)
                    break
                except (CommitFailedException, ValidationException) as exc:
                    if attempt == COMMIT_ATTEMPTS:
                        raise StorageError(
                            f"table {self.identifier}: {COMMIT_ATTEMPTS} commits in a row conflicted with other jobs "
                            f"writing it ({output._one_line(exc)}); nothing is lost: run the same command again and "
                            f"run {self.run_id} commits its staged rows"
                        ) from None
                    log.warning(
                        "table %s: commit conflicted with another job's (%s); retrying on the refreshed table",
                        self.identifier,
                        output._one_line(exc),
                    )
                    time.sleep(COMMIT_BACKOFF_S * attempt)
            for part in parts:
                output._remove_quietly(self.fs, part)
            log.info(
                "table %s: committed %d rows of run %s in %.2f s",
                self.identifier,
                rows.num_rows,
                self.run_id,
                time.monotonic() - started,
            )
            return rows.num_rows

    def _rows(self, parts: list[str]) -> pa.Table:
        """The staged parts' rows in the table's schema: ``run_id`` and the source's stats added, one row per URI."""
        tables = []
        for part in parts:
            with self.fs.open(part, "rb") as f:
                tables.append(pq.read_table(f))
        staged = pa.concat_tables(tables) if tables else table_schema().empty_table().select(table_schema().names[:8])
        # A part rewritten by a retried write task may repeat URIs of another: the last row of each is kept.
        if pc.count_distinct(staged["uri"]).as_py() < staged.num_rows:
            positions = pa.table({"uri": staged["uri"], "at": pa.array(range(staged.num_rows), pa.int64())})
            staged = staged.take(positions.group_by("uri").aggregate([("at", "max")])["at_max"])
        # Each row's source stats, looked up by position (Arrow's joins take no list columns).
        found = pc.index_in(source_key(staged["uri"].combine_chunks(), self.uri_per_image), self.sources["source"])
        return (
            pa.table(
                [
                    *staged.columns,
                    pa.array([self.run_id] * staged.num_rows, pa.string()),
                    self.sources["source_size"].take(found),
                    self.sources["source_version"].take(found),
                ],
                names=[*staged.column_names, "run_id", "source_size", "source_version"],
            )
            .select(table_schema().names)
            .cast(table_schema())
        )

    def _properties(self, table, rows: pa.Table, final: bool) -> dict[str, str]:
        """The snapshot summary: run, mode, label settings, this commit's counts and the run's totals after it.

        The run's totals are what it committed, over all its commits and attempts: its previous commit's totals
        plus this commit's images it does not hold already (a part committed twice counts once). Rows that
        another job's commit replaced since stay counted: the run labeled them.
        """
        mine = run_snapshots(table, self.run_id)
        before = mine[-1].summary.additional_properties if mine else {}
        committed = current_rows(table, ("uri", "status"), row_filter=_run_filter(self.run_id))
        again = committed.filter(pc.is_in(committed["uri"], value_set=rows["uri"]))
        errors = _errors(rows["status"])
        values = {
            "run_id": self.run_id,
            "mode": self.mode,
            **self.labels,
            "commit.images": rows.num_rows,
            "commit.errors": errors,
            "run.images": int(before.get(PROPERTY + "run.images", 0)) + rows.num_rows - again.num_rows,
            "run.errors": int(before.get(PROPERTY + "run.errors", 0)) + errors - _errors(again["status"]),
            "run.final": str(final).lower(),
        }
        return {PROPERTY + k: str(v) for k, v in values.items()}

    def _replaced(self, table, held: pa.Array) -> pa.Table:
        """The rows (``uri``, ``error``) this run committed that other jobs' commits replaced since, but ``held``.

        Each of the run's snapshots holds every row the run had committed by then; one that the run's next commit
        followed directly (no other job's between) holds none that the next lacks, and is not read back. So a run
        no other job wrote beside reads nothing here.
        """
        found = [pa.table({"uri": pa.array([], pa.string()), "error": pa.array([], pa.string())})]
        follower = table.metadata.current_snapshot_id
        for snapshot in reversed(run_snapshots(table, self.run_id)):
            if follower != snapshot.snapshot_id:
                rows = table.scan(
                    _run_filter(self.run_id), selected_fields=("uri", "error"), snapshot_id=snapshot.snapshot_id
                ).to_arrow()
                rows = rows.filter(pc.invert(pc.is_in(rows["uri"], value_set=held))).cast(found[0].schema)
                found.append(rows)
                held = pa.concat_arrays([held, rows["uri"].combine_chunks()])
            follower = snapshot.parent_snapshot_id
        return pa.concat_tables(found)

    # -- closing a run --------------------------------------------------------------------------------------------

    def finish_run(
        self,
        config: JobConfig,
        plan: RunPlan,
        seconds: float,
        labeled_now: int | None = None,
        error: str = "",
        interrupted: bool = False,
    ) -> Summary:
        """Commits what the run staged (unless it failed or was stopped: the same command commits it then), closes
        its record and releases the lease.

        Raises:
            StorageError: the commit or the record failed; the run stays resumable.
        """
        self._stopped.set()
        if self._committer is not None:
            self._committer.join()
        try:
            if not error:
                self.commit(final=True)
            record = output._read_json(self.fs, output._join(self.run_root, output.RUN_RECORD)) or {}
            summary = output.close_record(record, self._summary(seconds), plan, labeled_now, error, interrupted)
            record["counts"]["replaced_by_other_jobs"] = summary.replaced_by_other_jobs
            record["snapshot_id"] = self.snapshot_id  # of the run's last commit (this attempt's): for time travel
            output.write_record(self.fs, self.staging, self.run_id, record)
        except Exception as exc:
            failed = f"run {self.run_id} failed ({output._first_line(error)}) and " if error else ""
            cause = str(exc) if isinstance(exc, StorageError) else output._one_line(exc)
            raise StorageError(
                f"{failed}table {self.identifier} cannot be written: {cause}; run {self.run_id} stays resumable: "
                f"run the same command again"
            ) from None
        finally:
            if plan.lease is not None:
                plan.lease.release()
        return summary

    def _summary(self, seconds: float) -> Summary:
        """What the run labeled: its committed rows, those still staged, and those other jobs replaced since."""
        table = self.catalog.load_table(self.identifier)
        committed = current_rows(table, ("uri", "error"), row_filter=_run_filter(self.run_id))
        staged = output.read_parts(self.fs, self.run_root)
        if staged is not None:
            staged = staged.to_table(columns=["uri", "error"])
            committed = pa.concat_tables(
                [
                    committed.cast(staged.schema),
                    staged.filter(pc.invert(pc.is_in(staged["uri"], value_set=committed["uri"]))),
                ]
            )
        replaced = self._replaced(table, committed["uri"].combine_chunks())
        labeled = pa.concat_tables([committed, replaced.cast(committed.schema)])
        kinds = output.error_kinds(labeled["error"])
        return Summary(
            images=labeled.num_rows,
            errors=sum(kinds.values()),
            seconds=seconds,
            error_kinds=kinds,
            replaced_by_other_jobs=replaced.num_rows,
        )


def _run_filter(run_id: str):
    """The rows one run wrote, as a pyiceberg row filter."""
    from pyiceberg.expressions import EqualTo

    return EqualTo("run_id", run_id)


def _errors(status: pa.Array | pa.ChunkedArray) -> int:
    return pc.sum(pc.equal(status, "error")).as_py() or 0


def _settings_text(settings: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings.items())
