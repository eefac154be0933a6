"""End-to-end scaling checks with the real train.py / eval.py on the CPU (all `slow`).

* two-process DDP training: checkpoints, step count, validation logged; its validation PSNR/SSIM equal
  one process's on the same weights (1e-6); both processes skip a batch that is bad on one of them;
* DDP evaluation of an odd number of images equals one process (PSNR/SSIM to 1e-6, image count);
* a requeued run resumes from its own last checkpoint and continues its W&B run;
* a 2-job grid multirun (each job its own W&B run, with its own swept value, in the sweep's group) and a
  2-trial Optuna search (SQLite) with train.py.

DDP runs are subprocesses with a timeout (Lightning re-executes the script for the other rank).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers.runs import PROJECT_ROOT, TINY_TRAIN, last_value, read_csv_metrics, subprocess_env
from tests.helpers.joins import the_wandb_run, wandb_run_id_for_directory, wandb_runs
from tests.helpers.probes import load_records, probe_overrides

pytestmark = pytest.mark.slow

TIMEOUT_S = 420
ITERS_PER_EPOCH = 3  # from TINY_TRAIN
DDP_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
TINY_WITH_WANDB = [o for o in TINY_TRAIN if not o.startswith("logger=")] + ["logger=wandb"]


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def run(script: str, *args: str, expect_success: bool = True, wandb_mode: str = "disabled",
        timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    env = subprocess_env(wandb_mode, MASTER_PORT=free_port())
    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / script), *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if expect_success:
        assert proc.returncode == 0, f"{script} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ddp_train") / "run"
    run("train.py", f"hydra.run.dir={run_dir}", *TINY_TRAIN, *DDP_CPU, "trainer.max_epochs=2")
    return run_dir


def test_two_process_training_writes_checkpoints_and_validates(ddp_run):
    last = ddp_run / "checkpoints" / "last.ckpt"
    assert last.is_file() and (ddp_run / "checkpoints" / "best.ckpt").is_file()
    # An epoch is data.iters_per_epoch optimizer steps on any number of processes.
    assert checkpoint_step(last) == 2 * ITERS_PER_EPOCH
    rows = read_csv_metrics(ddp_run)
    assert np.isfinite(last_value(rows, "val/psnr"))
    assert np.isfinite(last_value(rows, "train/loss_epoch"))
    assert len({r["epoch"] for r in rows if r.get("val/psnr")}) == 2  # validated after each epoch


def test_two_process_validation_equals_one_process(ddp_run, tmp_path):
    """The validation PSNR/SSIM that DDP training logged (rank 0, each process validating one of the two
    sample images) equal one process's scores of the same weights (eval.py on the saved last.ckpt, which
    reproduces one-process validation: test_train_eval.py::test_eval_reproduces_the_metric_logged_in_training)."""
    out_dir = tmp_path / "single"
    run("eval.py", f"hydra.run.dir={out_dir}", f"ckpt_path={ddp_run / 'checkpoints' / 'last.ckpt'}", "data=sample",
        "data.num_workers=0", "logger=none", "extras.print_config=false", "trainer.accelerator=cpu", "trainer.devices=1")
    single = json.loads((out_dir / "results.json").read_text())["sample"]
    assert single["n"] == 2
    rows = read_csv_metrics(ddp_run)
    assert last_value(rows, "val/sample/psnr") == pytest.approx(single["psnr"], abs=1e-6)
    assert last_value(rows, "val/sample/ssim") == pytest.approx(single["ssim"], abs=1e-6)
    assert last_value(rows, "val/psnr") == pytest.approx(single["psnr"], abs=1e-5)  # logged as float32


def test_all_processes_skip_a_batch_that_is_bad_on_one_of_them(tmp_path):
    run_dir, probe_dir = tmp_path / "run", tmp_path / "probe"
    bad_batch = 1
    # A NaN input batch on rank 1 only: rank 0's loss is fine, but both must skip it, or one replica would
    # update and the other not (and Lightning stops a DDP run whose training_step returns None).
    run("train.py", f"hydra.run.dir={run_dir}", *TINY_TRAIN, *DDP_CPU, "trainer.max_epochs=1",
        *probe_overrides(probe_dir, bad_batch=bad_batch, bad_rank=1), timeout=240)
    records = load_records(probe_dir)
    assert [r["world_size"] for r in records] == [2, 2]
    for rank, record in enumerate(records):
        weights = [record["initial"], *record["after_batch"]]
        assert len(weights) == 1 + ITERS_PER_EPOCH
        changed = [not torch.equal(before["net.head.weight"], after["net.head.weight"])
                   for before, after in zip(weights, weights[1:])]
        assert changed == [index != bad_batch for index in range(ITERS_PER_EPOCH)], f"rank {rank}: {changed}"
    for key, value in records[0]["after_batch"][-1].items():
        assert torch.equal(records[1]["after_batch"][-1][key], value), key  # replicas still identical
    assert last_value(read_csv_metrics(run_dir), "train/skipped_batches") == 1  # counted on rank 0 too


@pytest.fixture(scope="module")
def odd_image_folder(tmp_path_factory) -> Path:
    """Five smooth RGB images: an odd count, so two processes get 3 and 2."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("odd5")
    rng = np.random.default_rng(0)
    for index in range(5):
        coarse = rng.random((6, 6, 3)) * 255
        image = Image.fromarray(coarse.astype(np.uint8)).resize((48 + 4 * index, 40), Image.BICUBIC)
        image.save(folder / f"img{index}.png")
    return folder


