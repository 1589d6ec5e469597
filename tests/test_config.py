import subprocess
import sys
from pathlib import Path

import pytest

from mnasnet_batch.cli import main
from mnasnet_batch.config import ConfigError, JobConfig, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_profile():
    assert load_config() == JobConfig()
    local = load_config(ROOT / "conf" / "local.yaml")
    assert local.model.name == "mnasnet0_5" and local.model.top_k == 5


def test_overrides_apply_in_order_and_convert_types(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("model:\n  top_k: 3\ncompute:\n  actor_cpus: 2\n")
    config = load_config(profile, [parse_override("model.top_k=7"), parse_override("input.extensions=jpg,png")])
    assert config.model.top_k == 7
    assert config.compute.actor_cpus == 2.0 and isinstance(config.compute.actor_cpus, float)
    assert config.input.extensions == ("jpg", "png")


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.colour=red", "unknown key model.colour; valid keys in model: name, weights, sha256, top_k, download"),
        ("modle.name=x", "unknown section 'modle'; valid sections: input, output, model"),
        ("model.top_k=many", "model.top_k: expected int, got 'many'"),
        ("model.top_k=0", "model.top_k: 0 is not between 1 and 1000"),
        ("model.name=resnet50", "is not one of mnasnet0_5, mnasnet0_75, mnasnet1_0, mnasnet1_3"),
        ("model.download=maybe", "model.download: expected bool"),
        ("model.sha256=abc", "is not 64 hexadecimal digits"),
        ("input.extensions=jpg,exe", "input.extensions: ['exe'] not supported"),
        ("compute.min_actors=3", None),
    ],
)
def test_bad_values_are_rejected_with_the_valid_choices(override, message):
    if message is None:
        with pytest.raises(ConfigError, match="max_actors"):
            load_config(overrides=[parse_override(override), parse_override("compute.max_actors=2")])
        return
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[parse_override(override)])
    assert message in str(info.value)


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    profile = tmp_path / "bad.yaml"
    profile.write_text("output:\n  path: /tmp/x\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key output.path; valid keys in output: uri"):
        load_config(profile)


def test_cli_exits_2_with_the_message_before_touching_anything(tmp_path, capsys):
    assert main(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--set", "model.top_k=-1"]) == 2
    assert "error: model.top_k: -1 is not between 1 and 1000" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["--output", str(tmp_path / "o")]) == 2
    assert "--input and --output are required" in capsys.readouterr().err


def test_job_script_reports_bad_config_and_exits_non_zero(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "label_images.py"),
            "--input",
            str(tmp_path),
            "--output",
            str(tmp_path / "o"),
            "--set",
            "compute.gpus=1",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "unknown key compute.gpus; valid keys in compute:" in result.stderr


def test_derived_model_resources_leave_room_for_decoding():
    from mnasnet_batch.job import decode_task_cpus, model_actor_pool

    config = load_config()
    for cpus in (1, 2, 8, 16, 64):
        for model_share in (0.02, 0.5, 0.75, 0.99):
            pool = model_actor_pool(config, {"CPU": cpus}, None, model_share)
            decode_cpus = decode_task_cpus(config, {"CPU": cpus}, pool)
            assert pool.max_size * pool.resources["num_cpus"] + decode_cpus <= cpus + 1e-6
            assert decode_cpus >= 0.25 and pool.resources["num_cpus"] <= 4 and pool.min_size == 1 <= pool.max_size
    assert model_actor_pool(config, {"CPU": 2}).resources == {"num_cpus": 1.5}
    assert model_actor_pool(config, {"CPU": 64, "GPU": 8}).resources == {"num_gpus": 1, "num_cpus": 1}
    assert model_actor_pool(config, {"CPU": 64, "GPU": 8}).max_size == 8
    with pytest.raises(ValueError, match="too few"):
        model_actor_pool(config, {"CPU": 0.25})


def test_one_input_however_it_is_written(tmp_path, monkeypatch):
    from mnasnet_batch.cli import build_parser, config_from_args

    (tmp_path / "photos").mkdir()
    (tmp_path / "w.pth").write_bytes(b"")
    monkeypatch.chdir(tmp_path)

    def resolved(*argv: str):
        config = config_from_args(build_parser().parse_args(["--output", "labels/", *argv]))
        return config.input.uri, config.output.uri, config.model.weights

    absolute = (str(tmp_path / "photos"), str(tmp_path / "labels"), "IMAGENET1K_V1")
    for spelling in ("photos", "./photos", "photos/", str(tmp_path / "photos") + "/"):
        assert resolved("--input", spelling) == absolute, spelling
    assert resolved("--input", "s3://bucket/photos/")[0] == "s3://bucket/photos"
    assert resolved("--input", "photos", "--weights", "w.pth")[2] == str(tmp_path / "w.pth")
    assert resolved("--input", "photos", "--weights", "DEFAULT")[2] == "DEFAULT"
