"""Super-resolution evaluation metrics: Y-channel PSNR and SSIM (the standard SR protocol).

Protocol (the one behind every published SR table):

1. SR and HR are quantised to 8-bit levels: ``q = round(x * 255 / rgb_range)`` clamped to 0..255
   (uint8 arrays are used as they are).
2. Luma of ITU-R BT.601 with MATLAB ``rgb2ycbcr`` coefficients, *not* rounded::

       Y = 16 + (65.481 R + 128.553 G + 24.966 B),   R, G, B in [0, 1]  ->  Y in [16, 235]

   Images that were *single-channel files* (e.g. Set14's ``bridge``) are evaluated on their own
   gray level in the published protocol (MATLAB code skips ``rgb2ycbcr`` for them). Pass
   ``gray=True`` for those: the luma is then taken full-range, ``(Y - 16) * 255 / 219``, which is
   exactly the gray value when R = G = B. The datasets mark such images with ``batch["gray"]``.
3. ``crop_border`` pixels (the scale factor, by convention) are removed on every side.
4. PSNR = ``10 log10(255^2 / MSE)``; SSIM as in Wang et al.'s ``ssim_index.m``: Gaussian window
   11x11 with sigma 1.5, ``C1 = (0.01 * 255)^2``, ``C2 = (0.03 * 255)^2``, 'valid' filtering
   (no padding), mean of the SSIM map.

Everything is computed in float64. Inputs: uint8 numpy ``HxWx3`` arrays, or float tensors
``[3, H, W]`` / ``[1, 3, H, W]`` with values in ``[0, rgb_range]``.

For training/validation loops there are torchmetrics classes :class:`PSNR_Y` and :class:`SSIM_Y`:
``update(sr, hr)`` takes batched float tensors ``[B, 3, H, W]``, computes one value per image and
accumulates ``sum`` and ``count`` (``dist_reduce_fx="sum"``), so ``compute()`` is the per-image
mean across all processes.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torchmetrics import Metric

__all__ = ["rgb_to_y", "quantize", "psnr_y", "ssim_y", "psnr", "ssim", "PSNR_Y", "SSIM_Y"]

# MATLAB rgb2ycbcr luma row (for RGB in [0, 1], output on the 0..255 scale).
_Y_COEFFS = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0


def _compute_device(device: torch.device) -> torch.device:
    # float64 is unsupported on Apple MPS; everything else computes in place.
    return torch.device("cpu") if device.type == "mps" else device


def _to_levels(img, rgb_range: float) -> torch.Tensor:
    """Any supported input -> float64 tensor ``[3, H, W]`` of 8-bit levels (0..255 integers)."""
    if isinstance(img, np.ndarray):
        if img.ndim != 3 or img.shape[-1] != 3:
            raise ValueError(f"expected an HxWx3 numpy array, got shape {img.shape}")
        t = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1)  # copy: inputs may be read-only mmaps
        if img.dtype == np.uint8:
            return t.to(torch.float64)
        return quantize(t.to(torch.float64), rgb_range)
    if isinstance(img, torch.Tensor):
        t = img.detach()
        if t.ndim == 4:
            if t.shape[0] != 1:
                raise ValueError(f"expected a single image [1, 3, H, W], got shape {tuple(t.shape)}")
            t = t[0]
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"expected a tensor [3, H, W] or [1, 3, H, W], got shape {tuple(img.shape)}")
        t = t.to(_compute_device(t.device))
        if t.dtype == torch.uint8:
            return t.to(torch.float64)
        return quantize(t.to(torch.float64), rgb_range)
    raise TypeError(f"expected a numpy array or torch tensor, got {type(img).__name__}")


def quantize(x: torch.Tensor, rgb_range: float = 1.0) -> torch.Tensor:
    """Map ``[0, rgb_range]`` values to 8-bit levels: ``clamp(round(x * 255 / rgb_range), 0, 255)``."""
    return torch.round(x * (255.0 / rgb_range)).clamp_(0.0, 255.0)


def rgb_to_y(img, rgb_range: float = 1.0):
    """BT.601 luma with MATLAB coefficients, unrounded, on the 0..255 scale.

    ``Y = 16 + (65.481 R + 128.553 G + 24.966 B)`` with ``R, G, B`` in ``[0, 1]``.

    * numpy input: channels last (``HxWx3``); uint8 is divided by 255, float is divided by
      ``rgb_range``. Returns a float64 ``HxW`` array.
    * torch input: channels at dim -3 (``[..., 3, H, W]``), values in ``[0, rgb_range]``.
      Returns ``[..., H, W]`` in the input's floating dtype (float64 for integer input).
    """
    if isinstance(img, np.ndarray):
        if img.shape[-1] != 3:
            raise ValueError(f"rgb_to_y expects HxWx3 numpy input, got shape {img.shape}")
        scale = 255.0 if img.dtype == np.uint8 else float(rgb_range)
        rgb = img.astype(np.float64) / scale
        return _Y_OFFSET + rgb @ np.asarray(_Y_COEFFS, dtype=np.float64)
    if isinstance(img, torch.Tensor):
        if img.ndim < 3 or img.shape[-3] != 3:
            raise ValueError(f"rgb_to_y expects a tensor [..., 3, H, W], got shape {tuple(img.shape)}")
        x = img if torch.is_floating_point(img) else img.to(torch.float64)
        scale = 255.0 if img.dtype == torch.uint8 else float(rgb_range)
        coeffs = torch.tensor(_Y_COEFFS, dtype=x.dtype, device=x.device) / scale
        # One weighted channel sum (a single kernel rather than five elementwise passes).
        return torch.tensordot(coeffs, x.movedim(-3, 0), dims=1) + _Y_OFFSET
    raise TypeError(f"rgb_to_y expects a numpy array or torch tensor, got {type(img).__name__}")


def _y_from_levels(levels: torch.Tensor, crop_border: int, gray: bool = False) -> torch.Tensor:
    y = rgb_to_y(levels, rgb_range=255.0)
    if gray:
        # Full-range luma: equals the gray level itself for R = G = B (single-channel source files).
        y = (y - _Y_OFFSET) * (255.0 / 219.0)
    if crop_border > 0:
        if y.shape[-1] <= 2 * crop_border or y.shape[-2] <= 2 * crop_border:
            raise ValueError(f"crop_border={crop_border} leaves nothing of an image of size {tuple(y.shape)}")
        y = y[..., crop_border:-crop_border, crop_border:-crop_border]
    return y


def _check_pair(sr: torch.Tensor, hr: torch.Tensor) -> None:
    if sr.shape != hr.shape:
        raise ValueError(f"SR and HR must have the same shape, got {tuple(sr.shape)} and {tuple(hr.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 255.0) -> float:
    """Plain PSNR between two float tensors: ``10 log10(data_range^2 / MSE)`` (inf if equal)."""
    mse = torch.mean((x.to(torch.float64) - y.to(torch.float64)) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


@lru_cache(maxsize=8)
def _gaussian_window_1d(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    window = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return window / window.sum()


def _filter_valid(maps: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable 2-D correlation with ``outer(window, window)``, 'valid' region only. maps: [N, H, W]."""
    w = window.to(maps.device)
    k = w.numel()
    x = maps[:, None]
    x = torch.nn.functional.conv2d(x, w.view(1, 1, k, 1))
    x = torch.nn.functional.conv2d(x, w.view(1, 1, 1, k))
    return x[:, 0]


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 255.0) -> float:
    """SSIM of two single-channel images ``[H, W]`` (Wang et al. 2004, ``ssim_index.m``).

    ``SSIM = mean( (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)) )``
    with local statistics from an 11x11 Gaussian (sigma 1.5) over the 'valid' region,
    ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, ``L = data_range``.
    """
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {tuple(x.shape)}")
    window = _gaussian_window_1d()
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    # All five local moments in one batched filtering pass.
    mu_x, mu_y, e_xx, e_yy, e_xy = _filter_valid(torch.stack([x, y, x * x, y * y, x * y]), window)
    sigma_xx = e_xx - mu_x**2
    sigma_yy = e_yy - mu_y**2
    sigma_xy = e_xy - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sigma_xx + sigma_yy + c2))
    return ssim_map.mean().item()


