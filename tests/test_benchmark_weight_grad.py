"""`scripts/benchmark_weight_grad.py`: its two alternatives to cuDNN's weight gradient compute the same numbers
(on the CPU: im2col's product, and the Triton kernel in Triton's interpreter), and its paper configurations
compile for the GPUs they are meant for (slow: ahead-of-time compiles, no GPU needed)."""

from __future__ import annotations

import json

import pytest
import torch

from dlsn.models import chunk_attention
from tests.helpers.gpu_compile import SHARED_MEMORY_LIMIT, register_spill_bytes, triton_compile
from tests.helpers.runs import load_script


def _problem(batch=2, channels=8, out_channels=12, height=5, width=7):
    generator = torch.Generator().manual_seed(0)

    def random(*shape):
        return torch.randn(*shape, generator=generator).contiguous(memory_format=torch.channels_last)

    x, grad_y = random(batch, channels, height, width), random(batch, out_channels, height, width)
    weight = random(out_channels, channels, 3, 3)
    exact = torch.ops.aten.convolution_backward(grad_y.double(), x.double(), weight.double(), None, [1, 1], [1, 1],
                                                [1, 1], False, [0, 0], 1, [False, True, False])[1]
    return x, grad_y, exact


def test_im2col_weight_gradient_is_the_convolutions():
    script = load_script("benchmark_weight_grad")
    x, grad_y, exact = _problem()
    torch.testing.assert_close(script.weight_grad_im2col(x, grad_y).double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [(16, 16, 16, 4, 1), (8, 16, 8, 4, 1)], ids=["one input block", "taps x blocks"])
def test_triton_weight_gradient_is_the_convolutions_with_padding_and_splits(config):
    """Positions split over several programs (their partial sums added), output channels (12) fewer than a
    block, taps reaching outside the image (zero padding); 16 input channels in blocks of 8 and of 16."""
    if not chunk_attention.triton_available():
        pytest.skip("triton is not importable")
    script = load_script("benchmark_weight_grad")
    x, grad_y, exact = _problem(channels=16)
    got = script.weight_grad_triton(x, grad_y, config, precision="ieee", programs_wanted=64)
    assert got.shape == exact.shape
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)


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


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_the_paper_configurations_compile_for_the_gpus_without_spills(arch):
    """Each configuration the GPU run times compiles (sm_90: to wgmma, the point of the larger tiles), fits the
    GPU's shared memory and spills no registers."""
    pytest.importorskip("triton.backends.nvidia")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    script = load_script("benchmark_weight_grad")
    kernel = triton.jit(script._weight_grad_kernel)
    for rows, outputs, inputs, warps, stages in script.TRITON_CONFIGS["paper"]:
        constants = dict(BLOCK_P=rows, BLOCK_O=outputs, BLOCK_C=inputs, KERNEL=3, PAD=1, PRECISION="tf32")
        signature, attributes = {}, {}
        for index, argument in enumerate(kernel.arg_names):
            if argument in constants:
                signature[argument] = "constexpr"
            elif argument.isupper():  # a pointer
                signature[argument] = "*fp32"
                attributes[(index,)] = [["tt.divisibility", 16]]
            else:
                signature[argument] = "i32"
                if argument in ("in_channels", "out_channels", "positions_per_split"):
                    attributes[(index,)] = [["tt.divisibility", 16]]
        source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attributes)
        compiled = triton_compile(source, GPUTarget("cuda", arch, 32), warps, stages)
        what = f"sm_{arch}, {rows}/{outputs}/{inputs}/{warps}/{stages}"
        assert compiled.metadata.shared <= SHARED_MEMORY_LIMIT[arch], what
        assert register_spill_bytes(compiled) in (None, 0), what
        if arch >= 90:
            assert "wgmma.mma_async" in compiled.asm["ptx"], what
