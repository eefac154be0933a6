"""Optuna searches (configs/hparams_search/dlsn_optuna.yaml): study names, extending a study, failure reasons.

The slow tests run tests/optuna_app/app.py, a stand-in for train.py with the repository's Hydra
config (log file, SweepReportCallback, logging levels) and the real search config, in a
subprocess with a timeout; it computes a formula instead of training.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dlsn.sweep import FAIL_REASON_ATTR, record_trial_failure, study_seed
from dlsn.utils.config import register_resolvers

optuna = pytest.importorskip("optuna")

REPO_ROOT = Path(__file__).parents[1]
APP = Path(__file__).parent / "optuna_app" / "app.py"
SEARCHPATH = f"hydra.searchpath=[file://{REPO_ROOT / 'configs'}]"
OPTUNA_SWEEPER = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
TIMEOUT_S = 180


def run_app(log_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(REPO_ROOT))
    command = [sys.executable, str(APP), "-m", SEARCHPATH, f"paths.log_dir={log_dir}", "+hparams_search=dlsn_optuna",
               *overrides]
    log_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(command, env=env, cwd=log_dir, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def load_study(log_dir: Path, name: str = "stand_in-dlsn_optuna"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{log_dir / 'optuna' / f'{name}.db'}")


def add_trials(storage: str, name: str, count: int) -> list:
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
    trials = [study.ask() for _ in range(count)]
    for trial in trials:
        trial.suggest_float("lr", 1e-5, 1e-3, log=True)
        trial.suggest_int("n_hashes", 1, 4)
    return trials


# ------------------------------------------------------------------------------------ fast checks


def test_study_names_follow_the_experiment_and_the_search(tmp_path):
    from hydra import compose, initialize_config_dir

    register_resolvers()
    names = {}
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        for experiment in (None, "experiment=dlsn_x2", "~experiment"):
            overrides = ["hparams_search=dlsn_optuna", f"paths.log_dir={tmp_path}"] + ([experiment] if experiment else [])
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
            sweeper = cfg.hydra.sweeper
            names[experiment] = sweeper.study_name
            assert sweeper.storage == f"sqlite:///{tmp_path / 'optuna'}/{sweeper.study_name}.db"
            assert sweeper.sampler.seed == 1234  # a new study: the configured seed
    # the quickstart search and the paper recipe no longer share a study (or its SQLite file)
    assert names == {None: "quickstart-dlsn_optuna", "experiment=dlsn_x2": "dlsn_x2-dlsn_optuna",
                     "~experiment": "train-dlsn_optuna"}


def test_study_seed_moves_on_by_the_number_of_trials(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    add_trials(storage, "search", 3)
    assert study_seed(1234, storage, "search") == 1234 + 3
    assert study_seed(1234, storage, "another-search") == 1234  # not created yet
    assert study_seed(None, storage, "search") is None  # an unseeded sampler stays unseeded
    assert study_seed(7, None, None) == 7  # in-memory study: always new


def test_failure_reason_goes_to_the_running_trial_with_the_jobs_parameters(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first, second = add_trials(storage, "search", 2)

    def hydra_cfg(trial, target=OPTUNA_SWEEPER):
        overrides = [f"{name}={value}" for name, value in trial.params.items()] + ["trainer.max_epochs=2"]
        return OmegaConf.create({"sweeper": {"_target_": target, "storage": storage, "study_name": "search"},
                                 "overrides": {"task": overrides}})

    assert record_trial_failure("RuntimeError: out of memory", hydra_cfg(second)) == second.number
    trials = optuna.load_study(study_name="search", storage=storage).trials
    assert trials[second.number].user_attrs[FAIL_REASON_ATTR] == "RuntimeError: out of memory"
    assert FAIL_REASON_ATTR not in trials[first.number].user_attrs
    # not an Optuna sweep, or no running trial with these parameters: nothing is written
    assert record_trial_failure("x", hydra_cfg(first, target="hydra._internal.core_plugins.basic_sweeper.BasicSweeper")) is None
    study = optuna.load_study(study_name="search", storage=storage)
    study.tell(first.number, 1.0)
    assert record_trial_failure("x", hydra_cfg(first)) is None
    assert FAIL_REASON_ATTR not in study.trials[first.number].user_attrs


# ------------------------------------------------------------------------------- stand-in sweeps


@pytest.mark.slow
def test_extending_a_study_draws_new_parameters(tmp_path):
    log_dir = tmp_path / "logs"
    first = run_app(log_dir, "hydra.sweeper.n_trials=2")
    second = run_app(log_dir, "hydra.sweeper.n_trials=2")  # the same command again: 2 more trials
    study = load_study(log_dir)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    params = [t.params for t in study.trials]
    # A re-created TPESampler(seed=1234) would repeat trials 0 and 1 exactly; with the seed moved on by
    # the trial count the start-up draws are new (lr is continuous: a repeat would be an exact match).
    assert params[2:] != params[:2]
    assert len({p["module.optimizer.lr"] for p in params}) == 4
    assert "already holds 2 trials: sampler seed 1234 + 2" in second.stdout + second.stderr
    # trials_dataframe(), as shown in docs/scaling.md, needs pandas (the `sweep` extra)
    frame = study.trials_dataframe()
    assert len(frame) == 4 and frame["params_module.optimizer.lr"].nunique() == 4
    # alembic's "setup plugin" INFO lines (Optuna's SQLite storage) are silenced
    assert "setup plugin" not in first.stdout + first.stderr + second.stdout + second.stderr


@pytest.mark.slow
def test_failed_trial_keeps_its_reason_in_the_study_the_job_log_and_the_summary(tmp_path):
    log_dir = tmp_path / "logs"
    run_app(log_dir, "hydra.sweeper.n_trials=3", "crash_jobs=[1]")
    study = load_study(log_dir)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    reason = "RuntimeError: simulated crash of job 1"
    assert study.trials[1].user_attrs[FAIL_REASON_ATTR] == reason
    assert FAIL_REASON_ATTR not in study.trials[0].user_attrs
    assert list(study.trials_dataframe()["user_attrs_fail_reason"].fillna("")) == ["", reason, ""]

    [sweep_dir] = (log_dir / "train" / "multiruns").iterdir()
    job_log = (sweep_dir / "1" / "train.log").read_text()
    assert f"job failed: {reason}" in job_log
    assert "Traceback (most recent call last)" in job_log and 'raise RuntimeError(f"simulated crash' in job_log

    # The summary written when the multirun ended: statuses, reasons, best PSNR per job
    with open(sweep_dir / "sweep_summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["job"], row["status"], row["reason"]) for row in rows] == [
        ("0", "finished", ""), ("1", "failed", reason), ("2", "finished", "")]
    for row in (rows[0], rows[2]):
        job = json.loads((sweep_dir / row["job"] / "job.json").read_text())
        assert float(row["val_psnr"]) == pytest.approx(job["psnr"], abs=0.005)  # the log has 2 decimals
        assert study.trials[int(row["job"])].value == pytest.approx(job["psnr"])
        assert row["steps"] == "6" and row["best_step"] == "6"
        assert f"module.optimizer.lr={job['lr']}" in row["overrides"]
    assert rows[1]["steps"] == "3" and rows[1]["val_psnr"] == ""
    assert (sweep_dir / "sweep_psnr.png").stat().st_size > 0
    assert f"- job 1 (failed): {reason}" in (sweep_dir / "sweep_summary.md").read_text()
