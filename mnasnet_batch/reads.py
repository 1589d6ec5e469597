"""Reading one image within its byte limit: a local file (regular files only), an object or a URL with retries of
transient failures; and the errors such a read raises, which become the image's error row."""

from __future__ import annotations

import asyncio
import email.utils
import io
import os
import random
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import fsspec

from mnasnet_batch.config import StorageConfig

HTTP_SCHEMES = ("http", "https")
# Bytes taken at a time where an image's size is not known before reading it (an HTTP answer without a length, a
# file that grew): what is held beyond the image itself while it is checked against storage.max_image_bytes.
READ_CHUNK = 2**20
# HTTP statuses that a later try may not get: a timeout or throttling (408, 429), a server or its proxy failing,
# restarting or throttling (5xx; S3's 503 SlowDown).
TRANSIENT_STATUSES = frozenset({408, 429, *range(500, 600)})
# Error codes of object stores that say "slow down" or "try again" whatever their status (S3 answers a socket it
# waited too long on with 400 RequestTimeout).
TRANSIENT_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
     "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable"}
)
# Exceptions, by class name anywhere in their MRO, of a connection cut or a body cut short: aiohttp's (HTTP, s3fs,
# gcsfs, adlfs), botocore's and azure-core's, named rather than imported so that no cloud package is needed.
CONNECTION_FAILURES = frozenset(
    {"ConnectionResetError", "ConnectionRefusedError", "ConnectionAbortedError", "BrokenPipeError",
     "EndpointConnectionError", "ClientPayloadError", "ServerDisconnectedError", "ClientOSError", "IncompleteRead",
     "HTTPClientError", "ServiceRequestError", "ServiceResponseError", "IncompleteReadError"}
)
# Timeouts, by class name: the built-in one (asyncio's and aiohttp's derive from it), botocore's and requests'.
TIMEOUTS = frozenset({"TimeoutError", "ReadTimeoutError", "ConnectTimeoutError", "ReadTimeout", "ConnectTimeout"})
# A name that does not resolve is a typo or a host gone, not a blip: never retried (aiohttp's, the socket's).
NOT_TRANSIENT = frozenset({"ClientConnectorDNSError", "gaierror"})
# The first retry of a transient failure waits about this long, each next one twice as long (with jitter): 0.5 s,
# 1 s, 2 s ride out a server restarting or throttling for a few seconds.
RETRY_WAIT_S = 0.5
# The longest Retry-After a read waits for: an object store asks for seconds; a server asking for minutes or
# hours is a quota, and its images become error rows (labeled again with retry-errors) rather than hold the task.
MAX_RETRY_AFTER_S = 60.0
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
    """An HTTP answer that is not a success (other than 404, which is ``FileNotFoundError`` as for files); its
    ``status`` and ``headers`` say whether, and when, to try again."""

    def __init__(self, message: str, status: int, headers: dict[str, str]):
        super().__init__(message)
        self.status = status
        self.headers = headers


class TransientReadError(OSError):
    """A read that failed in a way a later try may not (a connection reset, a body cut short, 5xx, throttling, a
    timeout), on its every try: ``storage.read_retries`` retries, or a Retry-After too long to wait for."""


@dataclass(frozen=True)
class Transient:
    """Why a failed read may succeed when tried again, and how long the server asked to wait first."""

    reason: str
    retry_after: float | None = None


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


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from (s3fs raises an ``OSError`` from botocore's ``ClientError``)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def _answer(exc: BaseException) -> tuple[int, str, dict[str, str]] | None:
    """The HTTP status, error code and headers of a server's answer that ``exc`` carries: botocore's
    ``ClientError`` (``response``), aiohttp's and ours (``status``), gcsfs' (``code``), azure-core's
    (``status_code``); None for an exception with no answer."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "ResponseMetadata" in response:  # botocore
        meta = response["ResponseMetadata"]
        code = str(response.get("Error", {}).get("Code", ""))
        return int(meta.get("HTTPStatusCode") or 0), code, dict(meta.get("HTTPHeaders") or {})
    for name in ("status", "status_code", "code"):
        status = getattr(exc, name, None)
        if isinstance(status, int) and 100 <= status < 600:
            headers = getattr(exc, "headers", None) or getattr(response, "headers", None) or {}
            return status, "", {str(k).lower(): str(v) for k, v in dict(headers).items()}
    return None


def _named(exc: BaseException, names: frozenset[str]) -> bool:
    return any(cls.__name__ in names for cls in type(exc).__mro__)


def transient_failure(exc: BaseException, timeouts: bool = True) -> Transient | None:
    """Whether a failed read may succeed when tried again, and why: a transient status or error code in the
    server's answer (5xx, 429, 408, S3's SlowDown), a connection reset or refused, a body cut short, or with
    ``timeouts`` a timeout. A definite answer (403, 404), a name that does not resolve, or anything else: None."""
    for cause in _chain(exc):
        answer = _answer(cause)
        if answer is not None:
            status, code, headers = answer
            if status not in TRANSIENT_STATUSES and code not in TRANSIENT_CODES:
                return None
            throttled = status in (429, 503) or code in ("SlowDown", "Throttling", "ThrottlingException")
            what = f"HTTP {status}{' ' + code if code else ''}"
            reason = f"throttled ({what})" if throttled else what
            return Transient(reason, retry_after_seconds(headers.get("retry-after")))
        if _named(cause, NOT_TRANSIENT):
            return None
        if _named(cause, TIMEOUTS):
            return Transient("timed out") if timeouts else None
        if _named(cause, CONNECTION_FAILURES):
            return Transient("connection failed or cut short")
    return None


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header's wait in seconds: a number of seconds, or an HTTP date (RFC 9110) less ``now``
    (Unix seconds; the clock when None). None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def retry_delay(retry: int, retry_after: float | None, jitter: float) -> float | None:
    """Seconds to wait before retry number ``retry`` (1, 2, ...): ``RETRY_WAIT_S`` doubling each retry, between
    half and all of it by ``jitter`` (0 to 1), so that the reads a throttling server refused together do not come
    back together; at least the server's Retry-After. None when that is over ``MAX_RETRY_AFTER_S``."""
    backoff = RETRY_WAIT_S * 2 ** (retry - 1) * (0.5 + 0.5 * jitter)
    if retry_after is None:
        return backoff
    if retry_after > MAX_RETRY_AFTER_S:
        return None
    return max(backoff, retry_after)


