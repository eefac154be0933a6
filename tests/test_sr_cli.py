"""`dlsn-sr` / `python -m dlsn.sr`: upscaling a user's images with a tiny DLSN (CPU, in-process `main`)."""

import argparse
import subprocess
import sys
import tomllib
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from dlsn.checkpoint import save_weights
from dlsn.imresize import imresize
from dlsn.inference import super_resolve
from dlsn.models import DLSN, to_official
from dlsn.sr import apply_exif_orientation, main, read_picture

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# res_scale differs from the paper's 0.1, which is what an official .pt file implies by default.
TINY = dict(scale=2, n_feats=8, n_resgroups=1, n_resblocks=1, chunk_size=16, n_hashes=1, res_scale=0.5)
TILES = ["--tile", "16", "--tile-overlap", "4"]


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    net = DLSN(**TINY).eval()
    net.set_rotation_seed(0)  # what evaluation (and dlsn-sr) use
    return net


@pytest.fixture(scope="module")
def weights(network, tmp_path_factory):
    """The same network as this project's checkpoint, a safetensors export and the authors' .pt file."""
    root = tmp_path_factory.mktemp("weights")
    config = {"_target_": "dlsn.models.DLSN", **TINY}
    paths = {"ckpt": root / "tiny.ckpt", "safetensors": root / "tiny.safetensors", "pt": root / "tiny_official.pt"}
    torch.save({"state_dict": {"net." + k: v for k, v in network.state_dict().items()}, "global_step": 0,
                "dlsn_network": {"config": config}}, paths["ckpt"])
    save_weights(paths["safetensors"], network, config)
    torch.save(to_official(network), paths["pt"])
    return paths


def rgb_image(height=40, width=36, seed=0, dtype=np.uint8):
    high = 256 if dtype == np.uint8 else 65536
    return np.random.default_rng(seed).integers(0, high, (height, width, 3), dtype=dtype)


def network_output(net, rgb: np.ndarray, max_level: int = 255, **inference) -> torch.Tensor:
    """``super_resolve`` on ``rgb`` (HxWx3, 0..max_level) scaled as the training data: [3, H*2, W*2] in [0, 1]."""
    lr = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)).astype(np.float32)).mul_(1.0 / max_level)[None]
    with torch.no_grad():
        return super_resolve(net, lr, TINY["scale"], **inference)[0]


def levels(sr: torch.Tensor, max_level: int = 255) -> np.ndarray:
    quantised = (sr * max_level).round().clamp(0, max_level).to(torch.int32).numpy()
    return quantised.transpose(1, 2, 0) if quantised.ndim == 3 else quantised


def upscale(*args) -> int:
    return main([str(a) for a in args])


def read_png(path: Path) -> np.ndarray:
    return imagecodecs.png_decode(path.read_bytes())  # any bit depth and channel count, as stored


@pytest.mark.parametrize("options, inference", [
    (TILES, dict(mode="tile", tile_size=16, overlap=4)),
    (["--tile", "0", "--self-ensemble"], dict(mode="whole", self_ensemble=True)),
], ids=["tiles", "whole+self_ensemble"])
def test_rgb_output_is_super_resolve_of_the_network(network, weights, tmp_path, options, inference):
    image = rgb_image()
    Image.fromarray(image).save(tmp_path / "photo.png")
    assert upscale(tmp_path / "photo.png", "-o", tmp_path / "out", "--weights", weights["ckpt"], *options) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["photo_x2.png"]
    written = Image.open(tmp_path / "out" / "photo_x2.png")
    assert written.mode == "RGB" and written.size == (72, 80)
    np.testing.assert_array_equal(np.asarray(written), levels(network_output(network, image, **inference)))


def test_settles_mkl_vector_math_before_computing(weights, tmp_path, monkeypatch):
    from dlsn.utils import vector_math

    monkeypatch.setattr(vector_math, "_settled", False)
    Image.fromarray(rgb_image(12, 12)).save(tmp_path / "photo.png")
    assert upscale(tmp_path / "photo.png", "-o", tmp_path / "out", "--weights", weights["ckpt"]) == 0
    assert vector_math._settled or not torch.backends.mkl.is_available()


def test_weight_formats_give_the_same_image_and_official_settings_are_overridable(weights, tmp_path):
    Image.fromarray(rgb_image()).save(tmp_path / "photo.png")

    def output_bytes(name, weights_file, *options):
        assert upscale(tmp_path / "photo.png", "-o", tmp_path / name, "--weights", weights_file, *options) == 0
        return (tmp_path / name / "photo_x2.png").read_bytes()

    reference = output_bytes("ckpt", weights["ckpt"])
    assert output_bytes("safetensors", weights["safetensors"]) == reference
    # The authors' files do not record n_hashes and res_scale: the paper's 3 and 0.1 unless overridden.
    assert output_bytes("pt", weights["pt"], "--model-config", "n_hashes=1", "res_scale=0.5") == reference
    assert output_bytes("pt_paper", weights["pt"]) != reference


