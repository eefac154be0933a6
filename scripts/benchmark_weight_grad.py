"""Weight gradients of 3x3 convolutions in float32 (TF32): cuDNN against im2col + cuBLAS and a Triton kernel.

    python scripts/benchmark_weight_grad.py --device cuda > weight_grad.txt   # about a minute on an H200
    python scripts/benchmark_weight_grad.py --device cpu --small             # the plumbing, on the CPU

Why: on an H200 (2026-11-28, docs/measurements/) cuDNN's TF32 weight gradients, picked by its autotuner,
ran at about a third of the GPU's TF32 peak, the slowest part of a convolution's backward:

* the network's 3x3 256 -> 256 convolutions at the training size (batch 16, 48x48): 0.26 ms each
  (167 TFLOP/s), 24 ms of the float32 eager training step;
* GLA's stacked embeddings (256 -> 448 channels) at batch 16, 96x96: 2.09 ms (145 TFLOP/s), where the same
  layer's input gradient took 0.83 ms; the one GLA row still short of its target (issue 9).

In bf16 the same weight gradients ran at about 580 TFLOP/s. This script measures, before anything is wired
into the model, whether a weight gradient computed another way is faster on the GPU at hand:

* ``cudnn``: ``convolution_backward`` for the weight alone, cuDNN's autotuner on, TF32 allowed (as the
  training steps run it);
* ``im2col``: the 3x3 neighbourhoods of the input written out as a ``[positions, 9 C]`` matrix, then one
  TF32 matrix product with the output gradient (cuBLAS): more memory traffic, a plain GEMM;
* ``triton P/O/C/warps/stages``: an implicit GEMM, no neighbourhoods written out: each program takes a
  block of ``O`` output channels, one kernel tap and a block of ``C`` input channels, and sums
  ``dy^T x_shifted`` over its share of the positions, ``P`` at a time (zero outside the image);
  the shares' partial sums are added afterwards (deterministic).

Every result is compared with the weight gradient in true float32 (cuDNN without TF32; on the CPU the
plain operation): the error printed is the largest difference over the largest entry (TF32's rounding
gives about 1e-3). ``--json`` writes the rows. Nothing in the model uses the alternatives yet.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from dlsn.models import chunk_attention, float32_ops
from dlsn.utils.files import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_train_step import median_ms  # noqa: E402

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# (name, batch, input channels, output channels, height, width)
CASES = {
    "paper": [("body conv 256->256, batch 16, 48x48", 16, 256, 256, 48, 48),
              ("GLA embeddings 256->448, batch 16, 48x48", 16, 256, 448, 48, 48),
              ("GLA embeddings 256->448, batch 16, 96x96", 16, 256, 448, 96, 96)],
    "small": [("toy 8->12, batch 2, 5x7", 2, 8, 12, 5, 7)],
}
# (positions per step, output channels per program, input channels per program, warps, stages). A program
# does 2 O C multiply-adds per position for (O + C) loaded values: the larger tiles need less bandwidth (each
# [P, O] gradient tile is read by 9 C / C_block programs, from L2 where they run together). All compile for
# sm_90 to wgmma and for sm_80 to mma.sync, without register spills and within the GPUs' shared memory
# (Triton 3.9; tests/test_benchmark_weight_grad.py). Not timed on a GPU yet.
TRITON_CONFIGS = {
    "paper": [(32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (64, 128, 64, 8, 3), (32, 128, 128, 8, 3),
              (64, 128, 128, 8, 2), (64, 128, 128, 8, 3), (32, 128, 256, 8, 3), (32, 256, 128, 8, 3)],
    "small": [(16, 16, 16, 4, 1), (8, 16, 8, 4, 1)],
}
KERNEL_SIZE, PADDING = 3, 1


if triton is not None:
    # A plain function: chunk_attention._launch_fixed compiles it (or runs it in Triton's interpreter on the CPU).
    def _weight_grad_kernel(X, GRAD_Y, PARTIAL, n_positions, height, width, in_channels, out_channels,
                            positions_per_split, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr,
                            BLOCK_C: tl.constexpr, KERNEL: tl.constexpr, PAD: tl.constexpr,
                            PRECISION: tl.constexpr):
        """``PARTIAL[split, o, tap, c] = sum_p dy[p, o] x[p shifted by tap, c]`` over the split's positions;
        ``X`` ``[P, C]`` and ``GRAD_Y`` ``[P, O]`` channels-last, P = N H W."""
        o_block = tl.program_id(0)
        c_blocks = (in_channels + BLOCK_C - 1) // BLOCK_C
        tap = tl.program_id(1) // c_blocks
        c_block = tl.program_id(1) % c_blocks
        split = tl.program_id(2)
        tap_row, tap_col = tap // KERNEL - PAD, tap % KERNEL - PAD
        outputs = o_block * BLOCK_O + tl.arange(0, BLOCK_O)
        inputs = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
        start = split * positions_per_split
        end = tl.minimum(start + positions_per_split, n_positions)
        accumulator = tl.zeros((BLOCK_O, BLOCK_C), dtype=tl.float32)
        for first in range(start, end, BLOCK_P):
            positions = first + tl.arange(0, BLOCK_P)
            inside = positions < end
            image, pixel = positions // (height * width), positions % (height * width)
            row, col = pixel // width + tap_row, pixel % width + tap_col
            # the tap's input pixel: zero padding outside the image
            source = inside & (row >= 0) & (row < height) & (col >= 0) & (col < width)
            grad_y = tl.load(GRAD_Y + positions[:, None] * out_channels + outputs[None, :],
                             mask=inside[:, None] & (outputs < out_channels)[None, :], other=0.0)
            x = tl.load(X + ((image * height + row) * width + col)[:, None] * in_channels + inputs[None, :],
                        mask=source[:, None] & (inputs < in_channels)[None, :], other=0.0)
            accumulator += tl.dot(tl.trans(grad_y), x, input_precision=PRECISION)
        taps = KERNEL * KERNEL
        target = (PARTIAL + split * out_channels * taps * in_channels + outputs[:, None] * taps * in_channels
                  + tap * in_channels + inputs[None, :])
        tl.store(target, accumulator, mask=(outputs < out_channels)[:, None] & (inputs < in_channels)[None, :])


def weight_grad_cudnn(x: torch.Tensor, grad_y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` ``[N, C, H, W]``, ``grad_y`` ``[N, O, H, W]`` (channels-last), ``weight`` ``[O, C, 3, 3]``."""
    return torch.ops.aten.convolution_backward(grad_y, x, weight, None, [1, 1], [PADDING, PADDING], [1, 1],
                                               False, [0, 0], 1, [False, True, False])[1]


