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
