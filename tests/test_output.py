"""The output location at function level: the lease, writes that fail, the record's counts, redaction, refusals."""

import dataclasses
import datetime
import errno
import json
import os
import pathlib
import subprocess
import sys
import threading
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from fsspec.implementations.local import LocalFileSystem

from mnasnet_batch import config as config_module
from mnasnet_batch.config import StorageConfig, load_config
from mnasnet_batch.inputs import spool
from mnasnet_batch.outputs import files as files_module
from mnasnet_batch.outputs import folder as output
from mnasnet_batch.outputs import lease as lease_module
from mnasnet_batch.outputs import run as run_module
from mnasnet_batch.storage import Storage, StorageError
from tests.support import poll


def job_config(out, run_id="", mode="auto", storage=None, **sections):
    overrides = {"input": {"uri": "/images"}, "output": {"uri": str(out), "mode": mode, "run_id": run_id}}
    overrides.update(sections)
    if storage:
        overrides["storage"] = storage
    return load_config(overrides=[overrides])


def rows(uris):
    return pa.table({"uri": pa.array(uris, pa.string()), "error": pa.array([None] * len(uris), pa.string())})


def no_space(self, path, value, *args, **kwargs):
    """LocalFileSystem.pipe_file on a full disk: the file is created, then writing fails."""
    open(path, "wb").close()
    raise OSError(errno.ENOSPC, "No space left on device")


class Disk:
    """Local writes succeed until ``fill()``, and fail as on a full disk until ``free()``."""

    def __init__(self, monkeypatch):
        self.monkeypatch, self.real = monkeypatch, LocalFileSystem.pipe_file

    def fill(self):
        self.monkeypatch.setattr(LocalFileSystem, "pipe_file", no_space)

    def free(self):
        self.monkeypatch.setattr(LocalFileSystem, "pipe_file", self.real)


@pytest.fixture
def disk(monkeypatch):
    return Disk(monkeypatch)


def test_a_part_that_cannot_be_written_leaves_no_temporary(tmp_path, disk):
    run = tmp_path / "run=a"
    run.mkdir()
    disk.fill()
    with pytest.raises(OSError) as info:
        output.write_part(rows(["/images/a.jpg"]), str(run))
    assert info.value.errno == errno.ENOSPC
    assert list(run.iterdir()) == []


def test_parts_are_cut_at_rows_per_file_and_each_block_goes_into_one_part():
    from mnasnet_batch.parts import PartCutter

    parts = []
    cutter = PartCutter(parts.append, rows_per_file=5, interval_s=3600)
    for block in ("a", "b", "c"):
        cutter.add([block], 2)
    assert parts == [["a", "b", "c"]]  # 6 rows: full
    cutter.add(["d", "e"], 3)
    assert parts == [["a", "b", "c"]]
    cutter.close()
    assert parts == [["a", "b", "c"], ["d", "e"]]  # the rest, when the rows end


def test_a_part_is_cut_once_its_oldest_row_waited_the_interval_though_no_rows_come():
    from mnasnet_batch.parts import PartCutter

    parts, cut_at = [], []
    cutter = PartCutter(lambda blocks: (parts.append(blocks), cut_at.append(time.monotonic())), 10_000, 0.5)
    try:
        started = time.monotonic()
        cutter.add(["a"], 1)
        cutter.add(["b"], 1)
        deadline = time.monotonic() + 30
        while not parts and time.monotonic() < deadline:
            time.sleep(0.05)
        assert parts == [["a", "b"]] and cut_at[0] - started >= 0.5
        cutter.add(["c"], 1)  # the next part's interval starts with its own first row
        while len(parts) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert parts == [["a", "b"], ["c"]]
    finally:
        cutter.close()
    assert parts == [["a", "b"], ["c"]]


