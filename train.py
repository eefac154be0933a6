"""Train an SR network. `python train.py` trains the small DLSN on the bundled sample images.

    python train.py                                   # quickstart: dlsn_small on data=sample, CPU or GPU
    python train.py experiment=dlsn_x2                # the paper's x2 recipe
    python train.py ckpt_path=.../checkpoints/last.ckpt   # resume exactly where a run stopped
    python train.py model.n_hashes=4 module.optimizer.lr=2e-4   # any config key (see configs/)

Exit status: 0 when the run finished, 128 + the signal number when a signal stopped it after saving
last.ckpt (143 for SIGTERM, 130 for SIGINT), 1 for an error (a diverged run included).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from dlsn.callbacks import LastCheckpoint, RunStopped, find_callback
from dlsn.checkpoint import init_from, load_into, read_weights, resolve_ckpt_path
from dlsn.lightning_module import DivergenceError
from dlsn.sweep import finish_experiment_runs, objective_value
from dlsn.utils.config import apply_extras, register_resolvers, set_project_root, validate_config
from dlsn.utils.instantiate import build_network, instantiate_group, log_hyperparameters, network_config
from dlsn.utils.launcher import (
    RunDirectoryLock,
    check_launcher_compatibility,
    exit_code_for_signal,
    is_rank_zero_process,
    shutdown_process_group,
)

log = logging.getLogger("dlsn.train")
set_project_root(__file__)
register_resolvers()


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train (and optionally test) as configured; returns the final logged metrics."""
    validate_config(cfg)
    check_launcher_compatibility(cfg)
    apply_extras(cfg)
    L.seed_everything(cfg.seed, workers=True)
    run_dir = cfg.paths.output_dir
    # Rank 0 holds the run directory: a second run started in it refuses instead of overwriting it.
    with RunDirectoryLock(run_dir) if is_rank_zero_process() else contextlib.nullcontext():
        # An explicit ckpt_path, else the run directory's newest readable checkpoint: re-running a
        # command in the same directory (a requeued job, a crashed run) continues it.
        resume_from = resolve_ckpt_path(cfg.get("ckpt_path"), run_dir)
        datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
        if cfg.get("test"):  # the validation sets are checked in setup(); the test sets now, not after training
            datamodule.prepare_data()
            datamodule.check_eval_sets("test")
        net = build_network(cfg.model)
        if cfg.get("init_from") and resume_from is None:
            init_from(net, cfg.init_from, trust=cfg.get("trust_checkpoint", False))
        module = hydra.utils.instantiate(cfg.module, net, network_config(cfg.model), _convert_="all")
        loggers = instantiate_group(cfg.get("logger"), "logger")
        trainer: L.Trainer = hydra.utils.instantiate(
            cfg.trainer, callbacks=instantiate_group(cfg.get("callbacks"), "callbacks"), logger=loggers or False
        )
        if not trainer.is_global_zero:  # the text log is written once, by rank 0; other ranks only warn
            logging.getLogger("dlsn").setLevel(logging.WARNING)
        log_hyperparameters(loggers, cfg, net)

        if cfg.get("train", True):
            try:
                trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
            except DivergenceError as err:
                last = find_callback(trainer, LastCheckpoint)
                good = f"{last.path} (step {last.saved_step})" if last and last.saved_step is not None else "none saved"
                raise DivergenceError(f"{err} Last good checkpoint: {good}.") from err
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
        if best:
            log.info("best checkpoint: %s", best)
        if cfg.get("test"):
            if best:
                # The weights best.ckpt's state_dict holds, i.e. what validation scored (with callbacks=ema
                # the averaged ones): trainer.test(ckpt_path=best) would let EMAWeightAveraging put the raw
                # training weights back.
                load_into(module.net, read_weights(best).state_dict, source=best)
            trainer.test(module, datamodule=datamodule)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    return metrics


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except RunStopped as stop:
        log.warning("%s", stop)
        if stop.requeue_handler is not None:
            stop.requeue_handler(stop.signum, None)  # e.g. submitit: requeue the job, then exit
        raise SystemExit(exit_code_for_signal(stop.signum)) from None
    except SIGTERMException:  # Lightning stopped on SIGTERM before GracefulStop could (e.g. in validation)
        log.warning("stopped by SIGTERM")
        raise SystemExit(exit_code_for_signal(15)) from None
    finally:
        finish_experiment_runs()  # the next job of a sweep starts its own W&B run
    shutdown_process_group()
    # The value an hparams search optimises (optimized_metric, e.g. val/psnr_best); None otherwise.
    return objective_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
