"""Mixed precision: DLSN trains under Lightning's bf16-mixed on the CPU, and GLA stays finite.

`trainer.precision=16-mixed` needs a GPU (Lightning turns it into bf16 on the CPU); the float16
checks here run GLA under torch's CPU float16 autocast instead, which exercises the same casts.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from dlsn.models import DLSN, GLA


def tiny_dlsn() -> DLSN:
    return DLSN(scale=2, n_feats=16, n_resgroups=1, n_resblocks=1, chunk_size=16, n_hashes=2)


class L1Restorer(L.LightningModule):
    """The smallest training loop around DLSN: L1 loss, Adam; records what autocast did."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.losses: list[float] = []
        self.head_dtypes: list[torch.dtype] = []
        net.head.register_forward_hook(lambda module, inputs, output: self.head_dtypes.append(output.dtype))

    def training_step(self, batch, batch_idx):
        lr, hr = batch
        loss = F.l1_loss(self.net(lr), hr)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=2e-3)


def synthetic_patches(count: int = 8, lr_size: int = 12, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    # Smooth images (upsampled noise): the LR -> HR mapping is learnable in a few steps.
    coarse = torch.rand(count, 3, lr_size // 3, lr_size // 3, generator=generator)
    hr = F.interpolate(coarse, size=(2 * lr_size, 2 * lr_size), mode="bilinear", align_corners=False)
    lr = F.avg_pool2d(hr, 2)
    return TensorDataset(lr, hr)


def psnr_between(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@pytest.mark.parametrize("precision", ["bf16-mixed"])
def test_dlsn_trains_with_finite_losses_under_mixed_precision(precision, tmp_path):
    torch.manual_seed(0)
    module = L1Restorer(tiny_dlsn())
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision=precision, max_steps=16, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(synthetic_patches(), batch_size=4, shuffle=True))

    assert len(module.losses) == 16
    assert all(math.isfinite(loss) for loss in module.losses), module.losses
    # Autocast really ran: the first convolution produced bfloat16 activations.
    assert set(module.head_dtypes) == {torch.bfloat16}
    assert all(torch.isfinite(p).all() for p in module.net.parameters())
    assert all(p.dtype == torch.float32 for p in module.net.parameters())  # master weights stay fp32
    # And it learns: the last steps are clearly below the first ones.
    assert sum(module.losses[-3:]) / 3 < 0.8 * sum(module.losses[:3]) / 3, module.losses


def test_bf16_dlsn_output_is_close_to_float32():
    torch.manual_seed(0)
    net = tiny_dlsn().eval()
    net.set_rotation_seed(7)  # the same hash rotations in both passes
    lr = torch.rand(2, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = net(lr)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_precision = net(lr)
    assert torch.isfinite(low_precision).all()
    # bf16 keeps 8 mantissa bits; on [0, 1] images the difference must stay far below 8-bit levels.
    assert psnr_between(low_precision, reference) > 45.0
    assert (low_precision.float() - reference).abs().max().item() < 1.0 / 255


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("input_scale", [1.0, 50.0, 300.0])
def test_gla_stays_finite_with_large_activations_in_low_precision(dtype, input_scale):
    """Large features make large attention scores; softmax/log-sum-exp must not overflow."""
    torch.manual_seed(0)
    layer = GLA(channels=32, chunk_size=16, n_hashes=2).eval()
    layer.rotation_seed = 3
    features = torch.randn(1, 32, 16, 16, generator=torch.Generator().manual_seed(2)) * input_scale
    with torch.no_grad():
        reference = layer(features)
        with torch.autocast("cpu", dtype=dtype):
            low_precision = layer(features)
    assert low_precision.dtype == features.dtype
    assert torch.isfinite(low_precision).all()
    if input_scale == 1.0:
        # At ordinary magnitudes the attention branch (output - input) stays within a few percent.
        branch, branch_ref = low_precision.float() - features, reference - features
        assert ((branch - branch_ref).norm() / branch_ref.norm()).item() < 0.05


def test_gla_gradients_are_finite_under_bf16_autocast():
    torch.manual_seed(0)
    layer = GLA(channels=32, chunk_size=16, n_hashes=2)
    features = (torch.randn(2, 32, 12, 12) * 20).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(features)
    out.float().square().mean().backward()
    assert torch.isfinite(features.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
