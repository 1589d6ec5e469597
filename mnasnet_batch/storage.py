"""The storage handle: filesystems for URIs (local, s3, gs, az, memory) from the storage config; listing; reading."""

from __future__ import annotations

import asyncio
import logging
import operator
import os
import posixpath
import stat
import time
from collections.abc import Iterator
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import quote_from_bytes, unquote_to_bytes

import fsspec
from fsspec.asyn import sync
from fsspec.core import split_protocol, url_to_fs
from fsspec.implementations.local import LocalFileSystem

from mnasnet_batch.config import StorageConfig
from mnasnet_batch.reads import (
    HTTP_SCHEMES,
    SPECIAL_FILES,
    http_get,
    is_http,
    read_local,
    read_ranged,
    returned,
)

log = logging.getLogger(__name__)

# The optional extra (pyproject.toml) that brings each cloud scheme's fsspec implementation.
EXTRAS = {
    "s3": ("s3", "s3fs"),
    "s3a": ("s3", "s3fs"),
    "gs": ("gcs", "gcsfs"),
    "gcs": ("gcs", "gcsfs"),
    "az": ("azure", "adlfs"),
    "abfs": ("azure", "adlfs"),
    "abfss": ("azure", "adlfs"),
    "adl": ("azure", "adlfs"),
}
LOCAL_SCHEMES = ("file", "local", "memory")
# Sub-directories (prefixes) listed at once: an object store returns 1,000 keys per request, one request
# after another within a prefix, so millions of keys take many minutes unless prefixes are listed together.
LISTING_THREADS = 16
# Local paths handed on at a time while a folder is listed: what the driver holds of a listing as Python strings.
LISTING_CHUNK = 2**16
GLOB_CHARACTERS = "*?["
# Names of files a listing ignores that a log line shows; the count says how many there are in all.
SHOWN_FILES = 3
# Seconds a batch's finished HTTP reads wait for its slower ones before they are handed on without them: long
# enough that a batch from a healthy server stays whole, short beside storage.http_timeout_s.
STRAGGLER_WAIT_S = 2.0
class StorageError(RuntimeError):
    """Storage that cannot be listed or reached; the message says which URI and why."""


def scheme(uri: str) -> str:
    """The URI's scheme, ``file`` for plain paths."""
    return split_protocol(uri)[0] or "file"


def local_uri(path: str) -> str:
    """A listed local file's URI, as the job writes it: its absolute path, or when the name is not UTF-8, its
    ``file://`` URI.

    A name from an old share, a camera card or a zip may hold bytes that are not UTF-8 (``caf\\xe9.jpg``, Latin-1),
    which Python lists as lone surrogates and an output's strings cannot hold. Such a path is written as
    ``Path.as_uri()`` writes it (RFC 8089: ``file:///photos/caf%E9.jpg``, every byte outside ASCII letters, digits,
    ``/`` and ``_.-~`` percent-encoded), which ``Storage`` reads back as the file's own bytes (``file_uri_path``).
    Every other path stays as it is, ``%`` and all: a plain path is never percent-decoded, and a listed path is
    never written as a ``file://`` URI unless its name is not UTF-8, so the two cannot be confused.
    """
    try:
        path.encode()
    except UnicodeEncodeError:
        return "file://" + quote_from_bytes(os.fsencode(path))
    return path


def file_uri_path(uri: str) -> str:
    """The local path a ``file://`` URI names, percent-decoded to the name's bytes (RFC 8089), so that a name that
    is not UTF-8 (``local_uri``) is the file's own name again (with surrogates, as Python's ``os`` takes it)."""
    return os.fsdecode(unquote_to_bytes(uri[len("file://") :]))


def absolute_location(uri: str) -> str:
    """A local path made absolute and normalised (``./photos``, ``photos/`` and ``/abs/photos`` are one input); a
    URI with a scheme without trailing slashes (``s3://b/photos/`` is ``s3://b/photos``)."""
    protocol, path = split_protocol(uri)
    if protocol is None:
        return os.path.abspath(os.path.expanduser(uri))
    return f"{protocol}://{path.rstrip('/')}" if path.rstrip("/") else uri


