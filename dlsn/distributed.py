"""Helpers for running dlsn on several processes: exact DDP evaluation, launcher guards, SLURM resume.

Three independent pieces live here:

* :class:`UnpaddedEvalSampler` / :func:`eval_sampler` split an evaluation set over the DDP ranks
  without repeating any image, so validation/test metrics under DDP equal the one-process numbers.
* :func:`check_launcher_compatibility` refuses configurations in which Lightning would re-launch
  the training script for DDP from inside a Hydra multirun (which silently restarts the sweep).
* :func:`find_resume_checkpoint` picks the checkpoint a requeued SLURM job continues from.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sized
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# (a) Evaluation without padding
# --------------------------------------------------------------------------------------------------


class UnpaddedEvalSampler(DistributedSampler):
    """Deal the indices 0..N-1 round-robin over the ranks: rank r gets r, r+R, r+2R, ...

    torch's ``DistributedSampler`` makes every rank equally long by repeating images at the end,
    so under DDP some validation images would be counted twice. Here ranks may differ by one
    image instead, which is fine for evaluation: there is no gradient all-reduce, and the metrics
    (sum/count states reduced with ``sum``) are synchronised once per epoch, not per step.

    It subclasses ``DistributedSampler`` only because Lightning leaves a dataloader alone when its
    sampler already is one (``_requires_distributed_sampler`` in Lightning's data connector); with
    any other sampler and ``use_distributed_sampler=True`` Lightning would swap in a padded one.
    """

    def __init__(self, dataset: Sized, num_replicas: int | None = None, rank: int | None = None):
        if num_replicas is None or rank is None:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    "UnpaddedEvalSampler needs num_replicas and rank, or an initialised "
                    "torch.distributed process group to read them from."
                )
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} is outside [0, num_replicas={num_replicas}).")
        dataset_size = len(dataset)
        if dataset_size < num_replicas:
            # A rank without a single batch skips the whole evaluation loop in Lightning (its
            # epoch-end hooks never run), so it would not join the metric all-gather of the other
            # ranks and the job would hang. Failing early with the numbers is kinder.
            raise ValueError(
                f"The evaluation set has {dataset_size} images but there are {num_replicas} DDP "
                "processes; every process needs at least one image. Evaluate with fewer devices "
                "(e.g. trainer.devices=1 for eval.py) or use a larger validation set."
            )
        # Deliberately not calling DistributedSampler.__init__: it computes padded sizes we do not
        # want. Set the attributes Lightning and torch read from a DistributedSampler instead.
        self.dataset = dataset
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.shuffle = False
        self.drop_last = False
        self.seed = 0
        self.num_samples = len(range(rank, dataset_size, num_replicas))
        self.total_size = dataset_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class TrainPatchSampler(DistributedSampler):
    """Keys ``(seed, epoch, index)`` for the random-patch training dataset: this rank's share.

    The training dataset draws the patch of a key from the key alone, so an epoch's patches depend
    only on the run's seed and the epoch number (which Lightning passes in through
    ``set_epoch``): a resumed run draws exactly the patches of the uninterrupted run, whatever the
    number of DataLoader workers and whether they persist. Ranks get disjoint indices.
    Subclassing ``DistributedSampler`` keeps Lightning from swapping in its own sampler.
    """

    def __init__(self, dataset: Sized, seed: int | None = None):
        # Not DistributedSampler.__init__: it needs a process group; read it if there is one.
        self.dataset = dataset
        self.num_replicas = distributed_world_size()
        self.rank = dist.get_rank() if self.num_replicas > 1 else 0
        self.epoch = 0
        self.shuffle = False
        self.drop_last = True
        # The main process's seed (lightning.seed_everything sets it): the same on every rank.
        self.seed = torch.initial_seed() if seed is None else int(seed)
        self.num_samples = len(dataset) // self.num_replicas
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        for index in range(self.rank, self.total_size, self.num_replicas):
            yield (self.seed, self.epoch, index)

    def __len__(self) -> int:
        return self.num_samples


def distributed_world_size() -> int:
    """World size of the initialised default process group, 1 when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def eval_sampler(dataset: Sized) -> UnpaddedEvalSampler | None:
    """Sampler for a val/test DataLoader: unpadded split under DDP, ``None`` (sequential) otherwise.

    Call it inside ``val_dataloader()`` / ``test_dataloader()``: Lightning requests the loaders
    after the strategy has set up the process group, so the world size is known by then.
    Pass the result as ``DataLoader(..., sampler=eval_sampler(ds), shuffle=False)``.
    """
    if distributed_world_size() > 1:
        return UnpaddedEvalSampler(dataset)
    return None


