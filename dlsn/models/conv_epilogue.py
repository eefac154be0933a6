"""A convolution followed by its element-wise epilogue in one pass: bias, ReLU, scale, residual.

    conv2d_epilogue(x, weight, bias, relu=r, scale=s, residual=res)
        = res + s * relu(conv2d(x, weight, bias))        (each part optional)

with the rounding of the eager formula in :func:`conv2d_epilogue_reference`.

Why: on an NVIDIA H200, DLSN's whole-image inference forward (x2, 360x360 input, float32, eager,
channels-last) spent about 12 of 112 ms in the convolutions' bias additions (PyTorch's cuDNN path
convolves without bias and then runs ``output.add_(bias.view(1, C, 1, 1))``, one more pass over each
256x360x360 map, in ~126 non-vectorised kernels), about 4 ms in ReLU passes and 6 ms in residual
additions. ``torch.compile`` would fuse them, but evaluation runs eagerly (whole images of varying size
must not recompile). Here the convolution runs without bias and one Triton kernel then does the rest
in a single pass over its output (:func:`conv2d_epilogue` with ``impl="fused"``).

Rounding mirrors eager PyTorch exactly (float32: bitwise the same on the GPU): the kernel computes in
float32 and rounds to the convolution's dtype where eager stores an intermediate tensor (after the bias
addition and after the scaling), so bfloat16 under autocast gives the same bits as well. The residual
addition is done in float32 and stored in the promoted dtype (float32 for autocast's float32 ``x``).
(On the CPU, oneDNN adds a bfloat16 convolution's bias before its single rounding, so there the
eager reference rounds once where the GPU's rounds twice; the fused kernel follows the GPU.)

``impl="auto"`` (the default) fuses only in inference on CUDA tensors of a layout the kernel handles
(channels-last, see :func:`_wants_fused`); training, ``torch.compile`` and everything else get the eager
reference unchanged. On CPU tensors, ``impl="fused"`` runs the kernel in Triton's interpreter (tests).
A fused kernel that fails to compile or launch warns once and is not used again in the process.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dlsn.models import chunk_attention

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path needs no Triton
    triton = None

IMPLS = ("auto", "fused", "reference")

# Dtypes the kernel reads and writes (it computes in float32, so float64 stays on the reference path).
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Elements per program of the kernel's 1-D grid.
BLOCK = 1024
# How the kernel is compiled for the GPU. No fused multiply-adds: eager rounds scale * t before adding the
# residual, and a fused a * b + c rounds once.
GPU_LAUNCH_OPTIONS = dict(num_warps=4, enable_fp_fusion=False)


# --------------------------------------------------------------------------------------------
# Reference: the eager formula, what training and torch.compile see.
# --------------------------------------------------------------------------------------------

def conv2d_epilogue_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
                              padding: int | Sequence[int] = 1, relu: bool = False,
                              residual: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    output = F.conv2d(x, weight, bias, padding=padding)
    if relu:
        # In place, as the nn.ReLU(inplace=True) this replaces: the convolution's output is a fresh tensor.
        output = torch.relu_(output)
    if scale != 1.0:
        output = scale * output
    if residual is not None:
        _check_residual(residual, output)
        output = residual + output
    return output


def _check_residual(residual: torch.Tensor, output: torch.Tensor) -> None:
    # Also on the reference path: a residual that merely broadcasts would silently give another result.
    if residual.shape != output.shape:
        raise ValueError(f"conv2d_epilogue: residual must have the convolution output's shape "
                         f"{tuple(output.shape)}, got {tuple(residual.shape)}")


# --------------------------------------------------------------------------------------------
# The Triton kernel. A plain function, compiled (CUDA) or interpreted (CPU) on first use by _kernel().
# Tensors are channels-last dense [N, C, H, W]: flat offset o holds channel o % C.
# --------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rounded(value, DTYPE: tl.constexpr):
        """Float32 ``value`` rounded to ``DTYPE`` (to nearest, ties to even), returned as float32."""
        if DTYPE == tl.bfloat16:
            # Bit arithmetic rather than a cast: Triton's interpreter truncates float32 -> bfloat16 casts
            # where the GPU (and PyTorch) round to nearest even; this rounds to nearest even in both.
            bits = value.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            rounded = tl.where(value != value, value, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
        else:
            rounded = value.to(DTYPE).to(tl.float32)
        return rounded

    @triton.jit
    def _epilogue_on_block(Y, BIAS, RESIDUAL, OUT, offsets, mask, channels, scale, HAS_BIAS: tl.constexpr,
                           RELU: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
        value = tl.load(Y + offsets, mask=mask).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(BIAS + offsets % channels, mask=mask).to(tl.float32)
            # Eager stores conv + bias in the convolution's dtype: round as it does.
            value = _rounded(value + bias, Y.dtype.element_ty)
        if RELU:
            value = tl.where(value < 0.0, 0.0, value)  # keeps NaN, as torch.relu does
        if HAS_SCALE:
            value = _rounded(value * scale, Y.dtype.element_ty)  # eager stores scale * t in that dtype too
        if HAS_RESIDUAL:
            value = tl.load(RESIDUAL + offsets, mask=mask).to(tl.float32) + value
        # Rounded first, the value converts exactly (the cast itself need not round to nearest even).
        tl.store(OUT + offsets, _rounded(value, OUT.dtype.element_ty).to(OUT.dtype.element_ty), mask=mask)

    def _epilogue_kernel(Y, BIAS, RESIDUAL, OUT, numel, channels, scale, HAS_BIAS: tl.constexpr,
                         RELU: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                         WIDE_OFFSETS: tl.constexpr, BLOCK: tl.constexpr):
        program = tl.program_id(0)
        if WIDE_OFFSETS:  # offsets up to numel + BLOCK would overflow int32
            program = program.to(tl.int64)
        start = program * BLOCK
        offsets = start + tl.arange(0, BLOCK)
        # numel is not specialised on (see _kernel), so a mask `offsets < numel` could not be proven
        # constant over aligned groups and would make every access scalar: full blocks go without one.
        if start + BLOCK <= numel:
            _epilogue_on_block(Y, BIAS, RESIDUAL, OUT, offsets, None, channels, scale,
                               HAS_BIAS, RELU, HAS_SCALE, HAS_RESIDUAL)
        else:
            _epilogue_on_block(Y, BIAS, RESIDUAL, OUT, offsets, offsets < numel, channels, scale,
                               HAS_BIAS, RELU, HAS_SCALE, HAS_RESIDUAL)


def triton_available() -> bool:
    return triton is not None


def _kernel(interpreted: bool):
    """The epilogue kernel compiled for the GPU, or run by Triton's interpreter (CPU tensors); as the
    chunk-attention kernels, it is not specialised on ``numel``, which varies with the image."""
    return chunk_attention._kernel(_epilogue_kernel, interpreted)


def _launch_epilogue(y: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
                     output: torch.Tensor, relu: bool, scale: float) -> None:
    """Run the kernel: ``output = residual + scale * relu(y + bias)`` (``output`` may be ``y``)."""
    numel = y.numel()
    if numel == 0:
        return
    interpreted = y.device.type != "cuda"
    options = dict(HAS_BIAS=bias is not None, RELU=relu, HAS_SCALE=scale != 1.0, HAS_RESIDUAL=residual is not None,
                   WIDE_OFFSETS=numel + BLOCK >= 2**31, BLOCK=BLOCK)
    if interpreted:
        # Outside TRITON_INTERPRET=1 an interpreted kernel can call the @triton.jit helpers above only
        # under chunk_attention's patch of them (see there).
        with chunk_attention._library_functions_interpreted():
            _kernel(True)[(triton.cdiv(numel, BLOCK),)](y, bias, residual, output, numel, y.shape[1], scale,
                                                          **options)
        return
    with torch.cuda.device(y.device):
        _kernel(False)[(triton.cdiv(numel, BLOCK),)](y, bias, residual, output, numel, y.shape[1], scale,
                                                       **GPU_LAUNCH_OPTIONS, **options)


# --------------------------------------------------------------------------------------------
# When to fuse, and giving up after a failure.
# --------------------------------------------------------------------------------------------

_failure: str | None = None


def fused_kernel_failure() -> str | None:
    """Why the fused epilogue was given up in this process (``None`` while it works or is unused)."""
    return _failure


def _give_up(error: BaseException) -> None:
    global _failure
    if _failure is None:
        _failure = f"{type(error).__name__}: {error}".strip()
        warnings.warn(f"dlsn: the fused convolution-epilogue kernel failed ({_failure}); convolutions add "
                      f"their bias, ReLU and residual in eager PyTorch from now on (same results, slower)",
                      RuntimeWarning, stacklevel=3)


def _channels_last(tensor: torch.Tensor) -> bool:
    return tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last)


def _fusable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             residual: torch.Tensor | None) -> bool:
    """Whether the kernel can compute this call: inference (no autograd), not being traced by
    torch.compile, and a layout it handles (a channels-last ``x`` gives a channels-last output)."""
    if torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual)):
        return False
    if not _channels_last(x) or weight.dim() != 4 or (bias is not None and bias.dim() != 1):
        return False
    return residual is None or (_channels_last(residual) and residual.dtype in FUSED_DTYPES)


def _wants_fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
                 *, on_gpu: bool | None = None) -> bool:
    """``impl="auto"``'s choice: fused on the GPU (``on_gpu``, by default ``x.is_cuda``) when Triton is
    importable, the kernel has not failed before and :func:`_fusable` holds."""
    on_gpu = x.is_cuda if on_gpu is None else on_gpu
    return on_gpu and triton is not None and _failure is None and _fusable(x, weight, bias, residual)


# --------------------------------------------------------------------------------------------
# The public function.
# --------------------------------------------------------------------------------------------

def _fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding, relu: bool,
           residual: torch.Tensor | None, scale: float, *, give_up_on_failure: bool) -> torch.Tensor | None:
    """The convolution without bias, then the kernel. ``None`` where the convolution's output does not
    suit the kernel (layout, dtype) or, with ``give_up_on_failure``, the kernel failed: the caller then
    computes the reference."""
    y = F.conv2d(x, weight, None, padding=padding)
    if residual is not None:
        _check_residual(residual, y)
    if not _channels_last(y) or y.dtype not in FUSED_DTYPES:
        return None
    if bias is not None:
        bias = bias.to(y.dtype).contiguous()  # eager (autocast) adds the bias in the convolution's dtype
    output_dtype = y.dtype if residual is None else torch.promote_types(residual.dtype, y.dtype)
    output = y if output_dtype == y.dtype else torch.empty_like(y, dtype=output_dtype,
                                                                memory_format=torch.channels_last)
    if not give_up_on_failure:
        _launch_epilogue(y, bias, residual, output, relu, float(scale))
        return output
    try:
        _launch_epilogue(y, bias, residual, output, relu, float(scale))
    except Exception as error:  # noqa: BLE001 - any compile or launch failure: do not use the kernel again
        _give_up(error)
        return None
    return output


def conv2d_epilogue(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
                    padding: int | Sequence[int] = 1, relu: bool = False, residual: torch.Tensor | None = None,
                    scale: float = 1.0, impl: str = "auto") -> torch.Tensor:
    """``residual + scale * relu(conv2d(x, weight, bias, padding=padding))``, rounded as eagerly.

    ``relu``, ``scale`` (skipped when 1.0) and ``residual`` (the output's shape) are optional. ``impl``:
    ``"reference"`` the eager formula; ``"fused"`` the convolution without bias and one Triton kernel
    for the rest (the reference where autograd, torch.compile or the layout rule it out: the kernel
    needs a channels-last ``x`` and ``residual``); ``"auto"`` fused only on CUDA tensors (see
    :func:`_wants_fused`), warning once and falling back to the reference if the kernel fails.
    """
    if impl not in IMPLS:
        raise ValueError(f"conv2d_epilogue: impl must be one of {IMPLS}, got {impl!r}")
    fused = None
    if impl == "fused":
        if triton is None:
            raise RuntimeError("conv2d_epilogue: impl='fused' needs the triton package, which is not importable")
        if _fusable(x, weight, bias, residual):
            fused = _fused(x, weight, bias, padding, relu, residual, scale, give_up_on_failure=False)
    elif impl == "auto" and _wants_fused(x, weight, bias, residual):
        fused = _fused(x, weight, bias, padding, relu, residual, scale, give_up_on_failure=True)
    if fused is not None:
        return fused
    return conv2d_epilogue_reference(x, weight, bias, padding=padding, relu=relu, residual=residual, scale=scale)
