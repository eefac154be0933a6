"""Weights in the authors' format (their EDSR-PyTorch fork), both ways.

The official state_dict names modules by position (``body.3.body.4.conv_assembly_fc.0.weight``);
this file is the only place those names appear. ``load_official`` / ``to_official`` work on a
:class:`~dlsn.models.DLSN` or a single :class:`~dlsn.models.GLA`.

Official extras that carry no learned information are checked, not loaded: ``sub_mean`` and
``add_mean`` (1x1 convs holding the fixed RGB mean shift) must match the model's ``rgb_range``,
and the scalar ``a`` (unused by the official forward pass) must be a one-element tensor.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from dlsn.models.dlsn import DLSN
from dlsn.models.gla import GLA

_GLA_NAMES = {
    "conv_match.0": "match_embedding",
    "conv_assembly.0": "value_embedding",
    "conv_assembly_fc.0": "score_embedding",
    "fc.0": "score_mlp.0",
    "fc.2": "score_mlp.2",
}


def _gla_mapping(official_prefix: str, own_prefix: str) -> dict[str, str]:
    return {
        f"{official_prefix}{official}.{kind}": f"{own_prefix}{own}.{kind}"
        for official, own in _GLA_NAMES.items()
        for kind in ("weight", "bias")
    }


def _conv_mapping(official: str, own: str) -> dict[str, str]:
    return {f"{official}.{kind}": f"{own}.{kind}" for kind in ("weight", "bias")}


def official_names(module: nn.Module) -> dict[str, str]:
    """Official parameter name -> this project's parameter name, for every learned parameter."""
    if isinstance(module, GLA):
        return _gla_mapping("", "")
    if not isinstance(module, DLSN):
        raise TypeError(f"official format exists for DLSN and GLA, not {type(module).__name__}")
    mapping = _conv_mapping("head.0", "head")
    for g, group in enumerate(module.groups):
        n_blocks = len(group.blocks)
        for b in range(n_blocks):
            mapping |= _conv_mapping(f"body.{g}.body.{b}.body.0", f"groups.{g}.blocks.{b}.conv1")
            mapping |= _conv_mapping(f"body.{g}.body.{b}.body.2", f"groups.{g}.blocks.{b}.conv2")
        mapping |= _gla_mapping(f"body.{g}.body.{n_blocks}.", f"groups.{g}.attention.")
        mapping |= _conv_mapping(f"body.{g}.body.{n_blocks + 1}", f"groups.{g}.conv")
    mapping |= _conv_mapping(f"body.{len(module.groups)}", "body_conv")
    for index, layer in enumerate(module.upsampler):
        if isinstance(layer, nn.Conv2d):
            mapping |= _conv_mapping(f"tail.0.{index}", f"upsampler.{index}")
    mapping |= _conv_mapping("tail.1", "reconstruction")
    return mapping


def _mean_shift(module: DLSN) -> dict[str, torch.Tensor]:
    identity = torch.eye(3).view(3, 3, 1, 1)
    mean = module.rgb_mean.detach().flatten().cpu().float()
    return {
        "sub_mean.weight": identity.clone(),
        "sub_mean.bias": -mean,
        "add_mean.weight": identity.clone(),
        "add_mean.bias": mean.clone(),
    }


def to_official(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's weights as an official-format state_dict (loadable by the authors' code)."""
    own = module.state_dict()
    state = {official: own[name].detach().clone() for official, name in official_names(module).items()}
    if isinstance(module, DLSN):
        state = {"a": torch.zeros(1), **_mean_shift(module), **state}
    return state


def _strip_wrapper_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DataParallel / DDP checkpoints prefix every key with "module."
    if state_dict and all(key.startswith("module.") for key in state_dict):
        return {key[len("module."):]: value for key, value in state_dict.items()}
    return dict(state_dict)


def load_official(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, skip_upsampler: bool = False
) -> nn.Module:
    """Load an official-format ``state_dict`` into ``module`` (a DLSN or a GLA), in place.

    Every key must be accounted for: a missing or unexpected key, or a shape mismatch, raises a
    ``ValueError`` listing them. With ``skip_upsampler=True`` the upsampler (``tail.0.*``) is
    neither required nor loaded, so that weights trained at another scale can be fine-tuned.
    Returns the module.
    """
    state_dict = _strip_wrapper_prefix(state_dict)
    mapping = official_names(module)
    if skip_upsampler:
        mapping = {k: v for k, v in mapping.items() if not k.startswith("tail.0.")}
    own_state = module.state_dict()
    checked_extras = _mean_shift(module) if isinstance(module, DLSN) else {}

    problems: list[str] = []
    missing = [key for key in mapping if key not in state_dict]
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    extras = set(checked_extras) | ({"a"} if isinstance(module, DLSN) else set())
    ignored = {key for key in state_dict if skip_upsampler and key.startswith("tail.0.")}
    unexpected = [key for key in state_dict if key not in mapping and key not in extras | ignored]
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    for official, own in mapping.items():
        if official in state_dict and state_dict[official].shape != own_state[own].shape:
            problems.append(f"{official}: shape {list(state_dict[official].shape)} in the file, "
                            f"{list(own_state[own].shape)} expected by the model")
    for key, expected in checked_extras.items():
        if key in state_dict and not torch.allclose(state_dict[key].float().cpu(), expected, atol=1e-4):
            problems.append(f"{key} does not match a mean shift with rgb_range={module.rgb_range}; "
                            f"set rgb_range to the value the weights were trained with")
    if "a" in state_dict and isinstance(module, DLSN) and state_dict["a"].numel() != 1:
        problems.append(f"a: expected a one-element tensor, got shape {list(state_dict['a'].shape)}")
    if problems:
        raise ValueError(f"cannot load official {type(module).__name__} weights: " + "; ".join(problems))

    converted = {own: state_dict[official] for official, own in mapping.items()}
    module.load_state_dict(converted, strict=not skip_upsampler)
    return module


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")
