"""A network added the way docs/architecture.md describes (its worked example): a plain nn.Module."""

from __future__ import annotations

import torch
from torch import nn


class TinyUpsampler(nn.Module):
    """Bilinear upsampling plus a learned residual of two 3x3 convolutions."""

    def __init__(self, scale: int, channels: int = 8) -> None:
        super().__init__()
        if scale < 1:
            raise ValueError(f"TinyUpsampler: scale must be >= 1, got {scale}")
        self.scale = scale
        self.body = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, 3, 3, padding=1))

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        upsampled = nn.functional.interpolate(lr, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return upsampled + self.body(upsampled)
