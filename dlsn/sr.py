"""``dlsn-sr`` / ``python -m dlsn.sr``: upscale your own images with a trained network.

    dlsn-sr photo.jpg scans/ "raw/*.tif" -o upscaled/ --weights best.ckpt
    dlsn-sr img.png -o out/ --weights DLSN_x4.pt --self-ensemble      # the authors' released weights

Each input image becomes ``OUT_DIR/<name>_x<S>.png``. What happens to an image, step by step:

1. **Reading** (:func:`read_picture`). Pillow decodes the file, keeping what
   :func:`dlsn.data.io.read_image` (the training pipeline's reader, which makes everything 8-bit RGB)
   would lose: a single gray channel, an alpha channel and 16 bits per sample. 16-bit PNGs are
   decoded with ``imagecodecs`` (libpng), because Pillow reduces 16-bit *colour* PNGs to 8 bits.
   The EXIF orientation is applied, so the output is upright as viewers show the input.
2. **Network input.** Colour samples ``v`` in ``0..M`` (``M`` = 255 or 65535) become
   ``v * rgb_range / M`` in float32, the training pipeline's scaling for ``M = 255``. 16-bit
   samples are *not* rounded to 8 bits first: the network is a continuous function of its input,
   and rounding would add banding to smooth 16-bit gradients. A gray image is replicated to three
   channels (the networks are RGB).
3. **Super-resolution** with :func:`dlsn.inference.super_resolve`: overlapping tiles of ``--tile``
   LR pixels (``--tile 0``: the whole image in one pass), optionally the x8 self-ensemble. The image
   and its output stay in host memory; one tile at a time goes to the device, so device memory is
   bounded by the tile size whatever the image size. GLA's hash rotations come from a fixed seed
   (``net.set_rotation_seed(0)``, as in evaluation), so repeated runs write the same bytes.
4. **Output levels**: ``round(sr * M / rgb_range)`` clamped to ``0..M``: the input's bit depth. A
   gray image gets one channel, the BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` of the network's
   output (the gray level the evaluation protocol scores single-channel images on, see
   :mod:`dlsn.metrics`), rounded once. Alpha is not shown to the network: it is resized with MATLAB's
   bicubic kernel (:func:`dlsn.imresize.imresize`, in float64), clipped, rounded and re-attached.
5. **Writing**: PNG with the input's channels (L, LA, RGB, RGBA) and bit depth, atomically
   (:mod:`dlsn.utils.files`): an interrupted run never leaves a truncated PNG.

Weights come from :func:`dlsn.checkpoint.read_weights` (this project's checkpoints and
``.safetensors`` exports, which record the network's config; the authors' ``.pt`` files, whose
architecture is read off the weights) and are loaded with :func:`dlsn.checkpoint.load_into`, which
checks every key and shape. Exit status: 0 when every image was written, 1 when some failed (each
is named), 2 for usage errors (no inputs, unusable weights, bad options). docs/upscaling.md has
the user's guide.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import inspect
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Only the standard library is imported at module level, so `dlsn-sr --help` answers at once; torch,
# Pillow, Lightning (through dlsn.checkpoint) and Rich are imported when they are needed.

EXIT_OK, EXIT_FAILURES, EXIT_USAGE = 0, 1, 2
DEFAULT_TILE = 128
DEFAULT_TILE_OVERLAP = 16
ROTATION_SEED = 0  # the seed evaluation uses (module.rotation_seed default)
# ITU-R BT.601 luma weights: dlsn.metrics' full-range Y for gray images, (65.481, 128.553, 24.966) / 219.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
DEFAULT_NETWORK = "dlsn.models.DLSN"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXIF_ORIENTATION_TAG = 0x0112

DESCRIPTION = """\
Upscale images with a DLSN checkpoint: OUT_DIR/<name>_x<S>.png for each input image.

INPUT: image files, folders (the images directly inside) or quoted glob patterns ("photos/**/*.jpg").
Weights: this project's checkpoints (.ckpt) and .safetensors exports (network settings read from the
file), or the authors' .pt files (architecture read off the weights; n_hashes=3 and res_scale=0.1, the
paper's values, unless --model-config says otherwise)."""

