"""The LightningModule that trains and evaluates any SR network the config names (DLSN, baselines).

Training minimises the L1 loss with the optimizer and learning-rate scheduler of the config
(``module.optimizer`` / ``module.scheduler``, Hydra partials: any torch optimizer or scheduler is a
config change). A batch whose loss is not finite, or explodes, gets no update
(:class:`LossSkipRule`); with a fused optimizer this is decided and applied on the device, so a
training step never waits for the GPU. Validation and test super-resolve whole images
(:func:`dlsn.inference.super_resolve`) with fixed GLA hash rotations and score them with the
Y-channel PSNR/SSIM of SR papers, one pair of metrics per evaluation set.

Side features live in :mod:`dlsn.callbacks` (checkpoints, image panels, SR image files, text logs,
signals); the learning rate is logged by Lightning's ``LearningRateMonitor``.
"""

from __future__ import annotations

import functools
import logging
import random
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import nn
from torchmetrics import MaxMetric, SumMetric

from dlsn.inference import InferenceOptions, super_resolve
from dlsn.metrics import PSNR_Y, SSIM_Y

log = logging.getLogger(__name__)
# val/psnr and val/psnr_best are computed from metrics already synchronised over the processes; Lightning
# cannot know that and recommends sync_dist=True, which would only add an all-reduce.
warnings.filterwarnings("ignore", message=r".*self\.log\('val/psnr(_best)?', \.\.\., sync_dist=True\).*")

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class DivergenceError(RuntimeError):
    """Training stopped because too many consecutive batches were skipped."""


