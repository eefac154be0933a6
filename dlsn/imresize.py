"""MATLAB-compatible image resizing (``imresize``), vectorised, for numpy and torch.

Why our own implementation: SR benchmarks are defined by MATLAB's ``imresize`` (bicubic, a = -0.5,
antialiasing when shrinking, symmetric borders). OpenCV, PIL and ``torch.nn.functional.interpolate``
all differ from it (no antialiasing, other border rules or a = -0.75), which moves PSNR by tenths of
a dB. The PyPI package ``resize-right`` targets the same semantics but has had a single 0.0.x
release line and no maintenance, so we keep a small, tested implementation here.

Algorithm (MATLAB ``imresize.m`` semantics, per axis):

* output length ``out = ceil(in * scale)``; output pixel ``x`` (1-based) maps to input coordinate
  ``u = x / scale + 0.5 * (1 - 1 / scale)`` (pixel centres aligned);
* kernel ``h``: bicubic ``cubic(t)`` with a = -0.5, or the box kernel for ``nearest``; when shrinking
  with antialiasing the kernel is stretched: ``h(t) = scale * cubic(scale * t)`` and its support
  widens to ``4 / scale``;
* the taps ``floor(u - width / 2) + 0 .. ceil(width) + 1`` are weighted with ``h(u - tap)``, the
  weights of each output pixel normalised to sum 1, and out-of-range taps mirrored
  (symmetric padding: ``... 2 1 | 1 2 ... n | n n-1 ...``).

All of that is folded into one dense ``[out, in]`` weight matrix per axis, so resizing is two
matrix products. Axes are resized rows first, then columns (MATLAB's order for equal scales).
For uint8 input MATLAB computes in double and returns uint8 after *each* axis (its mex keeps the
input class), so the intermediate result is rounded (half away from zero) and saturated too.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

__all__ = ["imresize", "imresize_torch", "resize_weights", "output_length"]

_METHODS = ("bicubic", "nearest")


def _cubic(t: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's ``cubic``)."""
    at = np.abs(t)
    at2, at3 = at * at, at * at * at
    return (1.5 * at3 - 2.5 * at2 + 1.0) * (at <= 1) + (-0.5 * at3 + 2.5 * at2 - 4.0 * at + 2.0) * (
        (at > 1) & (at <= 2)
    )


def _box(t: np.ndarray) -> np.ndarray:
    """MATLAB's box kernel: 1 on [-0.5, 0.5), else 0 (the half-open interval decides ties)."""
    return ((t >= -0.5) & (t < 0.5)).astype(np.float64)


def output_length(in_length: int, scale: float) -> int:
    """MATLAB's output size for a scale factor: ``ceil(in_length * scale)``."""
    # Round away float noise first (e.g. 510 * (1/3) = 169.99999999999997 must give 170).
    return int(math.ceil(round(in_length * scale, 9)))


@lru_cache(maxsize=256)
def resize_weights(in_length: int, scale: float, method: str = "bicubic", antialias: bool = True) -> np.ndarray:
    """Dense float64 weight matrix ``W`` of shape ``[out_length, in_length]`` for one axis.

    ``resized = W @ signal`` along that axis reproduces MATLAB's ``imresize`` including symmetric
    border handling. Cached: matrices are reused for every image of the same size.
    """
    if method not in _METHODS:
        raise ValueError(f"imresize method must be one of {_METHODS}, got {method!r}")
    if not scale > 0:
        raise ValueError(f"imresize scale must be > 0, got {scale!r}")
    out_length = output_length(in_length, scale)
    kernel, width = (_cubic, 4.0) if method == "bicubic" else (_box, 1.0)
    if scale < 1 and antialias:
        base_kernel = kernel

        def kernel(t):  # noqa: E306 - stretched kernel for antialiased shrinking
            return scale * base_kernel(scale * t)

        width = width / scale

    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    taps = int(math.ceil(width)) + 2
    indices = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]  # 1-based input positions
    weights = kernel(u[:, None] - indices)
    weights = weights / weights.sum(axis=1, keepdims=True)

    # Symmetric extension: position p (1-based, any integer) -> index in 0..in_length-1.
    period = np.concatenate([np.arange(in_length), np.arange(in_length)[::-1]])
    mirrored = period[np.mod(indices.astype(np.int64) - 1, 2 * in_length)]

    matrix = np.zeros((out_length, in_length), dtype=np.float64)
    rows = np.broadcast_to(np.arange(out_length)[:, None], mirrored.shape)
    np.add.at(matrix, (rows, mirrored), weights)  # taps folded onto the same pixel accumulate
    matrix.setflags(write=False)
    return matrix


