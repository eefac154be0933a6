"""The attention variants (model.attention=gla|lsh|nonlocal|none) and GLA's knobs, against their formulas.

Small layers on the CPU: non-local attention against the full-attention formula written out, LSH
against GLA with the learned score zeroed, ``none`` against the backbone written out, the knobs at their
defaults against today's layer (and the published implementation's fixtures), other adjacencies against
the chunk-neighbourhood rule written out query by query, and the one-query hook against ``forward``.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dlsn.models import DLSN, GLA, LSHAttention, NonLocalAttention, load_official, to_official
from dlsn.models import attention as attention_module
from dlsn.models import chunk_attention as fused
from dlsn.models.gla import hash_codes, neighbour_chunk_table, number_of_buckets, sort_into_chunks

PROJECT_ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_FIXTURES = Path(os.environ.get("DLSN_TEST_SHARED", PROJECT_ROOT.parent / "shared")) / "fixtures" / "official_dlsn"


def tokens(feature_map: torch.Tensor) -> torch.Tensor:
    return F.relu(feature_map).flatten(2).transpose(1, 2)  # [N, L, D]


def random_rotations(layer: GLA, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (layer.channels // layer.reduction, number_of_buckets(length, layer.chunk_size))
    return torch.stack([torch.nn.init.orthogonal_(torch.empty(shape), generator=generator)
                        for _ in range(layer.n_hashes)])


def small_dlsn(**options) -> DLSN:
    return DLSN(2, **(dict(n_feats=16, n_resgroups=2, n_resblocks=1, chunk_size=16, n_hashes=2) | options))


# ------------------------------------------------------------------------------------------- nonlocal

def full_attention(layer: NonLocalAttention, x: torch.Tensor) -> torch.Tensor:
    """x + res_scale * softmax_j(m_i . m_j / max(|m_j|, 5e-5)) v_j over all positions, written out."""
    batch, channels, height, width = x.shape
    match, value = tokens(layer.match_embedding(x)), tokens(layer.value_embedding(x))
    keys = match / match.norm(dim=-1, keepdim=True).clamp_min(5e-5)
    attended = torch.softmax(match @ keys.transpose(1, 2), dim=-1) @ value
    return x + layer.res_scale * attended.transpose(1, 2).reshape(batch, channels, height, width)


@pytest.mark.parametrize("query_blocks", [False, True], ids=["one-call", "query-blocks"])
def test_nonlocal_equals_the_full_attention_formula(monkeypatch, query_blocks):
    torch.manual_seed(0)
    layer = NonLocalAttention(16, reduction=2, res_scale=0.7)
    x = 2 * torch.randn(2, 16, 5, 7)
    expected = full_attention(layer, x)
    if query_blocks:  # inference in blocks of queries (a few rows each) gives the same numbers
        monkeypatch.setattr(attention_module, "NONLOCAL_BLOCK_BYTES", 4 * 2 * 35 * 6)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        return
    x_grad = x.clone().requires_grad_(True)
    output = layer(x_grad)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    output.square().sum().backward()
    x_direct = x.clone().requires_grad_(True)
    full_attention(layer, x_direct).square().sum().backward()
    torch.testing.assert_close(x_grad.grad, x_direct.grad, rtol=1e-4, atol=1e-4)


def test_nonlocal_has_only_the_match_and_value_embeddings_and_ignores_rotations():
    layer = NonLocalAttention(16, reduction=4)
    assert sorted(name for name, _ in layer.named_parameters()) == [
        "match_embedding.bias", "match_embedding.weight", "value_embedding.bias", "value_embedding.weight"]
    assert layer.match_embedding.out_channels == 4
    x = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(layer(x, torch.randn(3, 4, 2)), layer(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ lsh

def gla_and_lsh(**options) -> tuple[GLA, LSHAttention]:
    torch.manual_seed(1)
    gla = GLA(16, chunk_size=8, n_hashes=3, reduction=2, res_scale=0.5, **options)
    lsh = LSHAttention(16, chunk_size=8, n_hashes=3, reduction=2, res_scale=0.5, **options)
    loaded = lsh.load_state_dict(gla.state_dict(), strict=False)  # the shared match and value embeddings
    assert loaded.missing_keys == [] and all(key.startswith("score_") for key in loaded.unexpected_keys)
    return gla, lsh


@pytest.mark.parametrize("adjacent_chunks", [1, 2])
def test_lsh_equals_gla_with_the_learned_score_zeroed(adjacent_chunks):
    """fc(u_j) = W2 relu(W1 u_j + b1) + b2 is zero for every key and slot exactly when W2 = 0 and b2 = 0:
    then s(i, j) is the dot product alone, LSH's score, with the same hashing, chunks and round mixing."""
    gla, lsh = gla_and_lsh(adjacent_chunks=adjacent_chunks)
    with torch.no_grad():
        gla.score_mlp[2].weight.zero_()
        gla.score_mlp[2].bias.zero_()
    x = torch.randn(2, 16, 9, 10)  # 90 positions, chunks of 8: padding
    rotations = random_rotations(gla, 90)
    gla_input, lsh_input = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    gla_output, lsh_output = gla(gla_input, rotations), lsh(lsh_input, rotations)
    torch.testing.assert_close(lsh_output, gla_output, rtol=1e-6, atol=1e-6)
    gla_output.square().sum().backward()
    lsh_output.square().sum().backward()
    torch.testing.assert_close(lsh_input.grad, gla_input.grad, rtol=1e-5, atol=1e-5)
    for name, parameter in lsh.named_parameters():
        torch.testing.assert_close(parameter.grad, dict(gla.named_parameters())[name].grad, rtol=1e-5, atol=1e-5)


