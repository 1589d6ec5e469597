"""Reading one image within its byte limit: a local file (regular files only), object ranges, HTTP with retries;
and the errors such a read raises, which become the image's error row. ``storage.Storage`` reads through these."""

from __future__ import annotations

import asyncio
import io
import os
import stat

import fsspec

from mnasnet_batch.config import StorageConfig

HTTP_SCHEMES = ("http", "https")
# Bytes taken at a time where an image's size is not known before reading it (an HTTP answer without a length, a
# file that grew): what is held beyond the image itself while it is checked against storage.max_image_bytes.
READ_CHUNK = 2**20
# HTTP statuses that a later attempt may not get: a timeout or throttling (408, 429), a server or its proxy
# failing or restarting (5xx).
TRANSIENT_STATUSES = frozenset({408, 429, *range(500, 600)})
# The first retry of a transient HTTP failure waits this long, each next one twice as long as the one before.
RETRY_WAIT_S = 0.5
# What each kind of file that is not a regular one is called, in the listing's log and in error rows (stat's file
# type bits).
SPECIAL_FILES = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


class OverByteLimit(ValueError):
    """An image larger than ``storage.max_image_bytes``: refused from its size, or once more bytes came."""

    def __init__(self, limit: int, size: int | None = None):
        found = f"{size} bytes" if size is not None else f"more than {limit} bytes"
        super().__init__(f"over the byte limit ({found} > storage.max_image_bytes={limit})")


class NotARegularFile(OSError):
    """A path that names a FIFO, a device, a socket or a directory, which is not opened: opening a FIFO waits for a
    writer, and a device such as ``/dev/zero`` never ends."""


class HTTPError(OSError):
    """An HTTP answer that is not a success (other than 404, which is ``FileNotFoundError`` as for files)."""


def is_http(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is fsspec's HTTP filesystem (told by its protocols, without importing it and aiohttp)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return any(p in HTTP_SCHEMES for p in protocols)


def returned(read, *args) -> bytes | Exception:
    """What ``read(*args)`` returned, or the exception it raised."""
    try:
        return read(*args)
    except Exception as exc:
        return exc


class _Bounded:
    """An image's bytes as they come, refused past ``limit``, held once: ``BytesIO`` hands over the buffer it
    wrote them to, where joining the chunks would hold them twice."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.buffer = io.BytesIO()
        self.size = 0

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.limit is not None and self.size > self.limit:
            raise OverByteLimit(self.limit)
        self.buffer.write(chunk)

    def wanted(self) -> int:
        """How many bytes to ask for next: a chunk, or one more than the limit allows."""
        return READ_CHUNK if self.limit is None else min(READ_CHUNK, self.limit + 1 - self.size)

    def value(self) -> bytes:
        return self.buffer.getvalue()


def read_local(path: str, limit: int) -> bytes:
    """A local image's bytes, refused without opening it if it is not a regular file or is over ``limit`` bytes."""
    status = os.stat(path)  # through symlinks: a link to /dev/zero is the device
    if not stat.S_ISREG(status.st_mode):
        kind = SPECIAL_FILES.get(stat.S_IFMT(status.st_mode), "of another kind")
        raise NotARegularFile(f"{path} is {kind}, not a regular file; not read")
    if status.st_size > limit:
        raise OverByteLimit(limit, status.st_size)
    # O_NONBLOCK: should the path have become a FIFO since the stat, opening it does not wait for a writer.
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
        data = f.read(status.st_size + 1)  # one buffer of the size stat'ed; one byte more shows that it grew
        if len(data) <= status.st_size:
            return data
        body = _Bounded(limit)
        body.add(data)
        while chunk := f.read(body.wanted()):
            body.add(chunk)
        return body.value()


def read_ranged(fs: fsspec.AbstractFileSystem, paths: list[str], limit: int) -> list[bytes | Exception]:
    """Objects' bytes, each read with a range of ``limit + 1`` bytes (one request, no size asked first), those
    that fill it refused."""
    contents = fs.cat_ranges(paths, [0] * len(paths), [limit + 1] * len(paths), on_error="return")
    for i, (path, content) in enumerate(zip(paths, contents, strict=True)):
        if isinstance(content, Exception) and not isinstance(content, (FileNotFoundError, PermissionError)):
            # A range of an empty object cannot be satisfied (HTTP 416): an empty object is read as empty.
            if returned(fs.size, path) == 0:
                contents[i] = b""
        elif not isinstance(content, Exception) and len(content) > limit:
            contents[i] = OverByteLimit(limit)
    return contents


async def http_get(fs, url: str, config: StorageConfig, limit: int | None) -> bytes:
    """One URL's body through the HTTP filesystem's session, bounded by ``limit`` bytes when given.

    Connection resets and refusals, 5xx and 429 answers are retried ``storage.http_retries`` times, waiting
    ``RETRY_WAIT_S`` and twice as long each next time. A timeout (``storage.http_timeout_s``, set on the session)
    is not retried: a server silent that long rarely answers the next attempt, and it would hold the batch again.

    Raises:
        FileNotFoundError: 404. HTTPError: another status that is not a success. TimeoutError: no connection, or
        nothing sent, within the timeout; the message names it and the setting. ConnectionError: the connection
        kept failing. OverByteLimit: the body is over ``limit`` bytes.
    """
    import aiohttp

    session = await fs.set_session()
    timeout = f"{config.http_timeout_s:g} s (storage.http_timeout_s={config.http_timeout_s:g})"
    attempt = 1
    while True:
        last = attempt > config.http_retries
        tried = f" after {attempt} attempts (storage.http_retries={config.http_retries})" if attempt > 1 else ""
        try:
            async with session.get(fs.encode_url(url), **fs.kwargs) as response:
                if response.status == 404:
                    raise FileNotFoundError(url)
                transient = response.status in TRANSIENT_STATUSES and not last
                if response.status >= 400 and not transient:
                    raise HTTPError(f"HTTP {response.status} {response.reason}{tried}")
                if not transient:
                    if limit is not None and (response.content_length or 0) > limit:
                        raise OverByteLimit(limit, response.content_length)
                    body = _Bounded(limit)
                    while chunk := await response.content.read(body.wanted()):
                        body.add(chunk)
                    return body.value()
        except aiohttp.ConnectionTimeoutError:
            raise TimeoutError(f"no connection within {timeout}") from None
        except TimeoutError:
            raise TimeoutError(f"the server sent nothing for {timeout}") from None
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
            if last or isinstance(exc, aiohttp.ClientConnectorDNSError):
                raise ConnectionError(f"{type(exc).__name__}: {exc}{tried}") from None
        await asyncio.sleep(RETRY_WAIT_S * 2 ** (attempt - 1))
        attempt += 1
