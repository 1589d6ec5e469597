"""The one resume decision (``run.decide_run``) as a table of cases: what an output holds and the mode in, the run
out; no catalog, no filesystem."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mnasnet_batch.outputs.folder import FOLDER_RULES
from mnasnet_batch.outputs.run import Holdings, PriorRun, RunDecision, decide_run, lists_everything
from mnasnet_batch.storage import StorageError
from tests import support

SETTINGS = {"model": "mnasnet0_5", "top_k": 5}
OTHER = {"model": "mnasnet0_5", "top_k": 3}


def table_rules():
    support.require("pyiceberg", "iceberg")
    from mnasnet_batch.outputs.table import TABLE_RULES

    return TABLE_RULES


def prior(mode="auto", finished=True, settings=SETTINGS, run_id="r1"):
    return PriorRun(run_id=run_id, mode=mode, settings=settings, started_at="2026-12-01T00:00:00Z", finished=finished)


def folder(latest=None, taken=(), runs=(), foreign=()):
    """A Parquet folder's holdings: its latest run's settings are the folder's."""
    settings = None if latest is None else latest.settings
    of = "" if latest is None else f"run {latest.run_id}"
    taken = frozenset(taken) | ({latest.run_id} if latest else set())
    return Holdings("output /out", latest, settings, of, taken=taken, runs=tuple(runs), foreign=tuple(foreign))


def table(latest=None, rows=0, settings=None, taken=()):
    """A table's holdings: the settings of its latest commit, its current rows."""
    taken = frozenset(taken) | ({latest.run_id} if latest else set())
    return Holdings("table labels.photos", latest, settings, "the table's labels", rows, taken)


def new(mode, labels="all", discard=()):
    return RunDecision("new", False, mode, None, tuple(discard), labels)


def resumed(mode, labels="all", run_id="r1"):
    return RunDecision(run_id, True, mode, "2026-12-01T00:00:00Z", (), labels)


# (case, target, holdings, mode, settings, whole, the decision or the refusal's pattern)
FOLDER_CASES = [
    ("a new output", folder(), "auto", SETTINGS, "", new("auto")),
    ("a new output, incremental", folder(), "incremental", SETTINGS, "", new("incremental", "new")),
    ("an unfinished run resumes", folder(prior(finished=False)), "auto", SETTINGS, "", resumed("auto")),
    (
        "an unfinished auto run resumes under incremental, skipping every run's rows",
        folder(prior(finished=False)),
        "incremental",
        SETTINGS,
        "",
        resumed("auto", "new"),
    ),
    (
        "an unfinished incremental run resumes as incremental",
        folder(prior("incremental", finished=False)),
        "auto",
        SETTINGS,
        "",
        resumed("incremental", "new"),
    ),
    (
        "an unfinished run of other settings",
        folder(prior(finished=False, settings=OTHER)),
        "auto",
        SETTINGS,
        "",
        r"output /out holds the unfinished run r1 \(--mode auto; top_k: 5 \(this run\) vs 3 \(run r1\)\); run its "
        r"command again",
    ),
    (
        "a finished run refuses auto",
        folder(prior()),
        "auto",
        SETTINGS,
        "",
        r"output /out already holds the finished run r1; use --mode incremental to label only new images, "
        r"retry-errors to label error rows again, overwrite to start over",
    ),
    ("a finished run takes incremental", folder(prior()), "incremental", SETTINGS, "", new("incremental", "new")),
    (
        "a finished run of other settings refuses incremental, naming both values",
        folder(prior(settings=OTHER)),
        "incremental",
        SETTINGS,
        "",
        r"holds run r1 of a different configuration \(top_k differ\): top_k: 5 \(this run\) vs 3 \(run r1\); use the "
        r"same settings, a new --output, or --mode overwrite",
    ),
    (
        "a finished run of other settings refuses auto for its settings first",
        folder(prior(settings=OTHER)),
        "auto",
        SETTINGS,
        "",
        r"different configuration \(top_k differ\)",
    ),
    (
        "overwrite removes every run of this job, whatever their settings",
        folder(prior(settings=OTHER), runs=("r0", "r1")),
        "overwrite",
        SETTINGS,
        "",
        new("overwrite", discard=("r0", "r1")),
    ),
    (
        "overwrite starts over an unfinished overwrite run",
        folder(prior("overwrite", finished=False), runs=("r1",)),
        "overwrite",
        SETTINGS,
        "",
        new("overwrite", discard=("r1",)),
    ),
    (
        "a user's Parquet files under the output",
        folder(foreign=("/out/data.parquet",)),
        "auto",
        SETTINGS,
        "",
        r"holds Parquet files that no run of this job wrote \(1, e.g. /out/data.parquet\); choose a new --output",
    ),
    (
        "overwrite never removes a user's Parquet files",
        folder(prior(), runs=("r1",), foreign=("/out/x.parquet",)),
        "overwrite",
        SETTINGS,
        "",
        r"--mode overwrite removes only this job's runs",
    ),
    (
        "a run id in use",
        folder(prior(), taken=("new",)),
        "incremental",
        SETTINGS,
        "",
        r"output /out already has a run new; pass another --run-id",
    ),
    ("a run id overwrite frees", folder(prior(), runs=("new", "r1")), "overwrite", SETTINGS, "", None),
    (
        "a run folder no record names stays taken under overwrite",
        folder(prior(), taken=("new",), runs=("r1",)),
        "overwrite",
        SETTINGS,
        "",
        r"already has a run new",
    ),
]

