"""scripts/visualize_attention.py and scripts/profile_model.py write their files (tiny models, small inputs).

Both scripts run in-process through their ``main(argv)``. The heatmaps are checked against the layer's own
``query_attention``; the profile's multiply-accumulate counts against formulas. Timings are only checked to
be present (no test asserts on speed).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dlsn.checkpoint import save_weights
from dlsn.data.io import write_png
from dlsn.models import DLSN, EDSR, to_official
from tests.helpers.runs import load_script


@pytest.fixture(scope="module")
def visualize():
    return load_script("visualize_attention")


@pytest.fixture(scope="module")
def profile():
    return load_script("profile_model")


@pytest.fixture
def lr_image(tmp_path):
    rows, cols = np.mgrid[0:14, 0:18]
    image = np.stack([rows * 18, cols * 14, (rows * cols) % 256], axis=-1).astype(np.uint8)
    path = tmp_path / "lr.png"
    write_png(path, image)
    return path


def tiny_dlsn() -> DLSN:
    torch.manual_seed(0)
    return DLSN(2, n_feats=16, n_resgroups=2, n_resblocks=1, chunk_size=16, n_hashes=3)


# ----------------------------------------------------------------------------------- visualize_attention

def test_visualize_attention_draws_the_layers_weights_for_the_query(visualize, tmp_path, lr_image, capsys):
    """An authors'-format .pt: the PNG has the image and three maps, the .npz the layer's own heatmaps."""
    model = tiny_dlsn()
    weights = tmp_path / "dlsn_official.pt"
    torch.save(to_official(model), weights)
    output = tmp_path / "maps" / "attention.png"
    assert visualize.main([str(weights), "--image", str(lr_image), "--query", "5", "11", "--layer", "-1",
                           "--seed", "4", "--output", str(output), "--save-maps"]) == 0
    with Image.open(output) as png:
        assert png.format == "PNG" and png.width > 3 * png.height  # four panels side by side
    maps = np.load(output.with_suffix(".npz"))
    assert sorted(maps.files) == ["attention", "dot_product", "learned", "round_weights"]

    # What the script drew is the last GLA layer's view of query (5, 11) of this image, rotations seeded.
    model.eval().set_rotation_seed(4)
    layer = model.attention_layers[-1]
    features = visualize.layer_input(model, layer, visualize.read_input(lr_image, 2, 1.0, False))[0]
    query = layer.query_attention(features, 5 * 18 + 11)
    for name in ("attention", "dot_product", "learned"):
        assert maps[name].shape == (14, 18)
        np.testing.assert_allclose(maps[name], query.heatmap(name).numpy(), rtol=1e-6, atol=1e-7)
        assert maps[name].sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(maps["round_weights"], query.round_weights.numpy())
    assert not np.allclose(maps["attention"], maps["dot_product"])  # the learned term changes the weights
    printed = capsys.readouterr().out
    assert "GLA layer 1: query (5, 11), 3 round(s) of 48 keys" in printed and f"wrote {output}" in printed


def test_visualize_attention_from_a_safetensors_export_with_lsh(visualize, tmp_path, lr_image):
    """A network with LSH attention (from its recorded config): no learned part to show."""
    torch.manual_seed(1)
    config = dict(_target_="dlsn.models.EDSR", scale=2, n_feats=8, n_resblocks=2, attention="lsh",
                  attention_every=1, chunk_size=16, n_hashes=2)
    net = EDSR(**{k: v for k, v in config.items() if k != "_target_"})
    save_weights(tmp_path / "edsr.safetensors", net, config)
    output = tmp_path / "lsh.png"
    assert visualize.main([str(tmp_path / "edsr.safetensors"), "--image", str(lr_image), "--query", "0", "0",
                           "--output", str(output), "--save-maps"]) == 0
    assert output.is_file() and sorted(np.load(output.with_suffix(".npz")).files) == [
        "attention", "dot_product", "round_weights"]


def test_visualize_attention_names_bad_requests(visualize, tmp_path, lr_image, capsys):
    weights = tmp_path / "dlsn_official.pt"
    torch.save(to_official(tiny_dlsn()), weights)
    common = ["--image", str(lr_image), "--output", str(tmp_path / "x.png")]
    assert visualize.main([str(weights), *common, "--query", "14", "0"]) == 2
    assert "--query 14 0 is outside the 14x18 LR image" in capsys.readouterr().err
    assert visualize.main([str(weights), *common, "--query", "0", "0", "--layer", "2"]) == 2
    assert "--layer 2: the network has 2 attention layers" in capsys.readouterr().err
    plain = tmp_path / "plain.safetensors"
    save_weights(plain, EDSR(2, n_feats=8, n_resblocks=2), dict(_target_="dlsn.models.EDSR", scale=2, n_feats=8,
                                                                 n_resblocks=2))
    assert visualize.main([str(plain), *common, "--query", "0", "0"]) == 2
    assert "the network has no attention layer" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------------------- profile_model

def test_model_configs_are_read_from_the_yaml_files(profile):
    small = profile.model_config("dlsn_small")  # defaults: [dlsn, _self_]
    assert (small["_target_"], small["n_feats"], small["n_resgroups"], small["chunk_size"], small["n_hashes"]) == (
        "dlsn.models.DLSN", 32, 2, 64, 2)
    assert small["attention"] == "gla" and small["reduction"] == 4 and "scale" not in small
    large = profile.model_config("edsr_large")
    assert (large["n_feats"], large["n_resblocks"], large["res_scale"], large["attention_every"]) == (256, 32, 0.1, 8)


def test_profile_writes_json_and_plot_with_counted_multiply_accumulates(profile, tmp_path, capsys):
    out = tmp_path / "profile"
    assert profile.main(["--models", "dlsn_small", "--variants", "gla", "nonlocal", "none", "--sizes", "16", "8",
                         "--repeats", "1", "--warmup", "0", "--threads", "1", "--device", "cpu",
                         "--output-dir", str(out)]) == 0
    report = json.loads((out / "profile.json").read_text())
    rows = {(row["attention"], row["size"]): row for row in report["rows"]}
    assert sorted(rows) == [(v, s) for v in ("gla", "none", "nonlocal") for s in (8, 16)]
    assert report["sizes"] == [8, 16] and report["device"] == "cpu" and report["mode"] == "inference"
    for row in rows.values():
        assert "error" not in row and row["time_s"] > 0 and math.isfinite(row["time_s"])
        assert row["peak_memory_mib"] is None or row["peak_memory_mib"] >= 0
        assert row["macs"] == sum(row["macs_by_operator"].values()) > 0

    # Convolutions only: multiply-accumulates proportional to the pixels.
    assert rows["none", 16]["macs"] == 4 * rows["none", 8]["macs"]
    # Non-local attention adds, per layer (C = 32 channels, d = C / 4 match channels, L positions), the
    # match and value convolutions 9 C (d + C) L and the products q k^T and P v, L^2 (d + C).
    for size in (8, 16):
        length, channels, match = size * size, 32, 8
        per_layer = 9 * channels * (match + channels) * length + length**2 * (match + channels)
        assert rows["nonlocal", size]["macs"] - rows["none", size]["macs"] == 2 * per_layer
    assert rows["gla", 8]["parameters"] > rows["nonlocal", 8]["parameters"] > rows["none", 8]["parameters"]
    growth = report["growth_exponents"]
    assert growth["dlsn_small/none"]["macs"] == 1.0 and abs(growth["dlsn_small/gla"]["macs"] - 1) < 0.01
    assert growth["dlsn_small/nonlocal"]["macs"] > 1.0  # tends to 2 as L^2 outgrows the convolutions

    with Image.open(out / "profile.png") as png:
        assert png.format == "PNG" and png.width > 2 * png.height  # three panels
    (out / "profile.png").unlink()
    assert profile.main(["--plot-only", str(out / "profile.json")]) == 0 and (out / "profile.png").is_file()
    assert "growth exponent" in capsys.readouterr().out
