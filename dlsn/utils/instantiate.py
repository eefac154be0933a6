"""Building objects from config sections: network (with ``model.pretrained``), callbacks, loggers."""

from __future__ import annotations

import logging
from typing import Any

import hydra
from lightning import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from torch import nn

log = logging.getLogger(__name__)


def build_network(model_cfg: DictConfig, load_weights: bool = True) -> nn.Module:
    """Instantiate ``model._target_`` with the network's hyperparameters; then load ``model.pretrained``.

    ``pretrained`` is this project's key, not a network argument, so it is removed before instantiation.
    """
    kwargs = OmegaConf.to_container(model_cfg, resolve=True)
    pretrained = kwargs.pop("pretrained", None)
    net = hydra.utils.instantiate(kwargs, _convert_="all")
    if pretrained and load_weights:
        from dlsn.checkpoint import load_pretrained

        load_pretrained(net, pretrained)
    return net


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _instantiate_entries(group_cfg: DictConfig | None, group: str) -> list[Any]:
    """Every entry of a config group that has a ``_target_``; ``null`` entries are switched off."""
    objects = []
    for name, entry in (group_cfg or {}).items():
        if isinstance(entry, DictConfig) and "_target_" in entry:
            log.debug("%s %s: %s", group, name, entry._target_)
            objects.append(hydra.utils.instantiate(entry))
    return objects


def instantiate_callbacks(callbacks_cfg: DictConfig | None) -> list[Callback]:
    return _instantiate_entries(callbacks_cfg, "callback")


def instantiate_loggers(logger_cfg: DictConfig | None) -> list[Logger]:
    """``logger=none`` gives an empty list."""
    return _instantiate_entries(logger_cfg, "logger")
