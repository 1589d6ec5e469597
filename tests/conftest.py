"""Shared fixtures: real photos, a fixture checkpoint with well-separated predictions, one local Ray; the slow lane.

A test that uses a fixture which starts Ray, a job in a subprocess or a cluster is marked ``slow`` here, from its
fixtures, so ``pytest -m "not slow"`` is the fast lane; ``fast_lane`` keeps one such test in it on purpose.
"""

from __future__ import annotations

import pytest

from tests import support

# Fixtures that start Ray (in this process or as a cluster) or run the job in a subprocess; and test_engine's
# ``variant``, which makes a fixture checkpoint of every MnasNet variant and exports each to ONNX (a minute or more
# per variant on two loaded cores: the fast lane keeps mnasnet0_5's parity, in test_job and test_predictor).
SLOW_FIXTURES = frozenset({"local_ray", "job_process", "cluster", "variant"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "fast_lane" in item.keywords:
            continue
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())) or "cluster" in item.keywords:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def photos():
    return support.load_photos()


@pytest.fixture(scope="session")
def fixture_model():
    return support.make_model("mnasnet0_5")


@pytest.fixture(scope="session")
def checkpoint_path(tmp_path_factory, fixture_model):
    path = tmp_path_factory.mktemp("weights") / "fixture_mnasnet0_5.pth"
    path.write_bytes(support.checkpoint_bytes(fixture_model))
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """24 JPEG and PNG crops of the photos, long side ~500 px."""
    return support.write_corpus(tmp_path_factory.mktemp("corpus"), 24)


@pytest.fixture(scope="session")
def local_ray():
    """One in-process Ray shared by every end-to-end test (starting Ray costs ~10 s on two cores)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API: moto's server on 127.0.0.1, on a free port, for the whole session.

    Yields:
        The storage section that reaches it (endpoint and moto's dummy credentials), as overrides.
    """
    server_module = support.require("moto.server", "test")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield {"endpoint_url": f"http://{host}:{port}", "options": {"key": "testing", "secret": "s3cr3t-not-for-logs"}}
    server.stop()


@pytest.fixture
def job_process():
    """Starts the job in subprocesses (``support.JobProcesses``) and ends each one's session after the test."""
    processes = support.JobProcesses()
    try:
        yield processes
    finally:
        processes.end_all()
