"""Sweep summaries (dlsn.sweep_report) from hand-made job directories: every status, partial sweeps.

Each job directory holds what a train.py job leaves: ``.hydra/`` (overrides, job number, task name),
the text log with TrainingLog's lines and the start/end lines of SweepReportCallback, sometimes
the CSV logger's metrics.csv, a held run lock, or only a checkpoint. The end-to-end checks with
real sweeps are in tests/test_optuna.py and tests/test_sweep_workflow.py.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dlsn.sweep_report import (
    FAILED,
    FINISHED,
    INTERRUPTED,
    RUNNING,
    SUMMARY_CSV,
    SUMMARY_MARKDOWN,
    SUMMARY_PLOT,
    main,
    read_job,
    summarize_sweep,
    write_summary,
)
from dlsn.utils.launcher import RunDirectoryLock

REPO_ROOT = Path(__file__).parents[1]
SHARED = "trainer.max_epochs=2"


def log_line(time: str, message: str, logger: str = "dlsn.callbacks", level: str = "INFO") -> str:
    return f"[2026-01-01 {time},000][{logger}][{level}] - {message}"


def started(time: str, number: int) -> str:
    return log_line(time, f"job started: model.n_hashes={number} {SHARED}", "dlsn.sweep_report")


def validation(time: str, step: int, set5: float, set14: float) -> str:
    sets = f"Set5 {set5:.2f} dB / 0.9000, Set14 {set14:.2f} dB / 0.8000"
    return log_line(time, f"validation at step {step} (epoch {step // 3 - 1}): {sets} | mean {(set5 + set14) / 2:.2f} dB"
                          f" | best {(set5 + set14) / 2:.2f} dB")


def progress(time: str, step: int, total: int = 6) -> str:
    return log_line(time, f"step {step}/{total} | epoch 0 | loss 0.1000 | lr 0.0001 | 10.0 patches/s | skipped 0 | ETA 0:00:10")


def make_job(sweep_dir: Path, number: int, lines: list[str] | None) -> Path:
    """A job directory as Hydra and train.py leave it (``lines=None``: no log written yet)."""
    job_dir = sweep_dir / str(number)
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(f"- model.n_hashes={number}\n- {SHARED}\n")
    (job_dir / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {number}\n")
    (job_dir / ".hydra" / "config.yaml").write_text("task_name: train\n")
    if lines is not None:
        (job_dir / "train.log").write_text("\n".join(lines) + "\n")
    return job_dir


def write_metrics_csv(job_dir: Path, rows: list[dict]) -> None:
    """Lightning CSVLogger rows: a validation is logged at (optimizer steps done) - 1."""
    path = job_dir / "csv" / "version_0" / "metrics.csv"
    path.parent.mkdir(parents=True)
    columns = ["epoch", "step", "train/loss_step", "val/psnr", "val/psnr_best", "val/Set5/psnr", "val/Set5/ssim",
               "val/Set14/psnr", "val/Set14/ssim"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def partial_sweep(tmp_path) -> Path:
    """A sweep directory caught mid-way: one job of each kind."""
    sweep = tmp_path / "multiruns" / "2026-01-01_10-00-00"
    # 0: finished, with metrics.csv (full precision) as well as the log (2 decimals)
    job0 = make_job(sweep, 0, [
        started("10:00:00", 0), progress("10:00:05", 3), validation("10:00:06", 3, 30.00, 28.00),
        progress("10:00:10", 6), validation("10:00:11", 6, 31.00, 28.00),
        log_line("10:01:40", "job finished (returned 29.5034)", "dlsn.sweep_report"),
    ])
    write_metrics_csv(job0, [
        {"epoch": 0, "step": 1, "train/loss_step": 0.2},
        {"epoch": 0, "step": 2, "val/psnr": 29.0012, "val/psnr_best": 29.0012, "val/Set5/psnr": 30.0012,
         "val/Set5/ssim": 0.90012, "val/Set14/psnr": 28.0012, "val/Set14/ssim": 0.80012},
        {"epoch": 1, "step": 5, "val/psnr": 29.5034, "val/psnr_best": 29.5034, "val/Set5/psnr": 31.0034,
         "val/Set5/ssim": 0.91034, "val/Set14/psnr": 28.0034, "val/Set14/ssim": 0.80034},
    ])
    # 1: failed after 3 steps (the traceback lines follow the failure line)
    make_job(sweep, 1, [
        started("10:02:00", 1), progress("10:02:05", 3),
        log_line("10:02:10", "job failed: RuntimeError: CUDA out of memory | tried 2 GiB", "dlsn.sweep_report", "ERROR"),
        log_line("10:02:10", "traceback of the failure:", "dlsn.sweep_report", "ERROR"),
        "Traceback (most recent call last):", '  File "train.py", line 1, in <module>', "RuntimeError: CUDA out of memory",
    ])
    # 2: stopped by SIGTERM after saving last.ckpt
    make_job(sweep, 2, [
        started("10:03:00", 2), validation("10:03:10", 3, 29.00, 27.00),
        log_line("10:03:20", "stopped by SIGTERM: saved /x/2/checkpoints/last.ckpt", "dlsn.train", "WARNING"),
    ])
    # 3: killed (no end line), 4: running (holds the run lock in the tests that need it)
    make_job(sweep, 3, [started("10:04:00", 3), progress("10:04:30", 3), validation("10:04:31", 3, 30.50, 28.50)])
    make_job(sweep, 4, [started("10:05:00", 4), progress("10:05:10", 3)])
    # 5: created by Hydra, nothing logged yet
    make_job(sweep, 5, None)
    # 6: requeued: stopped by the pre-emption signal, restarted an hour later, finished
    make_job(sweep, 6, [
        started("11:00:00", 6), validation("11:00:30", 3, 29.00, 27.00),
        log_line("11:01:00", "stopped by SIGUSR2: saved /x/6/checkpoints/last.ckpt", "dlsn.train", "WARNING"),
        started("12:00:00", 6), validation("12:00:20", 6, 32.00, 29.00),
        log_line("12:00:40", "job finished", "dlsn.sweep_report"),
    ])
    # 7: finished, logged before SweepReportCallback existed (train.py's last line marks the end)
    make_job(sweep, 7, [validation("13:00:00", 3, 30.00, 28.00), progress("13:00:01", 6, 6),
                        log_line("13:00:02", "best checkpoint: /x/7/checkpoints/best.ckpt", "dlsn.train")])
    # 8: no log, only a checkpoint (the step count comes from it)
    job8 = make_job(sweep, 8, None)
    (job8 / "checkpoints").mkdir()
    torch.save({"global_step": 42, "state_dict": {}}, job8 / "checkpoints" / "last.ckpt")
    return sweep


def by_number(jobs) -> dict:
    return {job.number: job for job in jobs}


def test_each_job_gets_its_status_reason_steps_and_wall_time(partial_sweep):
    with RunDirectoryLock(partial_sweep / "4"):  # what train.py holds while job 4 runs
        jobs = by_number(summarize_sweep(partial_sweep))
    assert sorted(jobs) == list(range(9))
    assert {n: job.status for n, job in jobs.items()} == {
        0: FINISHED, 1: FAILED, 2: INTERRUPTED, 3: INTERRUPTED, 4: RUNNING, 5: INTERRUPTED, 6: FINISHED,
        7: FINISHED, 8: INTERRUPTED}
    assert jobs[1].reason == "RuntimeError: CUDA out of memory | tried 2 GiB"
    assert jobs[2].reason == "stopped by SIGTERM: saved /x/2/checkpoints/last.ckpt"
    assert "without a finish, failure or stop line" in jobs[3].reason
    assert jobs[5].reason == "no log yet" and jobs[4].reason == jobs[6].reason == ""
    assert {n: job.steps for n, job in jobs.items()} == {0: 6, 1: 3, 2: 3, 3: 3, 4: 3, 5: None, 6: 6, 7: 6, 8: 42}
    assert jobs[1].total_steps == 6 and jobs[5].total_steps is None
    assert jobs[0].wall_time_s == pytest.approx(100.0)
    assert jobs[1].wall_time_s == pytest.approx(10.0)
    assert jobs[6].wall_time_s == pytest.approx(60.0 + 40.0)  # two segments; the hour between them is not counted
    assert jobs[5].wall_time_s is None


def test_a_released_lock_means_the_job_is_no_longer_running(partial_sweep):
    with RunDirectoryLock(partial_sweep / "4"):
        assert read_job(partial_sweep / "4").status == RUNNING
    assert read_job(partial_sweep / "4").status == INTERRUPTED


def test_best_validation_per_set_from_csv_when_present_else_from_the_log(partial_sweep):
    jobs = by_number(summarize_sweep(partial_sweep))
    # metrics.csv: full precision, Lightning's step + 1 = optimizer steps (as in the log)
    best = jobs[0].best
    assert (best.step, best.psnr) == (6, pytest.approx(29.5034))
    assert best.sets == {"Set5": (pytest.approx(31.0034), pytest.approx(0.91034)),
                         "Set14": (pytest.approx(28.0034), pytest.approx(0.80034))}
    assert [v.step for v in jobs[0].validations] == [3, 6]
    # log only: the best of the two validations of the requeued job, across its two segments
    assert [v.step for v in jobs[6].validations] == [3, 6]
    assert (jobs[6].best.step, jobs[6].best.psnr) == (6, pytest.approx(30.5))
    assert jobs[6].best.sets["Set14"] == (pytest.approx(29.0), pytest.approx(0.8))
    assert jobs[1].best is None and jobs[5].best is None


def test_summary_files_list_every_job(partial_sweep):
    written = write_summary(partial_sweep)
    assert set(written) == {"csv", "markdown", "plot"}
    with open(partial_sweep / SUMMARY_CSV, newline="") as handle:
        rows = {row["job"]: row for row in csv.DictReader(handle)}
    assert list(rows) == [str(n) for n in range(9)]
    assert rows["0"]["status"] == "finished" and rows["0"]["best_step"] == "6"
    assert float(rows["0"]["val_psnr"]) == pytest.approx(29.5034)
    assert float(rows["0"]["Set5_psnr"]) == pytest.approx(31.0034) and float(rows["0"]["Set14_ssim"]) == pytest.approx(0.8003)
    assert rows["0"]["overrides"] == "model.n_hashes=0"  # the override shared by all jobs is left out
    assert rows["1"]["reason"] == "RuntimeError: CUDA out of memory | tried 2 GiB" and rows["1"]["val_psnr"] == ""
    assert rows["5"]["steps"] == "" and rows["8"]["steps"] == "42"
    assert float(rows["6"]["wall_time_s"]) == pytest.approx(100.0)

    markdown = (partial_sweep / SUMMARY_MARKDOWN).read_text()
    assert "9 jobs: 3 finished, 1 failed, 5 interrupted." in markdown
    assert "Best: job 6, 30.50 dB mean validation PSNR at step 6 (model.n_hashes=6)." in markdown
    assert f"Overrides of every job: `{SHARED}`" in markdown
    assert "| job | status | steps | wall time | best step | PSNR (mean) | Set5 PSNR / SSIM | Set14 PSNR / SSIM | overrides |" in markdown
    assert "| 0 | finished | 6/6 | 0:01:40 | 6 | 29.50 | 31.00 / 0.9103 | 28.00 / 0.8003 | `model.n_hashes=0` |" in markdown
    assert "| 5 | interrupted |  |  | no validation yet |  |  |  | `model.n_hashes=5` |" in markdown
    assert "- job 1 (failed): RuntimeError: CUDA out of memory \\| tried 2 GiB" in markdown  # | escaped
    assert f"![validation PSNR against steps]({SUMMARY_PLOT})" in markdown

    with Image.open(partial_sweep / SUMMARY_PLOT) as image:
        assert image.format == "PNG" and image.width > 400 and image.height > 300


def test_plot_is_written_when_no_job_has_validated_yet(tmp_path):
    sweep = tmp_path / "sweep"
    make_job(sweep, 0, [started("10:00:00", 0), progress("10:00:01", 1)])
    written = write_summary(sweep)
    with Image.open(written["plot"]) as image:
        assert image.format == "PNG"
    assert "1 jobs: 1 interrupted." in written["markdown"].read_text()


def test_submitit_folders_are_not_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    make_job(sweep, 0, [started("10:00:00", 0)])
    make_job(sweep / ".submitit" / "123", 0, [started("10:00:00", 0)])  # e.g. a pickled job's own .hydra
    assert [job.directory for job in summarize_sweep(sweep)] == [sweep / "0"]


def test_cli_summarises_an_existing_directory_and_refuses_a_non_sweep(partial_sweep, tmp_path, capsys):
    assert main([str(partial_sweep), "--no-plot"]) == 0
    printed = capsys.readouterr().out
    assert "| 1 | failed |" in printed and f"wrote {partial_sweep / SUMMARY_CSV}" in printed
    assert (partial_sweep / SUMMARY_MARKDOWN).is_file() and not (partial_sweep / SUMMARY_PLOT).exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert "no job directories" in capsys.readouterr().err


def test_sweep_report_script_runs_as_a_command(tmp_path):
    sweep = tmp_path / "sweep"
    make_job(sweep, 0, [started("10:00:00", 0), validation("10:00:05", 3, 30.00, 28.00),
                        log_line("10:00:06", "job finished", "dlsn.sweep_report")])
    make_job(sweep, 1, [started("10:00:07", 1), progress("10:00:09", 3)])
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    script = str(REPO_ROOT / "scripts" / "sweep_report.py")
    result = subprocess.run([sys.executable, script, str(sweep), "--no-plot"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| 0 | finished | 3 | 0:00:06 | 3 | 29.00 | 30.00 / 0.9000 | 28.00 / 0.8000 | `model.n_hashes=0` |" in result.stdout
    assert "| 1 | interrupted | 3/6 |" in result.stdout and (sweep / SUMMARY_CSV).is_file()
    missing = subprocess.run([sys.executable, script, str(sweep / "nope")],
                             env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "is not a directory" in missing.stderr


def test_callback_writes_start_and_failure_lines_from_rank_zero_and_refreshes_the_summary(tmp_path, monkeypatch):
    import logging

    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from dlsn.sweep_report import SweepReportCallback

    sweep = tmp_path / "sweep"
    job_dir = make_job(sweep, 0, [])
    config = OmegaConf.create({"hydra": {"mode": "MULTIRUN", "sweep": {"dir": str(sweep)},
                                         "overrides": {"task": ["model.n_hashes=0", SHARED]},
                                         "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"}}})
    try:
        raise RuntimeError("boom")
    except RuntimeError as err:
        error = err
    failed = JobReturn(status=JobStatus.FAILED, _return_value=error)
    callback = SweepReportCallback(plot=False)
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)

    # What Hydra's job logging does: the root logger writes the job's <task>.log
    handler = logging.FileHandler(job_dir / "train.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    previous_level = root.level
    root.setLevel(logging.INFO)
    try:
        monkeypatch.setenv("LOCAL_RANK", "1")  # another DDP process of the same job: writes nothing
        callback.on_job_start(config, task_function=None)
        callback.on_job_end(config, failed)
        assert (job_dir / "train.log").read_text().strip() == "" and not (sweep / SUMMARY_CSV).exists()
        monkeypatch.delenv("LOCAL_RANK")
        callback.on_job_start(config, task_function=None)
        callback.on_job_end(config, failed)
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
        handler.close()
    text = (job_dir / "train.log").read_text()
    assert f"job started: model.n_hashes=0 {SHARED}" in text
    assert "job failed: RuntimeError: boom" in text and 'raise RuntimeError("boom")' in text  # with the traceback
    job = read_job(job_dir)
    assert (job.status, job.reason) == (FAILED, "RuntimeError: boom")
    with open(sweep / SUMMARY_CSV, newline="") as handle:  # refreshed after the job
        assert [(row["job"], row["status"]) for row in csv.DictReader(handle)] == [("0", "failed")]