def test_a_part_the_timer_could_not_launch_fails_the_run():
    from mnasnet_batch.parts import PartCutter

    def launch(blocks):
        raise OSError(errno.ENOSPC, "No space left on device")

    cutter = PartCutter(launch, 10_000, 0.1)
    cutter.add(["a"], 1)
    deadline = time.monotonic() + 30
    with pytest.raises(OSError, match="No space left"):
        while time.monotonic() < deadline:  # the timer's failure is raised by the next add
            cutter.add(["b"], 1)
            time.sleep(0.05)
    with pytest.raises(OSError, match="No space left"):
        cutter.close()


def test_a_record_that_cannot_be_written_keeps_the_error_and_the_run_resumable(tmp_path, disk):
    out = tmp_path / "labels"
    config = job_config(out, run_id="night")
    plan = output.plan_run(config, "IMAGENET1K_V1")
    output.write_part(rows(["/images/a.jpg"]), plan.run_uri)
    disk.fill()  # the attempt fails, and recording that it failed fails too
    with pytest.raises(StorageError) as info:
        output.finish_run(config, plan, 1.0, 1, error="RuntimeError: the model actor died\ntraceback line")
    disk.free()
    message = str(info.value)
    assert "\n" not in message
    assert "RuntimeError: the model actor died" in message and "No space left on device" in message
    assert "run night stays resumable" in message
    assert not list(out.rglob(f"{files_module.TEMP_PREFIX}*")) and not (out / lease_module.LEASE_FILE).exists()
    assert json.loads((out / "_run.json").read_text())["status"] == "running"
    # Space freed: the same command resumes the run and keeps what it wrote.
    again = output.plan_run(config, "IMAGENET1K_V1")
    assert again.resumed and again.run_id == "night" and again.done.uris().to_pylist() == ["/images/a.jpg"]
    output.finish_run(config, again, 1.0, 0)


def test_the_record_counts_at_most_what_this_attempt_wrote(tmp_path):
    out = tmp_path / "labels"
    config = job_config(out, run_id="night")
    plan = output.plan_run(config, "IMAGENET1K_V1")
    output.write_part(rows(["/images/a.jpg", "/images/b.jpg"]), plan.run_uri)
    output.finish_run(config, plan, 2.0, 0, error="KeyboardInterrupt: ")  # interrupted: resumable
    plan = output.plan_run(config, "IMAGENET1K_V1")
    assert plan.resumed and plan.rows_before == 2
    output.write_part(rows(["/images/c.jpg"]), plan.run_uri)
    summary = output.finish_run(config, plan, 2.0, 3)  # the caller counted the resumed images too
    record = json.loads((out / "_run.json").read_text())
    assert record["counts"]["labeled_this_attempt"] == 1 == summary.labeled_now
    assert record["counts"]["images"] == 3 and record["images_per_s"] == 0.5
    # The whole attempt's rate is the record's; the summary line gives the labeling rate, when there is one.
    assert "images/s" not in summary.line()
    assert dataclasses.replace(summary, labeling_images=30, labeling_s=2.0).line() == (
        "labeled 3 images (0 errors, 2 from before the resume) in 2.0 s, labeling 15.0 images/s (first batch to last)"
    )

    config = job_config(tmp_path / "other")
    plan = output.plan_run(config, "IMAGENET1K_V1")
    output.finish_run(config, plan, 1.0, -5)
    assert json.loads((tmp_path / "other" / "_run.json").read_text())["counts"]["labeled_this_attempt"] == 0


def test_a_different_configuration_is_refused_with_both_values(tmp_path):
    out = tmp_path / "labels"
    config = job_config(out, run_id="night")
    output.finish_run(config, output.plan_run(config, "IMAGENET1K_V1"), 1.0, 0)
    other = job_config(out, mode="incremental", input={"uri": "/other"}, model={"top_k": 3})
    with pytest.raises(StorageError) as info:
        output.plan_run(other, "IMAGENET1K_V1")
    message = str(info.value)
    assert "different configuration (input, top_k differ): " in message
    assert "input: /other (this run) vs /images (run night)" in message
    assert "top_k: 3 (this run) vs 5 (run night)" in message
    assert not (out / lease_module.LEASE_FILE).exists()  # a refusal releases the lease
    # Approximate decoding moves pixels: its rows do not join an exact run's.
    fast = job_config(out, mode="incremental", preprocess={"fast_decode": True})
    differ = r"\(fast_decode differ\): fast_decode: True \(this run\) vs \(not recorded\)"
    with pytest.raises(StorageError, match=differ):
        output.plan_run(fast, "IMAGENET1K_V1")


