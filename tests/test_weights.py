"""Finding, verifying and fitting checkpoints, before any image is read."""

import copy
import hashlib
import logging

import pytest
import torch
import torch.distributed as dist
import torchvision

from mnasnet_batch.config import StorageConfig
from mnasnet_batch.model.engine import NormalisedModel
from mnasnet_batch.model.weights import (
    Checkpoint,
    WeightsError,
    build_model,
    hub_path,
    resolve_checkpoint,
    torchvision_weights,
)
from mnasnet_batch.storage import Storage
from tests import support


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


@pytest.fixture(scope="module")
def ddp_state_dict(tmp_path_factory, fixture_model):
    """What a DistributedDataParallel training loop's ``model.state_dict()`` returns (one process, gloo, on CPU)."""
    store = tmp_path_factory.mktemp("process_group") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        # A copy: DDP may write to its module's tensors (its first broadcast), and the fixture model is shared.
        return torch.nn.parallel.DistributedDataParallel(copy.deepcopy(fixture_model)).state_dict()
    finally:
        dist.destroy_process_group()


def stripped(state_dict):
    """What a prefix-stripping dict comprehension returns: a plain dict, without the versions torch.save keeps."""
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


# Each shape a training loop saves, made from the fixture model and a DDP state_dict of the same weights, with the
# adaptations the log line names.
TRAINING_SHAPES = {
    "ddp": (lambda model, ddp: ddp, ["'module.' prefix"]),
    "ddp-as-plain-dict": (lambda model, ddp: dict(ddp), ["'module.' prefix", "MNASNet version as 2"]),
    "prefix-stripped-plain-dict": (lambda model, ddp: stripped(ddp), ["MNASNet version as 2"]),
    "compiled": (lambda model, ddp: torch.compile(model).state_dict(), ["'_orig_mod.' prefix"]),
    "state_dict-entry": (lambda model, ddp: {"state_dict": model.state_dict(), "epoch": 3}, ["'state_dict' entry"]),
    "model-entry": (lambda model, ddp: {"model": model.state_dict(), "epoch": 3}, ["'model' entry"]),
    "model_state_dict-entry": (
        lambda model, ddp: {
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict(),
            "epoch": 3,
        },
        ["'model_state_dict' entry"],
    ),
    "state_dict-entry-of-ddp": (
        lambda model, ddp: {"state_dict": ddp, "epoch": 3},
        ["'state_dict' entry", "'module.' prefix"],
    ),
    "model-entry-of-ddp-as-plain-dict": (
        lambda model, ddp: {"model": dict(ddp), "epoch": 3},
        ["'model' entry", "'module.' prefix", "MNASNet version as 2"],
    ),
    "model-entry-of-data-parallel-compiled": (
        lambda model, ddp: {"model": torch.nn.DataParallel(torch.compile(model)).state_dict()},
        ["'model' entry", "'module.' prefix", "'_orig_mod.' prefix"],
    ),
}


@pytest.mark.parametrize("shape", TRAINING_SHAPES)
def test_training_loop_checkpoint_loads_as_its_state_dict(tmp_path, caplog, fixture_model, ddp_state_dict, shape):
    make, adaptations = TRAINING_SHAPES[shape]
    path = tmp_path / "trained.pth"
    torch.save(make(fixture_model, ddp_state_dict), path)
    with caplog.at_level(logging.INFO, logger="mnasnet_batch.model.weights"):
        checkpoint = resolve_checkpoint("mnasnet0_5", str(path))
    assert checkpoint.weights_id == hashlib.sha256(path.read_bytes()).hexdigest()
    (line,) = [r.getMessage() for r in caplog.records if r.name == "mnasnet_batch.model.weights"]
    assert line.startswith(f"weights {path} adapted to load into mnasnet0_5: ")
    assert all(adaptation in line for adaptation in adaptations), line
    assert line.count(";") == len(adaptations) - 1, line

    model = build_model(checkpoint)
    original = fixture_model.state_dict()
    loaded = model.state_dict()
    assert list(loaded) == list(original)
    assert all(torch.equal(loaded[key], original[key]) for key in original)
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(images), fixture_model.eval()(images), rtol=0, atol=0)
    # The actors' model (engine.NormalisedModel) loads the same bytes the same way.
    plain = Checkpoint("mnasnet0_5", support.checkpoint_bytes(fixture_model), "plain", "memory")
    crops = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(NormalisedModel(checkpoint)(crops), NormalisedModel(plain)(crops), rtol=0, atol=0)


