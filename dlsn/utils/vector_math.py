"""Settle MKL's vector-math kernels before any multithreaded call (bit-exact CPU runs).

PyTorch computes float unary functions of contiguous CPU tensors (``exp``, ``log``, ``sqrt``, ...)
with MKL's vector math library (VML), each intra-op thread on its own chunk. The oneMKL 2024.2
bundled with the torch wheels chooses each VML function's kernel lazily, on its first call; when that
first call runs on several threads at once, one thread can run a lower-accuracy kernel for its whole
chunk, once (pytorch/pytorch#188792). Here it broke exact resume: in about one restarted run in ten,
the first training step's ``logsumexp`` (GLA's round confidences) took the ``exp`` of the first
thread's half of the scores with a different kernel, the loss moved by one ulp, and the weights by
a few ulps after three steps. Uninterrupted runs never showed it (28 of 28 identical), most likely
because their first ``exp`` ran on a tensor small enough for one thread.

Calling every VML function once, on one element and so on one thread, before any parallel work
settles the choice for the rest of the process. It costs well under a millisecond; train.py,
eval.py (through ``apply_extras``) and ``dlsn-sr`` do it at start. Data-loader workers run one
intra-op thread and are not exposed.
"""

from __future__ import annotations

import torch

# Every function ATen may hand to VML (aten/src/ATen/cpu/vml.h), in both precisions it serves.
VML_FUNCTIONS = (
    torch.acos, torch.asin, torch.atan, torch.cos, torch.erf, torch.erfc, torch.erfinv, torch.exp,
    torch.expm1, torch.log, torch.log10, torch.log1p, torch.log2, torch.sin, torch.sqrt, torch.tan,
    torch.tanh, torch.trunc,
)
VML_DTYPES = (torch.float32, torch.float64)

_settled = False


def settle_vector_math() -> bool:
    """Call each VML function once per precision on a one-element CPU tensor (one thread), once per
    process. Returns whether it ran now (``False``: already done, or torch has no MKL)."""
    global _settled
    if _settled or not torch.backends.mkl.is_available():
        return False
    with torch.no_grad():
        for dtype in VML_DTYPES:
            value = torch.full((1,), 0.5, dtype=dtype)  # inside every function's domain
            for function in VML_FUNCTIONS:
                function(value)
    _settled = True
    return True
