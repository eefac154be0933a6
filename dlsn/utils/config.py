"""Config plumbing: the Hydra resolvers the configs use, the project root, and cross-key checks.

Each component checks its own settings when it is built (the network its sizes and scale, the data
module its degradation, SRModule its optimizer and inference options), and Hydra names the config
key of a failing constructor. What no single constructor can see is checked here, before anything
is built: keys that must agree with each other, and files and devices the run needs.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT_MARKER = ".project-root"


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and what is expected."""


def find_project_root(start: str | os.PathLike) -> Path | None:
    """The nearest directory at or above ``start`` that holds ``.project-root``, or ``None``.

    (The ``rootutils`` package does the same, but its wheel installs a top-level ``tests`` package
    into site-packages, which shadows this repository's ``tests`` helpers.)
    """
    start = Path(start).resolve()
    for directory in [start, *start.parents] if start.is_dir() else start.parents:
        if (directory / PROJECT_ROOT_MARKER).is_file():
            return directory
    return None


def set_project_root(entry_script: str | os.PathLike) -> None:
    """Set ``$PROJECT_ROOT`` from an entry script's location (train.py, eval.py), if not set already."""
    root = find_project_root(entry_script)
    if root is not None and not os.environ.get("PROJECT_ROOT"):
        os.environ["PROJECT_ROOT"] = str(root)


def project_root() -> str:
    """The directory holding ``.project-root`` (logs/ and data/ live there).

    ``$PROJECT_ROOT`` when set (train.py and eval.py set it from their own location), else the nearest
    marked directory above the working directory, else the working directory itself (an installed
    package used from anywhere).
    """
    if os.environ.get("PROJECT_ROOT"):
        return os.environ["PROJECT_ROOT"]
    return str(find_project_root(Path.cwd()) or Path.cwd())


def register_resolvers() -> None:
    """Register every resolver the configs use (idempotent); call before Hydra composes a config.

    ``${project_root:}``, and from :mod:`dlsn.sweep`: ``${dlsn_sweep_group:}`` (one W&B group per
    sweep), ``${dlsn_makedirs:DIR}``, ``${dlsn_slurm_count:VALUE,KEY}``, ``${dlsn_run_id:DIR}``,
    ``${dlsn_run_name:TASK}``, ``${dlsn_run_tags:TAGS}`` and ``${dlsn_study_seed:SEED,STORAGE,STUDY}``.
    """
    from dlsn import sweep

    resolvers = {
        "project_root": project_root,
        "dlsn_sweep_group": sweep.sweep_group_name,
        "dlsn_makedirs": sweep.makedirs,
        "dlsn_slurm_count": sweep.slurm_count,
        "dlsn_run_id": sweep.run_id,
        "dlsn_run_name": sweep.run_name,
        "dlsn_run_tags": sweep.run_tags,
        "dlsn_study_seed": sweep.study_seed,
    }
    for name, function in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)


def apply_extras(cfg: DictConfig) -> None:
    """Process-wide settings: MKL's vector math settled (:mod:`dlsn.utils.vector_math`),
    ``float32_matmul_precision``, and the ``extras`` group (silence known-harmless warnings, print the
    config tree)."""
    import warnings

    import torch

    from dlsn.utils.vector_math import settle_vector_math

    settle_vector_math()  # before any multithreaded CPU work: bit-exact runs and resumes
    precision = cfg.get("float32_matmul_precision")
    if precision:
        torch.set_float32_matmul_precision(precision)
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        # Hints about dataloader workers and logging intervals that do not apply to small sample runs.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    if extras.get("print_config"):
        from dlsn.utils.rich_utils import print_config_tree

        print_config_tree(cfg)


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for settings that contradict each other or name missing resources."""
    scale = cfg.get("scale")
    for key in ("model.scale", "data.scale", "module.scale"):
        value = OmegaConf.select(cfg, key)
        if value is not None and value != scale:
            raise ConfigError(f"'{key}' = {value} differs from 'scale' = {scale}: set scale only")

    if "model" in cfg and "pretrained" in cfg.model:
        raise ConfigError("'model.pretrained' was renamed: start from weights with init_from=PATH")
    init_from = cfg.get("init_from")
    if init_from and not cfg.get("ckpt_path") and not Path(init_from).is_file():
        raise ConfigError(f"'init_from' = {init_from!r}: file not found (a checkpoint of this project, the authors' "
                          ".pt or a .safetensors export; null to train from scratch)")
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and not Path(ckpt_path).is_file():
        raise ConfigError(f"'ckpt_path' = {ckpt_path!r}: file not found")

    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    if accelerator in ("gpu", "cuda"):
        import torch

        available = torch.cuda.device_count()
        devices = OmegaConf.select(cfg, "trainer.devices", default=1)
        wanted = len(devices) if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices) else devices
        if available == 0:
            raise ConfigError(f"'trainer.accelerator' = {accelerator!r} but no CUDA device is visible: "
                              "use trainer=default (auto) or trainer=cpu")
        if isinstance(wanted, int) and wanted > available:
            raise ConfigError(f"'trainer.devices' = {devices}: only {available} CUDA device(s) are visible")
