"""Validate synthetic SR pairs with a Lightning DDP trainer on CPU; rank 0 writes the metrics.

Run by tests/test_distributed.py as ``python lightning_eval_worker.py OUT.json N_IMAGES DEVICES``.
With DEVICES=2 Lightning re-executes this script for rank 1 (which is why the test runs it as a
subprocess). Checks the whole chain: the datamodule hands Lightning the unpadded eval sampler,
Lightning keeps it, and metrics logged as Metric objects or computed at epoch end are exact.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from eval_worker import SyntheticPairs  # this script's folder is on sys.path (run as a file)

from dlsn.data.samplers import eval_sampler
from dlsn.metrics import PSNR_Y, SSIM_Y
from dlsn.utils.launcher import shutdown_process_group


class PairsDataModule(L.LightningDataModule):
    def __init__(self, image_count):
        super().__init__()
        self.dataset = SyntheticPairs(image_count)

    def val_dataloader(self):
        # The hook the project's datamodule needs: sampler=eval_sampler(dataset).
        return DataLoader(self.dataset, batch_size=1, shuffle=False, sampler=eval_sampler(self.dataset))


class IdentityRestorer(L.LightningModule):
    """A 1x1 convolution initialised to the identity: output == the synthetic SR image."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        self.val_psnr = PSNR_Y(crop_border=2)
        self.val_ssim = SSIM_Y(crop_border=2)
        self.val_psnr_epoch_end = PSNR_Y(crop_border=2)
        self.seen_indices = []

    def validation_step(self, batch, batch_idx):
        sr, hr, index = batch
        restored = self.conv(sr)
        self.seen_indices += index.tolist()
        # Pattern 1: log the Metric object; Lightning calls compute() (which syncs) at epoch end.
        self.val_psnr.update(restored, hr)
        self.val_ssim.update(restored, hr)
        self.log("val/psnr", self.val_psnr, on_step=False, on_epoch=True)
        self.log("val/ssim", self.val_ssim, on_step=False, on_epoch=True)
        # Pattern 2: update only here, compute explicitly in on_validation_epoch_end.
        self.val_psnr_epoch_end.update(restored, hr)

    def on_validation_epoch_end(self):
        value = self.val_psnr_epoch_end.compute()  # identical on every rank after the sync
        self.log("val/psnr_epoch_end", value, sync_dist=False)
        self.val_psnr_epoch_end.reset()


def main():
    out_path, image_count, devices = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    module = IdentityRestorer()
    trainer.validate(module, datamodule=PairsDataModule(image_count), verbose=False)
    sampler_name = type(trainer.val_dataloaders.sampler).__name__
    gathered = trainer.strategy.all_gather(torch.tensor(len(module.seen_indices)))
    indices = [None] * trainer.world_size
    if trainer.world_size > 1:
        torch.distributed.all_gather_object(indices, module.seen_indices)
    else:
        indices = [module.seen_indices]
    if trainer.is_global_zero:
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
        with open(out_path, "w") as handle:
            json.dump({"metrics": metrics, "sampler": sampler_name, "indices_per_rank": indices,
                       "images_per_rank": gathered.reshape(-1).tolist()}, handle)
    shutdown_process_group()


if __name__ == "__main__":
    main()
