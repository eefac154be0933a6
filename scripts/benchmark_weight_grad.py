"""Weight gradients of 3x3 convolutions in float32 (TF32): cuDNN against im2col + cuBLAS and a Triton kernel.

    python scripts/benchmark_weight_grad.py --device cuda > weight_grad.txt   # about a minute on an H200
    python scripts/benchmark_weight_grad.py --device cpu --small             # the plumbing, on the CPU

Why: on an H200 (2026-11-28, docs/measurements/) cuDNN's TF32 weight gradients, picked by its autotuner,
ran at about a third of the GPU's TF32 peak, the slowest part of a convolution's backward:

* the network's 3x3 256 -> 256 convolutions at the training size (batch 16, 48x48): 0.26 ms each
  (167 TFLOP/s), 24 ms of the float32 eager training step;
* GLA's value and score embeddings (256 -> 512 channels) at batch 16, 96x96: 2.10 ms (165 TFLOP/s), where
  the same layer's input gradient took 0.83 ms; the one GLA row still short of its target (issue 9). Its
  training backward now computes the three embeddings' weight gradients as one (256 -> 576: match 64,
  value 256, score 256 channels; ``float32_ops.relu_convolution_groups``), the shape timed here.

In bf16 the same weight gradients ran at about 580 TFLOP/s. This script measures whether a weight gradient
computed another way is faster on the GPU at hand:

* ``cudnn``: ``convolution_backward`` for the weight alone, cuDNN's autotuner on, TF32 allowed (as the
  training steps run it);
* ``im2col``: the 3x3 neighbourhoods of the input written out as a ``[positions, 9 C]`` matrix, then one
  TF32 matrix product with the output gradient (cuBLAS): more memory traffic, a plain GEMM;
* ``triton P/O/C/warps/stages``: the implicit GEMM of :mod:`dlsn.models.conv_weight_grad`, no
  neighbourhoods written out: each program takes a block of ``O`` output channels, one kernel tap and a
  block of ``C`` input channels, and sums ``dy^T x_shifted`` over its share of the positions, ``P`` at a
  time (zero outside the image); the shares' partial sums are added afterwards (deterministic).

Every result is compared with the weight gradient in true float32 (cuDNN without TF32; on the CPU the
plain operation): the error printed is the largest difference over the largest entry (TF32's rounding
gives about 1e-3). ``--json`` writes the rows. GLA's embeddings in float32 training offer the kernel's
configurations in ``conv_weight_grad.CONFIGS`` (a subset of those timed here) and im2col to a timed choice
against cuDNN.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dlsn.models import conv_weight_grad, float32_ops
from dlsn.utils.files import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_train_step import median_ms  # noqa: E402

# (name, batch, input channels, output channels, height, width)
CASES = {
    "paper": [("body conv 256->256, batch 16, 48x48", 16, 256, 256, 48, 48),
              ("GLA embeddings 256->576, batch 16, 48x48", 16, 256, 576, 48, 48),
              ("GLA embeddings 256->576, batch 16, 96x96", 16, 256, 576, 96, 96)],
    "small": [("toy 8->12, batch 2, 5x7", 2, 8, 12, 5, 7)],
}
# (positions per step, output channels per program, input channels per program, warps, stages). A program
# does 2 O C multiply-adds per position for (O + C) loaded values: the larger tiles need less bandwidth (each
# [P, O] gradient tile is read by 9 C / C_block programs, from L2 where they run together). All compile for
# sm_90 to wgmma and for sm_80 to mma.sync, without register spills and within the GPUs' shared memory
# (Triton 3.9; tests/test_conv_weight_grad.py). Not timed on a GPU yet.
TRITON_CONFIGS = {
    "paper": [(32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (64, 128, 64, 8, 3), (32, 128, 128, 8, 3),
              (64, 128, 128, 8, 2), (64, 128, 128, 8, 3), (32, 128, 256, 8, 3), (32, 256, 128, 8, 3)],
    "small": [(16, 16, 16, 4, 1), (8, 16, 8, 4, 1)],
}
KERNEL_SIZE, PADDING = conv_weight_grad.KERNEL_SIZE, conv_weight_grad.PADDING


def weight_grad_cudnn(x: torch.Tensor, grad_y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` ``[N, C, H, W]``, ``grad_y`` ``[N, O, H, W]`` (channels-last), ``weight`` ``[O, C, 3, 3]``."""
    return torch.ops.aten.convolution_backward(grad_y, x, weight, None, [1, 1], [PADDING, PADDING], [1, 1],
                                               False, [0, 0], 1, [False, True, False])[1]


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return ((result.float() - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


def measure_case(case: tuple, device: torch.device, size: str, warmup: int, repeats: int) -> list[dict]:
    """Every method on one case: its median time, TFLOP/s and error, printed as a table row each."""
    name, batch, channels, out_channels, height, width = case
    generator = torch.Generator().manual_seed(0)

    def random(*shape):
        return torch.randn(*shape, generator=generator).to(device).contiguous(memory_format=torch.channels_last)

    x, grad_y = random(batch, channels, height, width), random(batch, out_channels, height, width)
    weight = random(out_channels, channels, KERNEL_SIZE, KERNEL_SIZE)
    with float32_ops._cudnn_tf32(device, enabled=False):
        exact = weight_grad_cudnn(x, grad_y, weight).float()
    methods = {"cudnn": lambda: weight_grad_cudnn(x, grad_y, weight),
               "im2col": lambda: conv_weight_grad.weight_grad_im2col(x, grad_y)}
    if conv_weight_grad.triton is not None:
        precision = "tf32" if device.type == "cuda" else "ieee"  # the CPU: the formula is what is checked
        for config in TRITON_CONFIGS[size]:
            methods[conv_weight_grad.config_name(config)] = (
                lambda config=config: conv_weight_grad.weight_grad(x, grad_y, config, precision))
    flops = 2 * batch * height * width * out_channels * channels * KERNEL_SIZE ** 2
    rows = []
    for method, run in methods.items():
        row = dict(case=name, method=method)
        try:
            error = relative_error(run(), exact)
            milliseconds = median_ms(run, device, warmup, repeats)
            row |= dict(ms=round(milliseconds, 4), tflops=round(flops / milliseconds / 1e9, 1), error=error)
            print(f"| {name} | {method} | {milliseconds:.3f} | {row['tflops']:.1f} | {error:.1e} |", flush=True)
        except Exception as failure:  # noqa: BLE001 - a configuration that does not compile or fit
            row |= dict(ms=None, error=f"{type(failure).__name__}: {str(failure)[:200]}")
            print(f"| {name} | {method} | failed: {row['error']} | | |", flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="toy sizes, one run each (the CPU: tests this script)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="write the rows to this file (after every case)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    size = "small" if args.small else "paper"
    warmup, repeats = (0, 1) if args.small else (args.warmup, args.repeats)
    # As the training steps: cuDNN's autotuner (CudnnAutotune), TF32 matrix products (im2col's, as cuDNN's)
    settings = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")
    rows = []
    print("| case | method | ms | TFLOP/s | error vs float32 |\n|---|---|---|---|---|", flush=True)
    try:
        for case in CASES[size]:
            rows += measure_case(case, device, size, warmup, repeats)
            if args.json:  # a run cut short keeps the cases done
                atomic_write_text(args.json, json.dumps(rows, indent=1))
    finally:
        torch.backends.cudnn.benchmark = settings[0]
        torch.set_float32_matmul_precision(settings[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
