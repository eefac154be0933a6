"""Paired LR/HR datasets: random training patches and full-image evaluation sets.

Sources are lists of :class:`ImageRecord` (HR file, optional LR file). Builders:
:func:`folder_records` (any folder of images), :func:`benchmark_records` (``<root>/<Set>/HR`` with
optional ``LR_bicubic/X{s}``) and :func:`dlsn.data.div2k.div2k_records`.

LR images:

* an official LR file is used when it exists and the degradation is BI (and as the BI base of DN);
* otherwise LR is made from the HR image with :func:`dlsn.data.degradations.degrade` once, and
  cached (BI and BD are deterministic);
* DN = BI LR + Gaussian noise. Evaluation sets use a fixed seed per image (derived from ``seed`` and
  the image name), so DN test data is identical on every run; training draws fresh noise for every
  patch on top of the cached BI LR patch (exact, since the noise is independent per pixel).
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dlsn.data.cache import ArrayCache, ArrayHandle
from dlsn.data.degradations import DN_SIGMA, add_noise, check_degradation, check_scale, degrade, modcrop
from dlsn.data.io import IMAGE_EXTENSIONS, ImageReadError, is_grayscale_file, list_images, read_image, unique_image_names

__all__ = ["ImageRecord", "folder_records", "benchmark_records", "SRTrainDataset", "SREvalDataset", "ON_ERROR"]

log = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")


@dataclass(frozen=True)
class ImageRecord:
    """One image: its name (unique within its set, see :func:`dlsn.data.io.unique_image_names`), HR file
    and (optional) matching LR file."""

    name: str
    hr_path: Path
    lr_path: Path | None = None


def _find_lr(lr_dir: Path, hr_path: Path, scale: int) -> Path | None:
    """LR file for ``hr_path``: ``<stem>x{s}.<ext>`` (DIV2K/EDSR naming) or the same name."""
    candidates = [lr_dir / f"{hr_path.stem}x{scale}{hr_path.suffix}", lr_dir / hr_path.name]
    candidates += [lr_dir / f"{hr_path.stem}x{scale}{ext}" for ext in IMAGE_EXTENSIONS]
    return next((c for c in candidates if c.is_file()), None)


def _pair_with_lr(hr_files: list[Path], lr_dir: Path | None, scale: int, on_error: str,
                  skipped: list[str] | None = None) -> list[ImageRecord]:
    """Records of ``hr_files`` with their LR files in ``lr_dir`` (if given); names made unique.

    With ``on_error="skip"`` an HR file without LR file is logged, left out and appended to ``skipped``.
    """
    records = []
    for hr, name in zip(hr_files, unique_image_names(hr_files)):
        lr = None
        if lr_dir is not None:
            lr = _find_lr(lr_dir, hr, scale)
            if lr is None:
                msg = f"missing LR file for {hr}: expected {lr_dir / f'{hr.stem}x{scale}{hr.suffix}'} or {lr_dir / hr.name}"
                if on_error == "raise":
                    raise FileNotFoundError(msg)
                log.warning("skipping: %s", msg)
                if skipped is not None:
                    skipped.append(str(hr))
                continue
        records.append(ImageRecord(name, hr, lr))
    return records


def folder_records(folder: str | Path, scale: int, on_error: str = "raise",
                   skipped: list[str] | None = None) -> list[ImageRecord]:
    """Records of a plain image folder, or of a folder with ``HR/`` (and optional ``LR_bicubic/X{s}/``).

    ``skipped`` (optional) collects the files left out under ``on_error="skip"``.
    """
    folder = Path(folder).expanduser()
    if (folder / "HR").is_dir():
        hr_dir = folder / "HR"
        lr_dir = folder / "LR_bicubic" / f"X{scale}"
        return _pair_with_lr(list_images(hr_dir), lr_dir if lr_dir.is_dir() else None, scale, on_error, skipped)
    return _pair_with_lr(list_images(folder), None, scale, on_error, skipped)


def benchmark_records(root: str | Path, set_name: str, scale: int, on_error: str = "raise",
                      skipped: list[str] | None = None) -> list[ImageRecord]:
    """Records of a benchmark set in the usual layout ``<root>/<set_name>/HR/*.png``.

    LR files are taken from ``<root>/<set_name>/LR_bicubic/X{scale}/`` (``img_001x2.png`` or
    ``img_001.png``) when that folder exists; a missing file there is an error (or a logged skip).
    """
    set_dir = Path(root).expanduser() / set_name
    if not set_dir.is_dir():
        raise FileNotFoundError(f"benchmark set {set_name!r} not found: expected folder {set_dir}")
    return folder_records(set_dir, scale, on_error, skipped)


def _eval_seed(seed: int, set_name: str, name: str) -> np.random.Generator:
    # Stable across runs and processes (no Python hash randomisation).
    return np.random.default_rng([int(seed), zlib.crc32(f"{set_name}/{name}".encode())])


class _PairLoader:
    """Loads (and caches) the modcropped HR and the base LR array of one record."""

    def __init__(self, cache: ArrayCache, scale: int, degradation: str) -> None:
        self.cache, self.scale, self.degradation = cache, scale, degradation

    def hr(self, record: ImageRecord) -> ArrayHandle:
        return self.cache.handle(record.hr_path, f"hr-x{self.scale}", lambda: modcrop(read_image(record.hr_path), self.scale))

    def base_lr(self, record: ImageRecord, hr_shape: tuple[int, ...]) -> ArrayHandle:
        """LR without noise: official file (BI/DN) or the cached BI/BD degradation of HR."""
        s = self.scale
        if record.lr_path is not None and self.degradation in ("BI", "DN"):
            handle = self.cache.handle(record.lr_path, "lr-file", lambda: read_image(record.lr_path))
            expected = (hr_shape[0] // s, hr_shape[1] // s)
            if handle.shape[:2] != expected:
                raise ValueError(
                    f"LR file {record.lr_path} has size {handle.shape[0]}x{handle.shape[1]}, expected "
                    f"{expected[0]}x{expected[1]} (HR {record.hr_path} modcropped to {hr_shape[0]}x{hr_shape[1]}, scale {s})"
                )
            return handle
        kind = "BD" if self.degradation == "BD" else "BI"
        return self.cache.handle(record.hr_path, f"lr-{kind}-x{s}", lambda: degrade(read_image(record.hr_path), s, kind))


def _to_tensor(img: np.ndarray, rgb_range: float) -> torch.Tensor:
    """HxWx3 uint8 -> float32 [3, H, W] in [0, rgb_range]."""
    t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).to(torch.float32)
    return t.mul_(rgb_range / 255.0)


def _prepare(records, on_error, fn, skipped: list[str] | None = None):
    """Apply ``fn`` to every record; on failure raise (naming the file) or log, skip and append to ``skipped``."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {list(ON_ERROR)}, got {on_error!r}")
    kept = []
    for record in records:
        try:
            kept.append((record, fn(record)))
        except (ImageReadError, ValueError, FileNotFoundError) as exc:
            if on_error == "raise":
                raise
            log.warning("skipping %s: %s", record.hr_path, exc)
            if skipped is not None:
                skipped.append(str(record.hr_path))
    return kept


class SRTrainDataset(Dataset):
    """Random aligned LR/HR patches for training.

    Item ``i`` ignores ``i``: it draws an image uniformly, a random ``patch_size`` LR window and the
    HR window ``scale`` times larger at the same place, then (``augment``) random horizontal flip,
    vertical flip and transposition. ``len(dataset) == length`` (``iters_per_epoch * batch_size``),
    independent of the number of images.

    Randomness: with a key ``(seed, epoch, index)`` (what :class:`dlsn.data.samplers.TrainPatchSampler`
    yields) the patch depends on the key alone, so runs with the same seed draw the same patches
    and a resumed run continues exactly. With a plain integer index, a numpy generator per
    process seeded from ``torch.initial_seed()`` (which PyTorch sets per DataLoader worker) is used.
    """

    def __init__(self, records: list[ImageRecord], scale: int, degradation: str, patch_size: int = 48,
                 length: int = 16000, cache: ArrayCache | None = None, rgb_range: float = 1.0,
                 augment: bool = True, on_error: str = "raise") -> None:
        self.scale = check_scale(scale)
        self.degradation = check_degradation(degradation)
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        if length < 1:
            raise ValueError(f"dataset length must be >= 1, got {length}")
        self.patch_size, self.length, self.rgb_range, self.augment = int(patch_size), int(length), float(rgb_range), augment
        loader = _PairLoader(cache or ArrayCache(None), self.scale, self.degradation)
        hr_patch = self.patch_size * self.scale

        def load(record):
            hr = loader.hr(record)
            if hr.shape[0] < hr_patch or hr.shape[1] < hr_patch:
                raise ValueError(f"image {record.hr_path} ({hr.shape[0]}x{hr.shape[1]} after modcrop) is smaller "
                                 f"than a training patch of {hr_patch}x{hr_patch} HR pixels")
            return hr, loader.base_lr(record, hr.shape)

        prepared = _prepare(records, on_error, load)
        if not prepared:
            raise ValueError("no usable training images" + (f" (first: {records[0].hr_path})" if records else ""))
        self.names = [r.name for r, _ in prepared]
        self.pairs = [pair for _, pair in prepared]
        self._rng = None
        self._rng_seed = None

    def __len__(self) -> int:
        return self.length

    def _generator(self) -> np.random.Generator:
        # torch.initial_seed() differs per DataLoader worker; the global rank is mixed in because
        # every DDP process starts from the same seed and would otherwise draw the same patches.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank()
        else:
            rank = int(os.environ.get("RANK", 0))
        seed = (torch.initial_seed(), rank)
        if self._rng is None or self._rng_seed != seed:
            self._rng, self._rng_seed = np.random.default_rng(list(seed)), seed
        return self._rng

    def __getitem__(self, key: int | tuple[int, int, int]) -> dict:
        rng = np.random.default_rng(list(key)) if isinstance(key, tuple) else self._generator()
        image = int(rng.integers(len(self.pairs)))
        hr_handle, lr_handle = self.pairs[image]
        hr, lr = hr_handle.get(), lr_handle.get()
        p, s = self.patch_size, self.scale
        top = int(rng.integers(lr.shape[0] - p + 1))
        left = int(rng.integers(lr.shape[1] - p + 1))
        lr_patch = np.asarray(lr[top : top + p, left : left + p])
        hr_patch = np.asarray(hr[top * s : (top + p) * s, left * s : (left + p) * s])
        if self.degradation == "DN":
            lr_patch = add_noise(lr_patch, DN_SIGMA, rng)
        if self.augment:
            hflip, vflip, transpose = rng.random(3) < 0.5
            if hflip:
                lr_patch, hr_patch = lr_patch[:, ::-1], hr_patch[:, ::-1]
            if vflip:
                lr_patch, hr_patch = lr_patch[::-1], hr_patch[::-1]
            if transpose:
                lr_patch, hr_patch = lr_patch.transpose(1, 0, 2), hr_patch.transpose(1, 0, 2)
        return {"lr": _to_tensor(lr_patch, self.rgb_range), "hr": _to_tensor(hr_patch, self.rgb_range),
                "name": self.names[image]}


class SREvalDataset(Dataset):
    """Full LR/HR image pairs of one evaluation set (HR modcropped: ``H = h * scale``).

    Items: ``{"lr": [3,h,w], "hr": [3,H,W], "name": str, "gray": bool}``; ``gray`` marks
    single-channel source files (evaluated on their gray level, see :mod:`dlsn.metrics`).
    ``skipped`` lists the HR files left out under ``on_error="skip"`` (unreadable, wrong LR size, ...).
    """

    def __init__(self, records: list[ImageRecord], scale: int, degradation: str, set_name: str = "eval",
                 cache: ArrayCache | None = None, rgb_range: float = 1.0, seed: int = 0,
                 on_error: str = "raise") -> None:
        self.scale = check_scale(scale)
        self.degradation = check_degradation(degradation)
        self.set_name, self.rgb_range, self.seed = set_name, float(rgb_range), int(seed)
        cache = cache or ArrayCache(None)
        loader = _PairLoader(cache, self.scale, self.degradation)

        def load(record):
            hr = loader.hr(record)
            lr = loader.base_lr(record, hr.shape)
            if self.degradation == "DN":
                # Deterministic noisy LR, cached: same seed per image on every run.
                base = lr
                source = record.lr_path if record.lr_path is not None else record.hr_path
                lr = cache.handle(source, f"lr-DN-x{self.scale}-seed{self.seed}-{zlib.crc32(f'{set_name}/{record.name}'.encode()):08x}",
                                  lambda: add_noise(np.asarray(base.get()), DN_SIGMA, _eval_seed(self.seed, set_name, record.name)))
            return hr, lr, is_grayscale_file(record.hr_path)

        self.skipped: list[str] = []
        prepared = _prepare(records, on_error, load, self.skipped)
        if not prepared:
            raise ValueError(f"evaluation set {set_name!r} has no usable images"
                             + (f" ({len(self.skipped)} skipped: {', '.join(self.skipped)})" if self.skipped else ""))
        self.names = [r.name for r, _ in prepared]
        self.items = [item for _, item in prepared]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        hr, lr, gray = self.items[index]
        return {"lr": _to_tensor(np.asarray(lr.get()), self.rgb_range), "hr": _to_tensor(np.asarray(hr.get()), self.rgb_range),
                "name": self.names[index], "gray": gray}
