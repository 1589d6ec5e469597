"""Cloud faults on a real S3 API (moto) and an HTTP server, behind a fault-injecting proxy on 127.0.0.1: transient
failures retried before they become rows, throttling backing off per read (Retry-After honoured), a slow object not
holding its batch; and the retry decisions themselves, without a server."""

import asyncio
import threading

import aiohttp
import pytest
from botocore.exceptions import ClientError, ReadTimeoutError

from mnasnet_batch.cli import main
from mnasnet_batch.config import StorageConfig
from mnasnet_batch.inputs.layout import encoded_batch
from mnasnet_batch.reads import (
    MAX_RETRY_AFTER_S,
    RETRY_WAIT_S,
    Transient,
    retry_after_seconds,
    retry_delay,
    transient_failure,
)
from mnasnet_batch.storage import Storage
from tests.faultproxy import FaultProxy, every_try, first_try, share_of_gets
from tests.support import ImageServer, rows_by_uri

BUCKET = "faults"
# Which GETs are reset is fixed by the seed (faultproxy.share_of_gets), whatever order they come in. A read that 30 %
# of tries fail fails 4 in a row (storage.read_retries=3) once in 120; with seed 14 none of these 24 objects is
# reset 4 times in a row within its first 12 tries (the job's sample reads some of them first), and one is reset on
# its first 3 tries, read on its last.
RESET_SEED = 14
CREDENTIALS = {"key": "testing", "secret": "s3cr3t-not-for-logs"}


def within(seconds: float, work):
    """What ``work()`` returns, failing the test (instead of hanging it) when it takes longer than ``seconds``."""
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", work()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"took more than {seconds} s"
    return result["value"]


@pytest.fixture(scope="module")
def objects(s3_server, corpus):
    """The corpus's 24 images in bucket ``faults``, written straight to moto; their URIs and bytes."""
    fs, _ = Storage(StorageConfig(**s3_server)).filesystem(f"s3://{BUCKET}")
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    images = {}
    for path in corpus:
        fs.pipe(f"{BUCKET}/images/{path.name}", path.read_bytes())
        images[f"s3://{BUCKET}/images/{path.name}"] = path.read_bytes()
    return images


def through(proxy: FaultProxy, **settings) -> Storage:
    """The storage handle that reaches moto through ``proxy``."""
    return Storage(StorageConfig(endpoint_url=proxy.url, options=CREDENTIALS, **settings))


def errors(uris, contents) -> dict[str, str]:
    """Each URI's error as its row says it, "" when it was read."""
    return dict(zip(uris, encoded_batch(uris, contents)["error"].tolist(), strict=True))


def test_resets_mid_body_on_30_percent_of_gets_are_retried_until_every_object_is_read(s3_server, objects):
    uris = list(objects)
    with FaultProxy(s3_server["endpoint_url"], share_of_gets("reset", 0.3, RESET_SEED)) as proxy:
        contents = within(120, lambda: through(proxy).read_many(uris))
    assert errors(uris, contents) == dict.fromkeys(uris, "")
    assert contents == list(objects.values())
    gets = sum(proxy.gets.values())
    assert 0.15 < proxy.faults["reset"] / gets < 0.45, (proxy.faults, gets)
    assert max(proxy.gets.values()) == 4  # an object reset on 3 tries in a row, read on the 4th


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("503", "throttled (HTTP 503 SlowDown)"), ("reset", "connection failed or cut short")],
)
def test_an_object_failing_every_try_is_an_error_row_saying_transient_and_how_many_tries(
    s3_server, objects, kind, reason
):
    uris = list(objects)[:4]
    failing = uris[1].rsplit("/", 1)[-1]
    with FaultProxy(s3_server["endpoint_url"], every_try(kind, {failing})) as proxy:
        contents = within(120, lambda: through(proxy, read_retries=2).read_many(uris))
    found = errors(uris, contents)
    tries = "transient, on all 3 tries (storage.read_retries=2)"
    assert found[uris[1]].startswith(f"TransientReadError: {reason}, {tries}")
    assert [found[u] for u in uris if u != uris[1]] == ["", "", ""]
    # Tried 3 times in all: botocore's and s3fs' own retries do not run inside each of ours.
    assert proxy.gets[f"/{BUCKET}/images/{failing}"] == 3


def test_throttled_object_reads_wait_for_retry_after(s3_server, objects):
    uris = list(objects)[:3]
    with FaultProxy(s3_server["endpoint_url"], first_try("503"), retry_after="2") as proxy:
        contents = within(120, lambda: through(proxy).read_many(uris))
    assert contents == [objects[u] for u in uris]
    for path, times in proxy.times.items():
        assert len(times) == 2 and times[1] - times[0] >= 2.0, (path, times)  # the backoff alone is under 0.5 s


def test_throttled_http_reads_wait_for_retry_after(corpus):
    images = {"/a.jpg": corpus[0].read_bytes(), "/b.jpg": corpus[1].read_bytes()}
    with ImageServer(images) as server, FaultProxy(server.url(""), first_try("429"), retry_after="2") as proxy:
        uris = [f"{proxy.url}{path}" for path in images]
        contents = within(120, lambda: Storage().read_many(uris))
    assert contents == list(images.values())
    for path, times in proxy.times.items():
        assert len(times) == 2 and times[1] - times[0] >= 2.0, (path, times)


