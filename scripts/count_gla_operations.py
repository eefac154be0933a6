"""Count the operations one GLA forward+backward issues on the fused path: the host's work at batch 1.

    python scripts/count_gla_operations.py            # on the CPU, a few seconds

At batch 1 the paper layer's forward+backward on a GPU is bound by the host issuing kernels (on an H200,
2026-11-27: 0.9 ms of GPU time in 6.2 ms), so what it costs is roughly the number of operations it
issues. This script counts them on the CPU, as the GPU path runs them: the fused attention (its Triton
launches counted, not run), the hashing as the one kernel it is on a GPU, rotations drawn as on a GPU
(:func:`dlsn.models.gla.draw_rotations_on_device`: a ``randn`` and the orthonormalisation as its one
kernel), a small layer (the count does not depend on the sizes). Counted: every ATen operation that computes something (views, allocations and metadata left
out), each custom op once (what runs inside it is not seen), and the fused kernel's launches. The
fused attention and the match convolution are autograd.Functions in eager mode (custom ops only under
``torch.compile``), so the operations around their kernels are counted too: 87 operations where 79 were
seen while they were custom ops (they hid about ten, and cost the host more to dispatch); 73 since the
rotations are orthonormalised by one kernel instead of Cholesky QR (14 operations here, about thirty
kernels on a GPU, where cuSOLVER and cuBLAS launch several per call); 71 since the float32 backward's
``delta`` is one kernel instead of a product, a sum and a subtraction. The match convolution runs apart
in true float32, as on a GPU (on the CPU it joins the other embeddings' convolution): 76 operations that way
before, 74 since the three embeddings are one autograd node with one backward convolution, 73 since the
score MLP's first layer is one ``addmm`` (no separate bias addition). The loss (``square().mean()``, as
``benchmark_gla.py``) and the gradient accumulation into the parameters are included, as in the benchmark.
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from dlsn.models import chunk_attention as fused
from dlsn.models import float32_ops
from dlsn.models import gla

# Operations that launch no kernel on a GPU: views, allocations, metadata.
NOT_COMPUTING = {
    "as_strided", "view", "reshape", "_reshape_alias", "_unsafe_view", "transpose", "permute", "expand", "expand_as",
    "select", "slice", "unsqueeze", "squeeze", "t", "alias", "detach", "unbind", "split", "split_with_sizes",
    "narrow", "diagonal", "resolve_conj", "resolve_neg", "set_", "lift_fresh", "empty", "empty_like",
    "empty_strided", "new_empty", "new_empty_strided", "is_same_size",
}


class OperationLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def hashing_as_one_operation(log: OperationLog, hashing):
    """``hashing`` (GLA's bucket codes) logged as the one kernel it is on a GPU: on the CPU it computes them
    with a projection and an argmax instead."""
    def logged(match, rotations):
        with _disable_current_modes():
            codes = hashing(match, rotations)
        log.names.append("bucket_codes")
        return codes

    return logged


def rotations_as_one_operation(log: OperationLog):
    """The orthonormalisation of the rotations' Gaussian draw logged as the one kernel it is on a GPU in eager
    mode (:func:`dlsn.models.chunk_attention.orthonormal_columns_fused`): on the CPU, Cholesky QR."""
    def logged(matrix, plain):
        with _disable_current_modes():
            q = plain(matrix)
        log.names.append("orthonormal_columns")
        return q

    return logged


def delta_as_one_operation(log: OperationLog, delta):
    """The float32 backward's ``delta`` logged as the one kernel it is (on the CPU Triton's interpreter runs it,
    copying its arguments in and out)."""
    def logged(*tensors):
        with _disable_current_modes():
            result = delta(*tensors)
        log.names.append("delta")
        return result

    return logged


def count(channels: int = 16, size: int = 12, chunk: int = 16) -> dict:
    """Operations of one forward and one backward (after a warm-up call), and the fused kernel's launches."""
    launches: list[str] = []
    original_launch, original_hashing = fused._launch, fused._bucket_codes
    original_orthonormal, original_delta = fused.orthonormal_columns_fast, fused._delta
    original_apart = float32_ops.match_convolution_apart
    float32_ops.match_convolution_apart = lambda x: True  # as on a GPU
    fused._launch = lambda kernel_function, name, *args, **kwargs: launches.append(name)
    log = OperationLog()
    fused._bucket_codes = hashing_as_one_operation(log, original_hashing)
    fused.orthonormal_columns_fast = rotations_as_one_operation(log)
    fused._delta = delta_as_one_operation(log, original_delta)
    try:
        torch.manual_seed(0)
        layer = gla.GLA(channels, chunk_size=chunk, n_hashes=3, attention_impl="fused")
        layer._rotations = lambda n_buckets, rotations, device: gla.draw_rotations_on_device(
            layer.n_hashes, layer.channels // layer.reduction, n_buckets, device)
        x = torch.randn(1, channels, size, size).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        layer(x).square().mean().backward()  # warm-up: first-use checks
        launches.clear()
        log.names.clear()
        with log:
            output = layer(x)
            forward_count = len(log.names)
            output.square().mean().backward()
    finally:
        fused._launch, fused._bucket_codes = original_launch, original_hashing
        fused.orthonormal_columns_fast, fused._delta = original_orthonormal, original_delta
        float32_ops.match_convolution_apart = original_apart
    computing = [[name for name in part if name not in NOT_COMPUTING]
                 for part in (log.names[:forward_count], log.names[forward_count:])]
    return {"forward": computing[0], "backward": computing[1], "launches": launches}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    counted = count()
    forward, backward, launches = counted["forward"], counted["backward"], counted["launches"]
    print(f"GLA forward+backward, fused path: {len(forward) + len(backward)} operations "
          f"({len(forward)} forward, {len(backward)} backward) and {len(launches)} fused-kernel launches "
          f"({', '.join(launches)})")
    for name, times in collections.Counter(forward + backward).most_common():
        print(f"  {times:3d}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
