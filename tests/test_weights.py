"""Finding, verifying and fitting checkpoints, before any image is read."""

import hashlib

import pytest
import torch
import torchvision

from mnasnet_batch.config import StorageConfig
from mnasnet_batch.storage import Storage
from mnasnet_batch.weights import WeightsError, build_model, hub_path, resolve_checkpoint, torchvision_weights


def test_local_checkpoint_is_verified_and_identified_by_sha256(checkpoint_path):
    checkpoint = resolve_checkpoint("mnasnet0_5", str(checkpoint_path))
    digest = hashlib.sha256(checkpoint_path.read_bytes()).hexdigest()
    assert checkpoint.weights_id == digest
    assert resolve_checkpoint("mnasnet0_5", str(checkpoint_path), sha256=digest.upper()).weights_id == digest
    model = build_model(checkpoint)
    assert not model.training


def test_expected_sha256_mismatch_fails(checkpoint_path):
    with pytest.raises(WeightsError, match="model.sha256 expects " + "0" * 64):
        resolve_checkpoint("mnasnet0_5", str(checkpoint_path), sha256="0" * 64)


def test_torchvision_file_name_hash_prefix_is_checked_on_every_load(tmp_path, checkpoint_path):
    # Our fixture bytes under torchvision's published name: its sha256 cannot start with 3ffadce67e.
    impostor = tmp_path / "mnasnet0.5_top1_67.823-3ffadce67e.pth"
    impostor.write_bytes(checkpoint_path.read_bytes())
    with pytest.raises(WeightsError, match="does not start with 3ffadce67e"):
        resolve_checkpoint("mnasnet0_5", str(impostor))


def test_wrong_architecture_fails_before_any_image(tmp_path, checkpoint_path):
    with pytest.raises(WeightsError, match=r"do not fit mnasnet1_0: .*shape mismatches"):
        resolve_checkpoint("mnasnet1_0", str(checkpoint_path))
    resnet = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), resnet)
    with pytest.raises(WeightsError, match=r"do not fit mnasnet0_5: \d+ missing keys"):
        resolve_checkpoint("mnasnet0_5", str(resnet))


def test_training_checkpoint_is_not_a_state_dict(tmp_path, fixture_model):
    path = tmp_path / "train.pth"
    torch.save({"model": fixture_model.state_dict(), "epoch": 3}, path)
    with pytest.raises(WeightsError, match="not a state_dict"):
        resolve_checkpoint("mnasnet0_5", str(path))


def test_pickled_module_is_refused_without_pointing_at_the_unsafe_option(tmp_path, fixture_model):
    pickled = tmp_path / "pickled.pth"
    torch.save(fixture_model, pickled)  # a whole pickled module: loading it would run code from the file
    with pytest.raises(WeightsError) as info:
        resolve_checkpoint("mnasnet0_5", str(pickled))
    message = str(info.value)
    assert "torchvision.models.mnasnet.MNASNet" in message
    assert "a state_dict saved with torch.save(model.state_dict(), path)" in message
    assert "weights_only=False" not in message and "safe_globals" not in message and "\n" not in message


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage, not pickled", b"PK\x03\x04 not a zip", b"\x80\x02}q\x00"],
    ids=["empty", "garbage", "bad-zip", "truncated-pickle"],
)
def test_unloadable_file_is_one_line_naming_what_the_file_must_be(tmp_path, content):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError) as info:
        resolve_checkpoint("mnasnet0_5", str(path))
    message = str(info.value)
    assert str(path) in message and "torch.save(model.state_dict(), path)" in message
    assert "\n" not in message and "weights_only=False" not in message
    if not content:
        assert "empty (0 bytes)" in message


def test_weights_uri_is_read_with_the_storage_settings(s3_server, checkpoint_path):
    storage = StorageConfig(**s3_server)
    fs, _ = Storage(storage).filesystem("s3://weights-bucket")
    fs.mkdir("weights-bucket")
    fs.pipe("weights-bucket/fixture.pth", checkpoint_path.read_bytes())
    checkpoint = resolve_checkpoint("mnasnet0_5", "s3://weights-bucket/fixture.pth", storage=Storage(storage))
    assert checkpoint.data == checkpoint_path.read_bytes() and checkpoint.source == "s3://weights-bucket/fixture.pth"


def test_missing_file_names_the_option(tmp_path):
    with pytest.raises(WeightsError, match="pass --weights"):
        resolve_checkpoint("mnasnet0_5", str(tmp_path / "nope.pth"))


@pytest.mark.parametrize("download", [False, True])
def test_default_weights_absent_offline_names_the_expected_path(tmp_path, monkeypatch, download):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # Offline for certain: every HTTPS request goes to a closed port on loopback.
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "mnasnet0.5_top1_67.823-3ffadce67e.pth"
    assert hub_path(torchvision_weights("mnasnet0_5")) == expected
    with pytest.raises(WeightsError) as info:
        resolve_checkpoint("mnasnet0_5", "IMAGENET1K_V1", download=download)
    message = str(info.value)
    assert str(expected) in message and "--weights" in message
    assert "https://download.pytorch.org/models/mnasnet0.5_top1_67.823-3ffadce67e.pth" in message
    assert not expected.exists()
