"""The weight gradient of a 3x3 convolution other ways than cuDNN's (TF32): a Triton implicit GEMM, im2col.

For ``y = conv2d(x, w)`` with stride 1 and padding 1, over the ``P = N H W`` output positions,

    dL/dw[o, c, i, j] = sum_p dy[p, o] x[p + (i - 1, j - 1), c]        (x is zero outside the image)

so for each kernel tap ``(i, j)`` the gradient is one matrix product ``dy^T X_(i,j)`` of ``[O, P]`` by
``[P, C]``, where ``X_(i,j)`` is the input shifted by the tap. :func:`weight_grad` computes it without
writing the shifted inputs out: a program takes a block of output channels, one tap and a block of
input channels, and sums the product over a share of the positions; the shares' partial sums are added
after, so the result does not depend on the order in which programs run (deterministic).

Why: on an H200 (2026-11-28) the TF32 weight gradients that cuDNN's autotuner picks for the paper's 3x3
convolutions ran at about a third of TF32's peak (GLA's value and score embeddings, 256 -> 512 channels,
batch 16, 96x96: 2.10 ms at 165 TFLOP/s, where the layer's input gradient took 0.83 ms). Whether this kernel
is faster depends on the GPU, so :func:`convolution_backward` keeps cuDNN unless the timed choice
(:mod:`dlsn.models.timed_choice`: CUDA, cuDNN's autotuner on) measured another method faster at that
size: a configuration of the kernel, or the neighbourhoods written out and one cuBLAS product
(:func:`weight_grad_im2col`). Each is compared with cuDNN's gradient before it is timed, and left out if
it disagrees. ``scripts/benchmark_weight_grad.py`` times them all, and more configurations.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

# float32_ops imports this module: used in calls only
from dlsn.models import chunk_attention, float32_ops, timed_choice

try:
    import triton
    import triton.language as tl
except ImportError:  # cuDNN's weight gradient needs no Triton
    triton = None

log = logging.getLogger(__name__)

KERNEL_SIZE, PADDING = 3, 1
# "timed" (the fastest of cuDNN and methods() where timing is allowed, else cuDNN), "cudnn", or one of
# methods(): tests and benchmarks.
WEIGHT_GRAD_METHOD = "timed"
# (positions per step, output channels per program, input channels per program, warps, stages), offered
# to the timed choice. A program does 2 O C multiply-adds per position for O + C loaded values, so larger
# tiles need less bandwidth. All compile for sm_90 to wgmma and for sm_80 to mma.sync, without register
# spills, within the GPUs' shared memory (tests/test_conv_weight_grad.py); not timed on a GPU yet.
CONFIGS = ((64, 128, 128, 8, 3), (64, 128, 64, 8, 3), (32, 128, 256, 8, 3), (64, 64, 64, 4, 3))
PROGRAMS_PER_SM = 4  # the positions are split until about this many programs run per multiprocessor
# Largest relative difference from cuDNN's TF32 gradient a configuration may show before it is timed:
# TF32 rounding gives about 1e-3 of the largest entry, a wrong kernel about 1.
AGREEMENT = 1e-2


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


def config_name(config: tuple) -> str:
    return "triton " + "/".join(map(str, config))


def programs_wanted(device: torch.device) -> int:
    """About ``PROGRAMS_PER_SM`` programs per multiprocessor of a GPU; a few in Triton's interpreter."""
    if device.type != "cuda":
        return 8
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def weight_grad(x: torch.Tensor, grad_y: torch.Tensor, config: tuple, precision: str = "tf32",
                programs: int | None = None) -> torch.Tensor:
    """``dL/dw`` ``[O, C, 3, 3]`` of a 3x3 convolution (stride 1, padding 1) of ``x`` ``[N, C, H, W]``, from its
    output gradient ``grad_y`` ``[N, O, H, W]``; float32, channels-last without a copy. ``config``:
    ``(P, O, C, warps, stages)``; ``precision``: the dot products' ("tf32" or "ieee"). The positions are split
    so that about ``programs`` programs run (default :func:`programs_wanted`). The result is laid out as
    ``[O, 3, 3, C]`` (the channels-last strides of ``[O, C, 3, 3]``)."""
    block_p, block_o, block_c, warps, stages = config
    batch, channels, height, width = x.shape
    out_channels = grad_y.shape[1]
    if (x.dtype, grad_y.dtype) != (torch.float32, torch.float32) or grad_y.dim() != 4 or \
            (grad_y.shape[0], *grad_y.shape[2:]) != (batch, height, width):
        raise ValueError(f"weight_grad: expected float32 x [N, C, H, W] and grad_y [N, O, H, W], got {x.dtype} "
                         f"{tuple(x.shape)} and {grad_y.dtype} {tuple(grad_y.shape)}")
    if max(x.numel(), grad_y.numel()) >= 2**31:
        raise ValueError(f"weight_grad: 32-bit offsets, got {x.numel()} and {grad_y.numel()} elements")
    n_positions = batch * height * width
    x_rows = x.permute(0, 2, 3, 1).contiguous()  # no copy for channels-last
    grad_rows = grad_y.permute(0, 2, 3, 1).contiguous()
    tiles = triton.cdiv(out_channels, block_o) * KERNEL_SIZE ** 2 * triton.cdiv(channels, block_c)
    wanted = programs_wanted(x.device) if programs is None else programs
    splits = max(1, min(triton.cdiv(wanted, tiles), triton.cdiv(n_positions, block_p)))
    per_split = triton.cdiv(triton.cdiv(n_positions, splits), block_p) * block_p
    splits = triton.cdiv(n_positions, per_split)
    partial = x.new_empty(splits, out_channels, KERNEL_SIZE ** 2, channels)
    grid = (triton.cdiv(out_channels, block_o), KERNEL_SIZE ** 2 * triton.cdiv(channels, block_c), splits)
    chunk_attention._launch_fixed(_weight_grad_kernel, grid, x.device, x_rows, grad_rows, partial, n_positions,
                                  height, width, channels, out_channels, per_split, num_warps=warps,
                                  num_stages=stages, BLOCK_P=block_p, BLOCK_O=block_o, BLOCK_C=block_c,
                                  KERNEL=KERNEL_SIZE, PAD=PADDING, PRECISION=precision)
    grad_weight = partial.sum(0) if splits > 1 else partial[0]
    return grad_weight.view(out_channels, KERNEL_SIZE, KERNEL_SIZE, channels).permute(0, 3, 1, 2)


