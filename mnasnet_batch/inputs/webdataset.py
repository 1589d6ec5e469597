"""WebDataset tar shards: each read front to back by one task, recorded once read to its end."""

from __future__ import annotations

import hashlib
import logging
import posixpath
import re
import tarfile
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from mnasnet_batch.inputs.layout import READ_BATCH_BYTES, SHOWN_MEMBERS, Layout, encoded_batch
from mnasnet_batch.reads import READ_CHUNK, OverByteLimit
from mnasnet_batch.storage import Storage, has_extension

log = logging.getLogger(__name__)

SHARD_EXTENSIONS = ("tar", "tar.gz", "tgz")

# WebDataset's sample key: the member's directory plus its base name up to the first dot.
_SAMPLE_KEY = re.compile(r"^((?:.*/|)[^./]+)\.[^/]*$")

# Where a run records the inputs (WebDataset shards) it read to their end, in its folder: one empty file each,
# named ``<sha256 of the input's URI, 32 hex digits>.<images it holds>``, so planning lists them and reads none.
FINISHED_INPUTS = "_inputs"

class WebDatasetLayout(Layout):
    """WebDataset tar shards, each read front to back by one task."""

    name = "webdataset"
    noun = "tar shards"
    kind = "tar shards"
    file_extensions = SHARD_EXTENSIONS

    def read(
        self, batch: dict[str, np.ndarray], batch_size: int, run_uri: str | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Reads each shard of the block front to back; once all its samples are handed on, records the shard as
        read to its end in ``run_uri``, with its sample count (``record_finished``)."""
        for shard in batch["uri"]:
            uris: list[str] = []
            contents: list[bytes | Exception] = []
            images = held = 0
            for uri, content in shard_images(str(shard), self.image_extensions, self.storage):
                uris.append(uri)
                contents.append(content)
                images += 1
                held += len(content) if isinstance(content, bytes) else 0
                if len(uris) == batch_size or held >= READ_BATCH_BYTES:
                    yield encoded_batch(uris, contents)
                    uris, contents, held = [], [], 0
            if uris:
                yield encoded_batch(uris, contents)
            if run_uri is not None:
                record_finished(run_uri, str(shard), images, self.storage)

    def recorded_images(self, uris: pa.Array, done_uri: str) -> pa.Array:
        """The sample counts the runs under ``done_uri`` recorded for the shards they read to their end."""
        return recorded_images(uris, done_uri, self.storage)

    def read_rows(self, input_uri: str, uris: Sequence[str]) -> dict[str, bytes | Exception]:
        """The images of the samples ``uris`` (``SHARD#MEMBER``), reading the shard front to back once
        (``shard_images``), up to the last of them.

        A sample the shard no longer holds is a ``FileNotFoundError``; where reading the shard stops, every sample
        not found by then gets the error that stopped it.
        """
        wanted = set(uris)
        found: dict[str, bytes | Exception] = {}
        last: bytes | Exception = b""
        for uri, last in shard_images(input_uri, self.image_extensions, self.storage):
            if uri in wanted:
                found[uri] = last
                if len(found) == len(wanted):
                    break  # the rest of the shard is not read
        # A shard that could not be read to its end yields that error last; a sample's own errors (no image
        # member, over the byte limit) are ValueErrors.
        stopped = isinstance(last, Exception) and not isinstance(last, ValueError)
        missing = last if stopped else FileNotFoundError(f"shard {input_uri} no longer holds this sample")
        return {uri: found.get(uri, missing) for uri in uris}

def sample_key(member: str) -> str | None:
    """The WebDataset sample key of a tar member (``a/img_01.seg.png`` -> ``a/img_01``), None without one."""
    match = _SAMPLE_KEY.match(member)
    return match.group(1) if match else None


def shard_images(shard: str, extensions: tuple[str, ...], storage: Storage) -> Iterator[tuple[str, bytes | Exception]]:
    """Streams a WebDataset shard, yielding each sample's image as ``(shard#member, bytes)``.

    A sample (consecutive members sharing a key) yields its first member with an image extension; a sample
    without one yields ``(shard#key, ValueError)``. Image members this convention drops (a sample's second
    image, as ``photo.2025.jpg`` after ``photo.2024.jpg``, both of key ``photo``; a name without a key, as
    ``.hidden.jpg``) are counted and logged, once per shard. An image member over ``storage.max_image_bytes``
    yields ``OverByteLimit``: it is read through, never held. When the shard cannot be read to its end (truncated,
    corrupt, or unreachable), the samples before that point are yielded as usual and one last item,
    ``(shard#member-being-read, error)`` or ``(shard, error)`` when no member was being read, says where
    reading stopped; what follows in the shard is unknown.

    Ray Data's ``read_webdataset`` is not used: its tar iterator raises on a truncated or corrupt shard,
    failing the whole read task (so every sample of the shard, not only the unreadable ones, would be lost or
    the job would stop), raises on a repeated key, and keeps only each member's extension, not its name.

    Over 60 lines: one pass over the tar stream, whose state (the sample being read, its image, the member being
    read) the loop and the path for a shard that stops short share; a third of them this docstring.
    """
    key: str | None = None
    image: tuple[str, bytes | Exception] | None = None
    limit = storage.config.max_image_bytes
    members: list[str] = []
    reading: str | None = None
    dropped: list[str] = []  # image members that are not labeled

    def finish() -> tuple[str, bytes | Exception]:
        if image is None:
            found = ", ".join(posixpath.basename(m) for m in members)
            return f"{shard}#{key}", ValueError(f"sample {key} has no image member (members: {found})")
        return f"{shard}#{image[0]}", image[1]

    try:
        fs, path = storage.filesystem(shard)
        # Stream mode ("r|*") reads the shard front to back once, gzip or not, without seeking.
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                member_key = sample_key(info.name)
                if member_key is None:
                    if has_extension(info.name, extensions):
                        dropped.append(info.name)
                    continue
                if member_key != key:
                    if key is not None:
                        yield finish()
                    key, image, members = member_key, None, []
                members.append(info.name)
                reading = info.name
                # Every member is read, not skipped: skipping a truncated member goes unnoticed in stream mode.
                # Only the sample's image is kept, if it is within the byte limit; the others are read and let go.
                wanted = image is None and has_extension(info.name, extensions)
                content = _read_member(tar.extractfile(info), info.size, limit if wanted else -1)
                if wanted:
                    image = (info.name, content)
                elif has_extension(info.name, extensions):
                    dropped.append(info.name)
                reading = None
            # Stream mode ends quietly where a header is cut short or missing; only a whole block of zeros
            # (tar's end-of-archive marker, which every tar writer emits) ends a shard that is complete.
            if tar.fileobj.tell() - tar.offset != tarfile.BLOCKSIZE:
                raise tarfile.ReadError("unexpected end of data (no end-of-archive marker)")
    except Exception as exc:
        where = f" inside member {reading}" if reading else f" after member {members[-1]}" if members else ""
        log.warning("shard %s cannot be read%s: %s: %s", shard, where, type(exc).__name__, exc)
        error = _with_context(exc, f"shard cannot be read{where}: {exc}")
        if key is not None and image is not None:
            yield finish()  # the sample's image is whole; only what follows it is lost
        yield _stopped_at(shard, key, reading, image is not None), error
        _log_dropped(shard, dropped)
        return
    if key is not None:
        yield finish()
    _log_dropped(shard, dropped)


def _read_member(member, size: int, limit: int) -> bytes | OverByteLimit | None:
    """A tar member read to its end: its bytes when it is kept (``limit`` >= 0) and within ``limit``; else read
    through and let go, ``OverByteLimit`` when it was to be kept."""
    if 0 <= limit and size <= limit:
        return member.read()
    while member.read(READ_CHUNK):
        pass
    return OverByteLimit(limit, size) if limit >= 0 else None


def _stopped_at(shard: str, key: str | None, reading: str | None, image_read: bool) -> str:
    """The uri of the item that says where reading a shard stopped: the member being read, else the sample whose
    image was not read yet, else the shard itself."""
    if key is None:
        return shard
    if image_read:
        return f"{shard}#{reading}" if reading else shard
    return f"{shard}#{reading or key}"


def _log_dropped(shard: str, dropped: list[str]) -> None:
    if dropped:
        log.warning(
            "shard %s: %d image members not labeled (%s%s): a WebDataset sample is the consecutive members "
            "sharing a key (the name up to its first dot), and only its first image is labeled",
            shard,
            len(dropped),
            ", ".join(dropped[:SHOWN_MEMBERS]),
            ", ..." if len(dropped) > SHOWN_MEMBERS else "",
        )


def _with_context(exc: Exception, message: str) -> Exception:
    """The same exception type with ``message`` (so error kinds stay ``ReadError`` etc.), or ``exc`` itself."""
    try:
        return type(exc)(message)
    except Exception:
        return exc


def _finished_name(input_uri: str) -> str:
    return hashlib.sha256(input_uri.encode()).hexdigest()[:32]


def record_finished(run_uri: str, input_uri: str, images: int, storage: Storage) -> None:
    """Records in the run's folder that ``input_uri`` was read to its end and holds ``images`` images."""
    fs, root = storage.filesystem(run_uri)
    folder = f"{root.rstrip('/')}/{FINISHED_INPUTS}"
    fs.makedirs(folder, exist_ok=True)
    fs.pipe_file(f"{folder}/{_finished_name(input_uri)}.{images}", b"")


def recorded_images(uris: pa.Array, done_uri: str, storage: Storage) -> pa.Array:
    """For each of ``uris``, the image count a run under ``done_uri`` recorded (``record_finished``), else null.

    One recursive listing of ``done_uri`` (a run's folder, or the output's for every run), no reads.
    """
    if not done_uri:
        return pa.nulls(len(uris), pa.int64())
    fs, root = storage.filesystem(done_uri)
    found = fs.find(root) if fs.exists(root) else []
    counts: dict[str, int] = {}
    for path in found:
        folder, name = posixpath.split(path)
        digest, _, images = name.partition(".")
        if posixpath.basename(folder) == FINISHED_INPUTS and images.isdigit():
            counts[digest] = int(images)
    return pa.array([counts.get(_finished_name(u)) for u in uris.to_pylist()], pa.int64())