def test_plain_state_dict_loads_without_a_log_line(caplog, checkpoint_path):
    with caplog.at_level(logging.INFO, logger="mnasnet_batch.model.weights"):
        resolve_checkpoint("mnasnet0_5", str(checkpoint_path))
    assert not [r for r in caplog.records if r.name == "mnasnet_batch.model.weights"]


def test_training_checkpoint_takes_the_weights_not_their_ema(tmp_path, fixture_model):
    ema = support.make_model("mnasnet0_5", seed=1)
    path = tmp_path / "train.pth"
    torch.save({"model": fixture_model.state_dict(), "model_ema": ema.state_dict(), "epoch": 3}, path)
    loaded = build_model(resolve_checkpoint("mnasnet0_5", str(path))).state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in fixture_model.state_dict().items())


@pytest.mark.parametrize(
    "entries",
    [{"net": "weights", "epoch": 3}, {"model_ema": "weights"}, {"state_dict_ema": "weights"}, ["weights"]],
    ids=["unknown-entry", "ema-only", "ema-state_dict-only", "list"],
)
def test_checkpoint_without_a_known_state_dict_entry_is_refused(tmp_path, fixture_model, entries):
    path = tmp_path / "train.pth"
    state_dict = fixture_model.state_dict()
    if isinstance(entries, dict):
        entries = {key: state_dict if value == "weights" else value for key, value in entries.items()}
    torch.save([state_dict] if isinstance(entries, list) else entries, path)
    with pytest.raises(WeightsError) as info:
        resolve_checkpoint("mnasnet0_5", str(path))
    message = str(info.value)
    assert "are not a state_dict (a mapping of names to tensors), nor a training checkpoint with one under" in message
    assert "'state_dict' or 'model' or 'model_state_dict'" in message
    assert "torch.save(model.state_dict(), path)" in message


@pytest.mark.parametrize("entry", [{"epoch": 3}, ["not", "tensors"], 3], ids=["dict", "list", "int"])
def test_wrapper_entry_that_is_not_a_state_dict_is_refused(tmp_path, entry):
    path = tmp_path / "train.pth"
    torch.save({"model": entry, "epoch": 3}, path)
    with pytest.raises(WeightsError, match=r"hold a 'model' entry that is not a state_dict .*torch\.save\(model"):
        resolve_checkpoint("mnasnet0_5", str(path))


def test_pickled_module_in_a_wrapper_is_refused(tmp_path, fixture_model):
    path = tmp_path / "train.pth"
    torch.save({"model": fixture_model, "epoch": 3}, path)  # unpickling the module would run code from the file
    with pytest.raises(WeightsError, match=r"holds a pickled torchvision\.models\.mnasnet\.MNASNet"):
        resolve_checkpoint("mnasnet0_5", str(path))


def test_keys_that_do_not_fit_after_adaptation_are_refused(tmp_path, fixture_model):
    resnet = tmp_path / "resnet.pth"
    resnet_state_dict = torchvision.models.resnet18().state_dict()
    torch.save({"state_dict": {"module." + k: v for k, v in resnet_state_dict.items()}}, resnet)
    with pytest.raises(WeightsError, match=r"do not fit mnasnet0_5: \d+ missing keys \(e\.g\. classifier"):
        resolve_checkpoint("mnasnet0_5", str(resnet))
    # A prefix only some keys have is not stripped.
    partly = tmp_path / "partly.pth"
    state_dict = fixture_model.state_dict()
    torch.save({("module." + k if k.startswith("layers.0.") else k): v for k, v in state_dict.items()}, partly)
    with pytest.raises(WeightsError, match=r"do not fit mnasnet0_5: 1 missing keys .*1 unexpected keys \(e\.g\. mod"):
        resolve_checkpoint("mnasnet0_5", str(partly))


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