def test_a_stalled_object_does_not_hold_the_rest_of_its_batch(s3_server, objects):
    uris = list(objects)[:5]
    stalled = uris[2].rsplit("/", 1)[-1]
    with FaultProxy(s3_server["endpoint_url"], every_try("stall", {stalled})) as proxy:
        waves = through(proxy).read_waves(uris)
        first = within(120, lambda: next(waves))
        # The others go on to be decoded while the stalled one is still being read.
        assert [i for i, _ in first] == [0, 1, 3, 4]
        assert [content for _, content in first] == [objects[uris[i]] for i in (0, 1, 3, 4)]
        proxy.release.set()
        rest = within(120, lambda: [item for wave in waves for item in wave])
    assert rest == [(2, objects[uris[2]])]


def test_a_job_over_30_percent_of_gets_reset_labels_every_image(
    s3_server, objects, local_ray, checkpoint_path, tmp_path
):
    with FaultProxy(s3_server["endpoint_url"], share_of_gets("reset", 0.3, RESET_SEED)) as proxy:
        args = ["--input", f"s3://{BUCKET}/images/", "--output", str(tmp_path / "out")]
        args += ["--weights", str(checkpoint_path), "--set", f"storage.endpoint_url={proxy.url}"]
        for name, value in CREDENTIALS.items():
            args += ["--set", f"storage.options.{name}={value}"]
        args += ["--set", "preprocess.batch_size=4", "--set", "compute.batch_size=8"]
        assert main(args) == 0
    rows = rows_by_uri(tmp_path / "out")
    assert set(rows) == set(objects)
    assert {uri: row["status"] for uri, row in rows.items()} == dict.fromkeys(objects, "ok")
    assert proxy.faults["reset"] >= 5


def client_error(status: int, code: str, headers: dict[str, str] | None = None) -> ClientError:
    response = {
        "Error": {"Code": code, "Message": "m"},
        "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers or {}},
    }
    return ClientError(response, "GetObject")


def translated(cause: BaseException) -> OSError:
    """An error as s3fs raises it: an OSError from botocore's."""
    error = OSError(5, "translated")
    error.__cause__ = cause
    return error


def test_which_failures_are_transient():
    assert transient_failure(translated(client_error(503, "SlowDown", {"retry-after": "3"}))) == Transient(
        "throttled (HTTP 503 SlowDown)", 3.0
    )
    assert transient_failure(client_error(500, "InternalError")) == Transient("HTTP 500 InternalError")
    assert transient_failure(client_error(400, "RequestTimeout")) == Transient("HTTP 400 RequestTimeout")
    assert transient_failure(translated(client_error(403, "AccessDenied"))) is None
    assert transient_failure(FileNotFoundError("gone")) is None
    payload = aiohttp.ClientPayloadError("Response payload is not completed")
    assert transient_failure(payload) == Transient("connection failed or cut short")
    assert transient_failure(ConnectionResetError(104, "reset")) == Transient("connection failed or cut short")
    assert transient_failure(ReadTimeoutError(endpoint_url="http://x")) == Transient("timed out")
    assert transient_failure(asyncio.TimeoutError()) == Transient("timed out")
    assert transient_failure(TimeoutError(), timeouts=False) is None
    dns = aiohttp.ClientConnectorDNSError(None, OSError(-2, "Name or service not known"))
    assert transient_failure(dns) is None
    assert transient_failure(ValueError("not an image")) is None


def test_retry_waits_double_with_jitter_and_honour_retry_after():
    assert [retry_delay(n, None, 1.0) for n in (1, 2, 3)] == [RETRY_WAIT_S, 2 * RETRY_WAIT_S, 4 * RETRY_WAIT_S]
    assert [retry_delay(n, None, 0.0) for n in (1, 2, 3)] == [RETRY_WAIT_S / 2, RETRY_WAIT_S, 2 * RETRY_WAIT_S]
    assert retry_delay(1, 7.0, 0.5) == 7.0 and retry_delay(4, 0.1, 1.0) == 8 * RETRY_WAIT_S
    assert retry_delay(1, MAX_RETRY_AFTER_S + 1, 0.5) is None


def test_retry_after_in_seconds_or_as_a_date():
    assert retry_after_seconds("120") == 120.0 and retry_after_seconds("1.5") == 1.5
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    now = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT
    assert retry_after_seconds("Tue, 14 Nov 2023 22:13:50 GMT", now) == 30.0
    assert retry_after_seconds("Tue, 14 Nov 2023 22:00:00 GMT", now) == 0.0


def test_the_next_batchs_reads_start_before_this_batch_is_handed_on(s3_server, objects, tmp_path):
    from mnasnet_batch.config import InputConfig
    from mnasnet_batch.inputs.files import FilesLayout

    uris = list(objects)[:8]
    with FaultProxy(s3_server["endpoint_url"]) as proxy:
        layout = FilesLayout(InputConfig(uri=f"s3://{BUCKET}/images"), through(proxy))
        batches = layout.read({"uri": uris}, batch_size=4)
        first = list(within(120, lambda: next(batches))["uri"])
        assert first and set(first) <= set(uris[:4])  # all of them, unless one took over STRAGGLER_WAIT_S
        # While the first batch is decoded, the second's objects are being read.
        second = {f"/{BUCKET}/images/{uri.rsplit('/', 1)[-1]}" for uri in uris[4:]}
        within(60, lambda: poll(lambda: second <= set(proxy.gets)))
        rest = [u for batch in batches for u in batch["uri"]]
    assert sorted(first + rest) == sorted(uris) and set(rest) >= set(uris[4:])


def poll(condition) -> None:
    """Returns once ``condition()`` holds (the caller bounds the wait)."""
    while not condition():
        threading.Event().wait(0.05)
