"""Checkpoints and weights: the one place that reads them, writes them and finds the one to resume from.

Reading (:func:`read_checkpoint`, :func:`read_weights`) accepts this project's Lightning checkpoints,
the authors' DLSN ``.pt`` files and ``.safetensors`` files, always with
``torch.load(weights_only=True)``: a checkpoint is a pickle, and a full unpickler runs whatever code
the file names. A file that needs more is refused unless the caller opts in (``trust=True``, the
``trust_checkpoint`` config key). Every error names the file and what is wrong with it.

Loading into a network (:func:`load_into`) checks every key and shape; for fine-tuning at another
scale it can keep the upsampler's fresh initialisation (its shape depends on the scale).

Writing: :class:`AtomicCheckpointIO` makes Lightning write every checkpoint atomically (Lightning's
fsspec path writes a temporary file in the system temp directory and moves it, a copy when that
directory is on another filesystem, so a crash mid-copy leaves a truncated ``last.ckpt``).
:func:`save_weights` exports a network as ``.safetensors`` with its config.

Resuming: :func:`find_resume_checkpoint` returns the newest checkpoint of a run directory that can
be read, warning about (and skipping) empty or truncated ones.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from dlsn.utils.files import atomic_write

log = logging.getLogger(__name__)

# SRModule keeps the network as its attribute `net`, so its weights are the `net.*` entries of
# the Lightning state_dict (tests/test_checkpoint.py checks the two agree).
NETWORK_PREFIX = "net."
SAFETENSORS_CONFIG_KEY = "dlsn_network_config"
LAST_CHECKPOINT = "last.ckpt"
BEST_CHECKPOINT = "best.ckpt"
HPC_CHECKPOINT_GLOB = "hpc_ckpt_*.ckpt"


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used; the message names the file and the reason."""


class Weights(NamedTuple):
    """What :func:`read_weights` found in a file.

    ``config``: the network's config (``_target_`` and arguments) when the file records it (this
    project's checkpoints and safetensors exports) or implies it (the authors' files: everything but
    ``n_hashes`` and ``res_scale``, which they do not store), else ``None``. ``state_dict``: the
    network's weights under this project's parameter names. ``format``: ``"lightning"``,
    ``"official"``, ``"safetensors"`` or ``"state_dict"``. ``degradation``: the LR degradation the
    network was trained for, when the file records it.
    """

    config: dict[str, Any] | None
    state_dict: dict[str, torch.Tensor]
    format: str
    degradation: str | None = None


# -------------------------------------------------------------------------------------------- reading


