"""Checks a composed Hydra config before any work starts, with errors that name the key and what is allowed.

Hydra already refuses overrides of keys that do not exist (the composed config is in struct mode), so
``model.n_hash=3`` fails at composition. This module catches the rest: values of the wrong type or out
of range, and unknown keys written into YAML files (e.g. a typo in an experiment file), by checking
sections against dataclass schemas and ``model``/``data`` against the signature of their ``_target_``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

ALLOWED_SCALES = (2, 3, 4)
ALLOWED_DEGRADATIONS = ("BI", "BD", "DN")
INFERENCE_MODES = ("whole", "chop", "tile")


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key and what is allowed."""


@dataclass
class OptimSchema:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    milestones: list[int] = field(default_factory=lambda: [300, 600, 900, 1200])
    gamma: float = 0.5
    grad_clip: Optional[float] = None
    fused: bool = True


@dataclass
class InferenceSchema:
    mode: str = "chop"
    shave: int = 10
    min_size: int = 160000
    tile_size: int = 128
    overlap: int = 16
    self_ensemble: bool = False
    rotation_seed: Optional[int] = 0


@dataclass
class ModuleSchema:
    skip_factor: Optional[float] = 10.0
    skip_warmup: int = 20
    skip_momentum: float = 0.99
    panel_images: int = 3
    panel_crop: int = 48


def _check_schema(cfg: DictConfig, key: str, schema: type) -> None:
    """Unknown keys and wrong types in ``cfg[key]`` against a dataclass schema."""
    section = OmegaConf.select(cfg, key)
    if section is None:
        raise ConfigError(f"missing config section '{key}'")
    allowed = [f.name for f in dataclasses.fields(schema)]
    for name in section.keys():
        if name not in allowed:
            raise ConfigError(f"unknown key '{key}.{name}'; allowed keys: {', '.join(allowed)}")
    try:
        OmegaConf.merge(OmegaConf.structured(schema), section)
    except Exception as err:  # omegaconf ValidationError names the key and the expected type
        raise ConfigError(f"invalid value in '{key}': {err}") from err


def _import_target(path: str, key: str):
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"'{key}._target_': cannot import {path!r} ({err})") from err


def _type_ok(value: Any, annotation: Any) -> bool:
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        return isinstance(value, (list, tuple, ListConfig))
    return True  # other annotations are not checked here


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def check_target_kwargs(cfg: DictConfig, key: str, extra_keys: tuple[str, ...] = ()) -> None:
    """Keys of ``cfg[key]`` must be parameters of its ``_target_``, with values of the annotated types."""
    section = OmegaConf.select(cfg, key)
    if section is None or "_target_" not in section:
        raise ConfigError(f"'{key}' must be a config with a _target_")
    target = _import_target(section._target_, key)
    signature = inspect.signature(target)
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:
        hints = {}
    params = signature.parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    allowed = [p for p in params if p not in ("self", "args", "kwargs")] + list(extra_keys)
    values = OmegaConf.to_container(section, resolve=True)
    for name, value in values.items():
        if name.startswith("_") or name in extra_keys:
            continue
        if name not in params:
            if accepts_any:
                continue
            raise ConfigError(f"unknown key '{key}.{name}' for {section._target_}; allowed keys: {', '.join(allowed)}")
        annotation = hints.get(name, params[name].annotation)
        if not _type_ok(value, annotation):
            raise ConfigError(f"'{key}.{name}' = {value!r} has the wrong type; expected {_type_name(annotation)}")
    missing = [
        n for n, p in params.items()
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n not in values and n != "self"
    ]
    if missing:
        raise ConfigError(f"'{key}' lacks required key(s) {', '.join(missing)} for {section._target_}")


