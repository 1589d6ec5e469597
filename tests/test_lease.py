"""The output's lease without Ray: staleness judged on the contender's own clock (injected), compare-and-swap on local
disk and on S3 (moto), and a holder that lost its lease writing nothing more."""

import datetime
import json
import os

import pyarrow as pa
import pytest
from fsspec.implementations.local import LocalFileSystem

from mnasnet_batch.config import StorageConfig
from mnasnet_batch.outputs import files
from mnasnet_batch.outputs import folder as output
from mnasnet_batch.outputs import lease as lease_module
from mnasnet_batch.outputs import run as run_module
from mnasnet_batch.outputs.lease import Here, Lease, LeaseLost, Sighting, judge
from mnasnet_batch.storage import Storage, StorageError

HERE = Here("this-host", "pid:[1]")


def holder(token="theirs", generation=3, host="elsewhere", pid=1234, stale_after_s=120.0, skew_s=0.0):
    """A lease as another job wrote it; ``skew_s``: how far its machine's clock is from true time."""
    beat = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=skew_s)
    return {
        "run_id": "busy",
        "host": host,
        "pid": pid,
        "pid_namespace": HERE.pid_namespace,
        "token": token,
        "generation": generation,
        "heartbeat_s": stale_after_s / 4,
        "stale_after_s": stale_after_s,
        "heartbeat_at": beat.isoformat(),
    }


def never_alive(pid):
    return False


def always_alive(pid):
    return True


# judge: the pure decision, on an injected monotonic clock.


def test_no_lease_is_taken_and_a_file_that_is_not_one_is_taken_over():
    assert judge(None, None, 0.0, HERE, always_alive)[0].action == "take"
    assert judge({}, None, 0.0, HERE, always_alive)[0].action == "take_over"


@pytest.mark.parametrize("skew_s", [-600.0, 0.0, 600.0], ids=["10-min-behind", "true", "10-min-ahead"])
def test_a_live_process_on_this_machine_is_never_stale_whatever_its_clock(skew_s):
    mine = holder(host=HERE.host, skew_s=skew_s)
    verdict, seen = judge(mine, None, 1e6, HERE, always_alive)
    assert verdict.action == "refuse" and verdict.left_s == float("inf") and seen is None
    assert judge(mine, None, 1e6, HERE, never_alive)[0].action == "take_over"
    # Its pid is this process's own (a PID namespace's pid 1, again) and this process does not hold it: an earlier
    # process's lease. One this process holds (another thread's) is alive.
    itself = Here(HERE.host, HERE.pid_namespace, pid=mine["pid"])
    assert judge(mine, None, 1e6, itself, always_alive)[0].action == "take_over"
    holding = Here(HERE.host, HERE.pid_namespace, pid=mine["pid"], held=frozenset({mine["token"]}))
    assert judge(mine, None, 1e6, holding, never_alive)[0].action == "refuse"


@pytest.mark.parametrize("skew_s", [-600.0, 0.0, 600.0], ids=["10-min-behind", "true", "10-min-ahead"])
def test_another_machines_lease_is_stale_only_after_a_period_unrenewed_on_the_contenders_clock(skew_s):
    theirs = holder(skew_s=skew_s)
    verdict, seen = judge(theirs, None, 1000.0, HERE, always_alive)
    assert verdict.action == "watch" and verdict.wait_s == lease_module.WATCH_POLL_S and verdict.left_s == 120.0
    assert seen == Sighting(("theirs", 3), 1000.0)
    verdict, seen = judge(theirs, seen, 1119.9, HERE, always_alive)
    assert verdict.action == "watch" and verdict.wait_s == pytest.approx(0.1) and seen.since == 1000.0
    assert judge(theirs, seen, 1120.0, HERE, always_alive)[0].action == "take_over"


