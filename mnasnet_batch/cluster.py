"""The job's side of a Ray cluster: reaching it in bounded time, and keeping Ray's chatter out of the job's log."""

from __future__ import annotations

import re
import socket
import time

from mnasnet_batch.config import ConfigError


def reach_cluster(address: str, timeout_s: float, named_by: str) -> None:
    """Checks that the Ray cluster at ``address`` accepts connections, within ``timeout_s``.

    ``ray.init`` waits on an address that nothing answers for minutes, logging only Ray's own warnings; this fails
    in the timeout with one line, before the output is touched. ``auto`` and ``local`` are Ray's to resolve.

    Raises:
        ConfigError: nothing accepted a connection at ``address`` (named by ``named_by``) in ``timeout_s``.
    """
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=max(0.1, deadline - time.monotonic())):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"the Ray cluster at {address} ({named_by}) did not answer within {timeout_s:g} s "
                    f"({type(exc).__name__}: {exc}); check that it is running (ray status --address {address}) and "
                    f"that {named_by} names its head node's GCS port (6379 unless set), or unset {named_by} to run "
                    f"on a local Ray; ray.connect_timeout_s sets the wait"
                ) from None
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))  # a head node may still be starting


# A line of Ray's C++ log (raylet, GCS, core worker), as a worker's stderr carries it to the driver where a node
# sets RAY_LOG_TO_STDERR: "[2026-12-03 19:25:43,052 I 30000 30000] worker_pool.cc:564: ...".
RAY_CPP_LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWEF] \d+ \d+\] ")
# What Ray tells the driver while it recovers from a lost node or worker: the node's missed health checks and
# each retried task, once per attempt. The job says it once, in its own words (``job.NodeWatch``).
RAY_RECOVERY_MESSAGES = ("has been marked dead", "will be retried", "liveness")
# What Ray tells the driver while an autoscaler adds the nodes that tasks and actors wait for: the job says it waits,
# once, in its own words (``job.PoolWatch``, ``job.NodeWatch``).
RAY_SCALING_MESSAGES = ("infeasible resource requests",)


def is_ray_chatter(source: str, line: str) -> bool:
    """Whether a line that Ray forwards to the driver stays out of the job's log: a line of Ray's C++ logging, Ray's
    (``source`` ``raylet``, ``gcs_server``) report of a recovery in progress, or the autoscaler's events (``source``
    ``autoscaler``: nodes launched, and under autoscaler v2 a request it cannot meet in full, once a second, which
    reads as a fault; the job says when nodes join and what it waits for in its own lines, ``job.NodeWatch``).
    Workers' own output (prints, Python warnings and tracebacks) and Ray's other messages (a worker killed for
    memory) are kept."""
    if source == "autoscaler" or RAY_CPP_LOG_LINE.match(line):
        return True
    messages = RAY_RECOVERY_MESSAGES + RAY_SCALING_MESSAGES
    return source in ("raylet", "gcs_server") and any(message in line for message in messages)


def keep_ray_chatter_out() -> None:
    """Filters what Ray prints on the driver's stdout and stderr for it (``is_ray_chatter``).

    Ray 2.60 has no setting for this: ``log_to_driver=False`` would drop workers' own output too, and Ray's
    messages to the driver (the node health and retry notices) are printed whatever it says. Both pass through
    ``ray._private.worker.print_to_stdstream``: messages look it up when printed, and workers' output through a
    handler that ``ray.init`` registered, which is registered again here with the filter. The lines dropped are
    in the Ray log files of the nodes (the session's ``logs`` folder).
    """
    import functools

    from ray._private import worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    original = ray_worker.print_to_stdstream
    if getattr(original, "keeps_ray_chatter_out", False):
        return

    def print_kept(data: dict, ignore_prefix: bool) -> None:
        source = str(data.get("pid", ""))
        lines = [line for line in data.get("lines", []) if not is_ray_chatter(source, line)]
        if lines:
            original({**data, "lines": lines}, ignore_prefix)

    print_kept.keeps_ray_chatter_out = True
    ray_worker.print_to_stdstream = print_kept
    if any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
        ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", functools.partial(print_kept, ignore_prefix=ignore_prefix))
