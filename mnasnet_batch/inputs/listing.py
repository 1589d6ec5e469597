"""Listing the input once and choosing its layout (``select_inputs``), then planning it (``plan_input``)."""

from __future__ import annotations

import dataclasses
import logging
import posixpath
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from mnasnet_batch.config import InputConfig
from mnasnet_batch.decode.formats import unreadable_formats
from mnasnet_batch.inputs import spool
from mnasnet_batch.inputs.files import FilesLayout
from mnasnet_batch.inputs.layout import SHOWN_MEMBERS, InputPlan, Layout, has_extensions
from mnasnet_batch.inputs.manifests import ManifestLayout
from mnasnet_batch.inputs.parquet import ParquetLayout
from mnasnet_batch.inputs.spool import SpooledURIs
from mnasnet_batch.inputs.webdataset import WebDatasetLayout
from mnasnet_batch.storage import Storage, StorageError, has_extension

log = logging.getLogger(__name__)

# In the order ``input.format=auto`` tries them.
LAYOUTS = (FilesLayout, WebDatasetLayout, ParquetLayout, ManifestLayout)


class _Selection:
    """What one layout selects of a listing, taken a chunk at a time: its inputs (image files past
    ``spool.SPOOL_URIS`` written to the spool folder, as a manifest's URIs are), and how many files it ignores."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.inputs = layout.listing()
        self.ignored = 0
        self.shown: list[str] = []  # the first few ignored, for the log

    def add(self, files: pa.Array, single: bool) -> None:
        selected = self.layout.selects(files, single)
        self.inputs.add(files.filter(selected))
        others = len(files) - pc.sum(selected).as_py() if len(files) else 0
        if others:
            self.ignored += others
            if len(self.shown) < SHOWN_MEMBERS:
                self.shown += files.filter(pc.invert(selected))[: SHOWN_MEMBERS - len(self.shown)].to_pylist()

    def finish(self) -> pa.ChunkedArray | SpooledURIs:
        """The inputs: sorted when held (so runs are reproducible); a written list is in hash partitions anyway."""
        inputs = self.inputs.finish()
        if isinstance(inputs, SpooledURIs):
            return inputs
        return inputs.take(pc.sort_indices(inputs)) if len(inputs) else inputs


class _Unreadable:
    """The image files of a listing in formats this installation cannot decode (``formats.unreadable_formats``),
    taken out of each chunk before the layouts see it, and counted per format for one line of the log each."""

    def __init__(self, config: InputConfig):
        wanted = {extension.lower().lstrip(".") for extension in config.extensions}
        self.formats = [f for f in unreadable_formats() if wanted.intersection(f.extensions)]
        self.counts = dict.fromkeys(self.formats, 0)
        # Files of a layout other than loose images (shards, Parquet, manifests) are taken whatever their name.
        self.applies = config.format in ("auto", "files")

    def readable(self, config: InputConfig) -> InputConfig:
        """``config`` with only the extensions that can be decoded here: what the layouts select, and read in shards."""
        left_out = {extension for f in self.formats for extension in f.extensions}
        return dataclasses.replace(
            config, extensions=tuple(e for e in config.extensions if e.lower().lstrip(".") not in left_out)
        )

    def take_out(self, files: pa.Array) -> pa.Array:
        """``files`` without those in unreadable formats, which are counted."""
        if not self.applies:
            return files
        for image_format in self.formats:
            unreadable = has_extensions(files, image_format.extensions)
            count = pc.sum(unreadable).as_py() if len(files) else 0
            if count:
                self.counts[image_format] += count
                files = files.filter(pc.invert(unreadable))
        return files

    def log(self) -> None:
        """One line per format with files left out: how many, and what to install to label them."""
        for image_format, count in self.counts.items():
            if count:
                described, install = image_format.describe(), image_format.install
                log.warning("skipped %d %s files: %s to label them", count, described, install)


def select_inputs(
    config: InputConfig, storage: Storage, spool_folder: str = ""
) -> tuple[Layout, pa.ChunkedArray | SpooledURIs]:
    """Lists the input once (``Storage.list_files``), chunk by chunk, and decides its layout: the one
    ``input.format`` names, or with ``auto`` the first whose inputs the listing holds; and selects its inputs.

    Detection takes image files, then tar shards, then Parquet files with ``input.image_column`` (else those
    Parquet files are a manifest), then text or CSV manifests. A single file named explicitly is taken whatever
    its extension when the format is set (and is not ``files``). Image files in a format this installation cannot
    decode (HEIC without the ``heif`` extra, ``formats.unreadable_formats``) are left out, and counted in the log
    with what to install.

    ``spool_folder``: where a long list of image files is written (``Layout.spool_folder``).

    Raises:
        StorageError: the input does not exist, or holds nothing of its layout (of any layout, with ``auto``).

    Over 60 lines: a third of them this docstring.
    """
    chunks, single = storage.list_files(config.uri)
    unreadable = _Unreadable(config)
    config = unreadable.readable(config)
    layouts = [layout(config, storage, spool_folder) for layout in LAYOUTS]
    if config.format != "auto":
        layouts = [layout for layout in layouts if layout.name == config.format]
    selections = [_Selection(layout) for layout in layouts]
    for chunk in chunks:
        files = unreadable.take_out(pa.array(chunk, pa.large_string()))
        for selection in selections:
            selection.add(files, single)
        if len(selections[0].inputs):
            # Image files come first: once one is listed, the other layouts need not collect their inputs.
            selections = selections[:1]
    unreadable.log()
    found = {id(selection.layout): selection for selection in selections}
    for layout in layouts:
        selection = found.get(id(layout))
        if selection is None:
            continue
        inputs = selection.finish()
        if config.format != "auto":
            break
        if len(inputs) and layout.detects(inputs):
            log.info("input format %s (detected from %s)", layout.name, config.uri)
            break
    else:
        extensions = layouts[0].image_extensions
        raise StorageError(
            f"input {config.uri} holds no image files ({', '.join(extensions)}), tar shards, Parquet files "
            "or manifests (txt, csv, tsv)"
        )
    if selection.ignored:
        log.info(
            "input %s: ignoring %d other files (not %s): %s%s",
            config.uri,
            selection.ignored,
            layout.kind,
            ", ".join(posixpath.basename(f) for f in selection.shown),
            ", ..." if selection.ignored > SHOWN_MEMBERS else "",
        )
    if not len(inputs):
        raise StorageError(f"input {config.uri} holds no {layout.wanted()}")
    return layout, inputs


def plan_input(config: InputConfig, storage: Storage, spool_folder: str = "") -> InputPlan:
    """Lists the input once, decides its layout and selects its inputs (``select_inputs``), and plans them.

    ``spool_folder``: where a list of image URIs longer than ``spool.SPOOL_URIS`` is written (``Layout.spool_folder``).

    Raises:
        StorageError: the input does not exist, holds nothing of its layout, or lacks the configured columns.
    """
    try:
        layout, inputs = select_inputs(config, storage, spool_folder)
        return layout.plan(inputs)
    except BaseException:
        if spool_folder:  # what was written of a list before its manifest failed, say
            spool.remove_folder(storage, spool_folder)
        raise


def layout_of_rows(config: InputConfig, storage: Storage, uris: Iterable[str]) -> Layout:
    """The layout that reads back the images of a run's output rows ``uris`` (a report's thumbnails), without
    listing the input again: the one ``input.format`` named, or with ``auto`` the first whose input files the rows
    name (tar shards in ``SHARD#MEMBER``, Parquet files in ``FILE#ID``), else image URIs (loose files and
    manifests' URIs are read alike).
    """
    layouts = [layout(config, storage) for layout in LAYOUTS]
    if config.format != "auto":
        return next(layout for layout in layouts if layout.name == config.format)
    uris = list(uris)
    for layout in layouts:
        if not layout.uri_per_image and any(
            "#" in uri and has_extension(layout.row_input(uri), layout.file_extensions) for uri in uris
        ):
            return layout
    return layouts[0]
