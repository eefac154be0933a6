"""A Lightning callback that the join tests add to a real train.py run to see inside it.

    python train.py ... +callbacks.probe._target_=tests.helpers.probes.RecordTraining +callbacks.probe.out_dir=DIR

(tests/conftest.py puts tests/ on the subprocess's PYTHONPATH.) It observes the run without changing it,
except for ``bad_batch``/``bad_rank``, which poison one training batch on one process (NaN inputs) to check
that every process skips it. Each process writes ``DIR/rank<r>.pt`` at the end of training.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


def _weights(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {name: value.detach().cpu().clone() for name, value in module.state_dict().items()}


def _gradient_norm(module: L.LightningModule) -> float:
    """L2 norm of all gradients together (what ``gradient_clip_algorithm=norm`` clips); 0 without gradients."""
    grads = [p.grad.detach().double().flatten() for p in module.parameters() if p.grad is not None]
    return float(torch.cat(grads).norm()) if grads else 0.0


class RecordTraining(L.Callback):
    """Records, per process: the LightningModule's weights when training starts and after every training
    batch, and the gradient norm at every optimizer step before and after the Trainer's clipping.

    Args:
        out_dir: where ``rank<r>.pt`` is written.
        bad_batch: index (counted over the whole run, from 0) of a training batch to poison, or None.
        bad_rank: the process whose copy of that batch is poisoned.
    """

    def __init__(self, out_dir: str, bad_batch: int | None = None, bad_rank: int = 0) -> None:
        self.out_dir = Path(out_dir)
        self.bad_batch = bad_batch
        self.bad_rank = bad_rank
        self.batches_seen = 0
        self.record: dict = {"initial": None, "after_batch": [], "grad_norm_before_clip": [], "grad_norm_at_step": []}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["initial"] = _weights(pl_module)
        self.record["gradient_clip_val"] = trainer.gradient_clip_val
        for optimizer in trainer.optimizers:
            # After the step the gradients are still the ones the optimizer used, i.e. after clipping.
            optimizer.register_step_post_hook(
                lambda *_: self.record["grad_norm_at_step"].append(_gradient_norm(pl_module))
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.batches_seen == self.bad_batch and trainer.global_rank == self.bad_rank:
            batch["lr"].fill_(float("nan"))  # in place: training_step gets this very tensor

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Lightning calls this hook after backward and before it clips the gradients.
        self.record["grad_norm_before_clip"].append(_gradient_norm(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches_seen += 1
        self.record["after_batch"].append(_weights(pl_module))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["world_size"] = trainer.world_size
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.record, self.out_dir / f"rank{trainer.global_rank}.pt")


def load_records(out_dir: Path) -> list[dict]:
    """The records of all processes, by rank."""
    files = sorted(Path(out_dir).glob("rank*.pt"), key=lambda p: int(p.stem[4:]))
    assert files, f"no probe records in {out_dir}"
    return [torch.load(f, weights_only=False) for f in files]


def probe_overrides(out_dir: Path, bad_batch: int | None = None, bad_rank: int = 0) -> list[str]:
    """Hydra overrides that add :class:`RecordTraining` to a train.py run."""
    overrides = ["+callbacks.probe._target_=tests.helpers.probes.RecordTraining", f"+callbacks.probe.out_dir={out_dir}"]
    if bad_batch is not None:
        overrides += [f"+callbacks.probe.bad_batch={bad_batch}", f"+callbacks.probe.bad_rank={bad_rank}"]
    return overrides
