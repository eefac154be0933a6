"""MATLAB-compatible imresize: hand-computed weights, borders, dtypes, numpy/torch agreement."""

import numpy as np
import pytest
import torch

from dlsn.data import imresize
from dlsn.imresize import imresize_torch, output_length, resize_weights

# Keys cubic (a = -0.5) at the distances that occur when enlarging by 2.
C025, C075, C125, C175 = 0.8671875, 0.2265625, -0.0703125, -0.0234375


def test_upscale_x2_interior_weights_are_keys_cubic():
    w = resize_weights(10, 2.0)
    # Output pixel 5 (1-based 6) maps to u = 6/2 + 0.5*(1 - 1/2) = 3.25 -> taps 1..5 (1-based).
    expected = np.zeros(10)
    expected[[1, 2, 3, 4]] = [C125, C025, C075, C175]
    np.testing.assert_allclose(w[5], expected, atol=1e-12)


def test_upscale_x2_first_row_folds_symmetric_border():
    # u = 0.75: taps at positions -1, 0, 1, 2 (1-based) with weights C175, C075, C025, C125;
    # symmetric padding maps 0 -> 1 and -1 -> 2.
    w = resize_weights(10, 2.0)
    expected = np.zeros(10)
    expected[0] = C075 + C025
    expected[1] = C175 + C125
    np.testing.assert_allclose(w[0], expected, atol=1e-12)


@pytest.mark.parametrize("scale", [1 / 2, 1 / 3, 1 / 4, 2, 3, 4])
def test_weights_rows_sum_to_one(scale):
    np.testing.assert_allclose(resize_weights(37, float(scale)).sum(axis=1), 1.0, atol=1e-12)


def test_downscale_x2_uses_antialiased_kernel():
    # Shrinking by 2: kernel cubic(t/2)/2, width 8 -> taps at distances 0.5, 1.5, 2.5, 3.5.
    w = resize_weights(20, 0.5)
    k = lambda t: 0.5 * ((1.5 * t**3 - 2.5 * t**2 + 1) if t <= 1 else (-0.5 * t**3 + 2.5 * t**2 - 4 * t + 2) if t <= 2 else 0)
    taps = [k(d / 2) for d in (3.5, 2.5, 1.5, 0.5, 0.5, 1.5, 2.5, 3.5)]
    expected = np.zeros(20)
    # Output 5 (0-based; x = 6) maps to u = 6*2 + 0.5*(1-2) = 11.5 (1-based): between 0-based 10 and 11.
    expected[7:15] = np.array(taps) / sum(taps)
    np.testing.assert_allclose(w[5], expected, atol=1e-12)


def test_scale_one_is_identity():
    np.testing.assert_allclose(resize_weights(9, 1.0), np.eye(9), atol=1e-12)


def test_output_size_is_ceil_of_scaled_size():
    assert output_length(510, 1 / 3) == 170
    assert output_length(11, 0.5) == 6
    assert imresize(np.zeros((13, 7, 3), np.uint8), 0.5).shape == (7, 4, 3)


def test_uint8_in_uint8_out_and_constant_preserved():
    img = np.full((12, 18, 3), 77, np.uint8)
    for scale in (0.5, 1 / 3, 2, 4):
        out = imresize(img, scale)
        assert out.dtype == np.uint8
        assert (out == 77).all()


def test_uint8_rounds_and_clips_like_matlab():
    # A sharp edge overshoots (negative cubic lobes): values beyond 0..255 must saturate.
    img = np.zeros((8, 8), np.uint8)
    img[:, 4:] = 255
    up = imresize(img, 4)
    down_float = imresize(img.astype(np.float64), 4)
    assert down_float.max() > 255 and down_float.min() < 0
    assert up.min() == 0 and up.max() == 255


def test_float_path_is_linear_and_grayscale_2d():
    rng = np.random.default_rng(0)
    a, b = rng.random((20, 30)), rng.random((20, 30))
    np.testing.assert_allclose(imresize(a + 2 * b, 1 / 3), imresize(a, 1 / 3) + 2 * imresize(b, 1 / 3), atol=1e-12)
    assert imresize(a, 2).shape == (40, 60)


def test_channels_are_resized_independently():
    rng = np.random.default_rng(1)
    img = rng.random((16, 20, 3))
    out = imresize(img, 0.5)
    for c in range(3):
        np.testing.assert_allclose(out[..., c], imresize(img[..., c], 0.5), atol=1e-12)


def test_rejects_bad_dtype_and_shape():
    with pytest.raises(TypeError, match="uint8"):
        imresize(np.zeros((4, 4), np.int16), 2)
    with pytest.raises(ValueError, match="HxW"):
        imresize(np.zeros((2, 4, 4, 3)), 2)
    with pytest.raises(ValueError, match="method"):
        imresize(np.zeros((4, 4)), 2, method="lanczos")


def test_torch_matches_numpy_float_and_uint8_paths():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].to(torch.float64)
    for scale in (0.25, 1 / 3, 2, 3):
        ref_float = imresize(img.astype(np.float64), scale)
        out = imresize_torch(x, scale)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(out, ref_float, atol=1e-9)
        quantised = imresize_torch(x, scale, quantize=True)[0].permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(quantised.astype(np.uint8), imresize(img, scale))


def test_torch_keeps_dtype_batch_and_gradient():
    x = torch.rand(2, 3, 10, 12, dtype=torch.float32, requires_grad=True)
    y = imresize_torch(x, 2)
    assert y.shape == (2, 3, 20, 24) and y.dtype == torch.float32
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # imresize() dispatches tensors to the torch implementation.
    torch.testing.assert_close(imresize(x.detach(), 2), y.detach())