def _round_uint8(x: np.ndarray) -> np.ndarray:
    """MATLAB double -> uint8 conversion: saturate, then round half away from zero."""
    return np.floor(np.clip(x, 0.0, 255.0) + 0.5).astype(np.uint8)


def imresize(img, scale: float, method: str = "bicubic", antialias: bool = True):
    """Resize like MATLAB's ``imresize(img, scale, method)``.

    Args:
        img: numpy ``HxW`` or ``HxWxC`` array (uint8 or float), or a torch tensor (dispatched to
            :func:`imresize_torch`, layout ``[..., H, W]``).
        scale: resize factor (e.g. ``1/4`` to shrink by 4, ``4`` to enlarge).
        method: ``"bicubic"`` (default) or ``"nearest"``.
        antialias: stretch the kernel when shrinking (MATLAB default; ignored for ``nearest`` in
            MATLAB, so pass ``antialias=False`` there to match it).

    Returns:
        uint8 input -> uint8 output (rounded and saturated after each axis like MATLAB);
        float input -> float64 output (unclipped).
    """
    if isinstance(img, torch.Tensor):
        return imresize_torch(img, scale, method=method, antialias=antialias)
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f"imresize expects an HxW or HxWxC array, got shape {img.shape}")
    if img.dtype == np.bool_ or not (np.issubdtype(img.dtype, np.floating) or img.dtype == np.uint8):
        raise TypeError(f"imresize supports uint8 and floating-point images, got dtype {img.dtype}")
    is_uint8 = img.dtype == np.uint8
    rows_w = resize_weights(img.shape[0], float(scale), method, antialias)
    cols_w = resize_weights(img.shape[1], float(scale), method, antialias)
    data = img.astype(np.float64)
    # Rows first, then columns (MATLAB order when both scales are equal).
    data = np.tensordot(rows_w, data, axes=([1], [0]))  # [out_h, W, (C)]
    if is_uint8:
        data = _round_uint8(data).astype(np.float64)
    data = np.moveaxis(np.tensordot(cols_w, data, axes=([1], [1])), 0, 1)  # [out_h, out_w, (C)]
    return _round_uint8(data) if is_uint8 else data


def imresize_torch(
    x: torch.Tensor, scale: float, method: str = "bicubic", antialias: bool = True, quantize: bool = False
) -> torch.Tensor:
    """MATLAB ``imresize`` for float tensors ``[..., H, W]`` (e.g. ``[N, C, H, W]``) on any device.

    The per-axis weight matrices are computed once in float64 on the CPU (cached) and moved to the
    tensor's device/dtype; resizing is then two ``einsum`` products, differentiable in ``x``.
    With ``quantize=True`` the input is assumed to be on the 0..255 scale and the intermediate and
    final results are rounded and clamped like MATLAB's uint8 path.
    """
    if not torch.is_floating_point(x):
        raise TypeError(f"imresize_torch expects a floating-point tensor, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"imresize_torch expects a tensor [..., H, W], got shape {tuple(x.shape)}")
    rows_w = torch.from_numpy(resize_weights(x.shape[-2], float(scale), method, antialias).copy())
    cols_w = torch.from_numpy(resize_weights(x.shape[-1], float(scale), method, antialias).copy())
    rows_w = rows_w.to(device=x.device, dtype=x.dtype)
    cols_w = cols_w.to(device=x.device, dtype=x.dtype)
    out = torch.einsum("oh,...hw->...ow", rows_w, x)
    if quantize:
        out = torch.floor(out.clamp(0, 255) + 0.5)
    out = torch.einsum("pw,...ow->...op", cols_w, out)
    if quantize:
        out = torch.floor(out.clamp(0, 255) + 0.5)
    return out
