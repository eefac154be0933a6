"""Attention variants for the paper's ablations, sharing GLA's embeddings, hashing and chunks.

``attention=`` on :class:`~dlsn.models.DLSN` and :class:`~dlsn.models.EDSR` picks one:

========== =============================================== ===========================================
variant    score ``s(i, j)`` over the keys ``j`` of ...    layer
========== =============================================== ===========================================
``gla``    ``m_i . m_j/|m_j| + fc(u_j)[slot(i)]``, the     :class:`~dlsn.models.GLA` (the paper's layer)
           ``(2a+1) k`` keys of the query's chunk
           neighbourhood in each hash round
``lsh``    ``m_i . m_j/|m_j|``, the same keys              :class:`LSHAttention`
``nonlocal`` ``m_i . m_j/|m_j|``, all ``L`` positions       :class:`NonLocalAttention`
``none``   (no attention layer)                            ``None``
========== =============================================== ===========================================

All three layers return ``x + res_scale * sum_j softmax_j(s(i, j)) v_j`` (GLA and LSH mixing their
hash rounds by the softmax of the rounds' log-sum-exp confidences), with the same match embedding
``m`` (``C / r`` channels), value embedding ``v`` and key normalisation. :func:`build_attention`
makes the layer from one set of keyword arguments and ignores the ones a variant has no use for
(``lsh`` has no learned-score MLP, ``nonlocal`` no hashing), so one config can sweep
``attention`` over every variant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlsn.models.gla import GLA, KEY_NORM_EPS, QueryAttention

ATTENTION_VARIANTS = ("gla", "lsh", "nonlocal", "none")
# Non-local inference (no autograd) attends in blocks of queries whose float32 score rows stay below
# this size, in case the attention runs PyTorch's math path (the L x L scores of a whole image).
NONLOCAL_BLOCK_BYTES = 256 * 2**20


class LSHAttention(GLA):
    """GLA without the learned score: the sparse dot-product attention of NLSN (Mei et al., CVPR
    2021) on GLA's Super-Bit LSH buckets and chunks.

    ``s(i, j) = m_i . m_j / max(|m_j|, 5e-5)`` over the ``(2a + 1) k`` keys of the query's chunk
    neighbourhood, in each of ``n_hashes`` rounds, the rounds mixed as in GLA. It has no
    learnable-score embedding and no MLP (no ``score_embedding``/``score_mlp`` parameters). It is
    exactly :class:`~dlsn.models.GLA` with ``fc`` identically zero, i.e. the MLP's last layer's weight
    and bias both zero (a zero weight alone leaves ``fc(u_j)[r] = b[r]``: the same for every key of a
    query, so the softmax over keys is unchanged, but it shifts the round's confidence by ``b[slot]``
    and with it the mixing of the rounds).

    Args: as :class:`~dlsn.models.GLA`, without ``score_mlp_hidden``.
    """

    learns_scores = False

    def __init__(
        self,
        channels: int,
        chunk_size: int = 128,
        n_hashes: int = 3,
        reduction: int = 4,
        res_scale: float = 1.0,
        attention_impl: str = "auto",
        adjacent_chunks: int = 1,
    ) -> None:
        super().__init__(channels, chunk_size, n_hashes, reduction, res_scale, attention_impl,
                         adjacent_chunks=adjacent_chunks)


class NonLocalAttention(nn.Module):
    """Full (quadratic) non-local attention with GLA's embeddings: every query sees all ``L`` positions.

        s(i, j) = m_i . m_j / max(|m_j|, 5e-5),    y(i) = sum_j softmax_j(s(i, j)) v_j,
        output  = x + res_scale * y

    The dot-product score of :class:`LSHAttention` and GLA, without the learned term. This is the
    quality upper bound of the family in the sense the ablation needs: LSH attention keeps, for each
    query, a subset of the keys of exactly this softmax (the ones its hash buckets bring near), so
    non-local attention is what LSH approximates, at the ``O(L^2)`` cost that hashing avoids. GLA's
    learned term cannot be carried over: ``fc(u_j)[slot(i)]`` is indexed by the query's place in its
    hash chunk, and without hashing there are no chunks (a query's "slot" among all ``L`` keys would
    need an MLP with ``L`` outputs). Whether GLA's learned term beats seeing every key is then the
    paper's claim, measured rather than built in. ``n_hashes``/``chunk_size`` do not apply; there are
    no rotations (``forward``'s ``rotations`` argument is accepted and ignored).

    Computed with :func:`torch.nn.functional.scaled_dot_product_attention` (``scale=1``: the score
    above, not divided by ``sqrt(d)``), so CUDA uses a memory-efficient kernel whose memory grows
    linearly with ``L`` (the time still grows as ``L^2``); elsewhere (the CPU: queries and values
    differ in width) PyTorch's math path holds the ``L x L`` scores. Without autograd the queries are
    taken in blocks of at most ``NONLOCAL_BLOCK_BYTES`` of scores, which bounds the memory of
    whole-image inference on any path. Under autocast the match embedding is float32 as in GLA, and
    queries and keys enter the attention in the values' precision.
    """

    def __init__(self, channels: int, reduction: int = 4, res_scale: float = 1.0) -> None:
        super().__init__()
        for key, value in (("channels", channels), ("reduction", reduction)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"NonLocalAttention: {key} must be a positive integer, got {value!r}")
        if channels % reduction:
            raise ValueError(f"NonLocalAttention: channels ({channels}) must be divisible by reduction ({reduction})")
        self.channels = channels
        self.reduction = reduction
        self.res_scale = res_scale
        self.match_embedding = nn.Conv2d(channels, channels // reduction, 3, padding=1)
        self.value_embedding = nn.Conv2d(channels, channels, 3, padding=1)

    # GLA's embedding code (one stacked convolution, float32 match embedding under autocast / CUDA).
    learns_scores = False
    _embeddings = GLA._embeddings

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduction={self.reduction}, res_scale={self.res_scale}"

    def forward(self, x: torch.Tensor, rotations: torch.Tensor | None = None) -> torch.Tensor:
        batch, channels, height, width = x.shape
        length = height * width
        match, value, _ = self._embeddings(x)
        keys = F.normalize(match, p=2, dim=-1, eps=KEY_NORM_EPS)
        # One head: [N, 1, L, D].
        queries, keys, value = (t.unsqueeze(1) for t in (match.to(value.dtype), keys.to(value.dtype), value))
        rows = length
        if not torch.is_grad_enabled():
            rows = max(1, NONLOCAL_BLOCK_BYTES // (4 * batch * length))
        attended = torch.cat([F.scaled_dot_product_attention(queries[:, :, first:first + rows], keys, value, scale=1.0)
                              for first in range(0, length, rows)], dim=2)
        attention = attended.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        return torch.add(x, attention.to(x.dtype), alpha=self.res_scale)

    @torch.no_grad()
    def query_attention(self, x: torch.Tensor, position: int, rotations: torch.Tensor | None = None) -> QueryAttention:
        """One query's scores and weights over all positions (one "round"; see :class:`QueryAttention`)."""
        batch, _, height, width = x.shape
        length = height * width
        if batch != 1:
            raise ValueError(f"NonLocalAttention.query_attention: expected one image, got a batch of {batch}")
        if not 0 <= position < length:
            raise ValueError(f"NonLocalAttention.query_attention: position {position} is outside the "
                             f"{height}x{width} feature map")
        with torch.autocast(x.device.type, enabled=False):
            match = self._embeddings(x.float())[0][0]
        dot = (F.normalize(match, p=2, dim=-1, eps=KEY_NORM_EPS) @ match[position]).unsqueeze(0)
        return QueryAttention(
            key_positions=torch.arange(length, device=x.device).unsqueeze(0), dot_scores=dot, learned_scores=None,
            weights=torch.softmax(dot, dim=-1), round_weights=torch.ones(1, device=x.device),
            height=height, width=width,
        )


def build_attention(
    attention: str,
    channels: int,
    *,
    chunk_size: int = 128,
    n_hashes: int = 3,
    reduction: int = 4,
    res_scale: float = 1.0,
    score_mlp_hidden: int | None = None,
    adjacent_chunks: int = 1,
    attention_impl: str = "auto",
    network: str = "network",
) -> nn.Module | None:
    """The attention layer named by ``attention`` (one of :data:`ATTENTION_VARIANTS`; ``None`` for
    ``"none"``). Arguments a variant does not use are ignored; ``network`` names the caller in errors."""
    if attention == "gla":
        return GLA(channels, chunk_size, n_hashes, reduction, res_scale, attention_impl,
                   score_mlp_hidden=score_mlp_hidden, adjacent_chunks=adjacent_chunks)
    if attention == "lsh":
        return LSHAttention(channels, chunk_size, n_hashes, reduction, res_scale, attention_impl,
                            adjacent_chunks=adjacent_chunks)
    if attention == "nonlocal":
        if attention_impl == "fused":
            raise ValueError(f"{network}: attention_impl='fused' is GLA's chunk-attention kernel; "
                             "attention='nonlocal' has no chunks (use 'auto' or 'reference')")
        return NonLocalAttention(channels, reduction, res_scale)
    if attention == "none":
        return None
    raise ValueError(f"{network}: attention must be one of {', '.join(ATTENTION_VARIANTS)}, got {attention!r}")


def attention_layers(module: nn.Module) -> list[nn.Module]:
    """Every attention layer of ``module`` (GLA, LSH and non-local) in registration (= forward) order."""
    return [m for m in module.modules() if isinstance(m, (GLA, NonLocalAttention))]
