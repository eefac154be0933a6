"""Super-resolution evaluation metrics: Y-channel PSNR and SSIM (the standard SR protocol).

Protocol (the one behind every published SR table):

1. SR and HR are quantised to 8-bit levels: ``q = round(x * 255 / rgb_range)`` clamped to 0..255
   (uint8 arrays are used as they are).
2. Luma of ITU-R BT.601 with MATLAB ``rgb2ycbcr`` coefficients, *not* rounded::

       Y = 16 + (65.481 R + 128.553 G + 24.966 B),   R, G, B in [0, 1]  ->  Y in [16, 235]

   Images that were *single-channel files* (e.g. Set14's ``bridge``) are evaluated on their own
   gray level in the published protocol (MATLAB code skips ``rgb2ycbcr`` for them). Pass
   ``gray=True`` for those: the luma is then taken full-range, ``(Y - 16) * 255 / 219``, which is
   exactly the gray value when R = G = B. The datasets mark such images with ``batch["gray"]``.
3. ``crop_border`` pixels (the scale factor, by convention) are removed on every side.
4. PSNR = ``10 log10(255^2 / MSE)``; SSIM as in Wang et al.'s ``ssim_index.m``: Gaussian window
   11x11 with sigma 1.5, ``C1 = (0.01 * 255)^2``, ``C2 = (0.03 * 255)^2``, 'valid' filtering
   (no padding), mean of the SSIM map.

Everything is computed in float64. Inputs: uint8 numpy ``HxWx3`` arrays, or float tensors
``[3, H, W]`` / ``[1, 3, H, W]`` with values in ``[0, rgb_range]``.

**PSNR cap.** Identical images have infinite PSNR, and near-identical ones arbitrarily large values;
one such image (a flat test card, an SR output that equals HR) would dominate or break a set's
mean (``Infinity`` is not even valid JSON). :class:`PSNR_Y` and the folder scorer therefore cap each
image's PSNR at :data:`PSNR_MAX_DB` = 100 dB (the value common SR evaluation code returns for a
zero MSE) and count the capped images (``PSNR_Y.n_capped``). 100 dB is an MSE of 6.5e-6 on the
0..255 scale, far beyond any real SR result, so no real score is changed. :func:`psnr_y` itself
is uncapped unless ``max_db`` is given.

**Bounded memory.** Both metrics process the image in bands of rows (:data:`BAND_PIXELS` pixels
per band; SSIM bands overlap by the 10 rows its 11-tap window needs) and add up per-band sums, so
the extra memory is a few tens of MB whatever the image size (``scripts/benchmark_metrics.py``).
The results equal a whole-image computation up to float64 rounding of the sums (< 1e-12).

For training/validation loops there are torchmetrics classes :class:`PSNR_Y` and :class:`SSIM_Y`:
``update(sr, hr)`` takes batched float tensors ``[B, 3, H, W]``, computes one value per image and
accumulates ``sum`` and ``count`` (``dist_reduce_fx="sum"``), so ``compute()`` is the per-image
mean across all processes.

**Scoring folders.** ``python -m dlsn.metrics SR_DIR HR_DIR --scale 4 [--json FILE]`` scores SR
images made by any code against HR images with this protocol (see :func:`main` and docs/data.md).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torchmetrics import Metric

__all__ = ["rgb_to_y", "quantize", "psnr_y", "ssim_y", "psnr", "ssim", "PSNR_Y", "SSIM_Y", "PSNR_MAX_DB",
           "SSIM_WINDOW", "BAND_PIXELS", "min_hr_size", "score_folders", "main"]

# MATLAB rgb2ycbcr luma row (for RGB in [0, 1], output on the 0..255 scale).
_Y_COEFFS = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0

#: Per-image PSNR cap (dB) of :class:`PSNR_Y` and the folder scorer (module docstring).
PSNR_MAX_DB = 100.0
#: Side of the SSIM Gaussian window: the Y image after the border crop must be at least this large.
SSIM_WINDOW = 11
#: Pixels per band of rows in which the metrics process an image (bounds their extra memory).
BAND_PIXELS = 1 << 18
_MIN_BAND_ROWS = 32


def min_hr_size(scale: int, crop_border: int | None = None) -> int:
    """Smallest HR side (before modcrop) that leaves an ``SSIM_WINDOW``-pixel Y side for the metrics.

    The HR side is cropped to a multiple of ``scale`` and then loses ``crop_border`` (default: ``scale``)
    pixels at each end: the smallest multiple of ``scale`` that is at least ``SSIM_WINDOW + 2 * crop_border``.
    """
    crop = scale if crop_border is None else crop_border
    return -(-(SSIM_WINDOW + 2 * crop) // scale) * scale


def _compute_device(device: torch.device) -> torch.device:
    # float64 is unsupported on Apple MPS; everything else computes in place.
    return torch.device("cpu") if device.type == "mps" else device


class _ImageRows:
    """One input image (uint8/float numpy ``HxWx3`` or tensor ``[3, H, W]``/``[1, 3, H, W]``), read by rows.

    :meth:`levels` returns a band of rows as float64 8-bit levels, so no full-size float64 copy is made.
    """

    def __init__(self, img, rgb_range: float) -> None:
        self.rgb_range = rgb_range
        if isinstance(img, np.ndarray):
            if img.ndim != 3 or img.shape[-1] != 3:
                raise ValueError(f"expected an HxWx3 numpy array, got shape {img.shape}")
            self.array, self.tensor = img, None
            self.height, self.width = img.shape[:2]
        elif isinstance(img, torch.Tensor):
            t = img.detach()
            if t.ndim == 4:
                if t.shape[0] != 1:
                    raise ValueError(f"expected a single image [1, 3, H, W], got shape {tuple(t.shape)}")
                t = t[0]
            if t.ndim != 3 or t.shape[0] != 3:
                raise ValueError(f"expected a tensor [3, H, W] or [1, 3, H, W], got shape {tuple(img.shape)}")
            self.array, self.tensor = None, t
            self.height, self.width = t.shape[-2:]
        else:
            raise TypeError(f"expected a numpy array or torch tensor, got {type(img).__name__}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, int(self.height), int(self.width))

    def levels(self, top: int, bottom: int) -> torch.Tensor:
        """Rows ``top:bottom`` as a float64 tensor ``[3, rows, W]`` of 8-bit levels (0..255 integers)."""
        if self.array is not None:
            # copy: inputs may be read-only memory maps, which torch.from_numpy does not accept.
            t = torch.from_numpy(np.array(self.array[top:bottom], copy=True)).permute(2, 0, 1)
            if self.array.dtype == np.uint8:
                return t.to(torch.float64)
            return quantize(t.to(torch.float64), self.rgb_range)
        t = self.tensor[:, top:bottom].to(_compute_device(self.tensor.device))
        if t.dtype == torch.uint8:
            return t.to(torch.float64)
        return quantize(t.to(torch.float64), self.rgb_range)


def _to_levels(img, rgb_range: float) -> torch.Tensor:
    """Any supported input -> float64 tensor ``[3, H, W]`` of 8-bit levels (0..255 integers)."""
    rows = _ImageRows(img, rgb_range)
    return rows.levels(0, rows.height)


def quantize(x: torch.Tensor, rgb_range: float = 1.0) -> torch.Tensor:
    """Map ``[0, rgb_range]`` values to 8-bit levels: ``clamp(round(x * 255 / rgb_range), 0, 255)``."""
    return torch.round(x * (255.0 / rgb_range)).clamp_(0.0, 255.0)


def rgb_to_y(img, rgb_range: float = 1.0):
    """BT.601 luma with MATLAB coefficients, unrounded, on the 0..255 scale.

    ``Y = 16 + (65.481 R + 128.553 G + 24.966 B)`` with ``R, G, B`` in ``[0, 1]``.

    * numpy input: channels last (``HxWx3``); uint8 is divided by 255, float is divided by
      ``rgb_range``. Returns a float64 ``HxW`` array.
    * torch input: channels at dim -3 (``[..., 3, H, W]``), values in ``[0, rgb_range]``.
      Returns ``[..., H, W]`` in the input's floating dtype (float64 for integer input).
    """
    if isinstance(img, np.ndarray):
        if img.shape[-1] != 3:
            raise ValueError(f"rgb_to_y expects HxWx3 numpy input, got shape {img.shape}")
        scale = 255.0 if img.dtype == np.uint8 else float(rgb_range)
        rgb = img.astype(np.float64) / scale
        return _Y_OFFSET + rgb @ np.asarray(_Y_COEFFS, dtype=np.float64)
    if isinstance(img, torch.Tensor):
        if img.ndim < 3 or img.shape[-3] != 3:
            raise ValueError(f"rgb_to_y expects a tensor [..., 3, H, W], got shape {tuple(img.shape)}")
        x = img if torch.is_floating_point(img) else img.to(torch.float64)
        scale = 255.0 if img.dtype == torch.uint8 else float(rgb_range)
        coeffs = torch.tensor(_Y_COEFFS, dtype=x.dtype, device=x.device) / scale
        # One weighted channel sum (a single kernel rather than five elementwise passes).
        return torch.tensordot(coeffs, x.movedim(-3, 0), dims=1) + _Y_OFFSET
    raise TypeError(f"rgb_to_y expects a numpy array or torch tensor, got {type(img).__name__}")


def _y_from_levels(levels: torch.Tensor, gray: bool = False) -> torch.Tensor:
    """Luma of 8-bit levels ``[3, h, w]``; full-range for ``gray`` (equals the gray level when R = G = B)."""
    y = rgb_to_y(levels, rgb_range=255.0)
    if gray:
        y = (y - _Y_OFFSET) * (255.0 / 219.0)
    return y


def _checked_pair(sr, hr, rgb_range: float, crop_border: int) -> tuple[_ImageRows, _ImageRows]:
    sr_rows, hr_rows = _ImageRows(sr, rgb_range), _ImageRows(hr, rgb_range)
    if sr_rows.shape != hr_rows.shape:
        raise ValueError(f"SR and HR must have the same shape, got {sr_rows.shape} and {hr_rows.shape}")
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    height, width = sr_rows.height, sr_rows.width
    if crop_border > 0 and (width <= 2 * crop_border or height <= 2 * crop_border):
        raise ValueError(f"crop_border={crop_border} leaves nothing of an image of size {(height, width)}")
    return sr_rows, hr_rows


def _y_bands(sr_rows: _ImageRows, hr_rows: _ImageRows, crop_border: int, gray: bool,
             halo: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Bands of the border-cropped Y images of SR and HR, ``[rows + halo, W - 2 crop_border]`` each.

    Band starts advance by ``rows`` (about :data:`BAND_PIXELS` / W); each band carries ``halo`` extra
    rows below (the last one is shorter), so a 'valid' filter with ``halo + 1`` taps sees every window
    exactly once across the bands.
    """
    cb = crop_border
    height = sr_rows.height - 2 * cb
    right = sr_rows.width - cb
    rows = max(_MIN_BAND_ROWS, BAND_PIXELS // max(int(sr_rows.width), 1))
    for start in range(0, max(height - halo, 1), rows):
        stop = min(start + rows + halo, height)
        y_sr = _y_from_levels(sr_rows.levels(cb + start, cb + stop), gray)[:, cb:right]
        y_hr = _y_from_levels(hr_rows.levels(cb + start, cb + stop), gray)[:, cb:right]
        yield y_sr, y_hr


def _psnr_from_mse(mse: float, data_range: float, max_db: float | None) -> float:
    value = math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)
    if max_db is not None and value > max_db:  # NaN stays NaN (a broken output must stay visible)
        return float(max_db)
    return value


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 255.0, max_db: float | None = None) -> float:
    """Plain PSNR between two float tensors: ``10 log10(data_range^2 / MSE)`` (inf if equal, or ``max_db``)."""
    mse = torch.mean((x.to(torch.float64) - y.to(torch.float64)) ** 2).item()
    return _psnr_from_mse(mse, data_range, max_db)


