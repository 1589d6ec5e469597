"""The Apache Iceberg table output: one current row per image, each run staged as Parquet parts, then committed.

A run goes through the lifecycle every target shares (``run``: lease, run record, closing) and writes its rows as
the Parquet folder does (``folder``: atomic parts named by their URIs), under ``<output.uri>/_staging/run=<id>/``;
the driver commits the staged parts into the table (at the end, or every ``output.commit_interval_s``), each commit
one snapshot that replaces the rows of the committed URIs (``replace_rows``: every snapshot holds a whole table),
then deletes those parts. A killed run keeps its staged
parts and what it committed; the same command commits the rest and labels only what neither holds.

Ray Data's ``Dataset.write_iceberg`` (Ray 2.60) is not used: it commits once, when the whole dataset is written,
so a killed run loses everything it labeled; its write tasks open the catalog themselves, which an embedded SQLite
catalog on the driver's disk does not allow on a cluster; and its upsert knows nothing of this job's runs, modes,
errors or resume. Its per-task Parquet writing is what ``job.PartSink`` already does.

Layout under ``output.uri`` (an embedded catalog only when ``output.catalog`` is empty)::

    _catalog.db                     the embedded SQLite catalog (pyiceberg's SqlCatalog, catalog name "default")
    warehouse/                      its tables' data and metadata
    _staging/run=<id>/part-*.parquet   rows of a run not yet committed
    _staging/run=<id>/_run.json     that run's record; _staging/_run.json the latest run's
    _lease.json                     present while a job writes here
"""

from __future__ import annotations

import logging
import os
import threading
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mnasnet_batch.config import ConfigError, JobConfig
from mnasnet_batch.outputs import files, folder, retry, run
from mnasnet_batch.outputs.iceberg import (
    NO_COMMIT_RETRIES,
    PROPERTY,
    SOURCE_SCHEMA,
    STAGING,
    catalog_properties,
    commit_schema,
    conform,
    current_rows,
    evolve_schema,
    kept_fit,
    kept_refusal,
    kept_types,
    label_settings,
    latest_labels,
    new_table_schema,
    open_catalog,
    replace_rows,
    run_filter,
    run_snapshots,
    source_key,
    source_stats,
    table_schema,
    to_label,
)
from mnasnet_batch.outputs.run import OutputTarget, RunPlan, Summary
from mnasnet_batch.storage import Storage, StorageError

log = logging.getLogger(__name__)

# Commits that conflict with another job's are rebuilt on the refreshed table this many times: replacing the
# rows of given URIs is right whatever the table holds, so a rebuilt commit is as correct as the first. These are
# the only tries: pyiceberg's own retries (commit.retry.num-retries, 4 by default), which would run inside each of
# them, are set to 0 on the table (iceberg.NO_COMMIT_RETRIES).
COMMIT_ATTEMPTS = 5
COMMIT_BACKOFF_S = 0.5

