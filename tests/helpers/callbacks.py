"""Callbacks the tests add to real train.py runs (``+callbacks.x._target_=tests.helpers.callbacks.X``)."""

from __future__ import annotations

import os
import signal

from lightning import Callback


class SignalAtStep(Callback):
    """Send ``signal_name`` to this process once, when the run reaches optimizer step ``step``."""

    def __init__(self, step: int, signal_name: str = "SIGTERM") -> None:
        self.step, self.signum, self.sent = int(step), getattr(signal, signal_name), False

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if not self.sent and trainer.global_step >= self.step:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class WriteLearningRates(Callback):
    """Append each optimizer step's learning rate to a text file (the callback example of docs/architecture.md)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        with open(self.path, "a") as handle:
            handle.write(f"{trainer.global_step} {trainer.optimizers[0].param_groups[0]['lr']}\n")
