"""DDP evaluation is exact, the launcher guard refuses broken setups, SLURM jobs find their checkpoint.

Multi-process parts run as subprocesses with a timeout (two gloo processes on the CPU): starting
DDP inside pytest would re-execute pytest itself.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from dlsn.checkpoint import find_resume_checkpoint, resolve_ckpt_path
from dlsn.data.samplers import UnpaddedEvalSampler, eval_sampler
from dlsn.utils.launcher import LauncherConfigError, check_launcher_compatibility, trainer_process_count
from dlsn.metrics import PSNR_Y, SSIM_Y

SCRIPTS = Path(__file__).parent / "distributed_scripts"
REPO_ROOT = Path(__file__).parents[1]
from tests.distributed_scripts.eval_worker import SyntheticPairs

SUBPROCESS_TIMEOUT_S = 180
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
LOCAL_SUBMITIT_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(REPO_ROOT), **extra)
    env.pop("LOCAL_RANK", None)  # never inherit a rank from an outer launcher
    return env


def run_checked(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def single_process_metrics(image_count: int, crop_border: int = 2) -> dict[str, float]:
    """Reference: every image once, one process, same metric classes."""
    psnr, ssim = PSNR_Y(crop_border=crop_border), SSIM_Y(crop_border=crop_border)
    for sr, hr, _ in DataLoader(SyntheticPairs(image_count), batch_size=1):
        psnr.update(sr, hr)
        ssim.update(sr, hr)
    return {"psnr": psnr.compute().item(), "ssim": ssim.compute().item()}


# ------------------------------------------------------------------------------------ the sampler


@pytest.mark.parametrize("dataset_size,world_size", [(5, 2), (10, 4), (7, 3), (3, 3), (8, 2)])
def test_unpadded_sampler_covers_every_index_exactly_once(dataset_size, world_size):
    dataset = list(range(dataset_size))
    per_rank = [list(UnpaddedEvalSampler(dataset, num_replicas=world_size, rank=r)) for r in range(world_size)]
    flat = sorted(i for indices in per_rank for i in indices)
    assert flat == list(range(dataset_size))
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1
    assert per_rank[0][:2] == [0, world_size][: len(per_rank[0][:2])]  # round robin: r, r+R, ...
    assert [len(UnpaddedEvalSampler(dataset, world_size, r)) for r in range(world_size)] == list(map(len, per_rank))


def test_torch_distributed_sampler_pads_which_is_what_we_avoid():
    # The reason for the custom sampler: torch repeats index 0 so both ranks get 3 of 5 images.
    padded = [list(torch.utils.data.DistributedSampler(range(5), 2, r, shuffle=False)) for r in range(2)]
    assert padded == [[0, 2, 4], [1, 3, 0]]


def test_sampler_is_a_distributed_sampler_so_lightning_keeps_it():
    # Lightning replaces a loader's sampler only when it is not a DistributedSampler already.
    sampler = UnpaddedEvalSampler(range(5), num_replicas=2, rank=1)
    assert isinstance(sampler, torch.utils.data.DistributedSampler)
    sampler.set_epoch(3)  # Lightning calls this; the split must not change with the epoch
    assert list(sampler) == [1, 3]


def test_sampler_refuses_fewer_images_than_processes():
    with pytest.raises(ValueError, match="3 images but there are 4 DDP processes"):
        UnpaddedEvalSampler(range(3), num_replicas=4, rank=0)


def test_sampler_needs_rank_or_process_group():
    with pytest.raises(RuntimeError, match="num_replicas and rank"):
        UnpaddedEvalSampler(range(3))


def test_without_process_group_eval_sampler_is_none():
    assert eval_sampler(range(5)) is None


# ------------------------------------------------------------------ DDP evaluation, two processes


@pytest.fixture(scope="module")
def two_process_eval(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_eval") / "result.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), str(SCRIPTS / "eval_worker.py"), str(out), "5"]
    run_checked(command, subprocess_env())
    return json.loads(out.read_text())


def test_ddp_eval_equals_single_process_with_odd_image_count(two_process_eval):
    reference = single_process_metrics(5)
    unpadded = two_process_eval["unpadded"]
    assert two_process_eval["world_size"] == 2
    assert unpadded["indices_per_rank"] == [[0, 2, 4], [1, 3]]  # none twice, none dropped
    assert unpadded["psnr"] == pytest.approx(reference["psnr"], abs=1e-6)
    assert unpadded["ssim"] == pytest.approx(reference["ssim"], abs=1e-6)


def test_padded_sampler_would_change_the_numbers(two_process_eval):
    # Control: the same workers with torch's padded sampler count image 0 twice and get another mean.
    reference = single_process_metrics(5)
    padded = two_process_eval["padded"]
    assert padded["indices_per_rank"] == [[0, 2, 4], [1, 3, 0]]
    assert abs(padded["psnr"] - reference["psnr"]) > 1e-3


def test_metric_states_are_local_again_after_compute(two_process_eval):
    # Why image counts are metrics of their own: after compute() a rank's count is its own (3 of 5).
    assert two_process_eval["unpadded"]["count_after_compute"] == 3


@pytest.mark.slow
def test_lightning_ddp_validation_keeps_sampler_and_matches_one_process(tmp_path):
    """A real Lightning Trainer(strategy="ddp", devices=2) on CPU: sampler kept, metrics exact."""
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"devices{devices}.json"
        command = [sys.executable, str(SCRIPTS / "lightning_eval_worker.py"), str(out), "5", str(devices)]
        run_checked(command, subprocess_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())))
        results[devices] = json.loads(out.read_text())

    ddp, single = results[2], results[1]
    assert ddp["sampler"] == "UnpaddedEvalSampler"
    assert ddp["images_per_rank"] == [3, 2]
    assert ddp["indices_per_rank"] == [[0, 2, 4], [1, 3]]
    reference = single_process_metrics(5)
    for key in ("val/psnr", "val/psnr_epoch_end"):
        assert ddp["metrics"][key] == pytest.approx(single["metrics"][key], abs=1e-6)
        assert ddp["metrics"][key] == pytest.approx(reference["psnr"], abs=1e-6)
    assert ddp["metrics"]["val/ssim"] == pytest.approx(reference["ssim"], abs=1e-6)


# -------------------------------------------------------------------------- the launcher guard


def hydra_cfg(mode: str = "MULTIRUN", launcher: str = BASIC_LAUNCHER, **launcher_fields):
    from hydra.types import RunMode

    return OmegaConf.create({"mode": RunMode[mode], "launcher": {"_target_": launcher, **launcher_fields}})


def job_cfg(**trainer):
    return OmegaConf.create({"trainer": {"accelerator": "cpu", "devices": 1, **trainer}})


@pytest.mark.parametrize(
    "trainer",
    [{"devices": 2}, {"devices": "2"}, {"devices": [0, 1]}, {"devices": 1, "num_nodes": 2},
     {"devices": 4, "strategy": "ddp"}],
)
def test_local_multirun_with_several_processes_is_refused(trainer):
    with pytest.raises(LauncherConfigError, match="Refusing to run a Hydra multirun") as error:
        check_launcher_compatibility(job_cfg(**trainer), hydra_cfg())
    message = str(error.value)
    assert "BasicLauncher" in message and "hydra/launcher=slurm" in message
    assert f"trainer.devices={trainer['devices']}" in message


def test_local_submitit_multirun_with_ddp_is_refused_too():
    with pytest.raises(LauncherConfigError, match="LocalLauncher"):
        check_launcher_compatibility(job_cfg(devices=2), hydra_cfg(launcher=LOCAL_SUBMITIT_LAUNCHER))


@pytest.mark.parametrize(
    "mode,launcher,trainer",
    [
        ("MULTIRUN", BASIC_LAUNCHER, {"devices": 1}),  # a sweep of single-device jobs
        ("MULTIRUN", BASIC_LAUNCHER, {"devices": 1, "strategy": "ddp"}),  # ddp with one process
        ("RUN", BASIC_LAUNCHER, {"devices": 2, "strategy": "ddp"}),  # a single DDP run
    ],
)
def test_working_combinations_pass(mode, launcher, trainer):
    check_launcher_compatibility(job_cfg(**trainer), hydra_cfg(mode=mode, launcher=launcher))


def test_slurm_launcher_must_match_the_trainer_layout():
    matching = hydra_cfg(launcher=SLURM_LAUNCHER, tasks_per_node=4, nodes=2)
    check_launcher_compatibility(job_cfg(devices=4, num_nodes=2), matching)
    wrong_tasks = hydra_cfg(launcher=SLURM_LAUNCHER, tasks_per_node=1, nodes=2)
    with pytest.raises(LauncherConfigError, match="tasks_per_node=1"):
        check_launcher_compatibility(job_cfg(devices=4, num_nodes=2), wrong_tasks)


def test_guard_reads_hydra_config_when_not_given(monkeypatch):
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: hydra_cfg()))
    with pytest.raises(LauncherConfigError):
        check_launcher_compatibility(job_cfg(devices=2))
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: False))
    check_launcher_compatibility(job_cfg(devices=2))  # outside Hydra: nothing to check


def test_torchrun_needs_one_explicit_run_dir_for_all_processes(monkeypatch):
    from hydra.types import RunMode

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("WORLD_SIZE", "2")
    single_run = {"mode": RunMode.RUN, "launcher": {"_target_": BASIC_LAUNCHER}}
    timestamped = OmegaConf.create({**single_run, "overrides": {"hydra": []}})
    with pytest.raises(LauncherConfigError, match="hydra.run.dir="):
        check_launcher_compatibility(job_cfg(devices=2, strategy="ddp"), timestamped)
    fixed = OmegaConf.create({**single_run, "overrides": {"hydra": ["hydra.run.dir=logs/train/runs/a"]}})
    check_launcher_compatibility(job_cfg(devices=2, strategy="ddp"), fixed)
    monkeypatch.setenv("WORLD_SIZE", "1")  # a one-process torchrun has nothing to disagree about
    check_launcher_compatibility(job_cfg(), timestamped)


def test_auto_devices_count_visible_gpus_only_on_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert trainer_process_count({"accelerator": "gpu", "devices": -1}) == 8
    assert trainer_process_count({"accelerator": "auto", "devices": "auto", "num_nodes": 2}) == 16
    assert trainer_process_count({"accelerator": "cpu", "devices": "auto"}) == 1


# ---------------------------------------------------------------------------- SLURM auto-resume


def touch(path: Path, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": 1, "state_dict": {}}, path)
    os.utime(path, (mtime, mtime))
    return path


def test_fresh_run_has_nothing_to_resume(tmp_path):
    assert find_resume_checkpoint(tmp_path) is None
    assert resolve_ckpt_path(None, tmp_path) is None


def test_requeued_run_resumes_from_newest_checkpoint(tmp_path):
    now = time.time()
    last = touch(tmp_path / "checkpoints" / "last.ckpt", now - 100)
    assert find_resume_checkpoint(tmp_path) == str(last)
    hpc = touch(tmp_path / "hpc_ckpt_1.ckpt", now - 10)  # Lightning's requeue-signal checkpoint
    assert find_resume_checkpoint(tmp_path) == str(hpc)
    newer_last = touch(tmp_path / "checkpoints" / "last.ckpt", now)
    assert find_resume_checkpoint(tmp_path) == str(newer_last)
    touch(tmp_path / "checkpoints" / "best.ckpt", now + 50)  # best.ckpt is only the last resort
    assert find_resume_checkpoint(tmp_path) == str(newer_last)


def test_empty_checkpoint_files_are_ignored(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")  # killed while writing
    assert find_resume_checkpoint(tmp_path) is None


def test_explicit_ckpt_path_wins(tmp_path):
    touch(tmp_path / "checkpoints" / "last.ckpt", time.time())
    explicit = touch(tmp_path / "elsewhere" / "some.ckpt", time.time() - 1000)
    assert resolve_ckpt_path(str(explicit), tmp_path) == str(explicit)
    assert resolve_ckpt_path(None, tmp_path).endswith("last.ckpt")
