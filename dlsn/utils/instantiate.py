"""Building objects from config sections: network (with ``model.pretrained``), callbacks, loggers."""

from __future__ import annotations

import logging

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


def instantiate_callbacks(callbacks_cfg: DictConfig | None) -> list[Callback]:
    """Every entry of ``callbacks`` that has a ``_target_``; ``null`` entries are disabled callbacks."""
    callbacks: list[Callback] = []
    for name, cb_cfg in (callbacks_cfg or {}).items():
        if isinstance(cb_cfg, DictConfig) and "_target_" in cb_cfg:
            log.debug("callback %s: %s", name, cb_cfg._target_)
            callbacks.append(hydra.utils.instantiate(cb_cfg))
    return callbacks


def instantiate_loggers(logger_cfg: DictConfig | None) -> list[Logger]:
    """Every entry of ``logger`` that has a ``_target_`` (``logger=none`` gives an empty list)."""
    loggers: list[Logger] = []
    for name, lg_cfg in (logger_cfg or {}).items():
        if isinstance(lg_cfg, DictConfig) and "_target_" in lg_cfg:
            log.debug("logger %s: %s", name, lg_cfg._target_)
            loggers.append(hydra.utils.instantiate(lg_cfg))
    return loggers
