"""`scripts/benchmark_weight_grad.py` times every method on the CPU (their numbers and the Triton kernel's compiles:
tests/test_conv_weight_grad.py)."""

from __future__ import annotations

import json

import pytest
import torch

from dlsn.models import chunk_attention
from tests.helpers.runs import load_script


def test_the_script_times_every_method_and_writes_its_rows(tmp_path, capsys):
    if not chunk_attention.triton_available():
        pytest.skip("triton is not importable")
    script = load_script("benchmark_weight_grad")
    settings = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    assert script.main(["--device", "cpu", "--small", "--json", str(tmp_path / "rows.json")]) == 0
    assert (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()) == settings  # put back
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [row["method"] for row in rows] == ["cudnn", "im2col"] + [
        "triton " + "/".join(map(str, config)) for config in script.TRITON_CONFIGS["small"]]
    assert all(isinstance(row["ms"], float) and row["error"] < 1e-5 for row in rows), rows
    assert "| toy 8->12, batch 2, 5x7 | triton 16/16/16/4/1 |" in capsys.readouterr().out

