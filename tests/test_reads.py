"""Reading images without a cluster: HTTP timeouts and retries, the byte limit, files that are not regular files."""

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from mnasnet_batch.config import ConfigError, StorageConfig, load_config, parse_override
from mnasnet_batch.inputs.layout import encoded_batch
from mnasnet_batch.inputs.webdataset import shard_images
from mnasnet_batch.storage import Storage
from tests.support import ImageServer, unblock_fifo_readers

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LIMIT = StorageConfig().max_image_bytes


def within(seconds: float, read):
    """What ``read()`` returns, failing the test (instead of hanging it) when it takes longer than ``seconds``."""
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", read()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the read took more than {seconds} s"
    return result["value"]


def errors(uris, contents) -> dict[str, str]:
    """Each URI's error as its row will say it, "" when it was read."""
    batch = encoded_batch(uris, contents)
    return dict(zip(uris, batch["error"].tolist(), strict=True))


@pytest.fixture
def server(corpus):
    images = {f"/good{i}.jpg": corpus[i].read_bytes() for i in range(3)}
    images |= {"/flaky.jpg": corpus[3].read_bytes(), "/reset.jpg": corpus[4].read_bytes()}
    with ImageServer(images) as running:
        yield running


def test_a_silent_url_costs_its_batch_the_timeout_and_transient_failures_are_retried(server):
    paths = ["/good0.jpg", "/hang.jpg", "/good1.jpg", "/missing.jpg", "/page.jpg", "/flaky.jpg", "/reset.jpg"]
    uris = [server.url(p) for p in paths]
    storage = Storage(StorageConfig(http_timeout_s=1))
    # The batch waits for its silent URL as long as the timeout, not aiohttp's default 300 s (nor forever): the
    # silent URL answers only when the server stops, after the test.
    contents = within(120, lambda: storage.read_many(uris))
    found = errors(uris, contents)
    assert found[server.url("/hang.jpg")] == "TimeoutError: the server sent nothing for 1 s (storage.http_timeout_s=1)"
    assert found[server.url("/missing.jpg")].startswith("FileNotFoundError")
    for path in ("/good0.jpg", "/good1.jpg", "/flaky.jpg", "/reset.jpg"):
        assert contents[paths.index(path)] == server.images[path], path
    assert contents[paths.index("/page.jpg")].startswith(b"<!DOCTYPE html>")  # the decode stage refuses it
    assert server.hits["/flaky.jpg"] == 2 and server.hits["/reset.jpg"] == 2 and server.hits["/hang.jpg"] == 1


def test_a_silent_url_does_not_hold_the_rest_of_its_batch(server, tmp_path):
    from mnasnet_batch.config import InputConfig
    from mnasnet_batch.inputs.files import FilesLayout

    paths = ["/good0.jpg", "/hang.jpg", "/good1.jpg", "/missing.jpg"]
    uris = [server.url(p) for p in paths]
    # A timeout longer than the test's limit: the others' rows come while the silent URL is still awaited.
    layout = FilesLayout(InputConfig(uri=str(tmp_path)), Storage(StorageConfig(http_timeout_s=3600)))
    batches = layout.read({"uri": uris}, batch_size=len(uris))
    first = within(120, lambda: next(batches))
    assert server.hits["/hang.jpg"] == 1 and not server.stopping.is_set()
    assert list(first["uri"]) == [uris[0], uris[2], uris[3]]
    assert list(first["data"][:2]) == [server.images["/good0.jpg"], server.images["/good1.jpg"]]
    server.stopping.set()  # the silent URL now hangs up unanswered: its row is an error, after the others
    [last] = within(120, lambda: list(batches))
    assert list(last["uri"]) == [uris[1]] and last["error"][0]


def test_failures_that_persist_say_how_often_they_were_tried(server):
    storage = Storage(StorageConfig(read_retries=1))
    [error] = errors([server.url("/always503.jpg")], storage.read_many([server.url("/always503.jpg")])).values()
    assert error == (
        "TransientReadError: throttled (HTTP 503), transient, on all 2 tries (storage.read_retries=1): "
        "HTTPError: HTTP 503 Service Unavailable"
    )
    assert server.hits["/always503.jpg"] == 2


def test_http_reads_stop_at_the_byte_limit(server):
    storage = Storage(StorageConfig(max_image_bytes=1000))
    uris = [server.url("/good0.jpg"), server.url("/endless.jpg")]
    found = errors(uris, within(30, lambda: storage.read_many(uris)))
    size = len(server.images["/good0.jpg"])
    assert found == {
        uris[0]: f"OverByteLimit: over the byte limit ({size} bytes > storage.max_image_bytes=1000)",
        uris[1]: "OverByteLimit: over the byte limit (more than 1000 bytes > storage.max_image_bytes=1000)",
    }


def test_cloud_credentials_in_options_are_not_sent_to_http_servers(server):
    storage = Storage(StorageConfig(options={"key": "AKIA1", "secret": "s3cr3t", "http": {"headers": {"X-A": "b"}}}))
    assert storage.read_many([server.url("/good2.jpg")]) == [server.images["/good2.jpg"]]
    assert storage.read_bytes(server.url("/flaky.jpg")) == server.images["/flaky.jpg"]


