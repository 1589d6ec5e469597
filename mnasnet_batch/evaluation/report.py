"""A labeling run's report: one self-contained HTML page with PNG charts, readable offline."""

from __future__ import annotations

import base64
import collections
import dataclasses
import datetime
import functools
import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow.dataset as pads

from mnasnet_batch.config import OutputConfig
from mnasnet_batch.evaluation import gallery as thumbnails_gallery
from mnasnet_batch.evaluation import pages, rows
from mnasnet_batch.outputs.run import RUN_RECORD, error_kinds
from mnasnet_batch.storage import Storage

# Underscore-prefixed like _config.yaml, so pyarrow, pandas and Spark still read the directory as one table.
REPORT_FILE = "_report.html"


@dataclass(frozen=True)
class RunStats:
    """What the report shows, computed from a run's Parquet files (and its summary, when recorded)."""

    images: int
    errors: int
    top1_scores: np.ndarray
    label_counts: list[tuple[str, int]]
    error_kinds: list[tuple[str, int]]
    models: list[str]
    weights: list[str]
    low_confidence: float
    # The records (_run.json) of the runs read, oldest first; their rates are the recorded throughput.
    runs: list[dict]
    # The thumbnails by label, least confident and errors; None: not built (``thumbnails=False``).
    gallery: thumbnails_gallery.Gallery | None = None

    @property
    def low_confidence_count(self) -> int:
        return int((self.top1_scores < self.low_confidence).sum())

    @property
    def low_confidence_share(self) -> float:
        """Share of the readable images whose top-1 score is under the threshold, in percent."""
        return 100.0 * self.low_confidence_count / len(self.top1_scores) if len(self.top1_scores) else 0.0


# The columns the report reads.
COLUMNS = ("status", "error", "top_k_scores", "top_k_labels", "model", "weights")
# Labels in the frequency chart and the gallery: what fits on a page.
TOP_LABELS = 20


def read(
    output: OutputConfig,
    low_confidence: float = 0.5,
    storage: Storage | None = None,
    top_labels: int = TOP_LABELS,
    thumbnails: bool = True,
) -> RunStats:
    """What the report shows of a labeling job's output (``rows.read_rows``: the Parquet parts under ``output.uri``,
    or with ``output.table`` the Iceberg table's current rows), its runs' records, and with ``thumbnails`` the
    gallery's images from the run's inputs.

    Args:
        output: the job's output settings.
        low_confidence: top-1 scores under this count as low confidence.
        storage: the job's storage handle (its ``storage`` section); None: local files and anonymous URIs.
        top_labels: labels in the frequency chart, and in the gallery.
        thumbnails: build the gallery (``gallery.build``).

    Raises:
        FileNotFoundError: no Parquet parts under ``output.uri``.
        StorageError: the table's catalog cannot be reached, or holds no such table.
    """
    storage = storage or Storage()
    columns = tuple(dict.fromkeys(COLUMNS + (thumbnails_gallery.COLUMNS if thumbnails else ())))
    found = rows.read_rows(output, columns, storage)
    result = stats(found.rows, low_confidence, found.runs)
    if thumbnails:
        labels = [label for label, _ in result.label_counts[:top_labels]]
        result = dataclasses.replace(result, gallery=thumbnails_gallery.build(found, labels, storage))
    return result


def stats(table, low_confidence: float, runs: list[dict]) -> RunStats:
    """What the report shows of output rows (``COLUMNS``) and the records of the runs that wrote them."""
    ok = table.filter(pads.field("status") == "ok")
    scores = np.array([s[0] for s in ok.column("top_k_scores").to_pylist()], dtype=np.float32)
    labels = collections.Counter(names[0] for names in ok.column("top_k_labels").to_pylist())
    kinds = collections.Counter(error_kinds(table.column("error")))
    return RunStats(
        images=table.num_rows,
        errors=kinds.total(),
        top1_scores=scores,
        label_counts=labels.most_common(),
        error_kinds=kinds.most_common(),
        models=sorted(set(table.column("model").drop_null().to_pylist())),
        weights=sorted(set(table.column("weights").drop_null().to_pylist())),
        low_confidence=low_confidence,
        runs=runs,
    )


def _plain_text(chart: Callable[..., str]) -> Callable[..., str]:
    """``chart`` with its text drawn as it is, never parsed as mathtext: a label or run id holding ``$`` (a
    checkpoint's metadata, a third party's rows: ``$\\frac{1}{$``) made matplotlib raise, and the report die."""

    @functools.wraps(chart)
    def drawn(*args, **kwargs) -> str:
        import matplotlib

        # Text objects read this when created, tick labels when drawn: both happen inside the chart function.
        with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
            return chart(*args, **kwargs)

    return drawn


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@_plain_text
def _bar_chart(title: str, pairs: list[tuple[str, int]], xlabel: str) -> str:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names = [name for name, _ in pairs][::-1]  # largest at the top
    counts = [count for _, count in pairs][::-1]
    figure = Figure(figsize=(8, max(2.0, 0.3 * len(pairs) + 1)))
    axes = figure.subplots()
    axes.barh(names, counts, color="#4c72b0")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # counts of images
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    return _png(figure)


