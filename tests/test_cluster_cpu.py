"""What a user runs first: `ray job submit` with the default profile on a plain CPU-only cluster of two 1-CPU nodes.

Under `ray job submit`, Ray unpacks the job's working dir again when it sets the job's runtime env up on the
driver's node, replacing the directory the driver runs in; and no node of this cluster has the CPUs that a
model actor sized from the whole cluster's would ask for. Both made this submission fail or hang.
"""

from __future__ import annotations

import re

import pyarrow.dataset as pads
import pytest

from tests import support
from tests.cluster import checkout_copy, run_job, running_cluster

IMAGES = 8
# A cluster's start, a submitted job and its stop: minutes on two loaded cores, more than the default limit.
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def cluster():
    with running_cluster(1, "--num-cpus", "1") as started:
        yield started


def test_the_default_profile_labels_every_image(cluster, tmp_path_factory, checkpoint_path, fixture_model):
    checkout = checkout_copy(cluster)
    images = support.write_corpus(tmp_path_factory.mktemp("cpu-cluster-images"), IMAGES, seed=7)
    output = tmp_path_factory.mktemp("cpu-cluster-out") / "labels"
    # The command of the issue that reported it, as a user types it: no profile, no runtime env file.
    _, logs = run_job(
        cluster,
        checkout,
        *["--", "python", "jobs/label_images.py", "--input", str(images[0].parent), "--output", str(output)],
        *["--model", "mnasnet0_5", "--weights", str(checkpoint_path)],
    )
    rows = {row["uri"]: row for row in pads.dataset(output, format="parquet").to_table().to_pylist()}
    assert set(rows) == {str(p) for p in images}
    support.assert_reference_rows(rows, images, fixture_model)
    # The model actor holds part of a node's one CPU, not 3/4 of the cluster's two, nor the whole CPU: after a loss
    # the node left holds it and a decode task beside it (costs.split_cpus).
    plan = re.search(r"with \{'num_cpus': ([0-9.]+)\}, decode tasks of ([0-9.]+) CPUs", logs)
    assert plan, logs[-6000:]
    actor_cpus, decode_cpus = float(plan[1]), float(plan[2])
    assert 0 < actor_cpus < 1 and actor_cpus + decode_cpus <= 1.0
