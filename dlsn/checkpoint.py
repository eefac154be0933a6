"""Checkpoint files: crash-safe writing, and loading weights from this project's or the authors' files.

Lightning writes checkpoints through fsspec. For local paths fsspec's "transaction" writes a temporary
file in the system temp directory and ``shutil.move``s it into place; when that directory is on another
filesystem (common: tmpfs ``/tmp``, network scratch) the move is a copy into the destination, so a crash
mid-copy leaves a truncated ``last.ckpt``. :class:`AtomicCheckpointIO` instead writes next to the
destination, fsyncs, and renames with ``os.replace``, which is atomic on POSIX and Windows.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

log = logging.getLogger(__name__)

# Prefix of the network's parameters inside the LightningModule's state_dict (``SRModule.net``).
NET_PREFIX = "net."


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write a file so that readers see either the old file or the complete new one, never a partial one.

    ``write(file_object)`` fills a temporary file in the destination directory; it is flushed, fsynced and
    renamed over ``path``. If ``write`` raises, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes local checkpoints atomically (temp file + fsync + ``os.replace``).

    Remote URLs (``s3://`` ...) are left to Lightning/fsspec, whose object stores commit whole objects.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not support storage_options, got {storage_options!r}")
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        local_path = str(path).removeprefix("file://")
        atomic_write(local_path, lambda f: torch.save(checkpoint, f))


# ----------------------------------------------------------------------------------------------------------
# Reading weights


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint file onto the CPU, with errors that name the file.

    Only load files you trust: Lightning checkpoints are pickles (``weights_only=False``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated file, not a torch file, ...
        raise RuntimeError(f"could not read checkpoint {path}: {type(err).__name__}: {err}") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict (Lightning checkpoint or state_dict), got {type(obj).__name__}")
    return obj


def is_lightning_checkpoint(obj: dict[str, Any]) -> bool:
    return "state_dict" in obj and ("pytorch-lightning_version" in obj or "global_step" in obj)


def network_state_from_lightning(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The network's weights in a Lightning checkpoint of :class:`dlsn.lightning_module.SRModule`.

    With EMA (``EMAWeightAveraging``) the checkpoint's ``state_dict`` holds the averaged weights, i.e.
    the ones validation used, so this returns exactly what was validated.
    """
    state = {k[len(NET_PREFIX) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(NET_PREFIX)}
    if not state:
        raise ValueError(f"the checkpoint's state_dict has no '{NET_PREFIX}*' entries (not an SRModule checkpoint?)")
    return state


def official_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The authors' state_dict inside a loaded ``.pt`` (bare, or under ``state_dict``), without a
    DataParallel ``module.`` prefix."""
    state = checkpoint["state_dict"] if isinstance(checkpoint.get("state_dict"), dict) else checkpoint
    return {key.removeprefix("module."): value for key, value in state.items()}


def _upsampler_prefix(net: nn.Module) -> str | None:
    upsampler = getattr(net, "upsampler", None)
    if upsampler is None:
        return None
    for name, module in net.named_modules():
        if module is upsampler and name:
            return name + "."
    return None


def _merge_with_reinit(
    reference: dict[str, torch.Tensor],
    loaded: dict[str, torch.Tensor],
    reinit_allowed: Callable[[str], bool],
    source: str,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Take ``loaded`` values where they fit ``reference``; keep the reference (fresh) values for the
    upsampler entries whose shape differs or that are missing. Anything else that does not fit is an error."""
    merged, reinitialised, problems = {}, [], []
    for key, value in reference.items():
        new = loaded.get(key)
        if new is not None and tuple(new.shape) == tuple(value.shape):
            merged[key] = new
        elif reinit_allowed(key):
            merged[key] = value
            reinitialised.append(key)
        elif new is None:
            problems.append(f"missing {key} (expected shape {tuple(value.shape)})")
        else:
            problems.append(f"{key}: shape {tuple(new.shape)} in file, {tuple(value.shape)} in the network")
    unexpected = [k for k in loaded if k not in reference and not reinit_allowed(k)]
    problems += [f"unexpected {k}" for k in unexpected]
    if problems:
        shown = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
        raise ValueError(f"{source} does not fit the configured network (check model.* settings):\n  {shown}")
    return merged, reinitialised


def load_pretrained(net: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load ``model.pretrained`` weights into ``net``; returns the names of re-initialised entries.

    Accepts this project's Lightning checkpoints and the authors' DLSN ``.pt`` state_dicts (via
    :func:`dlsn.models.load_official`). When the file was trained for another scale, the upsampler
    (``net.upsampler``, whose shape depends on the scale) keeps its fresh initialisation and this is
    logged; any other mismatch is an error naming the offending entries.
    """
    checkpoint = read_checkpoint(path)
    source = f"model.pretrained={path}"
    upsampler_prefix = _upsampler_prefix(net)

    if is_lightning_checkpoint(checkpoint):
        loaded = network_state_from_lightning(checkpoint)
        reference = net.state_dict()
        in_upsampler = lambda key: upsampler_prefix is not None and key.startswith(upsampler_prefix)  # noqa: E731
        upsampler_fits = all(
            k in loaded and tuple(loaded[k].shape) == tuple(v.shape) for k, v in reference.items() if in_upsampler(k)
        ) and not any(in_upsampler(k) and k not in reference for k in loaded)
        if not upsampler_fits:  # another scale: the whole upsampler starts afresh
            loaded = {k: v for k, v in loaded.items() if not in_upsampler(k)}
        merged, reinitialised = _merge_with_reinit(reference, loaded, in_upsampler, source)
        net.load_state_dict(merged)
    else:
        from dlsn.models import load_official, to_official

        state = official_state_dict(checkpoint)
        # In the official format the upsampler is `tail.0.*` (see load_official's skip_upsampler).
        expected_upsampler = {k: v for k, v in to_official(net).items() if k.startswith("tail.0.")}
        same_scale = all(
            k in state and tuple(state[k].shape) == tuple(v.shape) for k, v in expected_upsampler.items()
        ) and not any(k.startswith("tail.0.") and k not in expected_upsampler for k in state)
        try:
            load_official(net, state, skip_upsampler=not same_scale)
        except ValueError as err:
            raise ValueError(f"{source} does not fit the configured network (check model.* settings): {err}") from err
        reinitialised = [] if same_scale else sorted(expected_upsampler)

    if reinitialised:
        log.warning(
            "%s: trained for another scale; re-initialised the upsampler (%d entries: %s)",
            source,
            len(reinitialised),
            ", ".join(reinitialised),
        )
    else:
        log.info("%s: loaded all network weights", source)
    return reinitialised
