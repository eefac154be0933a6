"""Operations that are true float32 on every device: the ops GLA's bucket assignment depends on.

GLA assigns positions to hash buckets with an argmax over ``match @ rotation``. On GPUs PyTorch lets
float32 convolutions use TF32 by default (``torch.backends.cudnn.allow_tf32``), and matrix products
when ``torch.set_float32_matmul_precision("high")``; TF32's 10-bit mantissa moves positions between
buckets (on an H200 the layer's output differed from the published one by up to 0.027 at 96x96).

* ``conv2d_float32`` (custom op ``dlsn::conv2d_float32``, with autograd): the match embedding's
  convolution with cuDNN TF32 switched off just for it (its backward keeps the TF32 setting in force:
  gradients do not move buckets). ``FLOAT32_CONV_METHOD = "split_tf32"`` computes it instead on
  TF32 tensor cores to float32 accuracy: with ``x = x_hi + x_lo`` and ``w = w_hi + w_lo``, where the
  ``_hi`` parts are exactly representable in TF32 (10 mantissa bits) and the ``_lo`` parts are the
  exact float32 remainders, ``x * w = x_hi w_hi + x_lo w_hi + x_hi w_lo`` up to ``x_lo w_lo``
  (about ``2^-22`` of each product): two TF32 convolutions (the ``x_hi`` products share one, with the
  weights stacked) instead of a float32 one, which GPUs run without tensor cores (an H200 took
  0.45 ms per GLA layer at the training size). By default (``"timed"``) the training steps time both
  methods on first use and keep the faster (:mod:`dlsn.models.timed_choice`); elsewhere (evaluation)
  large inputs take the split products and small ones cuDNN without TF32 (``SPLIT_TF32_MIN_POSITIONS``).
  ``check_fused_gla.py`` measures both methods' error and time. On CUDA two small Triton kernels do the
  element-wise work around the two convolutions, each in one pass: the split of ``x`` (and of ``w``) into
  its halves, and the sum of the partial products with the bias (:func:`tf32_split_fused`,
  :func:`split_products_sum_fused`; bitwise the PyTorch formulas, which take three passes each).
* ``projections_float32`` (``dlsn::projections_float32``, no autograd): the hash projections
  ``einsum("nld,tdb->ntlb")`` with TF32 matrix products switched off just for it.
* ``relu_convolution_groups``: GLA's three embedding convolutions with their ReLUs in eager training,
  the match one through ``conv2d_float32`` where it runs apart, as one autograd node whose backward runs
  one convolution backward for all three (see its docstring).

They are ``torch.library`` custom ops rather than context managers so that ``torch.compile`` keeps
the setting (a traced graph would drop a Python-level flag change). On the CPU they are the plain
float32 operations.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
import torch.nn.functional as F

# chunk_attention imports this module, conv_weight_grad imports chunk_attention: used in calls only
from dlsn.models import chunk_attention, conv_weight_grad, timed_choice

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch formulas need no Triton
    triton = None


def _cudnn_tf32_switch() -> tuple[object, str]:
    """Where cuDNN's float32-convolution TF32 switch is set: torch >= 2.9's per-operation
    ``cudnn.conv.fp32_precision`` ("tf32", "ieee", or "none": follow the global one), else ``cudnn.allow_tf32``."""
    cudnn_conv = getattr(torch.backends.cudnn, "conv", None)
    if cudnn_conv is not None and hasattr(cudnn_conv, "fp32_precision"):
        return cudnn_conv, "fp32_precision"
    return torch.backends.cudnn, "allow_tf32"


def cudnn_tf32_allowed() -> bool:
    """Whether cuDNN may run float32 convolutions in TF32 now, whichever API of the setting was used."""
    owner, name = _cudnn_tf32_switch()
    if name == "fp32_precision" and owner.fp32_precision != "none":
        return owner.fp32_precision == "tf32"
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # torch >= 2.9 refuses to answer when old and new settings were mixed
        return False


@contextlib.contextmanager
def _cudnn_tf32(device: torch.device, enabled: bool):
    """cuDNN float32 convolutions with TF32 ``enabled`` or not, whatever the user's setting, restored after."""
    if device.type != "cuda":
        yield
        return
    owner, name = _cudnn_tf32_switch()
    value = ("tf32" if enabled else "ieee") if name == "fp32_precision" else enabled
    previous = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, previous)