# How the table opens a run (``run.decide_run``): an unfinished run resumes only in its own mode, since the modes
# label different images; overwrite discards only an unfinished run of another mode, and replaces every other row
# at its final commit.
TABLE_RULES = run.ResumeRules(
    modes=("auto", "incremental", "changed", "retry-errors", "relabel", "overwrite"),
    same_settings=frozenset({"incremental", "retry-errors", "changed"}),
    resumes_in_any_mode=False,
    overwrite_removes_runs=False,
)


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

    def describe(self, config: JobConfig) -> str:
        return f"output {config.output.uri} (table {self.identifier})"

    def open_run(self, config: JobConfig, weights_id: str, inputs, storage: Storage, fs, root: str) -> RunPlan:
        """Opens (or resumes) the run in staging, and decides what it labels.

        Raises:
            StorageError: the mode does not fit the table or the input; the catalog cannot be used. The message
                says what to do.
        """
        self.fs, self.staging = fs, files.join(root, STAGING)
        self.fs.makedirs(self.staging, exist_ok=True)
        return self._open_run(config, weights_id, inputs, storage)

    def opened(self, config: JobConfig) -> None:
        """Starts committing the staged parts every ``output.commit_interval_s``, when set."""
        if config.output.commit_interval_s > 0:
            self._committer = threading.Thread(
                target=self._commit_every, args=(config.output.commit_interval_s,), name="table-commits", daemon=True
            )
            self._committer.start()

    def _open_run(self, config: JobConfig, weights_id: str, inputs, storage: Storage) -> RunPlan:
        """What ``run.decide_run`` decides for the table, done: the run opened in staging, what it skips."""
        fs, mode = self.fs, config.output.mode
        self.labels = label_settings(config, weights_id)
        self.uri_per_image = inputs.layout.uri_per_image
        whole = "" if self.uri_per_image else inputs.layout.noun
        run.check_input_fits(mode, whole)  # before the catalog is opened, and the table created
        kept = self._load(config, storage, inputs.layout.kept)
        rows = current_rows(self.table, ("uri", "status", "run_id", "source_size", "source_version"))
        holds = self._holdings(config, rows)
        new_run_id = config.output.run_id or run.submission_id() or run.default_run_id()
        decision = run.decide_run(holds, mode, self.labels, new_run_id, TABLE_RULES, whole)
        self._fit_kept(kept, config.output.evolve_schema)  # once the run goes ahead: a refused one changes nothing
        for discarded in decision.discard:
            log.warning("overwrite: discarding the staged rows of the unfinished run %s", discarded)
            for part in self._staged_parts(files.join(self.staging, f"run={discarded}")):
                fs.rm(part)
        self.run_id, self.mode = decision.run_id, mode
        self.run_root = files.join(self.staging, f"run={self.run_id}")
        fs.makedirs(self.run_root, exist_ok=True)
        for stale in files.stale_temporaries(fs, self.run_root):
            fs.rm(stale)  # left by a writer that was killed; its rows were never visible
        done, held = self._done(inputs, rows, decision, storage)
        record = {
            "run_id": self.run_id,
            "status": "running",
            "mode": mode,
            "table": self.identifier,
            "labels": self.labels,
            "started_at": decision.started_at or files.now(),
            "attempt_started_at": files.now(),
            "ended_at": None,
            "config": run.public_config(config),
            "versions": run.versions(),
        }
        run.write_record(fs, self.staging, self.run_id, record)
        run_uri = files.join(config.output.uri, STAGING, f"run={self.run_id}")
        return RunPlan(run_id=self.run_id, run_uri=run_uri, resumed=decision.resumed, done=done, rows_before=held)

    def _load(self, config: JobConfig, storage: Storage, kept: pa.Schema):
        """Opens the catalog and the table, creating its namespace and the table (with the ``kept`` columns) where
        they do not exist.

        Returns:
            The kept columns' Iceberg types (``kept_types``), for ``_fit_kept``.
        """
        from pyiceberg.exceptions import NamespaceAlreadyExistsError

        wanted = kept_types(kept)  # refused before the table is made
        self.catalog = open_catalog(config.output, storage)
        namespace = self.identifier.rsplit(".", 1)[0]
        try:
            self.catalog.create_namespace_if_not_exists(namespace)
        except NamespaceAlreadyExistsError:  # created by another job since the check
            pass
        self.table = self._create_or_load(kept)
        return wanted

    def _fit_kept(self, wanted, evolve: bool) -> None:
        """Makes the table hold the run's kept columns (``wanted``, their Iceberg types: ``output.evolve_schema``
        adds or widens them), or refuses with one line (``iceberg.kept_refusal``).

        Raises:
            StorageError: the table cannot hold them as it is, and may not change, or cannot change to the
                input's types.
        """
        from pyiceberg.exceptions import CommitFailedException

        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            fit = kept_fit(self.table.schema(), wanted)
            refusal = kept_refusal(self.identifier, fit, evolve)
            if refusal:
                raise StorageError(refusal)
            if not fit.evolves:
                break
            try:
                evolve_schema(self.table, wanted, fit)
            except CommitFailedException:  # another job changed the schema first: judged again on its schema
                if attempt == COMMIT_ATTEMPTS:
                    raise StorageError(
                        f"table {self.identifier}: its schema kept changing under this job ({COMMIT_ATTEMPTS} tries); "
                        "run the same command again"
                    ) from None
            else:
                changed = [*fit.missing, *(f"{name} widened" for name in fit.widened)]
                log.warning("table %s: schema evolved for input.keep_columns: %s", self.identifier, ", ".join(changed))
            self.table = self.catalog.load_table(self.identifier)
        if fit.unkept:
            log.info(
                "table %s: columns %s are not in input.keep_columns: this run's rows hold null there",
                self.identifier,
                ", ".join(fit.unkept),
            )

    def _holdings(self, config: JobConfig, rows: pa.Table) -> run.Holdings:
        """What the table and its staging hold, as ``run.decide_run`` needs it."""
        record = files.read_json(self.fs, files.join(self.staging, run.RUN_RECORD))
        finished = record is not None and record.get("status") == "succeeded"
        staged = files.named(self.fs, self.staging, "run=")
        taken = {os.path.basename(p.rstrip("/"))[len("run=") :] for p in staged}
        taken.update(r for r in pc.unique(rows["run_id"]).to_pylist() if r is not None)
        return run.Holdings(
            name=f"table {self.identifier}",
            latest=run.PriorRun.from_record(record, "labels", finished),
            settings=latest_labels(self.table) or None,
            settings_of="the table's labels",
            rows=rows.num_rows,
            taken=frozenset(taken),
        )

    def _done(self, inputs, rows: pa.Table, decision: run.RunDecision, storage: Storage) -> tuple[pa.Array, int]:
        """The listed URIs the run does not label (``RunPlan.done``), and how many of them the run holds already;
        the sources' stats (``self.sources``) of those it labels and of its staged rows."""
        fs = self.fs
        # What this run holds already (committed, or staged by an attempt that was stopped): never labeled again.
        # What other jobs replaced of it since counts too: the run labeled it, and another job's label is newer.
        mine = rows.filter(pc.equal(rows["run_id"], self.run_id))["uri"].combine_chunks()
        staged = folder.Labeled(fs, self.run_root, self.run_root).uris().combine_chunks()
        held = pa.concat_arrays([mine, staged.filter(pc.invert(pc.is_in(staged, value_set=mine)))])
        held = pa.concat_arrays([held, self._replaced(self.table, held)["uri"].combine_chunks()])
        # The table's modes need every listed URI as Python strings (stats per file): a table run holds them.
        uris = inputs.listed().to_pylist()
        if not self.uri_per_image:
            self.sources = source_stats(uris, storage)
            every = pa.concat_arrays([rows["uri"].combine_chunks(), held])
            return (every if decision.labels == "new" else held), len(held)
        if decision.labels == "changed":
            self.sources = source_stats(uris, storage)
        wanted = to_label(decision.mode, uris, rows, self.sources)
        wanted = wanted.filter(pc.invert(pc.is_in(wanted, value_set=held)))
        if decision.labels != "changed":
            # Committed rows hold their stats already; staged ones get theirs when committed, like the rest.
            uncommitted = staged.filter(pc.invert(pc.is_in(staged, value_set=mine)))
            self.sources = source_stats(pa.concat_arrays([wanted, uncommitted]).to_pylist(), storage)
        listed = pa.array(uris, pa.string())
        return pa.concat_arrays([listed.filter(pc.invert(pc.is_in(listed, value_set=wanted))), held]), len(held)

    def _create_or_load(self, kept: pa.Schema):
        """The table, created with ``table_schema()`` and the ``kept`` columns (``new_table_schema``), ``uri`` its
        identifier field, when it does not exist."""
        from pyiceberg.exceptions import NoSuchTableError, TableAlreadyExistsError

        try:
            return self.catalog.load_table(self.identifier)
        except NoSuchTableError:
            pass
        try:
            with self.catalog.create_table_transaction(
                self.identifier, schema=new_table_schema(kept), properties=NO_COMMIT_RETRIES
            ) as transaction:
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
                log.warning("table %s: interval commit failed: %s", self.identifier, files.one_line(exc))

    def commit(self, final: bool) -> int:
        """Commits the run's staged parts into the table in one transaction, then deletes them.

        The transaction replaces the rows of the staged URIs (and, on an overwrite run's final commit, every row
        of another run), so committing a part twice (a kill between the commit and the deletion) changes nothing.
        Each commit is one snapshot (``replace_rows``).

        Returns:
            The rows committed.

        Raises:
            StorageError: each of ``COMMIT_ATTEMPTS`` tries conflicted with other jobs' commits.
        """
        from pyiceberg.exceptions import CommitFailedException, ValidationException

        started = time.monotonic()
        with self.lock:
            # Other processes wrote the parts: this one's cached listings (s3fs, gcsfs) have not seen them.
            self.fs.invalidate_cache()
            parts = self._staged_parts(self.run_root)
            rows = self._rows(parts)
            overwrite = final and self.mode == "overwrite"
            if not rows.num_rows and not overwrite:
                return 0
            condition = self._commit_filter(rows["uri"].to_pylist(), overwrite)
            for attempt in range(1, COMMIT_ATTEMPTS + 1):
                if self.lease is not None:
                    self.lease.check()  # a job that lost the output commits nothing more
                table = self.catalog.load_table(self.identifier)
                # In the table's columns as they are now: another job may have added or widened some since.
                rows = conform(rows, commit_schema(table.schema()))
                properties = self._properties(table, rows, final)
                try:
                    self.snapshot_id = replace_rows(table, rows, condition, properties)
                    break
                except (CommitFailedException, ValidationException) as exc:
                    if attempt == COMMIT_ATTEMPTS:
                        raise StorageError(
                            f"table {self.identifier}: the commit was tried {COMMIT_ATTEMPTS} times, each conflicting "
                            f"with other jobs writing it ({files.one_line(exc)}); nothing is lost: run the same "
                            f"command again and run {self.run_id} commits its staged rows"
                        ) from None
                    log.warning(
                        "table %s: commit conflicted with another job's (%s); retrying on the refreshed table",
                        self.identifier,
                        files.one_line(exc),
                    )
                    time.sleep(COMMIT_BACKOFF_S * attempt)
            for part in parts:
                files.remove_quietly(self.fs, part)
            log.info(
                "table %s: committed %d rows of run %s in %.2f s",
                self.identifier,
                rows.num_rows,
                self.run_id,
                time.monotonic() - started,
            )
            return rows.num_rows

    def _commit_filter(self, uris: list[str], overwrite: bool):
        """The rows a commit replaces, as a pyiceberg row filter: those of ``uris``, and with ``overwrite`` (an
        overwrite run's final commit) every row of another run."""
        from pyiceberg.expressions import AlwaysFalse, EqualTo, In, Not, Or

        condition = In("uri", uris) if uris else AlwaysFalse()
        return Or(condition, Not(EqualTo("run_id", self.run_id))) if overwrite else condition

    def _rows(self, parts: list[str]) -> pa.Table:
        """The staged parts' rows, ``run_id`` and the source's stats added, one row per URI (``commit`` puts them
        in the table's columns, ``iceberg.conform``)."""
        tables = []
        for part in parts:
            with self.fs.open(part, "rb") as f:
                tables.append(pq.read_table(f))
        # A run's parts hold the same columns, but for one resumed with other input.keep_columns: nulls fill in.
        empty = table_schema().empty_table().drop_columns(["run_id", "source_size", "source_version"])
        staged = pa.concat_tables(tables, promote_options="permissive") if tables else empty
        staged = retry.latest_per_uri(staged)
        # Each row's source stats, looked up by position (Arrow's joins take no list columns).
        found = pc.index_in(source_key(staged["uri"].combine_chunks(), self.uri_per_image), self.sources["source"])
        added = {
            "run_id": pa.array([self.run_id] * staged.num_rows, pa.string()),
            "source_size": self.sources["source_size"].take(found),
            "source_version": self.sources["source_version"].take(found),
        }
        for name, values in added.items():
            staged = staged.append_column(name, values)
        return staged

    def _properties(self, table, rows: pa.Table, final: bool) -> dict[str, str]:
        """The snapshot summary: run, mode, label settings, this commit's counts and the run's totals after it.

        The run's totals are what it committed, over all its commits and attempts: its previous commit's totals
        plus this commit's images it does not hold already (a part committed twice counts once). Rows that
        another job's commit replaced since stay counted: the run labeled them.
        """
        mine = run_snapshots(table, self.run_id)
        before = mine[-1].summary.additional_properties if mine else {}
        committed = current_rows(table, ("uri", "status"), row_filter=run_filter(self.run_id))
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
                    run_filter(self.run_id), selected_fields=("uri", "error"), snapshot_id=snapshot.snapshot_id
                ).to_arrow()
                rows = rows.filter(pc.invert(pc.is_in(rows["uri"], value_set=held))).cast(found[0].schema)
                found.append(rows)
                held = pa.concat_arrays([held, rows["uri"].combine_chunks()])
            follower = snapshot.parent_snapshot_id
        return pa.concat_tables(found)

    # -- closing a run --------------------------------------------------------------------------------------------

    def close_run(self, config, plan, seconds, labeled_now, error, interrupted) -> Summary:
        """Commits what the run staged (unless it failed or was stopped: the same command commits it then), and
        closes its record."""
        self._stopped.set()
        if self._committer is not None:
            self._committer.join()
        if not error:
            self.commit(final=True)
        record = files.read_json(self.fs, files.join(self.run_root, run.RUN_RECORD)) or {}
        summary = run.close_record(record, self._summary(seconds), plan, labeled_now, error, interrupted)
        record["counts"]["replaced_by_other_jobs"] = summary.replaced_by_other_jobs
        record["snapshot_id"] = self.snapshot_id  # of the run's last commit (this attempt's): for time travel
        run.write_record(self.fs, self.staging, self.run_id, record, plan.lease)
        return summary

    def cannot_close(self, config: JobConfig, plan: RunPlan, exc: Exception) -> str:
        cause = str(exc) if isinstance(exc, StorageError) else files.one_line(exc)
        return (
            f"table {self.identifier} cannot be written: {cause}; run {self.run_id} stays resumable: "
            f"run the same command again"
        )

    def _summary(self, seconds: float) -> Summary:
        """What the run labeled: its committed rows, those still staged, and those other jobs replaced since."""
        table = self.catalog.load_table(self.identifier)
        committed = current_rows(table, ("uri", "error"), row_filter=run_filter(self.run_id))
        staged = folder.read_parts(self.fs, self.run_root)
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
        kinds = run.error_kinds(labeled["error"])
        return Summary(
            images=labeled.num_rows,
            errors=sum(kinds.values()),
            seconds=seconds,
            error_kinds=kinds,
            replaced_by_other_jobs=replaced.num_rows,
        )


def _errors(status: pa.Array | pa.ChunkedArray) -> int:
    return pc.sum(pc.equal(status, "error")).as_py() or 0

