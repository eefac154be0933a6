"""A stand-in for train.py in sweep tests: same guards and return contract, a formula for PSNR.

Each job writes job.json (its params, W&B group) into its output directory and returns
objective_value(...) of a fake, smooth "validation PSNR" of the searched parameters.
"""

import json
import math
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dlsn.utils.launcher import check_launcher_compatibility
from dlsn.sweep import finish_experiment_runs, objective_value
from dlsn.utils.config import register_resolvers

register_resolvers()


def start_wandb_run(cfg: DictConfig, output_dir: str) -> dict:
    """What train.py does through logger/wandb.yaml, reduced to the parts sweeps depend on."""
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="dlsn-sweep-test", group=cfg.wandb_group, save_dir=output_dir, offline=True)
    logger.log_metrics({"val/psnr_best": 0.0})
    return {"wandb_run_id": logger.experiment.id, "wandb_run_group": logger.experiment.group}


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    try:
        return run_job(cfg)
    finally:
        if cfg.finish_wandb:
            finish_experiment_runs()


def run_job(cfg: DictConfig) -> float | None:
    check_launcher_compatibility(cfg)
    hydra_cfg = HydraConfig.get()
    job_num = OmegaConf.select(hydra_cfg, "job.num", default=0)  # unset in a single run
    if job_num in cfg.crash_jobs:
        raise RuntimeError(f"simulated crash of job {job_num}")
    psnr = 30.0 - (math.log10(cfg.module.optimizer.lr) + 4.0) ** 2 + 0.1 * cfg.model.n_hashes - cfg.model.chunk_size / 1000
    if job_num in cfg.nan_jobs:
        psnr = float("nan")
    record = {
        "job_num": job_num,
        "lr": cfg.module.optimizer.lr,
        "n_hashes": cfg.model.n_hashes,
        "chunk_size": cfg.model.chunk_size,
        "psnr": psnr,
        "wandb_group": cfg.wandb_group,
    }
    if cfg.use_wandb:
        record.update(start_wandb_run(cfg, hydra_cfg.runtime.output_dir))
    Path(hydra_cfg.runtime.output_dir, "job.json").write_text(json.dumps(record))
    return objective_value({"val/psnr_best": psnr}, cfg.optimized_metric)


if __name__ == "__main__":
    main()
