"""Train an SR network. `python train.py` trains the small DLSN on the bundled sample images.

    python train.py                                   # quickstart: dlsn_small on data=sample, CPU or GPU
    python train.py experiment=dlsn_x2                # the paper's x2 recipe
    python train.py ckpt_path=.../checkpoints/last.ckpt   # resume exactly where a run stopped
    python train.py model.n_hashes=4 optim.lr=2e-4    # any config key (see configs/)
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import hydra
import lightning as L
import rich
from omegaconf import DictConfig, OmegaConf

from dlsn.checkpoint import AtomicCheckpointIO, network_state_from_lightning, read_checkpoint
from dlsn.distributed import check_launcher_compatibility, resolve_ckpt_path, shutdown_process_group
from dlsn.lightning_module import SRModule
from dlsn.sweep import finish_experiment_runs, objective_value
from dlsn.utils import (
    build_network,
    count_parameters,
    instantiate_callbacks,
    instantiate_loggers,
    print_config_tree,
    results_table,
    validate_config,
)

log = logging.getLogger("dlsn.train")


def apply_extras(cfg: DictConfig) -> None:
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        # Hints about dataloader workers and logging intervals that do not apply to small sample runs.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    if extras.get("print_config"):
        print_config_tree(cfg)


def rgb_range(cfg: DictConfig) -> float:
    return float(OmegaConf.select(cfg, "data.rgb_range", default=1.0))


def build_module(cfg: DictConfig, net, save_images_dir: str | None = None) -> SRModule:
    """The LightningModule for ``net`` with the config's optimiser, inference and training-loop options."""
    inference = OmegaConf.to_container(cfg.inference, resolve=True)
    rotation_seed = inference.pop("rotation_seed")
    module_opts = OmegaConf.to_container(cfg.module, resolve=True) if "module" in cfg else {}
    optim = OmegaConf.to_container(cfg.optim, resolve=True) if "optim" in cfg else None
    if optim is not None:
        optim.pop("grad_clip", None)  # the Trainer clips (trainer.gradient_clip_val)
    return SRModule(
        net,
        scale=cfg.scale,
        optim=optim,
        inference=inference,
        rotation_seed=rotation_seed,
        rgb_range=rgb_range(cfg),
        save_images_dir=save_images_dir,
        **module_opts,
    )


def _val_metrics(metrics: dict[str, Any], names: list[str]) -> dict[str, tuple[float, float]]:
    return {
        name: (float(metrics[f"val/{name}/psnr"]), float(metrics[f"val/{name}/ssim"]))
        for name in names
        if f"val/{name}/psnr" in metrics
    }


def compare_with_bicubic(cfg: DictConfig, trainer: L.Trainer, datamodule) -> dict[str, float]:
    """Validate MATLAB bicubic on the same validation images; print both models' numbers."""
    from dlsn.models import Bicubic

    names = list(getattr(datamodule, "val_set_names", None) or ["val"])
    model_scores = _val_metrics(trainer.callback_metrics, names)
    bicubic = build_module(cfg, Bicubic(cfg.scale, rgb_range(cfg)))
    bicubic_trainer = L.Trainer(
        accelerator=cfg.trainer.get("accelerator", "auto"),
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    bicubic_trainer.validate(bicubic, datamodule=datamodule, verbose=False)
    bicubic_scores = _val_metrics(bicubic_trainer.callback_metrics, names)

    rows, summary = [], {}
    for name in names:
        if name in model_scores and name in bicubic_scores:
            (mp, ms), (bp, bs) = model_scores[name], bicubic_scores[name]
            rows.append([name, f"{mp:.2f} / {ms:.4f}", f"{bp:.2f} / {bs:.4f}", f"{mp - bp:+.2f}"])
            summary[f"{name}/model_psnr"], summary[f"{name}/bicubic_psnr"] = mp, bp
    rich.print(
        results_table(
            f"Validation PSNR (dB) / SSIM, Y channel, x{cfg.scale} {cfg.degradation}",
            rows,
            ["set", type(trainer.lightning_module.net).__name__, "Bicubic", "gain (dB)"],
        )
    )
    for name in names:
        if f"{name}/model_psnr" in summary:
            print(
                f"[{name}] model PSNR {summary[f'{name}/model_psnr']:.2f} dB, "
                f"bicubic PSNR {summary[f'{name}/bicubic_psnr']:.2f} dB"
            )
    return summary


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train (and optionally test) as configured; returns the final logged metrics."""
    validate_config(cfg, task="train")  # before anything is built or written
    check_launcher_compatibility(cfg)
    apply_extras(cfg)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    # An explicit ckpt_path, else this run directory's newest last.ckpt / SLURM hpc_ckpt: re-running
    # a command in the same output directory (a requeued job, a crashed run) continues it.
    resume_from = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_dir)
    # When resuming, the checkpoint holds the weights; model.pretrained only matters for a new run.
    net = build_network(cfg.model, load_weights=resume_from is None)
    module = build_module(cfg, net)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    n_params = count_parameters(net)
    log.info("network %s: %d parameters", cfg.model._target_, n_params)

    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )
    for logger in loggers:
        logger.log_hyperparams({**module.run_config, "model/params": n_params})

    if cfg.get("train", True):
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    best = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
    if best:
        log.info("best checkpoint: %s", best)

    if cfg.get("compare_bicubic") and trainer.world_size == 1 and any(k.startswith("val/") for k in metrics):
        metrics.update({f"compare/{k}": v for k, v in compare_with_bicubic(cfg, trainer, datamodule).items()})

    if cfg.get("test"):
        if best:
            # The weights best.ckpt's state_dict holds, i.e. what validation scored (with callbacks=ema the
            # averaged ones). trainer.test(ckpt_path=best) would let EMAWeightAveraging restore the raw
            # training weights (current_model_state) instead.
            module.net.load_state_dict(network_state_from_lightning(read_checkpoint(best)))
        trainer.test(module, datamodule=datamodule)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    return metrics


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    finally:
        finish_experiment_runs()  # the next job of a sweep starts its own W&B run
    shutdown_process_group()
    # The value an hparams search optimises (optimized_metric, e.g. val/psnr_best); None otherwise.
    return objective_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
