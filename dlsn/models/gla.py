"""Global Learnable Attention (GLA) with Super-Bit LSH, as in DLSN (Su et al., TPAMI 2022).

For a feature map ``x`` with ``C`` channels and ``L = H * W`` positions, three embeddings are
computed, each a 3x3 convolution followed by ReLU:

* match  ``m = relu(conv(x))``  with ``C / r`` channels (queries and keys),
* value  ``v = relu(conv(x))``  with ``C`` channels,
* learnable-score input ``u = relu(conv(x))`` with ``C`` channels, mapped by a two-layer MLP
  ``fc: C -> h -> k`` (``k`` = chunk size, hidden width ``h`` = ``score_mlp_hidden``, by default ``k``
  as published) to ``k`` learned scores per position.

**Super-Bit LSH.** With ``b = min(L // k + (L // k) % 2, 128)`` buckets, every hash round ``t``
draws a random matrix ``R_t`` of shape ``[C / r, b]`` with orthonormal columns (or rows) and assigns
position ``p`` to bucket ``argmax(m_p R_t)``. Within a round, positions are sorted by bucket
(ties by position), the sorted sequence is padded to a multiple of ``k`` by repeating its last
elements, and cut into ``n`` chunks of ``k``.

**Attention.** A query ``i`` in chunk ``c`` attends to the ``(2a + 1) k`` keys ``j`` of chunks
``c - a .. c + a`` (cyclically, ``a = adjacent_chunks``; the published layer has ``a = 1``: its own,
the previous and the next chunk) of the same round, with the score

    s(i, j) = m_i . (m_j / max(|m_j|, 5e-5)) + fc(u_j)[slot(i)],

where ``slot(i)`` is the query's place inside its chunk: the MLP learns, per key, how much each
query slot should trust it. The round's output is ``y_t(i) = sum_j softmax_j(s(i, j)) v_j`` and its
confidence ``c_t(i) = logsumexp_j s(i, j)``. Rounds are mixed per position with weights
``softmax_t(c_t(i))``, and the layer returns ``x + res_scale * sum_t w_t(i) y_t(i)``. When
``2a + 1 > n`` the cyclic neighbourhood wraps round and visits some chunks more than once (as the
published code does for ``n = 2``, whose previous and next chunk coincide): every visit counts, so
such a chunk's keys enter the softmax once per visit.

**Variants** (:mod:`dlsn.models.attention`): :class:`~dlsn.models.attention.LSHAttention` is this
layer without the learned term (``s(i, j) = m_i . m_j / |m_j|``, no ``u`` and no MLP: NLSN's sparse
attention with GLA's hashing and chunks); :class:`~dlsn.models.attention.NonLocalAttention` the
same dot-product score over all ``L`` keys (no hashing).

**Small inputs.** When ``L < k`` (the published code crashes there) the whole sequence is a single
chunk of ``L`` positions and the learned score uses the first ``L`` slots of ``fc``. The previous and
next chunk are then the chunk itself, so each query sees every position: this is exactly what the
published code computes when ``L == k``. ``b`` is at least 1.

**Why this implementation is faster than the published one** while computing the same numbers:
``fc(u_j)`` depends only on the key position, so it is evaluated once per position (``L`` rows)
rather than on the ``3 * n_hashes * L`` gathered copies; keys are normalised once before gathering;
the learned scores are added inside the score matmul (``baddbmm``); rounds are processed one at a
time so that inference holds one round's score tensor at a time. The three embeddings are one stacked
convolution (the match embedding apart where it must be true float32), and in training one autograd
node whose backward runs one convolution backward for all three
(:func:`~dlsn.models.float32_ops.relu_convolution_groups`).

Under autocast, and on CUDA whatever the TF32 settings, the match embedding is computed in true
float32 (:mod:`dlsn.models.float32_ops`) and hashing runs in float32, so the bucket assignment adds
no rounding of its own (features entering the layer still carry the network's precision); softmax
and log-sum-exp run in float32.

**Two implementations of the chunk attention** (``attention_impl``): ``"reference"`` is the
PyTorch code below (``_attend_round``), ``"fused"`` the Triton kernel of
:mod:`dlsn.models.chunk_attention` (one fused operation per layer, no gathered copies; on the CPU it runs
in Triton's interpreter, for tests only). ``"auto"`` (default) takes the fused kernel on CUDA when
Triton is installed, for half-precision (autocast) values and for float32 ones where TF32 matrix
products are allowed (``torch.set_float32_matmul_precision("high")``), else the reference; a kernel
failure there warns once and falls back. The kernel computes the published neighbourhood only
(``adjacent_chunks = 1``): for other values ``"auto"`` takes the reference and ``"fused"`` is refused.

**Looking at one query** (:meth:`GLA.query_attention`): the per-round keys, score terms, softmax
weights and round weights of one query position, recomputed apart from ``forward`` (which keeps
none of them), for ``scripts/visualize_attention.py``.

**Random rotations** during training are drawn on the input's device (:func:`draw_rotations_on_device`,
no host copy or synchronisation, so a training step can be a CUDA graph); on the CPU, and with a
``rotation_seed`` (evaluation), they are drawn on the CPU exactly as the published code does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlsn.models import chunk_attention as fused
from dlsn.models import float32_ops
from dlsn.models.conv_epilogue import conv2d_epilogue

ATTENTION_IMPLS = ("auto", "reference", "fused")
MAX_BUCKETS = 128
KEY_NORM_EPS = 5e-5
CPU_BLOCK_BYTES = 16 * 2**20  # largest per-block temporary of CPU inference (see GLA._reference_rounds)


def number_of_buckets(length: int, chunk_size: int) -> int:
    """Hash buckets for a sequence of ``length`` positions (the published rule, at least 1)."""
    chunks = length // chunk_size
    return max(1, min(chunks + chunks % 2, MAX_BUCKETS))


def draw_rotations(
    n_hashes: int, dim: int, n_buckets: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random SB-LSH matrices ``[n_hashes, dim, n_buckets]``, drawn on the CPU.

    One ``orthogonal_`` call per round on an empty ``[dim, n_buckets]`` tensor, rounds in order:
    with the global generator this consumes random numbers exactly like the published code.
    """
    rounds = [
        nn.init.orthogonal_(torch.empty(dim, n_buckets), generator=generator) for _ in range(n_hashes)
    ]
    return torch.stack(rounds)