def weight_grad_im2col(x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """The same gradient as one matrix product: the 3x3 neighbourhoods of ``x`` written out as a ``[N H W, 9 C]``
    matrix (one copy of a strided view of the padded input), multiplied by ``grad_y``'s ``[N H W, O]`` rows
    (cuBLAS, in TF32 on CUDA: rounded as cuDNN's TF32 convolutions, whatever the matrix products' setting).
    More memory traffic than the kernel (at batch 16, 96x96, 256 channels, a 1.4 GB matrix), a plain GEMM."""
    batch, channels, height, width = x.shape
    out_channels = grad_y.shape[1]
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, PADDING, PADDING, PADDING, PADDING))  # [N, H+2, W+2, C]
    s_batch, s_row, s_col, _ = padded.stride()
    neighbourhoods = padded.as_strided((batch, height, width, KERNEL_SIZE, KERNEL_SIZE, channels),
                                       (s_batch, s_row, s_col, s_row, s_col, 1))
    columns = neighbourhoods.reshape(batch * height * width, KERNEL_SIZE * KERNEL_SIZE * channels)
    grad_rows = grad_y.permute(0, 2, 3, 1).reshape(-1, out_channels)  # a view for channels-last
    # TF32 as cuDNN's TF32 convolutions round (the training configs ask for "highest" matrix products)
    with float32_ops.float32_matmul_precision(x.device, "high"):
        grad_weight = grad_rows.t() @ columns  # [O, 9 C]
    return grad_weight.view(out_channels, KERNEL_SIZE, KERNEL_SIZE, channels).permute(0, 3, 1, 2)


def alternatives_apply(x: torch.Tensor, weight: torch.Tensor, padding: int) -> bool:
    """Whether the other methods (:func:`methods`) can stand for cuDNN's weight gradient: float32, a 3x3 kernel
    with padding 1 (stride 1) and, on CUDA, TF32 convolutions allowed (so that they round as cuDNN does); on
    the CPU plain float32 (the kernel in Triton's interpreter: tests only, nothing is timed there)."""
    return (x.dtype == weight.dtype == torch.float32 and padding == PADDING
            and tuple(weight.shape[2:]) == (KERNEL_SIZE, KERNEL_SIZE)
            and (not x.is_cuda or float32_ops.cudnn_tf32_allowed()))


def methods() -> tuple[str, ...]:
    """The weight gradient's methods besides "cudnn": "im2col" and, with Triton, each of ``CONFIGS``."""
    return ("im2col", *(config_name(config) for config in CONFIGS if triton is not None))


