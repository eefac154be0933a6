"""A stand-in for train.py in the Optuna and sweep-summary tests: the real Hydra configs, a formula for PSNR.

The primary config (conf/train.yaml) takes the repository's ``hydra: default`` (job log file, the
sweep-report callback, logging levels) and, with ``+hparams_search=dlsn_optuna``, the real search.
Each job logs TrainingLog-style lines (steps, validations) into its ``<task>.log``, writes job.json
(its parameters) and returns ``objective_value`` of a smooth "PSNR" of the searched parameters.
"""

import json
import logging
import math
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dlsn.sweep import objective_value
from dlsn.utils.config import register_resolvers

register_resolvers()
log = logging.getLogger("dlsn.callbacks")  # the logger TrainingLog writes with


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    job_num = OmegaConf.select(hydra_cfg, "job.num", default=0)
    psnr = 30.0 - (math.log10(cfg.module.optimizer.lr) + 4.0) ** 2 + 0.1 * cfg.model.n_hashes - cfg.model.chunk_size / 1000
    best = -math.inf
    for validation in range(1, cfg.validations + 1):
        step = validation * cfg.steps_per_validation
        log.info("step %d/%d | epoch %d | loss 0.1000 | lr %.3g | 10.0 patches/s | skipped 0 | ETA 0:00:01",
                 step, cfg.validations * cfg.steps_per_validation, validation - 1, cfg.module.optimizer.lr)
        if job_num in cfg.crash_jobs:
            raise RuntimeError(f"simulated crash of job {job_num}")
        value = psnr - 1.0 / validation  # improves with training
        best = max(best, value)
        log.info("validation at step %d (epoch %d): sample %.2f dB / %.4f | mean %.2f dB | best %.2f dB",
                 step, validation - 1, value, 0.9, value, best)
    record = {"job_num": job_num, "lr": cfg.module.optimizer.lr, "n_hashes": cfg.model.n_hashes,
              "chunk_size": cfg.model.chunk_size, "psnr": best}
    Path(hydra_cfg.runtime.output_dir, "job.json").write_text(json.dumps(record))
    return objective_value({"val/psnr_best": best}, cfg.optimized_metric)


if __name__ == "__main__":
    main()