def test_a_lease_renewed_while_watched_is_alive_and_the_refusal_says_when_it_may_be_taken():
    seen = judge(holder(generation=3), None, 1000.0, HERE, always_alive)[1]
    verdict, seen = judge(holder(generation=4), seen, 1030.0, HERE, always_alive)
    assert verdict.action == "refuse" and verdict.left_s == 120.0 and seen == Sighting(("theirs", 4), 1030.0)
    # Taken by a third job meanwhile: alive too.
    assert judge(holder(token="third", generation=0), seen, 1031.0, HERE, always_alive)[0].action == "refuse"


def test_the_holders_declared_period_decides():
    seen = judge(holder(stale_after_s=8.0), None, 0.0, HERE, always_alive)[1]
    assert judge(holder(stale_after_s=8.0), seen, 7.9, HERE, always_alive)[0].action == "watch"
    assert judge(holder(stale_after_s=8.0), seen, 8.0, HERE, always_alive)[0].action == "take_over"
    legacy = {k: v for k, v in holder().items() if k not in ("stale_after_s", "generation")}
    assert judge(legacy, None, 0.0, HERE, always_alive)[0].left_s == lease_module.LEASE_STALE_S


# Lease: acquire, renew, lose, on a clock the test drives.


class Clock:
    """A monotonic clock that moves only when the code under test sleeps; ``on_sleep`` runs at each sleep."""

    def __init__(self, on_sleep=None):
        self.now, self.on_sleep, self.slept = 0.0, on_sleep, []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep()


def elsewhere(lease):
    """Makes ``lease`` (held in this process) look like another machine's to a contender here."""
    lease.holder["host"] = "another-machine"


def s3_fs(s3_server, bucket):
    fs, _ = Storage(StorageConfig(**s3_server)).filesystem(f"s3://{bucket}")
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    return fs


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """An output root on local disk, or on S3 (the moto server): (fs, root, uri, storage)."""
    if request.param == "local":
        root = str(tmp_path / "labels")
        os.makedirs(root)
        return LocalFileSystem(), root, root, Storage()
    s3_server = request.getfixturevalue("s3_server")
    fs = s3_fs(s3_server, "lease-units")
    root = f"lease-units/{tmp_path.name}"
    return fs, root, f"s3://{root}", Storage(StorageConfig(**s3_server))


def test_a_renewing_holder_on_another_machine_is_never_taken_over(store):
    fs, root, uri, _ = store
    first = Lease.acquire(fs, root, uri, heartbeat_s=30.0)
    elsewhere(first)
    first._beat()
    clock = Clock(on_sleep=first._beat)  # renews at every read of the contender: alive
    with pytest.raises(StorageError, match=r"in use by a job still planning its run \(host another-machine, pid \d+\)"):
        Lease.acquire(fs, root, uri, clock=clock, sleep=clock.sleep)
    assert clock.now == lease_module.WATCH_POLL_S  # one re-read told it
    first.check()
    first.release()
    assert lease_module._read(fs, files.join(root, lease_module.LEASE_FILE))[0] is None


def test_a_holder_that_stopped_renewing_is_taken_over_after_one_period_and_stops_writing(store):
    fs, root, uri, storage = store
    first = Lease.acquire(fs, root, uri, heartbeat_s=2.0)
    elsewhere(first)
    first.holder["run_id"] = "first"
    first._beat()
    lines = []
    first.on_lost(lines.append)
    clock = Clock()
    second = Lease.acquire(fs, root, uri, clock=clock, sleep=clock.sleep)
    assert clock.now == 8.0 and second.taken_over  # the period first declared (4 x 2 s), on second's clock
    second.holder["run_id"] = "second"
    second._beat()
    # The first holder finds out at its next renewal, and from then on writes nothing.
    first._beat()
    assert first.lost and lines == [first.lost] and "taken over by run second" in first.lost
    with pytest.raises(LeaseLost, match="taken over by run second"):
        first.check()
    run_uri = files.join(uri, "run=first")
    for run in ("run=first", "run=second"):
        fs.makedirs(files.join(root, run), exist_ok=True)
    table = pa.table({"uri": ["a.jpg"], "error": pa.array([None], pa.string())})
    with pytest.raises(LeaseLost):
        output.write_part(table, run_uri, storage, first.fence(storage))
    with pytest.raises(LeaseLost):
        run_module.write_record(fs, root, "first", {"run_id": "first"}, first)
    fs.invalidate_cache()
    assert not [p for p in fs.find(root) if "part-" in p or p.endswith("_run.json")], "a lost holder wrote"
    output.write_part(table, files.join(uri, "run=second"), storage, second.fence(storage))
    first.release()  # leaves the taker's lease
    current = lease_module._read(fs, files.join(root, lease_module.LEASE_FILE))[0]
    assert current["run_id"] == "second"
    second.release()


