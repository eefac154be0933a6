"""Ahead-of-time compiles of Triton kernels for a GPU that is not here, and what the compiled kernel uses.

Triton's front end, LLVM and ptxas run on the CPU: a test can check that a kernel compiles for sm_80 (A100)
and sm_90 (H100, H200) and fits their shared memory, and read its register spills from the cubin.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}  # bytes per block: A100, H100


def triton_compile(source, target, num_warps: int, num_stages: int):
    """``source`` (a ``triton.compiler.ASTSource``) compiled for ``target`` (a ``GPUTarget``)."""
    import triton

    return triton.compile(source, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))


def register_spill_bytes(compiled) -> int | None:
    """Bytes of stack per thread (register spills) from the cubin, via the cuobjdump Triton ships."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", cubin.name], capture_output=True, text=True).stdout
    match = re.search(r"STACK:(\d+)", usage)
    return int(match.group(1)) if match else None
