"""How the process was launched, and its life cycle: launcher checks, rank zero, the run lock, exit codes.

* :func:`check_launcher_compatibility` refuses configurations in which Lightning would re-launch the
  training script for DDP from inside a Hydra multirun (which silently restarts the sweep).
* :class:`RunDirectoryLock` keeps two runs from writing into one run directory at once.
* :func:`exit_code` maps how a run ended (a signal, a diverged run) to the process exit status.
"""

from __future__ import annotations

import datetime
import fcntl
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

SLURM_LAUNCHER_TARGET_SUFFIX = "SlurmLauncher"
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


class LauncherConfigError(ValueError):
    """The Hydra launcher and the trainer settings cannot work together."""


def is_rank_zero_process() -> bool:
    """Whether this process is (or will become) global rank 0, judged from the launcher's variables.

    Usable before Lightning sets up the process group: Lightning's DDP launcher, torchrun and SLURM
    set these variables for every other rank.
    """
    return all(os.environ.get(name, "0") in ("", "0") for name in RANK_VARIABLES)


def trainer_process_count(trainer_cfg: Any) -> int:
    """How many processes Lightning would run for this trainer config (devices x num_nodes).

    ``devices`` may be an int, a string int, a list of device ids, or ``"auto"``/``-1`` (which
    means every visible accelerator; on CPU Lightning takes one process for "auto").
    """
    trainer_cfg = trainer_cfg if OmegaConf.is_config(trainer_cfg) else OmegaConf.create(dict(trainer_cfg or {}))
    devices = OmegaConf.select(trainer_cfg, "devices", default="auto")
    accelerator = str(OmegaConf.select(trainer_cfg, "accelerator", default="auto")).lower()
    num_nodes = int(OmegaConf.select(trainer_cfg, "num_nodes", default=1) or 1)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, str) and "," in devices:  # "0,1" style device id lists
        devices = [d for d in devices.split(",") if d.strip()]
    if devices in ("auto", -1):
        import torch

        per_node = torch.cuda.device_count() if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else 1
    elif isinstance(devices, int):
        per_node = devices
    else:  # a sequence of device ids
        per_node = len(list(devices))
    return max(per_node, 1) * max(num_nodes, 1)


def check_launcher_compatibility(cfg: Any, hydra_cfg: Any | None = None) -> None:
    """Raise :class:`LauncherConfigError` for launcher/trainer combinations that cannot work.

    * A Hydra multirun (``-m``) with any launcher other than SLURM and a trainer that needs more
      than one process: Lightning starts DDP by re-executing ``sys.argv`` in child processes, and
      each child would start the whole sweep again.
    * torchrun with several processes and no explicit ``hydra.run.dir``: each process would pick
      its own timestamped output directory.
    * ``hydra/launcher=slurm`` whose tasks per node / nodes disagree with ``trainer.devices`` /
      ``trainer.num_nodes``: Lightning takes its ranks from SLURM, so both must describe one layout.

    ``hydra_cfg`` defaults to ``HydraConfig.get()``; outside a Hydra app nothing is checked.
    """
    if hydra_cfg is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return
        hydra_cfg = HydraConfig.get()
    from hydra.types import RunMode

    def select(node: Any, key: str, default: Any = None) -> Any:
        value = OmegaConf.select(node, key, default=default) if OmegaConf.is_config(node) else default
        return default if value is None else value

    mode = select(hydra_cfg, "mode")
    is_multirun = mode == RunMode.MULTIRUN or str(mode).upper().endswith("MULTIRUN")
    launcher_target = str(select(hydra_cfg, "launcher._target_", ""))
    on_slurm_launcher = launcher_target.endswith(SLURM_LAUNCHER_TARGET_SUFFIX)
    trainer_cfg = select(cfg, "trainer", OmegaConf.create({}))
    processes = trainer_process_count(trainer_cfg)
    devices, num_nodes = select(trainer_cfg, "devices"), int(select(trainer_cfg, "num_nodes", 1))

    if is_multirun and not on_slurm_launcher and processes > 1:
        launcher_name = launcher_target.rsplit(".", 1)[-1] or "unknown"
        raise LauncherConfigError(
            f"Refusing to run a Hydra multirun (-m) with launcher {launcher_name} and a trainer that needs "
            f"{processes} processes (trainer.devices={devices}, trainer.num_nodes={num_nodes}, "
            f"trainer.strategy={select(trainer_cfg, 'strategy')}). Lightning launches DDP by re-running the "
            "command line in new processes, which would restart the sweep in every one of them. Either submit "
            "the sweep with `hydra/launcher=slurm` (one SLURM task per GPU), run the jobs one by one without -m "
            "(e.g. `python train.py trainer=ddp ...`), or sweep with trainer.devices=1."
        )

    if "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        overrides = select(hydra_cfg, "overrides.hydra", []) or []
        if not any(str(override).startswith("hydra.run.dir=") for override in overrides):
            raise LauncherConfigError(
                "Under torchrun every process composes its own config, so a timestamped hydra.run.dir can "
                "differ between processes (and a restart would not find the previous checkpoints). Pass one "
                "directory to all of them, e.g. `torchrun ... train.py hydra.run.dir=logs/train/runs/my_run ...`."
            )

    if on_slurm_launcher:
        tasks_per_node = int(select(hydra_cfg, "launcher.tasks_per_node", 1))
        nodes = int(select(hydra_cfg, "launcher.nodes", 1))
        per_node = processes // max(num_nodes, 1)
        if tasks_per_node != per_node or nodes != num_nodes:
            raise LauncherConfigError(
                f"hydra.launcher.tasks_per_node={tasks_per_node} and hydra.launcher.nodes={nodes} must equal the "
                f"trainer's processes per node ({per_node}, from trainer.devices={devices}) and "
                f"trainer.num_nodes={num_nodes}: Lightning runs one rank per SLURM task. Set trainer.devices / "
                "trainer.num_nodes and leave the launcher's values to their interpolations."
            )


class RunDirectoryInUseError(RuntimeError):
    """Another live process holds the run directory."""


class RunDirectoryLock:
    """An exclusive lock on a run directory, held by global rank 0 for the whole run.

    A second run started in the same ``hydra.run.dir`` while the first is alive would replace its
    checkpoints and config; it refuses instead, naming the holder. The lock is an ``flock`` on
    ``<dir>/.lock``: the operating system releases it when the holder exits, however it exits
    (``kill -9`` included), so a requeued or restarted job is never locked out by a dead one.
    """

    FILE_NAME = ".lock"

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / self.FILE_NAME
        self._handle = None

    def __enter__(self) -> "RunDirectoryLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirectoryInUseError(
                f"run directory {self.path.parent} is in use by {holder} (lock file {self.path}). "
                "Wait for that run to end, or give this one its own hydra.run.dir."
            ) from None
        handle.seek(0)
        handle.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {started}\n")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc_info) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def exit_code_for_signal(signum: int) -> int:
    """The shell convention for a process stopped by a signal: 128 + its number (SIGTERM: 143)."""
    return 128 + int(signum)


SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


def shutdown_process_group() -> None:
    """Destroy the default process group at the end of a DDP job (no-op without one).

    Lightning leaves the group alive after fit/validate; a gloo group torn down only at interpreter
    exit sometimes aborts the process ("terminate called without an active exception", exit code -6)
    after all work is done, which fails the job for its launcher.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
