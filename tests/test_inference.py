"""Whole-image inference: chop and tiles reproduce a whole-image pass for local networks; self-ensemble."""

import pytest
import torch
from torch import nn

from dlsn.inference import _inverse_transform, _transform, chop_forward, self_ensemble_forward, super_resolve, tile_forward


def local_net(scale: int) -> nn.Module:
    """A network with a 5x5 LR receptive field (two 3x3 convs), so overlaps >= 2 pixels make pieces exact."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3 * scale * scale, 3, padding=1), nn.PixelShuffle(scale)
    ).double()


@pytest.mark.parametrize("scale", [2, 3])
@pytest.mark.parametrize("size", [(37, 53), (40, 40), (23, 61)])
def test_chop_matches_whole_image(scale, size):
    net = local_net(scale)
    lr = torch.rand(1, 3, *size, dtype=torch.float64)
    calls = []

    def forward(x):
        calls.append(tuple(x.shape[-2:]))
        return net(x)

    with torch.no_grad():
        whole = net(lr)
        chopped = chop_forward(forward, lr, scale, shave=4, min_size=200)
    assert chopped.shape == whole.shape
    torch.testing.assert_close(chopped, whole, rtol=0, atol=1e-12)
    assert all(h * w <= 200 for h, w in calls), calls  # recursion went down to small pieces
    assert len(calls) >= 16


def test_chop_odd_size_without_shave_is_exact_for_pointwise_net():
    net = nn.Sequential(nn.Conv2d(3, 12, 1), nn.PixelShuffle(2)).double()
    lr = torch.rand(2, 3, 15, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(chop_forward(net, lr, 2, shave=0, min_size=10), net(lr), rtol=0, atol=1e-12)


def test_chop_small_image_is_one_pass():
    calls = []
    lr = torch.rand(1, 3, 10, 10)
    chop_forward(lambda x: calls.append(x.shape) or x.repeat_interleave(2, -1).repeat_interleave(2, -2), lr, 2, min_size=100)
    assert len(calls) == 1


@pytest.mark.parametrize("size", [(50, 71), (32, 32), (20, 90)])
@pytest.mark.parametrize("tile_size,overlap", [(16, 4), (24, 8), (17, 5)])
def test_tiles_match_whole_image(size, tile_size, overlap):
    net = local_net(2)
    lr = torch.rand(1, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        whole = net(lr)
        tiled = tile_forward(net, lr, 2, tile_size=tile_size, overlap=overlap)
    # Every kept pixel is >= overlap // 2 = 2 LR pixels (the receptive-field radius) from an inner tile edge.
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-12)


def test_tiles_keep_pixels_away_from_inner_tile_edges():
    """Each output pixel comes from the tile in which it is farthest from an edge (at least overlap // 2)."""
    height, width, overlap = 45, 70, 10
    calls = []

    def distance_to_tile_edge(x):
        calls.append(x.shape[-2:])
        h, w = x.shape[-2:]
        rows = torch.minimum(torch.arange(h), torch.arange(h).flip(0))[:, None]
        cols = torch.minimum(torch.arange(w), torch.arange(w).flip(0))[None, :]
        return torch.minimum(rows, cols).expand(1, 1, h, w).float()

    out = tile_forward(distance_to_tile_edge, torch.zeros(1, 1, height, width), 1, tile_size=20, overlap=overlap)
    inner = out[..., overlap // 2 : height - overlap // 2, overlap // 2 : width - overlap // 2]
    assert inner.min() >= overlap // 2
    assert len(calls) == 4 * 6  # starts 0,10,20,25 (rows) x 0,10,20,30,40,50 (cols)


def test_tile_rejects_bad_settings():
    with pytest.raises(ValueError, match="overlap"):
        tile_forward(lambda x: x, torch.zeros(1, 3, 8, 8), 1, tile_size=8, overlap=8)
    with pytest.raises(ValueError, match="mode"):
        super_resolve(lambda x: x, torch.zeros(1, 3, 8, 8), 1, mode="quadrants")


def test_dihedral_transforms_are_inverted():
    x = torch.rand(2, 3, 5, 7)
    seen = set()
    for index in range(8):
        transformed = _transform(x, index)
        seen.add(tuple(transformed.flatten().tolist()))
        torch.testing.assert_close(_inverse_transform(transformed, index), x, rtol=0, atol=0)
    assert len(seen) == 8  # eight distinct views


def test_self_ensemble_averages_the_eight_views():
    net = local_net(2)
    lr = torch.rand(1, 3, 9, 11, dtype=torch.float64)
    with torch.no_grad():
        ensemble = self_ensemble_forward(net, lr)
        expected = sum(_inverse_transform(net(_transform(lr, i)), i) for i in range(8)) / 8
        single = net(lr)
    torch.testing.assert_close(ensemble, expected)
    assert not torch.allclose(ensemble, single)  # a random conv net is not flip-equivariant

    # An equivariant operation (nearest upsampling) is unchanged by self-ensemble.
    up = lambda x: x.repeat_interleave(2, -1).repeat_interleave(2, -2)  # noqa: E731
    torch.testing.assert_close(self_ensemble_forward(up, lr), up(lr))


def test_super_resolve_composes_ensemble_and_chop():
    net = local_net(2)
    lr = torch.rand(1, 3, 30, 26, dtype=torch.float64)
    with torch.no_grad():
        out = super_resolve(net, lr, 2, mode="chop", shave=4, min_size=100, self_ensemble=True)
        torch.testing.assert_close(out, self_ensemble_forward(net, lr), rtol=0, atol=1e-12)
