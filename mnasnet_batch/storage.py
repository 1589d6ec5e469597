"""Listing and reading images through fsspec, so local paths and s3:// URIs share one code path."""

from __future__ import annotations

import posixpath

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem


class StorageError(RuntimeError):
    """Storage that cannot be listed or reached; the message says which URI and why."""


def _has_extension(path: str, extensions: tuple[str, ...]) -> bool:
    return posixpath.splitext(path)[1].lower().lstrip(".") in extensions


def list_images(uri: str, extensions: tuple[str, ...]) -> list[str]:
    """Lists the image files under a directory or prefix (recursively), a glob, or a single file.

    Args:
        uri: a local path or fsspec URI.
        extensions: file extensions to keep, lower case without the dot.

    Returns:
        Full URIs (absolute paths for local files), sorted so runs are reproducible.

    Raises:
        StorageError: the location does not exist, cannot be reached, or holds no images.
    """
    extensions = tuple(e.lower().lstrip(".") for e in extensions)
    try:
        fs, path = url_to_fs(uri)
        if fs.isfile(path):
            paths = [path]
        elif any(c in path for c in "*?["):
            paths = [p for p in fs.glob(path) if not fs.isdir(p)]
        elif fs.isdir(path):
            paths = fs.find(path)
        else:
            raise StorageError(f"input {uri} does not exist")
    except StorageError:
        raise
    except ImportError as exc:
        raise StorageError(f"input {uri}: {exc}") from None
    except Exception as exc:
        raise StorageError(f"input {uri} cannot be listed: {type(exc).__name__}: {exc}") from None
    # Local files keep plain absolute paths; everything else keeps its scheme, so a row's uri can be read back.
    local = isinstance(fs, LocalFileSystem)
    images = sorted(p if local else fs.unstrip_protocol(p) for p in paths if _has_extension(p, extensions))
    if not images:
        raise StorageError(f"input {uri} holds no image files with extensions {', '.join(extensions)}")
    return images


def read_many(uris: list[str]) -> list[bytes | Exception]:
    """Reads whole files, concurrently where the filesystem can (s3fs, gcsfs), keeping failures per file.

    Returns:
        For each URI in order, its bytes or the exception that reading it raised.
    """
    by_fs: dict[int, tuple[fsspec.AbstractFileSystem, list[tuple[int, str]]]] = {}
    for i, uri in enumerate(uris):
        fs, path = url_to_fs(uri)
        by_fs.setdefault(id(fs), (fs, []))[1].append((i, path))
    results: list[bytes | Exception] = [None] * len(uris)  # type: ignore[list-item]
    for fs, items in by_fs.values():
        contents = fs.cat([path for _, path in items], on_error="return")
        for i, path in items:
            results[i] = contents.get(path, FileNotFoundError(path))
    return results