def test_ddp_evaluation_equals_one_process_on_odd_image_count(ddp_run, odd_image_folder, tmp_path):
    results = {}
    for name, extra in (("single", ["trainer.accelerator=cpu", "trainer.devices=1"]), ("ddp", DDP_CPU)):
        out_dir = tmp_path / name
        run("eval.py", f"hydra.run.dir={out_dir}", f"ckpt_path={ddp_run / 'checkpoints' / 'last.ckpt'}",
            "data=sample", f"data.test_sets=[{odd_image_folder}]", "data.num_workers=0", "logger=none",
            "extras.print_config=false", *extra)
        results[name] = json.loads((out_dir / "results.json").read_text())
    [single] = results["single"].values()
    [ddp] = results["ddp"].values()
    assert single["n"] == ddp["n"] == 5  # every image once: none padded in, none dropped
    assert ddp["psnr"] == pytest.approx(single["psnr"], abs=1e-6)
    assert ddp["ssim"] == pytest.approx(single["ssim"], abs=1e-6)


def test_rerun_in_same_directory_resumes_from_last_checkpoint_and_its_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    run("train.py", f"hydra.run.dir={run_dir}", *TINY_WITH_WANDB, "trainer.max_epochs=1", wandb_mode="offline")
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == ITERS_PER_EPOCH
    # What a requeued SLURM job does: the same command, the same output directory, more epochs.
    proc = run("train.py", f"hydra.run.dir={run_dir}", *TINY_WITH_WANDB, "trainer.max_epochs=2", wandb_mode="offline")
    assert "Resuming from" in proc.stdout + proc.stderr
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 2 * ITERS_PER_EPOCH
    # Both attempts log into one W&B run, whose id the run directory fixes.
    first, second = wandb_runs(run_dir)
    assert first.run_id == second.run_id == wandb_run_id_for_directory(str(run_dir))
    assert second.values("trainer/global_step")[-1] >= 2 * ITERS_PER_EPOCH - 1


def test_grid_multirun_trains_every_combination(tmp_path):
    """`-m model.n_hashes=1,2` with the real configs: one job per value, each with that value in its saved
    config and checkpoint, each its own W&B run (id from its directory) in the sweep's W&B group."""
    run("train.py", "-m", f"paths.log_dir={tmp_path}", *TINY_WITH_WANDB, "model.n_hashes=1,2", wandb_mode="offline")
    [sweep_dir] = (tmp_path / "train" / "multiruns").iterdir()
    jobs = [sweep_dir / "0", sweep_dir / "1"]
    saved = [OmegaConf.load(job / ".hydra" / "config.yaml").model.n_hashes for job in jobs]
    in_checkpoints = [torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
                      ["dlsn_network"]["config"]["n_hashes"] for job in jobs]
    assert saved == in_checkpoints == [1, 2]
    runs = [the_wandb_run(job) for job in jobs]
    assert [r.run_id for r in runs] == [wandb_run_id_for_directory(str(job)) for job in jobs]
    assert len({r.run_id for r in runs}) == 2
    assert {r.group for r in runs} == {f"sweep-{sweep_dir.name}"}
    assert [r.config["model"]["n_hashes"] for r in runs] == [1, 2]
    for r in runs:  # each job's metrics in its own run
        assert len(r.values("val/psnr")) == 1 and np.isfinite(r.values("val/psnr")[0])


def test_optuna_search_with_train_py_stores_trials_in_sqlite(tmp_path):
    import optuna

    # A plain `key=value` on the command line fixes a searched parameter, so the tiny-model
    # overrides of the searched keys are left out; a sweep value replaces the config's dimension.
    searched = ("model.chunk_size=", "model.n_hashes=", "module.optimizer.lr=")
    tiny = [arg for arg in TINY_TRAIN if not arg.startswith(searched)]
    run("train.py", "-m", "hparams_search=dlsn_optuna", f"paths.log_dir={tmp_path}", *tiny,
        "hydra.sweeper.n_trials=2", "model.chunk_size=choice(16,32)")
    name = "quickstart-dlsn_optuna"  # <experiment>-<search>
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna' / f'{name}.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    [sweep_dir] = (tmp_path / "train" / "multiruns").iterdir()
    for trial in study.trials:
        rows = read_csv_metrics(sweep_dir / str(trial.number))
        assert trial.value == pytest.approx(last_value(rows, "val/psnr_best"))
        assert set(trial.params) == {"module.optimizer.lr", "model.n_hashes", "model.chunk_size"}
        assert trial.params["model.chunk_size"] in (16, 32)


def test_real_configs_compose_for_slurm_and_optuna():
    """configs/train.yaml with the launcher and search configs: the values submitit/Optuna get."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from dlsn.utils.config import register_resolvers

    register_resolvers()  # as importing train.py does

    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "configs"), version_base="1.3"):
        slurm = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                                            "trainer.num_nodes=2"], return_hydra_config=True)
        search = compose("train", overrides=["hparams_search=dlsn_optuna"], return_hydra_config=True)
    launcher = OmegaConf.to_container(slurm.hydra.launcher, resolve=True)
    assert (launcher["nodes"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == (2, 4, 4)
    assert launcher["additional_parameters"] == {"requeue": True}
    assert search.optimized_metric == "val/psnr_best"
    assert search.hydra.sweeper.direction == "maximize"
    assert search.hydra.sweeper.study_name == "quickstart-dlsn_optuna"
    # (storage is checked unresolved: resolving it creates the logs/optuna directory)
    storage = OmegaConf.to_container(search.hydra.sweeper, resolve=False)["storage"]
    assert storage.startswith("sqlite:///") and storage.endswith("/optuna}/${hydra.sweeper.study_name}.db")
    assert set(search.hydra.sweeper.params) == {"module.optimizer.lr", "model.n_hashes", "model.chunk_size"}
    # Every searched key exists in the composed training config.
    for key in search.hydra.sweeper.params:
        assert OmegaConf.select(search, key) is not None, key
