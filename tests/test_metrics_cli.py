"""`python -m dlsn.metrics SR_DIR HR_DIR --scale S`: scoring a folder of SR images against a folder of HR images."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dlsn.data.datasets import SREvalDataset, folder_records
from dlsn.data.degradations import modcrop
from dlsn.metrics import PSNR_Y, SSIM_Y, main, psnr_y, ssim_y
from tests.helpers.data import random_image, save_png

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def noisy(img: np.ndarray, seed: int, amplitude: int = 12) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(-amplitude, amplitude + 1, img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


@pytest.fixture
def folders(tmp_path):
    """HR: a colour image (not a multiple of 4), a grayscale one and an unpaired one; SR: eval.py-style names."""
    hr_dir, sr_dir = tmp_path / "HR", tmp_path / "SR"
    colour = random_image(34, 30, seed=1)
    gray = random_image(40, 36, seed=2)[..., 0]
    save_png(hr_dir / "colour.png", colour)
    save_png(hr_dir / "gray.png", gray)
    save_png(hr_dir / "lonely.png", random_image(24, 24, seed=3))
    save_png(sr_dir / "colour_x4_SR.png", noisy(modcrop(colour, 4), 4))  # modcropped size, as eval.py saves
    save_png(sr_dir / "gray_x4.png", noisy(gray, 5))  # HR size before modcrop (other code): cropped the same way
    save_png(sr_dir / "stray_x4_SR.png", random_image(32, 28, seed=6))
    return sr_dir, hr_dir, colour, gray


def test_scores_pairs_with_the_protocol_and_names_unpaired_files(folders, tmp_path, capsys):
    sr_dir, hr_dir, colour, gray = folders
    out = tmp_path / "scores.json"
    assert main([str(sr_dir), str(hr_dir), "--scale", "4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    sr_colour = np.asarray(Image.open(sr_dir / "colour_x4_SR.png").convert("RGB"))
    sr_gray = np.repeat(np.asarray(Image.open(sr_dir / "gray_x4.png"))[:40, :36, None], 3, axis=2)
    hr_gray = np.repeat(gray[..., None], 3, axis=2)
    expected = {
        "colour": (psnr_y(sr_colour, modcrop(colour, 4), 4), ssim_y(sr_colour, modcrop(colour, 4), 4)),
        # Single-channel HR files are scored on their gray level, as the datasets mark them.
        "gray": (psnr_y(sr_gray, hr_gray, 4, gray=True), ssim_y(sr_gray, hr_gray, 4, gray=True)),
    }
    assert list(result["images"]) == ["colour", "gray"]
    for name, (psnr, ssim) in expected.items():
        assert result["images"][name]["psnr"] == psnr and result["images"][name]["ssim"] == ssim
    assert psnr_y(sr_gray, hr_gray, 4) != expected["gray"][0]  # the gray flag matters here
    assert result["mean"] == {"psnr": np.mean([v[0] for v in expected.values()]),
                              "ssim": np.mean([v[1] for v in expected.values()]), "n": 2}
    assert result["n_capped"] == 0
    assert [Path(p).name for p in result["unpaired"]["sr"]] == ["stray_x4_SR.png"]
    assert [Path(p).name for p in result["unpaired"]["hr"]] == ["lonely.png"]
    captured = capsys.readouterr()
    assert "unpaired SR file" in captured.err and "stray_x4_SR.png" in captured.err and "lonely.png" in captured.err
    assert f"{expected['colour'][0]:9.3f}" in captured.out and "mean" in captured.out
    assert main([str(sr_dir), str(hr_dir), "--scale", "4", "--strict"]) == 1


def test_same_numbers_as_the_evaluation_loop(tmp_path):
    """SR tensors scored by PSNR_Y/SSIM_Y (as eval.py does) and the same SR saved as PNG, scored from files."""
    hr_dir, sr_dir = tmp_path / "Set" / "HR", tmp_path / "images" / "Set"
    save_png(hr_dir / "a.png", random_image(30, 27, seed=7))
    save_png(hr_dir / "a.jpg", random_image(26, 26, seed=8))  # same stem: names a_jpg / a_png
    save_png(hr_dir / "g.png", random_image(28, 28, seed=9)[..., 0])
    dataset = SREvalDataset(folder_records(hr_dir.parent, 3), 3, "BI", "Set")
    psnr_metric, ssim_metric = PSNR_Y(crop_border=3), SSIM_Y(crop_border=3)
    generator = torch.Generator().manual_seed(0)
    for item in dataset:
        sr = (item["hr"] + 0.03 * torch.randn(item["hr"].shape, generator=generator)).clamp(0, 1)[None]
        psnr_metric.update(sr, item["hr"][None], gray=[item["gray"]])
        ssim_metric.update(sr, item["hr"][None], gray=[item["gray"]])
        # What eval.py save_images=true writes: 8-bit levels as <name>_x<scale>_SR.png.
        levels = (sr[0] * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        save_png(sr_dir / f"{item['name']}_x3_SR.png", levels)
    assert sorted(dataset.names) == ["a_jpg", "a_png", "g"]
    out = tmp_path / "scores.json"
    assert main([str(sr_dir), str(hr_dir.parent), "--scale", "3", "--json", str(out)]) == 0  # set folder with HR/
    result = json.loads(out.read_text())
    assert result["mean"]["n"] == 3
    assert result["mean"]["psnr"] == pytest.approx(psnr_metric.compute().item(), abs=1e-12)
    assert result["mean"]["ssim"] == pytest.approx(ssim_metric.compute().item(), abs=1e-12)


def test_identical_images_are_capped_and_written_as_strict_json(tmp_path, capsys):
    flat = np.full((24, 24, 3), 77, np.uint8)
    save_png(tmp_path / "HR" / "flat.png", flat)
    save_png(tmp_path / "SR" / "flat.png", flat)
    out = tmp_path / "scores.json"
    assert main([str(tmp_path / "SR"), str(tmp_path / "HR"), "--scale", "2", "--json", str(out)]) == 0
    text = out.read_text()
    assert "Infinity" not in text
    result = json.loads(text)
    assert result["mean"]["psnr"] == 100.0 and result["n_capped"] == 1 and result["images"]["flat"]["capped"]
    assert "capped at 100 dB" in capsys.readouterr().out
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~_umask()  # written with the umask's mode


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_failures_exit_non_zero_and_name_the_files(tmp_path, capsys):
    save_png(tmp_path / "HR" / "a.png", random_image(24, 24))
    save_png(tmp_path / "SR" / "b_x2_SR.png", random_image(24, 24))
    assert main([str(tmp_path / "SR"), str(tmp_path / "HR"), "--scale", "2"]) == 1
    err = capsys.readouterr().err
    assert "no SR file" in err and "b_x2_SR.png" in err and "a.png" in err
    # Wrong size.
    save_png(tmp_path / "SR2" / "a_x2_SR.png", random_image(20, 24))
    assert main([str(tmp_path / "SR2"), str(tmp_path / "HR"), "--scale", "2"]) == 1
    err = capsys.readouterr().err
    assert "a_x2_SR.png is 20x24 pixels" in err and "a.png is 24x24" in err
    # Two SR files standing for one image.
    save_png(tmp_path / "SR3" / "a.png", random_image(24, 24))
    save_png(tmp_path / "SR3" / "a_x2_SR.png", random_image(24, 24))
    assert main([str(tmp_path / "SR3"), str(tmp_path / "HR"), "--scale", "2"]) == 1
    assert "both stand for image 'a'" in capsys.readouterr().err
    # Bad arguments: argparse's status 2.
    with pytest.raises(SystemExit) as missing:
        main([str(tmp_path / "nowhere"), str(tmp_path / "HR"), "--scale", "2"])
    assert missing.value.code == 2 and "nowhere is not a folder" in capsys.readouterr().err


def test_runs_as_a_module_with_a_helpful_help(folders, tmp_path, capsys):
    sr_dir, hr_dir, _, _ = folders
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "dlsn.metrics", str(sr_dir), str(hr_dir), "--scale", "4"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "colour" in proc.stdout and "(2 images, x4, border 4, Y channel)" in proc.stdout
    with pytest.raises(SystemExit) as shown:
        main(["--help"])
    help_text = capsys.readouterr().out
    assert shown.value.code == 0
    assert "_x<S>_SR" in help_text and "--json FILE" in help_text and "capped at\n100 dB" in help_text