def psnr_y(sr, hr, crop_border: int, rgb_range: float = 1.0, gray: bool = False) -> float:
    """Y-channel PSNR (dB) of the standard SR protocol (see module docstring)."""
    sr_levels, hr_levels = _to_levels(sr, rgb_range), _to_levels(hr, rgb_range)
    _check_pair(sr_levels, hr_levels)
    return psnr(_y_from_levels(sr_levels, crop_border, gray), _y_from_levels(hr_levels, crop_border, gray))


def ssim_y(sr, hr, crop_border: int, rgb_range: float = 1.0, gray: bool = False) -> float:
    """Y-channel SSIM of the standard SR protocol (see module docstring)."""
    sr_levels, hr_levels = _to_levels(sr, rgb_range), _to_levels(hr, rgb_range)
    _check_pair(sr_levels, hr_levels)
    return ssim(_y_from_levels(sr_levels, crop_border, gray), _y_from_levels(hr_levels, crop_border, gray))


class _PerImageMean(Metric):
    """Per-image metric averaged over images (not pixels), reduced by summing across processes."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, crop_border: int, rgb_range: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if crop_border < 0:
            raise ValueError(f"crop_border must be >= 0, got {crop_border}")
        self.crop_border = int(crop_border)
        self.rgb_range = float(rgb_range)
        self.add_state("sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _per_image(self, sr: torch.Tensor, hr: torch.Tensor, gray: bool) -> float:
        raise NotImplementedError

    def update(self, sr: torch.Tensor, hr: torch.Tensor, gray=None) -> None:
        """Add one value per image of the batch. ``gray``: optional bools [B] (``batch["gray"]``)."""
        if sr.ndim != 4 or hr.ndim != 4:
            raise ValueError(f"update expects batches [B, 3, H, W], got {tuple(sr.shape)} and {tuple(hr.shape)}")
        if sr.shape != hr.shape:
            raise ValueError(f"SR and HR batches differ in shape: {tuple(sr.shape)} vs {tuple(hr.shape)}")
        flags = [False] * sr.shape[0] if gray is None else [bool(g) for g in gray]
        if len(flags) != sr.shape[0]:
            raise ValueError(f"gray has {len(flags)} flags for a batch of {sr.shape[0]} images")
        values = [self._per_image(s, h, g) for s, h, g in zip(sr, hr, flags)]
        self.sum += torch.tensor(sum(values), dtype=torch.float64, device=self.sum.device)
        self.count += len(values)

    def compute(self) -> torch.Tensor:
        return self.sum / self.count


class PSNR_Y(_PerImageMean):  # noqa: N801 - the metric's conventional name
    """Mean per-image Y-channel PSNR (dB); see :func:`psnr_y`."""

    def _per_image(self, sr, hr, gray):
        return psnr_y(sr, hr, self.crop_border, self.rgb_range, gray)


class SSIM_Y(_PerImageMean):  # noqa: N801
    """Mean per-image Y-channel SSIM; see :func:`ssim_y`."""

    def _per_image(self, sr, hr, gray):
        return ssim_y(sr, hr, self.crop_border, self.rgb_range, gray)
