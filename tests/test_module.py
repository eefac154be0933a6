"""SRModule with a toy network and in-memory data: skipping bad batches, metric names, rotation seeds."""

import functools
import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from dlsn.lightning_module import DivergenceError, SRModule
from dlsn.metrics import psnr_y, ssim_y


class ToyNet(nn.Module):
    """Nearest upsampling plus a learned 1x1 correction; records the GLA rotation seed it is given."""

    def __init__(self, scale=2):
        super().__init__()
        self.scale = scale
        self.conv = nn.Conv2d(3, 3, 1)
        self.seeds_seen = []
        self.rotation_seed = "unset"

    def set_rotation_seed(self, seed):
        self.rotation_seed = seed

    def forward(self, x):
        self.seeds_seen.append((self.training, self.rotation_seed))
        return self.conv(x).repeat_interleave(self.scale, -1).repeat_interleave(self.scale, -2)


class ToyData(L.LightningDataModule):
    val_set_names = ["A", "B"]

    def __init__(self, train_batches):
        super().__init__()
        self.train_batches = train_batches
        torch.manual_seed(0)
        self.val = [
            [{"lr": torch.rand(1, 3, 8, 8), "hr": torch.rand(1, 3, 16, 16), "name": [f"{s}{i}"]} for i in range(2)]
            for s in self.val_set_names
        ]

    def train_dataloader(self):
        return DataLoader(self.train_batches, batch_size=None)

    def val_dataloader(self):
        return [DataLoader(v, batch_size=None) for v in self.val]


def adam(lr=1e-3, **kwargs):
    return functools.partial(torch.optim.Adam, lr=lr, **kwargs)


def batch(value=0.5, size=4):
    return {"lr": torch.full((size, 3, 4, 4), value), "hr": torch.full((size, 3, 8, 8), value), "name": ["p"] * size}