TABLE_CASES = [
    ("a new table", table(), "auto", SETTINGS, "", new("auto")),
    (
        "a table with labels refuses auto, naming the modes",
        table(prior(), rows=5, settings=SETTINGS),
        "auto",
        SETTINGS,
        "",
        r"table labels.photos already holds 5 labels; use --mode incremental to label only new images, changed to "
        r"label images that changed, retry-errors to label error rows again, relabel to label every image again in "
        r"place, overwrite to start over",
    ),
    (
        "a table with no rows takes auto whatever its last labels",
        table(prior(), rows=0, settings=OTHER),
        "auto",
        SETTINGS,
        "",
        new("auto"),
    ),
    ("incremental", table(prior(), 5, SETTINGS), "incremental", SETTINGS, "", new("incremental", "new")),
    ("retry-errors", table(prior(), 5, SETTINGS), "retry-errors", SETTINGS, "", new("retry-errors", "errors")),
    ("changed", table(prior(), 5, SETTINGS), "changed", SETTINGS, "", new("changed", "changed")),
    ("relabel, whatever the table's labels", table(prior(), 5, OTHER), "relabel", SETTINGS, "", new("relabel")),
    (
        "retry-errors on labels of other settings",
        table(prior(), 5, OTHER),
        "retry-errors",
        SETTINGS,
        "",
        r"table labels.photos holds the table's labels of a different configuration \(top_k differ\): top_k: 5 "
        r"\(this run\) vs 3 \(the table's labels\); use --mode relabel",
    ),
    (
        "an unfinished run resumes in its own mode",
        table(prior("incremental", finished=False), 5, SETTINGS),
        "incremental",
        SETTINGS,
        "",
        resumed("incremental", "new"),
    ),
    (
        "an unfinished run refuses another mode",
        table(prior("incremental", finished=False), 5, SETTINGS),
        "retry-errors",
        SETTINGS,
        "",
        r"holds the unfinished run r1 \(--mode incremental here retry-errors\); run its command again to finish it, "
        r"or use --mode overwrite",
    ),
    (
        "an unfinished run refuses other settings",
        table(prior("relabel", finished=False, settings=OTHER), 5, SETTINGS),
        "relabel",
        SETTINGS,
        "",
        r"holds the unfinished run r1 \(--mode relabel; top_k: 5 \(this run\) vs 3 \(run r1\)\)",
    ),
    (
        "overwrite resumes its own unfinished run",
        table(prior("overwrite", finished=False), 5, SETTINGS),
        "overwrite",
        SETTINGS,
        "",
        resumed("overwrite"),
    ),
    (
        "overwrite discards an unfinished run of another mode",
        table(prior("incremental", finished=False), 5, SETTINGS),
        "overwrite",
        OTHER,
        "",
        new("overwrite", discard=("r1",)),
    ),
    (
        "a discarded table run keeps its id",
        table(prior("incremental", finished=False, run_id="new"), 5, SETTINGS),
        "overwrite",
        SETTINGS,
        "",
        r"table labels.photos already has a run new",
    ),
    (
        "retry-errors needs an image per URI",
        table(),
        "retry-errors",
        SETTINGS,
        "tar shards",
        r"--mode retry-errors needs an input whose every URI is one image .*tar shards are read whole",
    ),
    ("shards take incremental", table(prior(), 5, SETTINGS), "incremental", SETTINGS, "tar shards", None),
]


