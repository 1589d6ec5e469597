"""What a user types does what it says: an output bucket is never created by a typo, every --set error is one line
and exit 2, --set into a mapping sets that key, and chart text is never parsed as mathtext."""

import json

import numpy as np
import pytest

from mnasnet_batch.cli import main
from mnasnet_batch.config import ConfigError, StorageConfig, load_config, parse_override
from mnasnet_batch.evaluation import report
from mnasnet_batch.storage import Storage, bucket_of


def storage_flags(s3_server) -> list[str]:
    """``--set`` flags that reach moto, one key of storage.options at a time."""
    flags = ["--set", f"storage.endpoint_url={s3_server['endpoint_url']}"]
    for name, value in s3_server["options"].items():
        flags += ["--set", f"storage.options.{name}={value}"]
    return flags


def error_lines(printed: str) -> list[str]:
    """The lines of what the job printed that say it failed; none may be a traceback."""
    assert "Traceback" not in printed
    return [line for line in printed.strip().splitlines() if line.startswith("error:")]


def test_an_output_bucket_that_does_not_exist_stops_the_job_before_reading(s3_server, corpus, capsys):
    fs, _ = Storage(StorageConfig(**s3_server)).filesystem("s3://user-input")
    fs.mkdir("user-input")
    fs.pipe(f"user-input/photos/{corpus[0].name}", corpus[0].read_bytes())
    output = "s3://nonexistent-bucket-adv6b/out"
    assert main(["--input", "s3://user-input/photos", "--output", output, *storage_flags(s3_server)]) == 2
    assert error_lines(capsys.readouterr().err) == [
        "error: output s3://nonexistent-bucket-adv6b/out: bucket nonexistent-bucket-adv6b does not exist; check its "
        "name, create it, or set output.create_bucket=true to let the job create it"
    ]
    assert not fs.exists("nonexistent-bucket-adv6b")


def test_create_bucket_creates_it(s3_server, monkeypatch):
    from mnasnet_batch import cli

    fs, _ = Storage(StorageConfig(**s3_server)).filesystem("s3://asked-for-bucket")
    overrides = [parse_override(f"storage.endpoint_url={s3_server['endpoint_url']}")]
    overrides += [parse_override(f"storage.options={json.dumps(s3_server['options'])}")]
    config = load_config(overrides=[*overrides, parse_override("output.uri=s3://asked-for-bucket/out")])
    with pytest.raises(cli.StorageError, match="bucket asked-for-bucket does not exist"):
        cli.check_bucket(config, Storage(config.storage))
    config = load_config(overrides=[*overrides, parse_override("output.uri=s3://asked-for-bucket/out"),
                                    parse_override("output.create_bucket=true")])
    cli.check_bucket(config, Storage(config.storage))
    assert fs.exists("asked-for-bucket")
    cli.check_bucket(config, Storage(config.storage))  # there now: nothing to do


def test_bucket_names():
    assert bucket_of("s3://b/out") == "b" and bucket_of("gs://b") == "b"
    assert bucket_of("az://container/x") == "container"
    assert bucket_of("abfs://container@account.dfs.core.windows.net/out") == "container"
    assert bucket_of("/data/out") == "" and bucket_of("memory://out") == "" and bucket_of("https://h/x") == ""


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        (
            "model.name=!!python/object/apply:os.system ['touch /tmp/cloud-pwned']",
            "error: --set model.name=...: the value is not valid YAML (could not determine a constructor for the tag "
            "'tag:yaml.org,2002:python/object/apply:os.system'); quote it",
        ),
        ("model.top_k=[1", "error: --set model.top_k=...: the value is not valid YAML (expected ',' or ']', but got "
         "'<stream end>'); quote it"),
        ("model.name.x=1", "error: --set: model.name is not a mapping of keys; set it as model.name=value"),
        ("model", "error: --set 'model': expected section.key=value, for example model.top_k=3"),
        ("storage.options..key=1", "error: --set 'storage.options..key=1': expected section.key=value, for example "
         "model.top_k=3"),
        ("nosuch.key=1", "error: --set: unknown section 'nosuch'; valid sections: input, output, model, preprocess, "
         "compute, ray, progress, storage"),
    ],
)
def test_every_set_error_is_one_line_and_exit_2(assignment, message, tmp_path, capsys):
    status = main(["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--set", assignment])
    assert status == 2
    assert error_lines(capsys.readouterr().err) == [message]


def test_set_into_a_mapping_sets_that_key_and_keeps_the_others(tmp_path):
    profile = tmp_path / "profile.yaml"
    profile.write_text("storage:\n  options: {anon: false, s3: {requester_pays: true}}\n")
    assignments = ["storage.options.key=AKIA1", "storage.options.secret=s3cr3t", "storage.options.s3.region=eu",
                   "output.catalog.uri=sqlite:///c.db"]
    config = load_config(profile, [parse_override(a) for a in assignments])
    assert config.storage.options == {
        "anon": False,
        "s3": {"requester_pays": True, "region": "eu"},
        "key": "AKIA1",
        "secret": "s3cr3t",
    }
    assert config.output.catalog == {"uri": "sqlite:///c.db"}
    # A whole mapping still replaces the one before it.
    replaced = load_config(profile, [parse_override("storage.options={key: k}")])
    assert replaced.storage.options == {"key": "k"}
    with pytest.raises(ConfigError, match="storage.anonymous is not a mapping"):
        load_config(overrides=[parse_override("storage.anonymous.x=1")])


def test_chart_text_is_never_parsed_as_mathtext():
    hostile = ["$\\frac{1}{$", "price $5 and $6", "$$", "$x^$"]
    stats = report.RunStats(
        images=8,
        errors=1,
        top1_scores=np.array([0.2, 0.9, 0.4, 0.7, 0.3, 0.8, 0.95]),
        label_counts=[(label, 2) for label in hostile],
        error_kinds=[("$Bad$Error", 1)],
        models=["mnasnet0_5"],
        weights=["w"],
        low_confidence=0.5,
        runs=[{"run_id": "$\\frac{1}{$", "images_per_s": 3.0, "seconds": 1.0, "status": "succeeded",
               "counts": {"labeled_this_attempt": 8}}],
    )
    page = report.render(stats, "/out")
    assert page.count("data:image/png;base64,") == 5  # every chart drawn
    assert "$\\frac{1}{$" in page  # and listed as text