def test_scale_must_match_the_weights(weights, tmp_path, capsys):
    Image.fromarray(rgb_image(12, 12)).save(tmp_path / "photo.png")
    assert upscale(tmp_path / "photo.png", "-o", tmp_path / "out", "--weights", weights["pt"], "--scale", "3") == 2
    error = capsys.readouterr().err
    assert f"{weights['pt']} holds x2 weights" in error and "--scale 2" in error
    assert not (tmp_path / "out").exists()
    assert upscale(tmp_path / "photo.png", "-o", tmp_path / "out", "--weights", weights["pt"], "--scale", "2") == 0


@pytest.mark.parametrize("bits", [8, 16])
def test_gray_stays_single_channel_luma_of_the_network_output(network, weights, tmp_path, bits):
    max_level = 2**bits - 1
    gray = rgb_image(dtype=np.uint8 if bits == 8 else np.uint16)[..., 0]
    Image.fromarray(gray).save(tmp_path / "scan.png")  # mode L, or I;16 for 16 bits
    assert upscale(tmp_path / "scan.png", "-o", tmp_path / "out", "--weights", weights["ckpt"], *TILES) == 0
    written = read_png(tmp_path / "out" / "scan_x2.png")
    assert written.shape == (80, 72) and written.dtype == (np.uint8 if bits == 8 else np.uint16)
    sr = network_output(network, np.repeat(gray[..., None], 3, axis=2), max_level, mode="tile", tile_size=16,
                        overlap=4).double()
    luma = np.clip(np.round((0.299 * sr[0] + 0.587 * sr[1] + 0.114 * sr[2]).numpy() * max_level), 0, max_level)
    assert np.abs(written - luma).max() <= 1  # float32 vs float64 rounding
    assert np.abs(luma - levels(sr[0], max_level)).max() > 2  # the tiny network's channels differ: luma matters


def test_rgba_alpha_is_resized_with_bicubic_and_reattached(network, weights, tmp_path):
    rgba = np.concatenate([rgb_image(), rgb_image(seed=1)[..., :1]], axis=2)
    Image.fromarray(rgba).save(tmp_path / "logo.png")
    assert upscale(tmp_path / "logo.png", "-o", tmp_path / "out", "--weights", weights["ckpt"], *TILES) == 0
    written = Image.open(tmp_path / "out" / "logo_x2.png")
    assert written.mode == "RGBA" and written.size == (72, 80)
    written = np.asarray(written)
    np.testing.assert_array_equal(written[..., :3], levels(network_output(network, rgba[..., :3], mode="tile",
                                                                          tile_size=16, overlap=4)))
    alpha = np.floor(np.clip(imresize(rgba[..., 3].astype(np.float64), 2), 0, 255) + 0.5)
    np.testing.assert_array_equal(written[..., 3], alpha)


def test_16_bit_colour_png_keeps_16_bits(network, weights, tmp_path):
    image = rgb_image(dtype=np.uint16)
    (tmp_path / "raw.png").write_bytes(imagecodecs.png_encode(image))
    assert Image.open(tmp_path / "raw.png").mode == "RGB"  # what Pillow alone would give: 8 bits
    assert upscale(tmp_path / "raw.png", "-o", tmp_path / "out", "--weights", weights["ckpt"], *TILES) == 0
    written = read_png(tmp_path / "out" / "raw_x2.png")
    assert written.dtype == np.uint16 and written.shape == (80, 72, 3)
    expected = levels(network_output(network, image, 65535, mode="tile", tile_size=16, overlap=4), 65535)
    np.testing.assert_array_equal(written, expected)
    assert np.count_nonzero(written % 257) > written.size // 2  # not 8-bit levels scaled up


