"""Evaluate a checkpoint (or bicubic) on benchmark sets; writes results.json and a Markdown table.

    python eval.py ckpt_path=logs/train/runs/<run>/checkpoints/best.ckpt
    python eval.py ckpt_path=DLSN_x3.pt scale=3                 # the authors' released weights
    python eval.py model=bicubic data.benchmark_dir=DIR data.test_sets=[Set5,Set14] scale=3 degradation=BI
    python eval.py ckpt_path=... inference=self_ensemble save_images=true
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import rich
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dlsn.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    is_lightning_checkpoint,
    network_state_from_lightning,
    official_state_dict,
    read_checkpoint,
)
from dlsn.utils import (
    ConfigError,
    build_network,
    instantiate_callbacks,
    instantiate_loggers,
    results_table,
    validate_config,
)
from train import apply_extras, build_module

log = logging.getLogger("dlsn.eval")


def load_network(cfg: DictConfig) -> tuple[nn.Module, str]:
    """The network to evaluate and its display name, from ``ckpt_path`` or the ``model`` config."""
    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path:
        net = build_network(cfg.model)  # bicubic, or a network with model.pretrained
        if any(True for _ in net.parameters()) and not cfg.model.get("pretrained"):
            raise ConfigError(
                f"model {cfg.model._target_} has weights: give ckpt_path=<checkpoint> (or model.pretrained=...); "
                "only weightless models such as model=bicubic are evaluated without one"
            )
        return net, type(net).__name__

    checkpoint = read_checkpoint(ckpt_path)
    if is_lightning_checkpoint(checkpoint):
        saved = checkpoint.get("dlsn_config")
        if not saved or "model" not in saved:
            raise ValueError(f"ckpt_path={ckpt_path}: no 'dlsn_config' in the checkpoint (not written by train.py?)")
        model_cfg = OmegaConf.create(saved["model"])
        if model_cfg.get("scale") is not None and model_cfg.scale != cfg.scale:
            raise ConfigError(
                f"ckpt_path={ckpt_path} was trained for scale {model_cfg.scale}, but scale={cfg.scale}; pass scale={model_cfg.scale}"
            )
        if saved.get("degradation") not in (None, cfg.degradation):
            log.warning("checkpoint trained for degradation %s, evaluating on %s", saved["degradation"], cfg.degradation)
        net = build_network(model_cfg, load_weights=False)
        net.load_state_dict(network_state_from_lightning(checkpoint))
    else:
        from dlsn.models import load_official

        net = build_network(cfg.model, load_weights=False)
        try:
            load_official(net, official_state_dict(checkpoint))
        except Exception as err:
            raise ValueError(f"ckpt_path={ckpt_path}: cannot load as an official DLSN state_dict for scale={cfg.scale} "
                             f"with the configured model.* ({err})") from err
    return net, type(net).__name__


def markdown_table(method: str, scale: int, degradation: str, results: dict[str, dict[str, Any]]) -> str:
    """Results in the layout of SR papers: one row per method and scale, PSNR/SSIM per benchmark set."""
    sets = list(results)
    lines = [
        f"| Method | Scale | {' | '.join(sets)} |",
        f"|---|---|{'---|' * len(sets)}",
        f"| {method} | x{scale} ({degradation}) | "
        + " | ".join(f"{results[s]['psnr']:.2f} / {results[s]['ssim']:.4f}" for s in sets)
        + " |",
    ]
    return "\n".join(lines) + "\n\nPSNR (dB) / SSIM on the Y channel (BT.601), border of `scale` pixels cropped, SR rounded to 8 bits.\n"


def evaluate(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    validate_config(cfg, task="eval")
    apply_extras(cfg)
    L.seed_everything(cfg.seed, workers=True)

    output_dir = Path(cfg.paths.output_dir)
    net, method = load_network(cfg)
    if cfg.inference.self_ensemble:
        method += "+"
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    module = build_module(cfg, net, save_images_dir=str(output_dir / "images") if cfg.get("save_images") else None)

    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=instantiate_callbacks(cfg.get("callbacks")), logger=loggers or False
    )
    trainer.test(module, datamodule=datamodule, verbose=False)
    results = module.test_results
    if trainer.is_global_zero:
        atomic_write_json(output_dir / "results.json", results)
        table = markdown_table(method, cfg.scale, cfg.degradation, results)
        atomic_write_text(output_dir / "results.md", table)
        rows = [[name, f"{r['psnr']:.2f}", f"{r['ssim']:.4f}", str(r["n"])] for name, r in results.items()]
        rich.print(results_table(f"{method} x{cfg.scale} {cfg.degradation}", rows, ["set", "PSNR (dB)", "SSIM", "images"]))
        log.info("results written to %s", output_dir / "results.json")
        from lightning.pytorch.loggers import WandbLogger

        for logger in loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(
                    key="test/results",
                    columns=["method", "scale", "degradation", "set", "psnr", "ssim", "images"],
                    data=[[method, cfg.scale, cfg.degradation, n, r["psnr"], r["ssim"], r["n"]] for n, r in results.items()],
                )
    return results


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