@lru_cache(maxsize=8)
def _gaussian_window_1d(size: int = SSIM_WINDOW, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    window = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return window / window.sum()


def _filter_valid(maps: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable 2-D correlation with ``outer(window, window)``, 'valid' region only. maps: [N, H, W].

    Written as weighted sums of shifted slices (rows, then columns): no im2col buffer (float64
    ``conv2d`` on the CPU unfolds its input, ``k`` times the output size) and several times faster.
    """
    weights = window.tolist()
    k = len(weights)
    height, width = maps.shape[-2] - k + 1, maps.shape[-1] - k + 1
    rows = maps[:, 0:height] * weights[0]
    for i in range(1, k):
        rows.add_(maps[:, i : i + height], alpha=weights[i])
    out = rows[..., 0:width] * weights[0]
    for j in range(1, k):
        out.add_(rows[..., j : j + width], alpha=weights[j])
    return out


def _ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float) -> torch.Tensor:
    """SSIM map ('valid' region) of two float64 single-channel images ``[H, W]``."""
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    # All five local moments in one batched filtering pass.
    mu_x, mu_y, e_xx, e_yy, e_xy = _filter_valid(torch.stack([x, y, x * x, y * y, x * y]), _gaussian_window_1d())
    sigma_xx = e_xx - mu_x**2
    sigma_yy = e_yy - mu_y**2
    sigma_xy = e_xy - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sigma_xx + sigma_yy + c2))


def _check_ssim_size(shape) -> None:
    if min(shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {tuple(shape)}")


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 255.0) -> float:
    """SSIM of two single-channel images ``[H, W]`` (Wang et al. 2004, ``ssim_index.m``).

    ``SSIM = mean( (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)) )``
    with local statistics from an 11x11 Gaussian (sigma 1.5) over the 'valid' region,
    ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, ``L = data_range``. Computed in bands of rows (module docstring).
    """
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    _check_ssim_size(x.shape)
    halo = SSIM_WINDOW - 1
    height, width = x.shape[-2:]
    rows = max(_MIN_BAND_ROWS, BAND_PIXELS // width)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, height - halo, rows):
        stop = min(start + rows + halo, height)
        total += _ssim_map(x[start:stop], y[start:stop], data_range).sum()
    return total.item() / ((height - halo) * (width - halo))


def psnr_y(sr, hr, crop_border: int, rgb_range: float = 1.0, gray: bool = False, max_db: float | None = None) -> float:
    """Y-channel PSNR (dB) of the standard SR protocol (see module docstring).

    ``max_db`` caps the value (``None``: uncapped, identical images give ``inf``); :class:`PSNR_Y` and
    the folder scorer use :data:`PSNR_MAX_DB`.
    """
    sr_rows, hr_rows = _checked_pair(sr, hr, rgb_range, crop_border)
    squared_error, pixels = None, 0
    for y_sr, y_hr in _y_bands(sr_rows, hr_rows, crop_border, gray, halo=0):
        band = torch.sum((y_sr - y_hr) ** 2)
        squared_error = band if squared_error is None else squared_error + band
        pixels += y_sr.numel()
    return _psnr_from_mse(squared_error.item() / pixels, 255.0, max_db)


def ssim_y(sr, hr, crop_border: int, rgb_range: float = 1.0, gray: bool = False) -> float:
    """Y-channel SSIM of the standard SR protocol (see module docstring)."""
    sr_rows, hr_rows = _checked_pair(sr, hr, rgb_range, crop_border)
    _check_ssim_size((sr_rows.height - 2 * crop_border, sr_rows.width - 2 * crop_border))
    halo = SSIM_WINDOW - 1
    total, positions = None, 0
    for y_sr, y_hr in _y_bands(sr_rows, hr_rows, crop_border, gray, halo=halo):
        band_map = _ssim_map(y_sr, y_hr, 255.0)
        total = band_map.sum() if total is None else total + band_map.sum()
        positions += band_map.numel()
    return total.item() / positions


class _PerImageMean(Metric):
    """Per-image metric averaged over images (not pixels), reduced by summing across processes."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, crop_border: int, rgb_range: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if crop_border < 0:
            raise ValueError(f"crop_border must be >= 0, got {crop_border}")
        self.crop_border = int(crop_border)
        self.rgb_range = float(rgb_range)
        self.add_state("sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _per_image(self, sr: torch.Tensor, hr: torch.Tensor, gray: bool) -> float:
        raise NotImplementedError

    def update(self, sr: torch.Tensor, hr: torch.Tensor, gray=None) -> None:
        """Add one value per image of the batch. ``gray``: optional bools [B] (``batch["gray"]``)."""
        if sr.ndim != 4 or hr.ndim != 4:
            raise ValueError(f"update expects batches [B, 3, H, W], got {tuple(sr.shape)} and {tuple(hr.shape)}")
        if sr.shape != hr.shape:
            raise ValueError(f"SR and HR batches differ in shape: {tuple(sr.shape)} vs {tuple(hr.shape)}")
        flags = [False] * sr.shape[0] if gray is None else [bool(g) for g in gray]
        if len(flags) != sr.shape[0]:
            raise ValueError(f"gray has {len(flags)} flags for a batch of {sr.shape[0]} images")
        values = [self._per_image(s, h, g) for s, h, g in zip(sr, hr, flags)]
        self.sum += torch.tensor(sum(values), dtype=torch.float64, device=self.sum.device)
        self.count += len(values)

    def compute(self) -> torch.Tensor:
        return self.sum / self.count


class PSNR_Y(_PerImageMean):  # noqa: N801 - the metric's conventional name
    """Mean per-image Y-channel PSNR (dB); see :func:`psnr_y`.

    Each image's PSNR is capped at ``max_db`` (default :data:`PSNR_MAX_DB`, ``None`` = uncapped); the
    ``n_capped`` state counts the capped images (summed across processes like ``count``).
    """

    def __init__(self, crop_border: int, rgb_range: float = 1.0, max_db: float | None = PSNR_MAX_DB, **kwargs) -> None:
        super().__init__(crop_border, rgb_range, **kwargs)
        self.max_db = None if max_db is None else float(max_db)
        self.add_state("n_capped", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _per_image(self, sr, hr, gray):
        value = psnr_y(sr, hr, self.crop_border, self.rgb_range, gray)
        if self.max_db is not None and value > self.max_db:
            self.n_capped += 1
            return self.max_db
        return value


class SSIM_Y(_PerImageMean):  # noqa: N801
    """Mean per-image Y-channel SSIM; see :func:`ssim_y`."""

    def _per_image(self, sr, hr, gray):
        return ssim_y(sr, hr, self.crop_border, self.rgb_range, gray)


# ----------------------------------------------------------------------------------------------------------
# Scoring a folder of SR images against a folder of HR images: python -m dlsn.metrics SR_DIR HR_DIR --scale S


class FolderScoreError(ValueError):
    """The folders cannot be scored (nothing pairs, an image is unreadable or has the wrong size)."""


def _hr_folder(folder: Path) -> Path:
    """``folder``, or ``folder/HR`` for the benchmark layout (``Set5/HR/*.png``)."""
    from dlsn.data.io import IMAGE_EXTENSIONS

    has_images = folder.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir() if p.is_file())
    return folder / "HR" if not has_images and (folder / "HR").is_dir() else folder


def pair_folders(sr_dir: str | Path, hr_dir: str | Path, scale: int) -> tuple[list[tuple[str, Path, Path]], list[Path], list[Path]]:
    """Pair SR and HR files by image name: ``(pairs [(name, sr, hr)], unpaired SR files, unpaired HR files)``.

    HR names are those of the datasets (:func:`dlsn.data.io.unique_image_names`: the stem, or
    ``<stem>_<ext>`` when two files share a stem). SR names are made the same way and then lose a
    ``_x<scale>_SR`` or ``_x<scale>`` suffix, so ``eval.py save_images=true`` output
    (``<name>_x<scale>_SR.png``) pairs with its HR folder directly.
    """
    from dlsn.data.io import list_images, strip_sr_suffix, unique_image_names

    hr_files = list_images(_hr_folder(Path(hr_dir).expanduser()))
    sr_files = list_images(Path(sr_dir).expanduser())
    hr_by_name = dict(zip(unique_image_names(hr_files), hr_files))
    sr_by_name: dict[str, Path] = {}
    for path, name in zip(sr_files, unique_image_names(sr_files)):
        name = strip_sr_suffix(name, scale)
        if name in sr_by_name:
            raise FolderScoreError(f"SR files {sr_by_name[name]} and {path} both stand for image {name!r}; "
                                   f"keep one of them")
        sr_by_name[name] = path
    pairs = [(name, sr_by_name[name], hr) for name, hr in hr_by_name.items() if name in sr_by_name]
    unpaired_sr = [path for name, path in sr_by_name.items() if name not in hr_by_name]
    unpaired_hr = [path for name, path in hr_by_name.items() if name not in sr_by_name]
    return pairs, unpaired_sr, unpaired_hr


def score_pair(sr_path: str | Path, hr_path: str | Path, scale: int, crop_border: int | None = None,
               max_db: float | None = PSNR_MAX_DB) -> dict:
    """PSNR/SSIM of one SR file against its HR file under the protocol of ``eval.py``.

    The HR image is read as the datasets read it (:func:`dlsn.data.io.read_image`: RGB uint8, alpha
    dropped, 16-bit scaled) and modcropped to a multiple of ``scale``; single-channel HR files are scored
    on their gray level (``gray=True``). The SR image must have the modcropped HR size, or the HR size
    before modcrop (it is then cropped the same way). Returns ``{"psnr", "ssim", "capped"}``.
    """
    from dlsn.data.degradations import modcrop
    from dlsn.data.io import is_grayscale_file, read_image

    crop = scale if crop_border is None else int(crop_border)
    hr_full = read_image(hr_path)
    hr = modcrop(hr_full, scale)
    sr = read_image(sr_path)
    if sr.shape[:2] == hr_full.shape[:2]:
        sr = sr[: hr.shape[0], : hr.shape[1]]
    if sr.shape[:2] != hr.shape[:2]:
        raise FolderScoreError(
            f"{sr_path} is {sr.shape[0]}x{sr.shape[1]} pixels, but its HR image {hr_path} is "
            f"{hr_full.shape[0]}x{hr_full.shape[1]} ({hr.shape[0]}x{hr.shape[1]} after modcrop to a multiple of {scale})"
        )
    gray = is_grayscale_file(hr_path)
    try:
        value = psnr_y(sr, hr, crop, gray=gray)
        structural = ssim_y(sr, hr, crop, gray=gray)
    except ValueError as exc:
        raise FolderScoreError(f"{hr_path}: {exc}") from exc
    capped = max_db is not None and value > max_db
    return {"psnr": float(max_db) if capped else value, "ssim": structural, "capped": capped}


def score_folders(sr_dir: str | Path, hr_dir: str | Path, scale: int, crop_border: int | None = None,
                  max_db: float | None = PSNR_MAX_DB) -> dict:
    """Scores of every SR/HR pair (see :func:`pair_folders`, :func:`score_pair`) and their means.

    Returns ``{"mean": {"psnr", "ssim", "n"}, "images": {name: {"psnr", "ssim", "capped", "sr", "hr"}},
    "n_capped", "unpaired": {"sr": [...], "hr": [...]}, "scale", "crop_border", "psnr_max_db"}``.
    Raises :class:`FolderScoreError` when no file pairs.
    """
    pairs, unpaired_sr, unpaired_hr = pair_folders(sr_dir, hr_dir, scale)
    if not pairs:
        raise FolderScoreError(
            f"no SR file in {sr_dir} pairs with an HR file in {hr_dir} (names are compared after removing "
            f"a _x{scale} or _x{scale}_SR suffix); SR: {[p.name for p in unpaired_sr][:5]}, "
            f"HR: {[p.name for p in unpaired_hr][:5]}"
        )
    images = {}
    for name, sr_path, hr_path in pairs:
        images[name] = {**score_pair(sr_path, hr_path, scale, crop_border, max_db), "sr": str(sr_path), "hr": str(hr_path)}
    mean = {
        "psnr": float(np.mean([r["psnr"] for r in images.values()])),
        "ssim": float(np.mean([r["ssim"] for r in images.values()])),
        "n": len(images),
    }
    return {
        "mean": mean,
        "images": images,
        "n_capped": sum(r["capped"] for r in images.values()),
        "unpaired": {"sr": [str(p) for p in unpaired_sr], "hr": [str(p) for p in unpaired_hr]},
        "scale": int(scale),
        "crop_border": int(scale if crop_border is None else crop_border),
        "psnr_max_db": max_db,
    }


_CLI_DESCRIPTION = """\
Score a folder of SR images against a folder of HR images with the protocol of eval.py:
Y channel (BT.601, MATLAB coefficients), SR and HR quantised to 8 bits, HR modcropped to a
multiple of --scale, a border of --scale pixels removed, PSNR = 10 log10(255^2 / MSE) capped at
100 dB per image, SSIM with an 11x11 Gaussian window (sigma 1.5). Single-channel HR files are
scored on their gray level, as the published SR tables do.

Files are paired by image name: the file stem (or <stem>_<ext> when two files of a folder share a
stem), ignoring a _x<S> or _x<S>_SR suffix on SR files. So the images of
`python eval.py ... save_images=true` (images/<set>/<name>_x<S>_SR.png) score directly against
the set's HR folder. HR_DIR may also be a benchmark set folder holding HR/.
"""

_CLI_EPILOG = """\
examples:
  python -m dlsn.metrics logs/eval/runs/RUN/images/Set5 data/benchmarks/Set5/HR --scale 4
  python -m dlsn.metrics results/SwinIR_x2 data/benchmarks/Set14 --scale 2 --json swinir_set14.json

exit status: 0 when every pair was scored (unpaired files are named on stderr), 1 when no file
pairs or an image cannot be scored (or, with --strict, when a file is unpaired), 2 on bad arguments.
"""


def main(argv: list[str] | None = None) -> int:
    """Command line of ``python -m dlsn.metrics`` (see ``--help``)."""
    parser = argparse.ArgumentParser(prog="python -m dlsn.metrics", description=_CLI_DESCRIPTION, epilog=_CLI_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sr_dir", metavar="SR_DIR", type=Path, help="folder of super-resolved images")
    parser.add_argument("hr_dir", metavar="HR_DIR", type=Path, help="folder of ground-truth HR images (or a set folder with HR/)")
    parser.add_argument("--scale", type=int, required=True, help="SR factor: modcrop multiple and default border crop")
    parser.add_argument("--crop-border", type=int, default=None, help="pixels removed at each side (default: --scale)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help='write {"mean": {"psnr", "ssim", "n"}, "images": {...}, ...} as strict JSON (atomically)')
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when any file is unpaired")
    args = parser.parse_args(argv)
    if args.scale < 1:
        parser.error(f"--scale must be a positive integer, got {args.scale}")
    if args.crop_border is not None and args.crop_border < 0:
        parser.error(f"--crop-border must be >= 0, got {args.crop_border}")
    for label, folder in (("SR_DIR", args.sr_dir), ("HR_DIR", args.hr_dir)):
        if not folder.is_dir():
            parser.error(f"{label} {folder} is not a folder")

    from dlsn.data.io import ImageReadError
    from dlsn.utils.files import write_json_strict

    try:
        result = score_folders(args.sr_dir, args.hr_dir, args.scale, args.crop_border)
    except (FolderScoreError, ImageReadError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for kind in ("sr", "hr"):
        for path in result["unpaired"][kind]:
            print(f"warning: unpaired {kind.upper()} file {path} (not scored)", file=sys.stderr)

    width = max(len("mean"), *(len(name) for name in result["images"]))
    print(f"{'image':<{width}}  {'PSNR (dB)':>9}  {'SSIM':>6}")
    for name, row in result["images"].items():
        note = f"  (capped at {PSNR_MAX_DB:g} dB)" if row["capped"] else ""
        print(f"{name:<{width}}  {row['psnr']:9.3f}  {row['ssim']:.4f}{note}")
    mean = result["mean"]
    print(f"{'mean':<{width}}  {mean['psnr']:9.3f}  {mean['ssim']:.4f}  ({mean['n']} images, x{args.scale}, "
          f"border {result['crop_border']}, Y channel)")
    if result["n_capped"]:
        print(f"{result['n_capped']} image(s) had their PSNR capped at {PSNR_MAX_DB:g} dB (SR equal or nearly equal to HR)")
    if args.json is not None:
        write_json_strict(args.json, result)
        print(f"wrote {args.json}")
    unpaired = len(result["unpaired"]["sr"]) + len(result["unpaired"]["hr"])
    return 1 if args.strict and unpaired else 0


if __name__ == "__main__":
    sys.exit(main())
