"""The LightningModule that trains and evaluates any SR network (DLSN, baselines) the config names."""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import nn

from dlsn.distributed import synced_sum
from dlsn.inference import super_resolve
from dlsn.metrics import PSNR_Y, SSIM_Y

log = logging.getLogger(__name__)


def _set_rotation_seed(net: nn.Module, seed: int | None) -> None:
    """Fix (int) or free (None) the GLA hash rotations, for networks that have them."""
    setter = getattr(net, "set_rotation_seed", None)
    if callable(setter):
        setter(seed)


def _numpy_state_to_safe(state: tuple) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached_gaussian = state
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def _numpy_state_from_safe(state: dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["kind"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"])


class SRModule(LightningModule):
    """Trains ``net`` with L1 loss and Adam + step decay; validates/tests on whole images.

    Args:
        net: the SR network, ``[B, 3, h, w] -> [B, 3, h*scale, w*scale]`` in ``[0, rgb_range]``.
        scale: upscaling factor (metrics crop ``scale`` border pixels).
        optim: Adam and schedule settings: ``lr, betas, eps, weight_decay, fused, milestones, gamma`` (milestones
            in epochs; one epoch is ``data.iters_per_epoch`` iterations). Gradient clipping is the
            Trainer's ``gradient_clip_val`` (set from ``optim.grad_clip``).
        inference: keyword arguments of :func:`dlsn.inference.super_resolve` for validation and test
            (``mode, shave, min_size, tile_size, overlap, self_ensemble``).
        rotation_seed: GLA rotation seed used during validation/test so one checkpoint always gives the
            same numbers; ``None`` keeps random rotations (not reproducible).
        skip_factor: a training batch is skipped (no update, counted in ``train/skipped_batches``) when its
            loss is not finite or exceeds ``skip_factor`` x the running mean of accepted losses (an
            exponential moving average, checked once ``skip_warmup`` batches were accepted). ``None``
            skips only non-finite losses. The authors' trainer does the same against the previous epoch's
            mean loss; a running mean reacts within an epoch.
        rgb_range: pixel range of the data and metrics.
        panel_images: number of images of the first validation set shown as LR | SR | HR crops in W&B.
        panel_crop: side of those crops in LR pixels.
        save_images_dir: if set, ``test`` writes every SR image as PNG under ``<dir>/<set>/``.
    """

    def __init__(
        self,
        net: nn.Module,
        scale: int,
        optim: dict[str, Any] | None = None,
        inference: dict[str, Any] | None = None,
        rotation_seed: int | None = 0,
        skip_factor: float | None = 10.0,
        skip_warmup: int = 20,
        skip_momentum: float = 0.99,
        rgb_range: float = 1.0,
        panel_images: int = 3,
        panel_crop: int = 48,
        save_images_dir: str | None = None,
    ) -> None:
        super().__init__()
        # The network is stored in checkpoints as weights; its configuration is saved by train.py
        # (checkpoint["dlsn_config"]), so it is not a hyperparameter here.
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.scale = int(scale)
        self.optim_cfg = dict(optim or {})
        self.inference_cfg = dict(inference or {})
        self.rotation_seed = rotation_seed
        self.skip_factor = skip_factor
        self.skip_warmup = skip_warmup
        self.skip_momentum = skip_momentum
        self.rgb_range = float(rgb_range)
        self.panel_images = panel_images
        self.panel_crop = panel_crop
        self.save_images_dir = save_images_dir

        # Training state that must survive a resume (saved in on_save_checkpoint).
        self.loss_running_mean: float | None = None
        self.accepted_batches = 0
        self.skipped_batches = 0
        self.best_val_psnr = -math.inf

        self.val_psnr = nn.ModuleDict()
        self.val_ssim = nn.ModuleDict()
        self.test_psnr = nn.ModuleDict()
        self.test_ssim = nn.ModuleDict()
        self.test_results: dict[str, dict[str, float]] = {}
        self._batch_start: float | None = None
        self._drop_gradients = False  # set by training_step for a skipped batch
        self._panel: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        # The resolved run config (set by train.py), saved in checkpoints so eval.py can rebuild the network.
        self.run_config: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------ set-up
    def _set_names(self, stage: str) -> list[str]:
        datamodule = getattr(self.trainer, "datamodule", None)
        names = getattr(datamodule, f"{stage}_set_names", None) if datamodule is not None else None
        return list(names) if names else [stage]

    def _make_metrics(self, psnr: nn.ModuleDict, ssim: nn.ModuleDict, names: Sequence[str]) -> None:
        for name in names:
            if name not in psnr:
                psnr[name] = PSNR_Y(crop_border=self.scale, rgb_range=self.rgb_range).to(self.device)
                ssim[name] = SSIM_Y(crop_border=self.scale, rgb_range=self.rgb_range).to(self.device)

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate"):
            self._make_metrics(self.val_psnr, self.val_ssim, self._set_names("val"))
        if stage == "test":
            self._make_metrics(self.test_psnr, self.test_ssim, self._set_names("test"))

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return self.net(lr)

    def super_resolve(self, lr: torch.Tensor) -> torch.Tensor:
        """Whole-image SR with the configured memory strategy (chop/tile) and optional self-ensemble."""
        return super_resolve(self.net, lr, self.scale, **self.inference_cfg)

    # ---------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        sr = self.net(batch["lr"])
        loss = F.l1_loss(sr, batch["hr"])
        value = float(loss.detach())
        skip = not math.isfinite(value) or (
            self.skip_factor is not None
            and self.loss_running_mean is not None
            and self.accepted_batches >= self.skip_warmup
            and value > self.skip_factor * self.loss_running_mean
        )
        # All processes must agree, or DDP would wait forever for the gradients of the skipping ones.
        skip = self.trainer.strategy.reduce_boolean_decision(skip, all=False)
        self._drop_gradients = skip
        if skip:
            self.skipped_batches += 1
            log.warning(
                "step %d: skipped batch with loss %.4g (running mean %s)", self.global_step, value, self.loss_running_mean
            )
            self.log("train/skipped_batches", float(self.skipped_batches), on_step=True, on_epoch=False)
            # Not None: Lightning refuses that under DDP, whose processes must all run the same backward. A zero
            # loss that does not touch the bad batch gives every parameter a zero gradient; on_before_optimizer_step
            # then drops the gradients, so the optimizer leaves the weights and its state unchanged.
            return sum((parameter * 0.0).sum() for parameter in self.net.parameters() if parameter.requires_grad)

        self.accepted_batches += 1
        if self.loss_running_mean is None:
            self.loss_running_mean = value
        else:
            self.loss_running_mean = self.skip_momentum * self.loss_running_mean + (1 - self.skip_momentum) * value
        batch_size = batch["lr"].shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        self.log("train/skipped_batches", float(self.skipped_batches), on_step=True, on_epoch=False)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._drop_gradients:  # a skipped batch: parameters without gradients are not updated
            optimizer.zero_grad(set_to_none=True)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._batch_start is not None:
            elapsed = time.perf_counter() - self._batch_start
            patches = batch["lr"].shape[0] * self.trainer.world_size
            self.log("train/throughput", patches / max(elapsed, 1e-9), on_step=True, on_epoch=False)

    def on_train_epoch_start(self) -> None:
        _set_rotation_seed(self.net, None)  # random rotations while training, as in the paper

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim_cfg
        optimizer = torch.optim.Adam(
            self.net.parameters(),
            lr=cfg.get("lr", 1e-4),
            betas=tuple(cfg.get("betas", (0.9, 0.999))),
            eps=cfg.get("eps", 1e-8),
            weight_decay=cfg.get("weight_decay", 0.0),
            fused=cfg.get("fused", True),
        )
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=list(cfg.get("milestones", [])), gamma=cfg.get("gamma", 0.5)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # -------------------------------------------------------------------------------------- evaluation
    def _evaluation_start(self) -> None:
        _set_rotation_seed(self.net, self.rotation_seed)

    def _evaluation_end(self) -> None:
        _set_rotation_seed(self.net, None)

    def on_validation_epoch_start(self) -> None:
        self._evaluation_start()
        self._panel = []

    def on_test_epoch_start(self) -> None:
        self._evaluation_start()

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        names = self._set_names("val")
        name = names[dataloader_idx]
        sr = self.super_resolve(batch["lr"])
        # "gray" marks single-channel source images, scored on their gray level as in the published protocol.
        self.val_psnr[name].update(sr, batch["hr"], gray=batch.get("gray"))
        self.val_ssim[name].update(sr, batch["hr"], gray=batch.get("gray"))
        # Metric objects (not values) so Lightning syncs their sum/count states across processes.
        self.log(f"val/{name}/psnr", self.val_psnr[name], on_step=False, on_epoch=True, add_dataloader_idx=False)
        self.log(f"val/{name}/ssim", self.val_ssim[name], on_step=False, on_epoch=True, add_dataloader_idx=False)
        if dataloader_idx == 0 and batch_idx < self.panel_images:
            self._panel.append(self._panel_crops(batch, sr))

    def on_validation_epoch_end(self) -> None:
        names = [n for n in self._set_names("val") if n in self.val_psnr and int(self.val_psnr[n].count) > 0]
        if names:
            # compute() returns the synced value; Lightning reuses the cached result for the logs above.
            mean_psnr = float(np.mean([float(self.val_psnr[n].compute()) for n in names]))
            self.log("val/psnr", mean_psnr, sync_dist=False)
            if not self.trainer.sanity_checking:
                self.best_val_psnr = max(self.best_val_psnr, mean_psnr)
            if math.isfinite(self.best_val_psnr):
                self.log("val/psnr_best", self.best_val_psnr, sync_dist=False)
        if not self.trainer.sanity_checking:
            self._log_panel()
        self._evaluation_end()

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        name = self._set_names("test")[dataloader_idx]
        sr = self.super_resolve(batch["lr"])
        # "gray" marks single-channel source images, scored on their gray level as in the published protocol.
        self.test_psnr[name].update(sr, batch["hr"], gray=batch.get("gray"))
        self.test_ssim[name].update(sr, batch["hr"], gray=batch.get("gray"))
        self.log(f"test/{name}/psnr", self.test_psnr[name], on_step=False, on_epoch=True, add_dataloader_idx=False)
        self.log(f"test/{name}/ssim", self.test_ssim[name], on_step=False, on_epoch=True, add_dataloader_idx=False)
        if self.save_images_dir:
            self._save_images(name, batch.get("name"), sr)

    def on_test_epoch_end(self) -> None:
        self.test_results = {}
        for name in self._set_names("test"):
            if name in self.test_psnr and int(self.test_psnr[name].count) > 0:
                psnr = float(self.test_psnr[name].compute())
                ssim = float(self.test_ssim[name].compute())
                # compute() syncs states only while computing; the image count is summed explicitly.
                count = int(synced_sum(self.test_psnr[name].count))
                self.test_results[name] = {"psnr": psnr, "ssim": ssim, "n": count}
        self._evaluation_end()

    # --------------------------------------------------------------------------------------- images
    def _panel_crops(self, batch: dict[str, Any], sr: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Centre crops (LR upsampled by nearest neighbour to the HR size) of the first image in the batch."""
        lr, hr = batch["lr"][:1], batch["hr"][:1]
        h, w = lr.shape[-2:]
        c = min(self.panel_crop, h, w)
        top, left = (h - c) // 2, (w - c) // 2
        s = self.scale
        lr_crop = F.interpolate(lr[..., top : top + c, left : left + c], scale_factor=s, mode="nearest")
        sr_crop = sr[:1, :, top * s : (top + c) * s, left * s : (left + c) * s]
        hr_crop = hr[..., top * s : (top + c) * s, left * s : (left + c) * s]
        names = batch.get("name") or ["image"]
        return (str(names[0]), lr_crop.cpu(), sr_crop.clamp(0, self.rgb_range).cpu(), hr_crop.cpu())

    def _log_panel(self) -> None:
        """LR | SR | HR crops of a few fixed validation images; only W&B shows images, others are skipped."""
        if not self._panel:
            return
        from lightning.pytorch.loggers import WandbLogger

        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                rows = [torch.cat([lr, sr, hr], dim=-1)[0] / self.rgb_range for _, lr, sr, hr in self._panel]
                # uint8 HxWx3 arrays: W&B's handling of float tensors depends on their range.
                images = [(row.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy() for row in rows]
                logger.log_image(
                    key="val/samples",
                    images=images,
                    caption=[f"{name}: LR | SR | HR" for name, *_ in self._panel],
                    step=self.global_step,
                )
        self._panel = []

    def _save_images(self, set_name: str, names: Sequence[str] | None, sr: torch.Tensor) -> None:
        from PIL import Image

        out_dir = Path(self.save_images_dir) / set_name
        out_dir.mkdir(parents=True, exist_ok=True)
        levels = (sr.detach().float() * (255.0 / self.rgb_range)).round().clamp(0, 255).to(torch.uint8).cpu()
        for i, image in enumerate(levels):
            stem = Path(str(names[i])).stem if names else f"{self.global_step}_{i}"
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(out_dir / f"{stem}_x{self.scale}_SR.png")

    # ------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint["dlsn_config"] = self.run_config
        checkpoint["dlsn_training_state"] = {
            "loss_running_mean": self.loss_running_mean,
            "accepted_batches": self.accepted_batches,
            "skipped_batches": self.skipped_batches,
            "best_val_psnr": self.best_val_psnr,
        }
        # RNG streams, so that a resumed run draws the same patches and rotations as an uninterrupted one.
        checkpoint["dlsn_rng_state"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            # As plain tensors/ints so that checkpoints load with torch.load(weights_only=True).
            "numpy": _numpy_state_to_safe(np.random.get_state()),
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("dlsn_training_state")
        if state:
            self.loss_running_mean = state["loss_running_mean"]
            self.accepted_batches = state["accepted_batches"]
            self.skipped_batches = state["skipped_batches"]
            self.best_val_psnr = state["best_val_psnr"]
        self._pending_rng_state = checkpoint.get("dlsn_rng_state")

    def on_train_start(self) -> None:
        # Restored here rather than in on_load_checkpoint: Lightning seeds and builds dataloaders in between.
        rng = getattr(self, "_pending_rng_state", None)
        if rng:
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])
            np.random.set_state(_numpy_state_from_safe(rng["numpy"]))
            random.setstate(rng["python"])
            self._pending_rng_state = None
