"""Building objects from config groups: the network, and every entry of ``callbacks`` / ``logger``."""

from __future__ import annotations

import logging
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from torch import nn

log = logging.getLogger(__name__)


def network_config(model_cfg: DictConfig | dict) -> dict[str, Any]:
    """The resolved ``model`` config as a plain dict (what checkpoints store to rebuild the network)."""
    return OmegaConf.to_container(model_cfg, resolve=True) if OmegaConf.is_config(model_cfg) else dict(model_cfg)


def build_network(model_cfg: DictConfig | dict) -> nn.Module:
    """Instantiate ``model._target_`` with the network's hyperparameters (errors name the config key)."""
    return hydra.utils.instantiate(model_cfg, _convert_="all")


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def instantiate_group(group_cfg: DictConfig | None, group: str) -> list[Any]:
    """Every entry of a config group (``callbacks``, ``logger``) that has a ``_target_``; ``null``
    entries are switched off, so ``callbacks.validation_panel=null`` removes one callback."""
    objects = []
    for name, entry in (group_cfg or {}).items():
        if isinstance(entry, DictConfig) and "_target_" in entry:
            log.debug("%s %s: %s", group, name, entry._target_)
            objects.append(hydra.utils.instantiate(entry, _convert_="all"))
    return objects


def log_hyperparameters(loggers: list, cfg: DictConfig, net: nn.Module) -> None:
    """Log the resolved run config and the parameter count to every logger, once per run."""
    if not loggers:
        return
    params = {**OmegaConf.to_container(cfg, resolve=True), "model/params": count_parameters(net)}
    for logger in loggers:
        logger.log_hyperparams(params)