def fsspec_options(protocol: str, config: StorageConfig) -> dict[str, object]:
    """The keyword arguments of the fsspec filesystem for ``protocol`` that the storage config asks for.

    Credentials not given here come from each library's standard chain (``AWS_*`` variables and profiles,
    ``GOOGLE_APPLICATION_CREDENTIALS``, ``AZURE_STORAGE_*``), read where the filesystem is created.
    """
    if protocol in LOCAL_SCHEMES:
        return {}
    options: dict[str, object] = {}
    if protocol in HTTP_SCHEMES:
        # Only options under "http" / "https" apply: the cloud filesystems' (key, secret, requester_pays) would be
        # sent with every request, which aiohttp refuses.
        import aiohttp

        timeout = config.http_timeout_s
        # No total: an image still coming is not cut off; a server silent for the timeout is.
        options["client_kwargs"] = {
            "timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        }
        return _merged(options, config.options.get(protocol) or {})
    family = EXTRAS.get(protocol, ("", ""))[0]
    if family == "s3":
        if config.endpoint_url:
            options["endpoint_url"] = config.endpoint_url
        if config.anonymous:
            options["anon"] = True
        if config.region:
            options["client_kwargs"] = {"region_name": config.region}
    elif family == "gcs":
        if config.endpoint_url:
            options["endpoint_url"] = config.endpoint_url
        if config.anonymous:
            options["token"] = "anon"
    elif family == "azure":
        if config.anonymous:
            options["anon"] = True
        if config.endpoint_url:
            options["account_host"] = config.endpoint_url.split("://", 1)[-1].rstrip("/")
    schemes = set(EXTRAS) | set(LOCAL_SCHEMES) | set(HTTP_SCHEMES)
    extra = {k: v for k, v in config.options.items() if k not in schemes}
    extra.update(config.options.get(protocol) or {})
    return _merged(options, extra)


def _merged(options: dict[str, object], extra: dict[str, object]) -> dict[str, object]:
    """``options`` with the user's ``extra`` options over them, mappings merged key by key."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(options.get(key), dict):
            options[key] = {**options[key], **value}  # e.g. client_kwargs: region plus the user's own
        else:
            options[key] = value
    return options


@dataclass(frozen=True)
class Storage:
    """The handle every read and write of the job goes through: inputs, weights, outputs, records and reports.

    Built once from the job's ``storage`` section; it holds only that configuration, so it pickles into Ray tasks
    and actors, and every filesystem it opens has the same endpoint, region and credentials.
    """

    config: StorageConfig = field(default_factory=StorageConfig)

    def filesystem(self, uri: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem for ``uri`` and the path inside it.

        A ``file://`` URI is percent-decoded to the name's bytes (RFC 8089; what ``Path.as_uri()`` and ``local_uri``
        write); plain paths are taken as they are.

        Raises:
            StorageError: the scheme's package is not installed (the message names the extra to install).
        """
        uri = os.fspath(uri)  # a pathlib.Path from a caller is a local path
        protocol = scheme(uri)
        if uri.startswith("file://"):
            uri = "file://" + file_uri_path(uri)
        try:
            return url_to_fs(uri, **fsspec_options(protocol, self.config))
        except ImportError as exc:
            if protocol in EXTRAS:
                extra, package = EXTRAS[protocol]
                raise StorageError(
                    f"{uri}: {protocol}:// needs the optional package {package}; "
                    f"install it with: pip install 'mnasnet-batch[{extra}]'"
                ) from None
            raise StorageError(f"{uri}: {exc}") from None
        except ValueError as exc:
            if "Protocol not known" in str(exc):
                raise StorageError(f"{uri}: unknown URI scheme {protocol}://") from None
            raise

    def pyarrow_filesystem(self, uri: str):
        """A pyarrow filesystem and path for ``uri`` (what Ray Data's readers and ``pyarrow.dataset`` take).

        Local paths get pyarrow's own LocalFileSystem; every other scheme wraps the configured fsspec filesystem,
        so endpoints and credentials are the same for reading and writing.

        Returns:
            ``(pyarrow.fs.FileSystem, path)``.
        """
        import pyarrow.fs as pafs

        fs, path = self.filesystem(uri)
        if isinstance(fs, LocalFileSystem):
            return pafs.LocalFileSystem(), path
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path

    def list_files(self, uri: str) -> tuple[Iterator[list[str]], bool]:
        """Lists the files under a directory or prefix (recursively), matching a glob, or the single file named.

        ``uri`` is a glob only when nothing exists under its literal name and it holds ``*``, ``?`` or ``[``:
        ``shots [2024]/`` is a folder when it exists. One recursive listing call per location (a flat
        ``ListObjectsV2`` walk on S3), no per-file requests; local symlinks to folders are followed. Local files
        that are not regular files (FIFOs, devices, sockets, symlinks to them) are never read: they are left out,
        counted and named in the log.

        Returns:
            Full URIs (absolute paths for local files, ``local_uri``) in chunks as they are found, in no particular
            order (the driver need not hold a listing of millions of files as Python strings), and whether ``uri``
            named a single file.

        Raises:
            StorageError: the location does not exist, is a single file that is not a regular file, or cannot be
                reached (also while the chunks are taken).
        """
        try:
            fs, path = self.filesystem(uri)
            local = isinstance(fs, LocalFileSystem)
            if fs.isfile(path):
                single, found = True, iter([[path]])
            elif fs.isdir(path):
                single, found = False, _find(fs, path)
            elif local and (kind := special_kind(path)):
                raise StorageError(f"input {uri} is not a regular file ({kind}): only regular files are read")
            elif any(c in path for c in GLOB_CHARACTERS):
                single, found = False, iter([_globbed(fs, path)])
            else:
                raise StorageError(f"input {uri} does not exist")
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(f"input {uri} cannot be listed: {type(exc).__name__}: {exc}") from None
        return _full_uris(uri, fs, found), single

    def read_bytes(self, uri: str) -> bytes:
        """One whole file's bytes (weights, ground truth: no byte limit); HTTP(S) with the timeout and retries of
        ``read_many``. Raises what resolving, opening or reading it raised."""
        fs, path = self.filesystem(uri)
        if is_http(fs):
            return sync(fs.loop, http_get, fs, path, self.config, None)
        return fs.cat_file(path)

    def read_many(self, uris: list[str]) -> list[bytes | Exception]:
        """Reads images whole, concurrently where the filesystem can (HTTP, s3fs, gcsfs), keeping failures per image.

        URIs may mix schemes and buckets (a manifest's may); a URI that cannot even be resolved to a
        filesystem gets its exception like one that does not exist. Each URI names one file literally:
        ``br[1].jpg`` is read, not expanded as a glob (which fsspec's ``cat`` of a list does).

        No image is held beyond ``storage.max_image_bytes``, and each is held once: a local file's size is
        stat'ed first, and a FIFO, device, socket or directory is never opened; an object is read with a range
        of one byte more than the limit; an HTTP answer's length is checked, then its body counted as it comes.
        An HTTP read waits at most ``storage.http_timeout_s`` for each piece, and retries transient failures.

        Returns:
            For each URI in order, its bytes or the exception that reading it raised (``OverByteLimit``,
            ``NotARegularFile``, ``TimeoutError``, ``FileNotFoundError``, ...).
        """
        results: list[bytes | Exception] = [None] * len(uris)  # type: ignore[list-item]
        for wave in self.read_waves(uris):
            for i, content in wave:
                results[i] = content
        return results

    def read_waves(
        self, uris: list[str], within_s: float | None = None
    ) -> Iterator[list[tuple[int, bytes | Exception]]]:
        """``read_many`` in waves, so that a slow read does not hold the others: each wave is ``(index in uris,
        bytes or exception)`` of the reads done by then. HTTP reads come in a wave whenever ``STRAGGLER_WAIT_S``
        passed with some of them still going; every other read, and a batch of HTTP reads done at once, in one.

        ``within_s``: HTTP reads still going after this many seconds are cancelled and left out (a sample of the
        input, which must not wait on a slow server); None: every read ends in its own time.
        """
        by_fs: dict[int, tuple[fsspec.AbstractFileSystem, list[tuple[int, str]]]] = {}
        unresolved = []
        for i, uri in enumerate(uris):
            try:
                fs, path = self.filesystem(uri)
            except Exception as exc:
                unresolved.append((i, exc))
                continue
            by_fs.setdefault(id(fs), (fs, []))[1].append((i, path))
        limit = self.config.max_image_bytes
        ready: list[tuple[int, bytes | Exception]] = unresolved
        http = []
        for fs, items in by_fs.values():
            if is_http(fs):
                http += [(i, asyncio.run_coroutine_threadsafe(http_get(fs, path, self.config, limit), fs.loop))
                         for i, path in items]
                continue
            paths = [path for _, path in items]
            try:
                if isinstance(fs, LocalFileSystem):
                    contents = [returned(read_local, path, limit) for path in paths]
                else:
                    contents = read_ranged(fs, paths, limit)
            except Exception as exc:
                contents = [exc] * len(items)
            ready += [(i, content) for (i, _), content in zip(items, contents, strict=True)]
        yield from _in_waves(ready, dict(http), within_s)


def _in_waves(
    ready: list[tuple[int, bytes | Exception]], pending: dict[int, futures.Future], within_s: float | None
) -> Iterator[list[tuple[int, bytes | Exception]]]:
    """``Storage.read_waves``' waves: the reads ``ready``, then those of ``pending`` as they end, one wave each time
    ``STRAGGLER_WAIT_S`` passes with some still going; after ``within_s`` (None: never) the rest are cancelled."""
    deadline = None if within_s is None else time.monotonic() + within_s
    while pending:
        wait = STRAGGLER_WAIT_S if deadline is None else min(STRAGGLER_WAIT_S, deadline - time.monotonic())
        futures.wait(pending.values(), timeout=max(0.0, wait))
        for i, future in list(pending.items()):
            if future.done():
                ready.append((i, future.exception() or future.result()))
                del pending[i]
        if deadline is not None and time.monotonic() >= deadline:
            for future in pending.values():
                future.cancel()  # cancels the request on fsspec's event loop
            break
        if ready and pending:
            yield sorted(ready, key=operator.itemgetter(0))
            ready = []
    if ready:
        yield sorted(ready, key=operator.itemgetter(0))  # in the batch's order


def has_extension(path: str, extensions: tuple[str, ...]) -> bool:
    """Whether ``path`` ends in one of ``extensions`` (lower case, no dot; ``tar.gz`` works), ignoring case."""
    name = posixpath.basename(path).lower()
    return any(name.endswith("." + e) for e in extensions)


def _full_uris(uri: str, fs: fsspec.AbstractFileSystem, found: Iterator[list[str]]) -> Iterator[list[str]]:
    """The chunks of paths ``found`` under ``uri``, as URIs that can be read back: local files keep plain absolute
    paths, everything else its scheme."""
    local = isinstance(fs, LocalFileSystem)
    try:
        for paths in found:
            yield _local_uris(paths) if local else [fs.unstrip_protocol(p) for p in paths]
    except Exception as exc:
        raise StorageError(f"input {uri} cannot be listed: {type(exc).__name__}: {exc}") from None


def _local_uris(paths: list[str]) -> list[str]:
    """Local paths as URIs (``local_uri``): the same list when every name is UTF-8, as nearly all are."""
    try:
        "".join(paths).encode()
    except UnicodeEncodeError:
        return [local_uri(p) for p in paths]
    return paths


def _globbed(fs: fsspec.AbstractFileSystem, pattern: str) -> list[str]:
    """The files a glob matches. Locally, as in a folder's listing (``_find_local``): symlinks to files are
    followed, broken ones listed, and files that are not regular files left out and logged."""
    matched = fs.glob(pattern, detail=True)
    if not isinstance(fs, LocalFileSystem):
        return [p for p, info in matched.items() if info["type"] != "directory"]
    files: list[str] = []
    special: list[str] = []
    for path in matched:  # fsspec's types do not follow symlinks: a link to a file is "other", as a FIFO is
        if os.path.isfile(path) or (os.path.islink(path) and not os.path.exists(path)):
            files.append(path)
        elif kind := special_kind(path):
            special.append(f"{path} ({kind})")
    _log_special(pattern, len(special), special[:SHOWN_FILES])
    return files


def special_kind(path: str) -> str:
    """Why a local path is not a file to read, when it exists but is neither a regular file nor a folder: ``a FIFO``,
    ``a symlink to /dev/zero, a character device``; else "" (a missing path or a broken symlink is not special)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return ""
    kind = SPECIAL_FILES.get(stat.S_IFMT(mode), "a special file")
    return f"a symlink to {os.path.realpath(path)}, {kind}" if os.path.islink(path) else kind


def _log_special(where: str, count: int, shown: list[str]) -> None:
    """Says that ``count`` files listed in ``where`` are left out as not regular files; ``shown``: the first few,
    each as ``name (what it is)``."""
    if count:
        log.warning(
            "input %s: ignoring %d other files (not regular files, never read): %s%s",
            where,
            count,
            ", ".join(shown),
            ", ..." if count > len(shown) else "",
        )


def _find(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[list[str]]:
    """Every file under ``path`` in chunks, listing its top-level sub-directories (prefixes) concurrently."""
    if isinstance(fs, LocalFileSystem):
        yield from _find_local(path)
        return
    entries = fs.ls(path, detail=True)
    directories = [e["name"] for e in entries if e["type"] == "directory"]
    if len(directories) < 2:
        yield fs.find(path)
        return
    yield [e["name"] for e in entries if e["type"] != "directory"]
    with ThreadPoolExecutor(min(LISTING_THREADS, len(directories))) as pool:
        yield from pool.map(fs.find, directories)


def _find_local(root: str) -> Iterator[list[str]]:
    """Every file under a local folder in chunks of up to ``LISTING_CHUNK``, following symlinks to files and
    folders (fsspec's ``find`` does not).

    A symlinked folder is listed under the link's path. One that leads back to a folder it is inside (a loop)
    is skipped with a warning; a broken symlink is listed, so that it becomes an error row like a missing file.
    FIFOs, sockets and devices (and symlinks to them) are not files to read: reading a FIFO waits for a writer,
    ``/dev/zero`` never ends. They are left out, counted and named in one warning.
    """
    files: list[str] = []
    special = 0
    shown: list[str] = []  # the first few special files and what each is, for the warning
    # (folder, real paths of it and the folders above it)
    pending = [(root, frozenset({os.path.realpath(root)}))]
    while pending:
        folder, ancestors = pending.pop()
        try:
            entries = os.scandir(folder)
        except OSError as exc:
            log.warning("folder %s cannot be listed: %s: %s", folder, type(exc).__name__, exc)
            continue
        with entries:  # one folder may hold millions of files: its entries are taken as they come
            for entry in entries:
                try:
                    is_dir = entry.is_dir()
                except OSError:  # a symlink through a file (x.jpg -> file.jpg/gone): broken, listed below
                    is_dir = False
                if is_dir:
                    real = os.path.realpath(entry.path)
                    if real in ancestors:
                        log.warning("not following %s: a symlink loop back to %s", entry.path, real)
                        continue
                    pending.append((entry.path, ancestors | {real}))
                elif _is_file(entry) or (entry.is_symlink() and not os.path.exists(entry.path)):
                    files.append(entry.path)
                    if len(files) == LISTING_CHUNK:
                        yield files
                        files = []
                else:
                    special += 1
                    if len(shown) < SHOWN_FILES:
                        kind = special_kind(entry.path) or "not a regular file"
                        shown.append(f"{os.path.relpath(entry.path, root)} ({kind})")
    if files:
        yield files
    _log_special(root, special, shown)


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False
