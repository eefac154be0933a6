"""Never lose a run, never report a wrong number quietly: the faults of docs/reliability.md, reproduced
on tiny train.py runs (subprocesses) and asserting what the suite does about them."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from dlsn.callbacks import BestCheckpoint
from dlsn.utils.launcher import RunDirectoryLock
from tests.helpers.runs import PROJECT_ROOT, TINY_TRAIN, read_csv_metrics, run_script

SIGNAL_AT = "+callbacks.signal._target_=tests.helpers.callbacks.SignalAtStep"


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def network_weights(checkpoint):
    return {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}


def assert_resuming_matches_a_straight_run(tmp_path, run_dir, settings):
    """Run ``train.py`` again in the stopped run's directory (it resumes) and compare its final network
    with that of one uninterrupted run of the same settings: they must be bit-identical."""
    run_script("train.py", run_dir, *settings)
    straight = tmp_path / "straight"
    run_script("train.py", straight, *settings)
    resumed, reference = load(run_dir / "checkpoints" / "last.ckpt"), load(straight / "checkpoints" / "last.ckpt")
    for key, value in network_weights(reference).items():
        torch.testing.assert_close(network_weights(resumed)[key], value, rtol=0, atol=0, msg=key)


def test_last_checkpoint_follows_every_validation_and_every_n_steps_on_a_plateau(tmp_path):
    """lr=0: validation PSNR is the same every epoch, so best.ckpt stays at epoch 0; last.ckpt must not."""
    run_dir = tmp_path / "run"
    run_script("train.py", run_dir, *TINY_TRAIN, "trainer.max_epochs=3", "module.optimizer.lr=0.0",
               "checkpoint.every_n_steps=2")
    psnr = [float(r["val/psnr"]) for r in read_csv_metrics(run_dir) if r.get("val/psnr")]
    assert len(psnr) == 3 and max(psnr) - min(psnr) < 1e-9  # a plateau
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 9
    assert load(run_dir / "checkpoints" / "best.ckpt")["global_step"] == 3
    log = (run_dir / "train.log").read_text()
    assert "saved" in log and "(every 2 steps, step 2)" in log and "(after validation, step 9)" in log
    # The text log has a line per validation with the numbers, and a progress line per logging interval.
    assert log.count("validation at step") == 3 and "| mean " in log and "| best " in log
    progress = [line for line in log.splitlines() if "patches/s" in line]
    assert len(progress) == 9 and all("step " in line and "| lr " in line and "ETA" in line for line in progress)


def test_sigterm_saves_the_step_exits_143_and_the_restart_continues_exactly(tmp_path):
    """`scancel` / `timeout`: last.ckpt holds the step reached, the status says it was stopped, and
    re-running the command in the same directory finishes with the weights of an uninterrupted run."""
    settings = [*TINY_TRAIN, "trainer.max_epochs=2", "data.iters_per_epoch=4", "checkpoint.every_n_steps=1000"]
    # Every intra-op thread: before train.py settled MKL's vector math (dlsn/utils/vector_math.py), about
    # one resumed run in ten on two threads differed from the straight one by a few ulps.
    stopped = tmp_path / "stopped"
    proc = run_script("train.py", stopped, *settings, SIGNAL_AT, "+callbacks.signal.step=2", expect_success=False)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert load(stopped / "checkpoints" / "last.ckpt")["global_step"] == 2  # inside the first epoch
    assert "stopped by SIGTERM" in (stopped / "train.log").read_text()

    run_script("train.py", stopped, *settings)  # the same command again: resumes from last.ckpt
    assert "Resuming from" in (stopped / "train.log").read_text()
    straight = tmp_path / "straight"
    run_script("train.py", straight, *settings)
    resumed, reference = load(stopped / "checkpoints" / "last.ckpt"), load(straight / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == reference["global_step"] == 8
    for key, value in network_weights(reference).items():
        torch.testing.assert_close(network_weights(resumed)[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_preemption_warning_saves_then_exits_and_the_requeued_job_continues_exactly(tmp_path):
    """SLURM's warning signal (SIGUSR2 through submitit): save last.ckpt at the end of the batch, stop; the
    requeued job (same directory) continues from that exact step."""
    settings = [*TINY_TRAIN, "trainer.max_epochs=2", "data.iters_per_epoch=4"]
    run_dir = tmp_path / "job"
    proc = run_script("train.py", run_dir, *settings, SIGNAL_AT, "+callbacks.signal.step=5",
                      "+callbacks.signal.signal_name=SIGUSR2", expect_success=False)
    assert proc.returncode == 128 + signal.SIGUSR2
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 6  # saved at the next batch's end
    assert_resuming_matches_a_straight_run(tmp_path, run_dir, settings)


@pytest.mark.slow
def test_an_empty_last_checkpoint_is_skipped_with_a_warning_and_the_run_resumes_from_the_newest_good_one(tmp_path):
    run_dir = tmp_path / "run"
    settings = [*TINY_TRAIN, "checkpoint.every_n_steps=1000"]
    run_script("train.py", run_dir, *settings, "trainer.max_epochs=1")
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")  # killed while the file was being written
    run_script("train.py", run_dir, *settings, "trainer.max_epochs=2")
    log = (run_dir / "train.log").read_text()
    assert "not resuming from" in log and "last.ckpt is empty (0 bytes)" in log
    assert "Resuming from" in log and "best.ckpt" in log
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 6  # continued, not restarted


def test_a_second_run_in_the_same_directory_refuses_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    with RunDirectoryLock(run_dir):
        proc = run_script("train.py", run_dir, *TINY_TRAIN, expect_success=False)
    assert proc.returncode != 0
    assert f"run directory {run_dir} is in use by pid {os.getpid()}" in proc.stderr
    assert not (run_dir / "checkpoints").exists()


def test_a_diverged_run_stops_with_an_error_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_script("train.py", run_dir, *TINY_TRAIN, "trainer.max_epochs=3", "module.optimizer.lr=1e6",
                      "module.max_consecutive_skips=3", "module.divergence_check_every_n_steps=1",
                      "checkpoint.every_n_steps=1", expect_success=False)
    assert proc.returncode == 1
    assert "training diverged: the last 3 batches (up to step" in proc.stderr
    assert f"Last good checkpoint: {run_dir}/checkpoints/last.ckpt (step " in proc.stderr
    assert not (run_dir / "checkpoints" / "best.ckpt").exists()  # no validation ever had a finite score
    rows = read_csv_metrics(run_dir)
    losses = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    assert math.isfinite(losses[0]) and all(math.isnan(x) for x in losses[1:])  # skipped steps logged as skipped


def test_wandb_disabled_writes_no_files(tmp_path):
    disabled = tmp_path / "disabled"
    run_script("train.py", disabled, *[o for o in TINY_TRAIN if o != "logger=csv"], "logger=wandb")
    assert not (disabled / "wandb").exists()


# --------------------------------------------------------------------------------- best.ckpt guard


def _best_file(directory, score):
    directory.mkdir(parents=True, exist_ok=True)
    state = {"monitor": "val/psnr", "best_model_score": torch.tensor(score), "best_model_path": "x"}
    torch.save({"global_step": 1200, "state_dict": {}, "callbacks": {"BestCheckpoint{'monitor': 'val/psnr'}": state}},
               directory / "best.ckpt")


def _Trainer():  # noqa: N802 - stands for the Trainer a callback gets
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)


def test_best_checkpoint_from_an_earlier_run_is_only_replaced_by_a_better_score(tmp_path):
    _best_file(tmp_path, 28.52)
    callback = BestCheckpoint(dirpath=tmp_path, filename="best", monitor="val/psnr", mode="max", save_top_k=1,
                              enable_version_counter=False)
    callback.setup(_Trainer(), None, "fit")
    assert float(callback.best_model_score) == pytest.approx(28.52)
    assert not callback.check_monitor_top_k(_Trainer(), torch.tensor(24.34))
    assert callback.check_monitor_top_k(_Trainer(), torch.tensor(29.0))


def test_best_checkpoint_never_records_a_nan_score(tmp_path):
    callback = BestCheckpoint(dirpath=tmp_path, filename="best", monitor="val/psnr", mode="max", save_top_k=1)
    assert not callback.check_monitor_top_k(_Trainer(), torch.tensor(float("nan")))
    assert not callback.check_monitor_top_k(_Trainer(), torch.tensor(float("-inf")))


def test_an_unreadable_best_checkpoint_is_moved_aside_not_overwritten(tmp_path):
    (tmp_path / "best.ckpt").write_bytes(b"\x00" * 100)
    callback = BestCheckpoint(dirpath=tmp_path, filename="best", monitor="val/psnr", mode="max", save_top_k=1)
    callback.setup(_Trainer(), None, "fit")
    kept = [p.name for p in tmp_path.iterdir()]
    assert "best.ckpt" not in kept and any(name.startswith("best.ckpt.unreadable-") for name in kept)


@pytest.mark.slow
def test_kill_9_costs_at_most_the_steps_since_the_last_save_and_the_restart_is_exact(tmp_path):
    settings = [*TINY_TRAIN, "trainer.max_epochs=2", "data.iters_per_epoch=4", "checkpoint.every_n_steps=2"]
    run_dir = tmp_path / "killed"
    proc = run_script("train.py", run_dir, *settings, SIGNAL_AT, "+callbacks.signal.step=3",
                      "+callbacks.signal.signal_name=SIGKILL", expect_success=False)
    assert proc.returncode == -signal.SIGKILL
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 2  # saved every 2 steps, atomically
    assert_resuming_matches_a_straight_run(tmp_path, run_dir, settings)


@pytest.mark.slow
def test_a_run_started_from_a_read_only_directory_writes_under_the_project_root(tmp_path):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    run_dir = tmp_path / "run"
    env = {key: value for key, value in os.environ.items() if key != "PROJECT_ROOT"} | {"WANDB_MODE": "disabled"}
    command = [sys.executable, str(PROJECT_ROOT / "train.py"), f"hydra.run.dir={run_dir}", *TINY_TRAIN,
               "trainer.max_steps=2"]
    proc = subprocess.run(command, cwd=read_only, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list(read_only.iterdir()) == []