def _cudnn(grad_y, x, weight, padding, output_mask):
    return torch.ops.aten.convolution_backward(grad_y, x, weight, [weight.shape[0]], stride=[1, 1],
                                               padding=[padding, padding], dilation=[1, 1], transposed=False,
                                               output_padding=[0, 0], groups=1, output_mask=list(output_mask))


def config_named(method: str) -> tuple:
    """The configuration of ``CONFIGS`` that the method ``method`` (its :func:`config_name`) launches."""
    return {config_name(config): config for config in CONFIGS}[method]


def _by(method, grad_y, x, weight, padding, output_mask):
    """``convolution_backward``'s result with the weight gradient by ``method`` (of :func:`methods`)."""
    grad_x, _, grad_bias = _cudnn(grad_y, x, weight, padding, (output_mask[0], False, output_mask[2]))
    if method == "im2col":
        grad_weight = weight_grad_im2col(x, grad_y)
    else:
        grad_weight = weight_grad(x, grad_y, config_named(method), "tf32" if x.is_cuda else "ieee")
    return grad_x, grad_weight.contiguous(memory_format=_memory_format(weight)), grad_bias


def _memory_format(tensor: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if tensor.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def _relative_difference(result: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest difference in an output channel, relative to that channel's largest entry (or to 1e-3 of
    the whole gradient's, if more): an error confined to channels with small gradients (GLA's 64 match
    channels of the stacked 576, the partial last block of output channels) is not hidden by the others'
    scale, and TF32's rounding (about 1e-3 of each channel's entries) stays far below ``AGREEMENT``."""
    difference = (result - reference).abs().flatten(1).amax(1)
    scale = reference.abs().flatten(1).amax(1)
    return (difference / scale.clamp_min(1e-3 * scale.max()).clamp_min(1e-30)).max().item()


def _agreeing_candidates(grad_y, x, weight, padding) -> dict:
    """cuDNN and each other method whose weight gradient agrees with cuDNN's here (the others are left out,
    warned): what the timed choice times. Built only when it times."""
    weight_only = (False, True, False)
    reference = _cudnn(grad_y, x, weight, padding, weight_only)[1].float()
    candidates = {"cudnn": functools.partial(_cudnn, grad_y, x, weight, padding, weight_only)}
    for method in methods():
        try:
            difference = _relative_difference(_by(method, grad_y, x, weight, padding, weight_only)[1], reference)
        except Exception as error:  # noqa: BLE001 - a configuration this GPU cannot compile, or out of memory
            log.warning("dlsn: weight gradient %s failed, left out (%s: %s)", method, type(error).__name__, error)
            continue
        if not difference <= AGREEMENT:  # also NaN
            log.warning("dlsn: weight gradient %s differs from cuDNN's by %.2e of an output channel's largest "
                        "entry, left out",
                        method, difference)
            continue
        candidates[method] = functools.partial(_by, method, grad_y, x, weight, padding, weight_only)
    return candidates


def weight_grad_method(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, padding: int) -> str:
    """How :func:`convolution_backward` computes this weight gradient: "cudnn" or one of :func:`methods`."""
    if WEIGHT_GRAD_METHOD == "cudnn" or not alternatives_apply(x, weight, padding):
        return "cudnn"
    if WEIGHT_GRAD_METHOD != "timed":
        return WEIGHT_GRAD_METHOD
    if not timed_choice.timing_allowed(x.device):  # the CPU, evaluation: no key to build
        return "cudnn"
    key = ("convolution weight gradient", x.device, tuple(x.shape), tuple(weight.shape), _memory_format(x),
           _memory_format(grad_y))
    return timed_choice.fastest(key, lambda: _agreeing_candidates(grad_y, x, weight, padding), device=x.device,
                                default="cudnn")


def convolution_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, padding: int,
                         output_mask) -> tuple:
    """``aten.convolution_backward`` of ``conv2d(x, weight, bias, padding=padding)`` (stride 1, no groups):
    ``(grad_x, grad_weight, grad_bias)``, each ``None`` where ``output_mask`` says so. The weight gradient by
    the method :func:`weight_grad_method` picks, the others by cuDNN."""
    method = weight_grad_method(grad_y, x, weight, padding) if output_mask[1] else "cudnn"
    if method == "cudnn":
        return _cudnn(grad_y, x, weight, padding, output_mask)
    if method not in methods():
        raise ValueError(f"WEIGHT_GRAD_METHOD: expected 'timed', 'cudnn' or one of {list(methods())}, got {method!r}")
    return _by(method, grad_y, x, weight, padding, output_mask)
