"""Y-channel PSNR/SSIM of the SR protocol and the torchmetrics wrappers."""

import math

import numpy as np
import pytest
import torch

from dlsn.metrics import PSNR_Y, SSIM_Y, psnr_y, rgb_to_y, ssim_y
from tests.helpers.data import random_image


def test_rgb_to_y_matlab_coefficients():
    px = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [10, 200, 30]]], np.uint8)
    y = rgb_to_y(px)
    expected = [16.0, 235.0, 16 + 65.481, 16 + (65.481 * 10 + 128.553 * 200 + 24.966 * 30) / 255]
    np.testing.assert_allclose(y[0], expected, atol=1e-10)
    t = torch.from_numpy(px).permute(2, 0, 1).double() / 255 * 2.0
    np.testing.assert_allclose(rgb_to_y(t, rgb_range=2.0).numpy()[0], expected, atol=1e-10)


def test_psnr_of_known_error():
    hr = np.full((20, 20, 3), 100, np.uint8)
    sr = hr + 1  # every channel +1 -> Y differs by 219/255 everywhere
    expected = 10 * math.log10(255**2 / (219 / 255) ** 2)
    assert psnr_y(sr, hr, crop_border=2) == pytest.approx(expected, abs=1e-9)
    assert psnr_y(hr, hr, crop_border=2) == math.inf


def test_crop_border_excludes_the_border():
    hr = random_image(30, 30)
    sr = hr.copy()
    sr[:3] = 0  # damage only the top 3 rows
    assert psnr_y(sr, hr, crop_border=3) == math.inf
    assert psnr_y(sr, hr, crop_border=2) < 40


def test_tensor_inputs_are_quantised_and_match_numpy():
    hr, sr = random_image(32, 40, 1), random_image(32, 40, 2)
    rgb_range = 255.0
    to_t = lambda a: torch.from_numpy(a).permute(2, 0, 1).float() / 255 * rgb_range
    # Sub-level perturbations vanish under 8-bit quantisation.
    noisy = to_t(sr) + (torch.rand(3, 32, 40) - 0.5) * 0.9 * rgb_range / 255
    ref = psnr_y(sr, hr, 4)
    assert psnr_y(noisy, to_t(hr), 4, rgb_range=rgb_range) == pytest.approx(ref, abs=1e-12)
    assert psnr_y(noisy[None], to_t(hr)[None], 4, rgb_range=rgb_range) == pytest.approx(ref, abs=1e-12)
    assert ssim_y(noisy, to_t(hr), 4, rgb_range=rgb_range) == pytest.approx(ssim_y(sr, hr, 4), abs=1e-12)


