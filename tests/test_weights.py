"""Finding, verifying and fitting checkpoints, before any image is read."""

import hashlib

import pytest
import torch
import torchvision

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
    pickled = tmp_path / "pickled.pth"
    torch.save(fixture_model, pickled)  # a whole pickled module: refused by weights_only=True
    with pytest.raises(WeightsError, match="weights_only=True"):
        resolve_checkpoint("mnasnet0_5", str(pickled))


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