def test_no_credential_in_the_written_configuration_and_one_redaction_marker(tmp_path):
    out = tmp_path / "labels"
    storage = {
        "endpoint_url": "http://minio:pa55word@minio.local:9000",
        "options": {"key": "AKIA-not-a-secret-id", "secret": "s3cr3t-not-for-files", "s3": {"token": "t0ken-x"}},
    }
    config = job_config(out, run_id="night", storage=storage)
    output.finish_run(config, output.plan_run(config, "IMAGENET1K_V1"), 1.0, 0)
    for path in (out / "_run.json", out / "run=night" / "_run.json", out / "run=night" / "_config.yaml"):
        text = path.read_text()
        for secret in ("pa55word", "AKIA-not-a-secret-id", "s3cr3t-not-for-files", "t0ken-x"):
            assert secret not in text, (path, secret)
        assert config_module.REDACTED in text and "***" not in text, path
    written = yaml.safe_load((out / "run=night" / "_config.yaml").read_text())["storage"]
    recorded = json.loads((out / "_run.json").read_text())["config"]["storage"]
    assert written == recorded
    assert recorded["options"]["secret"] == config_module.REDACTED == recorded["options"]["s3"]["token"]
    assert recorded["endpoint_url"] == f"http://{config_module.REDACTED}@minio.local:9000"


# The lease: one job at a time on an output.


def test_a_second_job_on_a_held_output_stops_naming_the_running_run(tmp_path):
    out = tmp_path / "labels"
    config = job_config(out, run_id="first")
    plan = output.plan_run(config, "IMAGENET1K_V1")
    lease = json.loads((out / lease_module.LEASE_FILE).read_text())
    assert lease["run_id"] == "first" and lease["token"]
    with pytest.raises(StorageError, match=r"in use by run first \(host .*, pid \d+\): its process runs on this"):
        output.plan_run(job_config(out, run_id="second"), "IMAGENET1K_V1")
    assert not (out / "run=second").exists()
    assert json.loads((out / "_run.json").read_text())["run_id"] == "first"
    output.finish_run(config, plan, 1.0, 0)
    assert not (out / lease_module.LEASE_FILE).exists()
    plan = output.plan_run(job_config(out, run_id="second", mode="incremental"), "IMAGENET1K_V1")
    assert plan.run_id == "second"
    plan.lease.release()


def with_heartbeat(config, seconds):
    return dataclasses.replace(config, output=dataclasses.replace(config.output, lease_heartbeat_s=seconds))


def test_the_lease_beats_while_the_run_is_open(tmp_path):
    out = tmp_path / "labels"
    config = with_heartbeat(job_config(out, run_id="first"), 0.05)
    plan = output.plan_run(config, "IMAGENET1K_V1")
    first = json.loads((out / lease_module.LEASE_FILE).read_text())
    assert first["stale_after_s"] == 0.2  # declared for the jobs that find it: 4 heartbeats
    renewed = lambda: json.loads((out / lease_module.LEASE_FILE).read_text())["generation"] > first["generation"]  # noqa: E731
    poll(renewed, 10, "a heartbeat")
    output.finish_run(config, plan, 1.0, 0)
    assert not (out / lease_module.LEASE_FILE).exists()
    assert not any(t.name == f"lease-{out}" for t in threading.enumerate())


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def foreign_lease(host, pid, stale_after_s=lease_module.LEASE_STALE_S, generation=0):
    import socket

    return {
        "run_id": "crashed",
        "host": socket.gethostname() if host == "here" else host,
        "pid": pid,
        "pid_namespace": lease_module._pid_namespace(),
        "token": "theirs",
        "generation": generation,
        "heartbeat_s": stale_after_s / 4,
        "stale_after_s": stale_after_s,
        # Ten minutes ahead: no job reads this clock.
        "heartbeat_at": (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=10)).isoformat(),
    }