def test_ssim_matches_scikit_image_gaussian_ssim():
    from skimage.metrics import structural_similarity

    hr = random_image(48, 56, 3)
    sr = np.clip(hr.astype(int) + np.random.default_rng(0).integers(-20, 21, hr.shape), 0, 255).astype(np.uint8)
    y_sr, y_hr = rgb_to_y(sr)[4:-4, 4:-4], rgb_to_y(hr)[4:-4, 4:-4]
    # Gaussian sigma 1.5 (11x11), population covariance, L = 255: the Wang et al. settings.
    ref = structural_similarity(y_sr, y_hr, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    assert ssim_y(sr, hr, 4) == pytest.approx(ref, abs=1e-9)
    assert ssim_y(hr, hr, 4) == pytest.approx(1.0, abs=1e-12)


def test_gray_flag_uses_the_gray_level():
    g = random_image(30, 30, 4)[..., :1]
    hr = np.repeat(g, 3, axis=2)
    sr = np.repeat(np.clip(g.astype(int) + 2, 0, 255).astype(np.uint8), 3, axis=2)
    gray_mse = np.mean((sr[3:-3, 3:-3, 0].astype(float) - hr[3:-3, 3:-3, 0]) ** 2)
    assert psnr_y(sr, hr, 3, gray=True) == pytest.approx(10 * math.log10(255**2 / gray_mse), abs=1e-9)
    # Without the flag the compressed BT.601 range gives 20*log10(255/219) dB more.
    assert psnr_y(sr, hr, 3) - psnr_y(sr, hr, 3, gray=True) == pytest.approx(20 * math.log10(255 / 219), abs=1e-9)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same shape"):
        psnr_y(random_image(20, 20), random_image(20, 24), 2)
    with pytest.raises(ValueError, match=r"single image \[1, 3, H, W\]"):
        psnr_y(torch.rand(2, 3, 20, 20), torch.rand(2, 3, 20, 20), 2)


@pytest.mark.parametrize("metric_cls, fn", [(PSNR_Y, psnr_y), (SSIM_Y, ssim_y)])
def test_torchmetrics_average_per_image(metric_cls, fn):
    torch.manual_seed(0)
    hr = torch.rand(3, 3, 24, 24)
    sr = (hr + 0.05 * torch.randn_like(hr) * torch.arange(1, 4).view(3, 1, 1, 1)).clamp(0, 1)
    metric = metric_cls(crop_border=2)
    metric.update(sr[:2], hr[:2])
    metric.update(sr[2:], hr[2:], gray=torch.tensor([False]))
    per_image = [fn(s, h, 2) for s, h in zip(sr, hr)]
    assert metric.compute().item() == pytest.approx(sum(per_image) / 3, abs=1e-12)
    assert metric.count.item() == 3
    # States reduce by summation across processes, so the mean stays per-image.
    assert metric._reductions["sum"] is metric._reductions["count"]
    assert metric._reductions["sum"](torch.tensor([1.0, 2.0])).item() == 3.0


def test_torchmetrics_rgb_range_and_bad_shapes():
    hr = torch.rand(1, 3, 20, 20)
    sr = (hr + 0.02).clamp(0, 1)
    m1, m255 = PSNR_Y(crop_border=2), PSNR_Y(crop_border=2, rgb_range=255.0)
    m1.update(sr, hr)
    m255.update(sr * 255, hr * 255)
    assert m1.compute().item() == pytest.approx(m255.compute().item(), abs=1e-9)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        m1.update(sr[0], hr[0])


# ---------------------------------------------------------------- PSNR cap


def test_psnr_is_capped_per_image_and_capped_images_are_counted():
    from dlsn.metrics import PSNR_MAX_DB

    assert PSNR_MAX_DB == 100.0
    flat = torch.full((1, 3, 24, 24), 0.5)
    other_hr = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    other_sr = (other_hr + 0.03).clamp(0, 1)
    metric = PSNR_Y(crop_border=2)
    metric.update(flat, flat)  # identical: infinite PSNR before the cap
    assert metric.compute().item() == 100.0 and metric.n_capped.item() == 1
    metric.update(other_sr, other_hr)
    expected = (100.0 + psnr_y(other_sr, other_hr, 2)) / 2
    assert metric.compute().item() == pytest.approx(expected, abs=1e-12)
    assert metric.n_capped.item() == 1 and metric.count.item() == 2
    assert metric._reductions["n_capped"] is metric._reductions["count"]  # summed across processes
    # A finite PSNR above the cap (one pixel one level off in a large image) is capped as well.
    big = torch.full((1, 3, 1600, 1600), 100 / 255)
    off = big.clone()
    off[0, :, 800, 800] = 101 / 255
    assert psnr_y(off, big, 2) > 100 and psnr_y(off, big, 2, max_db=100.0) == 100.0
    # The plain function stays uncapped unless asked; a NaN stays NaN (never hidden by the cap).
    assert psnr_y(flat, flat, 2) == math.inf
    assert math.isnan(psnr_y(torch.full_like(flat, float("nan")), flat, 2, max_db=100.0))
    uncapped = PSNR_Y(crop_border=2, max_db=None)
    uncapped.update(flat, flat)
    assert uncapped.compute().item() == math.inf and uncapped.n_capped.item() == 0


def test_results_with_a_capped_image_are_strict_json(tmp_path):
    import json

    from dlsn.utils.files import write_json_strict

    metric = PSNR_Y(crop_border=2)
    flat = torch.full((1, 3, 20, 20), 0.25)
    metric.update(flat, flat)
    results = {"Flat": {"psnr": metric.compute().item(), "n": int(metric.count), "n_capped": int(metric.n_capped)}}
    write_json_strict(tmp_path / "results.json", results)
    text = (tmp_path / "results.json").read_text()
    assert "Infinity" not in text and json.loads(text) == {"Flat": {"psnr": 100.0, "n": 1, "n_capped": 1}}


# ---------------------------------------------------------------- bands of rows


def reference_y(img: np.ndarray, crop: int, gray: bool = False) -> np.ndarray:
    y = rgb_to_y(img)
    if gray:
        y = (y - 16.0) * 255.0 / 219.0
    return y[crop:-crop, crop:-crop] if crop else y


def reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Whole-image SSIM with conv2d, as computed before the metrics worked in bands."""
    coords = torch.arange(11, dtype=torch.float64) - 5.0
    window = torch.exp(-(coords**2) / (2 * 1.5**2))
    window = (window / window.sum()).view(1, 1, 11, 1)
    stack = torch.from_numpy(np.stack([x, y, x * x, y * y, x * y]))[:, None]
    moments = torch.nn.functional.conv2d(torch.nn.functional.conv2d(stack, window), window.view(1, 1, 1, 11))[:, 0]
    mu_x, mu_y, e_xx, e_yy, e_xy = moments
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * (e_xy - mu_x * mu_y) + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (e_xx - mu_x**2 + e_yy - mu_y**2 + c2))
    return ssim_map.mean().item()


@pytest.mark.parametrize("band_pixels", [1, 100, 2000, 1 << 30])
def test_banded_metrics_equal_the_whole_image_computation(monkeypatch, band_pixels):
    """Bands of 1 row up to the whole image, with the 10-row overlap of SSIM: same numbers to 1e-12."""
    import dlsn.metrics as metrics

    monkeypatch.setattr(metrics, "BAND_PIXELS", band_pixels)
    monkeypatch.setattr(metrics, "_MIN_BAND_ROWS", 1)
    hr = random_image(71, 53, 5)
    sr = np.clip(hr.astype(int) + np.random.default_rng(1).integers(-25, 26, hr.shape), 0, 255).astype(np.uint8)
    for gray in (False, True):
        y_sr, y_hr = reference_y(sr, 3, gray), reference_y(hr, 3, gray)
        ref_psnr = 10 * math.log10(255**2 / np.mean((y_sr - y_hr) ** 2))
        assert psnr_y(sr, hr, 3, gray=gray) == pytest.approx(ref_psnr, abs=1e-12)
        assert ssim_y(sr, hr, 3, gray=gray) == pytest.approx(reference_ssim(y_sr, y_hr), abs=1e-12)
    # Tensor input (the validation loop's) and the plain ssim() on Y maps take the same path.
    to_t = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255
    assert ssim_y(to_t(sr), to_t(hr), 3) == pytest.approx(reference_ssim(reference_y(sr, 3), reference_y(hr, 3)), abs=1e-12)
    from dlsn.metrics import ssim

    x, y = torch.from_numpy(reference_y(sr, 0)), torch.from_numpy(reference_y(hr, 0))
    assert ssim(x, y) == pytest.approx(reference_ssim(x.numpy(), y.numpy()), abs=1e-12)


def test_too_small_for_ssim_after_the_border_crop_is_a_clear_error():
    with pytest.raises(ValueError, match=r"at least 11x11 pixels, got \(2, 2\)"):
        ssim_y(random_image(10, 10), random_image(10, 10), 4)
    with pytest.raises(ValueError, match="crop_border=4 leaves nothing"):
        psnr_y(random_image(8, 30), random_image(8, 30), 4)
