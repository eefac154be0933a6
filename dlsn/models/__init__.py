"""Super-resolution networks: plain ``nn.Module``s with no Lightning or Hydra inside."""

from dlsn.models import chunk_attention, conv_epilogue, float32_ops
from dlsn.models.attention import ATTENTION_VARIANTS, LSHAttention, NonLocalAttention, build_attention
from dlsn.models.bicubic import Bicubic  # noqa: F401  (interpolation baseline)
from dlsn.models.dlsn import DLSN
from dlsn.models.edsr import EDSR
from dlsn.models.gla import GLA, set_rotation_seed
from dlsn.models.official import load_official, to_official

__all__ = ["ATTENTION_VARIANTS", "DLSN", "EDSR", "GLA", "LSHAttention", "NonLocalAttention", "build_attention",
           "kernel_failures", "load_official", "set_rotation_seed", "to_official"]


def kernel_failures() -> dict[str, str]:
    """The fused kernels given up in this process, by module, with the error: each falls back to PyTorch from
    its first failure on (same results, slower, warned once), so what a benchmark times after it is the
    fallback. Empty while every kernel works or none ran."""
    failures = {"chunk_attention": chunk_attention.fused_kernel_failure(),
                "conv_epilogue": conv_epilogue.fused_kernel_failure(),
                "float32_ops": float32_ops.split_kernel_failure()}
    return {module: error for module, error in failures.items() if error is not None}