@contextlib.contextmanager
def float32_matmul_precision(device: torch.device, precision: str):
    """cuBLAS float32 matrix products at ``precision`` ("highest": true float32, "high": TF32) on CUDA, whatever
    the user's setting, put back after; the CPU's are left alone. Through the legacy setting: torch >= 2.9
    refuses cuBLAS calls when old and new ones disagree."""
    try:
        previous = torch.get_float32_matmul_precision()
    except RuntimeError:  # the user mixed both APIs; leave their setting alone
        previous = None
    if device.type != "cuda" or previous in (None, precision):
        yield
        return
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


@torch.library.custom_op("dlsn::projections_float32", mutates_args=())
def projections_float32(match: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """``einsum("nld,tdb->ntlb", match, rotations)`` in true float32: ``[N, T, L, b]``, contiguous."""
    with float32_matmul_precision(match.device, "highest"):
        return torch.einsum("nld,tdb->ntlb", match.float(), rotations.float()).contiguous()


@projections_float32.register_fake
def _(match, rotations):
    return match.new_empty(match.shape[0], rotations.shape[0], match.shape[1], rotations.shape[2],
                           dtype=torch.float32)


def _memory_format(tensor: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if tensor.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def _in_layout(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` with exactly the strides of ``like`` (a meta tensor: what the fake implementations
    promise to ``torch.compile``), copied only if they differ."""
    if tensor.stride() == like.stride():
        return tensor
    return torch.empty_strided(like.shape, like.stride(), dtype=tensor.dtype, device=tensor.device).copy_(tensor)


# How conv2d_float32 computes on CUDA: "ieee" (cuDNN with TF32 off) or "split_tf32" (see the module
# docstring); both are float32-accurate. "timed": the faster of the two, timed on first use at each
# size where cuDNN's autotuner is on (the training steps; dlsn.models.timed_choice); elsewhere
# (evaluation: images of varying size, no timing) "split_tf32" from SPLIT_TF32_MIN_POSITIONS positions
# (batch x height x width) on, "ieee" below. On an H200 (2026-11-27) the timed choice kept "ieee" at
# 1 x 48x48 (0.18 against 0.33 ms: a few small launches) and "split_tf32" at 16 x 48x48 = 36864
# positions (0.27-0.31 against 0.49 ms), and the untimed "ieee" took 0.92 ms per layer of a 360x360
# image (all before the split's element-wise kernels, 6 operations where the formulas took 12).
# The CPU always computes plain float32.
FLOAT32_CONV_METHODS = ("ieee", "split_tf32")
FLOAT32_CONV_METHOD_CHOICES = (*FLOAT32_CONV_METHODS, "timed")
FLOAT32_CONV_METHOD = "timed"
SPLIT_TF32_MIN_POSITIONS = 32768


def tf32_split(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``tensor = high + low`` (float32): ``high`` rounded to nearest at TF32's 10 mantissa bits (the low
    13 bits of its float32 pattern cleared), ``low`` the exact remainder (``|low| <= 2^-11 |tensor|``)."""
    bits = tensor.float().contiguous(memory_format=_memory_format(tensor)).view(torch.int32)
    high = ((bits + 0x1000) & -0x2000).view(torch.float32)
    return high, tensor - high


def split_products_sum(high_products: torch.Tensor, low_products: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``conv2d(x, w) + bias`` from the split convolution's partial products: ``high_products`` ``[N, 2C, H, W]``
    holds ``x_hi w_hi`` and ``x_hi w_lo``, ``low_products`` ``[N, C, H, W]`` ``x_lo w_hi``. The small terms
    first: ``x_lo w_hi + x_hi w_lo``, then ``x_hi w_hi`` and the bias."""
    out_channels = low_products.shape[1]
    small = low_products + high_products[:, out_channels:]
    return (small + high_products[:, :out_channels]) + bias.view(1, -1, 1, 1)


def split_tf32_conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int,
                      conv2d=F.conv2d, kernels: bool | None = None) -> torch.Tensor:
    """``conv2d(input, weight) + bias`` from two convolutions of TF32-exact halves (module docstring);
    ``conv2d`` computes each (tests pass one that rounds its operands to TF32, as tensor cores do).
    ``kernels``: the split and the sum by the Triton kernels (on CPU tensors in Triton's interpreter) or
    by the PyTorch formulas; by default the kernels on CUDA while they work (after a failure, warned once,
    the formulas: the same numbers)."""
    fallback = kernels is None
    split, products_sum = tf32_split, split_products_sum
    if split_kernels_usable(input) if fallback else kernels:
        split = functools.partial(_fused_or_formula, tf32_split_fused, tf32_split, _split_takes, fallback=fallback)
        products_sum = functools.partial(_fused_or_formula, split_products_sum_fused, split_products_sum, _sum_takes,
                                         fallback=fallback)
    input_high, input_low = split(input)
    weight_high, weight_low = split(weight)
    high_products = conv2d(input_high, torch.cat([weight_high, weight_low]), None, padding=padding)
    return products_sum(high_products, conv2d(input_low, weight_high, None, padding=padding), bias)


# --------------------------------------------------------------------------------------------
# The split convolution's element-wise work in one pass each (CUDA; CPU tensors: Triton's interpreter).
# On an H200 at batch 16, 96x96 the PyTorch formulas move about 1.4 GB per GLA layer (two integer
# passes and a subtraction over x, three additions over the products), the kernels about 0.6 GB.
# --------------------------------------------------------------------------------------------

# Elements per program of the split and rows (positions) per program of the sum; neither is timed.
SPLIT_BLOCK, SUM_BLOCK_ROWS, SPLIT_WARPS = 1024, 16, 4

if triton is not None:

    @triton.jit
    def _split_block(X, HIGH, LOW, offsets, mask):
        value = tl.load(X + offsets, mask=mask)
        high = ((value.to(tl.int32, bitcast=True) + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
        tl.store(HIGH + offsets, high, mask=mask)
        tl.store(LOW + offsets, value - high, mask=mask)

    def _tf32_split_kernel(X, HIGH, LOW, numel, BLOCK: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * BLOCK
        offsets = start + tl.arange(0, BLOCK)
        # Full blocks without a mask: numel is not specialised on, and a mask the compiler cannot prove
        # constant over aligned groups would make every access scalar (as in conv_epilogue).
        if start + BLOCK <= numel:
            _split_block(X, HIGH, LOW, offsets, None)
        else:
            _split_block(X, HIGH, LOW, offsets, offsets < numel)

    def _split_products_sum_kernel(HIGH_PRODUCTS, LOW_PRODUCTS, BIAS, OUT, n_rows, channels,
                                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        columns = tl.arange(0, BLOCK_C)
        valid = (rows < n_rows)[:, None] & (columns < channels)[None, :]
        high = HIGH_PRODUCTS + rows[:, None] * (2 * channels) + columns[None, :]
        small = tl.load(LOW_PRODUCTS + rows[:, None] * channels + columns[None, :], mask=valid) + tl.load(
            high + channels, mask=valid)
        total = (small + tl.load(high, mask=valid)) + tl.load(BIAS + columns, mask=columns < channels)[None, :]
        tl.store(OUT + rows[:, None] * channels + columns[None, :], total, mask=valid)


def _dense(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous() or tensor.is_contiguous(memory_format=torch.channels_last)


def tf32_split_fused(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`tf32_split` of a dense float32 tensor by one kernel: bitwise the same halves, same layout."""
    if tensor.dtype != torch.float32 or not _dense(tensor):
        raise ValueError(f"tf32_split_fused: expected a dense float32 tensor, got {tensor.dtype} with strides "
                         f"{tensor.stride()}")
    high, low = torch.empty_like(tensor), torch.empty_like(tensor)
    if tensor.numel():
        chunk_attention._launch_fixed(_tf32_split_kernel, (triton.cdiv(tensor.numel(), SPLIT_BLOCK),), tensor.device,
                                      tensor, high, low, tensor.numel(), num_warps=SPLIT_WARPS, BLOCK=SPLIT_BLOCK)
    return high, low


def split_products_sum_fused(high_products: torch.Tensor, low_products: torch.Tensor,
                             bias: torch.Tensor) -> torch.Tensor:
    """:func:`split_products_sum` by one kernel, bitwise the same (the same float32 additions in the same
    order), for channels-last float32 products; channels-last float32 output."""
    batch, channels, height, width = low_products.shape
    layouts = [(name, tensor) for name, tensor in (("high_products", high_products), ("low_products", low_products))
               if tensor.dtype != torch.float32 or not tensor.is_contiguous(memory_format=torch.channels_last)]
    if layouts or tuple(high_products.shape) != (batch, 2 * channels, height, width) or bias.shape != (channels,):
        raise ValueError(f"split_products_sum_fused: expected channels-last float32 [N, 2C, H, W] and [N, C, H, W] "
                         f"products and a [C] bias, got {tuple(high_products.shape)}, {tuple(low_products.shape)} "
                         f"and {tuple(bias.shape)}"
                         + "".join(f"; {name}: {tensor.dtype}, strides {tensor.stride()}" for name, tensor in layouts))
    output = torch.empty_like(low_products)
    n_rows = batch * height * width
    if n_rows:
        chunk_attention._launch_fixed(
            _split_products_sum_kernel, (triton.cdiv(n_rows, SUM_BLOCK_ROWS),), low_products.device, high_products,
            low_products, bias.float().contiguous(), output, n_rows, channels, num_warps=SPLIT_WARPS,
            BLOCK_R=SUM_BLOCK_ROWS, BLOCK_C=chunk_attention._power_of_two(channels))
    return output


_failure: str | None = None


def split_kernel_failure() -> str | None:
    """Why the split convolution's kernels were given up in this process (``None`` while they work)."""
    return _failure


def split_kernels_usable(tensor: torch.Tensor) -> bool:
    """Whether :func:`split_tf32_conv2d` uses its kernels by default: CUDA, Triton there, no failure yet."""
    return tensor.is_cuda and triton is not None and _failure is None


def _split_takes(tensor: torch.Tensor) -> bool:
    return tensor.dtype == torch.float32 and _dense(tensor)


def _sum_takes(high_products: torch.Tensor, low_products: torch.Tensor, bias: torch.Tensor) -> bool:
    # A contiguous input's convolutions give contiguous products: the formula sums those.
    return all(products.dtype == torch.float32 and products.is_contiguous(memory_format=torch.channels_last)
               for products in (high_products, low_products))


def _fused_or_formula(fused, formula, takes, *tensors, fallback: bool):
    """``fused(*tensors)`` where ``takes(*tensors)``; ``formula(*tensors)`` otherwise and, with ``fallback``,
    from the first failure on (warned once)."""
    global _failure
    if (_failure is None or not fallback) and takes(*tensors):
        try:
            return fused(*tensors)
        except Exception as error:  # noqa: BLE001 - any compile or launch failure: do not use the kernels again
            if not fallback:
                raise
            _failure = f"{type(error).__name__}: {error}".strip()
            warnings.warn(f"dlsn: the split float32 convolution's kernels failed ({_failure}); it splits and sums "
                          f"with PyTorch from now on (same results, slower)", RuntimeWarning, stacklevel=3)
    return formula(*tensors)


def _conv2d_float32_by(method: str, input, weight, bias, padding: int) -> torch.Tensor:
    if method == "split_tf32":
        with _cudnn_tf32(input.device, enabled=True):
            return split_tf32_conv2d(input.float(), weight.float(), bias.float(), padding)
    with _cudnn_tf32(input.device, enabled=False):
        return F.conv2d(input.float(), weight.float(), bias.float(), padding=padding)


def float32_conv_method(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int) -> str:
    """The method ``conv2d_float32`` uses for these CUDA operands: ``FLOAT32_CONV_METHOD``, "timed" resolved."""
    if FLOAT32_CONV_METHOD != "timed":
        return FLOAT32_CONV_METHOD
    key = ("float32 convolution", input.device, input.dtype, tuple(input.shape), tuple(weight.shape),
           _memory_format(input))
    batch, _, height, width = input.shape
    untimed = "split_tf32" if batch * height * width >= SPLIT_TF32_MIN_POSITIONS else "ieee"
    return timed_choice.fastest(
        key, lambda: {method: functools.partial(_conv2d_float32_by, method, input, weight, bias, padding)
                      for method in FLOAT32_CONV_METHODS},
        device=input.device, default=untimed)


def _conv2d_float32(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int) -> torch.Tensor:
    # Autocast off here: the operations inside a custom op (and an autograd.Function's forward) still see
    # the caller's autocast, which would run this convolution in bfloat16.
    with torch.autocast(input.device.type, enabled=False):
        method = float32_conv_method(input, weight, bias, padding) if input.is_cuda else "ieee"
        return _conv2d_float32_by(method, input, weight, bias, padding)


def conv2d_float32(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int) -> torch.Tensor:
    """``F.conv2d(input, weight, bias, padding=padding)`` to float32 accuracy, under autocast too (TF32
    off, or on CUDA split products on TF32 tensor cores: ``FLOAT32_CONV_METHOD``); float32 output in the
    input's memory format (channels-last stays channels-last). The custom op ``dlsn::conv2d_float32``
    under ``torch.compile``; in eager mode an autograd.Function (on the CPU a custom op's dispatch cost
    about 130 us more per call, on a path that is bound by the host at batch 1)."""
    if torch.compiler.is_compiling():
        return conv2d_float32_op(input, weight, bias, padding)
    return _Conv2dFloat32.apply(input, weight, bias, padding)


@torch.library.custom_op("dlsn::conv2d_float32", mutates_args=())
def conv2d_float32_op(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int) -> torch.Tensor:
    """:func:`conv2d_float32` as a custom op, its output strides exactly those of its fake implementation."""
    return _in_layout(_conv2d_float32(input, weight, bias, padding), _empty_output(input, weight, padding, device="meta"))


def _empty_output(input, weight, padding, device=None):
    batch, _, height, width = input.shape
    kernel_height, kernel_width = weight.shape[-2:]
    shape = (batch, weight.shape[0], height + 2 * padding - kernel_height + 1, width + 2 * padding - kernel_width + 1)
    return torch.empty(shape, dtype=torch.float32, device=device or input.device, memory_format=_memory_format(input))


@conv2d_float32_op.register_fake
def _(input, weight, bias, padding):
    return _empty_output(input, weight, padding)


def _conv2d_float32_gradients(grad_output, input, weight, bias, padding):
    # Only the forward decides buckets: the gradients run with the user's TF32 setting like every other
    # convolution's (in true float32, cuDNN took FFT and NCHW kernels: ~0.5 ms per GLA layer on an H200).
    grads = torch.ops.aten.convolution_backward(
        grad_output.float(), input.float(), weight.float(), [weight.shape[0]], stride=[1, 1],
        padding=[padding, padding], dilation=[1, 1], transposed=False, output_padding=[0, 0], groups=1,
        output_mask=[True, True, True])
    return tuple(grad.to(like.dtype) for grad, like in zip(grads, (input, weight, bias)))


@torch.library.custom_op("dlsn::conv2d_float32_backward", mutates_args=())
def _conv2d_float32_backward(grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor, padding: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_in_layout(grad, torch.empty_like(like, device="meta"))
                 for grad, like in zip(_conv2d_float32_gradients(grad_output, input, weight, bias, padding),
                                       (input, weight, bias)))


@_conv2d_float32_backward.register_fake
def _(grad_output, input, weight, bias, padding):
    return torch.empty_like(input), torch.empty_like(weight), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    input, weight, bias, padding = inputs
    ctx.save_for_backward(input, weight, bias)
    ctx.padding = padding


def _backward(ctx, grad_output):
    input, weight, bias = ctx.saved_tensors
    return (*_conv2d_float32_backward(grad_output, input, weight, bias, ctx.padding), None)


conv2d_float32_op.register_autograd(_backward, setup_context=_setup_context)


def _conv2d_float32_like_input(input, weight, bias, padding: int) -> torch.Tensor:
    output = _conv2d_float32(input, weight, bias, padding)
    memory_format = _memory_format(input)
    return output if output.is_contiguous(memory_format=memory_format) else output.contiguous(
        memory_format=memory_format)


class _Conv2dFloat32(torch.autograd.Function):
    """The eager path of :func:`conv2d_float32`: the same computation without a custom op's dispatch."""

    @staticmethod
    def forward(ctx, input, weight, bias, padding):
        ctx.save_for_backward(input, weight, bias)
        ctx.padding = padding
        return _conv2d_float32_like_input(input, weight, bias, padding)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias = ctx.saved_tensors
        return (*_conv2d_float32_gradients(grad_output, input, weight, bias, ctx.padding), None)


# --------------------------------------------------------------------------------------------
# GLA's embedding convolutions in training: one autograd node, one convolution backward.
# --------------------------------------------------------------------------------------------

def match_convolution_apart(x: torch.Tensor) -> bool:
    """Whether GLA computes its match embedding apart from the other embeddings, in true float32
    (:func:`conv2d_float32`): on CUDA, where float32 convolutions may use TF32, and under autocast. On the
    CPU without autocast every convolution is plain float32 and the match embedding joins the others."""
    return x.is_cuda or torch.is_autocast_enabled(x.device.type)


def relu_convolutions_in_one_node(x: torch.Tensor, *parameters: torch.Tensor) -> bool:
    """Whether GLA's embeddings take :func:`relu_convolution_groups`: eager training (autograd records
    and something requires a gradient) in float32 on CUDA, any dtype on the CPU; not under autocast, where
    the match convolution's backward runs in float32 and the others' in half precision (two backward
    convolutions of two dtypes), nor under ``torch.compile``, which sees the custom ops and fuses the rest."""
    return (torch.is_grad_enabled() and any(tensor.requires_grad for tensor in (x, *parameters))
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled(x.device.type)
            and (x.dtype == torch.float32 or not x.is_cuda))


class _ReluConvolutionGroups(torch.autograd.Function):
    """:func:`relu_convolution_groups`. Forward: the convolution(s) and the ReLUs in place; the groups are
    views of the (one or two) output maps. Backward: the groups' gradients masked by their ReLU straight
    into one ``[N, sum(sizes), H, W]`` buffer, then one ``convolution_backward`` for every group."""

    @staticmethod
    def forward(ctx, x, weight, bias, sizes, padding, first_in_float32):
        ctx.set_materialize_grads(False)  # a group without a gradient costs a zero fill, not a zero tensor
        if first_in_float32:
            first = sizes[0]
            maps = (torch.relu_(_conv2d_float32_like_input(x, weight[:first], bias[:first], padding)),
                    torch.relu_(F.conv2d(x, weight[first:], bias[first:], padding=padding)))
        else:
            maps = (torch.relu_(F.conv2d(x, weight, bias, padding=padding)),)
        ctx.save_for_backward(x, weight, *maps)
        ctx.sizes, ctx.padding = list(sizes), padding
        return _groups(maps, sizes)

    @staticmethod
    def backward(ctx, *grad_groups):
        x, weight, *maps = ctx.saved_tensors
        batch, _, height, width = maps[0].shape
        grad = torch.empty((batch, weight.shape[0], height, width), dtype=x.dtype, device=x.device,
                           memory_format=_memory_format(maps[0]))
        for grad_group, output, into in zip(grad_groups, _groups(maps, ctx.sizes), grad.split(ctx.sizes, dim=1)):
            if grad_group is None:
                into.zero_()
            else:
                torch.ops.aten.threshold_backward.grad_input(grad_group, output, 0, grad_input=into)
        # The weight gradient by cuDNN, or by another method where the timed choice found one faster
        grad_x, grad_weight, grad_bias = conv_weight_grad.convolution_backward(
            grad, x, weight, ctx.padding, ctx.needs_input_grad[:3])
        return grad_x, grad_weight, grad_bias, None, None, None


def _groups(maps: tuple[torch.Tensor, ...], sizes) -> tuple[torch.Tensor, ...]:
    if len(maps) == 1:
        return maps[0].split(sizes, dim=1)
    return (maps[0], *maps[1].split(sizes[1:], dim=1))


def relu_convolution_groups(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, sizes, *,
                            padding: int, first_in_float32: bool) -> tuple[torch.Tensor, ...]:
    """``relu(conv2d(x, weight, bias, padding=padding))`` cut into groups of ``sizes`` output channels, as
    one autograd node: GLA's match, value and score embeddings, whose weights are stacked.

    With ``first_in_float32`` the first group is convolved apart by :func:`conv2d_float32` (the match
    embedding, whose buckets must not depend on TF32 rounding) and the others in one convolution; otherwise
    all in one. Either way the backward masks every group's gradient by its ReLU straight into one stacked
    gradient and runs one ``convolution_backward`` for all of them (with the TF32 setting in force, as
    :func:`conv2d_float32`'s backward): the separate nodes ran two backward convolutions on CUDA and added
    their input gradients, and concatenated the stacked groups' gradients before their ReLU's backward.
    Its weight gradient is cuDNN's unless the timed choice of :func:`conv_weight_grad.convolution_backward`
    measured another method faster at that size (a Triton kernel or im2col + cuBLAS; float32 training on
    CUDA, cuDNN's autotuner on).
    At batch 16, 96x96, 256 channels that is about 2.1 GB of memory traffic per layer where this is 1.0 GB,
    and six operations where this is four. Groups without a gradient get zeros. The result (outputs and
    gradients) is the separate nodes' to rounding; on the CPU bitwise.
    """
    if first_in_float32 and len(sizes) < 2:
        raise ValueError(f"relu_convolution_groups: first_in_float32 needs at least two groups, got sizes {list(sizes)}")
    if sum(sizes) != weight.shape[0]:
        raise ValueError(f"relu_convolution_groups: sizes {list(sizes)} must add up to the weight's "
                         f"{weight.shape[0]} output channels")
    return _ReluConvolutionGroups.apply(x, weight, bias, tuple(sizes), padding, first_in_float32)
