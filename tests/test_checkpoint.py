"""Checkpoints: crash-safe writing, safe reading with errors naming the file, init_from (this project's files,
the authors' and safetensors), and finding the checkpoint to resume from."""

import pytest
import torch

import os
import time

from tests.helpers.runs import OFFICIAL_FIXTURES as FIXTURES
from dlsn.checkpoint import (
    NETWORK_PREFIX,
    build_network,
    AtomicCheckpointIO,
    CheckpointError,
    find_resume_checkpoint,
    init_from,
    read_checkpoint,
    read_weights,
    save_weights,
)
from dlsn.lightning_module import SRModule
from dlsn.utils.files import atomic_write, write_json_strict
from dlsn.models import DLSN, to_official

TINY = dict(n_feats=8, n_resgroups=1, n_resblocks=1, chunk_size=16, n_hashes=1)


def test_failed_write_keeps_previous_file(tmp_path):
    target = tmp_path / "results.json"
    write_json_strict(target, {"Set5": {"psnr": 33.0}})

    def crash(handle):
        handle.write("{ half a fi")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, crash, mode="w")
    assert target.read_text().startswith('{\n  "Set5"')
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind


def test_checkpoint_io_is_atomic(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    assert io.load_checkpoint(path)["global_step"] == 1

    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise KeyboardInterrupt  # e.g. the job is killed mid-write

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    loaded = io.load_checkpoint(path)
    assert loaded["global_step"] == 1 and torch.equal(loaded["w"], torch.ones(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def _lightning_checkpoint(net, path):
    torch.save(
        {"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "pytorch-lightning_version": "2", "global_step": 5},
        path,
    )


def _upsampler_names(net):
    return {f"upsampler.{k}" for k in net.upsampler.state_dict()}


@pytest.mark.parametrize("target_scale", [2, 3, 4])
def test_pretrained_lightning_checkpoint_across_scales(tmp_path, target_scale):
    torch.manual_seed(0)
    source = DLSN(2, **TINY)
    path = tmp_path / "x2.ckpt"
    _lightning_checkpoint(source, path)

    torch.manual_seed(1)
    target = DLSN(target_scale, **TINY)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    reinitialised = init_from(target, path)

    source_state, target_state = source.state_dict(), target.state_dict()
    upsampler = _upsampler_names(target)
    for key, value in target_state.items():
        if key in upsampler and target_scale != 2:
            assert torch.equal(value, fresh[key]), key  # kept its fresh initialisation
        else:
            assert torch.equal(value, source_state[key]), key
    if target_scale == 2:
        assert reinitialised == []
    else:
        assert set(reinitialised) == upsampler  # the whole upsampler, also layers whose shape happens to fit


def test_pretrained_mismatch_outside_upsampler_is_an_error(tmp_path):
    path = tmp_path / "wide.ckpt"
    _lightning_checkpoint(DLSN(2, **{**TINY, "n_feats": 16}), path)
    with pytest.raises(CheckpointError, match=r"(?s)init_from=.*wide.ckpt does not fit.*head.weight: shape \(16, 3, 3, 3\)"):
        init_from(DLSN(2, **TINY), path)


def test_pretrained_missing_file_names_it(tmp_path):
    with pytest.raises(CheckpointError, match="not found: .*nope.ckpt"):
        init_from(DLSN(2, **TINY), tmp_path / "nope.ckpt")


@pytest.mark.parametrize("target_scale", [2, 3])
def test_pretrained_official_state_dict(tmp_path, target_scale):
    torch.manual_seed(0)
    source = DLSN(2, **TINY)
    path = tmp_path / "model_best.pt"
    torch.save(to_official(source), path)
    target = DLSN(target_scale, **TINY)
    reinitialised = init_from(target, path)
    official_source, official_target = to_official(source), to_official(target)
    for key, value in official_target.items():
        if not key.startswith("tail.0."):
            assert torch.equal(value, official_source[key]), key
    assert (reinitialised == []) == (target_scale == 2)
    assert set(reinitialised) == (set() if target_scale == 2 else _upsampler_names(target))


@pytest.mark.skipif(not (FIXTURES / "dlsn_tiny_x2.pt").exists(), reason=f"official fixtures absent at {FIXTURES}")
@pytest.mark.parametrize("wrapping", ["bare", "state_dict", "DataParallel"])
def test_pretrained_authors_file_reproduces_their_output(tmp_path, wrapping):
    """init_from with the authors' .pt: the network computes what the published code recorded."""
    fixture = torch.load(FIXTURES / "dlsn_tiny_x2.pt", weights_only=True)
    state = fixture["state_dict"]
    if wrapping == "DataParallel":
        state = {f"module.{key}": value for key, value in state.items()}
    path = tmp_path / "official.pt"
    torch.save({"state_dict": state} if wrapping == "state_dict" else state, path)
    net = DLSN(**fixture["config"])
    assert init_from(net, path) == []
    net.eval()
    n_hashes = fixture["config"]["n_hashes"]
    for run in fixture["runs"]:
        rounds = run["rotations"]
        rotations = [torch.stack(rounds[i:i + n_hashes]) for i in range(0, len(rounds), n_hashes)]
        with torch.no_grad():
            output = net(run["input"], rotations)
        torch.testing.assert_close(output, run["output"], rtol=1e-5, atol=1e-5)


def test_the_module_keeps_the_network_under_the_prefix_checkpoints_are_read_with():
    module = SRModule(DLSN(2, **TINY), scale=2)
    assert {k for k in module.state_dict() if k.startswith(NETWORK_PREFIX)} == {
        NETWORK_PREFIX + k for k in module.net.state_dict()
    }


def test_safetensors_export_round_trip_with_config(tmp_path):
    torch.manual_seed(0)
    net = DLSN(2, **TINY)
    config = {"_target_": "dlsn.models.DLSN", "scale": 2, **TINY}
    save_weights(tmp_path / "w.safetensors", net, config)
    weights = read_weights(tmp_path / "w.safetensors")
    assert weights.format == "safetensors" and weights.config == config
    assert all(torch.equal(weights.state_dict[k], v) for k, v in net.state_dict().items())


def test_official_file_gives_its_configuration(tmp_path):
    source = DLSN(3, **{**TINY, "n_resblocks": 2}, rgb_range=255)
    torch.save({"state_dict": {f"module.{k}": v for k, v in to_official(source).items()}}, tmp_path / "x3.pt")
    weights = read_weights(tmp_path / "x3.pt")
    assert weights.format == "official"
    assert {k: weights.config[k] for k in ("scale", "n_feats", "n_resgroups", "n_resblocks", "chunk_size", "rgb_range")} == {
        "scale": 3, "n_feats": 8, "n_resgroups": 1, "n_resblocks": 2, "chunk_size": 16, "rgb_range": 255.0}
    assert all(torch.equal(weights.state_dict[k], v) for k, v in source.state_dict().items())


# ------------------------------------------------------------------------- damaged and hostile files


def test_empty_truncated_and_random_files_are_named_with_the_reason(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"global_step": 3, "state_dict": {"net.w": torch.ones(1000)}}, good)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match=r"empty.ckpt is empty \(0 bytes\)"):
        read_checkpoint(empty)
    with pytest.raises(CheckpointError, match=r"truncated.ckpt is truncated"):
        read_checkpoint(truncated)
    with pytest.raises(CheckpointError, match=r"noise.pt is (truncated or )?not a PyTorch checkpoint") as info:
        read_checkpoint(noise)
    assert "weights_only=False" not in str(info.value) and "trust_checkpoint" not in str(info.value)


class Payload:
    """Unpickling this runs ``os.system``: what a hostile checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_payload_does_not_run_unless_trusted(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "DLSN_x2.pt"
    torch.save({"state_dict": {"head.0.weight": torch.zeros(1)}, "hook": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"DLSN_x2.pt holds a Python object \(posix.system\).*trust_checkpoint=true"):
        read_weights(path)
    with pytest.raises(CheckpointError):
        init_from(DLSN(2, **TINY), path)
    assert not marker.exists()
    read_checkpoint(path, trust=True)  # the explicit opt-in runs it, as documented
    assert marker.exists()


def test_resume_skips_an_empty_or_truncated_last_checkpoint_naming_it(tmp_path, caplog):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    now = time.time()
    best = checkpoints / "best.ckpt"
    torch.save({"global_step": 1200, "state_dict": {}}, best)
    os.utime(best, (now - 100, now - 100))
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    torch.save({"global_step": 1000, "state_dict": {"w": torch.ones(100)}}, hpc)
    os.utime(hpc, (now - 50, now - 50))
    last = checkpoints / "last.ckpt"
    last.write_bytes(b"")
    with caplog.at_level("WARNING"):
        assert find_resume_checkpoint(tmp_path) == str(hpc)
    assert "last.ckpt" in caplog.text and "empty" in caplog.text
    hpc.write_bytes(hpc.read_bytes()[:100])
    assert find_resume_checkpoint(tmp_path) == str(best)  # the last resort
    best.write_bytes(b"garbage")
    assert find_resume_checkpoint(tmp_path) is None


@pytest.mark.parametrize("target", ["subprocess.run", "os.system", "torch.nn.Conv2d"])
def test_a_network_config_from_a_file_builds_only_dlsn_networks_unless_trusted_or_configured(target):
    with pytest.raises(CheckpointError, match=rf"evil.ckpt: its network config names _target_='{target}'.*trust_checkpoint=true"):
        build_network({"_target_": target, "args": ["touch", "/tmp/owned"]}, "evil.ckpt")
    net = build_network({"_target_": "dlsn.models.DLSN", "scale": 2, **TINY}, "good.ckpt")
    assert isinstance(net, DLSN)
    with pytest.raises(CheckpointError, match="is not a torch.nn.Module class"):
        build_network({"_target_": "os.system"}, "evil.ckpt", trust=True)
    conv = build_network({"_target_": "torch.nn.Conv2d", "in_channels": 3, "out_channels": 3, "kernel_size": 1},
                         "mine.ckpt", also_allowed=["torch.nn.Conv2d"])
    assert isinstance(conv, torch.nn.Conv2d)
