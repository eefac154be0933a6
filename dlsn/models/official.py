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
from typing import Any

import torch
from torch import nn

from dlsn.models.dlsn import DIV2K_RGB_MEAN, DLSN
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
    if isinstance(module, GLA) and module.learns_scores:
        return _gla_mapping("", "")
    if not isinstance(module, DLSN):
        raise TypeError(f"official format exists for DLSN and GLA, not {type(module).__name__}")
    if not all(isinstance(group.attention, GLA) and group.attention.learns_scores for group in module.groups):
        raise TypeError(f"official format exists for DLSN with attention='gla', not "
                        f"attention={module.attention_variant!r} (the published code has no other variant)")
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
    # From the constants, not the module's buffer: the module may be a structure on the meta device.
    identity = torch.eye(3, device="cpu").view(3, 3, 1, 1)
    mean = module.rgb_range * torch.tensor(DIV2K_RGB_MEAN, device="cpu")
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
    converted = _converted(module, state_dict, skip_upsampler)
    module.load_state_dict(converted, strict=not skip_upsampler)
    return module


def _converted(module: nn.Module, state_dict: Mapping[str, torch.Tensor], skip_upsampler: bool = False) -> dict[str, torch.Tensor]:
    """The official ``state_dict`` under ``module``'s parameter names, after checking every key and shape."""
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
    return {own: state_dict[official] for official, own in mapping.items()}


def official_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The DLSN configuration an official ``state_dict`` was trained with, read off its keys and shapes.

    The files do not record ``n_hashes`` and ``res_scale`` (they have no weights): the paper's values
    (3 and 0.1) are returned for them.
    """
    state = _strip_wrapper_prefix(state_dict)

    def count(pattern: str) -> int:
        return sum(1 for index in range(10_000) if pattern.format(index) in state) if pattern else 0

    if "head.0.weight" not in state:
        raise ValueError("no head.0.weight: not a DLSN state_dict")
    n_feats = int(state["head.0.weight"].shape[0])
    n_resblocks = count("body.0.body.{}.body.0.weight")
    n_resgroups = count("body.{}.body.0.body.0.weight")
    attention = f"body.0.body.{n_resblocks}."
    if n_resgroups < 1 or f"{attention}conv_match.0.weight" not in state:
        raise ValueError("no residual group with a GLA layer (body.0.body.*): not a DLSN state_dict")
    upsampler = [state[f"tail.0.{i}.weight"] for i in range(0, 8, 2) if f"tail.0.{i}.weight" in state]
    factors = [round((weight.shape[0] / n_feats) ** 0.5) for weight in upsampler]
    scale = 1
    for factor in factors:
        scale *= factor
    mean = state.get("sub_mean.bias")
    rgb_range = 1.0 if mean is None else round(float(-mean.flatten()[0]) / DIV2K_RGB_MEAN[0], 3)
    return {
        "_target_": "dlsn.models.DLSN",
        "scale": scale,
        "n_feats": n_feats,
        "n_resgroups": n_resgroups,
        "n_resblocks": n_resblocks,
        "reduction": n_feats // int(state[f"{attention}conv_match.0.weight"].shape[0]),
        "chunk_size": int(state[f"{attention}fc.2.weight"].shape[0]),
        "n_hashes": 3,
        "res_scale": 0.1,
        "rgb_range": rgb_range,
    }


def from_official(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config, state_dict)`` of an official DLSN file: its configuration (:func:`official_config`)
    and its weights under this project's names, every key and shape checked."""
    config = official_config(state_dict)
    with torch.device("meta"):  # the module's structure gives the names; no memory for weights
        structure = DLSN(**{k: v for k, v in config.items() if k != "_target_"})
    return config, _converted(structure, state_dict)


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")
