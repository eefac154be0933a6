"""Crash-safe checkpoint writing and model.pretrained loading (this project's files and the authors')."""

import pytest
import torch

from dlsn.checkpoint import AtomicCheckpointIO, atomic_write, atomic_write_json, load_pretrained
from conftest import OFFICIAL_FIXTURES as FIXTURES
from dlsn.models import DLSN, to_official

TINY = dict(n_feats=8, n_resgroups=1, n_resblocks=1, chunk_size=16, n_hashes=1)


def test_failed_write_keeps_previous_file(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_json(target, {"Set5": {"psnr": 33.0}})

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
    reinitialised = load_pretrained(target, path)

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
    with pytest.raises(ValueError, match=r"model.pretrained=.*wide.ckpt.*head|shape"):
        load_pretrained(DLSN(2, **TINY), path)


def test_pretrained_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_pretrained(DLSN(2, **TINY), tmp_path / "nope.ckpt")


@pytest.mark.parametrize("target_scale", [2, 3])
def test_pretrained_official_state_dict(tmp_path, target_scale):
    torch.manual_seed(0)
    source = DLSN(2, **TINY)
    path = tmp_path / "model_best.pt"
    torch.save(to_official(source), path)
    target = DLSN(target_scale, **TINY)
    reinitialised = load_pretrained(target, path)
    official_source, official_target = to_official(source), to_official(target)
    for key, value in official_target.items():
        if not key.startswith("tail.0."):
            assert torch.equal(value, official_source[key]), key
    assert (reinitialised == []) == (target_scale == 2)
    assert all(k.startswith("tail.0.") for k in reinitialised)


@pytest.mark.skipif(not (FIXTURES / "dlsn_tiny_x2.pt").exists(), reason=f"official fixtures absent at {FIXTURES}")
@pytest.mark.parametrize("wrapping", ["bare", "state_dict", "DataParallel"])
def test_pretrained_authors_file_reproduces_their_output(tmp_path, wrapping):
    """model.pretrained with the authors' .pt: the network computes what the published code recorded."""
    fixture = torch.load(FIXTURES / "dlsn_tiny_x2.pt", weights_only=True)
    state = fixture["state_dict"]
    if wrapping == "DataParallel":
        state = {f"module.{key}": value for key, value in state.items()}
    path = tmp_path / "official.pt"
    torch.save({"state_dict": state} if wrapping == "state_dict" else state, path)
    net = DLSN(**fixture["config"])
    assert load_pretrained(net, path) == []
    net.eval()
    n_hashes = fixture["config"]["n_hashes"]
    for run in fixture["runs"]:
        rounds = run["rotations"]
        rotations = [torch.stack(rounds[i:i + n_hashes]) for i in range(0, len(rounds), n_hashes)]
        with torch.no_grad():
            output = net(run["input"], rotations)
        torch.testing.assert_close(output, run["output"], rtol=1e-5, atol=1e-5)