def fit(module, data, **trainer_kwargs):
    settings = dict(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer = L.Trainer(**{**settings, **trainer_kwargs})
    trainer.fit(module, datamodule=data)
    return trainer


def test_exploding_and_nan_batches_are_skipped_and_counted():
    good = [batch(0.5) for _ in range(6)]
    exploding = {"lr": torch.full((4, 3, 4, 4), 0.5), "hr": torch.full((4, 3, 8, 8), 1e6), "name": ["x"] * 4}
    nan = {"lr": torch.full((4, 3, 4, 4), float("nan")), "hr": torch.zeros(4, 3, 8, 8), "name": ["x"] * 4}
    net = ToyNet()
    module = SRModule(net, scale=2, optimizer=adam(fused=True), inference={"mode": "whole"}, skip_factor=10, skip_warmup=3)
    snapshots = []

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots.append(pl_module.net.conv.weight.detach().clone())

    trainer = fit(module, ToyData(good[:4] + [exploding] + good[4:5] + [nan] + good[5:]), callbacks=[Snapshot()])
    assert module.skipped_batches == 2
    assert module.accepted_batches == 6
    assert torch.equal(snapshots[4], snapshots[3])  # the exploding batch did not update the weights
    assert torch.equal(snapshots[6], snapshots[5])  # nor the NaN one
    assert not torch.equal(snapshots[5], snapshots[4])  # good batches do
    assert torch.isfinite(net.conv.weight).all()
    assert trainer.callback_metrics["train/skipped_batches"] == 2
    assert math.isfinite(module.loss_running_mean)


def test_large_loss_is_not_skipped_during_warmup_or_without_factor():
    big = {"lr": torch.full((4, 3, 4, 4), 0.5), "hr": torch.full((4, 3, 8, 8), 100.0), "name": ["x"] * 4}
    module = SRModule(ToyNet(), scale=2, optimizer=adam(fused=True), inference={"mode": "whole"}, skip_factor=None)
    fit(module, ToyData([batch(), batch(), big, batch()]))
    assert module.skipped_batches == 0


def test_validation_logs_per_set_mean_and_best_with_fixed_rotations():
    net = ToyNet()
    data = ToyData([batch() for _ in range(3)])
    module = SRModule(net, scale=2, optimizer=adam(fused=True), inference={"mode": "chop", "min_size": 20, "shave": 2}, rotation_seed=7)
    trainer = fit(module, data, max_epochs=2)
    metrics = trainer.callback_metrics
    for name in ("A", "B"):
        expected = sum(psnr_y(module.super_resolve(b["lr"]), b["hr"], 2) for b in data.val[data.val_set_names.index(name)]) / 2
        assert float(metrics[f"val/{name}/psnr"]) == pytest.approx(expected, abs=1e-6)
        images = data.val[data.val_set_names.index(name)]
        expected_ssim = sum(ssim_y(module.super_resolve(b["lr"]), b["hr"], 2) for b in images) / 2
        assert float(metrics[f"val/{name}/ssim"]) == pytest.approx(expected_ssim, abs=1e-6)
    assert float(metrics["val/psnr"]) == pytest.approx((float(metrics["val/A/psnr"]) + float(metrics["val/B/psnr"])) / 2)
    assert float(metrics["val/psnr_best"]) >= float(metrics["val/psnr"])
    # Evaluation forwards ran in eval mode with seed 7; training forwards with fresh rotations (None).
    assert {seed for training, seed in net.seeds_seen if not training} == {7}
    assert {seed for training, seed in net.seeds_seen if training} == {None}


def test_skip_decision_state_survives_checkpoint_round_trip():
    module = SRModule(ToyNet(), scale=2)
    module.skip_rule.load_state({"running_mean": 0.1, "accepted": 50, "skipped": 3, "consecutive": 2})
    module.val_psnr_best.update(30.5)
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    restored = SRModule(ToyNet(), scale=2)
    restored.on_load_checkpoint(checkpoint)
    assert (restored.loss_running_mean, restored.accepted_batches, restored.skipped_batches, restored.best_val_psnr) == (
        0.1, 50, 3, 30.5,
    )
    assert float(restored.skip_rule.consecutive) == 2


@pytest.mark.parametrize("fused", [True, False])
def test_optimizer_and_scheduler_come_from_the_factories(fused):
    module = SRModule(ToyNet(), scale=2, optimizer=adam(2e-4, fused=fused),
                      scheduler=functools.partial(torch.optim.lr_scheduler.MultiStepLR, milestones=[2, 4], gamma=0.5))
    setup = module.configure_optimizers()
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["fused"] is fused
    assert optimizer.defaults["lr"] == 2e-4 and list(scheduler.milestones) == [2, 4]
    assert setup["lr_scheduler"]["interval"] == "epoch" and setup["lr_scheduler"]["name"] == "train/lr"


def test_bad_optimizer_or_inference_settings_fail_when_the_module_is_built():
    with pytest.raises(ValueError, match="Invalid learning rate"):
        SRModule(ToyNet(), scale=2, optimizer=adam(-1.0))
    with pytest.raises(ValueError, match="inference.overlap"):
        SRModule(ToyNet(), scale=2, inference={"mode": "tile", "tile_size": 16, "overlap": 16})
    with pytest.raises(ValueError, match="inference.mode"):
        SRModule(ToyNet(), scale=2, inference={"mode": "quadrants"})


@pytest.mark.parametrize("fused", [True, False])
def test_skipped_batches_match_with_and_without_the_on_device_skip(fused):
    """The fused optimizer skips from a device flag; others skip on the host: the same updates either way."""
    exploding = {"lr": torch.full((4, 3, 4, 4), 0.5), "hr": torch.full((4, 3, 8, 8), 1e6), "name": ["x"] * 4}
    batches = [batch(0.5), batch(0.4), exploding, batch(0.3)]
    torch.manual_seed(0)
    module = SRModule(ToyNet(), scale=2, optimizer=adam(fused=fused), inference={"mode": "whole"}, skip_warmup=1)
    fit(module, ToyData(batches))
    torch.manual_seed(0)
    reference = SRModule(ToyNet(), scale=2, optimizer=adam(fused=fused), inference={"mode": "whole"}, skip_warmup=1)
    fit(reference, ToyData([batches[0], batches[1], batches[3]]))
    assert module.skipped_batches == 1 and module.accepted_batches == 3
    torch.testing.assert_close(module.net.conv.weight, reference.net.conv.weight, rtol=0, atol=0)


def test_training_step_reads_nothing_from_the_device(monkeypatch):
    """With a fused optimizer, deciding whether to skip needs no host synchronisation (no .item(), no bool())."""
    reads = []
    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    module = SRModule(ToyNet(), scale=2, optimizer=adam(fused=True), inference={"mode": "whole"},
                      divergence_check_every_n_steps=1000)
    step_reads = []
    original_step = module.training_step

    def training_step(*args, **kwargs):
        before = len(reads)
        result = original_step(*args, **kwargs)
        step_reads.append(reads[before:])
        return result

    monkeypatch.setattr(module, "training_step", training_step)
    fit(module, ToyData([batch(0.5) for _ in range(3)]))
    monkeypatch.undo()
    assert step_reads == [[], [], []]


def test_consecutive_skips_stop_the_run_naming_the_step():
    nan = {"lr": torch.full((4, 3, 4, 4), float("nan")), "hr": torch.zeros(4, 3, 8, 8), "name": ["x"] * 4}
    module = SRModule(ToyNet(), scale=2, optimizer=adam(), inference={"mode": "whole"}, max_consecutive_skips=3,
                      divergence_check_every_n_steps=1)
    with pytest.raises(DivergenceError, match=r"the last 3 batches \(up to step 3\) were skipped"):
        fit(module, ToyData([batch(0.5)] + [nan] * 5), max_epochs=1)
    assert module.skipped_batches == 3 and module.accepted_batches == 1


def test_skipped_steps_are_logged_as_nan_not_as_the_last_loss():
    nan = {"lr": torch.full((4, 3, 4, 4), float("nan")), "hr": torch.zeros(4, 3, 8, 8), "name": ["x"] * 4}
    logged = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append(float(trainer.callback_metrics["train/loss_step"]))

    module = SRModule(ToyNet(), scale=2, optimizer=adam(), inference={"mode": "whole"})
    trainer = fit(module, ToyData([batch(0.5), nan, batch(0.5)]), callbacks=[Record()])
    assert math.isfinite(logged[0]) and math.isnan(logged[1]) and math.isfinite(logged[2])
    # The epoch mean counts the accepted batches only.
    assert float(trainer.callback_metrics["train/loss_epoch"]) == pytest.approx((logged[0] + logged[2]) / 2)


class RecordCudnnBenchmark(L.Callback):
    """``torch.backends.cudnn.benchmark`` as each training and validation batch saw it."""

    def __init__(self, fail_at_step=None):
        self.seen, self.fail_at_step = [], fail_at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(("train", torch.backends.cudnn.benchmark))
        if trainer.global_step == self.fail_at_step:
            raise RuntimeError("stop here")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.seen.append(("val", torch.backends.cudnn.benchmark))


@pytest.mark.parametrize("fail_at_step", [None, 3])
def test_cudnn_autotune_is_on_for_training_batches_only_and_restored(monkeypatch, fail_at_step):
    from dlsn.callbacks import CudnnAutotune

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    record = RecordCudnnBenchmark(fail_at_step)
    module = SRModule(ToyNet(), scale=2, optimizer=adam())
    data = ToyData([batch(0.5)] * 4)
    if fail_at_step is None:  # two epochs: validation in between, training again after it
        fit(module, data, max_epochs=2, callbacks=[CudnnAutotune(), record])
        assert record.seen == ([("train", True)] * 4 + [("val", False)] * 4) * 2
    else:
        with pytest.raises(RuntimeError, match="stop here"):
            fit(module, data, max_epochs=2, callbacks=[CudnnAutotune(), record])
        assert record.seen[-1] == ("train", True)
    assert torch.backends.cudnn.benchmark is False  # as it was before fit


def test_cudnn_autotune_stays_off_for_deterministic_runs(monkeypatch):
    from dlsn.callbacks import CudnnAutotune

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what Lightning sets: restored afterwards
    record = RecordCudnnBenchmark()
    try:
        fit(SRModule(ToyNet(), scale=2, optimizer=adam()), ToyData([batch(0.5)] * 2), deterministic=True,
            callbacks=[CudnnAutotune(), record])
    finally:
        torch.use_deterministic_algorithms(False)  # Lightning sets it process-wide
    assert record.seen == [("train", False)] * 2 + [("val", False)] * 4
    assert torch.backends.cudnn.benchmark is False