def test_an_unreadable_file_is_named_and_the_others_are_written(weights, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(rgb_image(12, 10)).save(folder / "a.png")
    (folder / "b.png").write_bytes((folder / "a.png").read_bytes()[:60])  # truncated
    (folder / "c.jpg").write_text("not an image")
    Image.fromarray(rgb_image(10, 12)).save(folder / "d.png")
    assert upscale(folder, "-o", tmp_path / "out", "--weights", weights["ckpt"]) == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_x2.png", "d_x2.png"]  # no temporary files
    assert Image.open(tmp_path / "out" / "d_x2.png").size == (24, 20)
    error = capsys.readouterr().err
    assert f"cannot decode image {folder / 'b.png'}" in error and f"cannot decode image {folder / 'c.jpg'}" in error
    assert "2 input(s) failed, 2 of 4 image(s) written" in error


def test_the_same_input_gives_the_same_bytes(weights, tmp_path):
    Image.fromarray(rgb_image()).save(tmp_path / "photo.png")
    for run in ("first", "second"):
        assert upscale(tmp_path / "photo.png", "-o", tmp_path / run, "--weights", weights["ckpt"], *TILES) == 0
    assert (tmp_path / "first" / "photo_x2.png").read_bytes() == (tmp_path / "second" / "photo_x2.png").read_bytes()


def test_files_folders_globs_and_names_that_collide(weights, tmp_path, capsys):
    def save(path, height=8, width=8):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb_image(height, width)).save(path)

    for name in ("photos/a.png", "photos/a.jpg", "photos/b.png", "photos/sub/c.png", "more/d.png", "more/d.bmp",
                 "x/e.png", "y/e.png"):
        save(tmp_path / name)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    inputs = [tmp_path / "photos", tmp_path / "more" / "*.png", tmp_path / "photos" / "b.png",  # b twice: once
              tmp_path / "x" / "e.png", tmp_path / "y" / "e.png"]
    out = tmp_path / "out"
    assert upscale(*inputs, "-o", out, "--weights", weights["ckpt"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "a_jpg_x2.png", "a_png_x2.png", "b_x2.png", "d_x2.png", "e_png_2_x2.png", "e_png_x2.png"]
    capsys.readouterr()

    missing = [tmp_path / "nothing" / "*.png", tmp_path / "typo.png", tmp_path / "photos" / "sub" / "*.jpg"]
    assert upscale(tmp_path / "more" / "d.bmp", *missing, "-o", out, "--weights", weights["ckpt"]) == 1
    assert (out / "d_x2.png").is_file()
    error = capsys.readouterr().err
    assert f"input pattern '{missing[0]}' matches no image files" in error
    assert f"input {missing[1]} not found" in error and "3 input(s) failed, 1 of 1 image(s) written" in error
    assert upscale(*missing, "-o", out, "--weights", weights["ckpt"]) == 2  # no inputs at all: usage error
    assert "error: no input images" in capsys.readouterr().err


def test_unusable_weights_and_options_are_usage_errors(weights, tmp_path, capsys):
    Image.fromarray(rgb_image(8, 8)).save(tmp_path / "photo.png")

    def run(weights_file, *options):
        status = upscale(tmp_path / "photo.png", "-o", tmp_path / "out", "--weights", weights_file, *options)
        return status, capsys.readouterr().err

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    status, error = run(garbage)
    assert status == 2 and f"{garbage} is truncated or not a PyTorch checkpoint" in error

    # A pickled Python object: refused by weights_only loading, accepted with --trust-checkpoint.
    pickled = tmp_path / "pickled.ckpt"
    checkpoint = torch.load(weights["ckpt"], weights_only=True)
    torch.save({**checkpoint, "hyper_parameters": argparse.Namespace(lr=1e-4)}, pickled)
    status, error = run(pickled)
    assert status == 2 and f"{pickled} holds a Python object" in error and "--trust-checkpoint" in error
    assert upscale(tmp_path / "photo.png", "-o", tmp_path / "trusted", "--weights", pickled, "--trust-checkpoint") == 0
    assert (tmp_path / "trusted" / "photo_x2.png").is_file()

    # The network class comes from the file: only dlsn.models without --trust-checkpoint.
    foreign = tmp_path / "foreign.ckpt"
    torch.save({**checkpoint, "dlsn_network": {"config": {**TINY, "_target_": "subprocess.run"}}}, foreign)
    status, error = run(foreign)
    assert status == 2 and "_target_='subprocess.run'" in error and "--trust-checkpoint" in error

    status, error = run(weights["ckpt"], "--model-config", "n_hash=2")
    assert status == 2 and "n_hash not an argument of dlsn.models.DLSN" in error and "n_hashes" in error
    status, error = run(weights["ckpt"], "--model-config", "n_feats=16")  # does not fit the weights
    assert status == 2 and "head.weight: shape (8, 3, 3, 3) in the file, (16, 3, 3, 3) in the network" in error
    status, error = run(weights["ckpt"], "--tile", "8", "--tile-overlap", "8")
    assert status == 2 and "--tile-overlap must be in [0, --tile=8)" in error
    assert not (tmp_path / "out").exists()


def test_exif_orientation_is_applied_like_pillow(tmp_path):
    image = Image.fromarray(rgb_image(6, 4))
    for orientation in range(1, 9):
        exif = image.getexif()
        exif[0x0112] = orientation
        image.save(tmp_path / "tagged.png", exif=exif)
        with Image.open(tmp_path / "tagged.png") as tagged:
            upright = np.asarray(ImageOps.exif_transpose(tagged))
        np.testing.assert_array_equal(apply_exif_orientation(np.asarray(image), orientation), upright)
        np.testing.assert_array_equal(read_picture(tmp_path / "tagged.png").color, upright)


def test_python_m_help_and_the_console_script():
    result = subprocess.run([sys.executable, "-m", "dlsn.sr", "--help"], cwd=PROJECT_ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage: dlsn-sr" in result.stdout and "--weights FILE" in result.stdout and "--self-ensemble" in result.stdout
    scripts = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["dlsn-sr"] == "dlsn.sr:main"