def synced_sum(value: torch.Tensor | int | float) -> float:
    """Sum of ``value`` over all ranks (the value itself without a process group).

    Use it for totals such as the number of evaluated images: a torchmetrics Metric's states are
    synced only *inside* ``compute()`` and restored to this rank's own values afterwards, so
    ``metric.count`` read after ``compute()`` is the local count.
    """
    total = torch.as_tensor(value, dtype=torch.float64).detach().clone()
    if distributed_world_size() > 1:
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        total = total.to(backend_device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total.item())


def shutdown_process_group() -> None:
    """Destroy the default process group at the end of a DDP job (no-op without one).

    Lightning leaves the group alive after fit/validate; a gloo group torn down only at
    interpreter exit sometimes aborts the process ("terminate called without an active
    exception", exit code -6) after all work is done, which fails the job for its launcher.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def evaluation_split_sizes(dataset_size: int, world_size: int) -> list[int]:
    """How many images each rank evaluates (for logs and tests): sizes differ by at most one."""
    return [len(range(rank, dataset_size, world_size)) for rank in range(world_size)]


# --------------------------------------------------------------------------------------------------
# (b) Refuse DDP re-launches inside a local Hydra multirun
# --------------------------------------------------------------------------------------------------

SLURM_LAUNCHER_TARGET_SUFFIX = "SlurmLauncher"


class LauncherConfigError(ValueError):
    """The Hydra launcher and the trainer settings cannot work together."""


def _cfg_get(cfg: Any, dotted_key: str, default: Any = None) -> Any:
    """Read ``a.b.c`` from a DictConfig or nested dicts; missing keys give ``default``."""
    node = cfg
    for part in dotted_key.split("."):
        if node is None:
            return default
        try:
            node = node[part] if part in node else None
        except TypeError:  # not a mapping
            return default
    return default if node is None else node


def trainer_process_count(trainer_cfg: Any) -> int:
    """How many processes Lightning would run for this trainer config (devices x num_nodes).

    ``devices`` may be an int, a string int, a list of device ids, or ``"auto"``/``-1`` (which
    means every visible accelerator; on CPU Lightning takes one process for "auto").
    """
    devices = _cfg_get(trainer_cfg, "devices", "auto")
    accelerator = str(_cfg_get(trainer_cfg, "accelerator", "auto")).lower()
    num_nodes = int(_cfg_get(trainer_cfg, "num_nodes", 1))

    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, str) and "," in devices:  # "0,1" style device id lists
        devices = [d for d in devices.split(",") if d.strip()]
    if devices in ("auto", -1):
        if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
            per_node = torch.cuda.device_count()
        else:
            per_node = 1
    elif isinstance(devices, int):
        per_node = devices
    else:  # a sequence of device ids (ListConfig or list)
        per_node = len(list(devices))
    return max(per_node, 1) * max(num_nodes, 1)


def _launched_by_torchrun() -> bool:
    # torchrun (torch.distributed.run / elastic) sets this; Lightning's own DDP launcher does not.
    return "TORCHELASTIC_RUN_ID" in os.environ


def check_launcher_compatibility(cfg: Any, hydra_cfg: Any | None = None) -> None:
    """Raise :class:`LauncherConfigError` for launcher/trainer combinations that cannot work.

    * A Hydra multirun (``-m``) with any launcher other than SLURM and a trainer that needs more
      than one process: Lightning starts DDP by re-executing ``sys.argv`` in child processes, and
      each child would start the whole sweep again (and the jobs run in one process anyway).
    * torchrun with several processes and no explicit ``hydra.run.dir``: each process would pick
      its own timestamped output directory.
    * ``hydra/launcher=slurm`` whose tasks per node / nodes disagree with ``trainer.devices`` /
      ``trainer.num_nodes``: Lightning takes its ranks from SLURM, so both must describe the same
      process layout.

    ``hydra_cfg`` defaults to ``HydraConfig.get()``; outside a Hydra app nothing is checked.
    Call at the start of the task function, before the Trainer is built.
    """
    if hydra_cfg is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return
        hydra_cfg = HydraConfig.get()

    from hydra.types import RunMode

    mode = _cfg_get(hydra_cfg, "mode")
    is_multirun = mode == RunMode.MULTIRUN or str(mode).upper().endswith("MULTIRUN")
    launcher_target = str(_cfg_get(hydra_cfg, "launcher._target_", ""))
    on_slurm_launcher = launcher_target.endswith(SLURM_LAUNCHER_TARGET_SUFFIX)
    trainer_cfg = _cfg_get(cfg, "trainer", {})
    processes = trainer_process_count(trainer_cfg)

    if is_multirun and not on_slurm_launcher and processes > 1:
        launcher_name = launcher_target.rsplit(".", 1)[-1] or "unknown"
        raise LauncherConfigError(
            f"Refusing to run a Hydra multirun (-m) with launcher {launcher_name} and a trainer "
            f"that needs {processes} processes (trainer.devices="
            f"{_cfg_get(trainer_cfg, 'devices')}, trainer.num_nodes="
            f"{_cfg_get(trainer_cfg, 'num_nodes', 1)}, trainer.strategy="
            f"{_cfg_get(trainer_cfg, 'strategy')}). Lightning launches DDP by re-running the "
            "command line in new processes, which would restart the sweep in every one of them. "
            "Either submit the sweep with `hydra/launcher=slurm` (one SLURM task per GPU), run "
            "the jobs one by one without -m (e.g. `python train.py trainer=ddp ...`), or sweep "
            "with trainer.devices=1."
        )

    if _launched_by_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        run_dir_overridden = any(
            str(override).startswith("hydra.run.dir=")
            for override in (_cfg_get(hydra_cfg, "overrides.hydra", []) or [])
        )
        if not run_dir_overridden:
            raise LauncherConfigError(
                "Under torchrun every process composes its own config, so a timestamped "
                "hydra.run.dir can differ between processes (and a restart would not find the "
                "previous checkpoints). Pass one directory to all of them, e.g. "
                "`torchrun ... train.py hydra.run.dir=logs/train/runs/my_run ...`."
            )

    if on_slurm_launcher:
        tasks_per_node = int(_cfg_get(hydra_cfg, "launcher.tasks_per_node", 1))
        nodes = int(_cfg_get(hydra_cfg, "launcher.nodes", 1))
        num_nodes = int(_cfg_get(trainer_cfg, "num_nodes", 1))
        per_node = processes // max(num_nodes, 1)
        if tasks_per_node != per_node or nodes != num_nodes:
            raise LauncherConfigError(
                f"hydra.launcher.tasks_per_node={tasks_per_node} and hydra.launcher.nodes={nodes} "
                f"must equal the trainer's processes per node ({per_node}, from trainer.devices="
                f"{_cfg_get(trainer_cfg, 'devices')}) and trainer.num_nodes={num_nodes}: Lightning "
                "runs one rank per SLURM task. Set trainer.devices / trainer.num_nodes and leave "
                "the launcher's values to their interpolations."
            )


# --------------------------------------------------------------------------------------------------
# (c) Resuming a requeued SLURM job
# --------------------------------------------------------------------------------------------------

LAST_CHECKPOINT_NAME = "last.ckpt"
HPC_CHECKPOINT_GLOB = "hpc_ckpt_*.ckpt"


def find_resume_checkpoint(output_dir: str | os.PathLike, checkpoint_subdir: str = "checkpoints") -> str | None:
    """The newest checkpoint a restarted run of ``output_dir`` should continue from, or ``None``.

    Candidates are Lightning's SLURM auto-requeue checkpoints (``hpc_ckpt_<n>.ckpt``, written to
    ``trainer.default_root_dir`` when a job gets the requeue signal) and ModelCheckpoint's
    ``last.ckpt`` (``save_last=True``) under ``<output_dir>/<checkpoint_subdir>``. The most
    recently modified one wins: each is written over time by the same run, so mtime orders them.

    A requeued submitit job re-runs the same Hydra job with the same overrides and the same
    timestamped output directory (Hydra copies the resolver cache of the sweep config into each
    job), so on a fresh start this returns ``None`` and after a requeue it returns the state the
    previous allocation left behind.
    """
    root = Path(output_dir)
    candidates = list(root.glob(HPC_CHECKPOINT_GLOB))
    candidates += list((root / checkpoint_subdir).glob(HPC_CHECKPOINT_GLOB))
    last = root / checkpoint_subdir / LAST_CHECKPOINT_NAME
    if last.is_file():
        candidates.append(last)
    candidates = [c for c in candidates if c.is_file() and c.stat().st_size > 0]
    if not candidates:
        return None
    newest = max(candidates, key=lambda path: (path.stat().st_mtime, path.name))
    return str(newest)


def resolve_ckpt_path(requested: str | None, output_dir: str | os.PathLike, auto_resume: bool = True) -> str | None:
    """The ``ckpt_path`` for ``trainer.fit``: an explicit request wins, else the automatic resume.

    ``requested`` is the user's ``ckpt_path`` config value (``None`` for a fresh run). Resuming is
    logged so that a restarted job says where it picked up.
    """
    if requested:
        return str(requested)
    if not auto_resume:
        return None
    found = find_resume_checkpoint(output_dir)
    if found is not None:
        log.info("Resuming from %s (found in the run's output directory).", found)
    return found


def slurm_requeue_count() -> int:
    """How many times SLURM has restarted this job (``SLURM_RESTART_COUNT``), 0 outside SLURM."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0
