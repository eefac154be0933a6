"""Lightning callbacks for the side features of a run, each switched on or off in ``configs/callbacks/``.

* :class:`BestCheckpoint` / :class:`LastCheckpoint`: ``best.ckpt`` by validation PSNR (never from a
  non-finite score, never replaced by a worse one from a fresh start in the same directory) and
  ``last.ckpt`` after every validation, every ``every_n_steps`` steps and on a stop signal.
* :class:`GracefulStop`: SIGTERM, SIGINT or the cluster's pre-emption warning: save ``last.ckpt`` at
  the end of the batch and stop with status 128 + signal, or hand over to the job's requeue handler.
* :class:`ValidationPanel`: LR | SR | HR crops at every validation, for W&B and TensorBoard.
* :class:`SaveSRImages`: every test SR image as an 8-bit PNG.
* :class:`TrainingLog`: plain-text progress and validation lines in the run's log file.
* :class:`CompareWithBicubic`: the quickstart's closing comparison with MATLAB bicubic.
* :class:`RichProgressBar`: Lightning's, reading the shown metrics from the device every few steps.
* :class:`CudnnAutotune`: cuDNN's autotuner for the fixed-size training steps only.
"""

from __future__ import annotations

import datetime
import logging
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.callbacks import RichProgressBar as LightningRichProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dlsn.checkpoint import CheckpointError, read_checkpoint

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- checkpoints


class BestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for ``best.ckpt`` that keeps the best checkpoint a run directory already has.

    * A non-finite score (a diverged run's NaN PSNR) is never saved as the best.
    * A fresh start in a run directory that already holds ``best.ckpt`` adopts that file's recorded
      score, so the file is only replaced by a better one. An unreadable ``best.ckpt`` is moved aside
      (``best.ckpt.unreadable-<time>``), not overwritten.
    """

    def check_monitor_top_k(self, trainer: Trainer, current: torch.Tensor | None = None) -> bool:
        if current is not None and not torch.isfinite(torch.as_tensor(current)).all():
            log.warning("%s is %s at step %d: %s is not updated", self.monitor, float(current), trainer.global_step,
                        self.filename)
            return False
        return super().check_monitor_top_k(trainer, current)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # On a resume the checkpoint's own state is loaded after setup and takes precedence.
        if stage != "fit" or self.best_model_path or self.dirpath is None or self.monitor is None:
            return
        existing = Path(self.dirpath) / f"{self.filename}{self.FILE_EXTENSION}"
        if not existing.is_file():
            return
        try:
            state = read_checkpoint(existing, mmap=True)
        except CheckpointError as err:
            if trainer.is_global_zero:
                aside = existing.with_name(f"{existing.name}.unreadable-{datetime.datetime.now():%Y%m%d-%H%M%S}")
                existing.rename(aside)
                log.warning("%s; moved it to %s", err, aside)
            return
        score = _recorded_score(state, self.monitor)
        if score is None:
            return
        tensor = torch.tensor(score)
        path = str(existing)
        self.best_model_path, self.best_model_score = path, tensor
        self.best_k_models, self.kth_best_model_path, self.kth_value = {path: tensor}, path, tensor
        log.info("%s from an earlier run in this directory has %s = %.4f: only a better score replaces it",
                 existing, self.monitor, score)


def _recorded_score(checkpoint: dict[str, Any], monitor: str) -> float | None:
    """The best score a ModelCheckpoint watching ``monitor`` recorded in ``checkpoint``."""
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("monitor") == monitor and state.get("best_model_score") is not None:
            score = float(state["best_model_score"])
            return score if math.isfinite(score) else None
    return None


class LastCheckpoint(Checkpoint):
    """Keeps ``<dirpath>/last.ckpt`` at the latest state of the run.

    Saved after every validation, every ``every_n_steps`` optimizer steps (a paper epoch is 1000
    steps: a crash should cost minutes, not an epoch), at the end of training and by :class:`GracefulStop`. The file is
    written atomically (``AtomicCheckpointIO``); weights that are no longer finite never replace it.
    """

    def __init__(self, dirpath: str, filename: str = "last", every_n_steps: int | None = 1000) -> None:
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer or null, got {every_n_steps!r}")
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self.every_n_steps = every_n_steps
        self.saved_step: int | None = None

    def save(self, trainer: Trainer, reason: str) -> bool:
        """Save now (every process must call this: saving is collective). False if the weights are not finite."""
        parameters = [p.detach() for p in trainer.lightning_module.parameters()]
        if parameters and not bool(torch.stack([torch.isfinite(p).all() for p in parameters]).all()):
            log.warning("not saving %s at step %d (%s): the weights are no longer finite", self.path,
                        trainer.global_step, reason)
            return False
        trainer.save_checkpoint(self.path, weights_only=False)
        self.saved_step = trainer.global_step
        if trainer.is_global_zero:
            log.info("saved %s (%s, step %d)", self.path, reason, trainer.global_step)
        return True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self.saved_step:
            self.save(trainer, f"every {self.every_n_steps} steps")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.save(trainer, "after validation")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step != self.saved_step:  # e.g. trainer.max_steps reached inside an epoch
            self.save(trainer, "end of training")


def find_callback(trainer: Trainer, kind: type) -> Any | None:
    return next((callback for callback in trainer.callbacks if isinstance(callback, kind)), None)


# -------------------------------------------------------------------------------------------- signals


class RunStopped(Exception):
    """The run was stopped by a signal after saving its state; the entry script turns it into an exit status."""

    def __init__(self, signum: int, checkpoint: str | None, requeue_handler: Callable | None = None) -> None:
        name = signal.Signals(signum).name
        saved = f"saved {checkpoint}" if checkpoint else "no checkpoint could be saved"
        super().__init__(f"stopped by {name}: {saved}")
        self.signum, self.checkpoint, self.requeue_handler = signum, checkpoint, requeue_handler


class GracefulStop(Callback):
    """Stop a training run cleanly when asked to: SIGTERM (``scancel``, ``timeout``), SIGINT (Ctrl+C,
    a second one aborts at once) and ``requeue_signal``, the pre-emption warning a cluster sends
    before it kills a job (SLURM through submitit: SIGUSR2).

    At the end of the current batch ``last.ckpt`` is saved and :class:`RunStopped` ends the run:
    ``train.py`` exits with status 128 + the signal number (143 for SIGTERM), so ``train.py && eval.py``
    does not carry on; for ``requeue_signal`` it then calls the handler that was installed before
    (submitit's, which requeues the job; the restarted job resumes from ``last.ckpt``). Under DDP the
    processes agree on stopping every ``check_every_n_steps`` steps (one small collective).
    """

    def __init__(self, requeue_signal: str | None = "SIGUSR2", check_every_n_steps: int = 50) -> None:
        super().__init__()
        self.requeue_signum = None if not requeue_signal else int(getattr(signal, str(requeue_signal)))
        self.check_every_n_steps = max(1, int(check_every_n_steps))
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for signum in (signal.SIGINT, self.requeue_signum):
            if signum is not None and signum not in self._previous:
                try:
                    self._previous[signum] = signal.signal(signum, self._on_signal)
                except ValueError:  # not the main thread: signals cannot be handled here
                    pass

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.requested == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl+C: stop at once
        self.requested = signum

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        signum = self.requested or (signal.SIGTERM if trainer.received_sigterm else None)
        if trainer.world_size > 1:
            if trainer.global_step % self.check_every_n_steps:
                return
            # Processes may have seen different signals, or none: agree on the largest number.
            signum = int(trainer.strategy.reduce(torch.tensor(float(signum or 0), device=pl_module.device),
                                                 reduce_op="max"))
        if signum:
            self._stop(trainer, signum)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning itself raises SIGTERMException where it checks for SIGTERM (e.g. during validation).
        if isinstance(exception, SIGTERMException) and self.requested is None:
            self.requested = signal.SIGTERM
            last = find_callback(trainer, LastCheckpoint)
            if last is not None and trainer.state.fn == "fit":
                last.save(trainer, "received SIGTERM")

    def _stop(self, trainer: Trainer, signum: int) -> None:
        self.requested = signum
        last = find_callback(trainer, LastCheckpoint)
        name = signal.Signals(signum).name
        saved = last is not None and last.save(trainer, f"received {name}")
        previous = self._previous.get(signum) if signum == self.requeue_signum else None
        raise RunStopped(signum, str(last.path) if saved else None, previous if callable(previous) else None)


# ---------------------------------------------------------------------------------------------- speed


class CudnnAutotune(Callback):
    """Let cuDNN time its convolution algorithms (``torch.backends.cudnn.benchmark``) while training,
    and keep its heuristics for validation and test.

    Training batches all have one shape (fixed-size patches), so the autotuner times each convolution
    once and every later step runs the fastest algorithm; on the H200 the heuristics' float32 (TF32)
    backward convolutions ran at about a third of the GPU's peak (docs/benchmarks.md). Validation and
    test images differ in size: there every new shape would be timed again, at the cost of time and of
    the large workspaces some candidates allocate. Lightning's ``Trainer(benchmark=True)`` switches the
    autotuner on for everything; this callback only around the training batches, and restores the
    setting it found when training ends or fails. No effect without cuDNN (CPU runs), and none with
    ``trainer.deterministic=true``: the autotuner's choice can differ between runs, and with it the
    rounding, so bit-exact reruns keep the heuristics. GLA's timed choices (:mod:`dlsn.models.timed_choice`:
    the fused attention's backward mode, the match convolution's float32 method) follow the same switch.
    """

    def __init__(self) -> None:
        super().__init__()
        self._outside_training: bool | None = None  # the setting found when training started

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if torch.are_deterministic_algorithms_enabled():
            log.info("CudnnAutotune: deterministic algorithms requested, cuDNN keeps its heuristics")
            return
        self._outside_training = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._outside_training is not None:  # validation inside fit: heuristics for whole images
            torch.backends.cudnn.benchmark = self._outside_training

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._outside_training is not None:
            torch.backends.cudnn.benchmark = True

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._outside_training is not None:
            torch.backends.cudnn.benchmark = self._outside_training
            self._outside_training = None


# ------------------------------------------------------------------------------------ images and logs


def _to_uint8_levels(image: torch.Tensor, rgb_range: float) -> torch.Tensor:
    """``[..., 3, H, W]`` in ``[0, rgb_range]`` -> uint8 levels, as the metrics round them."""
    return (image.detach().float() * (255.0 / rgb_range)).round().clamp(0, 255).to(torch.uint8)


class ValidationPanel(Callback):
    """LR | SR | HR centre crops of the first ``n_images`` images of the first validation set, logged at
    every validation (rank 0): a W&B image panel (``val/samples``) and TensorBoard images."""

    def __init__(self, n_images: int = 3, crop: int = 48) -> None:
        super().__init__()
        self.n_images, self.crop = int(n_images), int(crop)
        self.rows: list[tuple[str, torch.Tensor]] = []

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.rows = []

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking or dataloader_idx != 0 or len(self.rows) >= self.n_images or not outputs:
            return
        scale, rgb_range = pl_module.scale, pl_module.rgb_range
        lr, hr, sr = batch["lr"][:1], batch["hr"][:1], outputs["sr"][:1]
        height, width = lr.shape[-2:]
        side = min(self.crop, height, width)
        top, left = (height - side) // 2, (width - side) // 2
        rows, cols = slice(top * scale, (top + side) * scale), slice(left * scale, (left + side) * scale)
        lr_crop = F.interpolate(lr[..., top:top + side, left:left + side], scale_factor=scale, mode="nearest")
        row = torch.cat([lr_crop, sr[..., rows, cols].clamp(0, rgb_range), hr[..., rows, cols]], dim=-1)[0]
        names = batch.get("name") or ["image"]
        self.rows.append((str(names[0]), _to_uint8_levels(row, rgb_range).cpu()))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self.rows or not trainer.is_global_zero:
            return
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="val/samples", images=[image.permute(1, 2, 0).numpy() for _, image in self.rows],
                                 caption=[f"{name}: LR | SR | HR" for name, _ in self.rows], step=trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                for name, image in self.rows:
                    logger.experiment.add_image(f"val/samples/{name}", image, trainer.global_step, dataformats="CHW")
        self.rows = []


class SaveSRImages(Callback):
    """Write every test SR image as ``<out_dir>/<set>/<name>_x<scale>_SR.png`` (the 8-bit image that is scored)."""

    def __init__(self, out_dir: str, enabled: bool = True) -> None:
        super().__init__()
        self.out_dir, self.enabled = Path(out_dir), bool(enabled)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.enabled or not outputs:
            return
        from dlsn.data.io import sr_file_name, write_png

        set_name = pl_module.set_names("test")[dataloader_idx]
        levels = _to_uint8_levels(outputs["sr"], pl_module.rgb_range).cpu()
        names = batch.get("name") or [f"{batch_idx}_{i}" for i in range(len(levels))]
        for name, image in zip(names, levels):  # names are unique within a set (dlsn.data.io.unique_image_names)
            write_png(self.out_dir / set_name / sr_file_name(name, pl_module.scale), image.permute(1, 2, 0).numpy())


class TrainingLog(Callback):
    """Plain-text progress in the run's log (``<task>.log``), written by rank 0 only.

    On a cluster stdout goes to a file where a progress bar leaves only its last line. Every
    ``every_n_steps`` steps (default: ``trainer.log_every_n_steps``) a line gives the step, epoch,
    loss, learning rate, training patches per second over all processes, skipped batches and the
    remaining time; after every validation a line gives PSNR/SSIM per set, their mean and the best so
    far. The throughput is also logged as ``train/throughput``. Reading the numbers synchronises with
    the device once per interval, never in between.
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self._mark: tuple[float, int] | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._mark = (time.perf_counter(), trainer.global_step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        every = self.every_n_steps or trainer.log_every_n_steps
        step = trainer.global_step
        if self._mark is None or step % every or step == self._mark[1]:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # the time of the work, not of issuing it
        now = time.perf_counter()
        steps_per_second = (step - self._mark[1]) / max(now - self._mark[0], 1e-9)
        self._mark = (now, step)
        patches = steps_per_second * batch["lr"].shape[0] * trainer.world_size
        pl_module.log("train/throughput", patches, on_step=True, on_epoch=False)
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        loss = float(metrics["train/loss_step"]) if "train/loss_step" in metrics else float("nan")
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        total = trainer.estimated_stepping_batches
        remaining = (total - step) / steps_per_second if math.isfinite(total) and steps_per_second > 0 else None
        eta = str(datetime.timedelta(seconds=round(remaining))) if remaining is not None else "?"
        skipped = getattr(pl_module, "skipped_batches", 0)
        log.info("step %d/%s | epoch %d | loss %.4f | lr %.3g | %.1f patches/s | skipped %d | ETA %s",
                 step, total if math.isfinite(total) else "?", trainer.current_epoch, loss, lr, patches, skipped, eta)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.state.fn != "fit":
            return
        metrics = trainer.callback_metrics
        sets = [f"{name} {float(metrics[f'val/{name}/psnr']):.2f} dB / {float(metrics[f'val/{name}/ssim']):.4f}"
                for name in pl_module.set_names("val") if f"val/{name}/psnr" in metrics]
        mean = float(metrics["val/psnr"]) if "val/psnr" in metrics else float("nan")
        best = float(metrics["val/psnr_best"]) if "val/psnr_best" in metrics else float("nan")
        log.info("validation at step %d (epoch %d): %s | mean %.2f dB | best %.2f dB",
                 trainer.global_step, trainer.current_epoch, ", ".join(sets) or "no sets", mean, best)


class CompareWithBicubic(Callback):
    """At the end of training, score MATLAB bicubic on the same validation images and print both models.

    The quickstart's closing line, ``[sample] model PSNR 34.xx dB, bicubic PSNR 33.00 dB``, comes from
    here. Runs on rank 0 over every validation image; the model's numbers are the last validation's.
    """

    def __init__(self, enabled: bool = True) -> None:
        super().__init__()
        self.enabled = bool(enabled)
        self.results: dict[str, dict[str, float]] = {}

    @torch.no_grad()
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = trainer.datamodule
        if not self.enabled or not trainer.is_global_zero or not getattr(datamodule, "val_datasets", None):
            return
        import rich

        from dlsn.metrics import psnr_y, ssim_y
        from dlsn.models import Bicubic
        from dlsn.utils.rich_utils import results_table

        bicubic = Bicubic(pl_module.scale, pl_module.rgb_range)
        metrics, rows = trainer.callback_metrics, []
        for dataset in datamodule.val_datasets:
            name = dataset.set_name
            if f"val/{name}/psnr" not in metrics:
                continue
            scores = []
            for item in dataset:
                sr = bicubic(item["lr"][None])
                scores.append([f(sr, item["hr"][None], pl_module.scale, pl_module.rgb_range, bool(item.get("gray")))
                               for f in (psnr_y, ssim_y)])
            bicubic_psnr, bicubic_ssim = np.mean(scores, axis=0)
            model_psnr, model_ssim = float(metrics[f"val/{name}/psnr"]), float(metrics[f"val/{name}/ssim"])
            self.results[name] = {"model_psnr": model_psnr, "bicubic_psnr": float(bicubic_psnr),
                                  "model_ssim": model_ssim, "bicubic_ssim": float(bicubic_ssim)}
            rows.append([name, f"{model_psnr:.2f} / {model_ssim:.4f}", f"{bicubic_psnr:.2f} / {bicubic_ssim:.4f}",
                         f"{model_psnr - bicubic_psnr:+.2f}"])
        if not rows:
            return
        rich.print(results_table(f"Validation PSNR (dB) / SSIM, Y channel, x{pl_module.scale}", rows,
                                 ["set", type(pl_module.net).__name__, "Bicubic", "gain (dB)"]))
        for name, result in self.results.items():
            print(f"[{name}] model PSNR {result['model_psnr']:.2f} dB, bicubic PSNR {result['bicubic_psnr']:.2f} dB")


class RichProgressBar(LightningRichProgressBar):
    """Lightning's Rich progress bar, with its metrics read every ``metrics_every_n_steps`` training steps
    (default: ``trainer.log_every_n_steps``): reading them waits for the device, which would otherwise
    stall every step of a fast GPU run."""

    def __init__(self, metrics_every_n_steps: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metrics_every_n_steps = metrics_every_n_steps
        self._shown: tuple[int, dict[str, Any]] | None = None

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        every = self.metrics_every_n_steps or trainer.log_every_n_steps
        step = trainer.global_step
        if not trainer.training or self._shown is None or step - self._shown[0] >= every or step < self._shown[0]:
            self._shown = (step, super().get_metrics(trainer, pl_module))
        return self._shown[1]
