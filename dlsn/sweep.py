"""Glue between Hydra sweeps (grid multirun, Optuna) and a training run.

* :func:`objective_value` turns the finished run's metrics into the number a sweeper optimises,
  raising (not returning NaN) when the run produced nothing usable; see its docstring for why.
* The functions behind the interpolations of the logger/launcher/sweeper configs (registered by
  :func:`dlsn.utils.config.register_resolvers`): ``${dlsn_sweep_group:}`` (one W&B group per sweep),
  ``${dlsn_makedirs:DIR}`` (the Optuna SQLite directory must exist before the study is created),
  ``${dlsn_slurm_count:VALUE,KEY}`` (SLURM nodes / tasks from the trainer settings, refusing "auto"
  before a job is submitted), ``${dlsn_run_id:DIR}`` (a W&B run id fixed by the run directory, so a
  requeued or restarted job also continues its W&B run), ``${dlsn_run_name:TASK}`` /
  ``${dlsn_run_tags:TAGS}`` (runs named and tagged after their command-line overrides) and
  ``${dlsn_study_seed:SEED,STORAGE,STUDY}`` (an Optuna sampler seed that moves on when a study is
  extended, see :func:`study_seed`).
* :func:`record_trial_failure`: a failed job's reason, stored with its Optuna trial (``fail_reason``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

SWEEP_GROUP_RESOLVER = "dlsn_sweep_group"
MAKEDIRS_RESOLVER = "dlsn_makedirs"
SLURM_COUNT_RESOLVER = "dlsn_slurm_count"
RUN_ID_RESOLVER = "dlsn_run_id"
STUDY_SEED_RESOLVER = "dlsn_study_seed"
FAIL_REASON_ATTR = "fail_reason"

log = logging.getLogger(__name__)


class TrialFailedError(RuntimeError):
    """A training run finished without a finite value of the optimised metric."""


def objective_value(metrics: Mapping[str, Any], metric_name: str | None) -> float | None:
    """The value of ``metric_name`` in ``metrics`` as a float, for Hydra's sweeper to read.

    ``metric_name`` is the config's ``optimized_metric`` (``None`` outside a search: returns
    ``None``). A missing or non-finite value raises :class:`TrialFailedError` instead of returning
    NaN: hydra-optuna-sweeper 1.3 records a raised exception as a FAILED trial and carries on (with
    ``max_failure_rate: 1.0``), but a returned NaN makes ``study.tell`` raise inside its own error
    handler, which ends the whole sweep and leaves the trial RUNNING in the database.
    """
    if metric_name is None:
        return None
    if metric_name not in metrics:
        available = ", ".join(sorted(metrics)) or "none"
        raise TrialFailedError(
            f"optimized_metric={metric_name!r} was not logged by this run (logged: {available}). "
            "Check the metric name, and that validation ran at least once."
        )
    raw = metrics[metric_name]
    value = float(raw.item() if hasattr(raw, "item") else raw)
    if not math.isfinite(value):
        raise TrialFailedError(f"optimized_metric={metric_name!r} is {value}; counting this trial as failed.")
    return value


def finish_experiment_runs() -> None:
    """End the active W&B run, if any, so that the next job of a sweep starts a run of its own.

    Sweep jobs of the basic launcher run one after another in one process, and Lightning's
    WandbLogger reuses an active ``wandb.run`` instead of starting a new one: without this every
    trial would log into the first trial's run. Call it when a job ends, successful or not.
    """
    wandb = sys.modules.get("wandb")  # never import wandb just to find there is nothing to close
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def sweep_group_name() -> str | None:
    """A name shared by all jobs of one Hydra sweep, ``None`` for a single run.

    Optuna searches use the study name, so that runs of a resumed study (a later ``-m``
    invocation with a new sweep directory) land in the same group. Grid multiruns use the sweep
    directory's name (``sweep-<timestamp>``), which is unique per invocation and shared by its jobs.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    study_name = OmegaConf.select(hydra_cfg, "sweeper.study_name", default=None)
    if study_name:
        return str(study_name)
    return f"sweep-{Path(str(hydra_cfg.sweep.dir)).name}"


def makedirs(path: str) -> str:
    """Create ``path`` (with parents) if needed and return it unchanged.

    Optuna opens its SQLite file when the sweeper starts, before Hydra has created any job
    directory, and SQLite does not create missing parent directories.
    """
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


def slurm_count(value: Any, key: str = "value") -> int:
    """A positive process/node count for sbatch, from a trainer setting such as ``trainer.devices``.

    Lightning's ``devices="auto"``/``-1`` means "whatever this machine has", which SLURM cannot
    allocate; raising here (while the launcher is built, before submission) names the key to set.
    """
    if isinstance(value, bool):
        raise ValueError(f"{key}={value!r}: SLURM needs a positive integer count.")
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
        if not isinstance(value, (int, str)) and hasattr(value, "__len__"):  # a device-id list
            count = len(value)
    if count < 1:
        raise ValueError(
            f"{key}={value!r} cannot size a SLURM allocation: set it to a positive integer, e.g. "
            f"`{key}=4` (GPUs per node) with hydra/launcher=slurm."
        )
    return count