@_plain_text
def _confidence_chart(stats: RunStats) -> str:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(8, 3.5))
    axes = figure.subplots()
    axes.hist(stats.top1_scores, bins=20, range=(0.0, 1.0), color="#4c72b0")
    axes.axvline(
        stats.low_confidence, color="#c44e52", linestyle="--", label=f"low confidence < {stats.low_confidence}"
    )
    axes.set_title("Top-1 score (softmax probability)")
    axes.set_xlabel("top-1 score")
    axes.set_ylabel("images")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend()
    return _png(figure)


@_plain_text
def _outcome_chart(stats: RunStats) -> str:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    confident = len(stats.top1_scores) - stats.low_confidence_count
    outcomes = [("confident", confident), ("low confidence", stats.low_confidence_count), ("error", stats.errors)]
    figure = Figure(figsize=(8, 2.2))
    axes = figure.subplots()
    axes.barh(
        [name for name, _ in outcomes][::-1], [n for _, n in outcomes][::-1], color=["#c44e52", "#dd8452", "#55a868"]
    )
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title("Outcome per image")
    axes.set_xlabel("images")
    return _png(figure)


@_plain_text
def _throughput_chart(runs: list[dict]) -> str:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, max(2.0, 0.4 * len(runs) + 1)))
    axes = figure.subplots()
    axes.barh([f"run {r['run_id']}" for r in runs][::-1], [r["images_per_s"] for r in runs][::-1], color="#8172b3")
    axes.set_title("Throughput per run (last attempt, Ray start-up included)")
    axes.set_xlabel("images/s")
    return _png(figure)


def render(stats: RunStats, uri: str, top_labels: int = TOP_LABELS) -> str:
    """The report as one HTML page; charts are inline PNGs and thumbnails inline JPEGs (data: URIs), so the page
    needs no network.

    Over 60 lines: the page's sections, in the order they appear on it.
    """
    rated = [r for r in stats.runs if r.get("images_per_s")]
    charts = [
        (
            "Most frequent top-1 labels",
            _bar_chart(f"Most frequent top-1 labels (up to {top_labels})", stats.label_counts[:top_labels], "images"),
        )
        if stats.label_counts
        else ("Most frequent top-1 labels", None),
        ("Top-1 confidence", _confidence_chart(stats) if len(stats.top1_scores) else None),
        ("Low confidence share", _outcome_chart(stats)),
        (
            "Error kinds",
            _bar_chart("Errors by exception type", stats.error_kinds, "images") if stats.error_kinds else None,
        ),
        ("Throughput", _throughput_chart(rated) if rated else None),
    ]
    if rated:
        throughput = "; ".join(
            f"run {r['run_id']}: {r['images_per_s']:.1f} images/s ({r['counts']['labeled_this_attempt']} images in "
            f"{r['seconds']:.1f} s, {r['status']})"
            for r in rated
        )
    else:
        throughput = f"not recorded (no {RUN_RECORD} with a rate in the runs' folders)"
    facts = [
        ("run", uri),
        ("model", ", ".join(stats.models) or "-"),
        ("weights", ", ".join(stats.weights) or "-"),
        ("images", f"{stats.images}"),
        ("errors", f"{stats.errors} ({100.0 * stats.errors / stats.images if stats.images else 0:.1f} %)"),
        (
            "low confidence",
            f"{stats.low_confidence_count} of {len(stats.top1_scores)} readable images "
            f"({stats.low_confidence_share:.1f} %) have a top-1 score under {stats.low_confidence}",
        ),
        ("median top-1 score", f"{np.median(stats.top1_scores):.3f}" if len(stats.top1_scores) else "-"),
        ("distinct top-1 labels", f"{len(stats.label_counts)}"),
        ("throughput", throughput),
    ]
    # The counts behind the two bar charts, as text too: searchable, and exact where bars are not.
    listings = {
        "Most frequent top-1 labels": stats.label_counts[:top_labels],
        "Error kinds": stats.error_kinds,
    }
    return pages.template("report.html").render(
        uri=uri,
        facts=facts,
        charts=[{"title": title, "png": png, "listing": listings.get(title)} for title, png in charts],
        gallery=thumbnails_gallery.view(stats.gallery, dict(stats.label_counts)) if stats.gallery else None,
        generated=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )


def write(uri: str, page: str, storage: Storage | None = None) -> None:
    """Writes the page to a local path or fsspec URI, with the job's storage settings."""
    fs, path = (storage or Storage()).filesystem(uri)
    with fs.open(path, "w", encoding="utf-8") as f:
        f.write(page)


def describe_gallery(stats: RunStats) -> str:
    """The gallery in words for the summary line: ``160 thumbnails, 2 placeholders (gone 1, changed 1), ``."""
    if stats.gallery is None:
        return ""
    pictures = [p for _, shown in stats.gallery.labels for p in shown]
    pictures += stats.gallery.least_confident + stats.gallery.errors
    placeholders = collections.Counter(p.missing for p in pictures if not p.jpeg)
    kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(placeholders.items()))
    return (
        f"{sum(1 for p in pictures if p.jpeg)} thumbnails, {placeholders.total()} placeholders"
        f"{f' ({kinds})' if kinds else ''}, "
    )
