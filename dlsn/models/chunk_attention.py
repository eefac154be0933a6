"""GLA's per-round chunk attention as one fused Triton kernel (forward and backward).

**What is computed.** For every batch item ``n`` and hash round ``t``, ``order[n, t]`` lists the
``L`` positions sorted by bucket, padded to ``P = n_chunks * k`` entries by repeating the last
``P - L`` of them, and cut into chunks of ``k``. Query ``i`` (sorted index ``s``, chunk ``c``, slot
``r = s mod k``) attends to the ``3k`` keys of chunks ``c - 1``, ``c`` and ``c + 1`` (cyclically):

    s(i, j) = q_i . k_j + ls[j, r]          (k_j already normalised by the caller)
    y(i)    = sum_j softmax_j(s(i, j)) v_j,     lse(i) = log sum_j exp s(i, j)

This is attention with a block-banded mask in sorted order (block = chunk, bandwidth 3). The learned
score is a per-key row ``ls[j]`` indexed by the query's slot, equivalently an extra dot product
``one_hot(r) . ls[j]``. Outputs are returned in image order, one row per position (the first
sorted occurrence; the padded duplicates only serve as keys): ``attended [N, T, L, C]`` and the
log-sum-exp ``confidence [N, T, L]``, which the caller needs, with its gradient, to mix the rounds.
Both are float32 whatever the inputs' precision (see the backward's row term below).

**Forward kernel** (flash-attention style). One program per (query block of one chunk, item and
round, block of value channels). It reads its query rows and, in turn, each neighbour chunk's key,
learned-score and value rows straight from the unsorted ``[N, L, D]`` tensors through ``order``
(no sorted or 3x gathered copies are made), keeps a running maximum and sum of ``exp`` (online
softmax) and a float32 accumulator, and writes ``y`` and ``lse`` to the rows' image positions.
Alternatively (``FORWARD_MODE``, ``"weights+matmul"``: :func:`_forward_by_matmul`) the same kernel reads no
values, stores the normalised weights ``P`` in a second pass over the keys, and one batched matrix product
(cuBLAS) over the values' rows in sorted order computes ``y``; the float32 training steps time both.

**Backward.** With ``P = softmax(S)``, incoming ``dy`` and ``dlse``, ``dP_ij = dy_i . v_j`` and the
row term ``delta_i = sum_j P_ij dP_ij - dlse_i``:  ``dV_j = sum_i P_ij dy_i``,
``dS_ij = P_ij (dP_ij - delta_i)``,  ``dQ_i = sum_j dS_ij k_j``,  ``dK_j = sum_i dS_ij q_i``,
``dls[j, r] = sum over the queries i in slot r of dS_ij``. ``P`` is recomputed from the saved
``lse``. Two kernels avoid atomics: one program per *query* block accumulates ``dQ`` over its three
key chunks, then one per *key* block accumulates ``dK, dV, dls`` over the queries of the three
chunks that see it (chunks ``c + 1``, ``c``, ``c - 1``). For float32 values ``delta_i = dy_i . y_i -
dlse_i`` (flash-attention's shortcut). In half precision ``y`` was accumulated from rounded weights,
and that shortcut would break ``sum_j dS_ij = dlse_i`` by errors that do not average out (the learned
score's gradient sums them over every query): the query kernel computes the sum itself in a first
pass over its keys and hands ``delta`` to the key kernel. Both kernels write float32 gradient rows
straight to their positions' rows in image order, per round, so only the sum over rounds follows (a
gather per tensor back from sorted order took 2.7 ms of an H200's bf16 training step). A padded
duplicate key (sorted index ``L + i``, the same position as sorted index ``L - pad + i``) writes to
the spare row ``L + i``, and one small indexed addition folds it back. Alternatively
(``BACKWARD_MODE = "atomic"``) the key kernel also adds each key block's share ``dS K`` into a zeroed
dQ with atomic additions and the query kernel is left out (in half precision it still runs its first
pass, for ``delta``): ``P`` and ``dP`` are then recomputed twice instead of three times, at the price
of a summation order that varies from run to run (never used where deterministic algorithms are
required). Either way may also take dV out of the key kernel (``"two_kernels+values"``,
``"atomic+values"``): a values kernel, one program per key block and block of value channels,
accumulates ``dV_j = sum_i P_ij dy_i`` (recomputing ``P`` once more); the key kernel, holding no
``[keys, C]`` accumulator or values, and the query kernel, holding no incoming gradient rows, sum
``dP`` over blocks of channels. Or (``"stored_dS"``, ``"stored_dS+values"``) the query kernel stores
``dS`` (``[N*T, n_chunks, 3, k, k]``, float32) and the key kernel reads it instead of computing ``dP``
again, the largest of its products; it then needs no values, and with the values kernel computing dV
it only sums ``dS^T q`` and ``dS``. ``"stored_dS+matmul"`` has the query kernel store ``P`` as well, key-major,
and computes ``dV`` as one batched matrix product (cuBLAS) over overlapping windows of the incoming
gradient's rows in sorted order (:class:`_SortedWindows`, :func:`_values_gradient_by_matmul`), which one
more kernel sums over the rounds in image order; ``"stored_dS+matmul+dP"`` also computes ``dP = dy V^T`` by
one before the query kernel, which reads it (:func:`_grad_weights_by_matmul`): the kernels then do only the
64-wide products of the scores. By default (``"timed"``) the training steps time every way on first use
(where no GPU sweep settled it, also a few launch configurations of the key, values and query kernels:
``TIMED_KEY_CONFIGS``, ``TIMED_VALUES_CONFIGS``, ``TIMED_QUERIES_CONFIGS``) and keep the fastest
(:mod:`dlsn.models.timed_choice`); elsewhere the two kernels run.

Everything accumulates in float32; inputs may be float32, bfloat16 or float16 (query and key of
one dtype, the softmax weights are cast to the value dtype for the ``P V`` product, as the reference
path does). Float32 dot products use TF32 only where ``torch.backends.cuda.matmul.allow_tf32``
(``torch.set_float32_matmul_precision("high")``) allows it; true float32 dot products are correct
but slow on GPUs (no tensor cores), so GLA's ``auto`` uses the kernel for float32 only with TF32.

**Mixing the rounds** (:func:`mix_rounds`): ``sum_t softmax_t(lse)_t y_t`` in one kernel forward and one
backward (eager, large outputs). For float32 training :func:`attend_and_mix` makes the attention and the
mixing one autograd node, whose backward gets the row term as ``delta_t = w_t (g . m)`` (``w`` the round
weights, ``m`` the mixed output, ``g`` its gradient) and so keeps neither ``y`` nor the confidences' gradient.

**Hashing** (:func:`bucket_codes`, custom op ``dlsn::bucket_codes``): GLA's SB-LSH buckets
``argmax_b m_p . R_t[:, b]`` come from one more kernel on CUDA. One program per block of positions of
one item and round multiplies them with the round's rotation in true float32 (FMA, no TF32: buckets
must not depend on rounding) and keeps only the argmax, so the ``[N, T, L, b]`` projections are never
written (cuBLAS's float32 GEMM for this thin product alone took 0.13 ms per layer on an H200 at the
training size, before a transpose and an argmax).

**Rotations** (:func:`orthonormal_columns_fast`): the training-time SB-LSH matrices drawn on the GPU are
orthonormalised by one kernel (Gram-Schmidt twice, float64, a program per round) where the matrices are
small (at most 64 x 32: the paper layer's inputs up to about 64x64), instead of Cholesky QR's thirty-odd
launches, a tenth of a batch-1 layer's host time.

Under ``torch.compile``, :func:`chunk_attention` is a ``torch.library`` custom op
(``dlsn::chunk_attention``) with its backward registered, so the compiled graph holds one opaque op;
in eager mode the same code runs as an autograd.Function (a custom op's dispatch costs the host about
0.1 ms per forward and backward, and the batch-1 training steps are bound by the host). On the CPU the same
kernels run in Triton's interpreter (slow: tests only). With ``fallback=True`` (GLA's ``auto``), the
first CUDA use runs a small self-check against the reference, and any compile or launch failure
warns once and computes the reference instead (:func:`chunk_attention_reference`, plain PyTorch). A way
other than the defaults (a forward mode, a backward variant) that fails the self-check there is only left
out of the timed choices (:func:`left_out_variants`, warned): the kernels new on a GPU cannot cost the rest.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import warnings
from collections.abc import Collection

import torch

from dlsn.models import timed_choice
from dlsn.models.float32_ops import projections_float32

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
except ImportError:  # the reference path needs no Triton
    triton = None

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_available() -> bool:
    return triton is not None


# --------------------------------------------------------------------------------------------
# Reference: the same math in plain PyTorch (gathered neighbourhoods). Used as the fallback, by the
# self-check and by the tests; GLA's own reference path (gla.py) is leaner in memory.
# --------------------------------------------------------------------------------------------

def _batch_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[n, index[n, ...]]`` for a ``[N, R, D]`` table: ``[N, ..., D]``."""
    batch = torch.arange(table.shape[0], device=table.device).view(-1, *([1] * (index.dim() - 1)))
    return table[batch, index]


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def _scores(queries, keys, learned_score, order, compute):
    """Scores ``[N, T, n, k, 3k]`` of every chunk's queries against its neighbourhood's keys."""
    batch, rounds, padded = order.shape
    chunk = learned_score.shape[-1]
    query_rows = order.view(batch, rounds, padded // chunk, chunk)
    # Previous, own and next chunk (cyclic): roll(1) puts chunk c - 1 at place c.
    key_rows = torch.cat([query_rows.roll(1, dims=2), query_rows, query_rows.roll(-1, dims=2)], dim=3)
    q = _batch_rows(queries, query_rows).to(compute)
    k = _batch_rows(keys, key_rows).to(compute)
    learned = _batch_rows(learned_score, key_rows).to(compute)  # [N, T, n, 3k, slots]
    return q @ k.transpose(-1, -2) + learned.transpose(-1, -2), q, k, key_rows


def _image_order(sorted_rows: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Rows ``[N, T, P, D]`` in sorted order -> ``[N, T, L, D]`` in image order (first occurrences)."""
    return sorted_rows.gather(2, inverse.unsqueeze(-1).expand(-1, -1, -1, sorted_rows.shape[-1]))


def chunk_attention_reference(queries, keys, learned_score, values, order, inverse):
    """Attended values ``[N, T, L, C]`` and log-sum-exp ``[N, T, L]``, float32 (float64 for float64).

    ``queries``/``keys`` ``[N, L, d]`` (keys normalised), ``learned_score`` ``[N, L, k]``, ``values``
    ``[N, L, C]``, ``order`` ``[N, T, P]`` (sorted, padded positions), ``inverse`` ``[N, T, L]`` (the
    sorted index of every position's first occurrence). Computed in float32 (float64 for float64).
    """
    compute = _compute_dtype(values)
    scores, _, _, key_rows = _scores(queries, keys, learned_score, order, compute)
    confidence = torch.logsumexp(scores, dim=-1)
    attended = torch.exp(scores - confidence.unsqueeze(-1)) @ _batch_rows(values, key_rows).to(compute)
    attended = _image_order(attended.flatten(2, 3), inverse)
    confidence = _image_order(confidence.flatten(2, 3).unsqueeze(-1), inverse).squeeze(-1)
    return attended, confidence


def _scatter_rows(rows: torch.Tensor, index: torch.Tensor, length: int) -> torch.Tensor:
    """Sum of ``rows [N, ..., D]`` into a ``[N, length, D]`` table at ``index [N, ...]``."""
    batch, depth = rows.shape[0], rows.shape[-1]
    offsets = torch.arange(batch, device=rows.device).view(-1, *([1] * (index.dim() - 1))) * length
    table = rows.new_zeros(batch * length, depth)
    table.index_add_(0, (index + offsets).flatten(), rows.reshape(-1, depth))
    return table.view(batch, length, depth)


def chunk_attention_reference_backward(grad_attended, grad_confidence, queries, keys, learned_score,
                                       values, order, inverse):
    """Gradients of :func:`chunk_attention_reference` for queries, keys, learned score and values,
    written out (no autograd: it also serves inside the custom op's backward)."""
    compute = _compute_dtype(values)
    batch, rounds, padded = order.shape
    length = inverse.shape[-1]
    scores, q, k, key_rows = _scores(queries, keys, learned_score, order, compute)
    confidence = torch.logsumexp(scores, dim=-1, keepdim=True)
    weights = torch.exp(scores - confidence)
    v = _batch_rows(values, key_rows).to(compute)

    def sorted_grad(grad: torch.Tensor) -> torch.Tensor:  # image order -> sorted rows, 0 for padding
        rows = grad.new_zeros(batch, rounds, padded, grad.shape[-1], dtype=compute)
        rows[:, :, :length] = grad.gather(2, order[:, :, :length, None].expand(-1, -1, -1, grad.shape[-1]))
        return rows.view(*q.shape[:-1], grad.shape[-1])

    grad_out = sorted_grad(grad_attended)
    grad_lse = sorted_grad(grad_confidence.unsqueeze(-1))
    delta = (grad_out * (weights @ v)).sum(-1, keepdim=True) - grad_lse
    grad_scores = weights * (grad_out @ v.transpose(-1, -2) - delta)
    query_rows = order.view(q.shape[:-1])
    grad_queries = _scatter_rows(grad_scores @ k, query_rows, length)
    grad_keys = _scatter_rows(grad_scores.transpose(-1, -2) @ q, key_rows, length)
    grad_learned = _scatter_rows(grad_scores.transpose(-1, -2), key_rows, length)
    grad_values = _scatter_rows(weights.transpose(-1, -2) @ grad_out, key_rows, length)
    return (grad_queries.to(queries.dtype), grad_keys.to(keys.dtype),
            grad_learned.to(learned_score.dtype), grad_values.to(values.dtype))


# --------------------------------------------------------------------------------------------
# Triton kernels. Plain functions, compiled (CUDA) or interpreted (CPU) on first use by _kernel().
# Row r of a table X [N, L, D] for item n is at X + n * stride_n + r * stride_l (unit column stride).
# --------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
        """``a @ b`` accumulated in float32 (on tensor cores for half types)."""
        if INTERPRETED:  # Triton's interpreter multiplies bfloat16 operands as raw integers
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _block_of_chunk(chunk, BLOCK: tl.constexpr):
        """The sorted chunk and the slots in it (with their validity) of this program's block along
        grid axis 0 (``cdiv(chunk, BLOCK)`` blocks per chunk)."""
        blocks_per_chunk = tl.cdiv(chunk, BLOCK)
        slots = (tl.program_id(0) % blocks_per_chunk) * BLOCK + tl.arange(0, BLOCK)
        return tl.program_id(0) // blocks_per_chunk, slots, slots < chunk

    @triton.jit
    def _positions(order_row, sorted_index, valid):
        """Image positions of the sorted entries ``sorted_index`` of one round's ``order`` row.

        Inside the key loops, callers add the chunk's start to the pointer and pass the slots alone:
        folding the start into the index vector instead made the bf16 query backward spill 96 bytes
        per thread on sm_80 (8 otherwise)."""
        return tl.load(order_row + sorted_index, mask=valid, other=0).to(tl.int64)

    @triton.jit
    def _incoming_rows(item, item_round, length, positions, ROUND_WEIGHTED: tl.constexpr):
        """Rows of ``GRAD_OUT`` holding the incoming gradient ``dy`` of this item and round at ``positions``:
        one row per round (``[N*T, L, C]``), or with ``ROUND_WEIGHTED`` the rows of the mixed output's gradient
        ``g`` (``[N, L, C]``), which the rounds share: ``dy_t = w_t g``, with ``w_t`` from ``ROUND_WEIGHTS``
        (``[N*T, L]``). The kernels then scale ``P`` or ``dP`` by ``w_t`` row by row, not the loaded ``g``
        tile, so that it goes to the matrix product as loaded (the software pipeline's asynchronous copies)."""
        if ROUND_WEIGHTED:
            return item * length + positions
        else:
            return item_round * length + positions

    @triton.jit
    def _rows(TABLE, item, stride_n, stride_l, positions, columns, row_valid, column_valid):
        """``TABLE[item, positions][:, columns]``, zero where masked."""
        return tl.load(TABLE + item * stride_n + positions[:, None] * stride_l + columns[None, :],
                       mask=row_valid[:, None] & column_valid[None, :], other=0.0)

    @triton.jit
    def _learned_scores(LS, item, stride_n, stride_l, key_pos, slots, key_valid, slot_valid):
        """``[slot r, key j] = ls[key j, r]`` in float32, zero where masked."""
        return tl.load(LS + item * stride_n + key_pos[None, :] * stride_l + slots[:, None],
                       mask=slot_valid[:, None] & key_valid[None, :], other=0.0).to(tl.float32)

    @triton.jit
    def _grad_scores_tile(GRAD_SCORES, item_round, n_chunks, query_chunk, offset, chunk, slots, key_slots):
        """Addresses of ``dS[query slots, key slots]`` of query chunk ``query_chunk`` against its neighbour
        ``offset`` (0, 1, 2: the previous, own, next chunk) in ``GRAD_SCORES [N*T, n_chunks, 3, k, k]``."""
        tile = GRAD_SCORES + ((item_round * n_chunks + query_chunk) * 3 + offset) * chunk * chunk
        return tile + slots[:, None] * chunk + key_slots[None, :]

    @triton.jit
    def _window_tile(TABLE, item_round, n_chunks, chunk_index, window, chunk, slots, partner_slots):
        """Addresses of ``[slots, partner slots]`` in ``TABLE [N*T, n_chunks + 2, k, 3k]``, a batched matrix
        product's operand or result: row ``slot`` of chunk ``chunk_index``, column ``window k + partner slot``,
        ``window`` 0, 1, 2 for the partner chunk ``chunk_index - 1``, ``chunk_index``, ``chunk_index + 1``
        (:func:`_grad_weights_by_matmul`, :func:`_values_gradient_by_matmul`); ``slots`` and ``partner_slots``
        broadcast to the tile's shape."""
        rows = (item_round * (n_chunks + 2) + chunk_index) * chunk + slots
        return TABLE + rows * (3 * chunk) + window * chunk + partner_slots

    @triton.jit
    def _grad_weights_in_blocks(GRAD_OUT, V, item, v_stride_n, v_stride_l, grad_row, has_output, key_pos,
                                key_valid, v_dim, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_C: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
        """``dP = dy V^T`` of a query block (its ``GRAD_OUT`` rows ``grad_row``) and a key block (``key_pos``),
        summed over blocks of ``BLOCK_C`` value channels re-read from the cache: no ``[rows, C]`` tile is held."""
        grad_weights = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for channel_start in range(0, v_dim, BLOCK_C):
            channels = channel_start + tl.arange(0, BLOCK_C)
            channel_valid = channels < v_dim
            grad_out = tl.load(GRAD_OUT + grad_row[:, None] * v_dim + channels[None, :],
                               mask=has_output[:, None] & channel_valid[None, :], other=0.0)
            v = _rows(V, item, v_stride_n, v_stride_l, key_pos, channels, key_valid, channel_valid)
            grad_weights += _dot(grad_out, tl.trans(v), PRECISION, INTERPRETED)
        return grad_weights

    @triton.jit
    def _key_block_scores(q, K, LS, order_row, item, k_stride_n, k_stride_l, ls_stride_n, ls_stride_l, key_chunk,
                          key_slots, chunk, slots, slot_valid, dims, dim_valid, PRECISION: tl.constexpr,
                          INTERPRETED: tl.constexpr):
        """Scores ``q . k_j + ls[j, r]`` of a query block against the keys ``key_slots`` of sorted chunk
        ``key_chunk`` (``-inf`` past the chunk), with those keys' image positions and validity."""
        key_valid = key_slots < chunk
        key_pos = _positions(order_row + key_chunk * chunk, key_slots, key_valid)
        k = _rows(K, item, k_stride_n, k_stride_l, key_pos, dims, key_valid, dim_valid)
        learned = _learned_scores(LS, item, ls_stride_n, ls_stride_l, key_pos, slots, key_valid, slot_valid)
        scores = _dot(q, tl.trans(k), PRECISION, INTERPRETED) + learned
        return tl.where(key_valid[None, :], scores, float("-inf")), key_pos, key_valid

    def _forward_kernel(
        Q, K, V, LS, ORDER, OUT, LSE, WEIGHTS,
        q_stride_n, q_stride_l, k_stride_n, k_stride_l, v_stride_n, v_stride_l, ls_stride_n, ls_stride_l,
        length, padded_length, n_chunks, chunk, n_rounds, qk_dim, v_dim,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
        PRECISION: tl.constexpr, INTERPRETED: tl.constexpr, WEIGHTS_ONLY: tl.constexpr,
    ):
        """The attention of a query block (see the module docstring). ``WEIGHTS_ONLY`` (the
        ``"weights+matmul"`` forward): no values are read; a second pass over the keys stores the softmax
        weights ``P`` query-major in ``WEIGHTS [N*T, n_chunks + 2, k, 3k]`` for one batched ``P V`` product
        (:func:`_forward_by_matmul`), and only the log-sum-exp is written in image order."""
        item_round = tl.program_id(1).to(tl.int64)  # n * T + t
        item = item_round // n_rounds
        query_chunk, slots, slot_valid = _block_of_chunk(chunk, BLOCK_M)
        channels = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        channel_valid = channels < v_dim
        dims = tl.arange(0, BLOCK_D)
        dim_valid = dims < qk_dim
        order_row = ORDER + item_round * padded_length

        sorted_queries = query_chunk * chunk + slots
        query_pos = _positions(order_row, sorted_queries, slot_valid)
        q = _rows(Q, item, q_stride_n, q_stride_l, query_pos, dims, slot_valid, dim_valid)

        running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
        for offset in tl.static_range(3):  # previous, own, next chunk
            key_chunk = (query_chunk + offset - 1 + n_chunks) % n_chunks
            for key_start in range(0, chunk, BLOCK_N):
                scores, key_pos, key_valid = _key_block_scores(
                    q, K, LS, order_row, item, k_stride_n, k_stride_l, ls_stride_n, ls_stride_l, key_chunk,
                    key_start + tl.arange(0, BLOCK_N), chunk, slots, slot_valid, dims, dim_valid, PRECISION,
                    INTERPRETED)
                new_max = tl.maximum(running_max, tl.max(scores, axis=1))
                rescale = tl.exp(running_max - new_max)
                weights = tl.exp(scores - new_max[:, None])
                running_sum = running_sum * rescale + tl.sum(weights, axis=1)
                if not WEIGHTS_ONLY:
                    v = _rows(V, item, v_stride_n, v_stride_l, key_pos, channels, key_valid, channel_valid)
                    acc = acc * rescale[:, None] + _dot(weights.to(v.dtype), v, PRECISION, INTERPRETED)
                running_max = new_max

        # Only the first sorted occurrence of a position (sorted index < L) has an output row.
        stored = slot_valid & (sorted_queries < length)
        if WEIGHTS_ONLY:  # every sorted row, padded duplicates too: the batched product computes all
            log_sum = running_max + tl.log(running_sum)
            for offset in tl.static_range(3):
                key_chunk = (query_chunk + offset - 1 + n_chunks) % n_chunks
                for key_start in range(0, chunk, BLOCK_N):
                    key_slots = key_start + tl.arange(0, BLOCK_N)
                    scores, key_pos, key_valid = _key_block_scores(
                        q, K, LS, order_row, item, k_stride_n, k_stride_l, ls_stride_n, ls_stride_l, key_chunk,
                        key_slots, chunk, slots, slot_valid, dims, dim_valid, PRECISION, INTERPRETED)
                    tl.store(_window_tile(WEIGHTS, item_round, n_chunks, query_chunk, offset, chunk, slots[:, None],
                                          key_slots[None, :]),
                             tl.exp(scores - log_sum[:, None]), mask=slot_valid[:, None] & key_valid[None, :])
            tl.store(LSE + item_round * length + query_pos, log_sum, mask=stored)
        else:
            out_rows = OUT + (item_round * length + query_pos[:, None]) * v_dim + channels[None, :]
            tl.store(out_rows, (acc / running_sum[:, None]).to(OUT.dtype.element_ty),
                     mask=stored[:, None] & channel_valid[None, :])
            if tl.program_id(2) == 0:  # the first channel block writes the log-sum-exp
                tl.store(LSE + item_round * length + query_pos, running_max + tl.log(running_sum), mask=stored)

    def _backward_keys_kernel(
        Q, K, V, LS, ORDER, GRAD_OUT, LSE, DELTA, ROUND_WEIGHTS, GRAD_K, GRAD_V, GRAD_LS, GRAD_Q, GRAD_SCORES,
        q_stride_n, q_stride_l, k_stride_n, k_stride_l, v_stride_n, v_stride_l, ls_stride_n, ls_stride_l,
        length, padded_length, n_chunks, chunk, n_rounds, qk_dim, v_dim,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
        PRECISION: tl.constexpr, INTERPRETED: tl.constexpr, ATOMIC_GRAD_Q: tl.constexpr,
        WITH_GRAD_V: tl.constexpr, LOAD_DS: tl.constexpr, ROUND_WEIGHTED: tl.constexpr,
    ):
        """dK, dls and (``WITH_GRAD_V``) dV of one key block, summed over the queries of the 3 chunks that
        see it.

        With ``WITH_GRAD_V`` all value channels are one block (``BLOCK_C >= v_dim``), held for the whole
        loop. Without it (the values kernel computes dV), ``dP = dy V^T`` is summed over blocks of
        ``BLOCK_C`` channels re-read from the cache, so the program holds far fewer registers.
        With ``ATOMIC_GRAD_Q`` it also adds this key block's share ``dS K`` of every query's dQ to
        ``GRAD_Q`` (zeroed by the caller) with atomic additions, and the query kernel is not run.
        With ``LOAD_DS`` it reads ``dS`` from ``GRAD_SCORES``, where the query kernel stored it, instead of
        recomputing ``dP = dy V^T``: it then needs neither V nor delta, and without ``WITH_GRAD_V`` not
        even the scores (only ``q`` and ``dS``).
        """
        item_round = tl.program_id(1).to(tl.int64)
        item = item_round // n_rounds
        key_chunk, key_slots, key_valid = _block_of_chunk(chunk, BLOCK_N)
        dims = tl.arange(0, BLOCK_D)
        dim_valid = dims < qk_dim
        order_row = ORDER + item_round * padded_length

        sorted_keys = key_chunk * chunk + key_slots
        key_pos = _positions(order_row, sorted_keys, key_valid)
        # Gradient rows: the position's own (image-order) row, or for a padded duplicate (sorted index
        # >= L, the same position as an earlier key) its sorted index, past the image's L rows.
        round_row = tl.where(sorted_keys < length, key_pos.to(tl.int32), sorted_keys)
        k = _rows(K, item, k_stride_n, k_stride_l, key_pos, dims, key_valid, dim_valid)
        if WITH_GRAD_V:
            channels = tl.arange(0, BLOCK_C)
            channel_valid = channels < v_dim
            if not LOAD_DS:
                v = _rows(V, item, v_stride_n, v_stride_l, key_pos, channels, key_valid, channel_valid)
            grad_v = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        grad_k = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for slot_start in range(0, chunk, BLOCK_M):
            slots = slot_start + tl.arange(0, BLOCK_M)
            slot_valid = slots < chunk
            if WITH_GRAD_V or not LOAD_DS:  # the scores are needed
                learned = _learned_scores(LS, item, ls_stride_n, ls_stride_l, key_pos, slots, key_valid, slot_valid)
            grad_learned = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for offset in tl.static_range(3):  # the chunks whose neighbourhood holds this one
                query_chunk = (key_chunk - offset + 1 + n_chunks) % n_chunks
                sorted_queries = query_chunk * chunk + slots
                has_output = slot_valid & (sorted_queries < length)  # padded duplicates have none
                query_pos = _positions(order_row, sorted_queries, slot_valid)
                q = _rows(Q, item, q_stride_n, q_stride_l, query_pos, dims, slot_valid, dim_valid)
                image_row = item_round * length + query_pos
                grad_row = _incoming_rows(item, item_round, length, query_pos, ROUND_WEIGHTED)
                if WITH_GRAD_V or not LOAD_DS:
                    lse = tl.load(LSE + image_row, mask=has_output, other=float("inf"))  # weights 0 without output
                    scores = _dot(q, tl.trans(k), PRECISION, INTERPRETED) + learned
                    weights = tl.exp(scores - lse[:, None])
                    if ROUND_WEIGHTED:
                        round_weight = tl.load(ROUND_WEIGHTS + image_row, mask=has_output, other=0.0)
                if WITH_GRAD_V:
                    grad_out = tl.load(GRAD_OUT + grad_row[:, None] * v_dim + channels[None, :],
                                       mask=has_output[:, None] & channel_valid[None, :], other=0.0)
                    weights_of_grad_out = weights
                    if ROUND_WEIGHTED:  # P^T (w g) as (P w)^T g
                        weights_of_grad_out = weights * round_weight[:, None]
                    grad_v += _dot(tl.trans(weights_of_grad_out).to(grad_out.dtype), grad_out, PRECISION, INTERPRETED)
                if LOAD_DS:  # this query block's scores against this key block, as the query kernel stored them
                    grad_scores = tl.load(_grad_scores_tile(GRAD_SCORES, item_round, n_chunks, query_chunk, offset,
                                                            chunk, slots, key_slots),
                                          mask=slot_valid[:, None] & key_valid[None, :], other=0.0)
                else:
                    delta = tl.load(DELTA + image_row, mask=has_output, other=0.0)
                    if WITH_GRAD_V:
                        grad_weights = _dot(grad_out, tl.trans(v), PRECISION, INTERPRETED)
                    else:
                        grad_weights = _grad_weights_in_blocks(GRAD_OUT, V, item, v_stride_n, v_stride_l, grad_row,
                                                               has_output, key_pos, key_valid, v_dim, BLOCK_M,
                                                               BLOCK_N, BLOCK_C, PRECISION, INTERPRETED)
                    if ROUND_WEIGHTED:  # (w g) V^T as w (g V^T)
                        grad_weights = grad_weights * round_weight[:, None]
                    grad_scores = weights * (grad_weights - delta[:, None])
                grad_k += _dot(tl.trans(grad_scores).to(q.dtype), q, PRECISION, INTERPRETED)
                grad_learned += grad_scores
                if ATOMIC_GRAD_Q:
                    grad_q = _dot(grad_scores.to(k.dtype), k, PRECISION, INTERPRETED)
                    query_row = item_round * padded_length + query_pos
                    tl.atomic_add(GRAD_Q + query_row[:, None] * qk_dim + dims[None, :], grad_q,
                                  mask=has_output[:, None] & dim_valid[None, :])
            grad_row = item_round * padded_length + round_row
            tl.store(GRAD_LS + grad_row[None, :] * chunk + slots[:, None],
                     grad_learned, mask=slot_valid[:, None] & key_valid[None, :])
        grad_row = item_round * padded_length + round_row
        tl.store(GRAD_K + grad_row[:, None] * qk_dim + dims[None, :], grad_k,
                 mask=key_valid[:, None] & dim_valid[None, :])
        if WITH_GRAD_V:
            tl.store(GRAD_V + grad_row[:, None] * v_dim + channels[None, :], grad_v,
                     mask=key_valid[:, None] & channel_valid[None, :])

    def _backward_values_kernel(
        Q, K, V, LS, ORDER, GRAD_OUT, LSE, DELTA, ROUND_WEIGHTS, GRAD_V,
        q_stride_n, q_stride_l, k_stride_n, k_stride_l, v_stride_n, v_stride_l, ls_stride_n, ls_stride_l,
        length, padded_length, n_chunks, chunk, n_rounds, qk_dim, v_dim,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
        PRECISION: tl.constexpr, INTERPRETED: tl.constexpr, ROUND_WEIGHTED: tl.constexpr,
    ):
        """dV of one key block and block of value channels: ``sum_i P_ij dy_i`` over the queries of the
        3 chunks that see it. Needs only ``P`` (recomputed from q, k, ls and lse; V and DELTA unused),
        so the key kernel can leave dV out and hold fewer registers (``WITH_GRAD_V=False``).

        One loop runs over every (query block, neighbour chunk) pair, where the other kernels unroll the
        three chunks inside their loop: with two or more stages Triton then prefetches the next pair's
        gathered rows (cp.async) into one set of buffers, not one per unrolled chunk. For sm_90 (Triton 3.9)
        (64 rows, 8 warps, 2 stages) with all 256 channels needs 197 KB of shared memory and no spills,
        against 529 KB and 360 bytes per thread unrolled; (64, 4, 1) with 128 channels spills nothing
        (104 bytes unrolled). The learned-score tile is re-read for each chunk (from the cache)."""
        item_round = tl.program_id(1).to(tl.int64)
        item = item_round // n_rounds
        key_chunk, key_slots, key_valid = _block_of_chunk(chunk, BLOCK_N)
        channels = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        channel_valid = channels < v_dim
        dims = tl.arange(0, BLOCK_D)
        dim_valid = dims < qk_dim
        order_row = ORDER + item_round * padded_length

        sorted_keys = key_chunk * chunk + key_slots
        key_pos = _positions(order_row, sorted_keys, key_valid)
        round_row = tl.where(sorted_keys < length, key_pos.to(tl.int32), sorted_keys)  # as in the key kernel
        k = _rows(K, item, k_stride_n, k_stride_l, key_pos, dims, key_valid, dim_valid)
        grad_v = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        for step in range(0, 3 * tl.cdiv(chunk, BLOCK_M)):  # query blocks outer, the 3 chunks inner
            slots = step // 3 * BLOCK_M + tl.arange(0, BLOCK_M)
            slot_valid = slots < chunk
            learned = _learned_scores(LS, item, ls_stride_n, ls_stride_l, key_pos, slots, key_valid, slot_valid)
            sorted_queries = (key_chunk - step % 3 + 1 + n_chunks) % n_chunks * chunk + slots
            has_output = slot_valid & (sorted_queries < length)
            query_pos = _positions(order_row, sorted_queries, slot_valid)
            q = _rows(Q, item, q_stride_n, q_stride_l, query_pos, dims, slot_valid, dim_valid)
            image_row = item_round * length + query_pos
            lse = tl.load(LSE + image_row, mask=has_output, other=float("inf"))
            grad_row = _incoming_rows(item, item_round, length, query_pos, ROUND_WEIGHTED)
            grad_out = tl.load(GRAD_OUT + grad_row[:, None] * v_dim + channels[None, :],
                               mask=has_output[:, None] & channel_valid[None, :], other=0.0)
            weights = tl.exp(_dot(q, tl.trans(k), PRECISION, INTERPRETED) + learned - lse[:, None])
            if ROUND_WEIGHTED:  # P^T (w g) as (P w)^T g
                weights = weights * tl.load(ROUND_WEIGHTS + image_row, mask=has_output, other=0.0)[:, None]
            grad_v += _dot(tl.trans(weights).to(grad_out.dtype), grad_out, PRECISION, INTERPRETED)
        grad_row = item_round * padded_length + round_row
        tl.store(GRAD_V + grad_row[:, None] * v_dim + channels[None, :], grad_v,
                 mask=key_valid[:, None] & channel_valid[None, :])

    def _backward_queries_kernel(
        Q, K, V, LS, ORDER, GRAD_OUT, LSE, DELTA, ROUND_WEIGHTS, GRAD_Q, GRAD_SCORES, KEY_WEIGHTS, GRAD_WEIGHTS,
        q_stride_n, q_stride_l, k_stride_n, k_stride_l, v_stride_n, v_stride_l, ls_stride_n, ls_stride_l,
        length, padded_length, n_chunks, chunk, n_rounds, qk_dim, v_dim,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
        PRECISION: tl.constexpr, INTERPRETED: tl.constexpr, EXACT_DELTA: tl.constexpr,
        DELTA_ONLY: tl.constexpr, DP_IN_BLOCKS: tl.constexpr, STORE_DS: tl.constexpr,
        ROUND_WEIGHTED: tl.constexpr, STORE_P: tl.constexpr, LOAD_DP: tl.constexpr,
    ):
        """dQ of one query block, summed over the keys of its 3 neighbour chunks.

        Without ``DP_IN_BLOCKS`` the block's incoming gradient rows, all value channels (``BLOCK_C >=
        v_dim``), are held for the whole loop; with it (the "+values" modes) ``dP`` is summed over
        blocks of ``BLOCK_C`` channels re-read from the cache, as in the key kernel without dV.
        With ``EXACT_DELTA`` (half-precision values), ``DELTA`` holds ``-dlse`` on entry and this
        kernel first adds ``sum_j P_ij dP_ij`` to it (one more pass over the keys) and stores it for
        the key kernel: ``y`` came from rounded weights, so ``dy . y`` would not match that sum.
        ``DELTA_ONLY`` stops there (the key kernel computes dQ with atomic additions). With ``STORE_DS``
        it also stores ``dS`` (float32, zero for padded duplicate queries) in ``GRAD_SCORES`` for the key
        kernel, which then does not recompute ``dP``. With ``STORE_P`` it stores the weights that multiply
        the incoming gradient rows (``P``, or ``P w`` from the mixed gradient), transposed, in ``KEY_WEIGHTS``
        for dV as one batched matrix product (:func:`_values_gradient_by_matmul`). With ``LOAD_DP`` it reads
        ``dP = g V^T`` from ``GRAD_WEIGHTS``, where a batched matrix product wrote it
        (:func:`_grad_weights_by_matmul`), instead of computing it.
        """
        item_round = tl.program_id(1).to(tl.int64)
        item = item_round // n_rounds
        query_chunk, slots, slot_valid = _block_of_chunk(chunk, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        dim_valid = dims < qk_dim
        order_row = ORDER + item_round * padded_length

        sorted_queries = query_chunk * chunk + slots
        has_output = slot_valid & (sorted_queries < length)
        query_pos = _positions(order_row, sorted_queries, slot_valid)
        q = _rows(Q, item, q_stride_n, q_stride_l, query_pos, dims, slot_valid, dim_valid)
        image_row = item_round * length + query_pos
        grad_row = _incoming_rows(item, item_round, length, query_pos, ROUND_WEIGHTED)
        if ROUND_WEIGHTED:
            round_weight = tl.load(ROUND_WEIGHTS + image_row, mask=has_output, other=0.0)
        if not DP_IN_BLOCKS:
            channels = tl.arange(0, BLOCK_C)
            channel_valid = channels < v_dim
            grad_out = tl.load(GRAD_OUT + grad_row[:, None] * v_dim + channels[None, :],
                               mask=has_output[:, None] & channel_valid[None, :], other=0.0)
        lse = tl.load(LSE + image_row, mask=has_output, other=float("inf"))
        delta = tl.load(DELTA + image_row, mask=has_output, other=0.0)
        grad_q = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # Pass 0 (EXACT_DELTA only) completes delta, pass 1 accumulates dQ; both recompute P and dP.
        for pass_index in tl.static_range(0 if EXACT_DELTA else 1, 1 if DELTA_ONLY else 2):
            for offset in tl.static_range(3):
                key_chunk = (query_chunk + offset - 1 + n_chunks) % n_chunks
                for key_start in range(0, chunk, BLOCK_N):
                    key_slots = key_start + tl.arange(0, BLOCK_N)
                    key_valid = key_slots < chunk
                    key_pos = _positions(order_row + key_chunk * chunk, key_slots, key_valid)
                    k = _rows(K, item, k_stride_n, k_stride_l, key_pos, dims, key_valid, dim_valid)
                    learned = _learned_scores(LS, item, ls_stride_n, ls_stride_l, key_pos, slots, key_valid,
                                              slot_valid)
                    scores = _dot(q, tl.trans(k), PRECISION, INTERPRETED) + learned
                    weights = tl.where(key_valid[None, :], tl.exp(scores - lse[:, None]), 0.0)
                    if LOAD_DP:
                        grad_weights = tl.load(_window_tile(GRAD_WEIGHTS, item_round, n_chunks, query_chunk, offset,
                                                            chunk, slots[:, None], key_slots[None, :]),
                                               mask=slot_valid[:, None] & key_valid[None, :], other=0.0)
                    elif DP_IN_BLOCKS:
                        grad_weights = _grad_weights_in_blocks(GRAD_OUT, V, item, v_stride_n, v_stride_l,
                                                               grad_row, has_output, key_pos, key_valid, v_dim,
                                                               BLOCK_M, BLOCK_N, BLOCK_C, PRECISION, INTERPRETED)
                    else:
                        v = _rows(V, item, v_stride_n, v_stride_l, key_pos, channels, key_valid, channel_valid)
                        grad_weights = _dot(grad_out, tl.trans(v), PRECISION, INTERPRETED)
                    if ROUND_WEIGHTED:  # (w g) V^T as w (g V^T)
                        grad_weights = grad_weights * round_weight[:, None]
                    if pass_index == 0:
                        delta += tl.sum(weights * grad_weights, axis=1)
                    else:
                        grad_scores = weights * (grad_weights - delta[:, None])
                        grad_q += _dot(grad_scores.to(k.dtype), k, PRECISION, INTERPRETED)
                        if STORE_DS:
                            tl.store(_grad_scores_tile(GRAD_SCORES, item_round, n_chunks, query_chunk, offset, chunk,
                                                       slots, key_slots),
                                     grad_scores, mask=slot_valid[:, None] & key_valid[None, :])
                        if STORE_P:
                            weights_of_grad_out = weights
                            if ROUND_WEIGHTED:  # dy_t = w_t g: dV = (P w)^T g
                                weights_of_grad_out = weights * round_weight[:, None]
                            # [query slot, key slot] in the key's row: key chunk c sees query chunk c + 1 - offset
                            key_weights = _window_tile(KEY_WEIGHTS, item_round, n_chunks, key_chunk, 2 - offset, chunk,
                                                       key_slots[None, :], slots[:, None])
                            tl.store(key_weights, weights_of_grad_out, mask=slot_valid[:, None] & key_valid[None, :])
            if pass_index == 0:
                tl.store(DELTA + image_row, delta, mask=has_output)
        if not DELTA_ONLY:  # image-order rows; a padded duplicate's dQ is zero (no output): not stored
            query_row = item_round * padded_length + query_pos
            tl.store(GRAD_Q + query_row[:, None] * qk_dim + dims[None, :], grad_q,
                     mask=has_output[:, None] & dim_valid[None, :])

    def _mix_rounds_kernel(ATTENDED, WEIGHTS, OUT, length, n_rounds, v_dim,
                           BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
        """``out[n, l] = sum_t w[n, t, l] attended[n, t, l]`` for a block of positions and channels."""
        item = tl.program_id(1).to(tl.int64)
        positions = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
        channels = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        valid = (positions < length)[:, None] & (channels < v_dim)[None, :]
        mixed = tl.zeros([BLOCK_L, BLOCK_C], tl.float32)
        for hash_round in range(n_rounds):
            row = (item * n_rounds + hash_round) * length + positions
            weight = tl.load(WEIGHTS + row, mask=positions < length, other=0.0)
            attended = tl.load(ATTENDED + row[:, None] * v_dim + channels[None, :], mask=valid, other=0.0)
            mixed += attended * weight[:, None]
        tl.store(OUT + (item * length + positions)[:, None] * v_dim + channels[None, :], mixed, mask=valid)

    def _mix_rounds_backward_kernel(GRAD_OUT, ATTENDED, WEIGHTS, GRAD_ATTENDED, GRAD_WEIGHTS, length, n_rounds, v_dim,
                                    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
        """``d attended[n, t, l] = w[n, t, l] g[n, l]`` and ``d w[n, t, l] = g[n, l] . attended[n, t, l]``
        for a block of positions, all channels (``BLOCK_C >= v_dim``): ``g`` is read once."""
        item = tl.program_id(1).to(tl.int64)
        positions = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
        channels = tl.arange(0, BLOCK_C)
        position_valid = positions < length
        valid = position_valid[:, None] & (channels < v_dim)[None, :]
        grad_out = tl.load(GRAD_OUT + (item * length + positions)[:, None] * v_dim + channels[None, :], mask=valid,
                           other=0.0)
        for hash_round in range(n_rounds):
            row = (item * n_rounds + hash_round) * length + positions
            weight = tl.load(WEIGHTS + row, mask=position_valid, other=0.0)
            tiles = row[:, None] * v_dim + channels[None, :]
            attended = tl.load(ATTENDED + tiles, mask=valid, other=0.0)
            tl.store(GRAD_WEIGHTS + row, tl.sum(grad_out * attended, axis=1), mask=position_valid)
            tl.store(GRAD_ATTENDED + tiles, grad_out * weight[:, None], mask=valid)

    def _sum_sorted_rows_kernel(SORTED, INVERSE, OUT, length, padding, rows_per_round, n_rounds, width,
                                BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
        """``out[n, l] = sum_t sorted[n T + t, s] (+ sorted[n T + t, s + padding] where s >= L - padding)``,
        ``s = inverse[n, t, l]``, for a block of positions and channels: per-round rows in sorted order summed
        over the rounds at each position, with its padded duplicate (the copy of sorted index ``s`` that
        padding appended at ``s + padding``) folded in, in that order."""
        item = tl.program_id(1).to(tl.int64)
        positions = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
        channels = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        position_valid = positions < length
        channel_valid = channels < width
        total = tl.zeros([BLOCK_L, BLOCK_C], tl.float32)
        for hash_round in range(n_rounds):
            item_round = item * n_rounds + hash_round
            sorted_index = tl.load(INVERSE + item_round * length + positions, mask=position_valid, other=0)
            rows = item_round * rows_per_round + sorted_index.to(tl.int64)
            total += tl.load(SORTED + rows[:, None] * width + channels[None, :],
                             mask=position_valid[:, None] & channel_valid[None, :], other=0.0)
            duplicated = position_valid & (sorted_index >= length - padding)
            total += tl.load(SORTED + (rows + padding)[:, None] * width + channels[None, :],
                             mask=duplicated[:, None] & channel_valid[None, :], other=0.0)
        tl.store(OUT + (item * length + positions)[:, None] * width + channels[None, :], total,
                 mask=position_valid[:, None] & channel_valid[None, :])

    def _delta_kernel(GRAD_ATTENDED, ATTENDED, GRAD_CONFIDENCE, DELTA, n_rows, v_dim,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """``delta[r] = dy[r] . y[r] - dlse[r]`` for a block of rows: the float32 backward's row term in one
        read of ``dy`` and ``y`` (PyTorch's product and sum write and re-read a ``[rows, C]`` temporary)."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_valid = rows < n_rows
        total = tl.zeros([BLOCK_R], tl.float32)
        for start in range(0, v_dim, BLOCK_C):
            channels = start + tl.arange(0, BLOCK_C)
            valid = row_valid[:, None] & (channels < v_dim)[None, :]
            tiles = rows[:, None] * v_dim + channels[None, :]
            grad_rows = tl.load(GRAD_ATTENDED + tiles, mask=valid, other=0.0)
            total += tl.sum(grad_rows * tl.load(ATTENDED + tiles, mask=valid, other=0.0), axis=1)
        tl.store(DELTA + rows, total - tl.load(GRAD_CONFIDENCE + rows, mask=row_valid, other=0.0), mask=row_valid)

    def _hash_codes_kernel(
        MATCH, ROTATIONS, CODES, match_stride_n, match_stride_l, length, n_rounds, dim, n_buckets,
        BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr, INTERPRETED: tl.constexpr,
    ):
        """Buckets ``argmax_b (m_p . R_t[:, b])`` of ``BLOCK_L`` positions of one item and round, with
        true float32 products (no TF32); the first bucket wins a tie, as in ``torch.argmax``."""
        item_round = tl.program_id(1).to(tl.int64)
        item = item_round // n_rounds
        hash_round = item_round % n_rounds
        positions = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
        position_valid = positions < length
        dims = tl.arange(0, BLOCK_D)
        buckets = tl.arange(0, BLOCK_B)
        bucket_valid = buckets < n_buckets
        match = _rows(MATCH, item, match_stride_n, match_stride_l, positions, dims, position_valid, dims < dim)
        rotation = tl.load(ROTATIONS + (hash_round * dim + dims[:, None]) * n_buckets + buckets[None, :],
                           mask=(dims < dim)[:, None] & bucket_valid[None, :], other=0.0)
        projections = _dot(match, rotation, "ieee", INTERPRETED)
        projections = tl.where(bucket_valid[None, :], projections, float("-inf"))
        codes = tl.argmax(projections, axis=1, tie_break_left=True)
        tl.store(CODES + item_round * length + positions, codes.to(tl.int64), mask=position_valid)

    def _orthonormal_columns_kernel(MATRIX, Q, rows, cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """``Q`` of ``matrix = Q R`` (``diag(R) > 0``) for one ``[rows, cols]`` matrix (``rows >= cols``) of
        the batch, by classical Gram-Schmidt with one reorthogonalisation ("twice is enough"), in float64.
        Columns of ``q`` not yet computed are zero, so each projection can run over the whole tile."""
        offset = tl.program_id(0).to(tl.int64) * rows * cols
        row_ids = tl.arange(0, BLOCK_M)
        col_ids = tl.arange(0, BLOCK_N)[None, :]
        q = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
        for column in range(cols):
            here = col_ids == column
            # Each column is read when its turn comes: only q is held in registers.
            vector = tl.load(MATRIX + offset + row_ids * cols + column, mask=row_ids < rows, other=0.0).to(tl.float64)
            for _ in tl.static_range(2):
                vector -= tl.sum(q * tl.sum(q * vector[:, None], axis=0)[None, :], axis=1)
            vector = vector / tl.sqrt(tl.sum(vector * vector, axis=0))
            q = tl.where(here, vector[:, None], q)
        tl.store(Q + offset + row_ids[:, None] * cols + col_ids, q, mask=(row_ids[:, None] < rows) & (col_ids < cols))


@functools.cache
def _kernel(function, interpreted: bool):
    """``function`` compiled for the GPU, or run by Triton's interpreter (CPU tensors)."""
    if interpreted:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(function)
    # Sizes that vary with the image are not specialised on (no recompilation per validation image).
    arguments = inspect.signature(function).parameters
    return triton.jit(function, do_not_specialize=[name for name in ("length", "padded_length", "n_chunks", "numel",
                                                                     "padding", "rows_per_round")
                                                   if name in arguments])


@contextlib.contextmanager
def _library_functions_interpreted():
    """Let an interpreted kernel call ``tl.max``, ``tl.sum``, ``tl.cdiv``... outside TRITON_INTERPRET=1.

    Triton's own library functions are compiled-kernel objects unless ``TRITON_INTERPRET=1`` was set
    before ``import triton`` (which torch imports early), and such objects refuse plain calls. For
    the duration of a CPU launch, they run through the interpreter instead.
    """
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    original_call = JITFunction.__call__

    def interpreted_call(self, *args, **kwargs):
        # Like InterpretedFunction.__call__, but undoing its patches of triton.language afterwards:
        # left in place they break later GPU compilations in the same process.
        scope = interpreter._patch_lang(self.fn)
        try:
            return _kernel(self.fn, True).rewrite()(*args, **kwargs)
        finally:
            if hasattr(scope, "restore"):
                scope.restore()

    JITFunction.__call__ = interpreted_call
    try:
        yield
    finally:
        JITFunction.__call__ = original_call


def _power_of_two(value: int, at_least: int = 16) -> int:
    return max(at_least, triton.next_power_of_2(value))


# Launch configurations per GPU generation (``_generation``), kernel and precision class: (rows per
# block, warps, pipeline stages). "half": bfloat16/float16 values; "float32": float32 values (TF32 or
# true float32 dot products). A block that does not fit the GPU's shared memory is halved until it
# does (_launch).
LAUNCH_CONFIGS = {
    # sm_90 and newer (H100, H200): the fastest of a sweep on an H200 (Triton 3.6; 2026-11-27,
    # docs/benchmarks.md; scripts/profile_train_step.py --sections tune) at the paper's training size
    # (batch 16, 48x48, C=256, d=64, k=128) over rows 16/32/64, 4 or 8 warps, 1 or 2 stages: the bf16
    # forward took 0.32 ms instead of the sm_80 choices' 0.58 ms, the bf16 backward about 1.7 instead
    # of 2.8 ms (per layer; the paper network has ten).
    90: {("forward", "half"): (64, 4, 1), ("forward", "float32"): (32, 4, 2),
         ("queries", "half"): (64, 4, 1), ("queries", "float32"): (64, 4, 1),
         ("keys", "half"): (32, 4, 2), ("keys", "float32"): (32, 4, 1),
         # The "+values" backward modes' kernels, not timed yet (the timed choice decides whether they
         # run): bf16 values like the forward's winner; the rest the largest blocks that compile for
         # sm_90 without spills (Triton 3.9; the float32 key kernel without dV: 28 KB of shared memory
         # and no spills, against 124 KB and 984 bytes per thread with it).
         ("keys_no_values", "half"): (64, 8, 1), ("keys_no_values", "float32"): (32, 4, 1),
         ("values", "half"): (64, 4, 1), ("values", "float32"): (32, 8, 1),
         # The "stored_dS" modes' key kernels, not timed yet: the largest blocks that compile for sm_90
         # with at most about 100 bytes of spills per thread (Triton 3.9; with dV 32 rows, as the "keys" kernel).
         ("keys_from_dS", "half"): (32, 8, 1), ("keys_from_dS", "float32"): (32, 8, 1),
         ("keys_from_dS_no_values", "half"): (64, 8, 1), ("keys_from_dS_no_values", "float32"): (64, 8, 1),
         # The "weights+matmul" forward's kernel (scores and weights only, no [rows, C] accumulator), not timed
         # yet: 64-row blocks, which sm_90 runs on wgmma.
         ("forward_weights", "half"): (64, 4, 1), ("forward_weights", "float32"): (64, 4, 1)},
    # Older GPUs (A100): first choices, not timed, that compile within an A100's shared memory with at
    # most a few register spills (tests/test_chunk_attention.py compiles them for sm_80 without a GPU).
    80: {("forward", "half"): (64, 8, 2), ("forward", "float32"): (32, 8, 2),
         ("queries", "half"): (32, 8, 2), ("queries", "float32"): (32, 8, 2),
         ("keys", "half"): (32, 8, 1), ("keys", "float32"): (16, 8, 2),
         ("keys_no_values", "half"): (32, 8, 1), ("keys_no_values", "float32"): (32, 8, 1),
         ("values", "half"): (64, 8, 2), ("values", "float32"): (32, 8, 2),
         ("keys_from_dS", "half"): (32, 8, 1), ("keys_from_dS", "float32"): (32, 8, 1),
         ("keys_from_dS_no_values", "half"): (64, 8, 1), ("keys_from_dS_no_values", "float32"): (32, 8, 1),
         ("forward_weights", "half"): (64, 4, 1), ("forward_weights", "float32"): (64, 4, 1)},
}
# Value channels per forward program: a second block of a wider layer recomputes the scores. On the
# H200 all 256 channels of the paper layer in one block beat blocks of 128 in both precisions.
FORWARD_CHANNEL_BLOCK = {90: 256, 80: 128}
# How the forward computes the attended values, per GPU generation: "fused" (one kernel: scores, online
# softmax and the P V products, about 50 TFLOP/s in float32 on the H200: 2.08 of the batch-16 96x96 row's
# 20.1 ms) or "weights+matmul" (the kernel stores P, [N*T, L, 3k] float32, and cuBLAS computes P V over the
# values' rows in sorted order, _forward_by_matmul): about 3 GB more memory traffic at batch 16, 96x96
# (P written and read, the values' rows and the result in sorted order, the result gathered back), about
# 0.7 ms at the H200's bandwidth, against 87 GFLOP that cuBLAS runs near the TF32 peak (about 0.3 ms) and a
# kernel left with the 64-wide score products, computed twice. Not yet run on a GPU (2026-11-30). "timed": both
# are timed on first use at each size where cuDNN's autotuner is on (the training steps), for the value dtypes
# of TIMED_FORWARD_DTYPES (float32: the speed target still short is float32's), and the faster kept; "fused"
# elsewhere, so evaluation and the CPU never depend on a timing.
FORWARD_MODE = {90: "timed", 80: "timed"}
FORWARD_MODES = ("fused", "weights+matmul")
FORWARD_MODE_CHOICES = (*FORWARD_MODES, "timed")
TIMED_FORWARD_DTYPES = (torch.float32,)
# Value channels per values-kernel program (its accumulator's width, like the forward's), and per step
# of the query and key kernels' dP loops when the values kernel computes dV (the "+values" modes).
VALUES_CHANNEL_BLOCK = {90: 256, 80: 128}
DP_CHANNEL_BLOCK = {90: 64, 80: 64}
# How the backward gets dQ and dV, per GPU generation. dQ: "two_kernels" (a query kernel, then the key
# kernel: no atomics, deterministic) or "atomic" (the key kernel adds dS K into dQ with atomic
# additions; the query kernel only runs to complete delta for half precision): P and dP are recomputed
# twice instead of three times, about 30% fewer operations, but float32 atomics sum in a varying order.
# dV: from the key kernel, which then holds a [keys, C] accumulator and the keys' values (C=256: the
# float32 key kernel spills on sm_90), or with "+values" from a values kernel per block of channels
# (recomputing P once more, 64 multiply-adds per query-key pair against dV's 256) while the query and
# key kernels sum dP over blocks of channels (DP_CHANNEL_BLOCK), holding no [rows, C] tiles.
# "stored_dS" (deterministic): the query kernel stores dS for the key kernel, which then neither
# recomputes dP = dy V^T (256 of its 640 multiply-adds per query-key pair in float32) nor holds the keys'
# values, at the price of writing and reading dS ([N*T, L, 3k] float32: 170 MB per layer at the
# training size); with "+values" the key kernel is left with dK and dls from q and dS alone. "stored_dS+matmul"
# runs the same query and key kernels, the query kernel also storing the weights P (P w from the mixed
# gradient), and computes dV = P^T dy as one batched cuBLAS product instead of the values kernel, which
# recomputes P and on the H200 ran the 256-channel products at 33 TFLOP/s (3.3 of 20.1 ms at batch 16, 96x96):
# about 2.8 GB more memory traffic per layer there (the weights written and read, the gradient rows and dV in
# sorted order; one kernel sums dV over the rounds straight from that order, where the values kernel's per-round
# rows are summed after it), about 0.7 ms at the H200's bandwidth, against 87 GFLOP that cuBLAS runs near the TF32 peak
# (about 0.3 ms). "stored_dS+matmul+dP" also computes dP = dy V^T, the query kernel's largest product (another
# 87 GFLOP, 2.2 ms for the whole kernel there), as one batched product that the query kernel reads: about 2.5 GB
# more traffic (dP written and read, the values in sorted order). Neither was timed on a GPU yet (2026-11-30). "timed":
# every way is timed on first use at each size where cuDNN's autotuner is on (the training steps; see
# dlsn.models.timed_choice) and the fastest kept; "two_kernels" elsewhere. Runs that ask for
# deterministic algorithms get "two_kernels".
BACKWARD_MODE = {90: "timed", 80: "timed"}
BACKWARD_MODES = ("two_kernels", "atomic", "two_kernels+values", "atomic+values", "stored_dS", "stored_dS+values",
                  "stored_dS+matmul", "stored_dS+matmul+dP")
BACKWARD_MODE_CHOICES = (*BACKWARD_MODES, "timed")
# Launch configurations that the "timed" backward also tries beside LAUNCH_CONFIGS' own, where no GPU sweep
# settled the choice: (rows, warps, stages), the values kernel's also with its value channels per program.
# The key kernel's ("keys": dV in it, dP recomputed) with the two modes that run it. sm_90, float32: the H200
# sweep of 2026-11-27 was cut off after timing LAUNCH_CONFIGS' (32, 4, 1) (whole backward 3.4 ms per layer);
# compiled for sm_90 (Triton 3.9, cuobjdump) it spills 984 bytes per thread, (32, 8, 1) 128. (16, 8, 1), tried
# until 2026-11-28, never won: 1.5 to 2 times slower at batch 16 on the H200, so no longer timed.
TIMED_KEY_CONFIGS = {90: {"float32": ((32, 8, 1),)}, 80: {}}
# The values and query kernels' configurations are tried with TIMED_CONFIGS_MODE only, each pair of them:
# every "+values" mode runs the same values kernel, and at batch 16 "stored_dS+values" won in both precisions
# at 48x48 and 96x96 (H200, 2026-11-28: by 10 to 20% at 96x96), so a faster values kernel cannot change which
# mode is fastest there. Values kernel, float32 on sm_90: the largest kernel of the batch-16 96x96 GLA
# forward+backward (3.3 of 20.1 ms of kernels, 33 TFLOP/s against the forward's 52), run with an untimed
# (32, 8, 1). Its loop is the forward's (a block of rows against the 3k gathered partners, P recomputed, a
# [rows, C] accumulator), whose float32 sweep at the training size put (32, 4, 2) with all 256 channels first
# (0.64 ms) and (32, 8, 1) at 1.06 ms.
# 64-row blocks compile to Hopper's wgmma instead of mma.sync and re-read each query's incoming-gradient rows
# half as often; narrower channel blocks recompute P once more per block (64 multiply-adds per query-key pair,
# against dV's 256 in all). Since its loop runs over the (query block, chunk) pairs instead of unrolling the
# chunks (2026-11-28, not yet timed), two stages prefetch the next pair's rows in a shared memory that fits:
# (64, 8, 2) with 64 channels and with all 256 (one program per key block, P computed once) compile for sm_90
# without spills (98 and 197 KB; unrolled 234 and 529 KB, over an H100's 227), and no timed configuration
# spills (Triton 3.9; unrolled: (32, 4, 2, 256) 32 bytes, (64, 4, 1, 128) 104). Query kernel, float32, dP
# summed over 64-channel blocks and dS stored: LAUNCH_CONFIGS'
# (64, 4, 1) spills 64 bytes per thread for sm_90, (64, 8, 1) none, nor (64, 8, 2), whose second stage prefetches
# the next key block's rows (96 KB of shared memory).
TIMED_VALUES_CONFIGS = {90: {"float32": ((32, 4, 2, 256), (64, 8, 1, 64), (64, 4, 1, 128), (64, 8, 2, 64),
                                        (64, 8, 2, 256))}, 80: {}}
TIMED_QUERIES_CONFIGS = {90: {"float32": ((64, 8, 1), (64, 8, 2))}, 80: {}}
TIMED_CONFIGS_MODE = "stored_dS+values"
MATMUL_MODE = "stored_dS+matmul"
_working_rows: dict[tuple, int] = {}


def _precision_class(dtype: torch.dtype) -> str:
    return "float32" if dtype == torch.float32 else "half"


def _key_kernel_name(mode: str) -> str:
    """The ``LAUNCH_CONFIGS`` name of the key kernel that backward ``mode`` runs."""
    name = "keys_from_dS" if mode.startswith("stored_dS") else "keys"
    return name + "_no_values" if _values_apart(mode) else name


def _values_apart(mode: str) -> bool:
    """Whether backward ``mode`` computes dV outside the key kernel: by the values kernel (``"+values"``) or
    by a batched matrix product (``"+matmul"``)."""
    return mode.endswith("+values") or "+matmul" in mode


def _launch(kernel_function, name: str, grid_of_rows, tensors, sizes, *, channel_block: int | None,
            config: tuple[int, int, int] | None = None, **constants):
    """Launch ``kernel_function`` with ``config`` (rows, warps, stages), by default that of
    ``LAUNCH_CONFIGS`` (fewer rows if the GPU's resources are short)."""
    device = tensors[0].device
    interpreted = device.type != "cuda"
    kernel = _kernel(kernel_function, interpreted)
    chunk, qk_dim, v_dim = sizes["chunk"], sizes["qk_dim"], sizes["v_dim"]
    generation = _generation(device)
    config = config or LAUNCH_CONFIGS[generation][name, _precision_class(sizes["value_dtype"])]
    rows, num_warps, num_stages = config
    key = (name, generation, config, channel_block, sizes["value_dtype"], sizes["precision"], chunk, qk_dim, v_dim,
           tuple(sorted(constants.items())))
    rows = _working_rows.get(key, min(rows, _power_of_two(chunk)))
    while True:
        block_c = channel_block or _power_of_two(v_dim)
        options = dict(BLOCK_M=rows, BLOCK_N=rows, BLOCK_D=_power_of_two(qk_dim), BLOCK_C=block_c,
                       PRECISION=sizes["precision"], INTERPRETED=interpreted, **constants)
        if not interpreted:
            options.update(num_warps=num_warps, num_stages=num_stages)
        try:
            with _library_functions_interpreted() if interpreted else contextlib.nullcontext():
                kernel[grid_of_rows(rows, block_c)](*tensors, *sizes["strides"], sizes["length"],
                                                   sizes["padded_length"], sizes["n_chunks"], chunk,
                                                   sizes["n_rounds"], qk_dim, v_dim, **options)
        except OutOfResources as error:
            if rows <= 16:
                raise
            # Said once per configuration: the timed choice and the kernel tables name the configuration
            # asked for, and this one runs with fewer rows from now on.
            warnings.warn(f"dlsn: the {name} kernel with {rows} rows ({num_warps} warps, {num_stages} stages, "
                          f"{block_c} value channels) ran out of the GPU's resources ({error}); it runs "
                          f"{rows // 2} rows", RuntimeWarning, stacklevel=2)
            rows //= 2
            continue
        _working_rows[key] = rows
        return


def _launch_fixed(kernel_function, grid, device: torch.device, *arguments, num_warps: int,
                  num_stages: int | None = None, **constants):
    """Launch ``kernel_function`` on ``grid`` with a fixed number of warps (and pipeline stages, else Triton's
    default): the small kernels, whose launch configuration is not timed. CPU tensors: Triton's interpreter."""
    interpreted = device.type != "cuda"
    options = {} if interpreted else {"num_warps": num_warps,
                                      **({} if num_stages is None else {"num_stages": num_stages})}
    with _on_device(device), _library_functions_interpreted() if interpreted else contextlib.nullcontext():
        _kernel(kernel_function, interpreted)[grid](*arguments, **constants, **options)


def _generation(device: torch.device) -> int:
    """The ``LAUNCH_CONFIGS`` entry for ``device``: 90 for sm_90 and newer (and Triton's interpreter), else 80."""
    if device.type != "cuda":
        return 90
    return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80


def _backward_mode(device: torch.device) -> str:
    """``BACKWARD_MODE`` of the device's generation (perhaps "timed"); "two_kernels" where deterministic
    algorithms are required."""
    if torch.are_deterministic_algorithms_enabled():
        return "two_kernels"
    return BACKWARD_MODE[_generation(device)]


def tf32_matmuls_allowed() -> bool:
    """Whether float32 matrix products may use TF32 (``torch.set_float32_matmul_precision("high")``)."""
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # torch >= 2.9 refuses to answer when old and new TF32 settings were mixed
        return False


def _sizes(queries, keys, learned_score, values, order, inverse) -> dict:
    batch, rounds, padded = order.shape
    chunk = learned_score.shape[-1]
    precision = "tf32" if queries.is_cuda and tf32_matmuls_allowed() else "ieee"  # float32 operands only
    strides = [s for t in (queries, keys, values, learned_score) for s in (t.stride(0), t.stride(1))]
    return dict(length=inverse.shape[-1], padded_length=padded, n_chunks=padded // chunk, chunk=chunk,
                n_rounds=rounds, qk_dim=queries.shape[-1], v_dim=values.shape[-1], strides=strides,
                precision=precision, value_dtype=values.dtype)


def _unit_column_stride(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _fused_forward(queries, keys, learned_score, values, order, inverse, mode: str | None = None):
    """Attended values and log-sum-exp (:func:`chunk_attention`); ``mode`` one of ``FORWARD_MODE_CHOICES``
    (default: the device's ``FORWARD_MODE``)."""
    arguments = (queries, keys, learned_score, values, order, inverse)
    queries, keys, learned_score, values = map(_unit_column_stride, (queries, keys, learned_score, values))
    order32 = order.to(torch.int32).contiguous()
    sizes = _sizes(queries, keys, learned_score, values, order32, inverse)
    mode = mode or FORWARD_MODE[_generation(values.device)]
    if mode == "timed":
        offered = [name for name in FORWARD_MODES if ("forward", name) not in _left_out]
        if values.dtype not in TIMED_FORWARD_DTYPES or len(offered) == 1:
            mode = FORWARD_MODES[0]
        else:
            key = ("fused attention forward", values.device, values.dtype, sizes["precision"], tuple(order.shape),
                   sizes["qk_dim"], sizes["v_dim"], sizes["chunk"])
            mode = timed_choice.fastest(
                key, lambda: {name: functools.partial(_fused_forward, *arguments, mode=name) for name in offered},
                device=values.device, default=FORWARD_MODES[0])
    if mode == "weights+matmul":
        return _forward_by_matmul(queries, keys, learned_score, values, order, order32, inverse, sizes)
    batch, rounds = order.shape[:2]
    length, v_dim, n_chunks, chunk = sizes["length"], sizes["v_dim"], sizes["n_chunks"], sizes["chunk"]
    attended = values.new_empty(batch, rounds, length, v_dim, dtype=torch.float32)
    confidence = values.new_empty(batch, rounds, length, dtype=torch.float32)
    channel_block = min(FORWARD_CHANNEL_BLOCK[_generation(values.device)], _power_of_two(v_dim))

    def grid(rows, block_c):
        return (n_chunks * triton.cdiv(chunk, rows), batch * rounds, triton.cdiv(v_dim, block_c))

    with _on_device(values.device):
        _launch(_forward_kernel, "forward", grid,
                (queries, keys, values, learned_score, order32, attended, confidence, attended), sizes,
                channel_block=channel_block, WEIGHTS_ONLY=False)
    return attended, confidence


def _forward_by_matmul(queries, keys, learned_score, values, order, order32, inverse, sizes):
    """The ``"weights+matmul"`` forward. The forward kernel stores the softmax weights ``P`` of every sorted query
    against its 3k keys (``WEIGHTS_ONLY``) and the log-sum-exp; one batched product (cuBLAS, TF32 where float32
    matrix products may use it) of each query chunk's weights ``[k, 3k]`` with its window of the values' rows in
    sorted order (:class:`_SortedWindows`: the 3k keys of chunk ``c`` are the window at ``c``) gives the attended
    values, gathered back to image order. The 256-channel ``P V`` products, 80% of the forward's multiply-adds,
    leave the Triton kernel, which on the H200 ran them at about 50 TFLOP/s in float32."""
    batch, rounds = order.shape[:2]
    length, n_chunks, chunk = sizes["length"], sizes["n_chunks"], sizes["chunk"]
    confidence = values.new_empty(batch, rounds, length, dtype=torch.float32)
    weights = values.new_empty(batch * rounds, n_chunks + 2, chunk, 3 * chunk, dtype=torch.float32)
    weights[:, n_chunks:].zero_()  # the product's padding positions: their results are not read

    def grid(rows, block_c):
        return (n_chunks * triton.cdiv(chunk, rows), batch * rounds, 1)

    with _on_device(values.device):
        _launch(_forward_kernel, "forward_weights", grid,
                (queries, keys, values, learned_score, order32, confidence, confidence, weights), sizes,
                channel_block=16, WEIGHTS_ONLY=True)  # no values read: OUT and BLOCK_C unused
    windows = _SortedWindows(order, inverse, chunk)
    value_rows = windows.rows(values, shared_by_rounds=True)
    with _autocast_off(values.device):
        attended_sorted = torch.bmm(weights.view(-1, chunk, 3 * chunk), windows.windows(value_rows))
    return windows.image_rows(attended_sorted), confidence


def _autocast_off(device: torch.device):
    """The batched products run in float32 (TF32 where allowed) also inside a mixed-precision region."""
    return torch.autocast(device.type, enabled=False)


def backward_variants(device: torch.device, dtype: torch.dtype,
                      combinations: bool = True) -> dict[str, tuple[str, dict[str, tuple]]]:
    """The ways the "timed" backward chooses from, by name: (mode, launch configurations other than
    ``LAUNCH_CONFIGS``' by kernel: ``"keys"``, ``"queries"``: (rows, warps, stages); ``"values"``: (rows,
    warps, stages, channels)), the first the default. ``TIMED_KEY_CONFIGS`` apply to the modes whose key
    kernel is ``"keys"`` (dV in it, dP recomputed); every pair of ``TIMED_VALUES_CONFIGS`` and
    ``TIMED_QUERIES_CONFIGS`` (either may stay ``LAUNCH_CONFIGS``') to ``TIMED_CONFIGS_MODE``, and
    ``TIMED_QUERIES_CONFIGS`` alone to ``MATMUL_MODE`` (the same query kernel; it has no values kernel).
    ``combinations=False`` leaves out the pairs with both a query and a values configuration: every kernel
    launch configuration still runs, in fewer variants (the query and values kernels share no buffer they
    write: a pair is correct when each of its two is). For checks in Triton's interpreter, where each
    variant costs seconds; the timed choice and the self-check on a GPU run them all."""
    generation, precision = _generation(device), _precision_class(dtype)
    variants = {mode: (mode, {}) for mode in BACKWARD_MODES}
    for config in TIMED_KEY_CONFIGS[generation].get(precision, ()):
        variants.update({f"{mode}, keys {'/'.join(map(str, config))}": (mode, {"keys": config})
                         for mode in BACKWARD_MODES if _key_kernel_name(mode) == "keys"})
    queries_configs = (None, *TIMED_QUERIES_CONFIGS[generation].get(precision, ()))
    values_configs = (None, *TIMED_VALUES_CONFIGS[generation].get(precision, ()))
    for queries_config, values_config in itertools.product(queries_configs, values_configs):
        if queries_config and values_config and not combinations:
            continue
        configs, described = {}, []
        if queries_config:
            configs["queries"] = queries_config
            described.append(f"queries {'/'.join(map(str, queries_config))}")
        if values_config:
            configs["values"] = values_config
            described.append(f"values {'/'.join(map(str, values_config[:3]))} C{values_config[3]}")
        if configs:
            variants[", ".join((TIMED_CONFIGS_MODE, *described))] = (TIMED_CONFIGS_MODE, configs)
    for queries_config in queries_configs[1:]:  # the same query kernel, storing the weights too
        name = f"{MATMUL_MODE}, queries {'/'.join(map(str, queries_config))}"
        variants[name] = (MATMUL_MODE, {"queries": queries_config})
    return {name: (mode, configs) for name, (mode, configs) in variants.items()  # less those that failed a self-check
            if ("backward", name) not in _left_out and ("backward mode", mode) not in _left_out}


def _fused_backward(grad_attended, grad_confidence, queries, keys, learned_score, values, order, inverse,
                    attended, confidence, mode: str | None = None, configs: dict[str, tuple] | None = None,
                    delta: torch.Tensor | None = None, round_weights: torch.Tensor | None = None):
    """Gradients of queries, keys, learned score and values; ``mode`` one of ``BACKWARD_MODE_CHOICES``
    (default: the device's ``BACKWARD_MODE``), ``configs`` launch configurations other than
    ``LAUNCH_CONFIGS``' for the ``"keys"`` and ``"queries"`` kernels (rows, warps, stages) and the ``"values"``
    kernel (also its value channels per program). "timed" picks both (:func:`backward_variants`). ``delta``:
    the float32 row term ``dy . y - dlse`` ``[N, T, L]`` where the caller has it (:class:`_AttendAndMix`);
    ``attended`` and ``grad_confidence`` are then not read. With ``round_weights`` ``w`` ``[N, T, L]`` (and
    ``delta``), ``grad_attended`` is the mixed output's gradient ``g`` ``[N, L, C]`` and ``dy_t = w_t g``: the
    kernels read ``g`` and ``w``, and no ``[N, T, L, C]`` gradient is made."""
    if round_weights is not None and (delta is None or values.dtype != torch.float32):
        raise ValueError(f"_fused_backward: round_weights need float32 values (got {values.dtype}) and the row "
                         f"term delta (given: {delta is not None})")
    arguments = (grad_attended, grad_confidence, queries, keys, learned_score, values, order, inverse,
                 attended, confidence)
    queries, keys, learned_score, values = map(_unit_column_stride, (queries, keys, learned_score, values))
    order32 = order.to(torch.int32).contiguous()
    sizes = _sizes(queries, keys, learned_score, values, order32, inverse)
    mode = mode or _backward_mode(values.device)
    if mode == "timed":
        key = ("fused attention backward", values.device, values.dtype, sizes["precision"], tuple(order.shape),
               sizes["qk_dim"], sizes["v_dim"], sizes["chunk"])
        if round_weights is not None:  # timed apart: the kernels that read the mixed gradient and the round weights
            key += ("from the mixed gradient",)
        variants = backward_variants(values.device, values.dtype)
        mode, configs = variants[timed_choice.fastest(
            key, lambda: {name: functools.partial(_fused_backward, *arguments, mode=variant_mode,
                                                  configs=variant_configs, delta=delta, round_weights=round_weights)
                          for name, (variant_mode, variant_configs) in variants.items()},
            device=values.device, default=next(iter(variants)))]
    batch, rounds, padded = order.shape
    n_chunks, chunk, qk_dim, v_dim = sizes["n_chunks"], sizes["chunk"], sizes["qk_dim"], sizes["v_dim"]
    # dy enters the P V products in the values' precision. delta_i = sum_j P_ij dP_ij - dlse_i is the
    # softmax backward's row term (with the log-sum-exp's gradient). For float32 values it is
    # dy_i . y_i - dlse_i; for half precision the query kernel computes the sum (see its docstring).
    grad_attended = grad_attended.to(values.dtype).contiguous()
    exact_delta = values.element_size() < 4
    if exact_delta:
        delta = (-grad_confidence.float()).contiguous()
    elif delta is None:
        delta = _delta(grad_attended, attended, grad_confidence)
    atomic, values_kernel = mode.startswith("atomic"), mode.endswith("+values")
    stored, values_matmul, dp_matmul = mode.startswith("stored_dS"), "+matmul" in mode, mode.endswith("+dP")
    # dS of every query against its 3k keys, per round and chunk: [N*T, n_chunks, 3, k, k] (e.g. 170 MB
    # per layer at the training size in float32), written by the query kernel, read by the key kernel.
    grad_scores = (queries.new_empty(batch * rounds * n_chunks * 3 * chunk * chunk, dtype=torch.float32) if stored
                   else delta)  # an unused pointer otherwise
    # "+matmul": the weights of every key against its 3k queries, key-major, for dV as one batched product;
    # the two spare chunks per round only pad the product's batch (see _values_gradient_by_matmul).
    key_weights = queries.new_empty(batch * rounds, n_chunks + 2, chunk, 3 * chunk, dtype=torch.float32) \
        if values_matmul else delta
    if values_matmul:
        key_weights[:, n_chunks:].zero_()
        windows = _SortedWindows(order, inverse, chunk)
        grad_rows = windows.rows(grad_attended, shared_by_rounds=round_weights is not None)
    # "+dP": dP = dy V^T of every query against its 3k keys, by one batched product, for the query kernel.
    grad_weights = _grad_weights_by_matmul(windows, grad_rows, windows.rows(values, shared_by_rounds=True)) \
        if dp_matmul else delta
    # Per round, rows 0 .. L-1 are the positions in image order; rows L .. P-1 the padded duplicate keys.
    # "summed": gradients already summed over the rounds, [N, L, D].
    summed = {}
    grad = dict(
        queries=(queries.new_zeros if atomic else queries.new_empty)(batch, rounds, padded, qk_dim,
                                                                     dtype=torch.float32),
        keys=queries.new_empty(batch, rounds, padded, qk_dim, dtype=torch.float32),
        learned=queries.new_empty(batch, rounds, padded, chunk, dtype=torch.float32),
    )
    if not values_matmul:
        grad["values"] = queries.new_empty(batch, rounds, padded, v_dim, dtype=torch.float32)

    def grid(rows, block_c):  # a program per block of rows of one chunk, item and round
        return (n_chunks * triton.cdiv(chunk, rows), batch * rounds)

    def grid_by_channels(rows, block_c):  # the values kernel: also per block of value channels
        return (*grid(rows, block_c), triton.cdiv(v_dim, block_c))

    round_weighted = round_weights is not None
    inputs = (queries, keys, values, learned_score, order32, grad_attended, confidence, delta,
              round_weights.float().contiguous() if round_weighted else delta)  # an unused pointer without
    generation = _generation(values.device)
    configs = configs or {}
    # The values kernel's (rows, warps, stages) and value channels per program: LAUNCH_CONFIGS' and
    # VALUES_CHANNEL_BLOCK's unless a timed variant says otherwise.
    values_launch, values_channels = ((configs["values"][:3], configs["values"][3]) if "values" in configs
                                      else (None, VALUES_CHANNEL_BLOCK[generation]))
    # Where dV is computed apart, the query and key kernels sum dP over blocks of channels; the others hold all.
    values_apart = _values_apart(mode)
    dp_channel_block = min(DP_CHANNEL_BLOCK[generation], _power_of_two(v_dim)) if values_apart else None
    with _on_device(values.device):  # queries first: with exact_delta it completes delta
        if exact_delta or not atomic:
            _launch(_backward_queries_kernel, "queries", grid,
                    (*inputs, grad["queries"], grad_scores, key_weights, grad_weights), sizes,
                    channel_block=dp_channel_block, config=configs.get("queries"), EXACT_DELTA=exact_delta,
                    DELTA_ONLY=atomic, DP_IN_BLOCKS=values_apart, STORE_DS=stored, ROUND_WEIGHTED=round_weighted,
                    STORE_P=values_matmul, LOAD_DP=dp_matmul)
        if values_kernel:
            _launch(_backward_values_kernel, "values", grid_by_channels, (*inputs, grad["values"]), sizes,
                    channel_block=min(values_channels, _power_of_two(v_dim)), config=values_launch,
                    ROUND_WEIGHTED=round_weighted)
        if values_matmul:  # already summed over the rounds in image order
            summed["values"] = _values_gradient_by_matmul(windows, key_weights, grad_rows)
            # not held through the key kernel: at batch 16, 96x96 the products' inputs take 1.2 GB (1.9 with dP)
            del key_weights, grad_rows, grad_weights
        _launch(_backward_keys_kernel, _key_kernel_name(mode), grid,
                (*inputs, grad["keys"], grad.get("values", delta),  # an unused pointer with "+matmul"
                 grad["learned"], grad["queries"], grad_scores), sizes,
                channel_block=dp_channel_block, config=configs.get("keys"), ATOMIC_GRAD_Q=atomic,
                WITH_GRAD_V=not values_apart, LOAD_DS=stored, ROUND_WEIGHTED=round_weighted)

    length = sizes["length"]
    if padded > length:  # fold the padded duplicates' key gradients (rows L .. P-1) into their positions'
        row_offsets = torch.arange(batch * rounds, device=order.device).view(batch, rounds, 1) * padded
        positions = (order[..., length:] + row_offsets).flatten()
        for name in [name for name in ("keys", "learned", "values") if name in grad]:
            duplicates = grad[name][:, :, length:].reshape(positions.numel(), -1).clone()  # same storage
            grad[name].view(batch * rounds * padded, -1).index_add_(0, positions, duplicates)
    summed.update({name: rows[:, :, :length].sum(1) for name, rows in grad.items() if name not in summed})
    return tuple(summed[name].to(tensor.dtype)
                 for name, tensor in (("queries", queries), ("keys", keys), ("learned", learned_score),
                                      ("values", values)))


# Positions and channels per program of _SortedWindows.sum_over_rounds (_sum_sorted_rows_kernel); not timed on a GPU.
SUM_BLOCK_POSITIONS, SUM_BLOCK_CHANNELS, SUM_WARPS = 16, 256, 4


class _SortedWindows:
    """A round's rows in sorted order laid out for batched matrix products over the chunk neighbourhoods.

    Chunk ``c`` of a round sees the chunks ``c - 1, c, c + 1`` (cyclically). With each round's rows laid out as
    the sorted chunks ``n-1, 0, 1, ..., n-1, 0`` (``n + 2`` chunks, ``k`` rows each), chunk ``c``'s neighbourhood is
    the window of ``3k`` rows starting at chunk position ``c``, chunk ``c`` itself the ``k`` rows at ``c + 1``, and
    consecutive windows start ``k`` rows apart: one strided batch of products over every round's ``n + 2`` chunk
    positions reads overlapping windows, without a 3x copy (the last two positions of each round only pad the
    batch: their results are not read, and two spare chunks close the last round's windows)."""

    def __init__(self, order: torch.Tensor, inverse: torch.Tensor, chunk: int):
        self.batch, self.rounds, self.padded = order.shape
        self.length, self.chunk = inverse.shape[-1], chunk
        self.chunk_positions = self.padded // chunk + 2  # per round
        self.inverse = inverse
        self.item_round = torch.arange(self.batch * self.rounds, device=order.device)
        chunk_at = (torch.arange(self.chunk_positions, device=order.device) - 1) % (self.padded // chunk)
        sorted_index = (chunk_at[:, None] * chunk + torch.arange(chunk, device=order.device)).flatten()
        self._image_positions = order.reshape(-1, self.padded).long()[:, sorted_index]  # [N*T, (n + 2) k]

    def rows(self, table: torch.Tensor, shared_by_rounds: bool) -> torch.Tensor:
        """``table``'s rows (``[N, L, C]``, shared by the rounds, or ``[N, T, L, C]``) at every round's sorted
        entries in this layout, float32 ``[N*T * (n + 2) * k + 2k, C]``."""
        first_row = (self.item_round // self.rounds if shared_by_rounds else self.item_round) * self.length
        sorted_rows = self._image_positions + first_row[:, None]
        rows = torch.cat([sorted_rows.flatten(), sorted_rows.new_zeros(2 * self.chunk)])
        return table.reshape(-1, table.shape[-1]).index_select(0, rows).float()

    def windows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every chunk position's neighbourhood in ``rows`` (from :meth:`rows`): ``[N*T * (n + 2), 3k, C]``."""
        count, width = self.batch * self.rounds * self.chunk_positions, rows.shape[-1]
        return rows.as_strided((count, 3 * self.chunk, width), (self.chunk * width, width, 1))

    def own_chunks(self, rows: torch.Tensor) -> torch.Tensor:
        """Every chunk position's own chunk in ``rows``: ``[N*T * (n + 2), k, C]``."""
        count, width = self.batch * self.rounds * self.chunk_positions, rows.shape[-1]
        return rows.as_strided((count, self.chunk, width), (self.chunk * width, width, 1), self.chunk * width)

    def image_rows(self, sorted_rows: torch.Tensor) -> torch.Tensor:
        """Per-chunk results ``[N*T * (n + 2), k, C]`` (chunk position ``c`` holding sorted chunk ``c``) at each
        position's first sorted occurrence, in image order: ``[N, T, L, C]``."""
        width = sorted_rows.shape[-1]
        rows = self.inverse.reshape(-1, self.length).long() + (
            self.item_round * self.chunk_positions * self.chunk)[:, None]
        return sorted_rows.reshape(-1, width).index_select(0, rows.flatten()).view(
            self.batch, self.rounds, self.length, width)

    def sum_over_rounds(self, sorted_rows: torch.Tensor) -> torch.Tensor:
        """Per-chunk results ``[N*T * (n + 2), k, C]`` (chunk position ``c`` holding sorted chunk ``c``) summed
        over the rounds in image order, float32 ``[N, L, C]``, each position's padded duplicate folded in, by one
        kernel: no ``[N, T, L, C]`` gather is written and read again."""
        width = sorted_rows.shape[-1]
        summed = sorted_rows.new_empty(self.batch, self.length, width, dtype=torch.float32)
        block_c = min(SUM_BLOCK_CHANNELS, _power_of_two(width))
        grid = (triton.cdiv(self.length, SUM_BLOCK_POSITIONS), self.batch, triton.cdiv(width, block_c))
        _launch_fixed(_sum_sorted_rows_kernel, grid, sorted_rows.device, sorted_rows.contiguous(),
                      self.inverse.contiguous(), summed, self.length, self.padded - self.length,
                      self.chunk_positions * self.chunk, self.rounds, width, num_warps=SUM_WARPS,
                      BLOCK_L=SUM_BLOCK_POSITIONS, BLOCK_C=block_c)
        return summed


def _values_gradient_by_matmul(windows: _SortedWindows, key_weights: torch.Tensor,
                               grad_rows: torch.Tensor) -> torch.Tensor:
    """dV ``[N, L, C]`` float32, summed over the rounds, from one batched matrix product.

    Key chunk ``c``'s dV is ``A_c G_c``: ``A_c = key_weights[c]`` ``[k, 3k]``, its keys' weights ``P`` (``P w``
    from the mixed gradient) from the query chunks ``c - 1, c, c + 1``, stored by the query kernel, and ``G_c``
    those chunks' incoming gradient rows, the window at ``c`` of ``grad_rows`` (:class:`_SortedWindows`). The
    query kernel computes ``P`` once; cuBLAS then runs the ``P^T dy`` products (TF32 where float32 matrix
    products may use it) instead of the values kernel, which recomputes ``P`` and on an H200 reached about a
    tenth of the tensor cores' TF32 rate."""
    chunk = windows.chunk
    with _autocast_off(grad_rows.device):
        grad_sorted = torch.bmm(key_weights.view(-1, chunk, 3 * chunk), windows.windows(grad_rows))
    return windows.sum_over_rounds(grad_sorted)


def _grad_weights_by_matmul(windows: _SortedWindows, grad_rows: torch.Tensor,
                            value_rows: torch.Tensor) -> torch.Tensor:
    """``dP = g V^T`` of every query chunk against its 3k keys, ``[N*T, n + 2, k, 3k]`` float32 (the query
    kernel's ``GRAD_WEIGHTS``; the last two chunk positions of each round are padding): query chunk ``c``'s
    incoming gradient rows times the values of its window, one batched product (cuBLAS). Unweighted by the
    rounds' weights, which the query kernel applies, as to the dP it computes itself."""
    with _autocast_off(grad_rows.device):
        products = torch.bmm(windows.own_chunks(grad_rows), windows.windows(value_rows).transpose(1, 2))
    return products.view(windows.batch * windows.rounds, windows.chunk_positions, windows.chunk, 3 * windows.chunk)


# Rows and channels per program of the float32 backward's delta (_delta_kernel); not timed on a GPU.
DELTA_BLOCK_ROWS, DELTA_BLOCK_CHANNELS, DELTA_WARPS = 16, 256, 4


def _delta(grad_attended: torch.Tensor, attended: torch.Tensor, grad_confidence: torch.Tensor) -> torch.Tensor:
    """``(grad_attended * attended).sum(-1) - grad_confidence``, float32 ``[N, T, L]``, by one kernel."""
    grad_attended, attended = grad_attended.contiguous(), attended.contiguous()
    grad_confidence = grad_confidence.float().contiguous()
    delta = torch.empty_like(grad_confidence)
    n_rows, v_dim = grad_confidence.numel(), attended.shape[-1]
    _launch_fixed(_delta_kernel, (triton.cdiv(n_rows, DELTA_BLOCK_ROWS),), attended.device, grad_attended, attended,
                  grad_confidence, delta, n_rows, v_dim, num_warps=DELTA_WARPS, BLOCK_R=DELTA_BLOCK_ROWS,
                  BLOCK_C=min(DELTA_BLOCK_CHANNELS, _power_of_two(v_dim)))
    return delta


def _on_device(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# Fallback for GLA's "auto": a self-check on first CUDA use, reference computation after a failure.
# --------------------------------------------------------------------------------------------

_failure: str | None = None
# Ways other than the defaults that failed a process's first self-check: ("forward", mode), ("backward", variant
# name) or ("backward mode", mode) -> the error. The timed choices leave them out; the default ways still run.
_left_out: dict[tuple[str, str], str] = {}
_checked: set[tuple] = set()  # (device, dtype, dot precision) and (device, "hash") that passed a self-check


def fused_kernel_failure() -> str | None:
    """Why the fused kernel was given up in this process (``None`` while it works or is unused)."""
    return _failure


def left_out_variants() -> dict[str, str]:
    """The forward modes and backward variants that failed this process's self-check and that the timed choices
    leave out, with the error: ``{"backward stored_dS+matmul": "RuntimeError: ..."}``. Empty while all work."""
    return {" ".join(way): error for way, error in _left_out.items()}


def _leave_out(way: tuple[str, str], error: BaseException) -> None:
    _left_out[way] = f"{type(error).__name__}: {error}".strip()
    warnings.warn(f"dlsn: the fused attention's {' '.join(way)} failed its self-check ({_left_out[way]}); the timed "
                  f"choices leave it out, the other ways still run", RuntimeWarning, stacklevel=4)


def _give_up(error: BaseException, kernel: str = "chunk-attention") -> None:
    """Stop using every fused kernel of this module in this process (warned once)."""
    global _failure
    if _failure is None:
        _failure = f"{type(error).__name__}: {error}".strip()
        warnings.warn(f"dlsn: the fused {kernel} kernel failed ({_failure}); GLA hashes and attends with "
                      f"the reference (PyTorch) path from now on (same results, slower)", RuntimeWarning,
                      stacklevel=3)


# Largest error of the self-check, relative to each tensor's largest entry, per input precision: far
# below what a wrong index or mask gives (order 1), far above rounding.
SELF_CHECK_TOLERANCE = {"ieee": 1e-4, "tf32": 1e-2, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def self_check(device: torch.device, dtype: torch.dtype = torch.float32, combinations: bool = True,
               variants: Collection[str] | None = None, strict: bool = True) -> None:
    """Fused forward (each way it may run: ``FORWARD_MODES``) and backward (each way it may run:
    :func:`backward_variants`, with ``combinations``) in ``dtype`` against the float64 reference on a small problem; raises if they differ (tolerance:
    ``SELF_CHECK_TOLERANCE``).
    Float32 uses the dot-product precision in force (TF32 or true float32), and each backward mode also as
    :class:`_AttendAndMix` runs it, from the mixed output's gradient and the round weights (the launch
    configurations are those checked above; the weighting changes only which rows are read and scales P and
    dP by row). Covers padding, several chunks, a chunk split over blocks and strided (view) inputs.
    ``variants``: only the backward variants of these names (and, from the mixed gradient, the modes among
    them), so that scripts/warm_kernel_cache.py can compile the check's kernels in parallel processes.
    ``strict=False`` (a process's first use of the kernel): a way other than the default one (the ``"fused"``
    forward, the first backward variant) that fails is left out of the timed choices, warned once
    (:func:`left_out_variants`), instead of raising: the default ways still run."""
    generator = torch.Generator().manual_seed(0)
    batch, rounds, length, chunk, qk_dim, v_dim = 2, 2, 100, 40, 12, 24

    def random(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    queries = random(batch, length, qk_dim)
    keys = torch.nn.functional.normalize(random(batch, length, qk_dim), dim=-1)
    learned_score = random(batch, length, chunk + 3)[..., :chunk]
    values = random(batch, length, 2 * v_dim)[..., v_dim:]
    order = torch.stack([torch.stack([torch.randperm(length, generator=generator) for _ in range(rounds)])
                         for _ in range(batch)])
    padding = -length % chunk
    order = torch.cat([order, order[..., length - padding:]], dim=-1).to(device)
    inverse = torch.empty_like(order[..., :length]).scatter_(
        2, order[..., :length], torch.arange(length, device=device).expand(batch, rounds, -1).contiguous())
    grad_attended, grad_confidence = random(batch, rounds, length, v_dim), random(batch, rounds, length)
    inputs = tuple(t.to(dtype) for t in (queries, keys, learned_score, values))

    fused = _fused_forward(*inputs, order, inverse)
    exact = tuple(t.double() for t in inputs)
    expected = chunk_attention_reference(*exact, order, inverse)
    expected_grads = chunk_attention_reference_backward(grad_attended.double(), grad_confidence.double(),
                                                        *exact, order, inverse)
    tolerance = SELF_CHECK_TOLERANCE[_sizes(*inputs, order, inverse)["precision"] if dtype == torch.float32
                                     else dtype]

    def compare(names, got_tensors, wanted_tensors, what):
        for name, got, want in zip(names, got_tensors, wanted_tensors):
            error = (got.double() - want).abs().max().item()
            if not error <= tolerance * max(1.0, want.abs().max().item()):
                raise RuntimeError(f"self-check ({what}): {name} differs from the reference by {error:.3g}")

    compare(("attended", "confidence"), fused, expected, dtype)

    def optional(way: tuple[str, str], check) -> None:  # a way besides the default: left out if not strict
        if way in _left_out and not strict:
            return
        try:
            check()
        except Exception as error:  # noqa: BLE001 - any failure means: do not offer it
            if strict:
                raise
            _leave_out(way, error)

    if FORWARD_MODE[_generation(device)] == "timed" and dtype in TIMED_FORWARD_DTYPES:  # the others it may run
        for mode in FORWARD_MODES[1:]:
            optional(("forward", mode), lambda mode=mode: compare(
                ("attended", "confidence"), _fused_forward(*inputs, order, inverse, mode=mode), expected,
                f"{dtype}, forward {mode}"))
    configured = _backward_mode(device)
    checked = (backward_variants(device, dtype, combinations) if configured == "timed"  # every way it may run
               else {configured: (configured, {})})
    if variants is not None:
        if unknown := set(variants) - set(checked):
            raise ValueError(f"self_check: no backward variant {sorted(unknown)} for {dtype} on {device}; "
                             f"expected some of {list(checked)}")
        checked = {name: variant for name, variant in checked.items() if name in variants}
    default = BACKWARD_MODES[0] if configured == "timed" else configured  # what runs where nothing is timed
    for name, (mode, configs) in checked.items():
        def check(name=name, mode=mode, configs=configs):
            fused_grads = _fused_backward(grad_attended, grad_confidence, *inputs, order, inverse, *fused, mode=mode,
                                          configs=configs)
            compare(("grad queries", "grad keys", "grad learned score", "grad values"), fused_grads, expected_grads,
                    f"{dtype}, backward {name}")

        if name == default:
            check()
        else:
            optional(("backward", name), check)
    if dtype != torch.float32:
        return
    grad_mixed, round_weights = random(batch, length, v_dim), torch.softmax(random(batch, rounds, length), dim=1)
    grad_weighted = grad_mixed.unsqueeze(1) * round_weights.unsqueeze(-1)  # dy_t = w_t g
    expected_grads = chunk_attention_reference_backward(grad_weighted.double(), grad_confidence.double(), *exact,
                                                        order, inverse)
    delta = _delta(grad_weighted, fused[0], grad_confidence)
    for mode in [mode for mode in (BACKWARD_MODES if configured == "timed" else (configured,))
                 if variants is None or mode in variants]:
        def check(mode=mode):
            fused_grads = _fused_backward(grad_mixed, None, *inputs, order, inverse, None, fused[1], mode=mode,
                                          delta=delta, round_weights=round_weights)
            compare(("grad queries", "grad keys", "grad learned score", "grad values"), fused_grads, expected_grads,
                    f"{dtype}, backward {mode} from the mixed gradient and the round weights")

        if mode == default:
            check()
        else:
            optional(("backward mode", mode), check)


def _fused_allowed(values: torch.Tensor, fallback: bool) -> bool:
    """With ``fallback``: not after a failure, and only once the self-check passed for this device,
    dtype and dot-product precision (run on first use, outside CUDA-graph capture)."""
    if not fallback:
        return True
    if _failure is not None:
        return False
    key = (values.device, values.dtype, tf32_matmuls_allowed())
    if values.is_cuda and key not in _checked and not torch.cuda.is_current_stream_capturing():
        _checked.add(key)
        try:
            self_check(values.device, values.dtype, strict=False)
        except Exception as error:  # noqa: BLE001 - any failure means: do not use the kernel
            _give_up(error)
            return False
    return True


# --------------------------------------------------------------------------------------------
# The custom op and its autograd.
# --------------------------------------------------------------------------------------------

def _check_inputs(queries, keys, learned_score, values, order, inverse) -> None:
    if triton is None:
        raise RuntimeError("dlsn::chunk_attention (the fused GLA kernel) needs the triton package, "
                           "which is not importable; use GLA(attention_impl='reference')")
    for name, tensor in (("queries", queries), ("keys", keys), ("learned_score", learned_score),
                         ("values", values)):
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dlsn::chunk_attention: {name} must be float32, bfloat16 or float16, got {tensor.dtype}")
    if queries.dtype != keys.dtype:
        raise TypeError(f"dlsn::chunk_attention: queries ({queries.dtype}) and keys ({keys.dtype}) must share a dtype")
    padded, chunk = order.shape[-1], learned_score.shape[-1]
    if padded % chunk or not 0 <= padded - inverse.shape[-1] < chunk:
        raise ValueError(f"dlsn::chunk_attention: order has {padded} entries, not the {inverse.shape[-1]} "
                         f"positions padded to a multiple of the chunk size {chunk}")


def _attend(queries, keys, learned_score, values, order, inverse, fallback):
    _check_inputs(queries, keys, learned_score, values, order, inverse)
    if _fused_allowed(values, fallback):
        try:
            return _fused_forward(queries, keys, learned_score, values, order, inverse)
        except Exception as error:
            if not fallback:
                raise
            _give_up(error)
    attended, confidence = chunk_attention_reference(queries, keys, learned_score, values, order, inverse)
    return attended.float(), confidence.float()


@torch.library.custom_op("dlsn::chunk_attention", mutates_args=())
def _chunk_attention_op(queries: torch.Tensor, keys: torch.Tensor, learned_score: torch.Tensor,
                        values: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor,
                        fallback: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _attend(queries, keys, learned_score, values, order, inverse, fallback)


@_chunk_attention_op.register_fake
def _(queries, keys, learned_score, values, order, inverse, fallback):
    batch, rounds, length = inverse.shape
    return (values.new_empty(batch, rounds, length, values.shape[-1], dtype=torch.float32),
            values.new_empty(batch, rounds, length, dtype=torch.float32))


def _attend_backward(grad_attended, grad_confidence, queries, keys, learned_score, values, order, inverse,
                     attended, confidence, fallback):
    inputs = (queries, keys, learned_score, values, order, inverse)
    if _fused_allowed(values, fallback):
        try:
            return _fused_backward(grad_attended, grad_confidence, *inputs, attended, confidence)
        except Exception as error:
            if not fallback:
                raise
            _give_up(error)
    return chunk_attention_reference_backward(grad_attended, grad_confidence, *inputs)


@torch.library.custom_op("dlsn::chunk_attention_backward", mutates_args=())
def _chunk_attention_backward_op(
    grad_attended: torch.Tensor, grad_confidence: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor,
    learned_score: torch.Tensor, values: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor,
    attended: torch.Tensor, confidence: torch.Tensor, fallback: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attend_backward(grad_attended, grad_confidence, queries, keys, learned_score, values, order, inverse,
                            attended, confidence, fallback)


@_chunk_attention_backward_op.register_fake
def _(grad_attended, grad_confidence, queries, keys, learned_score, values, order, inverse, attended,
      confidence, fallback):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in (queries, keys, learned_score, values))


def _setup_context(ctx, inputs, output):
    queries, keys, learned_score, values, order, inverse, fallback = inputs
    ctx.save_for_backward(queries, keys, learned_score, values, order, inverse, *output)
    ctx.fallback = fallback


def _backward(ctx, grad_attended, grad_confidence, backward=_chunk_attention_backward_op):
    queries, keys, learned_score, values, order, inverse, attended, confidence = ctx.saved_tensors
    if grad_attended is None:
        grad_attended = torch.zeros_like(attended)
    if grad_confidence is None:
        grad_confidence = torch.zeros_like(confidence)
    # dy enters the kernels in the values' precision. Cast here, outside the opaque op, torch.compile
    # writes it in that precision straight from the round mixing's backward (half the bytes, one pass less).
    grad_attended = grad_attended.to(values.dtype)
    grads = backward(grad_attended, grad_confidence, queries, keys, learned_score, values, order, inverse,
                     attended, confidence, ctx.fallback)
    return (*grads, None, None, None)


_chunk_attention_op.register_autograd(_backward, setup_context=_setup_context)


class _ChunkAttention(torch.autograd.Function):
    """The eager path of :func:`chunk_attention`: the same forward and backward as the custom ops, without
    their dispatch (on the CPU about 105 us more per forward and backward: the batch-1 rows are bound by
    the host issuing work)."""

    @staticmethod
    def forward(ctx, queries, keys, learned_score, values, order, inverse, fallback):
        output = _attend(queries, keys, learned_score, values, order, inverse, fallback)
        _setup_context(ctx, (queries, keys, learned_score, values, order, inverse, fallback), output)
        return output

    @staticmethod
    def backward(ctx, grad_attended, grad_confidence):
        return _backward(ctx, grad_attended, grad_confidence, backward=_attend_backward)


def chunk_attention(queries: torch.Tensor, keys: torch.Tensor, learned_score: torch.Tensor,
                    values: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor,
                    *, fallback: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Attended values ``[N, T, L, C]`` and log-sum-exp ``[N, T, L]``, float32, fused; see the module
    docstring. Arguments as in :func:`chunk_attention_reference`. ``fallback=True``: self-check on first
    CUDA use and the reference instead of an error if the kernel fails (warned once). The custom op
    ``dlsn::chunk_attention`` (backward ``dlsn::chunk_attention_backward``) under ``torch.compile``, which
    sees it as one opaque operation; an autograd.Function in eager mode."""
    if torch.compiler.is_compiling():
        return _chunk_attention_op(queries, keys, learned_score, values, order, inverse, fallback)
    return _ChunkAttention.apply(queries, keys, learned_score, values, order, inverse, fallback)


# --------------------------------------------------------------------------------------------
# Mixing the rounds in one pass (eager training and inference): no [N, T, L, C] temporaries.
# --------------------------------------------------------------------------------------------

MIX_BLOCK_POSITIONS, MIX_BLOCK_CHANNELS, MIX_WARPS = 16, 256, 4  # not timed on a GPU
# Smallest [N, T, L, C] output mixed by the kernel in GLA (mix_in_one_kernel): below it the layer is bound
# by the host issuing kernels (an H200 at batch 1, 48x48 and 96x96: 0.9 and 2.4 ms of GPU time in 6.2
# and 6.8 ms), where a Triton launch costs more than the PyTorch operations it replaces.
MIX_KERNEL_MIN_ELEMENTS = 2**24


def _mix_rounds_plain(attended: torch.Tensor, round_weights: torch.Tensor) -> torch.Tensor:
    return (attended * round_weights.unsqueeze(-1)).sum(1)


def _mix_launch(kernel_function, grid, tensors, length, n_rounds, v_dim, block_c):
    _launch_fixed(kernel_function, grid, tensors[0].device, *tensors, length, n_rounds, v_dim, num_warps=MIX_WARPS,
                  BLOCK_L=MIX_BLOCK_POSITIONS, BLOCK_C=block_c)


def _mix_forward(attended: torch.Tensor, round_weights: torch.Tensor, fallback: bool) -> torch.Tensor:
    """The mixing kernel on contiguous ``attended`` and ``round_weights``; plain PyTorch after a failure."""
    if _failure is None:
        batch, rounds, length, v_dim = attended.shape
        mixed = attended.new_empty(batch, length, v_dim)
        block_c = min(MIX_BLOCK_CHANNELS, _power_of_two(v_dim))
        grid = (triton.cdiv(length, MIX_BLOCK_POSITIONS), batch, triton.cdiv(v_dim, block_c))
        try:
            _mix_launch(_mix_rounds_kernel, grid, (attended, round_weights, mixed), length, rounds, v_dim, block_c)
            return mixed
        except Exception as error:
            if not fallback:
                raise
            _give_up(error, "round-mixing")  # as the attention kernel: warned once, then plain PyTorch
    return _mix_rounds_plain(attended, round_weights)


class _MixRounds(torch.autograd.Function):
    """The kernels with their backward: an autograd.Function, not a custom op, since only eager code calls
    it (torch.compile gets the plain formula) and a custom op's Python dispatch cost about 75 us more per
    forward and backward (CPU, torch 2.13) on a path whose cost is the host's."""

    @staticmethod
    def forward(ctx, attended, round_weights, fallback):
        attended, round_weights = attended.contiguous(), round_weights.contiguous()
        ctx.save_for_backward(attended, round_weights)
        ctx.fallback = fallback
        return _mix_forward(attended, round_weights, fallback)

    @staticmethod
    def backward(ctx, grad_mixed):
        attended, round_weights = ctx.saved_tensors
        if _failure is None:
            batch, rounds, length, v_dim = attended.shape
            grad_mixed = grad_mixed.contiguous()
            grad_attended, grad_weights = torch.empty_like(attended), torch.empty_like(round_weights)
            try:
                _mix_launch(_mix_rounds_backward_kernel, (triton.cdiv(length, MIX_BLOCK_POSITIONS), batch),
                            (grad_mixed, attended, round_weights, grad_attended, grad_weights), length, rounds,
                            v_dim, _power_of_two(v_dim))
                return grad_attended, grad_weights, None
            except Exception as error:
                if not ctx.fallback:
                    raise
                _give_up(error, "round-mixing")
        grad_mixed = grad_mixed.unsqueeze(1)
        return grad_mixed * round_weights.unsqueeze(-1), (grad_mixed * attended).sum(-1), None


def mix_rounds(attended: torch.Tensor, round_weights: torch.Tensor, *, fallback: bool = False) -> torch.Tensor:
    """``sum_t round_weights[:, t, :, None] * attended[:, t]``: ``[N, T, L, C]`` and ``[N, T, L]`` float32 to
    ``[N, L, C]``, forward and backward each in one pass of one kernel (the plain formula takes a
    ``[N, T, L, C]`` product and a sum, and in backward two broadcast products and a sum: at batch 16,
    96x96, about 4.2 GB of memory traffic against 1.7 GB). Under ``torch.compile`` the plain formula
    (Inductor fuses it itself); after a fused kernel failed too, and ``fallback=True`` turns a failure of
    this kernel into a warning and the plain formula, as for :func:`chunk_attention`."""
    if torch.compiler.is_compiling() or triton is None:
        return _mix_rounds_plain(attended, round_weights)
    return _MixRounds.apply(attended, round_weights, fallback)


def mix_in_one_kernel(attended: torch.Tensor) -> bool:
    """Whether GLA mixes this fused-kernel output with :func:`mix_rounds`: large enough
    (``MIX_KERNEL_MIN_ELEMENTS``), not under ``torch.compile``, the kernels working."""
    return (attended.numel() >= MIX_KERNEL_MIN_ELEMENTS and triton is not None and _failure is None
            and not torch.compiler.is_compiling())


@contextlib.contextmanager
def mixing_from(min_elements: int):
    """Within the block, GLA mixes rounds in one kernel (and float32 training attends and mixes in one node)
    from ``min_elements`` elements of ``[N, T, L, C]`` instead of ``MIX_KERNEL_MIN_ELEMENTS``: 0 runs those
    paths at a small size, as the checks and the kernel warm-up do. The threshold is put back on exit."""
    global MIX_KERNEL_MIN_ELEMENTS
    saved, MIX_KERNEL_MIN_ELEMENTS = MIX_KERNEL_MIN_ELEMENTS, min_elements
    try:
        yield
    finally:
        MIX_KERNEL_MIN_ELEMENTS = saved


# --------------------------------------------------------------------------------------------
# Attention and round mixing as one autograd node (eager float32 training at large sizes).
# --------------------------------------------------------------------------------------------

class _AttendAndMix(torch.autograd.Function):
    """:func:`chunk_attention`, the softmax of the confidences over rounds and :func:`mix_rounds` as one node.

    Its backward needs neither the attended values nor the confidences' gradient. With ``w = softmax_t(lse)``,
    ``m = sum_t w_t y_t`` and ``g = dL/dm``: ``dy_t = w_t g`` and ``dlse_t = w_t (g . y_t - sum_s w_s g . y_s)``,
    so the float32 backward's row term is ``delta_t = dy_t . y_t - dlse_t = w_t (g . m)``. It saves ``m``
    ``[N, L, C]`` instead of ``y`` ``[N, T, L, C]`` (at batch 16, 96x96, C=256: 151 MB instead of 453 per layer)
    and reads ``g`` and ``m`` once for ``delta``, where the mixing backward read ``y`` for ``dL/dw`` and the
    delta kernel read ``dy`` and ``y`` again (about 1.1 GB of memory traffic less per layer there). The
    attention's backward kernels read ``g`` and ``w`` (``round_weights`` of :func:`_fused_backward`), so ``dy``
    ``[N, T, L, C]`` is never made either (453 MB written and 151 MB read less there)."""

    @staticmethod
    def forward(ctx, queries, keys, learned_score, values, order, inverse, fallback):
        attended, confidence = _attend(queries, keys, learned_score, values, order, inverse, fallback)
        round_weights = torch.softmax(confidence, dim=1)
        mixed = _mix_forward(attended.contiguous(), round_weights, fallback)
        ctx.save_for_backward(queries, keys, learned_score, values, order, inverse, confidence, round_weights, mixed)
        ctx.fallback = fallback
        return mixed

    @staticmethod
    def backward(ctx, grad_mixed):
        queries, keys, learned_score, values, order, inverse, confidence, round_weights, mixed = ctx.saved_tensors
        inputs = (queries, keys, learned_score, values, order, inverse)
        grad_mixed = grad_mixed.float().contiguous()
        if _fused_allowed(values, ctx.fallback):
            try:
                delta = mixed_row_terms(grad_mixed, mixed, round_weights)
                return (*_fused_backward(grad_mixed, None, *inputs, None, confidence, delta=delta,
                                         round_weights=round_weights), None, None, None)
            except Exception as error:
                if not ctx.fallback:
                    raise
                _give_up(error)
        # After a failure: the reference backward, with the confidences' gradient from recomputed attended values.
        grad_attended = grad_mixed.unsqueeze(1) * round_weights.unsqueeze(-1)
        attended, _ = chunk_attention_reference(*inputs)
        per_round = (grad_mixed.unsqueeze(1) * attended.float()).sum(-1)  # dL/dw_t = g . y_t
        grad_confidence = round_weights * (per_round - (round_weights * per_round).sum(1, keepdim=True))
        return (*chunk_attention_reference_backward(grad_attended, grad_confidence, *inputs), None, None, None)


def mixed_row_terms(grad_mixed: torch.Tensor, mixed: torch.Tensor, round_weights: torch.Tensor) -> torch.Tensor:
    """The attention backward's row terms where the rounds are mixed in its node: ``delta_t = w_t (g . m)``,
    float32 ``[N, T, L]``, from the mixed output ``m`` and its gradient ``g`` (``[N, L, C]``) and the round weights
    ``w`` (``[N, T, L]``); ``g . m`` by one kernel."""
    row_dot = _delta(grad_mixed, mixed, grad_mixed.new_zeros(grad_mixed.shape[:2]))
    return (round_weights * row_dot.unsqueeze(1)).contiguous()


def attend_and_mix(queries: torch.Tensor, keys: torch.Tensor, learned_score: torch.Tensor, values: torch.Tensor,
                   order: torch.Tensor, inverse: torch.Tensor, *, fallback: bool = False) -> torch.Tensor:
    """``mix_rounds(*chunk_attention(...))`` with the softmax of the confidences over rounds as weights:
    ``[N, L, C]`` float32, the same numbers, one autograd node (:class:`_AttendAndMix`). For float32 values in
    eager mode (:func:`attends_and_mixes` says where GLA uses it); arguments as :func:`chunk_attention`'s."""
    if values.dtype != torch.float32 or torch.compiler.is_compiling():
        raise ValueError(f"attend_and_mix: float32 values in eager mode only, got {values.dtype}"
                         + (" under torch.compile" if torch.compiler.is_compiling() else ""))
    return _AttendAndMix.apply(queries, keys, learned_score, values, order, inverse, fallback)


def attends_and_mixes(values: torch.Tensor, n_rounds: int) -> bool:
    """Whether GLA computes its fused attention and the round mixing with :func:`attend_and_mix`: float32 values,
    autograd on (in inference the separate mixing lets the embeddings go first, which sets the peak memory), and
    an ``[N, T, L, C]`` output that :func:`mix_in_one_kernel` would mix in one kernel."""
    batch, length, v_dim = values.shape
    return (values.dtype == torch.float32 and torch.is_grad_enabled()
            and batch * n_rounds * length * v_dim >= MIX_KERNEL_MIN_ELEMENTS and triton is not None
            and _failure is None and not torch.compiler.is_compiling())


# --------------------------------------------------------------------------------------------
# SB-LSH bucket codes in one kernel (CUDA): no [N, T, L, b] projections in memory.
# --------------------------------------------------------------------------------------------

# Positions per program and warps: the largest block that compiles without register spills for sm_80
# and sm_90 at 128 buckets (tests/test_chunk_attention.py; 64 positions with 4 warps spilled 6 KB per
# thread on sm_90). Not timed on a GPU.
HASH_BLOCK_POSITIONS, HASH_WARPS = 32, 8


def bucket_codes_fused(match: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """``einsum("nld,tdb->ntlb", match, rotations).argmax(-1)``, ``[N, T, L]`` int64, by one Triton
    kernel with true float32 products (CPU tensors: Triton's interpreter, for tests)."""
    match = _unit_column_stride(match.float())
    rotations = rotations.float().contiguous()
    batch, length, dim = match.shape
    rounds, _, n_buckets = rotations.shape
    codes = torch.empty(batch, rounds, length, dtype=torch.int64, device=match.device)
    grid = (triton.cdiv(length, HASH_BLOCK_POSITIONS), batch * rounds)
    _launch_fixed(_hash_codes_kernel, grid, match.device, match, rotations, codes, match.stride(0), match.stride(1),
                  length, rounds, dim, n_buckets, num_warps=HASH_WARPS, num_stages=1, BLOCK_L=HASH_BLOCK_POSITIONS,
                  BLOCK_D=_power_of_two(dim), BLOCK_B=_power_of_two(n_buckets),
                  INTERPRETED=match.device.type != "cuda")
    return codes


def bucket_shortfall(codes: torch.Tensor, match: torch.Tensor, rotations: torch.Tensor) -> float:
    """How far below the largest float64 projection the picked buckets ``codes`` fall at worst, relative
    to the largest projection's magnitude: float32 rounding only (about 1e-7) for a correct argmax."""
    exact = torch.einsum("nld,tdb->ntlb", match.double(), rotations.double())
    shortfall = exact.amax(-1) - exact.gather(-1, codes.unsqueeze(-1)).squeeze(-1)
    return (shortfall.max() / exact.abs().max().clamp_min(1e-300)).item()


def hash_self_check(device: torch.device) -> None:
    """Raises unless every bucket :func:`bucket_codes_fused` picks attains the float64 maximum to float32
    rounding (a wrong index or mask picks buckets far below it), on a small problem with a partial block."""
    generator = torch.Generator().manual_seed(0)
    match = torch.randn(2, 150, 12, generator=generator).to(device)
    rotations = torch.randn(3, 12, 7, generator=generator).to(device)
    shortfall = bucket_shortfall(bucket_codes_fused(match, rotations), match, rotations)
    if not shortfall <= 1e-5:
        raise RuntimeError(f"hash self-check: a picked bucket is {shortfall:.3g} (relative) below the largest "
                           f"projection")


def bucket_codes(match: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """SB-LSH buckets ``argmax_b (match[n, l] . rotations[t, :, b])``, ``[N, T, L]`` int64, in true
    float32. On CUDA one Triton kernel (self-checked on first use; after any failure, warned once, the
    plain path); elsewhere :func:`projections_float32` and ``argmax``. The custom op
    ``dlsn::bucket_codes`` under ``torch.compile``, a plain call in eager mode (no dispatch cost)."""
    if torch.compiler.is_compiling():
        return bucket_codes_op(match, rotations)
    with torch.autocast(match.device.type, enabled=False):
        return _bucket_codes(match, rotations)


@torch.library.custom_op("dlsn::bucket_codes", mutates_args=())
def bucket_codes_op(match: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """:func:`bucket_codes` as a custom op. Autocast is turned off here, inside the op: the operations of
    a custom op's implementation still see the caller's autocast. Doing it here and not around the call
    keeps autocast's enter/exit out of ``torch.compile``'s graph, which AOTAutograd's on-disk cache
    refuses to store (a later process would compile the training step from scratch)."""
    with torch.autocast(match.device.type, enabled=False):
        return _bucket_codes(match, rotations)


def _bucket_codes(match: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    if match.is_cuda and triton is not None and _failure is None:
        key = (match.device, "hash")
        try:
            if key not in _checked and not torch.cuda.is_current_stream_capturing():
                _checked.add(key)
                hash_self_check(match.device)
            return bucket_codes_fused(match, rotations)
        except Exception as error:  # noqa: BLE001 - any failure means: do not use the kernel
            _give_up(error, "hashing")
    return projections_float32(match, rotations).argmax(dim=-1)


@bucket_codes_op.register_fake
def _(match, rotations):
    return match.new_empty(match.shape[0], rotations.shape[0], match.shape[1], dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# Orthonormal SB-LSH rotations in one kernel (CUDA training): a randn and one launch per layer.
# --------------------------------------------------------------------------------------------

# Warps per matrix: no register spills at the training size's 64 x 32 float64 tile (sm_80, sm_90; Triton
# 3.9), 80 bytes per thread at the largest, 128 buckets (8 and 16 warps spilled more).
ORTHONORMAL_WARPS = 4
# The largest tile (rows, columns, as powers of two) the kernel takes: one program per matrix walks its
# columns one after another, so its time grows with the tile. On an H200 (2026-11-28, check_fused_gla.py):
# 3 x [64, 18] (48x48 inputs) 0.060 ms against Cholesky QR's 0.148 ms (and about thirty fewer launches);
# 3 x [128, 64] (128 buckets) 0.78 ms against 0.35 ms, so larger draws keep Cholesky QR.
ORTHONORMAL_MAX_TILE = (64, 32)


def orthonormal_columns_fused(matrix: torch.Tensor) -> torch.Tensor:
    """``Q`` of ``matrix = Q R`` with ``diag(R) > 0`` for a batch of tall matrices ``[T, m, n]`` (``m >= n``), in
    ``matrix``'s dtype, computed in float64 by one Triton kernel (a program per matrix; CPU tensors:
    Triton's interpreter, for tests). The same ``Q`` as :func:`dlsn.models.gla.orthonormal_columns`, whose
    Cholesky QR takes about thirty kernel launches: at batch 1 they cost the host more than the GPU."""
    rounds, rows, cols = matrix.shape
    if rows < cols:
        raise ValueError(f"orthonormal_columns_fused: expected tall matrices (rows >= columns), got {rows} x {cols}")
    matrix = matrix.contiguous()
    q = torch.empty_like(matrix)
    _launch_fixed(_orthonormal_columns_kernel, (rounds,), matrix.device, matrix, q, rows, cols,
                  num_warps=ORTHONORMAL_WARPS, num_stages=1, BLOCK_M=_power_of_two(rows, 2),
                  BLOCK_N=_power_of_two(cols, 2))
    return q


def orthonormal_self_check(device: torch.device, plain) -> None:
    """Raises unless :func:`orthonormal_columns_fused` agrees with ``plain`` (Cholesky QR) to 1e-5 on a
    partial tile."""
    gaussian = torch.randn(3, 50, 18, generator=torch.Generator().manual_seed(0)).to(device)
    error = (orthonormal_columns_fused(gaussian) - plain(gaussian)).abs().max().item()
    if not error <= 1e-5:
        raise RuntimeError(f"rotation self-check: the kernel's Q is {error:.3g} away from Cholesky QR's")


def orthonormal_columns_fast(matrix: torch.Tensor, plain) -> torch.Tensor:
    """:func:`orthonormal_columns_fused` for CUDA tensors in eager mode whose tile is at most
    ``ORTHONORMAL_MAX_TILE`` (self-checked on first use; after any failure, warned once, ``plain``),
    ``plain(matrix)`` elsewhere and under ``torch.compile`` (which runs the random draw and the plain
    formula inside its CUDA graph)."""
    if torch.compiler.is_compiling() or not matrix.is_cuda or triton is None or _failure is not None:
        return plain(matrix)
    rows, cols = matrix.shape[-2:]
    if _power_of_two(rows, 2) <= ORTHONORMAL_MAX_TILE[0] and _power_of_two(cols, 2) <= ORTHONORMAL_MAX_TILE[1]:
        key = (matrix.device, "orthonormal")
        try:
            if key not in _checked and not torch.cuda.is_current_stream_capturing():
                _checked.add(key)
                orthonormal_self_check(matrix.device, plain)
            return orthonormal_columns_fused(matrix)
        except Exception as error:  # noqa: BLE001 - any failure means: do not use the kernel
            _give_up(error, "rotation")
    return plain(matrix)
