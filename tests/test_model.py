"""DLSN / GLA behaviour that needs no fixtures: any input size, precision, determinism, loading errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dlsn.models import DLSN, GLA, load_official, to_official
from dlsn.models import gla as gla_module
from dlsn.models.gla import number_of_buckets


def small_dlsn(scale: int = 2, **overrides) -> DLSN:
    options = dict(n_feats=16, n_resgroups=2, n_resblocks=1, chunk_size=16, n_hashes=2)
    return DLSN(scale, **(options | overrides))


@pytest.mark.parametrize("length, chunk, expected", [
    (0, 16, 1), (5, 16, 1), (16, 16, 2), (143, 16, 8), (1440, 32, 46), (4096, 16, 128), (2304, 128, 18),
])
def test_number_of_buckets(length, chunk, expected):
    assert number_of_buckets(length, chunk) == expected


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("height, width", [(1, 1), (5, 7), (11, 11), (9, 20)])
def test_dlsn_any_input_size_and_scale(scale, height, width):
    torch.manual_seed(0)
    model = small_dlsn(scale).eval()
    x = torch.rand(2, 3, height, width)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 3, height * scale, width * scale)
    assert torch.isfinite(y).all()


def test_invalid_scale_and_hyperparameters_are_named():
    with pytest.raises(ValueError, match="scale must be 3 or a power of two.*5"):
        DLSN(5, n_feats=8, n_resgroups=1, n_resblocks=1)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        GLA(8, chunk_size=0)
    with pytest.raises(ValueError, match=r"channels \(10\) must be divisible by reduction \(4\)"):
        GLA(10)


def _full_attention_reference(layer: GLA, x: torch.Tensor) -> torch.Tensor:
    """The documented rule for L < chunk_size: one chunk, every query sees every key."""
    batch, channels, height, width = x.shape
    length = height * width
    match = F.relu(layer.match_embedding(x)).flatten(2).transpose(1, 2)
    value = F.relu(layer.value_embedding(x)).flatten(2).transpose(1, 2)
    learned = layer.score_mlp(F.relu(layer.score_embedding(x)).flatten(2).transpose(1, 2))
    keys = F.normalize(match, dim=-1, eps=5e-5)
    scores = match @ keys.transpose(1, 2) + learned[..., :length].transpose(1, 2)
    out = torch.softmax(scores, dim=-1) @ value
    return x + layer.res_scale * out.transpose(1, 2).reshape(batch, channels, height, width)


@pytest.mark.parametrize("height, width", [(1, 1), (3, 4), (5, 5)])
def test_gla_below_one_chunk_is_full_attention(height, width):
    torch.manual_seed(1)
    layer = GLA(8, chunk_size=32, n_hashes=3, reduction=2, res_scale=0.5)
    x = torch.randn(2, 8, height, width)
    torch.testing.assert_close(layer(x), _full_attention_reference(layer, x))


def test_gla_gradients_flow_for_tiny_inputs():
    layer = GLA(8, chunk_size=16, n_hashes=2, reduction=2)
    x = torch.randn(1, 8, 2, 3, requires_grad=True)
    layer(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_gla_batch_items_are_independent():
    torch.manual_seed(2)
    layer = GLA(16, chunk_size=8, n_hashes=2)
    x = torch.randn(3, 16, 6, 9)
    rotations = torch.nn.init.orthogonal_(torch.empty(2, 4, number_of_buckets(54, 8)))
    together = layer(x, rotations)
    one_by_one = torch.cat([layer(x[i:i + 1], rotations) for i in range(3)])
    torch.testing.assert_close(together, one_by_one)


def test_rotations_argument_is_validated():
    layer = GLA(16, chunk_size=8, n_hashes=2)
    with pytest.raises(ValueError, match=r"rotations must have shape .*\[2, 4, 8\].*got \[2, 4, 3\]"):
        layer(torch.randn(1, 16, 8, 8), torch.randn(2, 4, 3))


def test_rotation_seed_makes_evaluation_deterministic_and_training_random():
    torch.manual_seed(3)
    model = small_dlsn().eval()
    x = torch.rand(1, 3, 12, 14)
    with torch.no_grad():
        model.set_rotation_seed(7)
        first = model(x)
        torch.manual_seed(123)  # the global RNG must not matter
        second = model(x)
        model.set_rotation_seed(8)
        other_seed = model(x)
        model.set_rotation_seed(None)
        fresh_a, fresh_b = model(x), model(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not torch.equal(first, other_seed)
    assert not torch.equal(fresh_a, fresh_b)
    seeds = [layer.rotation_seed for layer in model.attention_layers]
    assert seeds == [None, None]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_is_finite_and_close_to_float32(dtype):
    torch.manual_seed(4)
    model = small_dlsn().eval()
    model.set_rotation_seed(0)
    x = torch.rand(2, 3, 20, 18)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=dtype):
            low = model(x)
    assert torch.isfinite(low).all()
    assert (low.float() - reference).abs().max() < 0.05
    assert (low.float() - reference).abs().mean() < 0.005


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gla_softmax_runs_in_float32_under_autocast(monkeypatch, dtype):
    torch.manual_seed(5)
    layer = GLA(16, chunk_size=8, n_hashes=2)
    layer.rotation_seed = 0
    x = 300 * torch.randn(1, 16, 8, 8)  # large activations: scores in the thousands

    seen_dtypes = []
    original_logsumexp = torch.logsumexp

    def recording_logsumexp(tensor, *args, **kwargs):
        seen_dtypes.append(tensor.dtype)
        return original_logsumexp(tensor, *args, **kwargs)

    monkeypatch.setattr(torch, "logsumexp", recording_logsumexp)
    with torch.autocast("cpu", dtype=dtype):
        out = layer(x)
    assert seen_dtypes == [torch.float32] * layer.n_hashes
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_load_official_reports_every_problem():
    model = small_dlsn()
    state = to_official(model)
    broken = dict(state)
    del broken["head.0.weight"]
    broken["body.9.unknown"] = torch.zeros(1)
    broken["tail.1.weight"] = torch.zeros(3, 4, 3, 3)
    with pytest.raises(ValueError) as error:
        load_official(small_dlsn(), broken)
    message = str(error.value)
    assert "missing keys: head.0.weight" in message
    assert "unexpected keys: body.9.unknown" in message
    assert "tail.1.weight: shape [3, 4, 3, 3] in the file, [3, 16, 3, 3] expected" in message

    wrong_range = dict(state, **{"sub_mean.bias": 255 * state["sub_mean.bias"]})
    with pytest.raises(ValueError, match="sub_mean.bias does not match .*rgb_range=1.0"):
        load_official(small_dlsn(), wrong_range)


def test_load_official_across_scales_and_module_prefix():
    source = small_dlsn(scale=2)
    state = {f"module.{k}": v for k, v in to_official(source).items()}
    with pytest.raises(ValueError, match="tail.0.0.weight: shape"):
        load_official(small_dlsn(scale=3), state)
    target = load_official(small_dlsn(scale=3), state, skip_upsampler=True)
    torch.testing.assert_close(target.head.weight, source.head.weight)
    torch.testing.assert_close(target.reconstruction.weight, source.reconstruction.weight)


def test_model_follows_the_input_device_and_dtype():
    model = small_dlsn().to(torch.float64).eval()
    with torch.no_grad():
        y = model(torch.rand(1, 3, 9, 9, dtype=torch.float64))
    assert y.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_output_on_cpu_and_cuda_with_a_rotation_seed():
    torch.manual_seed(6)
    model = small_dlsn().eval()
    model.set_rotation_seed(11)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        cpu = model(x)
        gpu = model.to("cuda")(x.to("cuda")).cpu()
    torch.testing.assert_close(cpu, gpu, rtol=1e-4, atol=1e-4)


def test_fused_softmax_and_logsumexp_gradients():
    from dlsn.models.gla import softmax_and_logsumexp

    scores = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    weights, confidence = softmax_and_logsumexp(scores)
    torch.testing.assert_close(weights, torch.softmax(scores, dim=1))
    torch.testing.assert_close(confidence, torch.logsumexp(scores, dim=1, keepdim=True))
    assert torch.autograd.gradcheck(lambda s: softmax_and_logsumexp(s), (scores,))
    assert torch.autograd.gradcheck(lambda s: softmax_and_logsumexp(s)[1], (scores,))


def test_key_normalisation_has_autograds_gradient_with_fewer_operations():
    """normalize_keys: F.normalize's values and gradient, clamped rows (norm below eps) and a zero row
    included, through a hand-written backward (the host-bound batch-1 rows pay per kernel launch)."""
    from dlsn.models.gla import KEY_NORM_EPS, normalize_keys

    torch.manual_seed(0)
    match = torch.randn(2, 7, 5, dtype=torch.float64)
    match[0, 1] *= 1e-6  # norm below eps: divided by eps, no projection
    match[1, 2] = 0.0
    match.requires_grad_(True)
    expected = F.normalize(match, dim=-1, eps=KEY_NORM_EPS)
    assert torch.equal(normalize_keys(match), expected)
    grad = torch.randn_like(match)
    torch.testing.assert_close(torch.autograd.grad(normalize_keys(match), match, grad)[0],
                               torch.autograd.grad(expected, match, grad)[0], rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(normalize_keys, (match,))
    with torch.no_grad():  # no autograd: F.normalize itself
        assert torch.equal(normalize_keys(match), expected)


@pytest.mark.parametrize("attention_impl", ["reference", "fused"])
def test_rounds_are_mixed_alike_with_and_without_autograd(attention_impl):
    """Training mixes the rounds with one product and one sum over an [N, T, L, C] tensor, inference in
    place round by round (no such temporary): the same output to float32 rounding."""
    torch.manual_seed(0)
    layer = GLA(16, chunk_size=8, n_hashes=3, attention_impl=attention_impl)
    layer.rotation_seed = 0
    x = torch.randn(2, 16, 6, 7)
    with torch.no_grad():
        inference = layer(x)
    training = layer(x.requires_grad_(True))
    assert training.requires_grad
    torch.testing.assert_close(training.detach(), inference, rtol=1e-6, atol=1e-6)


def test_keep_freed_memory_is_applied_on_linux():
    import platform
    import sys

    from dlsn.models.allocator import keep_freed_memory

    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() == glibc


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hash_codes_ignore_autocast(dtype):
    from dlsn.models.gla import hash_codes

    torch.manual_seed(9)
    match = torch.randn(2, 500, 8)
    rotations = torch.nn.init.orthogonal_(torch.empty(3, 8, 64))
    reference = hash_codes(match, rotations)
    with torch.autocast("cpu", dtype=dtype):
        assert torch.equal(hash_codes(match, rotations), reference)
        low_precision = torch.einsum("nld,tdb->ntlb", match, rotations).argmax(dim=-1)
    assert not torch.equal(low_precision, reference)  # what the float32 guard prevents


@pytest.mark.parametrize("batch", [1, 2])
def test_cpu_inference_in_blocks_of_chunks_gives_the_same_output(monkeypatch, batch):
    # 16x12 with k=8 gives 24 chunks per round. Budget 4000 bytes: blocks of 5 chunks and a shorter
    # last one at batch 1, of 2 chunks at batch 2; budget 1 byte: one chunk per block.
    torch.manual_seed(0)
    layer = GLA(8, chunk_size=8, n_hashes=2, reduction=2)
    layer.rotation_seed = 3
    x = torch.randn(batch, 8, 16, 12)
    block_sizes = []  # chunks x batch items per softmax call
    original = gla_module.softmax_and_logsumexp
    monkeypatch.setattr(gla_module, "softmax_and_logsumexp",
                        lambda scores: block_sizes.append(scores.shape[0]) or original(scores))

    with torch.no_grad():
        whole = layer(x)
        assert block_sizes == [batch * 24] * 2  # default budget: one block per round here
        for budget, expected in ((4000, [5, 5, 5, 5, 4] if batch == 1 else [4] * 12), (1, [batch] * 24)):
            monkeypatch.setattr(gla_module, "CPU_BLOCK_BYTES", budget)
            block_sizes.clear()
            torch.testing.assert_close(layer(x), whole, rtol=1e-5, atol=1e-6)
            assert block_sizes == expected * 2

    block_sizes.clear()
    layer(x)  # training (autograd on): one block per round, blocks would not save memory there
    assert block_sizes == [batch * 24] * 2



def peak_live_bytes(function) -> int:
    """Largest number of bytes of tensors created by ``function`` alive at once (the profiler's memory
    timeline on the CPU; what ``torch.cuda.max_memory_allocated`` measures on a GPU)."""
    import json
    import tempfile
    import warnings
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        function()
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of a CUDA-only recorder
        path = Path(folder) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    return max(map(sum, sizes)) - sum(sizes[0])  # the first sample: what existed before


def test_inference_frees_the_embeddings_before_mixing_the_rounds(monkeypatch):
    """The fused path's inference peak (whole images on a GPU: issue 9's 360x360 memory target), on the CPU.

    The kernel is replaced by a stand-in that allocates exactly its outputs (attended values of every
    round, [N, T, L, C] float32, and confidences): the kernel itself allocates nothing else. In units of
    the input's size M, here 6.1 M: the embeddings (about 3 M) and the kernel's output (3 M) are alive
    together. The rounds' mixing (weighted sum and layer output, 2 M) must come after the embeddings
    are freed: before the fix it came with them, 8.2 M."""
    def kernel_outputs(queries, keys, learned_score, values, order, inverse, fallback=False):
        batch, rounds, length = inverse.shape
        return (values.new_zeros(batch, rounds, length, values.shape[-1], dtype=torch.float32),
                values.new_zeros(batch, rounds, length, dtype=torch.float32))

    monkeypatch.setattr(gla_module.fused, "chunk_attention", kernel_outputs)
    monkeypatch.setattr(GLA, "_uses_fused_kernel", lambda self, value: True)
    torch.manual_seed(0)
    # The paper layer's proportions at 360x360 (C=256, k=128, 128 buckets): learned scores k/C = 0.5 M,
    # hash projections 3 x buckets / C = 1.5 M, and a map much larger than the weights.
    layer = GLA(128, chunk_size=64, n_hashes=3).eval()  # 64x64: 64 chunks, 64 buckets
    layer.rotation_seed = 0
    x = torch.randn(1, 128, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        peak = peak_live_bytes(lambda: layer(x))
    assert peak <= 6.5 * x.numel() * x.element_size(), peak / (x.numel() * x.element_size())


# ------------------------------------------------------------------ rotations drawn on the device

@pytest.mark.parametrize("dim, n_buckets", [(8, 8), (64, 18), (16, 46), (64, 128), (4, 1)])
def test_orthonormal_columns_is_the_q_of_orthogonal_init(dim, n_buckets):
    """Given the same Gaussian draw, the Cholesky-QR result equals nn.init.orthogonal_'s matrix."""
    from dlsn.models.gla import orthonormal_columns

    expected = torch.nn.init.orthogonal_(torch.empty(dim, n_buckets), generator=torch.Generator().manual_seed(5))
    gaussian = torch.empty(dim, n_buckets).normal_(0, 1, generator=torch.Generator().manual_seed(5))
    if dim < n_buckets:  # orthogonal_ orthonormalises the rows of a wide matrix
        torch.testing.assert_close(orthonormal_columns(gaussian.T).T, expected, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(orthonormal_columns(gaussian), expected, rtol=1e-5, atol=1e-5)


def test_orthonormal_columns_survives_nearly_dependent_columns():
    from dlsn.models.gla import orthonormal_columns

    torch.manual_seed(0)
    matrix = torch.randn(2, 64, 64, dtype=torch.float64)
    matrix[:, :, 1] = matrix[:, :, 0] + 1e-10 * torch.randn(2, 64, dtype=torch.float64)  # condition ~1e11
    q = orthonormal_columns(matrix)
    torch.testing.assert_close(q.mT @ q, torch.eye(64, dtype=torch.float64).expand(2, -1, -1), rtol=0, atol=1e-10)
    # still the QR factor: q^T matrix is upper triangular with a positive diagonal
    r = q.mT @ matrix
    assert torch.tril(r, diagonal=-1).abs().max() < 1e-8 and (torch.diagonal(r, dim1=-2, dim2=-1) > 0).all()


@pytest.mark.parametrize("dim, n_buckets", [(8, 5), (4, 12)])
def test_rotations_drawn_on_the_device_are_orthonormal_and_random(dim, n_buckets):
    from dlsn.models.gla import draw_rotations_on_device

    torch.manual_seed(11)
    rotations = draw_rotations_on_device(3, dim, n_buckets, device="cpu")
    assert rotations.shape == (3, dim, n_buckets) and rotations.dtype == torch.float32
    gram = rotations.mT @ rotations if dim >= n_buckets else rotations @ rotations.mT
    torch.testing.assert_close(gram, torch.eye(min(dim, n_buckets)).expand(3, -1, -1), rtol=0, atol=1e-5)
    assert not torch.equal(rotations, draw_rotations_on_device(3, dim, n_buckets, device="cpu"))
    torch.manual_seed(11)
    assert torch.equal(rotations, draw_rotations_on_device(3, dim, n_buckets, device="cpu"))

    # Uniform (Haar) orthonormal frames: every entry has mean 0 and variance 1 / max(dim, n_buckets),
    # like nn.init.orthogonal_'s. 4000 draws: standard errors about 0.004 and 2%.
    many = draw_rotations_on_device(4000, dim, n_buckets, device="cpu")
    assert many.mean(0).abs().max() < 0.02
    variance = many.square().mean(0) * max(dim, n_buckets)
    assert (variance - 1).abs().max() < 0.1
    signs = many[:, 0, 0] > 0  # no sign convention leaks into the distribution
    assert 0.45 < signs.float().mean() < 0.55


def test_gla_draws_training_rotations_on_the_cpu_like_the_published_code(monkeypatch):
    """CPU inputs without a seed: nn.init.orthogonal_ from the global generator (the fixtures rely on it)."""
    from dlsn.models import gla as gla_module

    monkeypatch.setattr(gla_module, "draw_rotations_on_device",
                        lambda *args, **kwargs: pytest.fail("device draw used for a CPU input"))
    layer = GLA(8, chunk_size=4, n_hashes=2, reduction=2)
    torch.manual_seed(3)
    first = layer(torch.ones(1, 8, 4, 4))
    torch.manual_seed(3)
    torch.testing.assert_close(layer(torch.ones(1, 8, 4, 4)), first, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_rotations_need_no_host_synchronisation_and_can_be_graphed(monkeypatch):
    from dlsn.models import gla as gla_module
    from dlsn.models.gla import draw_rotations_on_device

    monkeypatch.setattr(gla_module, "draw_rotations", lambda *args, **kwargs: pytest.fail("CPU draw used"))
    GLA(8, chunk_size=4, n_hashes=2, reduction=2).cuda()(torch.randn(1, 8, 4, 4, device="cuda"))
    draw_rotations_on_device(3, 64, 18, device="cuda")  # warm-up (cuSOLVER handles, workspaces)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rotations = draw_rotations_on_device(3, 64, 18, device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        graphed = draw_rotations_on_device(3, 64, 18, device="cuda")
    graph.replay()
    torch.cuda.synchronize()
    eye = torch.eye(18, device="cuda").expand(3, -1, -1)
    torch.testing.assert_close(rotations.mT @ rotations, eye, rtol=0, atol=1e-5)
    torch.testing.assert_close(graphed.mT @ graphed, eye, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ the float32 match convolution

@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_convolution_equals_conv2d(memory_format, dtype):
    from dlsn.models import float32_ops
    from dlsn.models.float32_ops import conv2d_float32

    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 7).to(dtype).contiguous(memory_format=memory_format).requires_grad_(True)
    weight = torch.randn(3, 6, 3, 3, requires_grad=True)
    bias = torch.randn(3, requires_grad=True)
    output = conv2d_float32(x, weight, bias, 1)
    assert output.dtype == torch.float32 and output.is_contiguous(memory_format=memory_format)
    grad_output = torch.randn_like(output)
    grads = torch.autograd.grad(output, (x, weight, bias), grad_output)

    x32 = x.detach().float().requires_grad_(True)
    expected = F.conv2d(x32, weight, bias, padding=1)
    expected_grads = torch.autograd.grad(expected, (x32, weight, bias), grad_output)
    torch.testing.assert_close(output, expected, rtol=1e-6, atol=1e-6)
    assert grads[0].dtype == dtype
    for got, want in zip(grads, expected_grads):  # the input's gradient in the input's dtype
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-6, atol=1e-6)
    torch.library.opcheck(float32_ops.conv2d_float32_op, (x, weight, bias, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # true float32 under autocast too (was bfloat16)
        for convolve in (conv2d_float32, float32_ops.conv2d_float32_op):
            torch.testing.assert_close(convolve(x, weight, bias, 1), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hash_projections_are_a_float32_einsum(dtype):
    from dlsn.models.float32_ops import projections_float32

    torch.manual_seed(0)
    match, rotations = torch.randn(2, 30, 8).to(dtype), torch.randn(3, 8, 5)
    projections = projections_float32(match, rotations)
    assert projections.dtype == torch.float32 and projections.is_contiguous()
    torch.testing.assert_close(projections, torch.einsum("nld,tdb->ntlb", match.float(), rotations),
                               rtol=1e-6, atol=1e-6)
    torch.library.opcheck(projections_float32, (match, rotations))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hash_projections_ignore_tf32_matmuls_on_cuda():
    from dlsn.models.float32_ops import projections_float32

    torch.manual_seed(0)
    match = torch.randn(2, 500, 64, device="cuda", dtype=torch.float64)
    rotations = torch.randn(3, 64, 128, device="cuda", dtype=torch.float64)
    exact = torch.einsum("nld,tdb->ntlb", match, rotations)
    torch.set_float32_matmul_precision("high")
    try:
        error = (projections_float32(match.float(), rotations.float()).double() - exact).abs().max()
        tf32_error = (torch.einsum("nld,tdb->ntlb", match.float(), rotations.float()).double() - exact).abs().max()
        assert torch.get_float32_matmul_precision() == "high"  # restored
    finally:
        torch.set_float32_matmul_precision("highest")
    assert error < 1e-4 and (tf32_error > 1e-3 or torch.cuda.get_device_capability() < (8, 0))


def test_cudnn_tf32_setting_is_forced_and_restored_per_operation():
    """The match convolution's TF32 switch (no GPU needed: it sets cuDNN's per-operation flag)."""
    from dlsn.models.float32_ops import _cudnn_tf32

    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    try:
        conv.fp32_precision = "tf32"
        with _cudnn_tf32(torch.device("cuda"), enabled=False):
            assert conv.fp32_precision == "ieee"
            with _cudnn_tf32(torch.device("cuda"), enabled=True):
                assert conv.fp32_precision == "tf32"
            assert conv.fp32_precision == "ieee"
        assert conv.fp32_precision == "tf32"
        with _cudnn_tf32(torch.device("cpu"), enabled=False):  # nothing to switch on the CPU
            assert conv.fp32_precision == "tf32"
    finally:
        conv.fp32_precision = before


def test_cudnn_tf32_setting_is_forced_and_read_through_the_legacy_switch_before_torch_2_9(monkeypatch):
    """Without the per-operation setting (torch < 2.9), the switch and its reading go through cudnn.allow_tf32."""
    from dlsn.models.float32_ops import _cudnn_tf32, cudnn_tf32_allowed

    monkeypatch.setattr(torch.backends.cudnn, "conv", None, raising=False)  # as torch < 2.9 has none
    before = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        with _cudnn_tf32(torch.device("cuda"), enabled=False):
            assert torch.backends.cudnn.allow_tf32 is False and not cudnn_tf32_allowed()
        assert torch.backends.cudnn.allow_tf32 is True and cudnn_tf32_allowed()
    finally:
        torch.backends.cudnn.allow_tf32 = before


def test_tf32_split_is_exact_with_a_tf32_representable_high_part():
    from dlsn.models.float32_ops import tf32_split

    torch.manual_seed(0)
    x = (torch.randn(2, 8, 5, 7) * torch.logspace(-6, 6, 7)).contiguous(memory_format=torch.channels_last)
    high, low = tf32_split(x)
    assert torch.equal(high + low, x)  # the remainder is exact in float32
    assert (high.view(torch.int32) & 0x1FFF).eq(0).all()  # 10 mantissa bits: what TF32 keeps
    assert (low.abs() <= x.abs() * 2.0 ** -11).all()  # rounded to nearest, not truncated
    assert high.is_contiguous(memory_format=torch.channels_last)


def test_split_tf32_convolution_is_as_accurate_as_float32():
    """With every convolution's operands rounded to TF32 (what tensor cores do), the split products
    stay at float32's own error against float64, where one TF32 convolution is ~200x worse."""
    from dlsn.models.float32_ops import split_tf32_conv2d, tf32_split

    def tf32_conv2d(input, weight, bias, padding):
        return F.conv2d(tf32_split(input)[0], tf32_split(weight)[0], bias, padding=padding)

    torch.manual_seed(0)
    x = torch.relu(torch.randn(2, 256, 16, 16)).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(64, 256, 3, 3) / 48, torch.randn(64) / 10
    exact = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    output = split_tf32_conv2d(x, weight, bias, 1, conv2d=tf32_conv2d)
    assert output.is_contiguous(memory_format=torch.channels_last)

    def error(tensor):
        return (tensor.double() - exact).abs().max().item()

    float32_error = error(F.conv2d(x, weight, bias, padding=1))
    assert error(output) <= 2 * float32_error
    assert error(tf32_conv2d(x, weight, bias, 1)) > 50 * float32_error  # the test can tell TF32 apart


def _bits(tensor):
    return tensor.contiguous().view(torch.int32)


def test_the_split_kernel_gives_the_formulas_halves_bitwise(monkeypatch):
    """The one-pass split (Triton's interpreter here) against the PyTorch formula: same bits, same layout,
    over full blocks and a partial last one, for zeros, subnormals, huge values, infinities and NaN."""
    from dlsn.models import float32_ops

    monkeypatch.setattr(float32_ops, "SPLIT_BLOCK", 64)  # 2 * 7 * 5 * 9 = 630 elements: 9 full blocks and 54
    torch.manual_seed(0)
    x = (torch.randn(2, 7, 5, 9) * torch.logspace(-30, 30, 9)).contiguous(memory_format=torch.channels_last)
    x.permute(0, 2, 3, 1)[0, 0, 0] = torch.tensor([0.0, -0.0, 1e-40, -3.3e38, float("inf"), float("nan"), 1.0])
    for tensor in (x, x.contiguous()):  # activations (channels-last) and weights (contiguous)
        high, low = float32_ops.tf32_split_fused(tensor)
        expected_high, expected_low = float32_ops.tf32_split(tensor)
        assert torch.equal(_bits(high), _bits(expected_high)) and torch.equal(_bits(low), _bits(expected_low))
        assert high.stride() == low.stride() == tensor.stride()
    with pytest.raises(ValueError, match="dense float32.*float64"):
        float32_ops.tf32_split_fused(x.double())


def test_the_split_convolutions_kernels_give_the_formulas_output_bitwise(monkeypatch):
    """``split_tf32_conv2d`` with its kernels (split of x and w, sum of the products with the bias) and with
    the PyTorch formulas: bitwise the same. A contiguous input gives contiguous products, which the
    formula sums."""
    from dlsn.models import float32_ops

    calls = []
    for name in ("tf32_split_fused", "split_products_sum_fused"):
        kernel = getattr(float32_ops, name)
        monkeypatch.setattr(float32_ops, name, lambda *tensors, kernel=kernel, name=name: calls.append(name)
                            or kernel(*tensors))
    monkeypatch.setattr(float32_ops, "SUM_BLOCK_ROWS", 8)  # 2 * 11 * 13 = 286 rows: a partial last block
    torch.manual_seed(0)
    x = torch.relu(torch.randn(2, 8, 11, 13)).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(12, 8, 3, 3) / 10, torch.randn(12)  # 12 channels: masked columns of 16
    expected = float32_ops.split_tf32_conv2d(x, weight, bias, 1, kernels=False)
    assert not calls
    output = float32_ops.split_tf32_conv2d(x, weight, bias, 1, kernels=True)
    assert calls == ["tf32_split_fused", "tf32_split_fused", "split_products_sum_fused"]
    assert torch.equal(output, expected) and output.is_contiguous(memory_format=torch.channels_last)
    assert (output - F.conv2d(x, weight, bias, padding=1)).abs().max() < 1e-5
    calls.clear()
    assert torch.equal(float32_ops.split_tf32_conv2d(x.contiguous(), weight, bias, 1, kernels=True), expected)
    assert calls == ["tf32_split_fused", "tf32_split_fused"]
    with pytest.raises(ValueError, match=r"channels-last float32.*\(2, 24, 11, 13\), \(2, 12, 11, 13\) and \(12,\)"
                                         r"; high_products: torch.float32, strides \(3432, 143, 13, 1\)"):
        float32_ops.split_products_sum_fused(torch.zeros(2, 24, 11, 13), torch.zeros(2, 12, 11, 13), bias)
    high, low = (torch.zeros(2, channels, 11, 13).contiguous(memory_format=torch.channels_last) for channels in (24, 12))
    with pytest.raises(ValueError, match=r"a \[C\] bias, got .* and \(13,\)$"):
        float32_ops.split_products_sum_fused(high, low, torch.zeros(13))


def test_a_failing_split_kernel_is_given_up_with_one_warning(monkeypatch):
    from dlsn.models import float32_ops

    def broken(*tensors):
        raise RuntimeError("no kernel today")

    monkeypatch.setattr(float32_ops, "_failure", None)
    monkeypatch.setattr(float32_ops, "split_kernels_usable", lambda tensor: float32_ops._failure is None)
    monkeypatch.setattr(float32_ops, "tf32_split_fused", broken)
    torch.manual_seed(0)
    x = torch.randn(1, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(3, 4, 3, 3), torch.randn(3)
    expected = float32_ops.split_tf32_conv2d(x, weight, bias, 1, kernels=False)
    with pytest.raises(RuntimeError, match="no kernel today"):  # asked for explicitly: no fallback
        float32_ops.split_tf32_conv2d(x, weight, bias, 1, kernels=True)
    assert float32_ops.split_kernel_failure() is None
    with pytest.warns(RuntimeWarning, match="split float32 convolution's kernels failed.*no kernel today"):
        assert torch.equal(float32_ops.split_tf32_conv2d(x, weight, bias, 1), expected)
    assert "no kernel today" in float32_ops.split_kernel_failure()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert torch.equal(float32_ops.split_tf32_conv2d(x, weight, bias, 1), expected)


@pytest.mark.parametrize("arch", [80, 90])
def test_the_split_kernels_compile_for_gpus_with_vector_accesses(arch):
    """Both kernels for sm_80 and sm_90 at the match convolution's 64 channels, as launched on CUDA: 16-byte
    loads and stores (they are bound by memory)."""
    pytest.importorskip("triton.backends.nvidia")
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dlsn.models import chunk_attention, float32_ops

    for function, constants in ((float32_ops._tf32_split_kernel, dict(BLOCK=float32_ops.SPLIT_BLOCK)),
                                (float32_ops._split_products_sum_kernel,
                                 dict(BLOCK_R=float32_ops.SUM_BLOCK_ROWS, BLOCK_C=64))):
        kernel = chunk_attention._kernel(function, False)
        signature = {name: "constexpr" if name in constants else "*fp32" if name.isupper() else "i32"
                     for name in kernel.arg_names}
        # Pointers 16-byte aligned and the channel count (64) divisible by 16, as the JIT specialises them.
        attributes = {(index,): [["tt.divisibility", 16]] for index, name in enumerate(kernel.arg_names)
                      if name not in constants and (name.isupper() or name == "channels")}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attributes),
                                  target=GPUTarget("cuda", arch, 32), options=dict(num_warps=float32_ops.SPLIT_WARPS))
        ptx = compiled.asm["ptx"]
        assert re.search(r"ld\.global(\.\w+)*\.v4", ptx) and re.search(r"st\.global(\.\w+)*\.v4", ptx), function.__name__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["ieee", "split_tf32"])
def test_float32_convolution_ignores_tf32_on_cuda(monkeypatch, method):
    from dlsn.models import float32_ops
    from dlsn.models.float32_ops import conv2d_float32

    monkeypatch.setattr(float32_ops, "FLOAT32_CONV_METHOD", method)
    torch.manual_seed(0)
    x = torch.randn(2, 64, 24, 24, device="cuda", dtype=torch.float64)
    weight = torch.randn(16, 64, 3, 3, device="cuda", dtype=torch.float64) / 24
    bias = torch.zeros(16, device="cuda", dtype=torch.float64)
    exact = F.conv2d(x, weight, bias, padding=1)
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        error = (conv2d_float32(x.float(), weight.float(), bias.float(), 1).double() - exact).abs().max()
        tf32_error = (F.conv2d(x.float(), weight.float(), bias.float(), padding=1).double() - exact).abs().max()
        assert torch.backends.cudnn.allow_tf32  # restored
    finally:
        torch.backends.cudnn.allow_tf32 = previous
    assert error < 1e-4 and (tf32_error > 1e-4 or torch.cuda.get_device_capability() < (8, 0))


# ------------------------------------------------------------------ the embeddings as one autograd node

def _separate_relu_convolutions(x, weight, bias, sizes):
    """What relu_convolution_groups replaces: one convolution and ReLU per group."""
    return [torch.relu(F.conv2d(x, w, b, padding=1)) for w, b in zip(weight.split(sizes), bias.split(sizes))]


@pytest.mark.parametrize("first_in_float32", [False, True])
def test_relu_convolution_groups_equal_separate_convolutions(first_in_float32):
    """Outputs and gradients (input, stacked weight and bias) of the one node against a convolution and a ReLU
    per group, with one group left without a gradient (its share is zeros, not left unset), at channel
    counts whose ReLU masks differ per group; the outputs keep the input's channels-last layout."""
    from dlsn.models import float32_ops

    torch.manual_seed(0)
    sizes = [3, 5, 4]
    x = torch.randn(2, 6, 7, 9).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    weight = torch.randn(sum(sizes), 6, 3, 3, requires_grad=True)
    bias = torch.randn(sum(sizes), requires_grad=True)
    groups = float32_ops.relu_convolution_groups(x, weight, bias, sizes, padding=1, first_in_float32=first_in_float32)
    expected = _separate_relu_convolutions(x, weight, bias, sizes)
    assert [tuple(group.shape) for group in groups] == [(2, size, 7, 9) for size in sizes]
    assert all(group.stride(1) == 1 for group in groups)  # channels-last memory: [N, L, D] tokens are views
    for group, want in zip(groups, expected):
        torch.testing.assert_close(group, want, rtol=1e-6, atol=1e-6)
    grad_outputs = [torch.randn_like(group) for group in groups]
    for used in ([0, 1, 2], [0, 2], [1]):
        loss = sum((groups[i] * grad_outputs[i]).sum() for i in used)
        want_loss = sum((expected[i] * grad_outputs[i]).sum() for i in used)
        grads = torch.autograd.grad(loss, (x, weight, bias), retain_graph=True)
        want = torch.autograd.grad(want_loss, (x, weight, bias), retain_graph=True)
        for got, reference in zip(grads, want):
            torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    if not first_in_float32:  # the float32 convolution computes in float32, not in float64
        x64, weight64, bias64 = (t.detach().double().requires_grad_(True) for t in (x, weight, bias))
        assert torch.autograd.gradcheck(
            lambda *args: float32_ops.relu_convolution_groups(*args, sizes, padding=1, first_in_float32=False),
            (x64, weight64, bias64))
    with pytest.raises(ValueError, match=r"sizes \[3, 5\] must add up to the weight's 12 output channels"):
        float32_ops.relu_convolution_groups(x, weight, bias, [3, 5], padding=1, first_in_float32=first_in_float32)
    if first_in_float32:
        with pytest.raises(ValueError, match=r"first_in_float32 needs at least two groups, got sizes \[12\]"):
            float32_ops.relu_convolution_groups(x, weight, bias, [12], padding=1, first_in_float32=True)


class _DispatchCount(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name, self.count = name, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ == self.name
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("match_apart", [False, True])
def test_gla_training_runs_one_backward_convolution_for_its_embeddings(monkeypatch, match_apart):
    """In training GLA's three embeddings are one autograd node: its backward runs one convolution backward
    where the separate nodes ran two with the match convolution apart (as on CUDA), and gives the same
    output and gradients (on the CPU, where the match convolution joins the others, bitwise the same)."""
    from dlsn.models import float32_ops

    monkeypatch.setattr(float32_ops, "match_convolution_apart", lambda x: match_apart)
    torch.manual_seed(0)
    layer = GLA(16, chunk_size=8, n_hashes=2, attention_impl="reference")
    x = torch.randn(2, 16, 10, 12).requires_grad_(True)
    rotations = torch.randn(2, 4, number_of_buckets(120, 8))
    weights = torch.linspace(-1, 1, x.numel()).view_as(x)

    def forward_backward():
        output = layer(x, rotations)
        counter = _DispatchCount("convolution_backward")
        with counter:
            grads = torch.autograd.grad((output * weights).sum(), [x, *layer.parameters()])
        return output, grads, counter.count

    output, grads, backward_convolutions = forward_backward()
    monkeypatch.setattr(float32_ops, "relu_convolutions_in_one_node", lambda *tensors: False)
    separate_output, separate_grads, separate_backward_convolutions = forward_backward()
    assert (backward_convolutions, separate_backward_convolutions) == (1, 2 if match_apart else 1)
    if match_apart:
        torch.testing.assert_close(output, separate_output, rtol=0, atol=0)
        for got, want in zip(grads, separate_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(output, separate_output) and all(map(torch.equal, grads, separate_grads))


def test_embeddings_are_one_node_only_in_eager_training_without_autocast():
    from dlsn.models import float32_ops

    x = torch.randn(1, 4, 3, 3)
    weight = torch.randn(4, 4, 3, 3, requires_grad=True)
    assert float32_ops.relu_convolutions_in_one_node(x, weight)
    assert float32_ops.relu_convolutions_in_one_node(x.double(), weight.double())  # the CPU in any dtype
    assert not float32_ops.relu_convolutions_in_one_node(x, weight.detach())  # nothing needs a gradient
    with torch.no_grad():
        assert not float32_ops.relu_convolutions_in_one_node(x, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not float32_ops.relu_convolutions_in_one_node(x, weight)
        assert float32_ops.match_convolution_apart(x)
    assert not float32_ops.match_convolution_apart(x)
    if torch.cuda.is_available():
        cuda_x = x.cuda()
        assert float32_ops.match_convolution_apart(cuda_x)
        assert float32_ops.relu_convolutions_in_one_node(cuda_x, weight.cuda())
        assert not float32_ops.relu_convolutions_in_one_node(cuda_x.double(), weight.cuda().double())


# ------------------------------------------------------------------ torch.compile

@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("attention_impl", ["auto", "reference", "fused"])
def test_gla_traces_into_one_graph(autocast, attention_impl):
    """No graph breaks, so torch.compile (and CUDA graphs) get the whole layer: the float32 convolution
    and the fused attention are custom ops, everything else plain tensor code."""
    from dlsn.models import chunk_attention

    if attention_impl == "fused" and not chunk_attention.triton_available():
        pytest.skip("triton is not importable")
    torch.manual_seed(0)
    layer = GLA(16, chunk_size=8, n_hashes=2, reduction=2, attention_impl=attention_impl)
    x = torch.randn(2, 16, 6, 7, requires_grad=True)
    rotations = torch.nn.init.orthogonal_(torch.empty(2, 8, number_of_buckets(42, 8)))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        explanation = torch._dynamo.explain(layer)(x, rotations)
        explanation_training = torch._dynamo.explain(layer)(x)  # rotations drawn inside
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    assert explanation_training.graph_break_count == 0, explanation_training.break_reasons


@pytest.mark.slow
def test_compiled_gla_matches_eager():
    """Output, input and parameter gradients of torch.compile(GLA) (inductor) and eager GLA: equal in
    float32. Under bfloat16 autocast the outputs agree to the rounding noise (the gradients of this
    tiny random layer differ from float32 by 10-50% in bfloat16, eager or compiled alike)."""
    torch.manual_seed(0)
    layer = GLA(16, chunk_size=8, n_hashes=2, reduction=2)
    x = torch.randn(2, 16, 6, 7)
    rotations = torch.nn.init.orthogonal_(torch.empty(2, 8, number_of_buckets(42, 8)))
    compiled = torch.compile(layer, fullgraph=True)
    for autocast in (False, True):
        results = []
        for forward in (layer, compiled):
            x_grad = x.clone().requires_grad_(True)
            layer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                output = forward(x_grad, rotations)
            output.float().square().sum().backward()
            results.append([output.detach().float(), x_grad.grad] + [p.grad for p in layer.parameters()])
        for got, want in zip(*results):
            if not autocast:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        if autocast:
            torch.testing.assert_close(results[1][0], results[0][0], rtol=0.01, atol=0.01)


def test_dlsn_runs_channels_last_end_to_end():
    """Every convolution sees channels-last weights and inputs (no layout conversions on GPUs); the
    output is NCHW, and the numbers do not depend on the input's layout."""
    torch.manual_seed(0)
    model = small_dlsn().eval()
    model.set_rotation_seed(0)
    layouts = []

    def record(module, inputs, output):
        layouts.append((inputs[0].is_contiguous(memory_format=torch.channels_last),
                        module.weight.is_contiguous(memory_format=torch.channels_last)))

    for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d)):
        conv.register_forward_hook(record)
    x = torch.rand(2, 3, 9, 10)
    with torch.no_grad():
        output = model(x)
        from_channels_last = model(x.contiguous(memory_format=torch.channels_last))
    assert layouts and all(inputs and weights for inputs, weights in layouts)
    assert output.is_contiguous()
    torch.testing.assert_close(output, from_channels_last, rtol=0, atol=0)
    state = load_official(small_dlsn(), to_official(model)).state_dict()  # loading keeps the layout
    assert state["head.weight"].is_contiguous(memory_format=torch.channels_last)