def orthonormal_columns(matrix: torch.Tensor) -> torch.Tensor:
    """``Q`` of the QR decomposition ``matrix = Q R`` with ``diag(R) > 0``, for tall ``[..., m, n]``.

    This is the ``Q`` of ``nn.init.orthogonal_`` (which flips the signs of ``torch.linalg.qr``'s
    columns to make ``diag(R)`` positive), computed by shifted Cholesky QR in float64: three times
    ``R = cholesky(Q^T Q)``, ``Q = Q R^-1`` (the first time with ``Q^T Q`` shifted by a tiny multiple of
    the identity so that it is positive definite even for a near-singular matrix; Fukaya et al., SIAM
    J. Sci. Comput. 2020). Matrix products, ``cholesky_ex`` and triangular solves only: no operation
    waits for the host (``torch.linalg.qr`` on CUDA may), so it can be captured in a CUDA graph.
    """
    rows, cols = matrix.shape[-2:]
    q = matrix.double()
    norm_squared = q.square().sum(dim=(-2, -1), keepdim=True)
    shift = 11 * (rows * cols + cols * (cols + 1)) * torch.finfo(torch.float64).eps * norm_squared
    for iteration in range(3):
        gram = q.mT @ q
        if iteration == 0:  # in place on the diagonal: fewer kernel launches than adding shift * identity
            gram.diagonal(dim1=-2, dim2=-1).add_(shift.squeeze(-1))
        upper = torch.linalg.cholesky_ex(gram, upper=True).L
        q = torch.linalg.solve_triangular(upper, q, upper=True, left=False)  # q @ upper^-1
    return q.to(matrix.dtype)


def draw_rotations_on_device(n_hashes: int, dim: int, n_buckets: int, device) -> torch.Tensor:
    """Random SB-LSH matrices ``[n_hashes, dim, n_buckets]`` drawn on ``device`` with its default generator.

    The same distribution as :func:`draw_rotations` (orthonormal columns, or rows when
    ``dim < n_buckets``, uniformly distributed): every round's Gaussian matrix is orthonormalised at
    once by :func:`orthonormal_columns` (on CUDA in eager mode, for small matrices, the same Q by
    Gram-Schmidt in one kernel: :func:`dlsn.models.chunk_attention.orthonormal_columns_fast`). Used for
    training on GPUs (no host-to-device copy).
    """
    gaussian = torch.randn(n_hashes, max(dim, n_buckets), min(dim, n_buckets), device=device)
    # One Triton kernel for small draws on CUDA in eager mode: Cholesky QR's thirty-odd small launches were
    # about a tenth of the host's time for a batch-1 GLA forward+backward (0.7 of 6.6 ms, H200, 2026-11-28).
    rotations = fused.orthonormal_columns_fast(gaussian, orthonormal_columns)
    return rotations if dim >= n_buckets else rotations.transpose(1, 2)