def test_a_constant_learned_score_is_not_lsh():
    """With W2 = 0 but b2 != 0 the learned score b2[slot(i)] is the same for all keys of a query (the
    softmax over keys is unchanged) but shifts each round's confidence: the rounds mix differently."""
    gla, lsh = gla_and_lsh()
    with torch.no_grad():
        gla.score_mlp[2].weight.zero_()
        gla.score_mlp[2].bias.copy_(torch.linspace(-3, 3, 8))
    x = torch.randn(1, 16, 9, 10)
    rotations = random_rotations(gla, 90)
    assert (gla(x, rotations) - lsh(x, rotations)).abs().max() > 1e-3


def test_lsh_has_no_learned_score_parameters():
    lsh = LSHAttention(16, chunk_size=8, n_hashes=2, reduction=2)
    assert not any(name.startswith("score_") for name in lsh.state_dict())
    assert not lsh.learns_scores and lsh.adjacent_chunks == 1
    dlsn = small_dlsn(attention="lsh")
    gla_dlsn = small_dlsn()
    removed = {key for key in gla_dlsn.state_dict() if key not in dlsn.state_dict()}
    assert removed and all(".attention.score_" in key for key in removed)


@pytest.mark.skipif(not fused.triton_available(), reason="triton is not importable")
def test_lsh_through_the_fused_kernel_equals_the_reference():
    """The fused kernel adds a zero learned score for LSH (Triton's interpreter on the CPU)."""
    torch.manual_seed(2)
    reference = LSHAttention(8, chunk_size=4, n_hashes=2, reduction=2, attention_impl="reference")
    kernel = LSHAttention(8, chunk_size=4, n_hashes=2, reduction=2, attention_impl="fused")
    kernel.load_state_dict(reference.state_dict())
    x = torch.randn(1, 8, 3, 5)
    rotations = random_rotations(reference, 15)
    torch.testing.assert_close(kernel(x, rotations), reference(x, rotations), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- none

def dlsn_backbone(model: DLSN, x: torch.Tensor) -> torch.Tensor:
    """DLSN's residual groups without attention, written out: x + res_scale * conv(blocks(x))."""
    shallow = model.head(x - model.rgb_mean)
    features = shallow
    for group in model.groups:
        inner = features
        for block in group.blocks:
            inner = inner + block.conv2(F.relu(block.conv1(inner)))
        features = features + group.res_scale * group.conv(inner)
    features = model.body_conv(features) + shallow
    return model.reconstruction(model.upsampler(features)) + model.rgb_mean


def test_none_is_the_dlsn_backbone_alone():
    torch.manual_seed(3)
    model = small_dlsn(attention="none", res_scale=0.3).eval()
    assert model.attention_layers == [] and all(group.attention is None for group in model.groups)
    x = torch.rand(2, 3, 7, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dlsn_backbone(model, x), rtol=1e-5, atol=1e-5)
    # The same groups as the paper's model, only the attention layers left out.
    with_gla = {key for key in small_dlsn().state_dict() if ".attention." not in key}
    assert set(model.state_dict()) == with_gla


# --------------------------------------------------------------------------------- knobs at defaults

def test_knobs_at_their_defaults_are_todays_layer():
    torch.manual_seed(4)
    today = GLA(16, chunk_size=8, n_hashes=3, reduction=2)
    explicit = GLA(16, chunk_size=8, n_hashes=3, reduction=2, score_mlp_hidden=8, adjacent_chunks=1)
    assert {k: v.shape for k, v in explicit.state_dict().items()} == {k: v.shape for k, v in today.state_dict().items()}
    explicit.load_state_dict(today.state_dict())
    x = torch.randn(2, 16, 9, 10)
    rotations = random_rotations(today, 90)
    torch.testing.assert_close(explicit(x, rotations), today(x, rotations), rtol=0, atol=0)
    assert (today.score_mlp[0].out_features, today.adjacent_chunks) == (8, 1)


def test_neighbour_table_keeps_the_published_order():
    ids = torch.arange(5)
    assert torch.equal(neighbour_chunk_table(5, 1), torch.stack([ids, (ids - 1) % 5, (ids + 1) % 5], dim=1))
    assert torch.equal(neighbour_chunk_table(5, 0), ids.unsqueeze(1))
    assert neighbour_chunk_table(5, 2)[0].tolist() == [0, 4, 1, 3, 2]
    assert neighbour_chunk_table(2, 2)[1].tolist() == [1, 0, 0, 1, 1]  # wraps round: chunks repeat


@pytest.mark.skipif(not (OFFICIAL_FIXTURES / "dlsn_tiny_x2.pt").is_file(),
                    reason=f"official DLSN fixtures not found at {OFFICIAL_FIXTURES} (set DLSN_TEST_SHARED)")
def test_explicit_default_knobs_reproduce_the_published_layer_and_network():
    for case in torch.load(OFFICIAL_FIXTURES / "gla_cases.pt", weights_only=True):
        config = case["config"] | dict(score_mlp_hidden=case["config"]["chunk_size"], adjacent_chunks=1)
        layer = load_official(GLA(**config), case["state_dict"])
        with torch.no_grad():
            output = layer(case["input"], torch.stack(case["rotations"]))
        torch.testing.assert_close(output, case["output"], rtol=1e-5, atol=1e-5)
    network = torch.load(OFFICIAL_FIXTURES / "dlsn_tiny_x2.pt", weights_only=True)
    config = network["config"] | dict(attention="gla", score_mlp_hidden=network["config"]["chunk_size"], adjacent_chunks=1)
    model = load_official(DLSN(**config), network["state_dict"]).eval()
    for run in network["runs"]:
        torch.manual_seed(run["rotation_seed"])
        with torch.no_grad():
            torch.testing.assert_close(model(run["input"]), run["output"], rtol=1e-5, atol=2e-6)


# ----------------------------------------------------------------------------- other adjacencies, width

def chunk_neighbourhood_attention(layer: GLA, x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """GLA's rule written out query by query: query i in chunk c of round t attends to the keys of
    chunks c - a .. c + a (cyclic) with s = m_i . m_j/|m_j| + fc(u_j)[slot(i)]; rounds mixed by the
    softmax of their log-sum-exp."""
    _, channels, height, width = x.shape
    length, chunk, a = height * width, min(layer.chunk_size, height * width), layer.adjacent_chunks
    match = tokens(layer.match_embedding(x))[0]
    value = tokens(layer.value_embedding(x))[0]
    learned = layer.score_mlp(tokens(layer.score_embedding(x))[0])
    keys = match / match.norm(dim=-1, keepdim=True).clamp_min(5e-5)
    order, inverse = sort_into_chunks(hash_codes(match[None], rotations), chunk)
    n_chunks = order.shape[-1] // chunk
    outputs, confidences = torch.zeros(layer.n_hashes, length, channels), torch.zeros(layer.n_hashes, length)
    for t in range(layer.n_hashes):
        for i in range(length):
            own, slot = divmod(int(inverse[0, t, i]), chunk)
            key_positions = [int(order[0, t, ((own + offset) % n_chunks) * chunk + r])
                             for offset in range(-a, a + 1) for r in range(chunk)]
            scores = keys[key_positions] @ match[i] + learned[key_positions, slot]
            outputs[t, i] = torch.softmax(scores, dim=0) @ value[key_positions]
            confidences[t, i] = torch.logsumexp(scores, dim=0)
    mixed = (torch.softmax(confidences, dim=0).unsqueeze(-1) * outputs).sum(0)
    return x + layer.res_scale * mixed.T.reshape(1, channels, height, width)


@pytest.mark.parametrize("adjacent_chunks", [0, 1, 2, 5])
def test_adjacent_chunks_follow_the_chunk_neighbourhood_rule(adjacent_chunks):
    # 35 positions in chunks of 4: 9 chunks (the last one padded); a = 5 wraps round the 9 chunks.
    torch.manual_seed(5)
    layer = GLA(8, chunk_size=4, n_hashes=2, reduction=2, res_scale=0.8, adjacent_chunks=adjacent_chunks)
    x = torch.randn(1, 8, 5, 7)
    rotations = random_rotations(layer, 35)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, rotations), chunk_neighbourhood_attention(layer, x, rotations),
                                   rtol=1e-5, atol=1e-5)


