"""The deployment files agree with each other: Dockerfile, .dockerignore, profiles in conf/, KubeRay manifests.

No Docker engine or Kubernetes runs here, so these parse the files and check what would otherwise only fail
at build or schedule time: versions, paths, image names, entrypoints and the actor pool against the pods.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import shlex
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from mnasnet_batch.cli import build_parser
from mnasnet_batch.config import load_config
from tests.cluster import profile_health_checks

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as the tomli package (the test extra declares it)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
KUBERAY = ROOT / "conf" / "kuberay"


def pinned(name: str) -> str:
    """The exact version pyproject.toml pins for ``name`` (``ray[data,default]==2.60.0`` -> ``2.60.0``)."""
    for requirement in PYPROJECT["project"]["dependencies"]:
        match = re.fullmatch(rf"{name}(\[[^\]]*\])?==([\w.]+)", requirement)
        if match:
            return match.group(2)
    raise AssertionError(f"{name} is not pinned with == in pyproject.toml")


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def instruction(name: str) -> list[str]:
    return [arguments for keyword, arguments in dockerfile() if keyword == name]


def image_workdir() -> PurePosixPath:
    return PurePosixPath(instruction("WORKDIR")[-1])


def copied_paths() -> list[str]:
    """Repository paths the Dockerfile copies into the image (COPY's sources, flags dropped)."""
    paths = []
    for arguments in instruction("COPY"):
        parts = [p for p in shlex.split(arguments) if not p.startswith("--")]
        paths += parts[:-1]
    return paths


def built_image() -> str:
    """The tag the Dockerfile's documented build command gives the image."""
    match = re.search(r"docker build -t (\S+) \.", (ROOT / "Dockerfile").read_text())
    assert match, "the Dockerfile documents its build command: docker build -t IMAGE ."
    return match.group(1)


def load_yaml(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def containers(cluster_spec: dict) -> list[dict]:
    pods = [cluster_spec["headGroupSpec"]] + cluster_spec["workerGroupSpecs"]
    return [c for pod in pods for c in pod["template"]["spec"]["containers"]]


def worker_group(cluster_spec: dict, name: str) -> dict:
    return next(g for g in cluster_spec["workerGroupSpecs"] if g["groupName"] == name)


def memory_gib(quantity: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(Gi|Mi)", quantity).groups()
    return float(number) / (1024 if unit == "Mi" else 1)


# Dockerfile


def test_base_image_is_the_official_ray_gpu_image_of_the_pinned_ray_and_python():
    (base,) = instruction("FROM")
    match = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d)(?P<minor>\d+)-gpu", base)
    assert match, f"FROM {base}: expected rayproject/ray:RAY-pyXY-gpu"
    assert match["ray"] == pinned("ray")
    # The Python the suite runs on is the one the job is tested with; it must also satisfy requires-python.
    assert (int(match["py"]), int(match["minor"])) == sys.version_info[:2]
    assert f"{match['py']}.{match['minor']}" in SpecifierSet(PYPROJECT["project"]["requires-python"])


def test_image_installs_the_tested_torch_pair_and_the_package_with_its_extras():
    run = " ".join(instruction("RUN"))
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    for package in ("torch", "torchvision"):
        version = re.search(rf"\b{package}==([\w.]+)", setup).group(1)
        assert f'"{package}=={version}"' in run or f"{package}=={version} " in run, package
    extras = re.search(r'pip install [^"]*"\.\[([\w,]+)\]"', run)
    assert extras, 'the package is installed from the build context with extras: pip install ".[...]"'
    # The cloud filesystems, and ONNX Runtime for CPU model actors (compute.engine=auto).
    wanted = {"s3", "gcs", "azure", "onnx"}
    assert wanted <= set(extras.group(1).split(",")) <= set(PYPROJECT["project"]["optional-dependencies"])


def test_image_runs_as_the_non_root_ray_user_with_the_job_entrypoint():
    assert instruction("USER")[-1] == "ray"
    assert all("--chown=ray:users" in arguments for arguments in instruction("COPY"))
    entrypoint = yaml.safe_load(instruction("ENTRYPOINT")[-1])  # exec form: a JSON list
    assert entrypoint[0] == "python" and (ROOT / entrypoint[1]).is_file()
    assert entrypoint[1].split("/")[0] in copied_paths()


def test_copied_paths_exist_and_the_dockerignore_keeps_them():
    ignore = [
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in ("pyproject.toml", "README.md", "mnasnet_batch", "jobs", "conf"):
        assert needed in copied_paths()
    for path in copied_paths():
        assert (ROOT / path).exists(), path
        files = [path] + [str(p.relative_to(ROOT)) for p in (ROOT / path).rglob("*") if "__pycache__" not in p.parts]
        for file in files:
            assert not any(fnmatch.fnmatch(file, pattern) for pattern in ignore), f"{file} is in .dockerignore"
    for heavy in (".venv", ".git", "tests"):
        assert heavy in ignore, f".dockerignore should exclude {heavy}"


# Profiles


@pytest.mark.parametrize("profile", ["local.yaml", "cpu-cluster.yaml", "gpu-cluster.yaml", "photos.yaml"])
def test_profiles_load_and_comment_every_value(profile):
    path = ROOT / "conf" / profile
    load_config(path)
    for number, line in enumerate(path.read_text().splitlines(), 1):
        # A value line (`  key: value`) needs a comment saying why; section headers (`compute:`) do not.
        if re.match(r"^\s+\w+:\s*\S", line):
            assert "#" in line, f"{profile}:{number} has no comment: {line.strip()}"


def test_photos_profile_turns_portraits_upright_and_decodes_fast():
    photos = load_config(ROOT / "conf" / "photos.yaml")
    assert photos.preprocess.apply_exif_orientation and photos.preprocess.fast_decode
    # Otherwise the local profile: what differs is only what the photo profile is for.
    local = load_config(ROOT / "conf" / "local.yaml")
    assert dataclasses.replace(photos.preprocess, apply_exif_orientation=False, fast_decode=False) == local.preprocess
    assert dataclasses.replace(photos, preprocess=local.preprocess) == local


def test_cluster_profiles_pick_their_devices():
    assert load_config(ROOT / "conf" / "cpu-cluster.yaml").compute.device == "cpu"
    assert load_config(ROOT / "conf" / "gpu-cluster.yaml").compute.device == "gpu"
    runtime_env = yaml.safe_load((ROOT / "conf" / "runtime_env.yaml").read_text())
    assert "working_dir" not in runtime_env  # given by --working-dir on the command line
    assert "tests/" in runtime_env["excludes"]


# KubeRay


def test_cluster_spec_is_the_same_in_the_raycluster_rayjob_and_raycronjob():
    cluster, job, cron = load_yaml("raycluster.yaml"), load_yaml("rayjob.yaml"), load_yaml("raycronjob.yaml")
    assert (cluster["kind"], job["kind"], cron["kind"]) == ("RayCluster", "RayJob", "RayCronJob")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    template = cron["spec"]["jobTemplate"]
    # The schedule labels only what is new each night; everything else is the RayJob's.
    assert template["entrypoint"] == job["spec"]["entrypoint"] + " --mode incremental"
    assert {k: v for k, v in template.items() if k != "entrypoint"} == {
        k: v for k, v in job["spec"].items() if k != "entrypoint"
    }
    assert len(cron["spec"]["schedule"].split()) == 5


def test_every_pod_runs_the_dockerfile_image_with_token_auth_and_the_pinned_ray():
    spec = load_yaml("raycluster.yaml")["spec"]
    version = PYPROJECT["project"]["version"]
    assert built_image().endswith(f"/mnasnet-batch:{version}")
    assert {c["image"] for c in containers(spec)} == {built_image()}
    assert spec["rayVersion"] == pinned("ray")
    assert spec["authOptions"]["mode"] == "token"
    assert spec["enableInTreeAutoscaling"] is True


def test_worker_groups_cpu_for_decoding_gpu_for_the_model():
    spec = load_yaml("raycluster.yaml")["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    cpu, gpu = worker_group(spec, "cpu"), worker_group(spec, "gpu")
    (cpu_container,) = cpu["template"]["spec"]["containers"]
    (gpu_container,) = gpu["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in cpu_container["resources"]["limits"]
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"] and cpu["minReplicas"] < cpu["maxReplicas"]
    # The GPU profile's pool fits the GPU group: one actor per GPU at most, and an actor fits in a pod.
    compute = load_config(ROOT / "conf" / "gpu-cluster.yaml").compute
    limits = gpu_container["resources"]["limits"]
    gpus_per_pod = int(limits["nvidia.com/gpu"])
    assert compute.max_actors == gpu["maxReplicas"] * gpus_per_pod
    assert compute.actor_cpus <= float(limits["cpu"]) / gpus_per_pod
    assert compute.actor_memory_gb <= memory_gib(limits["memory"]) / gpus_per_pod
    # Where Ray does not report its node types, the profile says the CPU group's (the plan's decoding CPUs).
    assert compute.node_cpus == float(cpu_container["resources"]["limits"]["cpu"])
    assert compute.max_nodes == cpu["maxReplicas"]


def test_the_head_notices_a_lost_node_within_seconds():
    # tests/test_node_loss.py runs its head with these; their effect is measured in docs/benchmarks.md.
    checks = profile_health_checks()
    assert set(checks) == {"RAY_health_check_period_ms", "RAY_health_check_timeout_ms"}
    # Ray's defaults are 3000 and 10000: 5 failed checks in a row take 15 to 50 s.
    assert int(checks["RAY_health_check_period_ms"]) < 3000 and int(checks["RAY_health_check_timeout_ms"]) < 10000


@pytest.mark.parametrize("manifest", ["rayjob.yaml", "raycronjob.yaml"])
def test_entrypoint_is_the_dockerfile_job_with_the_gpu_profile(manifest):
    data = load_yaml(manifest)
    spec = data["spec"].get("jobTemplate", data["spec"])
    command = shlex.split(spec["entrypoint"])
    workdir = image_workdir()
    entrypoint = yaml.safe_load(instruction("ENTRYPOINT")[-1])
    assert command[:2] == [entrypoint[0], str(workdir / entrypoint[1])]
    args = build_parser().parse_args(command[2:])  # every flag is one the job accepts
    config = PurePosixPath(args.config)
    assert config == workdir / "conf" / "gpu-cluster.yaml" and "conf" in copied_paths()
    load_config(ROOT / config.relative_to(workdir))
    assert args.input and args.output
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
