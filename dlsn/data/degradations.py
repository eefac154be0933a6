"""Degradation models of the SR literature (BI, BD, DN), reproducing the usual MATLAB scripts.

All functions take and return ``HxWxC`` uint8 arrays. The HR image is first cropped to a multiple
of the scale (:func:`modcrop`), so ``LR.shape[:2] == HR.shape[:2] / scale`` exactly.

* **BI**: ``imresize(HR, 1/s, 'bicubic')`` (antialiased, a = -0.5), rounded to uint8.
* **BD**: Gaussian blur ``fspecial('gaussian', 7, 1.6)`` with replicate borders, computed in double
  and rounded to uint8 (``imfilter`` keeps the uint8 class), then ``imresize(., 1/s, 'nearest')``.
  MATLAB's nearest rule maps output pixel ``x`` (1-based) to ``u = x*s + 0.5*(1 - s)`` and keeps the
  input pixel whose box ``[i - 0.5, i + 0.5)`` contains ``u``, i.e. ``i = floor(u + 0.5)``. In 0-based
  indices that keeps rows/columns ``floor(s/2) + k*s``: 1, 3, 5, ... for x2; 1, 4, 7, ... for x3;
  2, 6, 10, ... for x4.
* **DN**: BI, then additive white Gaussian noise with sigma 30 (0..255 scale), independent per
  pixel and channel, rounded and clipped to uint8.
"""

from __future__ import annotations

import numpy as np
import torch

from dlsn.imresize import imresize

__all__ = ["DEGRADATIONS", "modcrop", "gaussian_blur_replicate", "nearest_downscale", "add_noise", "degrade",
           "check_degradation", "check_scale", "BD_KERNEL_SIZE", "BD_SIGMA", "DN_SIGMA"]

DEGRADATIONS = ("BI", "BD", "DN")
BD_KERNEL_SIZE = 7
BD_SIGMA = 1.6
DN_SIGMA = 30.0


def check_degradation(kind: str) -> str:
    """Validate a degradation name; raises ValueError naming the value and the allowed ones."""
    if not isinstance(kind, str) or kind.upper() not in DEGRADATIONS:
        raise ValueError(f"degradation must be one of {list(DEGRADATIONS)}, got {kind!r}")
    return kind.upper()


def check_scale(scale) -> int:
    """Validate an integer SR scale factor (>= 1)."""
    if isinstance(scale, bool) or not float(scale).is_integer() or int(scale) < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    return int(scale)


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right so height and width are multiples of ``scale`` (MATLAB ``modcrop``)."""
    h, w = img.shape[:2]
    if h < scale or w < scale:
        raise ValueError(f"image of size {h}x{w} is smaller than the scale {scale}")
    return img[: h - h % scale, : w - w % scale]


def gaussian_blur_replicate(img: np.ndarray, size: int = BD_KERNEL_SIZE, sigma: float = BD_SIGMA) -> np.ndarray:
    """MATLAB ``imfilter(img, fspecial('gaussian', size, sigma), 'replicate')`` on a uint8 HxW[xC] image.

    kornia's Gaussian blur in float64 (the same normalised kernel, applied separably; the tests check
    it against a 2-D correlation with MATLAB's kernel), then MATLAB's rounding back to uint8.
    """
    import kornia  # imported here: only the BD degradation needs it

    planes = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float64))
    planes = planes.permute(2, 0, 1) if img.ndim == 3 else planes[None]
    blurred = kornia.filters.gaussian_blur2d(planes[None], (size, size), (sigma, sigma), border_type="replicate")[0]
    blurred = (blurred.permute(1, 2, 0) if img.ndim == 3 else blurred[0]).numpy()
    return np.floor(np.clip(blurred, 0, 255) + 0.5).astype(np.uint8)


def nearest_downscale(img: np.ndarray, scale: int) -> np.ndarray:
    """MATLAB ``imresize(img, 1/scale, 'nearest')``: keeps rows/columns ``floor(scale/2) + k*scale``."""
    return imresize(img, 1.0 / scale, method="nearest", antialias=False)


def add_noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive white Gaussian noise (0..255 scale), rounded and clipped to uint8."""
    noisy = img.astype(np.float64) + rng.normal(0.0, sigma, size=img.shape)
    return np.floor(np.clip(noisy, 0, 255) + 0.5).astype(np.uint8)


def degrade(hr: np.ndarray, scale: int, kind: str = "BI", seed=None) -> np.ndarray:
    """Make the LR image of an ``HxWxC`` uint8 HR image with degradation ``kind`` (BI, BD or DN).

    The HR image is modcropped first. ``seed`` (int, ``np.random.Generator`` or None) only matters
    for DN: a fixed seed gives the same noise on every run (used for validation/test images).
    """
    kind = check_degradation(kind)
    scale = check_scale(scale)
    hr = np.asarray(hr)
    if hr.dtype != np.uint8:
        raise TypeError(f"degrade expects a uint8 image, got dtype {hr.dtype}")
    hr = modcrop(hr, scale)
    if kind == "BD":
        return nearest_downscale(gaussian_blur_replicate(hr), scale)
    lr = imresize(hr, 1.0 / scale)
    if kind == "DN":
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        lr = add_noise(lr, DN_SIGMA, rng)
    return lr