EPILOG = """\
Gray images stay single-channel, alpha is resized with bicubic and kept, 16-bit PNGs stay 16-bit.
Output names: <stem>_x<S>.png; inputs that share a stem keep their extension (a_png_x4.png, a_jpg_x4.png).
Exit status: 0 all images written, 1 some failed (each named), 2 usage error.
Details: docs/upscaling.md."""


class UsageError(Exception):
    """Bad command-line usage or weights: reported as ``error: ...`` with exit status 2."""


# ------------------------------------------------------------------------------------------ inputs

def _image_extensions() -> tuple[str, ...]:
    from dlsn.data.io import IMAGE_EXTENSIONS

    return IMAGE_EXTENSIONS


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[str]]:
    """The image files named by ``inputs``, in order and without repeats, and a message per input that
    yields none.

    An input is an existing file (taken whatever its extension: reading it tells whether it is an
    image), a folder (the image files directly inside, by extension, sorted by name) or a glob pattern
    (``*``, ``?``, ``[...]``, ``**`` for any depth; the image files it matches, sorted). A file reached
    twice (``a.png`` and ``*.png``) is processed once.
    """
    extensions = _image_extensions()
    files: list[Path] = []
    seen: set[Path] = set()
    problems: list[str] = []

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            files.append(path)

    for item in inputs:
        path = Path(item)
        if path.is_file():
            add(path)
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in extensions)
            if not found:
                problems.append(f"input folder {item} holds no images ({', '.join(extensions)})")
            for found_path in found:
                add(found_path)
        elif glob.has_magic(item):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True)
                           if Path(p).is_file() and Path(p).suffix.lower() in extensions)
            if not found:
                problems.append(f"input pattern {item!r} matches no image files")
            for found_path in found:
                add(found_path)
        else:
            problems.append(f"input {item} not found (no such file or folder)")
    return files, problems


def output_paths(files: Sequence[Path], out_dir: Path, scale: int) -> list[Path]:
    """``out_dir / <name>_x<scale>.png`` per file, with the project's naming rule
    (:func:`dlsn.data.io.unique_image_names`): the stem, or ``<stem>_<ext>`` when two inputs share a
    stem, then ``_2``, ``_3``, ... for names that still collide, so no output overwrites another."""
    from dlsn.data.io import unique_image_names

    return [out_dir / f"{name}_x{scale}.png" for name in unique_image_names(files)]


# ------------------------------------------------------------------------------------------ weights