class LossSkipRule(nn.Module):
    """Decides on the device whether a training batch is skipped (gets no optimizer update).

    A batch is skipped when its loss is not finite, or, once ``warmup`` batches were accepted, when it
    exceeds ``factor`` times the exponential moving average (momentum ``momentum``) of the accepted
    losses; ``factor=None`` skips only non-finite losses. The authors' trainer compares with the
    previous epoch's mean loss; a running mean reacts within an epoch.

    The state is kept in device tensors and updated with tensor operations only, so the decision
    costs no host synchronisation. ``consecutive`` counts skips since the last accepted batch.
    """

    def __init__(self, factor: float | None = 10.0, warmup: int = 20, momentum: float = 0.99) -> None:
        super().__init__()
        if factor is not None and not factor > 1:
            raise ValueError(f"skip_factor must be a number > 1 or None, got {factor!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"skip_momentum must be in [0, 1), got {momentum!r}")
        if warmup < 0:
            raise ValueError(f"skip_warmup must be >= 0, got {warmup!r}")
        self.factor, self.warmup, self.momentum = factor, int(warmup), float(momentum)
        # Not persistent: saved as plain numbers in the checkpoint's training state (SRModule).
        for name in ("running_mean", "accepted", "skipped", "consecutive"):
            self.register_buffer(name, torch.zeros((), dtype=torch.float64), persistent=False)

    def decide(self, loss: torch.Tensor) -> torch.Tensor:
        """A boolean 0-d tensor: should the batch with this ``loss`` be skipped?"""
        value = loss.detach().to(self.running_mean.dtype)
        skip = ~torch.isfinite(value)
        if self.factor is not None:
            warmed_up = self.accepted >= max(self.warmup, 1)
            skip = skip | (warmed_up & (value > self.factor * self.running_mean))
        return skip

    def update(self, loss: torch.Tensor, skip: torch.Tensor) -> None:
        """Count the batch and fold an accepted loss into the running mean."""
        value = loss.detach().to(self.running_mean.dtype)
        accept = ~skip
        blended = torch.where(self.accepted == 0, value, self.momentum * self.running_mean + (1 - self.momentum) * value)
        self.running_mean.copy_(torch.where(accept, blended, self.running_mean))
        self.accepted.add_(accept.to(self.accepted.dtype))
        self.skipped.add_(skip.to(self.skipped.dtype))
        self.consecutive.copy_(torch.where(skip, self.consecutive + 1, torch.zeros_like(self.consecutive)))

    def state(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in ("running_mean", "accepted", "skipped", "consecutive")}

    def load_state(self, state: Mapping[str, float]) -> None:
        for name, value in state.items():
            getattr(self, name).fill_(float(value))


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
    """Trains ``net`` with the L1 loss; validates and tests on whole images.

    Args:
        net: the SR network, ``[B, 3, h, w] -> [B, 3, h*scale, w*scale]`` in ``[0, rgb_range]``.
        net_config: the network's config (``_target_`` and arguments), stored in checkpoints so that
            ``eval.py`` and ``dlsn-sr`` can rebuild the network. Pass it positionally when building the
            module with Hydra: Hydra would instantiate a keyword argument that has a ``_target_``.
        scale: upscaling factor (the metrics crop ``scale`` border pixels).
        optimizer: ``optimizer(parameters)`` builds the optimizer (a Hydra ``_partial_``), default Adam.
        scheduler: ``scheduler(optimizer)`` builds the LR scheduler, stepped every ``scheduler_interval``
            (``epoch``: one epoch is ``data.iters_per_epoch`` iterations, so paper milestones read as
            epochs) or ``step``; ``None`` keeps the learning rate constant.
        inference: keyword arguments of :func:`dlsn.inference.super_resolve` for validation and test
            (``mode, shave, min_size, tile_size, overlap, self_ensemble``).
        rotation_seed: GLA rotation seed used during validation and test, so that one checkpoint always
            gives the same numbers; ``None`` keeps random rotations (not reproducible).
        skip_factor, skip_warmup, skip_momentum: the :class:`LossSkipRule`.
        max_consecutive_skips: stop training (:class:`DivergenceError`) after this many skipped
            batches in a row, checked every ``divergence_check_every_n_steps`` steps (each check
            reads one number from the device).
        compile: ``torch.compile`` the network's training forward pass: ``False``, ``True``,
            ``"auto"`` (on CUDA only) or a dict of ``torch.compile`` options (``mode``, ``fullgraph``,
            ``dynamic``) with an ``enabled`` key. Validation and test always run the network eagerly,
            so whole images of any size never trigger a recompilation.
        rgb_range: pixel range of the data and metrics.
        degradation: the LR degradation the network is trained for, stored in checkpoints.
    """

    def __init__(
        self,
        net: nn.Module,
        net_config: Mapping[str, Any] | None = None,
        *,
        scale: int,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        inference: Mapping[str, Any] | None = None,
        rotation_seed: int | None = 0,
        skip_factor: float | None = 10.0,
        skip_warmup: int = 20,
        skip_momentum: float = 0.99,
        max_consecutive_skips: int | None = 100,
        divergence_check_every_n_steps: int = 25,
        compile: bool | str | Mapping[str, Any] = False,
        rgb_range: float = 1.0,
        degradation: str | None = None,
    ) -> None:
        super().__init__()
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        if max_consecutive_skips is not None and max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1 or None, got {max_consecutive_skips!r}")
        InferenceOptions(**(inference or {}))  # refuses a bad setting now, naming it
        self.inference = dict(inference or {})
        # Partials, the network and its config are not hyperparameters: the config is stored in the
        # checkpoint by on_save_checkpoint, and plain values keep checkpoints loadable with weights_only.
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler", "net_config"], logger=False)
        self.net = net
        self.scale = int(scale)
        self.rgb_range = float(rgb_range)
        self.rotation_seed = rotation_seed
        self.optimizer_factory = optimizer or functools.partial(torch.optim.Adam, lr=1e-4)
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.net_config = None if net_config is None else dict(net_config)
        self.degradation = degradation
        self.max_consecutive_skips = max_consecutive_skips
        self.divergence_check_every_n_steps = max(1, int(divergence_check_every_n_steps))
        self.compile_options = _compile_options(compile)
        self._compiled_forward: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._check_optimizer_factories()

        self.skip_rule = LossSkipRule(skip_factor, skip_warmup, skip_momentum)
        self.register_buffer("_epoch_loss_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("_epoch_loss_count", torch.zeros((), dtype=torch.float64), persistent=False)
        self.val_psnr_best = MaxMetric()
        self.metrics = nn.ModuleDict()  # "<stage>/<set>/<psnr|ssim|n>" -> metric
        self.test_results: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------------------------------------- set-up
    def _check_optimizer_factories(self) -> None:
        """Build the optimizer and scheduler once, so that a bad setting fails before training starts."""
        optimizer = self.optimizer_factory(self.net.parameters()) if any(True for _ in self.net.parameters()) else None
        if optimizer is not None and self.scheduler_factory is not None:
            self.scheduler_factory(optimizer)

    def set_names(self, stage: str) -> list[str]:
        """Names of the evaluation sets of ``stage`` (``val`` or ``test``), from the data module."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(datamodule, f"{stage}_set_names", None) if datamodule is not None else None
        return list(names) if names else [stage]

    def setup(self, stage: str) -> None:
        stages = {"fit": ["val"], "validate": ["val"], "test": ["test"]}.get(stage, [])
        for evaluation in stages:
            for name in self.set_names(evaluation):
                prefix = f"{evaluation}/{name}"
                if f"{prefix}/psnr" not in self.metrics:
                    self.metrics[f"{prefix}/psnr"] = PSNR_Y(crop_border=self.scale, rgb_range=self.rgb_range)
                    self.metrics[f"{prefix}/ssim"] = SSIM_Y(crop_border=self.scale, rgb_range=self.rgb_range)
                    self.metrics[f"{prefix}/n"] = SumMetric()
        if stage == "fit" and self._compiled_forward is None and self._compile_enabled():
            options = {k: v for k, v in self.compile_options.items() if k != "enabled"}
            log.info("compiling the network's training forward pass with torch.compile(%s)", options)
            # The bound forward, not the module: a compiled module assigned here would be registered as
            # a submodule and duplicate every weight in the state_dict.
            self._compiled_forward = torch.compile(self.net.forward, **options)

    def _compile_enabled(self) -> bool:
        enabled = self.compile_options.get("enabled", False)
        return self.device.type == "cuda" if enabled == "auto" else bool(enabled)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return self.net(lr)

    def super_resolve(self, lr: torch.Tensor) -> torch.Tensor:
        """Whole-image SR with the configured memory strategy (chop/tile) and optional self-ensemble."""
        return super_resolve(self.net, lr, self.scale, **self.inference)

    # ----------------------------------------------------------------------------------------- training
    def on_train_epoch_start(self) -> None:
        _set_rotation_seed(self.net, None)  # fresh random rotations while training, as in the paper
        self._epoch_loss_sum.zero_()
        self._epoch_loss_count.zero_()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        forward = self.net if self._compiled_forward is None else self._compiled_forward
        loss = F.l1_loss(forward(batch["lr"]), batch["hr"])
        # Every process must skip together, or DDP would wait forever for the skipping ones' gradients.
        skip = self.trainer.strategy.reduce(self.skip_rule.decide(loss).float(), reduce_op="max") > 0
        self.skip_rule.update(loss, skip)
        accepted_loss = torch.where(skip, torch.zeros_like(loss), loss.detach()).double()
        self._epoch_loss_sum.add_(accepted_loss)
        self._epoch_loss_count.add_((~skip).double())
        # Skipped steps are logged as NaN: a curve never shows the last good loss for them.
        self.log("train/loss_step", torch.where(skip, torch.full_like(loss, float("nan")), loss.detach()),
                 on_step=True, on_epoch=False, prog_bar=True, batch_size=batch["lr"].shape[0])
        self.log("train/skipped_batches", self.skip_rule.skipped, on_step=True, on_epoch=False)
        self._check_divergence()

        optimizer = self.optimizers(use_pl_optimizer=False)
        if _skips_on_device(optimizer, self.trainer):
            # A fused optimizer reads `found_inf` (as it does from a GradScaler) and leaves the
            # parameters and its state untouched when it is set: the skip needs no host decision.
            optimizer.found_inf = skip.float()
            optimizer.grad_scale = None
            return loss
        if bool(skip):  # the optimizer cannot skip on the device: decide on the host
            log.warning("step %d: skipped a batch with loss %.4g", self.global_step, float(loss.detach()))
            # Not `return None`: under DDP every process must run backward. A zero loss that does not
            # depend on the bad batch gives finite (zero) gradients, which on_before_optimizer_step drops.
            self._drop_gradients = True
            return sum((parameter * 0).sum() for parameter in self.net.parameters() if parameter.requires_grad)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if getattr(self, "_drop_gradients", False):
            optimizer.zero_grad(set_to_none=True)  # parameters without gradients are not updated
            self._drop_gradients = False

    def _check_divergence(self) -> None:
        """Stop when ``max_consecutive_skips`` batches in a row were skipped (one device read every few steps)."""
        if self.max_consecutive_skips is None or (self.global_step + 1) % self.divergence_check_every_n_steps:
            return
        consecutive = int(self.skip_rule.consecutive)
        if consecutive >= self.max_consecutive_skips:
            raise DivergenceError(
                f"training diverged: the last {consecutive} batches (up to step {self.global_step}) were skipped "
                f"(loss not finite or above module.skip_factor x the running mean {float(self.skip_rule.running_mean):.4g}); "
                f"limit module.max_consecutive_skips={self.max_consecutive_skips}. Lower the learning rate and "
                "resume from the last good checkpoint."
            )

    def on_train_epoch_end(self) -> None:
        mean = self._epoch_loss_sum / self._epoch_loss_count.clamp_min(1)
        self.log("train/loss_epoch", torch.where(self._epoch_loss_count > 0, mean, torch.full_like(mean, float("nan"))),
                 on_step=False, on_epoch=True, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self.net.parameters())
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer)
        # `name` is the key LearningRateMonitor logs the learning rate under.
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval, "name": "train/lr"}}

    # --------------------------------------------------------------------------------------- evaluation
    def on_validation_epoch_start(self) -> None:
        _set_rotation_seed(self.net, self.rotation_seed)

    def on_test_epoch_start(self) -> None:
        _set_rotation_seed(self.net, self.rotation_seed)

    def _evaluation_step(self, stage: str, batch: dict[str, Any], dataloader_idx: int) -> dict[str, torch.Tensor]:
        """Super-resolve one whole image and add it to its set's metrics (shared by validation and test)."""
        name = self.set_names(stage)[dataloader_idx]
        sr = self.super_resolve(batch["lr"])
        # "gray" marks single-channel source images, scored on their gray level as in the published protocol.
        for metric in ("psnr", "ssim"):
            self.metrics[f"{stage}/{name}/{metric}"].update(sr, batch["hr"], gray=batch.get("gray"))
            # Metric objects, not values: Lightning syncs their sum/count states across processes.
            self.log(f"{stage}/{name}/{metric}", self.metrics[f"{stage}/{name}/{metric}"],
                     on_step=False, on_epoch=True, add_dataloader_idx=False)
        self.metrics[f"{stage}/{name}/n"].update(sr.shape[0])
        return {"sr": sr}  # for callbacks (image panel, SR image files)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        return self._evaluation_step("val", batch, dataloader_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        return self._evaluation_step("test", batch, dataloader_idx)

    def _set_results(self, stage: str) -> dict[str, dict[str, Any]]:
        """``{set: {"psnr", "ssim", "n", "n_capped", "skipped"}}`` of the sets evaluated in this epoch,
        synced over processes (every process must call it). ``n_capped`` counts images whose PSNR was
        capped at 100 dB (identical images); ``skipped`` lists images left out (``data.on_error=skip``)."""
        skipped = getattr(getattr(self.trainer, "datamodule", None), "skipped_eval_images", None) or {}
        results = {}
        for name in self.set_names(stage):
            count = self.metrics[f"{stage}/{name}/n"] if f"{stage}/{name}/n" in self.metrics else None
            if count is None or not count.update_called:
                continue
            psnr = self.metrics[f"{stage}/{name}/psnr"]
            results[name] = {"psnr": float(psnr.compute()), "ssim": float(self.metrics[f"{stage}/{name}/ssim"].compute()),
                             "n": int(count.compute())}
            with psnr.sync_context():  # compute() syncs states only while computing
                results[name]["n_capped"] = int(psnr.n_capped)
            results[name]["skipped"] = list(skipped.get(name, []))
        return results

    def on_validation_epoch_end(self) -> None:
        results = self._set_results("val")
        if results:
            # compute() returned synced values: the mean over sets is the same on every process.
            mean_psnr = float(np.mean([r["psnr"] for r in results.values()]))
            self.log("val/psnr", mean_psnr, sync_dist=False)
            if not self.trainer.sanity_checking and np.isfinite(mean_psnr):
                self.val_psnr_best.update(mean_psnr)
            if self.val_psnr_best.update_called:
                self.log("val/psnr_best", self.val_psnr_best.compute(), sync_dist=False)
        for name in self.set_names("val"):
            if f"val/{name}/n" in self.metrics:
                self.metrics[f"val/{name}/n"].reset()
        _set_rotation_seed(self.net, None)

    def on_test_epoch_end(self) -> None:
        self.test_results = self._set_results("test")
        for name in self.set_names("test"):
            if f"test/{name}/n" in self.metrics:
                self.metrics[f"test/{name}/n"].reset()
        _set_rotation_seed(self.net, None)

    # ----------------------------------------------------------------------------- checkpointed state
    @property
    def best_val_psnr(self) -> float:
        return float(self.val_psnr_best.compute()) if self.val_psnr_best.update_called else float("-inf")

    @property
    def skipped_batches(self) -> int:
        return int(self.skip_rule.skipped)

    @property
    def accepted_batches(self) -> int:
        return int(self.skip_rule.accepted)

    @property
    def loss_running_mean(self) -> float | None:
        return float(self.skip_rule.running_mean) if self.accepted_batches else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain values and tensors only, so that checkpoints load with torch.load(weights_only=True).
        checkpoint["dlsn_network"] = {"config": self.net_config, "scale": self.scale, "degradation": self.degradation}
        checkpoint["dlsn_training_state"] = {"skip_rule": self.skip_rule.state(), "best_val_psnr": self.best_val_psnr}
        # RNG streams, so that a resumed run draws the same patches and rotations as an uninterrupted one.
        checkpoint["dlsn_rng_state"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": _numpy_state_to_safe(np.random.get_state()),
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("dlsn_training_state") or {}
        if "skip_rule" in state:
            self.skip_rule.load_state(state["skip_rule"])
        best = state.get("best_val_psnr")
        self.val_psnr_best.reset()
        if best is not None and np.isfinite(best):
            self.val_psnr_best.update(best)
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


def _compile_options(compile: bool | str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(compile, Mapping):
        options = dict(compile)
        options.setdefault("enabled", True)
    else:
        options = {"enabled": compile}
    if options["enabled"] not in (True, False, "auto"):
        raise ValueError(f"compile must be true, false, 'auto' or a dict of torch.compile options, got {compile!r}")
    return options


def _skips_on_device(optimizer: torch.optim.Optimizer, trainer) -> bool:
    """Whether ``optimizer`` can skip a step from a device flag (fused Adam/AdamW/SGD read ``found_inf``).

    Not with float16 mixed precision, whose GradScaler sets ``found_inf`` itself.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and scaler is None


def warmup_then(optimizer: torch.optim.Optimizer, then: SchedulerFactory, warmup: int = 5,
                start_factor: float = 1e-3) -> torch.optim.lr_scheduler.LRScheduler:
    """A linear warm-up from ``start_factor`` x lr over ``warmup`` intervals, then the scheduler ``then``
    builds (e.g. a cosine decay): ``module/scheduler=warmup_cosine``."""
    return torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=start_factor, total_iters=warmup), then(optimizer)],
        milestones=[warmup],
    )