async def retried(read_once: Callable[[], Awaitable[bytes]], config: StorageConfig, timeouts: bool = True) -> bytes:
    """What ``read_once()`` returns, trying it again ``storage.read_retries`` times while it fails transiently
    (``transient_failure``), waiting ``retry_delay`` before each retry; ``timeouts``: whether timeouts count.

    Raises:
        TransientReadError: every try failed transiently; the message says why and how many tries were made.
        Exception: the first failure that is not transient, as it was raised.
    """
    tries = 1
    while True:
        try:
            return await read_once()
        except Exception as exc:
            failure = transient_failure(exc, timeouts)
            if failure is None:
                raise
            wait = retry_delay(tries, failure.retry_after, random.random())
            setting = f"storage.read_retries={config.read_retries}"
            cause = f"{type(exc).__name__}: {exc}"
            if wait is None:
                raise TransientReadError(
                    f"{failure.reason}, transient: the server asked to wait {failure.retry_after:g} s, more than "
                    f"{MAX_RETRY_AFTER_S:g}; not tried again after {tries} tries ({setting}): {cause}"
                ) from None
            if tries > config.read_retries:
                raise TransientReadError(
                    f"{failure.reason}, transient, on all {tries} tries ({setting}): {cause}"
                ) from None
        await asyncio.sleep(wait)
        tries += 1


async def object_get(fs, path: str, config: StorageConfig, limit: int) -> bytes:
    """One object's bytes through an async object store (s3fs, gcsfs, adlfs), read with a range of ``limit + 1``
    bytes (one request, no size asked first) and refused if it fills it; transient failures ``retried``.

    Raises:
        OverByteLimit: the object is over ``limit`` bytes. TransientReadError: it kept failing transiently.
        Exception: what the store raised otherwise (``FileNotFoundError``, ``PermissionError``, ...).
    """
    try:
        content = await retried(lambda: fs._cat_file(path, start=0, end=limit + 1), config)
    except (FileNotFoundError, PermissionError, TransientReadError):
        raise
    except Exception:
        # A range of an empty object cannot be satisfied (HTTP 416): an empty object is read as empty.
        if await retried(lambda: fs._size(path), config) == 0:
            return b""
        raise
    if len(content) > limit:
        raise OverByteLimit(limit)
    return content


async def http_get(fs, url: str, config: StorageConfig, limit: int | None) -> bytes:
    """One URL's body through the HTTP filesystem's session, bounded by ``limit`` bytes when given.

    Connection resets and refusals, 5xx, 429 and 408 answers are ``retried`` (honouring Retry-After). A timeout
    (``storage.http_timeout_s``, set on the session) is not: a web server silent that long rarely answers the next
    try, and the read would hold its task as long again.

    Raises:
        FileNotFoundError: 404. HTTPError: another status that is not a success. TimeoutError: no connection, or
        nothing sent, within the timeout; the message names it and the setting. TransientReadError: the failures
        kept coming. ConnectionError: the name does not resolve. OverByteLimit: the body is over ``limit`` bytes.
    """
    import aiohttp

    session = await fs.set_session()
    timeout = f"{config.http_timeout_s:g} s (storage.http_timeout_s={config.http_timeout_s:g})"

    async def get_once() -> bytes:
        try:
            async with session.get(fs.encode_url(url), **fs.kwargs) as response:
                if response.status == 404:
                    raise FileNotFoundError(url)
                if response.status >= 400:
                    headers = {k.lower(): v for k, v in response.headers.items()}
                    raise HTTPError(f"HTTP {response.status} {response.reason}", response.status, headers)
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
        except aiohttp.ClientConnectorDNSError as exc:
            raise ConnectionError(f"{type(exc).__name__}: {exc}") from None

    return await retried(get_once, config, timeouts=False)
