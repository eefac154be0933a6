"""Whole-image inference within bounded memory, and the x8 geometric self-ensemble.

Every function takes ``forward``: any callable mapping an LR batch ``[B, C, h, w]`` to the SR batch
``[B, C', h * scale, w * scale]`` (usually the network itself). They compose: ``super_resolve``
applies self-ensemble outside and chop/tile inside, so each of the eight transformed images is
processed tile by tile.

Two ways to bound memory:

* ``chop`` (what the DLSN/EDSR/RCAN test code does): split the image into four quadrants that
  overlap by ``shave`` LR pixels, recursively, until a piece has at most ``min_size`` LR pixels;
  each output quadrant is taken from the piece that computed it, dropping the overlap. Unlike the
  authors' code an image already at most ``min_size`` pixels is processed whole.
* ``tile``: a sliding window of ``tile_size`` LR pixels with ``overlap`` pixels shared between
  neighbours, for any image size; neighbours split their overlap in the middle, so every kept output
  pixel is at least ``overlap // 2`` LR pixels from an inner tile edge (no seams from zero padding).

Both are exact for networks whose receptive field is smaller than the overlap; DLSN's global
attention sees the whole (piece of the) image, so pieces change the result slightly, which is why
papers fix these settings for evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

Forward = Callable[[torch.Tensor], torch.Tensor]
InferenceMode = Literal["whole", "chop", "tile"]


def chop_forward(forward: Forward, lr: torch.Tensor, scale: int, shave: int = 10, min_size: int = 160000) -> torch.Tensor:
    """Run ``forward`` on overlapping quadrants of ``lr`` recursively until each has ``<= min_size`` pixels."""
    if shave < 0:
        raise ValueError(f"chop: shave must be >= 0, got {shave}")
    if min_size < 1:
        raise ValueError(f"chop: min_size must be >= 1, got {min_size}")
    height, width = lr.shape[-2:]
    if height * width <= min_size:
        return forward(lr)
    half_h, half_w = height // 2, width // 2
    # Each quadrant extends `shave` pixels past the split line into its neighbour (ceil so that the
    # bottom/right pieces still reach the split line when a side is odd and shave is 0).
    piece_h, piece_w = min(height - half_h + shave, height), min(width - half_w + shave, width)
    if piece_h == height and piece_w == width:  # image too small to split with this shave
        return forward(lr)
    top, bottom = slice(0, piece_h), slice(height - piece_h, height)
    left, right = slice(0, piece_w), slice(width - piece_w, width)
    pieces = [chop_forward(forward, lr[..., rows, cols], scale, shave, min_size) for rows in (top, bottom) for cols in (left, right)]

    s = scale
    out = pieces[0].new_empty(*pieces[0].shape[:-2], height * s, width * s)
    # Output split lines, and where they fall inside the bottom/right pieces.
    split_h, split_w = half_h * s, half_w * s
    offset_h, offset_w = (half_h - (height - piece_h)) * s, (half_w - (width - piece_w)) * s
    out[..., :split_h, :split_w] = pieces[0][..., :split_h, :split_w]
    out[..., :split_h, split_w:] = pieces[1][..., :split_h, offset_w:]
    out[..., split_h:, :split_w] = pieces[2][..., offset_h:, :split_w]
    out[..., split_h:, split_w:] = pieces[3][..., offset_h:, offset_w:]
    return out


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of windows of size ``tile`` covering ``[0, length)``; the last one ends at ``length``."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _tile_cores(starts: list[int], tile: int, length: int) -> list[tuple[int, int]]:
    """The part ``[lo, hi)`` of the axis each tile writes: neighbours split their overlap in the middle."""
    bounds = [0]
    for current, following in zip(starts, starts[1:]):
        bounds.append((following + current + tile) // 2)
    bounds.append(length)
    return list(zip(bounds[:-1], bounds[1:]))


def tile_forward(forward: Forward, lr: torch.Tensor, scale: int, tile_size: int = 128, overlap: int = 16) -> torch.Tensor:
    """Run ``forward`` on ``tile_size`` x ``tile_size`` LR windows sharing ``overlap`` pixels.

    Each output pixel comes from one tile: neighbouring tiles split their overlap in the middle, so
    every kept pixel is at least ``overlap // 2`` LR pixels away from an inner tile edge (where the
    network sees zero padding instead of the image). The result equals a whole-image pass for
    networks whose receptive-field radius is at most ``overlap // 2``.
    """
    if tile_size < 1:
        raise ValueError(f"tile: tile_size must be >= 1, got {tile_size}")
    if not 0 <= overlap < tile_size:
        raise ValueError(f"tile: overlap must be in [0, tile_size={tile_size}), got {overlap}")
    height, width = lr.shape[-2:]
    if height <= tile_size and width <= tile_size:
        return forward(lr)
    stride = tile_size - overlap
    row_starts, col_starts = _tile_starts(height, tile_size, stride), _tile_starts(width, tile_size, stride)
    tile_h, tile_w = min(tile_size, height), min(tile_size, width)
    row_cores, col_cores = _tile_cores(row_starts, tile_h, height), _tile_cores(col_starts, tile_w, width)
    s = scale
    out = None
    for y, (top, bottom) in zip(row_starts, row_cores):
        for x, (left, right) in zip(col_starts, col_cores):
            sr = forward(lr[..., y : y + tile_h, x : x + tile_w])
            if out is None:
                out = sr.new_empty(*sr.shape[:-2], height * s, width * s)
            out[..., top * s : bottom * s, left * s : right * s] = sr[
                ..., (top - y) * s : (bottom - y) * s, (left - x) * s : (right - x) * s
            ]
    return out


def _transform(x: torch.Tensor, index: int) -> torch.Tensor:
    """The ``index``-th (0..7) element of the dihedral group: optional transpose, vertical and horizontal flip."""
    if index & 4:
        x = x.transpose(-2, -1)
    if index & 2:
        x = x.flip(-2)
    if index & 1:
        x = x.flip(-1)
    return x


def _inverse_transform(x: torch.Tensor, index: int) -> torch.Tensor:
    if index & 1:
        x = x.flip(-1)
    if index & 2:
        x = x.flip(-2)
    if index & 4:
        x = x.transpose(-2, -1)
    return x


def self_ensemble_forward(forward: Forward, lr: torch.Tensor) -> torch.Tensor:
    """x8 geometric self-ensemble (the "+" rows of SR tables): average over flips and transposes."""
    total = None
    for index in range(8):
        sr = _inverse_transform(forward(_transform(lr, index)), index)
        total = sr if total is None else total + sr
    return total / 8


INFERENCE_MODES = ("whole", "chop", "tile")


@dataclass(frozen=True)
class InferenceOptions:
    """Settings of :func:`super_resolve` (``configs/inference/``); a bad value raises ``ValueError``
    naming the option, so that the LightningModule refuses it when it is built, not at the first
    validation."""

    mode: InferenceMode = "chop"
    shave: int = 10
    min_size: int = 160000
    tile_size: int = 128
    overlap: int = 16
    self_ensemble: bool = False

    def __post_init__(self) -> None:
        if self.mode not in INFERENCE_MODES:
            raise ValueError(f"inference.mode must be one of {', '.join(INFERENCE_MODES)}; got {self.mode!r}")
        for name, minimum in (("shave", 0), ("min_size", 1), ("tile_size", 1), ("overlap", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"inference.{name} must be an integer >= {minimum}; got {value!r}")
        if self.overlap >= self.tile_size:
            raise ValueError(f"inference.overlap ({self.overlap}) must be smaller than inference.tile_size "
                             f"({self.tile_size})")
        if not isinstance(self.self_ensemble, bool):
            raise ValueError(f"inference.self_ensemble must be true or false; got {self.self_ensemble!r}")


def super_resolve(forward: Forward, lr: torch.Tensor, scale: int, **options) -> torch.Tensor:
    """Super-resolve a whole image with the chosen memory strategy and optional self-ensemble
    (``options``: the fields of :class:`InferenceOptions`)."""
    settings = InferenceOptions(**options)
    if settings.mode == "whole":
        bounded = forward
    elif settings.mode == "chop":
        def bounded(x: torch.Tensor) -> torch.Tensor:
            return chop_forward(forward, x, scale, shave=settings.shave, min_size=settings.min_size)
    else:
        def bounded(x: torch.Tensor) -> torch.Tensor:
            return tile_forward(forward, x, scale, tile_size=settings.tile_size, overlap=settings.overlap)
    return self_ensemble_forward(bounded, lr) if settings.self_ensemble else bounded(lr)
