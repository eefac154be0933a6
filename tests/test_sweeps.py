"""Sweeps and launchers with the real sweep/launcher configs and a stand-in for train.py.

tests/sweep_app/app.py has train.py's contract (launcher guard, `objective_value` return, W&B
group interpolation) but computes a formula instead of training, so these tests check the Hydra,
Optuna, SQLite and submitit side in seconds. Each Hydra run is a subprocess with a timeout.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dlsn.sweep import TrialFailedError, objective_value, slurm_count
from dlsn.utils.config import register_resolvers

REPO_ROOT = Path(__file__).parents[1]
APP = Path(__file__).parent / "sweep_app" / "app.py"
SEARCHPATH = f"hydra.searchpath=[file://{REPO_ROOT / 'configs'}]"
TIMEOUT_S = 180


def run_app(log_dir: Path, *overrides: str, multirun: bool = True, expect_success: bool = True):
    # W&B offline (not disabled): the W&B test needs real run ids; nothing leaves the machine.
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=str(REPO_ROOT))
    mode = ["-m"] if multirun else []
    command = [sys.executable, str(APP), *mode, SEARCHPATH, f"paths.log_dir={log_dir}", *overrides]
    log_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(command, env=env, cwd=log_dir, capture_output=True, text=True, timeout=TIMEOUT_S)
    if expect_success:
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def sweep_dirs(log_dir: Path) -> list[Path]:
    return sorted((log_dir / "train" / "multiruns").iterdir())


def jobs_of(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/job.json"), key=lambda p: int(p.parent.name))]


# -------------------------------------------------------------------------------- objective value


def test_objective_value_returns_the_metric_and_raises_on_bad_values():
    assert objective_value({"val/psnr_best": 31.5}, "val/psnr_best") == 31.5
    assert objective_value({}, None) is None  # not a search: train.py returns nothing
    with pytest.raises(TrialFailedError, match="nan"):
        objective_value({"val/psnr_best": float("nan")}, "val/psnr_best")
    with pytest.raises(TrialFailedError, match="was not logged.*val/psnr"):
        objective_value({"val/psnr": 30.0}, "val/psnr_best")


def test_slurm_count_refuses_auto_devices():
    assert slurm_count(4, "trainer.devices") == 4
    assert slurm_count("2", "trainer.num_nodes") == 2
    assert slurm_count([0, 1, 2], "trainer.devices") == 3
    for bad in ("auto", -1, 0, None):
        with pytest.raises(ValueError, match="trainer.devices="):
            slurm_count(bad, "trainer.devices")


# ----------------------------------------------------------------------------------- Optuna sweep


@pytest.mark.slow
def test_optuna_search_survives_failed_trials_and_resumes_from_sqlite(tmp_path):
    import optuna

    log_dir = tmp_path / "logs"
    # Three trials: job 1 crashes, job 2 ends with a NaN metric; the search must finish anyway.
    run_app(log_dir, "+hparams_search=dlsn_optuna", "hydra.sweeper.n_trials=3",
            "crash_jobs=[1]", "nan_jobs=[2]")
    storage = f"sqlite:///{log_dir / 'optuna' / 'train-dlsn_optuna.db'}"
    study = optuna.load_study(study_name="train-dlsn_optuna", storage=storage)
    states = [trial.state.name for trial in study.trials]
    assert states == ["COMPLETE", "FAIL", "FAIL"]
    [first_sweep] = sweep_dirs(log_dir)
    jobs = jobs_of(first_sweep)
    assert study.trials[0].value == pytest.approx(jobs[0]["psnr"])
    assert study.trials[0].params["model.n_hashes"] == jobs[0]["n_hashes"]
    assert {job["wandb_group"] for job in jobs} == {"train-dlsn_optuna"}  # grouped by study
    assert 2e-5 <= jobs[0]["lr"] <= 5e-4 and jobs[0]["chunk_size"] in (64, 128, 144)

    # The same command again continues the study in the same SQLite file.
    run_app(log_dir, "+hparams_search=dlsn_optuna", "hydra.sweeper.n_trials=2")
    study = optuna.load_study(study_name="train-dlsn_optuna", storage=storage)
    assert [trial.number for trial in study.trials] == [0, 1, 2, 3, 4]
    assert [trial.state.name for trial in study.trials[3:]] == ["COMPLETE", "COMPLETE"]
    second_sweep = sweep_dirs(log_dir)[1]
    results = OmegaConf.load(second_sweep / "optimization_results.yaml")
    completed = [t.value for t in study.trials if t.state.name == "COMPLETE"]
    assert results.best_value == pytest.approx(max(completed))  # maximised, over both invocations


# ------------------------------------------------------------------------------------- grid sweep


@pytest.mark.slow
def test_grid_multirun_runs_every_combination_in_one_wandb_group(tmp_path):
    log_dir = tmp_path / "logs"
    run_app(log_dir, "model.n_hashes=1,2", "model.chunk_size=64,128")
    [sweep_dir] = sweep_dirs(log_dir)
    jobs = jobs_of(sweep_dir)
    assert sorted((job["n_hashes"], job["chunk_size"]) for job in jobs) == [(1, 64), (1, 128), (2, 64), (2, 128)]
    assert {job["wandb_group"] for job in jobs} == {f"sweep-{sweep_dir.name}"}


@pytest.mark.slow
def test_each_sweep_job_gets_its_own_wandb_run_in_the_sweep_group(tmp_path):
    with_finish = tmp_path / "with_finish" / "logs"
    run_app(with_finish, "model.n_hashes=1,2", "use_wandb=true")
    [sweep_dir] = sweep_dirs(with_finish)
    jobs = jobs_of(sweep_dir)
    assert len({job["wandb_run_id"] for job in jobs}) == 2
    assert {job["wandb_run_group"] for job in jobs} == {f"sweep-{sweep_dir.name}"}

    # Control: without finish_experiment_runs() Lightning's WandbLogger reuses the first run.
    without_finish = tmp_path / "without_finish" / "logs"
    run_app(without_finish, "model.n_hashes=1,2", "use_wandb=true", "finish_wandb=false")
    jobs = jobs_of(sweep_dirs(without_finish)[0])
    assert len({job["wandb_run_id"] for job in jobs}) == 1


@pytest.mark.slow
def test_single_run_has_no_group_and_returns_nothing(tmp_path):
    log_dir = tmp_path / "logs"
    run_app(log_dir, "trainer.devices=2", multirun=False)  # one DDP run without -m is allowed
    [job_file] = (log_dir / "train" / "runs").glob("*/job.json")
    assert json.loads(job_file.read_text())["wandb_group"] is None


@pytest.mark.slow
def test_local_multirun_with_ddp_is_refused_with_a_clear_message(tmp_path):
    log_dir = tmp_path / "logs"
    result = run_app(log_dir, "trainer.devices=2", "model.n_hashes=1,2", expect_success=False)
    assert result.returncode != 0
    assert "Refusing to run a Hydra multirun (-m) with launcher BasicLauncher" in result.stderr
    assert "trainer.devices=2" in result.stderr and "hydra/launcher=slurm" in result.stderr
    assert not list(log_dir.rglob("job.json"))  # refused before any work


# ------------------------------------------------------------------------------- SLURM launcher


def compose_app(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(APP.parent / "conf"), version_base="1.3"):
        return compose("train", overrides=[SEARCHPATH, "paths.log_dir=/tmp/unused", *overrides],
                       return_hydra_config=True)


def sbatch_text(cfg, folder: Path, monkeypatch) -> str:
    """The sbatch script hydra-submitit-launcher would submit for this config (nothing is run)."""
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    # submitit refuses to build a SLURM executor where `srun` is missing; a stub on PATH is enough.
    fake_bin = folder / "bin"
    fake_bin.mkdir()
    srun = fake_bin / "srun"
    srun.write_text("#!/bin/sh\nexit 0\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")

    launcher = instantiate(cfg.hydra.launcher)  # resolves every interpolation, as at submission
    params = dict(launcher.params)
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    params.pop("submitit_folder")
    shared_keys = set(OmegaConf.structured(BaseQueueConf).keys())
    # The same renaming hydra-submitit-launcher does before update_parameters.
    executor.update_parameters(**{k if k in shared_keys else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")


def test_slurm_launcher_config_gives_one_task_per_gpu_and_requeue(tmp_path, monkeypatch):
    from dlsn.utils.launcher import check_launcher_compatibility

    cfg = compose_app(["hydra/launcher=slurm", "trainer.devices=4", "+trainer.num_nodes=2",
                       "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=600"])
    text = sbatch_text(cfg, tmp_path, monkeypatch)
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu",
                 "--time=600", "--signal=USR2@300"):
        assert f"#SBATCH {line}\n" in text, f"missing {line} in\n{text}"
    assert "#SBATCH --requeue\n" in text
    assert "srun" in text  # one process per task, started by SLURM, not by Lightning
    # And the job-side check agrees with the layout.
    from hydra.types import RunMode

    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    check_launcher_compatibility(cfg, OmegaConf.create({"mode": RunMode.MULTIRUN, "launcher": launcher}))


def test_slurm_launcher_refuses_auto_devices_before_submitting(tmp_path, monkeypatch):
    cfg = compose_app(["hydra/launcher=slurm", "trainer.devices=auto"])
    with pytest.raises(Exception, match="trainer.devices='auto' cannot size a SLURM allocation"):
        sbatch_text(cfg, tmp_path, monkeypatch)


def test_wandb_run_id_follows_the_run_directory(tmp_path):
    from dlsn.sweep import run_id

    first, second = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    assert run_id(str(first)) == run_id(str(tmp_path / "runs" / ".." / "runs" / "a"))
    assert run_id(str(first)) != run_id(str(second))
    assert len(run_id(str(first))) == 16 and int(run_id(str(first)), 16) >= 0