def test_score_mlp_hidden_sets_the_mlp_width():
    layer = GLA(16, chunk_size=8, score_mlp_hidden=5, reduction=2)
    assert layer.score_mlp[0].weight.shape == (5, 16) and layer.score_mlp[2].weight.shape == (8, 5)
    assert torch.isfinite(layer(torch.randn(1, 16, 6, 6))).all()
    model = small_dlsn(score_mlp_hidden=5, adjacent_chunks=2)
    exported = to_official(model)
    assert exported["body.0.body.1.fc.0.weight"].shape == (5, 16)
    assert exported["body.0.body.1.fc.2.weight"].shape == (16, 5)
    assert all(layer.adjacent_chunks == 2 for layer in model.attention_layers)


def test_the_fused_kernel_is_refused_or_skipped_for_other_neighbourhoods(monkeypatch):
    with pytest.raises(ValueError, match=r"attention_impl='fused' computes the published neighbourhood only "
                                         r"\(adjacent_chunks=1\), got adjacent_chunks=2"):
        GLA(16, adjacent_chunks=2, attention_impl="fused")
    with pytest.raises(ValueError, match="DLSN: attention_impl='fused' is GLA's chunk-attention kernel; "
                                         "attention='nonlocal' has no chunks"):
        small_dlsn(attention="nonlocal", attention_impl="fused")
    # auto: with every condition for the kernel met (CUDA half-precision values, Triton, no failure), the
    # published neighbourhood takes the kernel and any other the reference.
    monkeypatch.setattr(fused, "triton_available", lambda: True)
    monkeypatch.setattr(fused, "fused_kernel_failure", lambda: None)
    cuda_values = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    assert GLA(16, adjacent_chunks=1)._uses_fused_kernel(cuda_values)
    assert LSHAttention(16)._uses_fused_kernel(cuda_values)
    assert not GLA(16, adjacent_chunks=2)._uses_fused_kernel(cuda_values)
    assert not GLA(16, adjacent_chunks=0)._uses_fused_kernel(cuda_values)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="DLSN: attention must be one of gla, lsh, nonlocal, none, got 'full'"):
        small_dlsn(attention="full")
    with pytest.raises(ValueError, match="adjacent_chunks must be a non-negative integer, got -1"):
        GLA(16, adjacent_chunks=-1)
    with pytest.raises(ValueError, match=r"score_mlp_hidden must be a positive integer or None \(= chunk_size\), got 0"):
        GLA(16, score_mlp_hidden=0)
    with pytest.raises(TypeError, match="official format exists for DLSN with attention='gla', not attention='lsh'"):
        to_official(small_dlsn(attention="lsh"))


