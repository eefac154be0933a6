"""DLSN: Deep Learnable Similarity Network (Su et al., TPAMI 2022), the architecture as released.

    x -> subtract RGB mean -> head conv -> G residual groups -> body conv (+ head output)
      -> pixel-shuffle upsampler -> reconstruction conv -> add RGB mean

Each residual group is ``B`` residual blocks (conv, ReLU, conv, + identity), one GLA layer and a
3x3 conv, wrapped as ``x + res_scale * group(x)``. For the ablations (``attention=``, see
:mod:`dlsn.models.attention`) the GLA layer can be LSH or non-local attention instead, or left out
(``none``: the groups keep their blocks, conv and residual scaling).

Memory layout: convolution weights and every feature map are channels-last (NHWC), the layout GPU
convolutions (cuDNN) and GLA's token view work in, so no layer converts between layouts; the
network's output is returned in the default (NCHW) layout. The numbers are those of NCHW.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from dlsn.models.attention import attention_layers, build_attention
from dlsn.models.conv_epilogue import conv2d_epilogue
from dlsn.models.gla import GLA, set_rotation_seed

# DIV2K mean colour, subtracted before the head and added back at the end (fixed, not trained).
DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


class ResidualBlock(nn.Module):
    """``x + conv2(relu(conv1(x)))``. Each convolution and what follows it is one
    :func:`~dlsn.models.conv_epilogue.conv2d_epilogue` call (one fused pass in GPU inference)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(channels, channels)
        self.conv2 = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = conv2d_epilogue(x, self.conv1.weight, self.conv1.bias, padding=self.conv1.padding, relu=True)
        return conv2d_epilogue(hidden, self.conv2.weight, self.conv2.bias, padding=self.conv2.padding, residual=x)


class ResidualGroup(nn.Module):
    """``x + res_scale * conv(attention(blocks(x)))``; ``attention`` may be ``None`` (left out)."""

    def __init__(self, channels: int, n_blocks: int, res_scale: float, attention: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(ResidualBlock(channels) for _ in range(n_blocks)))
        self.attention = attention
        self.conv = conv3x3(channels, channels)
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor, rotations: torch.Tensor | None = None) -> torch.Tensor:
        features = self.blocks(x)
        if self.attention is not None:
            features = self.attention(features, rotations)
        return conv2d_epilogue(features, self.conv.weight, self.conv.bias, padding=self.conv.padding,
                               residual=x, scale=self.res_scale)


class Upsampler(nn.Sequential):
    """Sub-pixel upsampling: ``log2(scale)`` times [conv F -> 4F, shuffle 2], or [conv F -> 9F, shuffle 3].
    ``network`` names the caller in errors."""

    def __init__(self, scale: int, channels: int, network: str = "DLSN") -> None:
        if scale == 3:
            steps = [3]
        elif isinstance(scale, int) and scale >= 2 and scale & (scale - 1) == 0:
            steps = [2] * int(math.log2(scale))
        else:
            raise ValueError(f"{network}: scale must be 3 or a power of two (2, 4, 8), got {scale!r}")
        layers: list[nn.Module] = []
        for factor in steps:
            layers += [conv3x3(channels, factor * factor * channels), nn.PixelShuffle(factor)]
        super().__init__(*layers)


class DLSN(nn.Module):
    """Deep Learnable Similarity Network. Defaults are the paper configuration.

    Input and output are RGB in ``[0, rgb_range]``. ``forward(x, rotations=None)`` optionally takes
    one ``[n_hashes, n_feats // reduction, n_buckets]`` tensor per hashed attention layer (GLA or
    LSH, in forward order). ``attention_impl`` selects every GLA layer's chunk attention (see
    :class:`~dlsn.models.GLA`).

    Ablations (docs/ablations.md): ``attention`` is ``"gla"`` (the paper), ``"lsh"``, ``"nonlocal"``
    or ``"none"`` (:mod:`dlsn.models.attention`); ``score_mlp_hidden`` (``None``: ``chunk_size``) and
    ``adjacent_chunks`` are GLA's learned-score MLP width and chunks attended on each side.
    """

    def __init__(
        self,
        scale: int,
        n_feats: int = 256,
        n_resgroups: int = 10,
        n_resblocks: int = 4,
        reduction: int = 4,
        chunk_size: int = 128,
        n_hashes: int = 3,
        res_scale: float = 0.1,
        rgb_range: float = 1.0,
        attention_impl: str = "auto",
        attention: str = "gla",
        score_mlp_hidden: int | None = None,
        adjacent_chunks: int = 1,
    ) -> None:
        super().__init__()
        for name, value in (("n_feats", n_feats), ("n_resgroups", n_resgroups),
                            ("n_resblocks", n_resblocks)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DLSN: {name} must be a positive integer, got {value!r}")
        if rgb_range <= 0:
            raise ValueError(f"DLSN: rgb_range must be positive, got {rgb_range!r}")
        self.scale = scale
        self.rgb_range = rgb_range
        self.register_buffer(
            "rgb_mean", rgb_range * torch.tensor(DIV2K_RGB_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.head = conv3x3(3, n_feats)
        self.attention_variant = attention
        self.groups = nn.ModuleList(
            ResidualGroup(n_feats, n_resblocks, res_scale, build_attention(
                attention, n_feats, chunk_size=chunk_size, n_hashes=n_hashes, reduction=reduction,
                score_mlp_hidden=score_mlp_hidden, adjacent_chunks=adjacent_chunks,
                attention_impl=attention_impl, network="DLSN"))
            for _ in range(n_resgroups)
        )
        self.body_conv = conv3x3(n_feats, n_feats)
        self.upsampler = Upsampler(scale, n_feats)
        self.reconstruction = conv3x3(n_feats, 3)
        # Channels-last weights (kept by .to(device), load_state_dict and optimizers' state).
        self.to(memory_format=torch.channels_last)
        # ... but not the [1, 3, 1, 1] mean: DDP broadcasts buffers every step, and a lone buffer whose
        # strides differ from the flat copy it is broadcast through fails ("refer to a single memory
        # location"); channels-last means nothing for it anyway.
        self.rgb_mean = self.rgb_mean.clone(memory_format=torch.contiguous_format)

    def set_rotation_seed(self, seed: int | None) -> None:
        """Deterministic hash rotations (an int) for evaluation, or fresh ones (``None``) for training."""
        set_rotation_seed(self, seed)

    def forward(self, x: torch.Tensor, rotations: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        hashed = [isinstance(group.attention, GLA) for group in self.groups]
        if rotations is not None and len(rotations) != sum(hashed):
            raise ValueError(f"DLSN: expected {sum(hashed)} rotation tensors (one per GLA "
                             f"layer), got {len(rotations)}")
        layer_rotations = iter(rotations or ())
        shallow = self.head((x - self.rgb_mean).contiguous(memory_format=torch.channels_last))
        features = shallow
        for group, uses_rotations in zip(self.groups, hashed):
            features = group(features, next(layer_rotations) if rotations is not None and uses_rotations else None)
        features = conv2d_epilogue(features, self.body_conv.weight, self.body_conv.bias,
                                   padding=self.body_conv.padding, residual=shallow)
        return (self.reconstruction(self.upsampler(features)) + self.rgb_mean).contiguous()

    @property
    def attention_layers(self) -> Sequence[nn.Module]:
        """The attention layers (GLA, LSH or non-local) in forward order."""
        return attention_layers(self)