def weight_grad_im2col(x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """The neighbourhoods as a ``[N H W, 9 C]`` matrix (one copy of a strided view), then one product."""
    batch, channels, height, width = x.shape
    out_channels = grad_y.shape[1]
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, PADDING, PADDING, PADDING, PADDING))  # [N, H+2, W+2, C]
    s_batch, s_row, s_col, _ = padded.stride()
    neighbourhoods = padded.as_strided((batch, height, width, KERNEL_SIZE, KERNEL_SIZE, channels),
                                       (s_batch, s_row, s_col, s_row, s_col, 1))
    columns = neighbourhoods.reshape(batch * height * width, KERNEL_SIZE * KERNEL_SIZE * channels)
    grad_rows = grad_y.permute(0, 2, 3, 1).reshape(-1, out_channels)  # a view for channels-last
    grad_weight = grad_rows.t() @ columns  # [O, 9 C]
    return grad_weight.view(out_channels, KERNEL_SIZE, KERNEL_SIZE, channels).permute(0, 3, 1, 2)


def weight_grad_triton(x: torch.Tensor, grad_y: torch.Tensor, config: tuple, precision: str = "tf32",
                       programs_wanted: int = 528) -> torch.Tensor:
    """The implicit GEMM of ``_weight_grad_kernel``; ``config`` ``(P, O, C, warps, stages)``. The positions
    are split so that about ``programs_wanted`` programs run (4 per SM of an H100/H200)."""
    block_p, block_o, block_c, warps, stages = config
    batch, channels, height, width = x.shape
    out_channels = grad_y.shape[1]
    n_positions = batch * height * width
    if max(x.numel(), grad_y.numel()) >= 2**31:
        raise ValueError(f"weight_grad_triton: 32-bit offsets, got {x.numel()} and {grad_y.numel()} elements")
    x_rows = x.permute(0, 2, 3, 1).contiguous()  # no copy for channels-last
    grad_rows = grad_y.permute(0, 2, 3, 1).contiguous()
    tiles = triton.cdiv(out_channels, block_o) * KERNEL_SIZE ** 2 * triton.cdiv(channels, block_c)
    splits = max(1, min(triton.cdiv(programs_wanted, tiles), triton.cdiv(n_positions, block_p)))
    per_split = triton.cdiv(triton.cdiv(n_positions, splits), block_p) * block_p
    splits = triton.cdiv(n_positions, per_split)
    partial = x.new_empty(splits, out_channels, KERNEL_SIZE ** 2, channels, dtype=torch.float32)
    grid = (triton.cdiv(out_channels, block_o), KERNEL_SIZE ** 2 * triton.cdiv(channels, block_c), splits)
    chunk_attention._launch_fixed(_weight_grad_kernel, grid, x.device, x_rows, grad_rows, partial, n_positions,
                                  height, width, channels, out_channels, per_split, num_warps=warps,
                                  num_stages=stages, BLOCK_P=block_p, BLOCK_O=block_o, BLOCK_C=block_c,
                                  KERNEL=KERNEL_SIZE, PAD=PADDING, PRECISION=precision)
    grad_weight = partial.sum(0) if splits > 1 else partial[0]
    return grad_weight.view(out_channels, KERNEL_SIZE, KERNEL_SIZE, channels).permute(0, 3, 1, 2)


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
    methods = {"cudnn": lambda: weight_grad_cudnn(x, grad_y, weight), "im2col": lambda: weight_grad_im2col(x, grad_y)}
    if triton is not None:
        precision = "tf32" if device.type == "cuda" else "ieee"  # the CPU: the formula is what is checked
        for config in TRITON_CONFIGS[size]:
            methods["triton " + "/".join(map(str, config))] = (
                lambda config=config: weight_grad_triton(x, grad_y, config, precision))
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