def parse_model_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["n_hashes=4", "res_scale=0.1"]`` -> ``{"n_hashes": 4, "res_scale": 0.1}``.

    Values are read as JSON (numbers, ``true``/``false``, ``null``), anything else as a string.
    """
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--model-config expects KEY=VALUE (e.g. n_hashes=4), got {item!r} (it takes every "
                             "following word: put it after the inputs)")
        if key == "scale":
            raise UsageError("--model-config scale=...: give the scale with --scale (it must match the weights)")
        if key.startswith("_"):
            raise UsageError(f"--model-config {key}: only network arguments can be set (e.g. n_hashes=4)")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    return overrides


@dataclass
class LoadedNetwork:
    net: Any  # torch.nn.Module, in eval mode, on the CPU
    config: dict[str, Any]
    scale: int
    weights_format: str


def load_network(weights_path: Path, scale: int | None, overrides: dict[str, Any], trust: bool) -> LoadedNetwork:
    """Build the network the weights file describes, apply ``overrides``, load and check the weights.

    The network config is the file's (this project's checkpoints and safetensors exports), the one
    read off the weights (the authors' files, with the paper's ``n_hashes``/``res_scale``), or for a
    bare state_dict the paper DLSN; ``overrides`` (``--model-config``) replace its keys. ``scale``
    (``--scale``) must agree with the weights and may be ``None`` when the file records it.
    """
    from dlsn.checkpoint import CheckpointError, load_into, network_class, read_weights

    try:
        weights = read_weights(weights_path, trust=trust)
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    if weights.config is None:  # a bare state_dict: nothing says what it is; the paper's DLSN, checked below
        if scale is None:
            raise UsageError(f"{weights_path} is a bare state_dict that does not record its scale: pass --scale "
                             "(and --model-config KEY=VALUE for settings other than the paper DLSN's)")
        config: dict[str, Any] = {"_target_": DEFAULT_NETWORK, "scale": scale}
    else:
        config = dict(weights.config)
        config.setdefault("_target_", DEFAULT_NETWORK)
        trained_scale = config.get("scale")
        if trained_scale is None:
            if scale is None:
                raise UsageError(f"{weights_path} does not record its scale: pass --scale")
            config["scale"] = scale
        elif scale is not None and int(trained_scale) != scale:
            raise UsageError(f"{weights_path} holds x{trained_scale} weights ({weights.format} file), but --scale is "
                             f"{scale}: omit --scale or pass --scale {trained_scale}")
    try:
        cls = network_class(str(config["_target_"]), str(weights_path), trust)
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    # Hydra's own keys (_convert_, _recursive_, ...) are not arguments of the network.
    arguments = {key: value for key, value in config.items() if not (key.startswith("_") and key.endswith("_"))}
    accepted = [name for name, p in inspect.signature(cls).parameters.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(key for key in overrides if key not in accepted)
    if unknown:
        raise UsageError(f"--model-config: {', '.join(unknown)} not an argument of {config['_target_']} "
                         f"(its arguments: {', '.join(name for name in accepted if name != 'scale')})")
    arguments.update(overrides)
    try:
        net = cls(**arguments)
    except (TypeError, ValueError) as err:
        raise UsageError(f"cannot build {config['_target_']} from {weights_path} "
                         f"with {arguments}: {err}") from err
    try:
        load_into(net, weights.state_dict, source=f"--weights {weights_path}")
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    net.eval()
    setter = getattr(net, "set_rotation_seed", None)
    if callable(setter):
        setter(ROTATION_SEED)
    return LoadedNetwork(net, {**config, **overrides}, int(arguments["scale"]), weights.format)


# ------------------------------------------------------------------------------------------ images

@dataclass
class Picture:
    """An image as the network and the PNG writer see it.

    ``color``: ``HxW`` (gray) or ``HxWx3`` (RGB); ``alpha``: ``HxW`` or ``None``; both ``uint8``
    (``max_level`` 255) or ``uint16`` (``max_level`` 65535).
    """

    color: Any  # numpy array
    alpha: Any | None
    max_level: int

    @property
    def gray(self) -> bool:
        return self.color.ndim == 2

    def to_array(self):
        """The image as one ``HxW`` / ``HxWxC`` array (C = 2 for gray + alpha, 3 or 4)."""
        import numpy as np

        if self.alpha is None:
            return self.color
        color = self.color[..., None] if self.gray else self.color
        return np.concatenate([color, self.alpha[..., None]], axis=2)


def _split_channels(array, max_level: int, source: Path) -> Picture:
    import numpy as np

    array = np.asarray(array)
    channels = 1 if array.ndim == 2 else array.shape[2]
    if array.ndim not in (2, 3) or channels not in (1, 2, 3, 4):
        raise ValueError(f"{source}: expected an image with 1 to 4 channels, got an array of shape {array.shape}")
    if array.ndim == 3 and channels == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return Picture(np.ascontiguousarray(array), None, max_level)
    color = array[..., 0] if channels == 2 else array[..., :3]
    alpha = array[..., -1] if channels in (2, 4) else None
    return Picture(np.ascontiguousarray(color), None if alpha is None else np.ascontiguousarray(alpha), max_level)


def _is_16_bit_png(path: Path) -> bool:
    """PNG with 16 bits per sample: the IHDR chunk, always first, holds the bit depth at byte 24."""
    with open(path, "rb") as handle:
        header = handle.read(26)
    return len(header) == 26 and header[:8] == PNG_SIGNATURE and header[12:16] == b"IHDR" and header[24] == 16


def apply_exif_orientation(array, orientation: int):
    """``array`` (``HxW[xC]``) turned upright per an EXIF orientation (1-8), as
    ``PIL.ImageOps.exif_transpose`` does: 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90
    clockwise, 7 transverse, 8 rotate 90 counter-clockwise."""
    import numpy as np

    operations: dict[int, Callable] = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
        8: lambda a: np.rot90(a, 1),
    }
    operation = operations.get(orientation)
    return array if operation is None else np.ascontiguousarray(operation(array))


def _pil_pixels(image) -> tuple[Any, int]:
    """Pixels of a Pillow image as ``(array, max_level)``, keeping gray, alpha and 16-bit samples."""
    import numpy as np

    mode = image.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return np.asarray(image), 255
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16), 65535
    if mode == "I":  # 32-bit integers: Pillow's mode for some 16-bit gray files
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"32-bit integer image with values outside 0..65535 "
                             f"({values.min()}..{values.max()}): not supported")
        return values.astype(np.uint16), 65535
    if mode == "F":
        raise ValueError("floating-point images (Pillow mode 'F') are not supported: their value range is unknown")
    if mode == "1":
        return np.asarray(image.convert("L")), 255
    # Palettes, CMYK, YCbCr, premultiplied alpha, ...: Pillow converts; a palette's transparency becomes alpha.
    has_alpha = "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info
    return np.asarray(image.convert("RGBA" if has_alpha else "RGB")), 255


def read_picture(path: str | Path) -> Picture:
    """Decode an image file, keeping gray, alpha and 16-bit samples (see the module docstring).

    Raises :class:`dlsn.data.io.ImageReadError` naming the file when it is missing or cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    from dlsn.data.io import ImageReadError

    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            orientation = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
            if _is_16_bit_png(path):
                pixels, max_level = _decode_16_bit_png(path), 65535
            else:
                image.load()
                pixels, max_level = _pil_pixels(image)
        return _split_channels(apply_exif_orientation(pixels, orientation), max_level, path)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, RuntimeError) as err:
        raise ImageReadError(f"cannot decode image {path}: {err}") from err