def _positive_int(cfg: DictConfig, key: str, minimum: int = 1) -> None:
    value = OmegaConf.select(cfg, key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
        raise ConfigError(f"'{key}' = {value!r}: expected an integer >= {minimum}")


def validate_config(cfg: DictConfig, task: str = "train") -> None:
    """Raise :class:`ConfigError` for the first problem found in a composed train/eval config."""
    try:
        scale = cfg.scale
        degradation = cfg.degradation
        seed = cfg.seed
    except Exception as err:
        raise ConfigError(f"top-level keys scale, degradation and seed are required: {err}") from err
    if not isinstance(scale, int) or isinstance(scale, bool) or scale not in ALLOWED_SCALES:
        raise ConfigError(f"'scale' = {scale!r}: allowed values are {', '.join(map(str, ALLOWED_SCALES))}")
    if degradation not in ALLOWED_DEGRADATIONS:
        raise ConfigError(f"'degradation' = {degradation!r}: allowed values are {', '.join(ALLOWED_DEGRADATIONS)}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ConfigError(f"'seed' = {seed!r}: expected an integer or null")

    _check_schema(cfg, "inference", InferenceSchema)
    if cfg.inference.mode not in INFERENCE_MODES:
        raise ConfigError(f"'inference.mode' = {cfg.inference.mode!r}: allowed values are {', '.join(INFERENCE_MODES)}")
    for key in ("inference.min_size", "inference.tile_size"):
        _positive_int(cfg, key)
    _positive_int(cfg, "inference.shave", 0)
    _positive_int(cfg, "inference.overlap", 0)
    if cfg.inference.overlap >= cfg.inference.tile_size:
        raise ConfigError(
            f"'inference.overlap' = {cfg.inference.overlap} must be smaller than inference.tile_size = {cfg.inference.tile_size}"
        )

    check_target_kwargs(cfg, "model", extra_keys=("pretrained",))
    model_scale = OmegaConf.select(cfg, "model.scale")
    if model_scale is not None and model_scale != scale:
        raise ConfigError(f"'model.scale' = {model_scale} differs from 'scale' = {scale}; set scale only")
    for key in ("model.n_feats", "model.n_resgroups", "model.n_resblocks", "model.reduction", "model.chunk_size", "model.n_hashes"):
        _positive_int(cfg, key)
    n_feats, reduction = OmegaConf.select(cfg, "model.n_feats"), OmegaConf.select(cfg, "model.reduction")
    if n_feats is not None and reduction is not None and n_feats % reduction:
        raise ConfigError(f"'model.n_feats' = {n_feats} must be divisible by 'model.reduction' = {reduction}")
    res_scale = OmegaConf.select(cfg, "model.res_scale")
    if res_scale is not None and not res_scale > 0:
        raise ConfigError(f"'model.res_scale' = {res_scale!r}: expected a positive number")

    if "data" in cfg:
        check_target_kwargs(cfg, "data")

    pretrained = OmegaConf.select(cfg, "model.pretrained")
    if pretrained and not cfg.get("ckpt_path") and not Path(pretrained).is_file():
        raise ConfigError(
            f"'model.pretrained' = {pretrained!r}: file not found (a checkpoint of this project or the authors' .pt; "
            "null to train from scratch)"
        )

    if task == "train":
        _check_schema(cfg, "optim", OptimSchema)
        if not cfg.optim.lr > 0:
            raise ConfigError(f"'optim.lr' = {cfg.optim.lr!r}: expected a positive number")
        if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
            raise ConfigError(f"'optim.betas' = {list(cfg.optim.betas)}: expected two numbers in [0, 1)")
        milestones = list(cfg.optim.milestones)
        if milestones != sorted(milestones) or any(m < 1 for m in milestones):
            raise ConfigError(f"'optim.milestones' = {milestones}: expected increasing positive epochs")
        if cfg.optim.grad_clip is not None and not cfg.optim.grad_clip > 0:
            raise ConfigError(f"'optim.grad_clip' = {cfg.optim.grad_clip!r}: expected a positive number or null")
        _check_schema(cfg, "module", ModuleSchema)
        skip = cfg.module.skip_factor
        if skip is not None and not skip > 1:
            raise ConfigError(f"'module.skip_factor' = {skip!r}: expected a number > 1 or null")
