"""The interpolation baseline: MATLAB-compatible bicubic upsampling as a weightless ``nn.Module``."""

from __future__ import annotations

import torch
from torch import nn

from dlsn.imresize import imresize_torch


class Bicubic(nn.Module):
    """Upsample by ``scale`` with MATLAB's ``imresize(..., 'bicubic')``.

    This is the "Bicubic" row of SR tables. MATLAB resizes uint8 images and rounds after each of
    its two separable passes, so the input is taken to 8-bit levels, resized with the same rounding
    (``quantize=True``) and mapped back to ``[0, rgb_range]``. The module has no parameters, so it
    can be evaluated with the same code paths as a trained network.
    """

    def __init__(self, scale: int, rgb_range: float = 1.0) -> None:
        super().__init__()
        if int(scale) != scale or scale < 1:
            raise ValueError(f"Bicubic: scale must be a positive integer, got {scale!r}")
        if rgb_range <= 0:
            raise ValueError(f"Bicubic: rgb_range must be positive, got {rgb_range!r}")
        self.scale = int(scale)
        self.rgb_range = float(rgb_range)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        levels = lr * (255.0 / self.rgb_range)
        sr = imresize_torch(levels, self.scale, quantize=True)
        return sr * (self.rgb_range / 255.0)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, rgb_range={self.rgb_range}"