def hash_codes(match: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """SB-LSH bucket of every position in every round: ``argmax(m_p R_t)``, ``[N, T, L]``.

    Always computed in true float32 (autocast off, no TF32): an argmax flips on tiny rounding
    differences, and buckets should not depend on the compute precision. On CUDA one fused kernel
    (:func:`dlsn.models.chunk_attention.bucket_codes`) whatever ``attention_impl`` is, so that the fused
    and the reference attention always see the same buckets.
    """
    return fused.bucket_codes(match.detach(), rotations)  # bucket_codes turns autocast off itself


def sort_into_chunks(codes: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every round's positions sorted by bucket, and where each position landed.

    Returns ``order [N, T, P]``: positions sorted by (bucket, position), padded to a multiple ``P`` of
    ``chunk`` by repeating the last ``P - L`` sorted positions; and ``inverse [N, T, L]``: the sorted
    index of every position (its first occurrence).
    """
    length = codes.shape[-1]
    positions = torch.arange(length, device=codes.device)
    # Unique sort keys (bucket, position) give the stable order on every device.
    order = torch.argsort(codes * length + positions, dim=-1)
    inverse = torch.empty_like(order).scatter_(2, order, positions.expand_as(order))
    padding = -length % chunk
    if padding:
        order = torch.cat([order, order[..., -padding:]], dim=-1)
    return order, inverse


def take_rows(table: torch.Tensor, index: torch.Tensor, rows_per_group: int) -> torch.Tensor:
    """Rows ``table[n, index[n]]`` of a ``[N, R, D]`` table, as ``[-1, rows_per_group, D]``.

    Whole rows are copied with ``index_select`` on the flattened table (``index_add`` in backward),
    which is much faster than an element-wise ``gather``.
    """
    batch, rows_per_item, depth = table.shape
    item_offsets = torch.arange(batch, device=table.device).view(batch, 1) * rows_per_item
    flat_index = (index.reshape(batch, -1) + item_offsets).flatten()
    rows = table.reshape(batch * rows_per_item, depth).index_select(0, flat_index)
    return rows.view(-1, rows_per_group, depth)


def neighbour_chunk_table(n_chunks: int, adjacent_chunks: int, device=None) -> torch.Tensor:
    """For every chunk ``c``, the chunks its queries attend to: ``[n_chunks, 2a + 1]``.

    Columns: ``c``, ``c - 1``, ``c + 1``, ``c - 2``, ``c + 2``, ... (cyclic; ``a = adjacent_chunks``).
    For ``a = 1`` this is the published own / previous / next order (the order sets how the softmax
    sums, so it is kept for bit-identical results).
    """
    chunk_ids = torch.arange(n_chunks, device=device)
    columns = [chunk_ids]
    for distance in range(1, adjacent_chunks + 1):
        columns += [(chunk_ids - distance) % n_chunks, (chunk_ids + distance) % n_chunks]
    return torch.stack(columns, dim=1)


def _concat_blocks(blocks: list[torch.Tensor]) -> torch.Tensor:
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)


class _SoftmaxAndLogSumExp(torch.autograd.Function):
    """``softmax(s)`` and ``logsumexp(s)`` over dim 1, saving only the softmax for backward.

    Both gradients are expressed through ``p = softmax(s)``: ``d lse / d s = p`` and
    ``d p_i / d s_j = p_i (delta_ij - p_j)``, so autograd need not keep ``s`` as well.
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor):
        confidence = torch.logsumexp(scores, dim=1, keepdim=True)
        weights = torch.exp(scores - confidence)
        ctx.save_for_backward(weights)
        return weights, confidence

    @staticmethod
    def backward(ctx, grad_weights, grad_confidence):
        (weights,) = ctx.saved_tensors
        grad = torch.zeros_like(weights) if grad_confidence is None else grad_confidence.expand_as(weights)
        if grad_weights is not None:
            grad = grad + grad_weights - (grad_weights * weights).sum(dim=1, keepdim=True)
        return weights * grad


def softmax_and_logsumexp(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax weights ``[B, J, I]`` and log-sum-exp ``[B, 1, I]`` of ``scores`` over dim 1."""
    if torch.compiler.is_compiling():
        # The same formula without the autograd.Function: torch.compile decides what backward keeps, and
        # AOTAutograd will not cache a graph that holds an autograd.Function on disk.
        confidence = torch.logsumexp(scores, dim=1, keepdim=True)
        return torch.exp(scores - confidence), confidence
    return _SoftmaxAndLogSumExp.apply(scores)


class _NormalizeKeys(torch.autograd.Function):
    """``k = m / max(|m|, eps)`` over the last dim, with the gradient in a few operations.

    ``dm = (dk - k (k . dk)) / |m|`` where ``|m| > eps``, and ``dk / eps`` where the norm was clamped:
    the same as autograd's through norm, clamp and division (about fifteen kernels in backward, here five).
    """

    @staticmethod
    def forward(ctx, match: torch.Tensor):
        norm = torch.linalg.vector_norm(match, dim=-1, keepdim=True).clamp_min_(KEY_NORM_EPS)
        keys = match / norm
        ctx.save_for_backward(keys, norm)
        return keys

    @staticmethod
    def backward(ctx, grad_keys):
        keys, norm = ctx.saved_tensors
        projection = (keys * grad_keys).sum(dim=-1, keepdim=True) * (norm > KEY_NORM_EPS)
        return torch.addcmul(grad_keys, keys, projection, value=-1) / norm


def normalize_keys(match: torch.Tensor) -> torch.Tensor:
    """``F.normalize(match, dim=-1, eps=KEY_NORM_EPS)``; under autograd with a shorter backward."""
    if torch.compiler.is_compiling() or not (torch.is_grad_enabled() and match.requires_grad):
        # torch.compile fuses autograd's own backward (and would not cache a graph with an autograd.Function).
        return F.normalize(match, p=2, dim=-1, eps=KEY_NORM_EPS)
    return _NormalizeKeys.apply(match)


@dataclass
class QueryAttention:
    """What one query position of an attention layer looks at (:meth:`GLA.query_attention`).

    Per hash round ``t`` (one "round" for non-local attention) and key ``j`` of the query's
    neighbourhood: ``key_positions [T, K]`` (flat image positions ``row * width + col``; a position
    can appear more than once, e.g. a padded copy), the score terms ``dot_scores`` (``m_i . m_j /
    |m_j|``) and ``learned_scores`` (``fc(u_j)[slot(i)]``, ``None`` for layers without it),
    ``weights = softmax_j(dot + learned)`` and the round's mixing weight ``round_weights [T]`` =
    ``softmax_t(logsumexp_j(dot + learned))``, all float32. ``height`` and ``width`` are the
    feature map's.
    """

    key_positions: torch.Tensor
    dot_scores: torch.Tensor
    learned_scores: torch.Tensor | None
    weights: torch.Tensor
    round_weights: torch.Tensor
    height: int
    width: int

    def heatmap(self, scores: str = "attention") -> torch.Tensor:
        """``[height, width]``: the weight each position receives, summed over its copies and over the
        rounds, each round weighted by ``round_weights`` (the layer's own mixing weights).

        ``scores``: ``"attention"`` (the layer's weights), ``"dot_product"`` (softmax of the
        dot-product term alone over the same keys) or ``"learned"`` (softmax of the learned term
        alone; only for layers with one). Every map sums to 1.
        """
        if scores == "attention":
            weights = self.weights
        elif scores == "dot_product":
            weights = torch.softmax(self.dot_scores, dim=-1)
        elif scores == "learned":
            if self.learned_scores is None:
                raise ValueError("this attention layer has no learned score term")
            weights = torch.softmax(self.learned_scores, dim=-1)
        else:
            raise ValueError(f"scores must be 'attention', 'dot_product' or 'learned', got {scores!r}")
        per_key = weights * self.round_weights.unsqueeze(-1)
        heat = per_key.new_zeros(self.height * self.width)
        heat.index_add_(0, self.key_positions.flatten(), per_key.flatten())
        return heat.view(self.height, self.width)


class GLA(nn.Module):
    """Global Learnable Attention layer (see the module docstring for the math).

    Args:
        channels: feature channels ``C``.
        chunk_size: positions per attention chunk ``k``.
        n_hashes: SB-LSH rounds.
        reduction: channel reduction ``r`` of the match embedding.
        res_scale: scale of the attention output before the residual addition.
        attention_impl: ``"auto"`` (fused kernel on CUDA when available), ``"reference"`` or
            ``"fused"`` (see the module docstring).
        score_mlp_hidden: hidden width ``h`` of the learned-score MLP ``C -> h -> k``; ``None``
            (default) is the published ``h = chunk_size``.
        adjacent_chunks: chunks ``a`` attended on each side of a query's own chunk (published: 1).

    Hash rotations come from, in order of precedence: the ``rotations`` argument of ``forward``;
    a fixed CPU generator seeded with ``self.rotation_seed`` (set it for reproducible evaluation:
    the same output on every run and device); otherwise fresh random ones on every call (training,
    as in the paper): from the global CPU generator for CPU inputs, from the device's generator else.
    """

    #: Whether the score has the learned term ``fc(u_j)[slot(i)]`` (:class:`LSHAttention`: no).
    learns_scores = True

    def __init__(
        self,
        channels: int,
        chunk_size: int = 128,
        n_hashes: int = 3,
        reduction: int = 4,
        res_scale: float = 1.0,
        attention_impl: str = "auto",
        score_mlp_hidden: int | None = None,
        adjacent_chunks: int = 1,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for key, value in (("channels", channels), ("chunk_size", chunk_size),
                           ("n_hashes", n_hashes), ("reduction", reduction)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {key} must be a positive integer, got {value!r}")
        if score_mlp_hidden is not None and (not isinstance(score_mlp_hidden, int) or score_mlp_hidden < 1):
            raise ValueError(f"{name}: score_mlp_hidden must be a positive integer or None (= chunk_size), "
                             f"got {score_mlp_hidden!r}")
        if not isinstance(adjacent_chunks, int) or adjacent_chunks < 0:
            raise ValueError(f"{name}: adjacent_chunks must be a non-negative integer, got {adjacent_chunks!r}")
        if channels % reduction:
            raise ValueError(f"{name}: channels ({channels}) must be divisible by reduction ({reduction})")
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"{name}: attention_impl must be one of {', '.join(ATTENTION_IMPLS)}, got {attention_impl!r}")
        if attention_impl == "fused" and adjacent_chunks != 1:
            raise ValueError(f"{name}: attention_impl='fused' computes the published neighbourhood only "
                             f"(adjacent_chunks=1), got adjacent_chunks={adjacent_chunks}; use 'auto' or 'reference'")
        self.channels = channels
        self.chunk_size = chunk_size
        self.n_hashes = n_hashes
        self.reduction = reduction
        self.res_scale = res_scale
        self.attention_impl = attention_impl
        self.adjacent_chunks = adjacent_chunks
        self.rotation_seed: int | None = None

        self.match_embedding = nn.Conv2d(channels, channels // reduction, 3, padding=1)
        self.value_embedding = nn.Conv2d(channels, channels, 3, padding=1)
        if self.learns_scores:
            self.score_mlp_hidden = chunk_size if score_mlp_hidden is None else score_mlp_hidden
            self.score_embedding = nn.Conv2d(channels, channels, 3, padding=1)
            self.score_mlp = nn.Sequential(
                nn.Linear(channels, self.score_mlp_hidden), nn.ReLU(inplace=True),
                nn.Linear(self.score_mlp_hidden, chunk_size),
            )

    def extra_repr(self) -> str:
        knobs = f", score_mlp_hidden={self.score_mlp_hidden}" if self.learns_scores else ""
        return (f"channels={self.channels}, chunk_size={self.chunk_size}, n_hashes={self.n_hashes}, "
                f"reduction={self.reduction}, res_scale={self.res_scale}, attention_impl={self.attention_impl}, "
                f"adjacent_chunks={self.adjacent_chunks}{knobs}")

    def _rotations(self, n_buckets: int, rotations: torch.Tensor | None, device) -> torch.Tensor:
        expected = (self.n_hashes, self.channels // self.reduction, n_buckets)
        if rotations is None:
            if self.rotation_seed is not None:
                rotations = draw_rotations(*expected, generator=torch.Generator().manual_seed(self.rotation_seed))
            elif device.type == "cpu":
                rotations = draw_rotations(*expected)  # the global generator, as the published code
            else:
                return draw_rotations_on_device(*expected, device=device)
        elif tuple(rotations.shape) != expected:
            raise ValueError(
                f"GLA: rotations must have shape [n_hashes, channels // reduction, n_buckets] = "
                f"{list(expected)} for this input, got {list(rotations.shape)}"
            )
        return rotations.to(device=device, dtype=torch.float32)

    def _embeddings(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Match, value and learnable-score embeddings as ``[N, L, D]`` tokens (the last ``None``
        for layers without the learned score).

        The convolutions share their input, so they run as one convolution with the weights
        stacked: one large matrix product instead of several smaller ones. The (small) match
        convolution runs apart in true float32 under autocast and on CUDA (where float32
        convolutions may use TF32): bucket assignment is an argmax, and rounding of its inputs
        would move positions between buckets. In eager training without autocast they are one
        autograd node with one backward convolution (:func:`float32_ops.relu_convolution_groups`).
        """
        # Channels-last convolutions give [N, H, W, D] memory: the [N, L, D] tokens are a view whose
        # rows can be gathered without another copy (and mkldnn convolves it a little faster).
        x = x.contiguous(memory_format=torch.channels_last)

        def tokens(feature_map: torch.Tensor) -> torch.Tensor:
            return feature_map.permute(0, 2, 3, 1).flatten(1, 2)

        convs = [self.match_embedding, self.value_embedding]
        if self.learns_scores:
            convs.append(self.score_embedding)
        match_apart = float32_ops.match_convolution_apart(x)
        if float32_ops.relu_convolutions_in_one_node(x, *(conv.weight for conv in convs)):
            # Training: one autograd node, whose backward runs one convolution backward for all of them.
            parts = float32_ops.relu_convolution_groups(
                x, torch.cat([conv.weight for conv in convs]), torch.cat([conv.bias for conv in convs]),
                [conv.out_channels for conv in convs], padding=1, first_in_float32=match_apart)
            parts = tuple(tokens(part) for part in parts)
            return parts if self.learns_scores else (*parts, None)
        match = None
        if match_apart:
            # ReLU in place: the map is large and the convolution's backward does not need its output.
            match_map = float32_ops.conv2d_float32(x, self.match_embedding.weight, self.match_embedding.bias, 1)
            match = tokens(F.relu(match_map, inplace=True))
            convs = convs[1:]
        weight = torch.cat([conv.weight for conv in convs])
        bias = torch.cat([conv.bias for conv in convs])
        # Bias and ReLU (in place) in one pass over the stacked maps in GPU inference (conv_epilogue).
        parts = tokens(conv2d_epilogue(x, weight, bias, padding=1, relu=True))
        parts = parts.split([c.out_channels for c in convs], dim=-1)
        parts = parts if match is None else (match, *parts)
        return parts if self.learns_scores else (*parts, None)

    def _uses_fused_kernel(self, value: torch.Tensor) -> bool:
        if self.attention_impl != "auto":
            return self.attention_impl == "fused"
        if self.adjacent_chunks != 1:  # the kernel's neighbourhood is own, previous and next chunk
            return False
        # float32 values: only where TF32 matrix products are allowed (the kernel's true-float32 dot
        # products are slow); half precision (autocast) always.
        precision_ok = value.dtype in (torch.bfloat16, torch.float16) or (
            value.dtype == torch.float32 and fused.tf32_matmuls_allowed())
        return value.is_cuda and precision_ok and fused.triton_available() and fused.fused_kernel_failure() is None

    @staticmethod
    def _attend_round(match, keys, learned_score, value, sorted_positions, neighbour_chunks, chunks_per_block):
        """One hash round: each chunk's queries attend to the keys of their chunk and its neighbours.

        ``sorted_positions`` ``[N, n, k]`` holds the round's chunks, ``neighbour_chunks`` ``[n, 2a+1]``
        the chunks each one attends to; ``learned_score`` is ``None`` for layers without it. Returns
        the attended values ``[N, n*k, C]`` and the log-sum-exp confidences ``[N, n*k]``, both in the
        round's sorted order.
        """
        batch, n_chunks, chunk = sorted_positions.shape
        n_keys = neighbour_chunks.shape[1] * chunk
        attended_blocks, confidence_blocks = [], []
        for first in range(0, n_chunks, chunks_per_block):
            block = slice(first, first + chunks_per_block)
            key_positions = sorted_positions[:, neighbour_chunks[block]]  # [N, b, 2a+1, k]
            queries = take_rows(match, sorted_positions[:, block], chunk)  # [N*b, k, d]
            # Scores laid out keys x queries: [N*b, (2a+1)k, k], s[j, i] = key_j . q_i + fc(u_j)[slot(i)]
            similarity_keys = take_rows(keys, key_positions, n_keys)
            if learned_score is None:
                scores = torch.bmm(similarity_keys, queries.transpose(1, 2))
            else:
                scores = torch.baddbmm(take_rows(learned_score, key_positions, n_keys),
                                       similarity_keys, queries.transpose(1, 2))
            weights, confidence = softmax_and_logsumexp(scores.float())
            attended = torch.bmm(weights.to(value.dtype).transpose(1, 2),
                                 take_rows(value, key_positions, n_keys))  # [N*b, k, C]
            attended_blocks.append(attended.reshape(batch, -1, value.shape[-1]))
            confidence_blocks.append(confidence.reshape(batch, -1))
        return _concat_blocks(attended_blocks), _concat_blocks(confidence_blocks)

    def _reference_rounds(self, match, keys, learned_score, value, order, inverse):
        """Per round: attended values ``[N, L, C]`` and confidences ``[N, L]`` in image order."""
        batch, _, padded = order.shape
        length = inverse.shape[-1]
        chunk = min(self.chunk_size, length)
        n_chunks = padded // chunk
        # For every chunk: itself and adjacent_chunks chunks on each side (cyclic).
        neighbour_chunks = neighbour_chunk_table(n_chunks, self.adjacent_chunks, order.device)

        # Inference on the CPU runs in blocks of chunks: glibc's malloc serves tensors above 32 MB
        # with fresh mmap pages and unmaps them when freed, so big per-round temporaries would be
        # page-faulted in again on every call (time grew faster than L at 192x192), and blocks also
        # lower the peak memory. Not under autograd: the saved tensors keep every block alive anyway,
        # and each block's gathers would produce a full-size gradient. CUDA's caching allocator has
        # no such cost and runs fewer, larger kernels faster.
        chunks_per_block = n_chunks
        if match.device.type == "cpu" and not torch.is_grad_enabled():
            gathered_values_per_chunk = batch * neighbour_chunks.shape[1] * chunk * value.shape[-1] * value.element_size()
            chunks_per_block = max(1, CPU_BLOCK_BYTES // gathered_values_per_chunk)

        round_outputs, round_confidences = [], []
        for hash_round in range(self.n_hashes):
            sorted_positions = order[:, hash_round].view(batch, n_chunks, chunk)
            attended, confidence = self._attend_round(
                match, keys, learned_score, value, sorted_positions, neighbour_chunks, chunks_per_block
            )
            # Back to image order: the first copy of every position; padded copies are dropped.
            round_outputs.append(take_rows(attended, inverse[:, hash_round], length))
            round_confidences.append(confidence.gather(1, inverse[:, hash_round]))
        return round_outputs, round_confidences

    def _attention_rounds(self, x: torch.Tensor, rotations: torch.Tensor | None):
        """Embeddings, hashing and chunk attention: the attended values and the confidences in image order
        (float32, or the reference's compute precision): ``[N, T, L, C]`` and ``[N, T, L]`` tensors from
        the fused kernel, per-round lists of ``[N, L, C]`` and ``[N, L]`` from the reference; or, where
        the fused kernel's float32 training mixes the rounds in the same autograd node
        (:func:`~dlsn.models.chunk_attention.attend_and_mix`), the mixed ``[N, L, C]`` and ``None``."""
        batch, _, height, width = x.shape
        length = height * width
        chunk = min(self.chunk_size, length)
        rotations = self._rotations(number_of_buckets(length, self.chunk_size), rotations, x.device)

        match, value, score_input = self._embeddings(x)
        # fc(u_j) depends only on the key position: evaluate it once per position, gather later. On the
        # [N*L, C] matrix (a view): linear() takes the strided 3-D tokens through matmul and a separate bias
        # addition, a 2-D input through one addmm.
        learned_score = (None if score_input is None
                         else self.score_mlp(score_input.flatten(0, 1)).view(batch, length, -1)[..., :chunk])
        keys = normalize_keys(match)
        order, inverse = sort_into_chunks(hash_codes(match, rotations), chunk)

        if self._uses_fused_kernel(value):
            if learned_score is None:  # the kernel always adds a learned term: zero here
                learned_score = value.new_zeros(batch, length, chunk)
            # Queries and keys in the values' precision, as the reference's autocast matmul uses them.
            arguments = (match.to(value.dtype), keys.to(value.dtype), learned_score, value, order, inverse)
            if fused.attends_and_mixes(value, self.n_hashes):
                return fused.attend_and_mix(*arguments, fallback=self.attention_impl == "auto"), None
            return fused.chunk_attention(*arguments, fallback=self.attention_impl == "auto")
        return self._reference_rounds(match, keys, learned_score, value, order, inverse)

    def forward(self, x: torch.Tensor, rotations: torch.Tensor | None = None) -> torch.Tensor:
        batch, channels, height, width = x.shape
        # The embeddings (three feature maps' worth) die with _attention_rounds' frame: without
        # autograd (inference) they are freed before the rounds are mixed, which sets the peak memory.
        attended, confidences = self._attention_rounds(x, rotations)
        attention = attended if confidences is None else self._mix_rounds(attended, confidences)
        # Added to x through a channels-last view.
        attention = attention.view(batch, height, width, channels).permute(0, 3, 1, 2)
        return torch.add(x, attention.to(x.dtype), alpha=self.res_scale)

    def _mix_rounds(self, attended, confidences) -> torch.Tensor:
        """Mix rounds per position by the softmax of their log-sum-exp confidences: ``[N, L, C]``."""
        if not torch.is_tensor(confidences):
            confidences = torch.stack(confidences, dim=1)
        round_weights = torch.softmax(confidences, dim=1)  # [N, T, L]
        if torch.is_tensor(attended) and fused.mix_in_one_kernel(attended):
            # A large fused-kernel output [N, T, L, C]: one kernel forward and one backward, no temporaries.
            attention = fused.mix_rounds(attended, round_weights, fallback=self.attention_impl == "auto")
        elif torch.is_grad_enabled():
            # Training: one product and one sum, and as few operations in backward, whatever the number of
            # rounds (GLA's forward and backward at batch 1 are bound by the host's kernel launches).
            if not torch.is_tensor(attended):
                attended = torch.stack(attended, dim=1)
            attention = (attended * round_weights.unsqueeze(-1)).sum(1)
        else:
            # Inference: accumulated in place round by round, no [N, T, L, C] product: at large inputs
            # every [L, C] temporary is a fresh allocation (and page faults) less.
            rounds = attended.unbind(1) if torch.is_tensor(attended) else attended
            weights = round_weights.unsqueeze(-1).unbind(1)
            attention = rounds[0] * weights[0]
            for output, weight in zip(rounds[1:], weights[1:]):
                attention.addcmul_(output, weight)
        return attention

    @torch.no_grad()
    def query_attention(self, x: torch.Tensor, position: int,
                        rotations: torch.Tensor | None = None) -> QueryAttention:
        """The attention of one query ``position`` (flat ``row * width + col``) for the input ``x``
        ``[1, C, H, W]``: see :class:`QueryAttention`.

        Recomputes the embeddings and the hashing as ``forward`` does (rotations from the same
        source: pass the same ``rotations``, or set ``rotation_seed``, to see what a forward pass
        saw), then only this query's scores against its neighbourhood in every round, in float32.
        ``forward`` is untouched: this costs one embedding pass and nothing during training.
        """
        batch, _, height, width = x.shape
        length = height * width
        if batch != 1:
            raise ValueError(f"{type(self).__name__}.query_attention: expected one image, got a batch of {batch}")
        if not 0 <= position < length:
            raise ValueError(f"{type(self).__name__}.query_attention: position {position} is outside the "
                             f"{height}x{width} feature map")
        chunk = min(self.chunk_size, length)
        rotations = self._rotations(number_of_buckets(length, self.chunk_size), rotations, x.device)
        with torch.autocast(x.device.type, enabled=False):
            match, value, score_input = self._embeddings(x.float())
            learned_score = None if score_input is None else self.score_mlp(score_input)[0, :, :chunk]
        keys = F.normalize(match[0], p=2, dim=-1, eps=KEY_NORM_EPS)
        query = match[0, position]
        order, inverse = sort_into_chunks(hash_codes(match, rotations), chunk)
        n_chunks = order.shape[-1] // chunk
        neighbour_chunks = neighbour_chunk_table(n_chunks, self.adjacent_chunks, x.device)

        key_positions, dot_scores, learned_scores = [], [], []
        for hash_round in range(self.n_hashes):
            own_chunk, slot = divmod(int(inverse[0, hash_round, position]), chunk)
            chunks = order[0, hash_round].view(n_chunks, chunk)
            positions = chunks[neighbour_chunks[own_chunk]].flatten()  # [(2a+1)k], own chunk first
            key_positions.append(positions)
            dot_scores.append(keys[positions] @ query)
            if learned_score is not None:
                learned_scores.append(learned_score[positions, slot])
        dot = torch.stack(dot_scores)
        learned = torch.stack(learned_scores) if learned_scores else None
        scores = dot if learned is None else dot + learned
        return QueryAttention(
            key_positions=torch.stack(key_positions), dot_scores=dot, learned_scores=learned,
            weights=torch.softmax(scores, dim=-1), round_weights=torch.softmax(torch.logsumexp(scores, dim=-1), dim=0),
            height=height, width=width,
        )


def set_rotation_seed(module: nn.Module, seed: int | None) -> None:
    """Fix (``seed`` an int) or release (``None``) the hash rotations of every GLA in ``module``
    (LSH attention included: it is a GLA without the learned score).

    GLA layers get ``seed + i`` in forward order, so that different layers use different
    rotations while every forward pass, on any device, uses the same ones.
    """
    for index, layer in enumerate(gla_layers(module)):
        layer.rotation_seed = None if seed is None else seed + index


def gla_layers(module: nn.Module) -> Sequence[GLA]:
    """The GLA layers of ``module`` in registration (= forward) order."""
    return [m for m in module.modules() if isinstance(m, GLA)]