def read_checkpoint(path: str | os.PathLike, trust: bool = False, mmap: bool = False) -> dict[str, Any]:
    """Load a ``torch.save`` file onto the CPU, safely, with errors that name the file.

    ``trust=True`` allows a full unpickler for files that ``weights_only`` refuses; it runs any code
    the file contains, so use it only for files from a source you trust. ``mmap=True`` maps the
    tensors instead of reading them (a quick validity check of a large file).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the write that created it was interrupted")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
        except (zipfile.BadZipFile, OSError) as err:
            raise CheckpointError(f"{path} is truncated or damaged ({size} bytes; {err})") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as err:  # a damaged file fails in many ways: KeyError, RuntimeError, EOFError, ...
        blocked = re.search(r"(unsupported GLOBAL|Unsupported global:?) (\S+)", str(err))
        if blocked is None:
            raise CheckpointError(f"{path} is truncated or not a PyTorch checkpoint ({size} bytes; {_first_line(err)})") from err
        if not trust:
            raise CheckpointError(
                f"{path} holds a Python object ({blocked.group(2)}) other than tensors and plain containers; "
                "loading it would run code from the file. If you trust the file's source, allow it with "
                "trust_checkpoint=true (dlsn-sr: --trust-checkpoint)."
            ) from None
        log.warning("%s: loading with a full unpickler (trust_checkpoint=true): it can run code from the file", path)
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict (Lightning checkpoint or state_dict), got {type(obj).__name__}")
    return obj


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def is_lightning_checkpoint(obj: Mapping[str, Any]) -> bool:
    return "state_dict" in obj and ("pytorch-lightning_version" in obj or "global_step" in obj)


def _is_official(state: Mapping[str, Any]) -> bool:
    return "head.0.weight" in state and any(key.startswith("tail.") for key in state)


def _strip_wrapper_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DataParallel / DDP checkpoints prefix every key with "module."
    if state and all(key.startswith("module.") for key in state):
        return {key[len("module."):]: value for key, value in state.items()}
    return dict(state)


def read_weights(path: str | os.PathLike, trust: bool = False) -> Weights:
    """The network weights (and config, when known) in ``path``; see :class:`Weights`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    checkpoint = read_checkpoint(path, trust=trust)
    if is_lightning_checkpoint(checkpoint):
        state = {k[len(NETWORK_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(NETWORK_PREFIX)}
        if not state:
            raise CheckpointError(f"{path}: the checkpoint's state_dict has no '{NETWORK_PREFIX}*' entries "
                                  "(not a checkpoint of this project's SRModule?)")
        network = checkpoint.get("dlsn_network") or {}
        config = network.get("config")
        if config is None:  # checkpoints written before dlsn_network existed kept the whole run config
            config = (checkpoint.get("dlsn_config") or {}).get("model")
            if config is not None:
                config = {k: v for k, v in config.items() if k != "pretrained"}
        degradation = network.get("degradation") or (checkpoint.get("dlsn_config") or {}).get("degradation")
        return Weights(None if config is None else dict(config), state, "lightning", degradation)
    state = checkpoint["state_dict"] if isinstance(checkpoint.get("state_dict"), dict) else checkpoint
    state = _strip_wrapper_prefix(state)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state_dict (some values are not tensors)")
    if _is_official(state):
        from dlsn.models.official import from_official

        try:
            config, converted = from_official(state)
        except ValueError as err:
            raise CheckpointError(f"{path}: not a DLSN state_dict in the authors' format ({err})") from err
        return Weights(config, converted, "official")
    return Weights(None, state, "state_dict")


def _read_safetensors(path: Path) -> Weights:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({err})") from err
    config = json.loads(metadata[SAFETENSORS_CONFIG_KEY]) if SAFETENSORS_CONFIG_KEY in metadata else None
    return Weights(config, state, "safetensors")


# -------------------------------------------------------------------------------------------- loading


def _upsampler_prefix(net: nn.Module) -> str | None:
    """State-dict prefix of ``net.upsampler``, the part whose shape depends on the scale."""
    upsampler = getattr(net, "upsampler", None)
    return next((f"{name}." for name, module in net.named_modules() if module is upsampler and name), None)


def load_into(net: nn.Module, state: Mapping[str, torch.Tensor], reinit_upsampler: bool = False,
              source: str = "weights") -> list[str]:
    """Load ``state`` into ``net``, checking every key and shape; returns the re-initialised keys.

    With ``reinit_upsampler=True`` (fine-tuning at another scale) the upsampler keeps its fresh
    initialisation when the file's upsampler does not fit, and a warning lists it. Any other missing,
    unexpected or mis-shaped entry raises :class:`CheckpointError` naming them and ``source``.
    """
    reference = net.state_dict()
    prefix = _upsampler_prefix(net) if reinit_upsampler else None

    def in_upsampler(key: str) -> bool:
        return prefix is not None and key.startswith(prefix)

    upsampler_fits = all(key in state and tuple(state[key].shape) == tuple(value.shape)
                         for key, value in reference.items() if in_upsampler(key)) \
        and not any(in_upsampler(key) and key not in reference for key in state)
    reinitialised = [] if upsampler_fits else sorted(key for key in reference if in_upsampler(key))
    problems = []
    for key, value in reference.items():
        if key in reinitialised:
            continue
        if key not in state:
            problems.append(f"missing {key} (shape {tuple(value.shape)})")
        elif tuple(state[key].shape) != tuple(value.shape):
            problems.append(f"{key}: shape {tuple(state[key].shape)} in the file, {tuple(value.shape)} in the network")
    problems += [f"unexpected {key}" for key in state if key not in reference and not in_upsampler(key)]
    if problems:
        shown = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
        raise CheckpointError(f"{source} does not fit the configured network (check the model settings):\n  {shown}")
    net.load_state_dict({key: state[key] for key in reference if key not in reinitialised}, strict=not reinitialised)
    if reinitialised:
        log.warning("%s: trained for another scale; re-initialised the upsampler (%d entries: %s)",
                    source, len(reinitialised), ", ".join(reinitialised))
    return reinitialised


TRUSTED_NETWORK_PACKAGE = "dlsn.models"


def network_class(target: str, source: str, trust: bool = False, also_allowed: Iterable[str] = ()) -> type:
    """The ``nn.Module`` class named by ``target``, the ``_target_`` of a network config read from ``source``.

    The name comes from the file: importing and calling an arbitrary name (``subprocess.run``) would let
    the file run code although it was read with ``weights_only``. Without ``trust`` only classes of
    ``dlsn.models`` and the names in ``also_allowed`` (e.g. the run's own ``model._target_``) are built.
    """
    if not (trust or target.startswith(TRUSTED_NETWORK_PACKAGE + ".") or target in set(also_allowed)):
        raise CheckpointError(
            f"{source}: its network config names _target_={target!r}, which is not a network of "
            f"{TRUSTED_NETWORK_PACKAGE}; building it would run code named by the file. If you trust the file's "
            "source, allow it with trust_checkpoint=true (dlsn-sr: --trust-checkpoint)."
        )
    module_name, _, attribute = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as err:
        raise CheckpointError(f"{source}: cannot import the network class _target_={target!r} ({err})") from err
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise CheckpointError(f"{source}: _target_={target!r} is not a torch.nn.Module class")
    return cls


def build_network(config: Mapping[str, Any], source: str, trust: bool = False, also_allowed: Iterable[str] = ()) -> nn.Module:
    """The network a config read from a file describes (see :func:`network_class` for what is allowed)."""
    cls = network_class(str(config["_target_"]), source, trust, also_allowed)
    arguments = {key: value for key, value in config.items() if not (key.startswith("_") and key.endswith("_"))}
    try:
        return cls(**arguments)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"cannot build {config['_target_']} from {source} with {arguments}: {err}") from err


def init_from(net: nn.Module, path: str | os.PathLike, trust: bool = False) -> list[str]:
    """Start ``net`` from the weights in ``path`` (``init_from=PATH``), re-initialising the upsampler
    when the file was trained for another scale. Returns the re-initialised keys."""
    weights = read_weights(path, trust=trust)
    reinitialised = load_into(net, weights.state_dict, reinit_upsampler=True, source=f"init_from={path}")
    if not reinitialised:
        log.info("init_from=%s: loaded all network weights (%s file)", path, weights.format)
    return reinitialised


def save_weights(path: str | os.PathLike, net: nn.Module, config: Mapping[str, Any] | None = None) -> None:
    """Export ``net``'s weights (and its config) as ``.safetensors``: no code can hide in such a file."""
    from safetensors.torch import save

    metadata = {} if config is None else {SAFETENSORS_CONFIG_KEY: json.dumps(dict(config))}
    state = {key: value.detach().cpu().contiguous() for key, value in net.state_dict().items()}
    data = save(state, metadata=metadata)
    atomic_write(path, lambda handle: handle.write(data))


# -------------------------------------------------------------------------------------------- writing


def _atomic_checkpoint_io() -> type:
    from lightning.pytorch.plugins.io import TorchCheckpointIO  # noqa: PLC0415 - see __getattr__
    
    class AtomicCheckpointIO(TorchCheckpointIO):
        """``TorchCheckpointIO`` that writes local checkpoints atomically (temporary file + fsync + rename).

        Remote URLs (``s3://`` ...) are left to Lightning/fsspec, whose object stores commit whole objects.
        Reading goes through :func:`read_checkpoint` (weights only, errors naming the file).
        """

        def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
            if storage_options is not None:
                raise TypeError(f"{type(self).__name__} does not support storage_options, got {storage_options!r}")
            if "://" in str(path) and not str(path).startswith("file://"):
                return super().save_checkpoint(checkpoint, path, storage_options)
            atomic_write(str(path).removeprefix("file://"), lambda handle: torch.save(checkpoint, handle))

        def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
            if "://" in str(path) and not str(path).startswith("file://"):
                return super().load_checkpoint(path, map_location=map_location, weights_only=True)
            return read_checkpoint(str(path).removeprefix("file://"))

    AtomicCheckpointIO.__module__, AtomicCheckpointIO.__qualname__ = __name__, "AtomicCheckpointIO"
    return AtomicCheckpointIO


def __getattr__(name: str) -> Any:
    # AtomicCheckpointIO is a Lightning plugin: defined on first use, so that reading weights (eval, dlsn-sr)
    # does not import Lightning.
    if name == "AtomicCheckpointIO":
        globals()[name] = _atomic_checkpoint_io()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------- resuming


def resume_candidates(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints a restarted run of ``run_dir`` could continue from, in order of preference.

    Lightning's SLURM requeue checkpoints (``hpc_ckpt_<n>.ckpt``) and ``checkpoints/last.ckpt``,
    newest first (each is written over time by the same run, so the modification time orders them),
    then ``checkpoints/best.ckpt`` as the last resort.
    """
    root = Path(run_dir)
    latest = list(root.glob(HPC_CHECKPOINT_GLOB)) + list((root / "checkpoints").glob(HPC_CHECKPOINT_GLOB))
    latest = sorted((path for path in latest + [root / "checkpoints" / LAST_CHECKPOINT] if path.is_file()),
                    key=lambda path: path.stat().st_mtime, reverse=True)
    best = root / "checkpoints" / BEST_CHECKPOINT
    return latest + ([best] if best.is_file() else [])


def find_resume_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """The newest readable checkpoint of ``run_dir`` (see :func:`resume_candidates`), or ``None``.

    Empty, truncated or otherwise unreadable candidates are skipped with a warning that names them,
    so a crash during a write can cost at most the progress since the previous checkpoint.
    """
    for candidate in resume_candidates(run_dir):
        try:
            read_checkpoint(candidate, mmap=True)
        except CheckpointError as err:
            log.warning("not resuming from %s: %s", candidate, err)
            continue
        return str(candidate)
    return None


def resolve_ckpt_path(requested: str | None, run_dir: str | os.PathLike) -> str | None:
    """``ckpt_path`` for ``trainer.fit``: an explicit request (checked now), else the run directory's
    newest readable checkpoint, so that re-running a command in the same directory continues it."""
    if requested:
        read_checkpoint(requested, mmap=True)
        return str(requested)
    found = find_resume_checkpoint(run_dir)
    if found is not None:
        log.info("Resuming from %s (found in the run's output directory).", found)
    return found