@pytest.mark.parametrize(
    "holder",
    [
        # Another machine's job whose lease went unrenewed for its declared period (0.2 s), watched from here.
        {"host": "elsewhere", "pid": 1, "stale_after_s": 0.2},
        # A job on this machine whose process is gone (killed), however fresh its lease.
        {"host": "here", "pid": "dead"},
    ],
    ids=["unrenewed-for-its-period", "process-gone"],
)
def test_a_stale_lease_is_taken_over(tmp_path, holder):
    out = tmp_path / "labels"
    out.mkdir()
    lease = foreign_lease(holder["host"], dead_pid() if holder["pid"] == "dead" else holder["pid"])
    lease["stale_after_s"] = holder.get("stale_after_s", lease["stale_after_s"])
    (out / lease_module.LEASE_FILE).write_text(json.dumps(lease))
    plan = output.plan_run(job_config(out, run_id="next"), "IMAGENET1K_V1")
    assert json.loads((out / lease_module.LEASE_FILE).read_text())["run_id"] == "next"
    assert plan.lease.taken_over
    plan.lease.release()


def test_a_renewed_lease_of_another_machine_is_respected(tmp_path):
    out = tmp_path / "labels"
    out.mkdir()
    path = out / lease_module.LEASE_FILE
    path.write_text(json.dumps(foreign_lease("elsewhere", 1, stale_after_s=30.0)))
    stop = threading.Event()

    def renewing():  # the other machine's job, alive: a generation up every 0.05 s
        generation = 0
        while not stop.wait(0.05):
            generation += 1
            temp = path.with_name("renewing.tmp")  # whole, as a job writes it: a reader never sees half a lease
            temp.write_text(json.dumps(foreign_lease("elsewhere", 1, stale_after_s=30.0, generation=generation)))
            os.replace(temp, path)

    thread = threading.Thread(target=renewing)
    thread.start()
    try:
        with pytest.raises(StorageError, match=r"in use by run crashed \(host elsewhere, pid 1\): it renewed its lease "
                           r"while this job watched; .* in about \d+ s at the earliest"):
            output.plan_run(job_config(out, run_id="next"), "IMAGENET1K_V1")
    finally:
        stop.set()
        thread.join()
    assert json.loads(path.read_text())["token"] == "theirs"
    assert not (out / "run=next").exists()