def _decode_16_bit_png(path: Path):
    import numpy as np

    imagecodecs = _imagecodecs(path)
    pixels = imagecodecs.png_decode(path.read_bytes())
    if pixels.dtype != np.uint16:
        raise ValueError(f"expected 16-bit samples, libpng returned {pixels.dtype}")
    return pixels


def _imagecodecs(path: Path):
    try:
        import imagecodecs
    except ImportError:
        raise ValueError(f"{path} is a 16-bit PNG, which needs the imagecodecs package "
                         "(pip install imagecodecs; Pillow reduces 16-bit colour PNGs to 8 bits)") from None
    return imagecodecs


def write_picture(path: Path, picture: Picture) -> None:
    """Write ``picture`` as a PNG with its channels and bit depth, atomically."""
    array = picture.to_array()
    if picture.max_level == 255:
        from dlsn.data.io import write_png

        write_png(path, array)
        return
    from dlsn.utils.files import atomic_write_bytes

    atomic_write_bytes(path, _imagecodecs(path).png_encode(array))


# ------------------------------------------------------------------------------------------ upscaling

def forward_passes(height: int, width: int, tile: int, overlap: int, self_ensemble: bool) -> int:
    """How many network calls :func:`dlsn.inference.super_resolve` makes for an ``height x width`` image
    (for the progress bar): windows per axis ``ceil((n - tile) / (tile - overlap)) + 1``, x8 with
    self-ensemble (transposed copies have as many tiles)."""
    def windows(length: int) -> int:
        return 1 if length <= tile else math.ceil((length - tile) / (tile - overlap)) + 1

    tiles = 1 if tile == 0 or (height <= tile and width <= tile) else windows(height) * windows(width)
    return tiles * (8 if self_ensemble else 1)


