"""Files of an output as readers must see them: whole or not at all, and what a killed writer left behind.

Used by the run lifecycle (``run``, ``lease``) and by both targets; it knows nothing of runs.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import uuid
from collections.abc import Callable

from fsspec.implementations.local import LocalFileSystem

TEMP_PREFIX = "_inprogress-"
_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + "[0-9a-f]{32}")

def now(timespec: str = "seconds") -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec=timespec)


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``: what a one-line error says about a cause."""
    line = first_line(str(exc))
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def join(root: str, *names: str) -> str:
    return "/".join([root.rstrip("/"), *names])


def read_json(fs, path: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def _temp_path(path: str) -> str:
    return join(os.path.dirname(path), f"{TEMP_PREFIX}{uuid.uuid4().hex}")


def remove_quietly(fs, path: str) -> None:
    """Removes a file if it can (a full disk still allows it); a temporary left behind is removed by the next run."""
    with contextlib.suppress(OSError):
        fs.rm(path)


def write_bytes(
    fs, path: str, data: bytes, guard: Callable[[], contextlib.AbstractContextManager] | None = None
) -> None:
    """Writes a whole file so that readers see the old content or the new, never a part.

    ``guard``, when given, is entered around the file's publishing (the rename of the written temporary on local
    disk, the upload elsewhere): what it raises stops the write, and nothing is published.

    Raises:
        OSError: the write failed (e.g. the disk is full); the temporary file is removed first.
    """
    if isinstance(fs, LocalFileSystem):
        temp = _temp_path(path)
        try:
            fs.pipe_file(temp, data)
            with guard() if guard is not None else contextlib.nullcontext():
                os.replace(temp, path)
        except BaseException:
            remove_quietly(fs, temp)
            raise
    else:
        # Object stores publish an object only once its upload is complete.
        with guard() if guard is not None else contextlib.nullcontext():
            fs.pipe_file(path, data)


def parts_under(fs, root: str) -> list[str]:
    """The Parquet parts (``part-*.parquet``) anywhere under ``root``, as ``fs`` names them, sorted."""
    found = fs.find(root) if fs.exists(root) else []
    return sorted(p for p in found if os.path.basename(p).startswith("part-") and p.endswith(".parquet"))


def named(fs, folder: str, prefix: str) -> list[str]:
    """The entries of ``folder`` whose names start with ``prefix``: a listing, not a glob, so that ``[``, ``?`` or
    ``*`` in the folder's own path are taken as they are."""
    try:
        names = fs.ls(folder, detail=False)
    except FileNotFoundError:  # an object store's "folder" exists only once an object is under it
        return []
    return [p for p in names if os.path.basename(p.rstrip("/")).startswith(prefix)]


def stale_temporaries(fs, folder: str) -> list[str]:
    """The temporaries that killed writers left in ``folder``: ``_temp_path``'s names exactly, so that a user's
    file that merely starts like one is never removed."""
    return [p for p in named(fs, folder, TEMP_PREFIX) if _TEMP_NAME.fullmatch(os.path.basename(p.rstrip("/")))]