def race(configs, monkeypatch):
    """Runs plan_run for each config in its own thread, all writing the lease at once; returns plans and errors."""
    swap = lease_module._swap
    barrier = threading.Barrier(len(configs), timeout=30)

    def swapping_together(fs, path, expected, *args):
        if expected is None:  # creating it: every job has read the lease as absent
            barrier.wait()
        return swap(fs, path, expected, *args)

    monkeypatch.setattr(lease_module, "_swap", swapping_together)
    results = [None] * len(configs)

    def plan(i):
        try:
            results[i] = output.plan_run(configs[i], "IMAGENET1K_V1")
        except StorageError as exc:
            results[i] = exc

    threads = [threading.Thread(target=plan, args=(i,)) for i in range(len(configs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    plans = [r for r in results if isinstance(r, run_module.RunPlan)]
    errors = [r for r in results if isinstance(r, StorageError)]
    return plans, errors


def test_two_racing_jobs_on_local_disk_one_wins(tmp_path, monkeypatch):
    out = tmp_path / "labels"
    out.mkdir()
    configs = [job_config(out, run_id=name) for name in ("a", "b")]
    plans, errors = race(configs, monkeypatch)
    assert len(plans) == 1 and len(errors) == 1, (plans, errors)
    assert f"in use by run {plans[0].run_id}" in str(errors[0]) or "a job still planning its run" in str(errors[0])
    assert [p.name for p in out.glob("run=*")] == [f"run={plans[0].run_id}"]
    output.finish_run(configs[0], plans[0], 1.0, 0)


@pytest.fixture
def s3_output(s3_server):
    fs, _ = Storage(StorageConfig(**s3_server)).filesystem("s3://lease-bucket")
    if not fs.exists("lease-bucket"):
        fs.mkdir("lease-bucket")
    return fs


def test_the_lease_holds_on_s3(s3_server, s3_output, monkeypatch):
    out = "s3://lease-bucket/held"
    config = job_config(out, run_id="first", storage=s3_server)
    plan = output.plan_run(config, "IMAGENET1K_V1")
    assert json.loads(s3_output.cat_file("lease-bucket/held/_lease.json"))["run_id"] == "first"
    with pytest.raises(StorageError, match=r"output s3://lease-bucket/held is in use by run first"):
        output.plan_run(job_config(out, run_id="second", storage=s3_server), "IMAGENET1K_V1")
    output.finish_run(config, plan, 1.0, 0)
    assert not s3_output.exists("lease-bucket/held/_lease.json")

    # Two jobs racing for a fresh output: S3's conditional write lets one create the lease.
    configs = [job_config("s3://lease-bucket/raced", run_id=name, storage=s3_server) for name in ("a", "b")]
    plans, errors = race(configs, monkeypatch)
    assert len(plans) == 1 and len(errors) == 1, (plans, errors)
    output.finish_run(configs[0], plans[0], 1.0, 0)


def test_an_output_path_with_glob_characters_is_taken_as_it_is(tmp_path):
    from mnasnet_batch.evaluation.runs import list_runs

    out = tmp_path / "labels [2024]"
    plan = output.plan_run(job_config(out, run_id="first"), "w")
    output.write_part(rows(["/images/a.jpg"]), plan.run_uri)
    output.finish_run(job_config(out, run_id="first"), plan, seconds=1.0)
    (out / f"{files_module.TEMP_PREFIX}{uuid.uuid4().hex}").write_bytes(b"")  # left by a killed writer
    plan = output.plan_run(job_config(out, mode="incremental", run_id="second"), "w")
    assert not list(out.glob(f"{files_module.TEMP_PREFIX}*")), "a killed writer's temporary stays"
    assert plan.done.uris().to_pylist() == ["/images/a.jpg"]
    output.finish_run(job_config(out, mode="incremental", run_id="second"), plan, seconds=1.0)
    assert [r["run_id"] for r in list_runs(str(out))] == ["first", "second"]


def test_the_summary_counts_error_kinds_over_every_part_of_the_run(tmp_path):
    run = tmp_path / "run=r"
    run.mkdir()
    storage = Storage()
    output.write_part(
        pa.table({"uri": ["a", "b", "c"], "error": ["UnidentifiedImageError: cannot identify", None, "OSError"]}),
        str(run),
        storage,
    )
    output.write_part(pa.table({"uri": ["d"], "error": ["OSError: [Errno 2] No such file: 'd:e'"]}), str(run), storage)
    summary = output.summarize(str(run), 1.0, 4, storage)
    assert (summary.images, summary.errors) == (4, 3)
    assert summary.error_kinds == {"UnidentifiedImageError": 1, "OSError": 2}


def test_a_new_output_holding_other_parquet_files_is_refused_but_not_for_the_jobs_own_lists(tmp_path):
    out = tmp_path / "out"
    listed = out / spool.SPOOL_FOLDER / "job" / "listed"
    listed.mkdir(parents=True)
    pq.write_table(pa.table({"uri": ["/images/a.jpg"]}), listed / "000-000000.parquet")
    plan = output.plan_run(job_config(out, run_id="first"), "w")
    plan.lease.release()
    (out / "run=first").rename(tmp_path / "gone")
    pq.write_table(pa.table({"uri": ["/images/a.jpg"]}), out / "labels.parquet")
    (out / run_module.RUN_RECORD).unlink()
    with pytest.raises(StorageError, match="holds Parquet files that no run of this job wrote"):
        output.plan_run(job_config(out, run_id="second"), "w")


def test_lists_a_killed_job_left_are_removed_by_the_next_job_only_once_abandoned(tmp_path):
    out = tmp_path / "labels"
    jobs = [spool.spool_folder(str(out)) + "/listed" for _ in range(2)]
    abandoned, listing = (pathlib.Path(folder) for folder in jobs)
    # A user's folders there, as old: not a name the job gives its lists, or holding a file that is not one.
    users, mixed = out / spool.SPOOL_FOLDER / "photos", pathlib.Path(spool.spool_folder(str(out)))
    for folder in (abandoned, listing, users, mixed):
        folder.mkdir(parents=True)
        (folder / "000000.parquet").write_bytes(b"x")
    (mixed / "notes.txt").write_text("a user's file")
    # The killed job's last file is older than a lease goes stale; the other job is still listing into its own.
    old = time.time() - lease_module.LEASE_STALE_S - 60
    for path in (abandoned / "000000.parquet", users / "000000.parquet", mixed / "000000.parquet", mixed / "notes.txt"):
        os.utime(path, (old, old))
    plan = output.plan_run(job_config(out), "IMAGENET1K_V1")
    plan.lease.release()
    assert not abandoned.parent.exists() and (listing / "000000.parquet").exists()
    assert (users / "000000.parquet").exists() and (mixed / "notes.txt").exists()


def test_overwrite_refuses_a_users_hive_dataset_before_removing_anything(tmp_path):
    out = tmp_path / "ds"
    for month in ("2024-01", "2024-02"):
        (out / f"run={month}").mkdir(parents=True)
        pq.write_table(pa.table({"uri": [f"/images/{month}.jpg"]}), out / f"run={month}" / "data.parquet")
    for mode in ("auto", "overwrite"):
        with pytest.raises(StorageError, match="holds Parquet files that no run of this job wrote"):
            output.plan_run(job_config(out, mode=mode), "w")
    assert sorted(p.name for p in out.glob("run=*/*")) == ["data.parquet", "data.parquet"]
    assert not (out / lease_module.LEASE_FILE).exists()


def test_overwrite_removes_only_the_runs_this_job_recorded(tmp_path):
    out = tmp_path / "photos"  # the output is the input folder, as a user may choose
    first = output.plan_run(job_config(out, run_id="first"), "w")
    output.write_part(rows(["/images/a.jpg"]), first.run_uri, first.storage)
    output.finish_run(job_config(out, run_id="first"), first, 1.0)
    keep = out / "run=keepme"
    keep.mkdir()
    (keep / "photo.jpg").write_bytes(b"a user's photo")
    fake = out / "run=notes"
    fake.mkdir()
    (fake / run_module.RUN_RECORD).write_text('{"run_id": "other", "fingerprint": {}}')  # not this folder's run
    (out / f"{files_module.TEMP_PREFIX}notes.txt").write_text("a user's file that starts like a temporary")

    plan = output.plan_run(job_config(out, run_id="second", mode="overwrite"), "w")
    plan.lease.release()
    assert not (out / "run=first").exists() and (out / "run=second" / run_module.RUN_RECORD).exists()
    assert (keep / "photo.jpg").read_bytes() == b"a user's photo" and (fake / run_module.RUN_RECORD).exists()
    assert (out / f"{files_module.TEMP_PREFIX}notes.txt").exists() and not (out / run_module.SUCCESS_MARKER).exists()
    assert json.loads((out / run_module.RUN_RECORD).read_text())["run_id"] == "second"
