"""EDSR with attention as a plug-in (model=edsr / edsr_large) and the ablation experiment.

The network: the published EDSR sizes, the attention layers after every K blocks, ``none`` against EDSR
written out, a change of scale through init_from's upsampler rule. The configs: model=edsr, edsr_large and
experiment=ablation_attention compose and build. Slow: the ablation grid runs as one multirun of train.py
(tiny sizes) and ends in the sweep summary.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from dlsn.checkpoint import load_into, read_weights
from dlsn.models import EDSR, GLA, LSHAttention, NonLocalAttention
from dlsn.models.edsr import ScaledResidualBlock
from dlsn.models.gla import number_of_buckets
from dlsn.utils.config import register_resolvers, validate_config
from dlsn.utils.instantiate import build_network, count_parameters

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def tiny_edsr(scale: int = 2, **options) -> EDSR:
    return EDSR(scale, **(dict(n_feats=16, n_resblocks=4, attention_every=2, chunk_size=8, n_hashes=2) | options))


@pytest.mark.parametrize("scale, n_feats, n_resblocks, res_scale, parameters", [
    (2, 64, 16, 1.0, 1_369_859), (4, 64, 16, 1.0, 1_517_571),  # EDSR baseline: 1.37 M / 1.5 M
    (2, 256, 32, 0.1, 40_729_603), (4, 256, 32, 0.1, 43_089_923),  # EDSR: 40.7 M / 43.1 M
])
def test_plain_edsr_has_the_published_sizes(scale, n_feats, n_resblocks, res_scale, parameters):
    with torch.device("meta"):
        model = EDSR(scale, n_feats=n_feats, n_resblocks=n_resblocks, res_scale=res_scale)
    assert count_parameters(model) == parameters
    assert [type(layer) for layer in model.body] == [ScaledResidualBlock] * n_resblocks and len(model.attention) == 0


@pytest.mark.parametrize("attention, layer_type", [("gla", GLA), ("lsh", LSHAttention), ("nonlocal", NonLocalAttention)])
@pytest.mark.parametrize("every, after_blocks", [(8, [8, 16]), (5, [5, 10, 15]), (16, [16])])
def test_attention_follows_every_kth_block(monkeypatch, attention, layer_type, every, after_blocks):
    model = EDSR(2, n_feats=8, attention=attention, attention_every=every, chunk_size=16)
    assert [type(layer) for layer in model.attention] == [layer_type] * len(after_blocks)
    assert all(layer.channels == 8 for layer in model.attention) and model.attention_layers == list(model.attention)
    calls = []  # blocks run so far when each attention layer runs
    for index, block in enumerate(model.body):
        monkeypatch.setattr(block, "forward", lambda x, index=index: calls.append(f"block {index + 1}") or x)
    for index, layer in enumerate(model.attention):
        monkeypatch.setattr(layer, "forward", lambda x, rotations=None, index=index: calls.append(f"attention {index}") or x)
    with torch.no_grad():
        model(torch.rand(1, 3, 4, 4))
    expected = []
    for block in range(1, 17):
        expected.append(f"block {block}")
        if block in after_blocks:
            expected.append(f"attention {after_blocks.index(block)}")
    assert calls == expected


def edsr_backbone(model: EDSR, x: torch.Tensor) -> torch.Tensor:
    """EDSR written out: mean shift, head, blocks x + s * conv(relu(conv(x))), body conv + skip, tail."""
    shallow = model.head(x - model.rgb_mean)
    features = shallow
    for block in model.body:
        features = features + block.res_scale * block.conv2(F.relu(block.conv1(features)))
    features = model.body_conv(features) + shallow
    return model.reconstruction(model.upsampler(features)) + model.rgb_mean


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_none_is_edsr_and_every_variant_keeps_the_backbone(monkeypatch, scale):
    torch.manual_seed(0)
    plain = tiny_edsr(scale, res_scale=0.5).eval()
    x = torch.rand(2, 3, 6, 7)
    with torch.no_grad():
        expected = edsr_backbone(plain, x)
        torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)
        assert plain(x).shape == (2, 3, 6 * scale, 7 * scale)
    for attention in ("gla", "lsh", "nonlocal"):
        model = tiny_edsr(scale, res_scale=0.5, attention=attention).eval()
        loaded = model.load_state_dict(plain.state_dict(), strict=False)
        # The backbone's parameter names are plain EDSR's; only the attention layers' are new.
        assert loaded.unexpected_keys == [] and loaded.missing_keys
        assert all(key.startswith("attention.") for key in loaded.missing_keys)
        for layer in model.attention_layers:  # attention as the identity: the backbone again
            monkeypatch.setattr(layer, "forward", lambda features, rotations=None: features)
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["gla", "lsh", "nonlocal"])
def test_edsr_with_attention_trains_and_evaluates_reproducibly(attention):
    torch.manual_seed(1)
    model = tiny_edsr(attention=attention)
    x = torch.rand(2, 3, 8, 9)
    model(x).mean().backward()
    attention_grads = [p.grad for layer in model.attention_layers for p in layer.parameters()]
    assert attention_grads and all(g is not None and torch.isfinite(g).all() for g in attention_grads)
    model.eval().set_rotation_seed(3)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        rotations = [torch.nn.init.orthogonal_(torch.empty(2, 4, number_of_buckets(72, 8))) for layer in model.attention_layers
                     if isinstance(layer, GLA)]
        assert model(x, rotations).shape == (2, 3, 16, 18)
    with pytest.raises(ValueError, match=f"EDSR: expected {len(rotations)} rotation tensors"):
        model(x, rotations + [torch.zeros(1)])


@pytest.mark.parametrize("attention", ["gla", "lsh", "nonlocal", "none"])
def test_edsr_traces_into_one_graph(attention):
    """No graph breaks, so module.compile gets the whole network whatever the attention."""
    explanation = torch._dynamo.explain(tiny_edsr(attention=attention))(torch.rand(2, 3, 6, 6))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


def test_fine_tuning_at_another_scale_reinitialises_only_the_upsampler():
    source = tiny_edsr(2, attention="gla")
    target = tiny_edsr(4, attention="gla")
    reinitialised = load_into(target, source.state_dict(), reinit_upsampler=True)
    assert reinitialised and all(key.startswith("upsampler.") for key in reinitialised)
    torch.testing.assert_close(target.attention[1].match_embedding.weight, source.attention[1].match_embedding.weight)
    torch.testing.assert_close(target.body[3].conv2.weight, source.body[3].conv2.weight)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match=r"EDSR: attention_every \(8\) exceeds n_resblocks \(4\): no gla layer"):
        EDSR(2, n_resblocks=4, attention="gla")
    EDSR(2, n_feats=8, n_resblocks=4, attention="none")  # attention_every unused: fine
    with pytest.raises(ValueError, match="EDSR: attention_every must be a positive integer, got 0"):
        EDSR(2, attention_every=0)
    with pytest.raises(ValueError, match="EDSR: attention must be one of gla, lsh, nonlocal, none, got 'nlsa'"):
        EDSR(2, attention="nlsa")
    with pytest.raises(ValueError, match="EDSR: scale must be 3 or a power of two"):
        EDSR(5)


# ------------------------------------------------------------------------------------------ configs

def compose_train(*overrides: str):
    register_resolvers()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("model, parameters", [("edsr", 1_369_859), ("edsr_large", 40_729_603)])
def test_model_configs_are_the_paper_sizes(model, parameters):
    cfg = compose_train(f"model={model}")
    assert cfg.model.attention == "none" and cfg.model.attention_every == 8
    with torch.device("meta"):
        assert count_parameters(build_network(cfg.model)) == parameters
        with_gla = build_network(compose_train(f"model={model}", "model.attention=gla").model)
    assert [type(layer) for layer in with_gla.attention_layers] == [GLA] * (2 if model == "edsr" else 4)


def test_ablation_experiment_is_one_grid_over_the_variants():
    cfg = compose_train("experiment=ablation_attention")
    assert cfg.hydra.sweeper.params == {"model.attention": "gla,lsh,nonlocal,none"}
    assert cfg.model._target_ == "dlsn.models.EDSR" and cfg.model.attention_every == 8
    assert (cfg.data.patch_size, cfg.data.batch_size, cfg.trainer.max_epochs) == (48, 16, 100)
    assert cfg.hydra.callbacks.sweep_report._target_ == "dlsn.sweep_report.SweepReportCallback"
    for attention in ("gla", "lsh", "nonlocal", "none"):
        job = compose_train("experiment=ablation_attention", f"model.attention={attention}", "data=sample",
                            "trainer=cpu")
        validate_config(job)
        net = build_network(job.model)
        assert net.attention_variant == attention and net.scale == 2


TINY_ABLATION = [
    "experiment=ablation_attention", "data=sample", "trainer=cpu", "model.n_feats=8", "model.n_resblocks=2",
    "model.attention_every=1", "model.chunk_size=16", "model.n_hashes=1", "data.patch_size=12",
    "data.batch_size=2", "data.iters_per_epoch=3", "data.num_workers=0", "trainer.max_epochs=1",
    "logger=csv", "extras.print_config=false", "compare_bicubic=false", "module.compile.enabled=false",
]


@pytest.mark.slow
def test_ablation_multirun_trains_every_variant_and_ends_in_the_sweep_summary(tmp_path):
    """`python train.py -m experiment=ablation_attention` (tiny sizes): one job per variant, each a
    finished training of the plug-in EDSR with its own attention, all in one sweep summary."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "train.py"), "-m", *TINY_ABLATION,
                           f"paths.log_dir={tmp_path}"], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    [sweep_dir] = (tmp_path / "ablation_attention" / "multiruns").iterdir()
    with open(sweep_dir / "sweep_summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    variants = ["gla", "lsh", "nonlocal", "none"]
    assert [(row["job"], row["status"], row["overrides"]) for row in rows] == [
        (str(job), "finished", f"model.attention={variant}") for job, variant in enumerate(variants)]
    expected_layers = {"gla": [GLA, GLA], "lsh": [LSHAttention, LSHAttention],
                       "nonlocal": [NonLocalAttention, NonLocalAttention], "none": []}
    for row, variant in zip(rows, variants):
        assert row["steps"] == "3" and float(row["val_psnr"]) > 0
        weights = read_weights(sweep_dir / row["job"] / "checkpoints" / "best.ckpt")
        assert weights.config["_target_"] == "dlsn.models.EDSR" and weights.config["attention"] == variant
        net = build_network(weights.config)
        load_into(net, weights.state_dict)
        assert [type(layer) for layer in net.attention_layers] == expected_layers[variant]
    markdown = (sweep_dir / "sweep_summary.md").read_text()
    assert "4 jobs: 4 finished." in markdown and (sweep_dir / "sweep_psnr.png").is_file()
