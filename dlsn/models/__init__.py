"""Super-resolution networks: plain ``nn.Module``s with no Lightning or Hydra inside."""

from dlsn.models.attention import ATTENTION_VARIANTS, LSHAttention, NonLocalAttention, build_attention
from dlsn.models.bicubic import Bicubic  # noqa: F401  (interpolation baseline)
from dlsn.models.dlsn import DLSN
from dlsn.models.edsr import EDSR
from dlsn.models.gla import GLA, set_rotation_seed
from dlsn.models.official import load_official, to_official

__all__ = ["ATTENTION_VARIANTS", "DLSN", "EDSR", "GLA", "LSHAttention", "NonLocalAttention", "build_attention",
           "load_official", "set_rotation_seed", "to_official"]
