"""EDSR (Lim et al., CVPRW 2017) with an optional attention layer every ``K`` blocks: GLA as a plug-in.

    x -> subtract RGB mean -> head conv -> body -> body conv (+ head output)
      -> pixel-shuffle upsampler -> reconstruction conv -> add RGB mean

The body is ``B`` residual blocks ``x + res_scale * conv(relu(conv(x)))`` (no batch norm). With
``attention`` other than ``"none"``, an attention layer (:mod:`dlsn.models.attention`: ``gla``,
``lsh`` or ``nonlocal``) follows blocks ``K, 2K, ...`` (``K = attention_every``), as NLSN (Mei et al.,
CVPR 2021) inserts its attention into EDSR; ``attention="none"`` is EDSR as published. The blocks are
``body.<i>`` and the attention layers ``attention.<n>`` (after block ``(n + 1) K``) whatever the
variant, so a plain EDSR's weights name the same backbone parameters. The paper sizes:
the baseline (16 blocks x 64 features, ``res_scale`` 1; 1.37 M parameters at x2) and the large
model (32 x 256, ``res_scale`` 0.1; 40.7 M at x2), ``configs/model/edsr.yaml`` and
``edsr_large.yaml``.

The DIV2K mean shift and the upsampler are DLSN's (the same as EDSR's), and the memory layout is
channels-last like DLSN's (see :mod:`dlsn.models.dlsn`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dlsn.models.attention import ATTENTION_VARIANTS, attention_layers, build_attention
from dlsn.models.dlsn import DIV2K_RGB_MEAN, Upsampler, conv3x3
from dlsn.models.gla import GLA, set_rotation_seed


class ScaledResidualBlock(nn.Module):
    """EDSR's block: ``x + res_scale * conv2(relu(conv1(x)))``."""

    def __init__(self, channels: int, res_scale: float) -> None:
        super().__init__()
        self.conv1 = conv3x3(channels, channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(channels, channels)
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res_scale * self.conv2(self.relu(self.conv1(x)))


class EDSR(nn.Module):
    """Enhanced Deep Residual network, optionally with attention layers. Defaults: the EDSR baseline.

    Args:
        scale: upscaling factor (2, 3, 4 or 8).
        n_feats, n_resblocks, res_scale: EDSR's width, depth and residual scaling.
        rgb_range: input and output are RGB in ``[0, rgb_range]``.
        attention: ``"none"`` (plain EDSR), ``"gla"``, ``"lsh"`` or ``"nonlocal"``.
        attention_every: an attention layer after blocks ``K, 2K, ...`` (``K`` = this).
        reduction, chunk_size, n_hashes, score_mlp_hidden, adjacent_chunks, attention_impl: the
            attention layers' settings (:class:`~dlsn.models.GLA`); each variant uses the ones it has.

    ``forward(x, rotations=None)`` optionally takes one rotation tensor per hashed attention layer
    (GLA or LSH, in forward order), as :class:`~dlsn.models.DLSN` does.
    """

    def __init__(
        self,
        scale: int,
        n_feats: int = 64,
        n_resblocks: int = 16,
        res_scale: float = 1.0,
        rgb_range: float = 1.0,
        attention: str = "none",
        attention_every: int = 8,
        reduction: int = 4,
        chunk_size: int = 128,
        n_hashes: int = 3,
        score_mlp_hidden: int | None = None,
        adjacent_chunks: int = 1,
        attention_impl: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("n_feats", n_feats), ("n_resblocks", n_resblocks), ("attention_every", attention_every)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EDSR: {name} must be a positive integer, got {value!r}")
        if rgb_range <= 0:
            raise ValueError(f"EDSR: rgb_range must be positive, got {rgb_range!r}")
        if attention not in ATTENTION_VARIANTS:
            raise ValueError(f"EDSR: attention must be one of {', '.join(ATTENTION_VARIANTS)}, got {attention!r}")
        if attention != "none" and attention_every > n_resblocks:
            raise ValueError(f"EDSR: attention_every ({attention_every}) exceeds n_resblocks ({n_resblocks}): "
                             f"no {attention} layer would be inserted")
        self.scale = scale
        self.rgb_range = rgb_range
        self.attention_variant = attention
        self.register_buffer(
            "rgb_mean", rgb_range * torch.tensor(DIV2K_RGB_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.attention_every = attention_every
        self.head = conv3x3(3, n_feats)
        self.body = nn.ModuleList(ScaledResidualBlock(n_feats, res_scale) for _ in range(n_resblocks))
        # Apart from the blocks, so that the backbone's parameter names are the same for every variant.
        n_layers = 0 if attention == "none" else n_resblocks // attention_every
        self.attention = nn.ModuleList(
            build_attention(attention, n_feats, chunk_size=chunk_size, n_hashes=n_hashes, reduction=reduction,
                            score_mlp_hidden=score_mlp_hidden, adjacent_chunks=adjacent_chunks,
                            attention_impl=attention_impl, network="EDSR")
            for _ in range(n_layers)
        )
        self.body_conv = conv3x3(n_feats, n_feats)
        self.upsampler = Upsampler(scale, n_feats, network="EDSR")
        self.reconstruction = conv3x3(n_feats, 3)
        # Channels-last weights (kept by .to(device), load_state_dict and optimizers' state), but not the
        # [1, 3, 1, 1] mean: DDP broadcasts buffers and a lone one with channels-last strides fails there.
        self.to(memory_format=torch.channels_last)
        self.rgb_mean = self.rgb_mean.clone(memory_format=torch.contiguous_format)

    def set_rotation_seed(self, seed: int | None) -> None:
        """Deterministic hash rotations (an int) for evaluation, or fresh ones (``None``) for training."""
        set_rotation_seed(self, seed)

    @property
    def attention_layers(self) -> Sequence[nn.Module]:
        """The attention layers (GLA, LSH or non-local) in forward order."""
        return attention_layers(self)

    def forward(self, x: torch.Tensor, rotations: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        n_hashed = sum(isinstance(layer, GLA) for layer in self.attention)
        if rotations is not None and len(rotations) != n_hashed:
            raise ValueError(f"EDSR: expected {n_hashed} rotation tensors (one per GLA/LSH layer), got {len(rotations)}")
        layer_rotations = iter(rotations or ())
        shallow = self.head((x - self.rgb_mean).contiguous(memory_format=torch.channels_last))
        features = shallow
        for index, block in enumerate(self.body, start=1):
            features = block(features)
            if len(self.attention) and index % self.attention_every == 0:
                layer = self.attention[index // self.attention_every - 1]
                features = layer(features, next(layer_rotations) if rotations is not None and isinstance(layer, GLA)
                                 else None)
        features = self.body_conv(features) + shallow
        return (self.reconstruction(self.upsampler(features)) + self.rgb_mean).contiguous()