# ------------------------------------------------------------------------------------ the DLSN variants

@pytest.mark.parametrize("attention, layer_type, n_rotations", [
    ("gla", GLA, 2), ("lsh", LSHAttention, 2), ("nonlocal", NonLocalAttention, 0), ("none", None, 0)])
def test_dlsn_variants_run_and_take_one_rotation_per_hashed_layer(attention, layer_type, n_rotations):
    torch.manual_seed(6)
    model = small_dlsn(attention=attention).eval()
    assert [type(layer) for layer in model.attention_layers] == ([layer_type] * 2 if layer_type else [])
    x = torch.rand(1, 3, 9, 11)
    rotations = [random_rotations(layer, 99, seed) for seed, layer in enumerate(model.attention_layers)
                 if isinstance(layer, GLA)]
    assert len(rotations) == n_rotations
    with torch.no_grad():
        output = model(x, rotations)
        model.set_rotation_seed(1)
        assert torch.equal(model(x), model(x))  # seeded: LSH layers too
    assert output.shape == (1, 3, 18, 22) and torch.isfinite(output).all()
    with pytest.raises(ValueError, match=f"DLSN: expected {n_rotations} rotation tensors"):
        model(x, rotations + [rotations[0] if rotations else torch.zeros(1)])


# ------------------------------------------------------------------------------- looking at one query