class Upscaler:
    """Runs the network on pictures (see the module docstring for the steps)."""

    def __init__(self, loaded: LoadedNetwork, device, tile: int, overlap: int, self_ensemble: bool) -> None:
        self.net = loaded.net.to(device)
        self.scale = loaded.scale
        self.device = device
        self.rgb_range = float(getattr(loaded.net, "rgb_range", 1.0))
        self.tile, self.overlap, self.self_ensemble = tile, overlap, self_ensemble

    def passes(self, picture: Picture) -> int:
        height, width = picture.color.shape[:2]
        return forward_passes(height, width, self.tile, self.overlap, self.self_ensemble)

    def super_resolve(self, lr, on_pass: Callable[[], None] | None = None):
        """``[1, 3, h, w]`` float in ``[0, rgb_range]`` on the CPU -> ``[1, 3, h*s, w*s]`` float on the CPU."""
        import torch

        from dlsn.inference import super_resolve

        def forward(window: torch.Tensor) -> torch.Tensor:
            # One tile on the device; its output comes back at once so device memory holds one tile.
            output = self.net(window.to(self.device)).float().cpu()
            if on_pass is not None:
                on_pass()
            return output

        if self.tile:
            return super_resolve(forward, lr, self.scale, mode="tile", tile_size=self.tile, overlap=self.overlap,
                                 self_ensemble=self.self_ensemble)
        return super_resolve(forward, lr, self.scale, mode="whole", self_ensemble=self.self_ensemble)

    def upscale(self, picture: Picture, on_pass: Callable[[], None] | None = None) -> Picture:
        import numpy as np
        import torch

        rgb = np.repeat(picture.color[..., None], 3, axis=2) if picture.gray else picture.color
        lr = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)).astype(np.float32))
        lr = lr.mul_(self.rgb_range / picture.max_level)[None]
        with torch.inference_mode():
            sr = self.super_resolve(lr, on_pass)[0]
            if picture.gray:
                sr = torch.tensordot(torch.tensor(LUMA_WEIGHTS, dtype=sr.dtype), sr, dims=1)
            # In place: the output is the largest array of the run (4 bytes per output sample).
            levels = sr.mul_(picture.max_level / self.rgb_range).round_().clamp_(0, picture.max_level)
            if picture.max_level == 255:
                color = levels.to(torch.uint8).numpy()
            else:
                color = levels.to(torch.int32).numpy().astype(np.uint16)
        if not picture.gray:
            color = np.ascontiguousarray(color.transpose(1, 2, 0))
        alpha = None if picture.alpha is None else upscale_alpha(picture.alpha, self.scale, picture.max_level)
        return Picture(color, alpha, picture.max_level)


def upscale_alpha(alpha, scale: int, max_level: int):
    """MATLAB ``imresize(alpha, scale, 'bicubic')`` computed in float64, clipped to ``0..max_level`` and
    rounded once (half up), in ``alpha``'s dtype."""
    import numpy as np

    from dlsn.imresize import imresize

    resized = imresize(alpha.astype(np.float64), scale)
    return np.floor(np.clip(resized, 0, max_level) + 0.5).astype(alpha.dtype)


