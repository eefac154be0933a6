"""Samplers of the SR datasets: training keys for exact resume, and exact evaluation under DDP.

* :class:`TrainPatchSampler` yields ``(seed, epoch, index)`` keys, from which
  :class:`dlsn.data.datasets.SRTrainDataset` draws each patch: an epoch's patches depend only on the
  run's seed and the epoch number, so a resumed run draws the patches of an uninterrupted one.
* :class:`ResumableTrainLoader` saves its position inside an epoch in checkpoints, so that a run
  resumed from a mid-epoch checkpoint continues with exactly the next batch.
* :class:`UnpaddedEvalSampler` / :func:`eval_sampler` split an evaluation set over the DDP ranks
  without repeating any image, so validation/test metrics under DDP equal the one-process numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler


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
        self._resume: tuple[int, int] | None = None  # (epoch, samples of this rank already used in it)

    def resume_at(self, epoch: int, consumed_samples: int) -> None:
        """Leave out the first ``consumed_samples`` keys of ``epoch`` (a run resumed inside that epoch)."""
        self._resume = (int(epoch), int(consumed_samples))

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self._resume is not None and self._resume[0] != epoch:
            self._resume = None

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        skip = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        for index in range(self.rank + skip * self.num_replicas, self.total_size, self.num_replicas):
            yield (self.seed, self.epoch, index)

    def __len__(self) -> int:
        return self.num_samples


class ResumableTrainLoader(DataLoader):
    """The training DataLoader, with its position inside the epoch saved in checkpoints.

    Lightning saves ``state_dict()`` of such a loader with its loop state and gives it back through
    ``load_state_dict()`` on resume. The position is the number of batches the training loop has
    used this epoch (``consumed_batches``, set by the data module; Lightning fetches one batch ahead,
    so the loader's own count would be one too many). Resumed there, the :class:`TrainPatchSampler`
    leaves out the used keys, so a run stopped mid-epoch (``last.ckpt`` every N steps, a stop
    signal) continues with exactly the batches the uninterrupted run would have drawn.
    """

    consumed_batches: Callable[[], int] | None = None

    def state_dict(self) -> dict[str, Any]:
        consumed = self.consumed_batches() if self.consumed_batches is not None else 0
        return {"epoch": int(self.sampler.epoch), "batches": int(consumed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.resume_at(state["epoch"], state["batches"] * self.batch_size)


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
