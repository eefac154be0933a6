"""Sweeps and loggers with the real train.py on the CPU: the sweep summary of a grid run through
hydra/launcher=submitit_local, TensorBoard's HParams tab, and the W&B config of an offline run.

dlsn.loggers.TensorBoardLogger is also checked directly (fast); the rest trains tiny models in
subprocesses with a timeout (slow).
"""

from __future__ import annotations

import csv
import glob
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers.runs import PROJECT_ROOT, TINY_TRAIN

TIMEOUT_S = 600
TINY_NO_LOGGER = [arg for arg in TINY_TRAIN if not arg.startswith("logger=")]


def run_train(*args: str, wandb_mode: str = "disabled") -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": wandb_mode, "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "train.py"), *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"train.py {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def hparams_records(event_dir: Path) -> dict:
    """The HParams plugin's records (experiment, session start/end) and the scalars of one TensorBoard run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    accumulator = EventAccumulator(str(event_dir))
    accumulator.Reload()
    content = accumulator.PluginTagToContent("hparams")
    records = {tag.split("/")[-1]: plugin_data_pb2.HParamsPluginData.FromString(data) for tag, data in content.items()}
    scalars = {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
               for tag in accumulator.Tags()["scalars"]}
    return {"records": records, "scalars": scalars}


# --------------------------------------------------------------------------------------- TensorBoard


def test_tensorboard_hparams_link_the_config_to_the_validation_metrics(tmp_path):
    from tensorboard.plugins.hparams import api_pb2

    from dlsn.loggers import TensorBoardLogger

    logger = TensorBoardLogger(save_dir=str(tmp_path), name=None)
    logger.log_hyperparams({"model": {"n_feats": 8, "name": "dlsn"}, "module": {"optimizer": {"lr": 2e-4}},
                            "tags": ["dlsn", "x2"], "init_from": None})
    logger.log_metrics({"train/loss_step": 0.3}, step=0)
    logger.log_metrics({"val/psnr": 30.0, "val/psnr_best": 30.0, "val/Set5/psnr": 31.0, "val/Set5/ssim": 0.9}, step=2)
    logger.log_metrics({"val/psnr": 29.0, "val/psnr_best": 30.0, "val/Set5/psnr": 30.0, "val/Set5/ssim": 0.8}, step=5)
    logger.finalize("success")

    logged = hparams_records(Path(logger.log_dir))
    records = logged["records"]
    assert set(records) == {"experiment", "session_start_info", "session_end_info"}
    experiment = records["experiment"].experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["val/Set5/psnr", "val/Set5/ssim", "val/psnr", "val/psnr_best"]
    hparams = records["session_start_info"].session_start_info.hparams
    assert hparams["model/n_feats"].number_value == 8 and hparams["model/name"].string_value == "dlsn"
    assert hparams["module/optimizer/lr"].number_value == pytest.approx(2e-4)
    assert {info.name for info in experiment.hparam_infos} == set(hparams)
    assert records["session_end_info"].session_end_info.status == api_pb2.Status.Value("STATUS_SUCCESS")
    # the table's values are the scalars' latest values: logged once, no placeholder hp_metric
    assert logged["scalars"]["val/psnr_best"] == [(2, 30.0), (5, 30.0)]
    assert "hp_metric" not in logged["scalars"]


def test_tensorboard_session_of_a_failed_run_is_marked_failed(tmp_path):
    from tensorboard.plugins.hparams import api_pb2

    from dlsn.loggers import TensorBoardLogger

    logger = TensorBoardLogger(save_dir=str(tmp_path), name=None)
    logger.log_hyperparams({"seed": 1})
    logger.finalize("failed")  # no validation yet: the session is still recorded, with its status
    records = hparams_records(Path(logger.log_dir))["records"]
    assert records["session_start_info"].session_start_info.hparams["seed"].number_value == 1
    assert records["session_end_info"].session_end_info.status == api_pb2.Status.Value("STATUS_FAILURE")


# --------------------------------------------------------------------- grid through submitit_local


@pytest.mark.slow
def test_submitit_local_grid_writes_summary_and_tensorboard_hparams(tmp_path):
    """`hydra/launcher=submitit_local` (SLURM's launcher on one machine), jobs logged to TensorBoard only."""
    from tensorboard.plugins.hparams import api_pb2

    run_train("-m", "hydra/launcher=submitit_local", f"paths.log_dir={tmp_path}", *TINY_NO_LOGGER,
              "logger=tensorboard", "trainer.max_epochs=2", "model.n_hashes=1,2")
    [sweep_dir] = (tmp_path / "train" / "multiruns").iterdir()
    assert (sweep_dir / ".submitit").is_dir()  # the jobs went through submitit
    with open(sweep_dir / "sweep_summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["job"], row["status"], row["overrides"]) for row in rows] == [
        ("0", "finished", "model.n_hashes=1"), ("1", "finished", "model.n_hashes=2")]
    for row in rows:
        job_dir = sweep_dir / row["job"]
        assert row["steps"] == row["total_steps"] == "6" and row["validations"] == "2"
        assert float(row["wall_time_s"]) > 0
        [event_dir] = (job_dir / "tensorboard").iterdir()
        logged = hparams_records(event_dir)
        # the summary (read from the text log) agrees with what TensorBoard recorded
        best_step, best_psnr = max(logged["scalars"]["val/psnr"], key=lambda point: point[1])
        assert float(row["val_psnr"]) == pytest.approx(best_psnr, abs=0.005)
        assert int(row["best_step"]) == best_step + 1  # Lightning logs at (steps done) - 1
        set_psnr = dict(logged["scalars"]["val/sample/psnr"])[best_step]
        assert float(row["sample_psnr"]) == pytest.approx(set_psnr, abs=0.005)
        # HParams: this job's config next to its validation metrics
        records = logged["records"]
        hparams = records["session_start_info"].session_start_info.hparams
        assert hparams["model/n_hashes"].number_value == int(row["overrides"][-1])
        assert hparams["model/n_feats"].number_value == 8
        assert {"val/psnr_best", "val/sample/psnr", "val/sample/ssim"} <= {
            m.name.tag for m in records["experiment"].experiment.metric_infos}
        assert records["session_end_info"].session_end_info.status == api_pb2.Status.Value("STATUS_SUCCESS")
    markdown = (sweep_dir / "sweep_summary.md").read_text()
    assert "2 jobs: 2 finished." in markdown and (sweep_dir / "sweep_psnr.png").is_file()


# --------------------------------------------------------------------------------------------- W&B


def wandb_records(run_file: Path):
    """The protobuf records of a W&B ``.wandb`` transaction log (LevelDB-style log blocks)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B transaction log"
    block, header = 32768, 7
    position, pending = 7, b""  # file header: ":W&B", magic (2 bytes), version (1 byte)
    while position + header <= len(data):
        if block - position % block < header:  # a block's tail too short for a record header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + header])
        chunk = data[position + header:position + header + length]
        position += header + length
        pending = chunk if kind in (1, 2) else pending + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


@pytest.mark.slow
def test_wandb_config_is_logged_once_without_duplicated_keys(tmp_path):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    run_train(f"hydra.run.dir={run_dir}", *TINY_NO_LOGGER, "logger=wandb", wandb_mode="offline")
    [run_file] = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "*.wandb"))
    updates = []  # one list of keys per config record (W&B's own "_wandb" entries left out)
    for record in wandb_records(Path(run_file)):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            config = record.run.config if kind == "run" else record.config
            keys = [item.key or "/".join(item.nested_key) for item in config.update]
            keys = [key for key in keys if not key.startswith("_")]
            if keys:
                updates.append(keys)
    assert len(updates) == 1, f"the config was logged {len(updates)} times: {updates}"
    [keys] = updates
    assert len(keys) == len(set(keys))
    run_config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert set(keys) == set(run_config.keys()) | {"model/params"}  # the resolved run config + parameter count


# ------------------------------------------------------------------ a real run stopped and resumed


@pytest.mark.slow
def test_report_reads_a_real_run_stopped_by_sigterm_then_finished_after_a_restart(tmp_path):
    from tests.helpers.runs import run_script
    from dlsn.sweep_report import FAILED, FINISHED, INTERRUPTED, read_job

    settings = [*TINY_TRAIN, "trainer.max_epochs=2", "data.iters_per_epoch=4", "checkpoint.every_n_steps=1000"]
    run_dir = tmp_path / "run"
    stop = ["+callbacks.signal._target_=tests.helpers.callbacks.SignalAtStep", "+callbacks.signal.step=2"]
    assert run_script("train.py", run_dir, *settings, *stop, expect_success=False).returncode == 143
    stopped = read_job(run_dir)
    assert stopped.status == INTERRUPTED and stopped.reason.startswith("stopped by SIGTERM")
    assert stopped.steps == 2 and stopped.validations == []

    run_script("train.py", run_dir, *settings)  # the same command again: resumes and finishes
    finished = read_job(run_dir)
    assert finished.status == FINISHED and finished.reason == ""
    assert finished.steps == finished.total_steps == 8
    assert [v.step for v in finished.validations] == [4, 8]  # from metrics.csv (logger=csv)
    assert finished.wall_time_s > stopped.wall_time_s > 0  # both segments

    # A run that fails (bad value at start-up) is marked failed with the reason from the log
    failed_dir = tmp_path / "failed"
    run_script("train.py", failed_dir, *settings, "data.patch_size=-1", expect_success=False)
    failed = read_job(failed_dir)
    assert failed.status == FAILED and failed.reason, (failed_dir / "train.log").read_text()