# ------------------------------------------------------------------------------------------ command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlsn-sr", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", metavar="INPUT", nargs="+", help="image file, folder or quoted glob pattern")
    parser.add_argument("-o", "--output", "--out-dir", dest="out_dir", metavar="OUT_DIR", type=Path, required=True,
                        help="folder for the upscaled PNGs (created if missing; files of the same name are replaced)")
    parser.add_argument("--weights", metavar="FILE", type=Path, required=True,
                        help="this project's checkpoint (.ckpt), a .safetensors export or the authors' .pt file")
    parser.add_argument("--scale", type=int, default=None, metavar="S",
                        help="upscaling factor; must match the weights (default: the weights' scale)")
    parser.add_argument("--tile", type=int, default=DEFAULT_TILE, metavar="N",
                        help=f"tile size in LR pixels, bounding memory for any image size; 0 processes each image "
                             f"whole (default {DEFAULT_TILE})")
    parser.add_argument("--tile-overlap", type=int, default=DEFAULT_TILE_OVERLAP, metavar="N",
                        help=f"LR pixels shared by neighbouring tiles (default {DEFAULT_TILE_OVERLAP})")
    parser.add_argument("--self-ensemble", action="store_true",
                        help="average over the 8 flips/transposes (x8 geometric self-ensemble: better, 8x slower)")
    parser.add_argument("--device", default=None, metavar="D",
                        help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow a full unpickler (and any network class) for weights that need it: "
                             "runs code from the file, use only for files you trust")
    parser.add_argument("--model-config", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override network settings, e.g. n_hashes=4 res_scale=0.1 (the authors' files do not "
                             "record n_hashes and res_scale: the paper's 3 and 0.1 are assumed)")
    return parser


def _check_options(args: argparse.Namespace) -> None:
    if args.scale is not None and args.scale < 1:
        raise UsageError(f"--scale must be a positive integer, got {args.scale}")
    if args.tile < 0:
        raise UsageError(f"--tile must be >= 0 (0: whole image), got {args.tile}")
    if args.tile and not 0 <= args.tile_overlap < args.tile:
        raise UsageError(f"--tile-overlap must be in [0, --tile={args.tile}), got {args.tile_overlap}")
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise UsageError(f"output folder {args.out_dir} exists and is not a folder")


def pick_device(requested: str | None):
    """``requested`` as a torch device, checked; by default CUDA when available, else the CPU."""
    import torch

    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"--device {requested!r} is not a torch device ({err})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {requested}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@contextlib.contextmanager
def deterministic_cudnn() -> Iterator[None]:
    """cuDNN's deterministic algorithms while images are processed (the same input gives the same bytes
    on every run), restoring the caller's settings afterwards (``main`` may run inside another program)."""
    import torch

    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dlsn-sr`` (see ``--help``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_intermixed_args(argv)
    except SystemExit as stop:  # --help (0) or an argparse usage error (2), already printed
        return int(stop.code or 0)

    from rich.console import Console

    from dlsn.utils.vector_math import settle_vector_math

    console = Console(stderr=True)

    def say(message: str, style: str | None = None) -> None:
        # No wrapping or markup: file names stay whole and greppable, brackets in them stay literal.
        console.print(message, style=style, soft_wrap=True, markup=False, highlight=False)

    try:
        _check_options(args)
        overrides = parse_model_overrides(args.model_config)
        files, input_problems = expand_inputs(args.inputs)
        for problem in input_problems:
            say(f"error: {problem}", "red")
        if not files:
            raise UsageError("no input images (give image files, folders or glob patterns)")
        device = pick_device(args.device)
        settle_vector_math()  # the first CPU exp/log on several threads may take a less exact kernel
        loaded = load_network(args.weights, args.scale, overrides, args.trust_checkpoint)
        try:
            upscaler = Upscaler(loaded, device, args.tile, args.tile_overlap, args.self_ensemble)
        except RuntimeError as err:  # e.g. a device that this torch build cannot use
            raise UsageError(f"--device {device}: cannot move the network there ({err})") from None
        args.out_dir.mkdir(parents=True, exist_ok=True)
    except UsageError as err:
        say(f"error: {err}", "red")
        return EXIT_USAGE
    except OSError as err:
        say(f"error: {err}", "red")
        return EXIT_USAGE

    settings = ", ".join([f"x{loaded.scale}", f"{loaded.weights_format} weights", f"device {device}",
                          f"tiles {args.tile}/{args.tile_overlap}" if args.tile else "whole images"]
                         + (["self-ensemble"] if args.self_ensemble else []))
    say(f"dlsn-sr: {len(files)} image(s) -> {args.out_dir} ({settings})")
    for key, value in overrides.items():
        say(f"network setting from --model-config: {key}={value!r}")
    failures = run(files, output_paths(files, args.out_dir, loaded.scale), upscaler, console, say)

    failed_total = len(failures) + len(input_problems)
    written = len(files) - len(failures)
    if not failed_total:
        say(f"done: {written} image(s) upscaled x{loaded.scale} into {args.out_dir}", "green")
        return EXIT_OK
    say(f"{failed_total} input(s) failed, {written} of {len(files)} image(s) written to {args.out_dir}:", "red")
    for message in input_problems + failures:
        say(f"  {message}", "red")
    return EXIT_FAILURES


def run(files: Sequence[Path], outputs: Sequence[Path], upscaler: Upscaler, console, say) -> list[str]:
    """Upscale and write every file with a progress bar; returns a message per failed file."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dlsn.data.io import ImageReadError

    failures: list[str] = []
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with deterministic_cudnn(), Progress(*columns, console=console) as progress:
        images = progress.add_task("images", total=len(files))
        tiles = progress.add_task("tiles", total=None, visible=False)
        for source, target in zip(files, outputs):
            try:
                picture = read_picture(source)
                progress.reset(tiles, total=upscaler.passes(picture), visible=True,
                               description=f"tiles of {source.name}")
                result = upscaler.upscale(picture, on_pass=lambda: progress.advance(tiles))
                write_picture(target, result)
            except ImageReadError as err:
                failures.append(str(err))
                say(f"error: {err}", "red")
            except Exception as err:  # noqa: BLE001 - one image's failure (out of memory, disk full) must not stop the rest
                hint = " (try a smaller --tile)" if "out of memory" in str(err).lower() else ""
                failures.append(f"{source}: {type(err).__name__}: {err}{hint}")
                say(f"error: {failures[-1]}", "red")
            else:
                height, width = picture.color.shape[:2]
                say(f"{source} ({width}x{height}) -> {target} ({width * upscaler.scale}x{height * upscaler.scale})")
            progress.advance(images)
        progress.update(tiles, visible=False)
    return failures


if __name__ == "__main__":
    sys.exit(main())
