"""dlsn.models.Bicubic: the weightless baseline network equals MATLAB's uint8 imresize."""

import numpy as np
import pytest
import torch

from dlsn.imresize import imresize
from dlsn.models import Bicubic


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_equals_matlab_uint8_imresize(scale):
    rng = np.random.default_rng(scale)
    lr = rng.integers(0, 256, size=(17, 23, 3), dtype=np.uint8)
    expected = imresize(lr, scale)  # MATLAB imresize on uint8 (rounding after each pass)
    net = Bicubic(scale)
    sr = net(torch.from_numpy(lr).permute(2, 0, 1)[None].double() / 255)
    assert sr.shape == (1, 3, 17 * scale, 23 * scale)
    got = (sr[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(got, expected)
    assert list(net.parameters()) == []


def test_bicubic_respects_rgb_range():
    lr = torch.rand(1, 3, 8, 8)
    lr = (lr * 255).round() / 255
    torch.testing.assert_close(Bicubic(2, rgb_range=255.0)(lr * 255) / 255, Bicubic(2)(lr), rtol=0, atol=1e-5)


def test_bicubic_rejects_bad_scale():
    with pytest.raises(ValueError, match="scale"):
        Bicubic(1.5)
