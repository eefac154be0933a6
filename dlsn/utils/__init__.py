"""Helpers for train.py/eval.py: config validation, instantiation, Rich output, Hydra resolvers."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from dlsn.utils.config_validation import ConfigError, validate_config
from dlsn.utils.instantiate import build_network, count_parameters, instantiate_callbacks, instantiate_loggers
from dlsn.utils.rich_utils import print_config_tree, results_table

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def register_resolvers() -> None:
    """Resolvers the configs use: ``${project_root:}`` (the repository root, from any working dir)
    and the sweep/launcher ones of :mod:`dlsn.sweep` (``${dlsn_sweep_group:}``, ...)."""
    from dlsn.sweep import register_resolvers as register_sweep_resolvers

    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
    register_sweep_resolvers()


register_resolvers()

__all__ = [
    "ConfigError",
    "PROJECT_ROOT",
    "build_network",
    "count_parameters",
    "instantiate_callbacks",
    "instantiate_loggers",
    "print_config_tree",
    "register_resolvers",
    "results_table",
    "validate_config",
]