def check(rules, holds, mode, settings, whole, expected):
    if isinstance(expected, str):
        with pytest.raises(StorageError, match=expected):
            decide_run(holds, mode, settings, "new", rules, whole)
        return
    decision = decide_run(holds, mode, settings, "new", rules, whole)
    if expected is not None:
        assert decision == expected
    assert decision.run_id == (holds.latest.run_id if decision.resumed else "new")


@pytest.mark.parametrize("case, holds, mode, settings, whole, expected", FOLDER_CASES, ids=[c[0] for c in FOLDER_CASES])
def test_the_folder_opens_its_run(case, holds, mode, settings, whole, expected):
    check(FOLDER_RULES, holds, mode, settings, whole, expected)


@pytest.mark.parametrize("case, holds, mode, settings, whole, expected", TABLE_CASES, ids=[c[0] for c in TABLE_CASES])
def test_the_table_opens_its_run(case, holds, mode, settings, whole, expected):
    check(table_rules(), holds, mode, settings, whole, expected)


@pytest.mark.parametrize("mode", ["auto", "incremental", "overwrite"])
@pytest.mark.parametrize("finished", [True, False, None], ids=["finished", "unfinished", "none"])
def test_a_decision_never_discards_the_run_it_resumes_nor_reuses_a_taken_id(mode, finished):
    latest = None if finished is None else prior(finished=finished)
    holds = folder(latest, runs=("r1",) if latest else ())
    try:
        decision = decide_run(holds, mode, SETTINGS, "new", FOLDER_RULES)
    except StorageError:
        return
    assert not (decision.resumed and decision.run_id in decision.discard)
    assert decision.resumed or decision.run_id not in holds.taken - set(decision.discard)
    assert lists_everything(latest, mode) == (latest is None or mode == "overwrite")


def test_no_function_of_the_package_is_too_complex():
    """radon's cyclomatic complexity: nothing above 20 (rank D or worse) in the package."""
    import mnasnet_batch

    package = os.path.dirname(mnasnet_batch.__file__)
    found = subprocess.run(
        [sys.executable, "-m", "radon", "cc", "-n", "D", package], capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "", f"functions above complexity 20:\n{found.stdout}"


# A function this long says why in its docstring, in a sentence that starts so.
LONG_FUNCTION_LINES = 60
LONG_REASON = "Over 60 lines:"


def test_no_function_of_the_package_is_long_without_saying_why():
    import ast
    from pathlib import Path

    import mnasnet_batch

    unexplained = []
    for path in sorted(Path(mnasnet_batch.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONG_FUNCTION_LINES and LONG_REASON not in (ast.get_docstring(node) or ""):
                    unexplained.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not unexplained, f"over {LONG_FUNCTION_LINES} lines, with no '{LONG_REASON}' in the docstring: {unexplained}"