# Reads, in a process of its own whose memory is capped, the paths given; prints each one's error ("" if read).
READ_SCRIPT = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_DATA, (2**30, 2**30))
from mnasnet_batch.config import load_config, parse_override
from mnasnet_batch.inputs.listing import plan_input
from mnasnet_batch.storage import Storage

config = load_config(overrides=[parse_override(f"input.uri={sys.argv[1]}")])
plan = plan_input(config.input, Storage(config.storage))
[batch] = plan.layout.read({"uri": plan.uris.to_numpy()}, 64)
print(json.dumps(dict(zip(batch["uri"].tolist(), batch["error"].tolist()))))
"""


def test_files_that_are_not_regular_or_too_large_become_error_rows_unread(tmp_path, corpus):
    (tmp_path / "good.jpg").write_bytes(corpus[0].read_bytes())
    with open(tmp_path / "huge.jpg", "wb") as f:
        f.truncate(8 * 2**30)  # sparse: 8 GiB listed, no disk used
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    (tmp_path / "folder.jpg").mkdir()
    names = ["good.jpg", "huge.jpg", "pipe.jpg", "zero.jpg", "folder.jpg", "gone.jpg"]
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    # A separate process: a FIFO opened for reading blocks it, /dev/zero read whole grows it until the memory cap.
    try:
        done = subprocess.run(
            [sys.executable, "-c", READ_SCRIPT, str(tmp_path / "list.txt")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        unblock_fifo_readers(tmp_path / "pipe.jpg")
    assert done.returncode == 0, done.stderr
    found = {Path(uri).name: error for uri, error in json.loads(done.stdout).items()}
    assert found == {
        "good.jpg": "",
        "huge.jpg": f"OverByteLimit: over the byte limit (8589934592 bytes > storage.max_image_bytes={DEFAULT_LIMIT})",
        "pipe.jpg": f"NotARegularFile: {tmp_path}/pipe.jpg is a FIFO, not a regular file; not read",
        "zero.jpg": f"NotARegularFile: {tmp_path}/zero.jpg is a character device, not a regular file; not read",
        "folder.jpg": f"NotARegularFile: {tmp_path}/folder.jpg is a directory, not a regular file; not read",
        "gone.jpg": f"FileNotFoundError: [Errno 2] No such file or directory: '{tmp_path}/gone.jpg'",
    }


def test_a_file_at_the_limit_is_read_and_one_byte_more_is_not(tmp_path):
    (tmp_path / "at.jpg").write_bytes(b"a" * 100)
    (tmp_path / "over.jpg").write_bytes(b"o" * 101)
    storage = Storage(StorageConfig(max_image_bytes=100))
    contents = storage.read_many([str(tmp_path / "at.jpg"), str(tmp_path / "over.jpg")])
    assert contents[0] == b"a" * 100
    assert str(contents[1]) == "over the byte limit (101 bytes > storage.max_image_bytes=100)"


def test_objects_are_read_with_a_range_one_byte_past_the_limit(s3_server):
    storage = Storage(StorageConfig(**s3_server, max_image_bytes=100))
    fs, _ = storage.filesystem("s3://limits")
    fs.mkdir("limits")
    fs.pipe("limits/at.jpg", b"a" * 100)
    fs.pipe("limits/over.jpg", b"o" * 5000)
    fs.pipe("limits/empty.jpg", b"")
    uris = [f"s3://limits/{name}" for name in ("at.jpg", "over.jpg", "empty.jpg", "missing.jpg")]
    contents = storage.read_many(uris)
    assert contents[0] == b"a" * 100 and contents[2] == b""
    assert str(contents[1]) == "over the byte limit (more than 100 bytes > storage.max_image_bytes=100)"
    assert isinstance(contents[3], FileNotFoundError)


def test_a_shard_member_over_the_limit_is_an_error_row_and_the_shard_reads_on(tmp_path):
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for name, size in (("a.jpg", 100), ("a.json", 5000), ("b.jpg", 5000), ("c.jpg", 100)):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(b"x" * size))
    items = list(shard_images(str(shard), ("jpg",), Storage(StorageConfig(max_image_bytes=100))))
    assert [(uri.split("#")[1], item if isinstance(item, bytes) else str(item)) for uri, item in items] == [
        ("a.jpg", b"x" * 100),
        ("b.jpg", "over the byte limit (5000 bytes > storage.max_image_bytes=100)"),
        ("c.jpg", b"x" * 100),
    ]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("storage.max_image_bytes=0", "storage.max_image_bytes: must be at least 1"),
        ("storage.http_timeout_s=0", "storage.http_timeout_s: must be more than 0"),
        ("storage.read_retries=-1", "storage.read_retries: must be 0"),
    ],
)
def test_read_settings_out_of_range_are_refused(setting, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[parse_override(setting)])


def test_a_sample_gives_up_on_a_silent_url_and_keeps_what_came(server):
    # The job's start must not wait on a slow server for the sample it measures decoding on.
    storage = Storage(StorageConfig(http_timeout_s=60))
    uris = [server.url("/good0.jpg"), server.url("/hang.jpg"), server.url("/good1.jpg")]
    # The silent URL would answer after the HTTP timeout (60 s) at the earliest: the sample gave up on it before.
    read = within(50, lambda: [item for wave in storage.read_waves(uris, within_s=1.0) for item in wave])
    assert [i for i, _ in read] == [0, 2] and read[0][1] == server.images["/good0.jpg"]