def run_id(output_dir: str | None) -> str | None:
    """A W&B run id derived from the run's output directory (16 hex digits).

    A job restarted in the same directory (SLURM requeue, a crashed run launched again) resumes
    from that directory's last checkpoint and, with this id and ``resume: allow``, logs into the
    same W&B run; every new directory (new run, each sweep job) gets a run of its own.
    """
    if output_dir is None:  # no run directory yet, e.g. `python train.py --cfg job --resolve`
        return None
    return hashlib.sha1(str(Path(output_dir).resolve()).encode()).hexdigest()[:16]


def job_overrides() -> list[str]:
    """The command-line overrides of this job (for a sweep job: its sweep values too), ``hydra.*`` left out."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    overrides = OmegaConf.select(HydraConfig.get(), "overrides.task", default=None) or []
    return [str(o) for o in overrides if not str(o).lstrip("+~").startswith("hydra")]


def run_name(task_name: str) -> str:
    """``task_name``, then the job's overrides: ``train-model.n_hashes=2,optim.lr=1e-4`` (at most 128 characters)."""
    overrides = job_overrides()
    name = f"{task_name}-{','.join(overrides)}" if overrides else str(task_name)
    return name if len(name) <= 128 else name[:125] + "..."


def run_tags(tags: Any) -> Any:
    """The configured tags plus one per override of this job (W&B tags are at most 64 characters).

    A ListConfig, not a list: ``OmegaConf.resolve`` (``train.py --cfg job --resolve``) can only put a
    container in place of an interpolation.
    """
    configured = [str(tag) for tag in (tags or [])]
    return OmegaConf.create(configured + [o[:64] for o in job_overrides() if o[:64] not in configured])


# ------------------------------------------------------------------------------------ Optuna studies


def _study_trials(storage_url: str, study_name: str) -> tuple[Any, int, list[Any]] | None:
    """``(storage, study id, trials)`` of an existing study, ``None`` when the storage holds no such study."""
    import optuna

    storage = optuna.storages.get_storage(storage_url)
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return None
    return storage, study_id, storage.get_all_trials(study_id, deepcopy=False)


def study_seed(seed: int | None, storage_url: str | None, study_name: str | None) -> int | None:
    """The sampler seed for this invocation of a search: ``seed`` plus the number of trials the study
    already holds (``seed`` itself for a new study; ``None`` stays ``None``, an unseeded sampler).

    hydra-optuna-sweeper builds a fresh sampler on every ``-m`` invocation. With a fixed seed, an
    extended study would draw the same random start-up parameters as the first invocation and repeat
    its first trials. Moving the seed on by the trial count keeps a search reproducible (the same
    study history gives the same next trials) while every extension draws new parameters.
    """
    if seed is None:
        return None
    existing = _study_trials(storage_url, study_name) if storage_url and study_name else None
    n_trials = len(existing[2]) if existing else 0
    if n_trials:
        log.info("study %s already holds %d trials: sampler seed %d + %d", study_name, n_trials, int(seed), n_trials)
    return int(seed) + n_trials


def record_trial_failure(reason: str, hydra_cfg: Any | None = None) -> int | None:
    """Store ``reason`` as the ``fail_reason`` user attribute of this job's Optuna trial; return its number.

    Called in the job (the sweeper marks the trial FAILED afterwards and cannot take attributes then).
    The job finds its trial among the study's RUNNING trials whose parameters are all among the job's
    overrides: the sweeper passes a trial's parameters as ``name=value`` overrides. ``None`` when
    this job is not an Optuna trial with a persistent storage, or no running trial matches.
    """
    if hydra_cfg is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        hydra_cfg = HydraConfig.get()
    sweeper = OmegaConf.select(hydra_cfg, "sweeper", default=None)
    target = str(OmegaConf.select(sweeper, "_target_", default="")) if sweeper is not None else ""
    storage_url = OmegaConf.select(sweeper, "storage", default=None) if "optuna" in target.lower() else None
    if not storage_url:  # not an Optuna search, or an in-memory study the job cannot reach
        return None
    from optuna.trial import TrialState

    existing = _study_trials(str(storage_url), str(OmegaConf.select(sweeper, "study_name")))
    if existing is None:
        return None
    storage, _, trials = existing
    overrides = {str(o) for o in OmegaConf.select(hydra_cfg, "overrides.task", default=[]) or []}
    candidates = [
        trial for trial in trials
        if trial.state == TrialState.RUNNING and trial.params and FAIL_REASON_ATTR not in trial.user_attrs
        and all(f"{name}={value}" in overrides for name, value in trial.params.items())
    ]
    if not candidates:
        return None
    trial = min(candidates, key=lambda t: t.number)  # identical parameters (n_jobs > 1): the earliest
    storage.set_trial_user_attr(trial._trial_id, FAIL_REASON_ATTR, reason)
    return trial.number
