"""Evaluate a checkpoint (or bicubic) on benchmark sets; writes results.json and a Markdown table.

    python eval.py ckpt_path=logs/train/runs/<run>/checkpoints/best.ckpt
    python eval.py ckpt_path=DLSN_x3.pt scale=3                 # the authors' released weights
    python eval.py model=bicubic data.benchmark_dir=DIR data.test_sets=[Set5,Set14] scale=3 degradation=BI
    python eval.py ckpt_path=... inference=self_ensemble save_images=true
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig
from torch import nn

from dlsn.checkpoint import build_network as build_network_from_file
from dlsn.checkpoint import load_into, read_weights
from dlsn.utils.config import ConfigError, apply_extras, register_resolvers, set_project_root, validate_config
from dlsn.utils.files import atomic_write_text, write_json_strict
from dlsn.utils.instantiate import build_network, instantiate_group, network_config
from dlsn.utils.launcher import RunDirectoryLock, is_rank_zero_process

log = logging.getLogger("dlsn.eval")
set_project_root(__file__)
register_resolvers()


def load_network(cfg: DictConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The network to evaluate and its config: from ``ckpt_path`` (its recorded config when it has
    one, else the ``model`` config) or, for weightless models such as bicubic, from ``model``."""
    path = cfg.get("ckpt_path")
    if not path:
        net = build_network(cfg.model)
        if any(True for _ in net.parameters()):
            raise ConfigError(f"model {cfg.model._target_} has weights: give ckpt_path=<checkpoint>; only weightless "
                              "models such as model=bicubic are evaluated without one")
        return net, network_config(cfg.model)

    trust = cfg.get("trust_checkpoint", False)
    weights = read_weights(path, trust=trust)
    if weights.format == "official" or weights.config is None:  # n_hashes and res_scale come from model.*
        config = network_config(cfg.model)
        trained_scale = (weights.config or {}).get("scale")
    else:
        config = weights.config
        trained_scale = config.get("scale")
    if trained_scale is not None and trained_scale != cfg.scale:
        raise ConfigError(f"ckpt_path={path} was trained for scale {trained_scale}, but scale={cfg.scale}; "
                          f"pass scale={trained_scale}")
    if weights.degradation not in (None, cfg.degradation):
        log.warning("checkpoint trained for degradation %s, evaluating on %s", weights.degradation, cfg.degradation)
    # The file's config may only name dlsn.models networks or the run's own model._target_ (see network_class).
    net = build_network_from_file(config, f"ckpt_path={path}", trust, also_allowed=[cfg.model._target_])
    load_into(net, weights.state_dict, source=f"ckpt_path={path}")
    return net, config


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
    validate_config(cfg)
    apply_extras(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    with RunDirectoryLock(output_dir) if is_rank_zero_process() else contextlib.nullcontext():
        net, config = load_network(cfg)
        method = type(net).__name__ + ("+" if cfg.inference.self_ensemble else "")
        module = hydra.utils.instantiate(cfg.module, net, config, _convert_="all")
        datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
        loggers = instantiate_group(cfg.get("logger"), "logger")
        trainer: L.Trainer = hydra.utils.instantiate(
            cfg.trainer, callbacks=instantiate_group(cfg.get("callbacks"), "callbacks"), logger=loggers or False
        )
        trainer.test(module, datamodule=datamodule, verbose=False)
        results = module.test_results
        if trainer.is_global_zero:
            write_results(output_dir, method, cfg, results, loggers)
    return results


def write_results(output_dir: Path, method: str, cfg: DictConfig, results: dict[str, dict[str, Any]], loggers) -> None:
    import rich

    from dlsn.utils.rich_utils import results_table

    write_json_strict(output_dir / "results.json", results)
    atomic_write_text(output_dir / "results.md", markdown_table(method, cfg.scale, cfg.degradation, results))
    rows = [[name, f"{r['psnr']:.2f}", f"{r['ssim']:.4f}", str(r["n"])] for name, r in results.items()]
    rich.print(results_table(f"{method} x{cfg.scale} {cfg.degradation}", rows, ["set", "PSNR (dB)", "SSIM", "images"]))
    for name, r in results.items():
        if r.get("n_capped"):
            log.warning("%s: %d image(s) identical to their HR image, PSNR capped at 100 dB", name, r["n_capped"])
        if r.get("skipped"):
            log.warning("%s: %d image(s) skipped (data.on_error=skip): %s", name, len(r["skipped"]), ", ".join(r["skipped"]))
    log.info("results written to %s", output_dir / "results.json")
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(
                key="test/results",
                columns=["method", "scale", "degradation", "set", "psnr", "ssim", "images"],
                data=[[method, cfg.scale, cfg.degradation, n, r["psnr"], r["ssim"], r["n"]] for n, r in results.items()],
            )


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