def test_two_jobs_taking_over_one_stale_lease_one_wins(store):
    fs, root, uri, _ = store
    path = files.join(root, lease_module.LEASE_FILE)
    stale = Lease.acquire(fs, root, uri)
    current, etag = lease_module._read(fs, path)
    a = json.dumps({**current, "token": "a"}).encode()
    b = json.dumps({**current, "token": "b"}).encode()
    assert lease_module._swap(fs, path, current, etag, a)
    assert not lease_module._swap(fs, path, current, etag, b)  # b read the same version: a changed it first
    assert not lease_module._swap(fs, path, None, None, b)  # and creating one needs none there
    assert lease_module._read(fs, path)[0]["token"] == "a"
    stale.release()  # not its lease any more: left in place
    assert lease_module._read(fs, path)[0]["token"] == "a"


def test_a_holder_that_cannot_renew_for_three_beats_stops_before_anyone_may_take_over(tmp_path, monkeypatch):
    root = str(tmp_path)
    clock = Clock()
    lease = Lease.acquire(LocalFileSystem(), root, root, heartbeat_s=10.0, clock=clock)
    lease.holder["run_id"] = "first"

    def unreachable(*args, **kwargs):
        raise OSError("store unreachable")

    monkeypatch.setattr(lease_module, "_swap", unreachable)
    # The heartbeat thread's wait, on the test's clock: it returns at once once the lease is lost, as the event does.
    lease._stopped.wait = lambda seconds: lease.lost is not None or bool(clock.sleep(seconds))
    lease._heartbeats()
    assert lease.lost and "could not renew its lease for 30 s" in lease.lost and clock.now == 30.0


def test_a_taker_leaves_out_what_the_previous_holder_published_after_the_takeover(tmp_path):
    from mnasnet_batch.parts import PartWriter

    run_root = tmp_path / "labels" / "run=first"
    run_root.mkdir(parents=True)

    def rows(*uris):
        return pa.table({"uri": list(uris), "error": pa.array([None] * len(uris), pa.string())})

    output.write_part(rows("a", "b"), str(run_root))  # there when the lease was taken: the run resumed from it
    fence = lease_module.Fence(
        Storage(),
        str(tmp_path / "labels"),
        "token",
        "first",
        frozenset(files.parts_under(LocalFileSystem(), str(tmp_path / "labels"))),
    )
    writer = PartWriter(str(run_root), Storage(), fence)
    monkey_lease = {"token": "token", "generation": 1}
    (tmp_path / "labels" / lease_module.LEASE_FILE).write_text(json.dumps(monkey_lease))
    output.write_part(rows("c", "d"), str(run_root))  # the previous holder's last part, published late
    writer.write(rows("c", "d", "e"))
    writer.write(rows("d", "f"))
    writer.write(rows("g"))
    assert writer.write(rows("c")) is None  # nothing left to write
    labeled = output.read_parts(LocalFileSystem(), str(run_root)).to_table(columns=["uri"])["uri"].to_pylist()
    assert sorted(labeled) == ["a", "b", "c", "d", "e", "f", "g"]  # each once
