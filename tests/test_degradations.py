"""BI / BD / DN degradations."""

import numpy as np
import pytest

from dlsn.data import degrade, imresize, modcrop
from dlsn.data.degradations import gaussian_blur_replicate, nearest_downscale
from tests.helpers.data import random_image


def ramp(n: int) -> np.ndarray:
    """Image whose pixel value encodes its (row, column) index: value = 10*row (R) and 10*col (G)."""
    rows, cols = np.mgrid[0:n, 0:n].astype(np.uint8)
    return np.stack([rows * 10, cols * 10, np.zeros_like(rows)], axis=-1)


def test_modcrop_crops_bottom_right():
    img = random_image(13, 11)
    out = modcrop(img, 4)
    assert out.shape == (12, 8, 3)
    np.testing.assert_array_equal(out, img[:12, :8])


@pytest.mark.parametrize("scale, kept", [(2, [1, 3, 5, 7, 9, 11]), (3, [1, 4, 7, 10]), (4, [2, 6, 10])])
def test_matlab_nearest_keeps_hand_computed_rows_and_columns(scale, kept):
    # MATLAB: u = x*s + 0.5*(1-s) (x 1-based); box kernel [-0.5, 0.5) selects i = floor(u + 0.5).
    # x2: x=1 -> u=1.5 -> i=2 (0-based 1); x3: u=2 -> 0-based 1; x4: u=2.5 -> i=3 (0-based 2).
    out = nearest_downscale(ramp(12), scale)
    assert (out[:, 0, 0] // 10).tolist() == kept
    assert (out[0, :, 1] // 10).tolist() == kept


def fspecial_gaussian(size: int = 7, sigma: float = 1.6) -> np.ndarray:
    """MATLAB ``fspecial('gaussian', size, sigma)`` (values below eps * max are zeroed; none are here)."""
    offsets = np.arange(size) - (size - 1) / 2
    kernel = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
    return kernel / kernel.sum()


@pytest.mark.parametrize("shape", [(20, 17, 3), (13, 9)])
def test_gaussian_blur_matches_matlab_imfilter_replicate(shape):
    from scipy.ndimage import correlate

    img = random_image(shape[0], shape[1], seed=3)
    img = img if len(shape) == 3 else img[..., 0]
    planes = img[..., None] if img.ndim == 2 else img
    reference = np.stack([correlate(planes[..., c].astype(np.float64), fspecial_gaussian(), mode="nearest")
                          for c in range(planes.shape[-1])], -1).reshape(img.shape)
    blurred = gaussian_blur_replicate(img)
    assert blurred.dtype == np.uint8 and blurred.shape == img.shape
    np.testing.assert_array_equal(blurred, np.floor(reference + 0.5).astype(np.uint8))


def test_bi_is_modcrop_then_bicubic():
    hr = random_image(50, 41, seed=4)
    lr = degrade(hr, 4, "BI")
    assert lr.dtype == np.uint8 and lr.shape == (12, 10, 3)
    np.testing.assert_array_equal(lr, imresize(hr[:48, :40], 0.25))


def test_bd_is_blur_then_nearest_sampling():
    hr = random_image(36, 30, seed=5)
    lr = degrade(hr, 3, "BD")
    blurred = gaussian_blur_replicate(hr)
    np.testing.assert_array_equal(lr, blurred[1::3, 1::3])
    assert (degrade(np.full((24, 24, 3), 200, np.uint8), 4, "BD") == 200).all()


def test_dn_noise_statistics_and_seeding():
    hr = np.full((240, 240, 3), 128, np.uint8)
    a = degrade(hr, 2, "DN", seed=7)
    b = degrade(hr, 2, "DN", seed=7)
    c = degrade(hr, 2, "DN", seed=8)
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.9
    noise = a.astype(np.float64) - 128
    assert abs(noise.std() - 30) < 0.5 and abs(noise.mean()) < 0.5
    # Independent per channel: channels are uncorrelated.
    assert abs(np.corrcoef(noise[..., 0].ravel(), noise[..., 1].ravel())[0, 1]) < 0.03


def test_dn_clips_to_uint8_range():
    out = degrade(np.zeros((64, 64, 3), np.uint8), 2, "DN", seed=0)
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() > 30
    assert (out == 0).mean() > 0.45  # about half the noise is negative and clips to 0


def test_invalid_arguments_name_the_value():
    hr = random_image(16, 16)
    with pytest.raises(ValueError, match=r"\['BI', 'BD', 'DN'\], got 'XX'"):
        degrade(hr, 2, "XX")
    with pytest.raises(ValueError, match="scale"):
        degrade(hr, 0, "BI")
    with pytest.raises(TypeError, match="uint8"):
        degrade(hr.astype(np.float32), 2, "BI")
