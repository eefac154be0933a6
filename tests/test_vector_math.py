"""dlsn.utils.vector_math: MKL's vector-math kernels are settled on one thread before a run computes.

The race itself (pytorch/pytorch#188792) shows up in a fraction of fresh processes only, so no test can
provoke it on demand; the exact-resume tests (tests/test_train_eval.py, tests/test_reliability.py) run
with two threads and failed in about one run in ten before the entry points settled the kernels.
"""

import itertools

import pytest
import torch
from omegaconf import OmegaConf
from torch.overrides import TorchFunctionMode

from dlsn.utils import vector_math
from dlsn.utils.config import apply_extras

pytestmark = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="this torch has no MKL: nothing to settle")


class RecordVectorMath(TorchFunctionMode):
    """Records (function, dtype, elements) of each VML function called under it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in vector_math.VML_FUNCTIONS:
            self.calls.append((func, args[0].dtype, args[0].numel()))
        return func(*args, **(kwargs or {}))


def test_every_function_is_called_once_per_precision_on_one_element(monkeypatch):
    monkeypatch.setattr(vector_math, "_settled", False)
    with RecordVectorMath() as record:
        assert vector_math.settle_vector_math() is True
    expected = {(function, dtype, 1) for function, dtype in itertools.product(vector_math.VML_FUNCTIONS, vector_math.VML_DTYPES)}
    assert sorted(map(str, record.calls)) == sorted(map(str, expected))  # each once, one element: one thread
    with RecordVectorMath() as again:
        assert vector_math.settle_vector_math() is False  # once per process
    assert again.calls == []


def test_train_and_eval_settle_it_with_the_process_wide_settings(monkeypatch):
    monkeypatch.setattr(vector_math, "_settled", False)
    apply_extras(OmegaConf.create({"extras": {"print_config": False}}))  # train.py and eval.py start with it
    assert vector_math._settled