@pytest.mark.parametrize("kind", ["gla", "gla-a2", "lsh", "nonlocal"])
def test_query_attention_reproduces_the_forward_output_at_that_query(kind):
    """x_i + res_scale * sum_t w_t sum_j p_tj v_j from the hook's weights is the layer's output at i."""
    torch.manual_seed(7)
    options = dict(chunk_size=8, n_hashes=3, reduction=2, res_scale=0.6)
    layer = {"gla": lambda: GLA(16, **options), "gla-a2": lambda: GLA(16, adjacent_chunks=2, **options),
             "lsh": lambda: LSHAttention(16, **options),
             "nonlocal": lambda: NonLocalAttention(16, reduction=2, res_scale=0.6)}[kind]()
    layer.rotation_seed = 5
    x = torch.randn(1, 16, 7, 9)
    with torch.no_grad():
        output = layer(x)
        value = tokens(layer.value_embedding(x))[0]
    for position in (0, 31, 62):
        query = layer.query_attention(x, position)
        assert query.weights.shape == query.key_positions.shape == query.dot_scores.shape
        torch.testing.assert_close(query.weights.sum(-1), torch.ones(len(query.round_weights)))
        torch.testing.assert_close(query.round_weights.sum(), torch.tensor(1.0))
        attended = (query.round_weights[:, None, None] * query.weights[..., None] * value[query.key_positions]).sum((0, 1))
        row, col = divmod(position, 9)
        torch.testing.assert_close(x[0, :, row, col] + 0.6 * attended, output[0, :, row, col], rtol=1e-5, atol=1e-5)
        # The heatmap is the total weight each position receives: the same weighted sum of values.
        from_heatmap = query.heatmap().flatten() @ value
        torch.testing.assert_close(x[0, :, row, col] + 0.6 * from_heatmap, output[0, :, row, col], rtol=1e-5, atol=1e-5)
        maps = {"attention": query.heatmap()}
        maps["dot_product"] = query.heatmap("dot_product")
        if kind.startswith("gla"):
            maps["learned"] = query.heatmap("learned")
        else:
            with pytest.raises(ValueError, match="no learned score term"):
                query.heatmap("learned")
        for heat in maps.values():
            assert heat.shape == (7, 9) and heat.min() >= 0
            torch.testing.assert_close(heat.sum(), torch.tensor(1.0))
    if kind == "gla":  # the learned part is the softmax of the learned term alone over the same keys
        torch.testing.assert_close(query.weights, torch.softmax(query.dot_scores + query.learned_scores, dim=-1))
    with pytest.raises(ValueError, match="position 63 is outside the 7x9 feature map"):
        layer.query_attention(x, 63)
    with pytest.raises(ValueError, match="expected one image, got a batch of 2"):
        layer.query_attention(x.expand(2, -1, -1, -1), 0)
