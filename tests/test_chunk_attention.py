"""The fused chunk-attention kernel (dlsn/models/chunk_attention.py) against the reference paths.

On the CPU the Triton kernels run in Triton's interpreter: exact semantics, but slow, so problems
are tiny; the fixture cases are marked slow. On a CUDA machine the same tests also run compiled.
"""

from __future__ import annotations

import itertools
import types
import warnings
from pathlib import Path

import pytest
import torch

from dlsn.models import GLA, load_official
from dlsn.models import chunk_attention as fused
from dlsn.models.gla import number_of_buckets
from tests.helpers.gpu_compile import SHARED_MEMORY_LIMIT, register_spill_bytes, triton_compile

pytestmark = pytest.mark.skipif(not fused.triton_available(),
                                reason="triton is not importable (pip install the dev extra on Linux x86-64)")
FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "official_dlsn"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_problem(batch, rounds, length, chunk, qk_dim, v_dim, *, seed=0, dtype=torch.float32, device="cpu"):
    """Random inputs of the op, with strided views as GLA passes them and a valid padded ``order``."""
    generator = torch.Generator().manual_seed(seed)

    def random(*shape):
        return torch.randn(*shape, generator=generator)

    queries = random(batch, length, qk_dim)
    keys = torch.nn.functional.normalize(random(batch, length, qk_dim), dim=-1)
    learned_score = random(batch, length, chunk + 2)[..., :chunk]  # a view, like fc(u)[..., :chunk]
    values = random(batch, length, 2 * v_dim)[..., v_dim:]  # a view, like a split of the stacked conv
    order = torch.stack([torch.stack([torch.randperm(length, generator=generator) for _ in range(rounds)])
                         for _ in range(batch)])
    inverse = torch.empty_like(order).scatter_(2, order, torch.arange(length).expand_as(order).contiguous())
    padding = -length % chunk
    order = torch.cat([order, order[..., length - padding:]], dim=-1)
    tensors = [t.to(device=device, dtype=dtype) for t in (queries, keys, learned_score, values)]
    return tensors, order.to(device), inverse.to(device)


SHAPES = {  # batch, rounds, length, chunk, qk_dim, v_dim
    "padding, 3 chunks": (2, 2, 37, 16, 8, 12),
    "exact multiple": (1, 3, 48, 16, 4, 8),
    "two chunks (neighbours coincide)": (1, 2, 20, 10, 4, 6),
    "one chunk": (2, 1, 9, 9, 4, 4),
    "one position": (1, 2, 1, 1, 2, 3),
    "chunk over several blocks": (1, 1, 150, 40, 5, 20),
    # every kernel's rows (at most 64 in LAUNCH_CONFIGS) split the chunk, the last block half masked
    "chunk over several 64-row blocks": (1, 2, 200, 80, 6, 20),
}


def test_reference_backward_is_the_gradient_of_the_reference():
    """The written-out backward (the fallback) against autograd, in float64."""
    inputs, order, inverse = random_problem(2, 2, 37, 8, 4, 6, dtype=torch.float64)
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    attended, confidence = fused.chunk_attention_reference(*inputs, order, inverse)
    grad_attended, grad_confidence = torch.randn_like(attended), torch.randn_like(confidence)
    expected = torch.autograd.grad((attended * grad_attended).sum() + (confidence * grad_confidence).sum(), inputs)
    written_out = fused.chunk_attention_reference_backward(grad_attended, grad_confidence, *inputs, order, inverse)
    for got, want in zip(written_out, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.fixture(params=fused.BACKWARD_MODES)
def backward_mode(request, monkeypatch):
    """Each way of computing dQ, on every GPU generation (the interpreter runs generation 90's)."""
    monkeypatch.setattr(fused, "BACKWARD_MODE", dict.fromkeys(fused.BACKWARD_MODE, request.param))
    return request.param


# The largest shape takes 6-11 s per backward mode in the interpreter: with the slow tests (which CI runs too).
SLOW_SHAPES = {"chunk over several 64-row blocks"}
SHAPE_PARAMS = [pytest.param(shape, id=name, marks=[pytest.mark.slow] if name in SLOW_SHAPES else [])
                for name, shape in SHAPES.items()]


def assert_op_matches_reference(inputs, order, inverse, grad_tolerance: float = 1e-4) -> None:
    """chunk_attention's float32 outputs to 1e-4 of the float64 reference's, and its gradients (from random
    incoming gradients of both outputs) to ``grad_tolerance``, relative, and absolute of each one's largest entry
    (at least 1)."""
    fused_inputs = [t.detach().requires_grad_(True) for t in inputs]
    exact_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    attended, confidence = fused.chunk_attention(*fused_inputs, order, inverse)
    expected_attended, expected_confidence = fused.chunk_attention_reference(*exact_inputs, order, inverse)
    assert attended.dtype == torch.float32 and confidence.dtype == torch.float32
    torch.testing.assert_close(attended.double(), expected_attended, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(confidence.double(), expected_confidence, rtol=1e-4, atol=1e-4)

    grad_attended, grad_confidence = torch.randn_like(attended), torch.randn_like(confidence)
    ((attended * grad_attended).sum() + (confidence * grad_confidence).sum()).backward()
    ((expected_attended * grad_attended.double()).sum() + (expected_confidence * grad_confidence.double()).sum()
     ).backward()
    for name, got, want in zip(("queries", "keys", "learned_score", "values"), fused_inputs, exact_inputs):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=grad_tolerance,
                                   atol=grad_tolerance * max(1.0, want.grad.abs().max().item()), msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_fused_op_matches_reference_in_float32(shape, device, backward_mode):
    assert_op_matches_reference(*random_problem(*shape, device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_the_weights_and_matmul_forward_matches_the_reference(shape, dtype, monkeypatch):
    """The "weights+matmul" forward (the kernel stores P, one batched P V product over the values' rows in
    sorted order): outputs as the float64 reference's, and the backward from its saved outputs (float32: the
    row term reads the attended values) the reference's gradients; on every shape, padding, one and two chunks
    (windows whose neighbour chunks coincide) and a chunk over several blocks included. bfloat16 values enter
    the product in float32, so it is checked to the float32 tolerance on the outputs."""
    monkeypatch.setattr(fused, "FORWARD_MODE", dict.fromkeys(fused.FORWARD_MODE, "weights+matmul"))
    launched = []
    original = fused._launch
    monkeypatch.setattr(fused, "_launch", lambda function, name, *args, **kwargs:
                        launched.append(name) or original(function, name, *args, **kwargs))
    # bfloat16: the backward kernels' products in bfloat16
    assert_op_matches_reference(*random_problem(*shape, dtype=dtype),
                                grad_tolerance=1e-4 if dtype == torch.float32 else 3e-2)
    assert launched[0] == "forward_weights" and "forward" not in launched


def test_fused_op_in_bfloat16_is_close_to_float32(backward_mode):
    inputs, order, inverse = random_problem(2, 2, 37, 16, 8, 12)
    low = [t.detach().bfloat16().requires_grad_(True) for t in inputs]
    exact = [t.detach().double().requires_grad_(True) for t in inputs]
    attended, confidence = fused.chunk_attention(*low, order, inverse)
    expected_attended, expected_confidence = fused.chunk_attention_reference(*exact, order, inverse)
    assert attended.dtype == torch.float32 and confidence.dtype == torch.float32
    # bfloat16 keeps 8 bits: about 0.4% of the scores' and values' size.
    assert (attended.double() - expected_attended).abs().max() < 0.03
    assert (confidence.double() - expected_confidence).abs().max() < 0.03
    (attended.float().square().sum() + confidence.sum()).backward()
    (expected_attended.square().sum() + expected_confidence.sum()).backward()
    for name, got, want in zip(("queries", "keys", "learned_score", "values"), low, exact):
        scale = want.grad.abs().max().item()
        assert (got.grad.double() - want.grad).abs().max() < 0.03 * scale, name


def test_atomic_backward_gives_way_to_deterministic_algorithms(monkeypatch):
    """Atomic additions sum in a varying order: a run asking for deterministic algorithms gets the two kernels."""
    monkeypatch.setattr(fused, "BACKWARD_MODE", dict.fromkeys(fused.BACKWARD_MODE, "atomic"))
    launched = []
    original = fused._launch
    monkeypatch.setattr(fused, "_launch", lambda function, name, *args, **kwargs:
                        launched.append((name, kwargs.get("ATOMIC_GRAD_Q", kwargs.get("DELTA_ONLY"))))
                        or original(function, name, *args, **kwargs))
    inputs, order, inverse = random_problem(1, 2, 20, 10, 4, 6)
    outputs = fused._fused_forward(*inputs, order, inverse)
    grads = [torch.randn_like(outputs[0]), torch.randn_like(outputs[1])]
    launched.clear()
    atomic = fused._fused_backward(*grads, *inputs, order, inverse, *outputs)
    assert launched == [("keys", True)]  # float32: delta needs no kernel, dQ comes from the key kernel
    launched.clear()
    torch.use_deterministic_algorithms(True)
    try:
        deterministic = fused._fused_backward(*grads, *inputs, order, inverse, *outputs)
    finally:
        torch.use_deterministic_algorithms(False)
    assert launched == [("queries", False), ("keys", False)]
    for got, want in zip(atomic, deterministic):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_custom_op_registration():
    """Schema, fake (meta) implementation and autograd registration as torch.compile relies on them."""
    inputs, order, inverse = random_problem(1, 2, 10, 5, 2, 3)
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    torch.library.opcheck(torch.ops.dlsn.chunk_attention.default, (*inputs, order, inverse, False))


def test_bad_inputs_are_named():
    inputs, order, inverse = random_problem(1, 1, 10, 5, 2, 3)
    queries, keys, learned_score, values = inputs
    with pytest.raises(TypeError, match="queries must be float32, bfloat16 or float16, got torch.float64"):
        fused.chunk_attention(queries.double(), keys, learned_score, values, order, inverse)
    with pytest.raises(TypeError, match=r"queries \(torch.bfloat16\) and keys \(torch.float32\) must share"):
        fused.chunk_attention(queries.bfloat16(), keys, learned_score, values, order, inverse)
    with pytest.raises(ValueError, match="order has 9 entries, not the 10 positions padded"):
        fused.chunk_attention(queries, keys, learned_score, values, order[..., :9], inverse)


@pytest.fixture
def fresh_fallback_state(monkeypatch):
    """The module's one-way 'kernel failed' state, reset around the test."""
    monkeypatch.setattr(fused, "_failure", None)
    monkeypatch.setattr(fused, "_checked", set())


def test_fallback_warns_once_and_computes_the_reference(monkeypatch, fresh_fallback_state):
    inputs, order, inverse = random_problem(1, 2, 20, 8, 4, 6)
    inputs = [t.detach().requires_grad_(True) for t in inputs]

    def broken_kernel(*args):
        raise RuntimeError("out of cheese")

    monkeypatch.setattr(fused, "_fused_forward", broken_kernel)
    with pytest.raises(RuntimeError, match="out of cheese"):  # fused: the error surfaces
        fused.chunk_attention(*inputs, order, inverse)
    with pytest.warns(RuntimeWarning, match=r"fused chunk-attention kernel failed \(RuntimeError: out of cheese\)"):
        attended, confidence = fused.chunk_attention(*inputs, order, inverse, fallback=True)
    assert fused.fused_kernel_failure() == "RuntimeError: out of cheese"
    expected = fused.chunk_attention_reference(*inputs, order, inverse)
    torch.testing.assert_close(attended, expected[0])
    torch.testing.assert_close(confidence, expected[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        attended.sum().backward()  # the backward op falls back as well (the kernel is marked failed)
        fused.chunk_attention(*inputs, order, inverse, fallback=True)


def test_self_check_catches_a_wrong_kernel(monkeypatch, fresh_fallback_state):
    original = fused._fused_forward

    def slightly_wrong(*args):
        attended, confidence = original(*args)
        return attended * 1.01, confidence

    monkeypatch.setattr(fused, "_fused_forward", slightly_wrong)
    with pytest.raises(RuntimeError, match=r"self-check \(torch.float32\): attended differs from the reference"):
        fused.self_check(torch.device("cpu"))


def test_a_way_besides_the_defaults_that_fails_is_left_out_not_the_kernel(monkeypatch, fresh_fallback_state):
    """At a process's first use the self-check is not strict: a forward mode or backward variant other than the
    defaults that fails (an error, a wrong result) is left out of the timed choices, warned, and the fused
    kernel keeps running its other ways; the strict self-check (tests, check_fused_gla.py) raises."""
    monkeypatch.setattr(fused, "_left_out", {})
    monkeypatch.setattr(fused, "BACKWARD_MODES", ("two_kernels", "stored_dS+matmul"))  # fewer variants: faster
    for table in (fused.TIMED_KEY_CONFIGS, fused.TIMED_VALUES_CONFIGS, fused.TIMED_QUERIES_CONFIGS):
        monkeypatch.setitem(table, 90, {})
    forward, backward = fused._fused_forward, fused._fused_backward

    def failing_forward(*args, mode=None, **kwargs):
        if mode == "weights+matmul":
            raise RuntimeError("out of cheese")
        return forward(*args, mode=mode, **kwargs)

    def wrong_backward(*args, mode=None, **kwargs):
        grads = backward(*args, mode=mode, **kwargs)
        return (grads[0] * 1.01, *grads[1:]) if mode == "stored_dS+matmul" else grads

    monkeypatch.setattr(fused, "_fused_forward", failing_forward)
    monkeypatch.setattr(fused, "_fused_backward", wrong_backward)
    with pytest.raises(RuntimeError, match="out of cheese"):
        fused.self_check(torch.device("cpu"))
    assert fused.left_out_variants() == {}
    with pytest.warns(RuntimeWarning) as warned:
        fused.self_check(torch.device("cpu"), strict=False)
    assert [str(w.message).split(" failed")[0] for w in warned] == [
        "dlsn: the fused attention's forward weights+matmul", "dlsn: the fused attention's backward stored_dS+matmul",
        "dlsn: the fused attention's backward mode stored_dS+matmul"]
    left_out = fused.left_out_variants()
    assert left_out["forward weights+matmul"] == "RuntimeError: out of cheese"
    assert left_out["backward stored_dS+matmul"].startswith(
        "RuntimeError: self-check (torch.float32, backward stored_dS+matmul): grad queries differs")
    assert fused.fused_kernel_failure() is None  # the kernel itself is not given up
    assert list(fused.backward_variants(torch.device("cpu"), torch.float32)) == ["two_kernels"]
    monkeypatch.setattr(fused.timed_choice, "timing_allowed", lambda device: True)
    launched = []
    monkeypatch.setattr(fused, "_launch", lambda function, name, *args, launch=fused._launch, **kwargs:
                        launched.append(name) or launch(function, name, *args, **kwargs))
    inputs, order, inverse = random_problem(1, 2, 20, 10, 4, 6)
    fused._fused_forward(*inputs, order, inverse)  # "timed", with one forward left: not timed
    assert launched == ["forward"] and fused.timed_choice.choices() == {}


def test_first_use_on_a_gpu_runs_the_self_check_leniently(monkeypatch, fresh_fallback_state):
    """The fallback path's first CUDA use per device, dtype and dot-product precision runs the self-check once,
    not strict (a failing optional way is left out, not the whole kernel)."""
    calls = []
    monkeypatch.setattr(fused, "self_check", lambda device, dtype, **kwargs: calls.append((device, dtype, kwargs)))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    values = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.float32)
    assert fused._fused_allowed(values, fallback=True) and fused._fused_allowed(values, fallback=True)
    assert calls == [(torch.device("cuda", 0), torch.float32, {"strict": False})]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_self_check_passes_with_the_real_kernel(dtype):
    fused.self_check(torch.device("cpu"), dtype)


# ---------------------------------------------------------------- whole GLA layers, fused vs reference

def _gla_outputs_and_gradients(layer: GLA, x: torch.Tensor, rotations: torch.Tensor, autocast_dtype=None):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        output = layer(x, rotations)
    output.float().square().sum().backward()
    return output.detach().float(), x.grad, {name: p.grad for name, p in layer.named_parameters()}


def _assert_gla_gradients_close(got, want, tolerance):
    torch.testing.assert_close(got[0], want[0], rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(got[1], want[1], rtol=tolerance, atol=tolerance)
    for name, expected in want[2].items():
        # Parameter gradients sum many float32 terms: bound relative to the tensor's largest entry.
        difference = (got[2][name] - expected).abs().max().item()
        assert difference <= tolerance * max(1.0, expected.abs().max().item()), f"{name}: {difference:.3g}"


def _fused_and_reference(config: dict, state_dict=None):
    reference = GLA(**config, attention_impl="reference")
    if state_dict is not None:
        load_official(reference, state_dict)
    fused_layer = GLA(**config, attention_impl="fused")
    fused_layer.load_state_dict(reference.state_dict())
    return fused_layer, reference


@pytest.mark.parametrize("batch, height, width", [(1, 1, 1), (2, 5, 7), (2, 3, 4), (1, 6, 8), (2, 7, 9)])
def test_fused_gla_matches_reference(batch, height, width):
    """1x1, L < chunk (one chunk of L), an exact multiple, padding; batch > 1; outputs and gradients."""
    torch.manual_seed(0)
    config = dict(channels=8, chunk_size=16, n_hashes=2, reduction=2, res_scale=0.5)
    fused_layer, reference = _fused_and_reference(config)
    length = height * width
    rotations = torch.nn.init.orthogonal_(torch.empty(2, 4, number_of_buckets(length, 16)))
    x = torch.randn(batch, 8, height, width)
    _assert_gla_gradients_close(_gla_outputs_and_gradients(fused_layer, x, rotations),
                                _gla_outputs_and_gradients(reference, x, rotations), 1e-4)


@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
def test_fused_gla_mixes_large_outputs_with_the_kernel(monkeypatch, grad):
    """Outputs of at least MIX_KERNEL_MIN_ELEMENTS go through the mixing kernel (lowered here), smaller ones
    through PyTorch operations (batch 1 is host-bound); float32 training mixes in the attention's own autograd
    node (attend_and_mix). Either way the layer equals the reference's."""
    torch.manual_seed(0)
    config = dict(channels=8, chunk_size=16, n_hashes=2, reduction=2, res_scale=0.5)
    fused_layer, reference = _fused_and_reference(config)
    rotations = torch.nn.init.orthogonal_(torch.empty(2, 4, number_of_buckets(35, 16)))
    x = torch.randn(2, 8, 5, 7)  # [N, T, L, C] = 2 x 2 x 35 x 8 = 1120 elements
    mixed = []
    for function in (fused._MixRounds, fused._AttendAndMix):
        monkeypatch.setattr(function, "apply", lambda *args, function=function, original=function.apply: mixed.append(
            function.__name__) or original(*args))
    default = fused.MIX_KERNEL_MIN_ELEMENTS
    for threshold, calls in ((1121, []), (1120, ["_AttendAndMix" if grad else "_MixRounds"])):
        mixed.clear()
        with fused.mixing_from(threshold):
            if grad:
                _assert_gla_gradients_close(_gla_outputs_and_gradients(fused_layer, x, rotations),
                                            _gla_outputs_and_gradients(reference, x, rotations), 1e-4)
            else:
                with torch.no_grad():
                    torch.testing.assert_close(fused_layer(x, rotations), reference(x, rotations),
                                               rtol=1e-4, atol=1e-4)
        assert mixed == calls, threshold
        assert fused.MIX_KERNEL_MIN_ELEMENTS == default
    with pytest.raises(RuntimeError, match="inside"), fused.mixing_from(0):
        raise RuntimeError("inside")
    assert fused.MIX_KERNEL_MIN_ELEMENTS == default  # put back after an error too


def _saved_shapes(function):
    """Shapes of the tensors autograd saves for backward while ``function()`` runs."""
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return shapes


def test_attention_and_mixing_in_one_node_keep_no_attended_values_for_backward(monkeypatch):
    """Float32 GLA training with the large-output mixing: the [N, T, L, C] attended values are not kept for
    backward (the separate mixing node keeps them), the mixed [N, L, C] is; the same output and gradients."""
    torch.manual_seed(0)
    layer = GLA(8, chunk_size=16, n_hashes=2, reduction=2, res_scale=0.5, attention_impl="fused")
    rotations = torch.nn.init.orthogonal_(torch.empty(2, 4, number_of_buckets(35, 16)))
    x = torch.randn(2, 8, 5, 7)
    monkeypatch.setattr(fused, "MIX_KERNEL_MIN_ELEMENTS", 0)
    one_node = _saved_shapes(lambda: layer(x, rotations))
    assert (2, 2, 35, 8) not in one_node and (2, 35, 8) in one_node
    result = _gla_outputs_and_gradients(layer, x, rotations)
    monkeypatch.setattr(fused, "attends_and_mixes", lambda values, n_rounds: False)
    assert (2, 2, 35, 8) in _saved_shapes(lambda: layer(x, rotations))  # the test can tell them apart
    _assert_gla_gradients_close(result, _gla_outputs_and_gradients(layer, x, rotations), 1e-5)


def test_attend_and_mix_equals_the_separate_nodes_and_falls_back_to_the_reference(monkeypatch, fresh_fallback_state):
    """Gradients through the row term ``w_t (g . m)`` equal those through the mixing node and the delta kernel;
    a failing backward kernel surfaces, or with ``fallback`` warns once and gives the reference's gradients
    (the confidences' gradient from recomputed attended values)."""
    inputs, order, inverse = random_problem(2, 3, 37, 16, 8, 12)
    weights_of_output = torch.randn(2, 37, 12, generator=torch.Generator().manual_seed(1))

    def gradients(function):
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        output = function(leaves)
        (output * weights_of_output).sum().backward()
        return [output.detach(), *(leaf.grad for leaf in leaves)]

    def separate(leaves):
        attended, confidence = fused.chunk_attention(*leaves, order, inverse)
        return fused.mix_rounds(attended, torch.softmax(confidence, dim=1))

    expected = gradients(separate)
    for got, want in zip(gradients(lambda leaves: fused.attend_and_mix(*leaves, order, inverse)), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    def broken_kernel(*args, **kwargs):
        raise RuntimeError("out of cheese")

    monkeypatch.setattr(fused, "_fused_backward", broken_kernel)
    with pytest.raises(RuntimeError, match="out of cheese"):
        gradients(lambda leaves: fused.attend_and_mix(*leaves, order, inverse))
    with pytest.warns(RuntimeWarning, match=r"chunk-attention kernel failed \(RuntimeError: out of cheese\)"):
        fallen_back = gradients(lambda leaves: fused.attend_and_mix(*leaves, order, inverse, fallback=True))
    for got, want in zip(fallen_back, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="float32 values in eager mode only, got torch.bfloat16"):
        fused.attend_and_mix(*inputs[:3], inputs[3].bfloat16(), order, inverse)


@pytest.mark.parametrize("mode", fused.BACKWARD_MODES)
def test_round_weighted_backward_reads_the_mixed_gradient_as_the_materialised_one(mode):
    """With ``round_weights`` every backward kernel (each mode runs another set) reads the mixed output's gradient
    ``g`` ``[N, L, C]`` and the round weights ``w`` instead of ``dy_t = w_t g`` ``[N, T, L, C]``: the same
    gradients as from ``dy`` made in memory (to rounding: ``w`` scales ``P`` or ``dP``, not ``g``)."""
    inputs, order, inverse = random_problem(2, 3, 37, 16, 8, 12)
    generator = torch.Generator().manual_seed(3)
    grad_mixed = torch.randn(2, 37, 12, generator=generator)
    round_weights = torch.softmax(torch.randn(2, 3, 37, generator=generator), dim=1)
    grad_confidence = torch.randn(2, 3, 37, generator=generator)
    grad_attended = grad_mixed.unsqueeze(1) * round_weights.unsqueeze(-1)
    attended, confidence = fused._fused_forward(*inputs, order, inverse)
    want = fused._fused_backward(grad_attended, grad_confidence, *inputs, order, inverse, attended, confidence,
                                 mode=mode)
    delta = fused._delta(grad_attended, attended, grad_confidence)
    got = fused._fused_backward(grad_mixed, None, *inputs, order, inverse, None, confidence, mode=mode, delta=delta,
                                round_weights=round_weights)
    for name, got_grad, want_grad in zip(("queries", "keys", "learned_score", "values"), got, want):
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match=r"round_weights need float32 values \(got torch.float32\) and the row term "
                                         r"delta \(given: False\)"):
        fused._fused_backward(grad_mixed, None, *inputs, order, inverse, None, confidence, mode=mode,
                              round_weights=round_weights)


def test_gla_mixes_in_the_attention_node_only_where_it_pays(monkeypatch):
    values = torch.zeros(2, 35, 8)
    monkeypatch.setattr(fused, "MIX_KERNEL_MIN_ELEMENTS", 2 * 3 * 35 * 8)
    assert fused.attends_and_mixes(values, 3) and not fused.attends_and_mixes(values, 2)  # [N, T, L, C] size
    assert not fused.attends_and_mixes(values.bfloat16(), 3)  # half precision: the query kernel's exact delta
    with torch.no_grad():  # inference: the embeddings are freed before the mixing
        assert not fused.attends_and_mixes(values, 3)


def test_fused_gla_under_bfloat16_autocast_is_as_accurate_as_the_reference():
    """Errors against float32 (norm of the difference over the norm) about those of the reference path
    under the same autocast, for the output and every gradient. The learned score's gradient sums
    the softmax's row term over every query, so a row term inconsistent with the rounded weights
    (e.g. from a bfloat16 output) shows up there several times larger."""
    torch.manual_seed(0)
    config = dict(channels=16, chunk_size=8, n_hashes=2, reduction=2)
    fused_layer, reference = _fused_and_reference(config)
    rotations = torch.nn.init.orthogonal_(torch.empty(2, 8, number_of_buckets(70, 8)))
    x = torch.randn(2, 16, 7, 10)
    exact = _gla_outputs_and_gradients(reference, x, rotations)
    fused_low = _gla_outputs_and_gradients(fused_layer, x, rotations, autocast_dtype=torch.bfloat16)
    reference_low = _gla_outputs_and_gradients(reference, x, rotations, autocast_dtype=torch.bfloat16)

    def errors(result):
        pairs = [(result[0], exact[0]), (result[1], exact[1])] + [(result[2][n], exact[2][n]) for n in exact[2]]
        return [((got - want).norm() / want.norm()).item() for got, want in pairs]

    names = ["output", "input gradient", *exact[2]]
    for name, fused_error, reference_error in zip(names, errors(fused_low), errors(reference_low)):
        assert fused_error <= 1.25 * reference_error + 0.01, f"{name}: {fused_error:.4f} vs {reference_error:.4f}"


def _gla_cases():
    return torch.load(FIXTURES / "gla_cases.pt", weights_only=True) if FIXTURES.exists() else []


@pytest.mark.slow
@pytest.mark.skipif(not FIXTURES.exists(), reason=f"official DLSN fixtures not found at {FIXTURES}")
@pytest.mark.parametrize("case_index", range(len(_gla_cases())))
@pytest.mark.parametrize("mixing", ["separate", "one node"])
def test_fused_gla_matches_reference_on_the_official_cases(monkeypatch, case_index, mixing):
    """Padding, an exact multiple, many buckets, the 128-bucket cap (the interpreter takes 5-30 s each); the
    round mixing as its own node and, as float32 training runs it at large sizes, in the attention's."""
    monkeypatch.setattr(fused, "MIX_KERNEL_MIN_ELEMENTS", 0 if mixing == "one node" else 2**62)
    case = _gla_cases()[case_index]
    fused_layer, reference = _fused_and_reference(case["config"], case["state_dict"])
    rotations = torch.stack(case["rotations"])
    got = _gla_outputs_and_gradients(fused_layer, case["input"], rotations)
    _assert_gla_gradients_close(got, _gla_outputs_and_gradients(reference, case["input"], rotations), 1e-4)
    torch.testing.assert_close(got[0], case["output"], rtol=1e-4, atol=1e-4)


def test_auto_uses_the_reference_on_the_cpu(monkeypatch):
    def not_expected(*args, **kwargs):
        raise AssertionError("the fused op was called")

    monkeypatch.setattr(fused, "chunk_attention", not_expected)
    layer = GLA(8, chunk_size=4, n_hashes=1, reduction=2)
    assert layer.attention_impl == "auto"
    layer(torch.randn(1, 8, 3, 3))
    with pytest.raises(AssertionError, match="the fused op was called"):
        GLA(8, chunk_size=4, n_hashes=1, reduction=2, attention_impl="fused")(torch.randn(1, 8, 3, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_on_cuda_uses_the_kernel_and_matches_the_reference(dtype):
    torch.manual_seed(2)
    config = dict(channels=32, chunk_size=16, n_hashes=3, reduction=4)
    layer = GLA(**config).cuda()  # auto
    reference = GLA(**config, attention_impl="reference").cuda()
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 32, 20, 18, device="cuda")
    rotations = torch.nn.init.orthogonal_(torch.empty(3, 8, number_of_buckets(360, 16))).cuda()
    autocast = dtype if dtype != torch.float32 else None
    got = _gla_outputs_and_gradients(layer, x, rotations, autocast)
    want = _gla_outputs_and_gradients(reference, x, rotations, autocast)
    assert fused.fused_kernel_failure() is None
    _assert_gla_gradients_close(got, want, 1e-4 if dtype == torch.float32 else 0.05)


# ---------------------------------------------------------------- compiled for GPUs, without a GPU

@pytest.mark.parametrize("mode", [mode for mode in fused.BACKWARD_MODES if mode.endswith("+values")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_kernel_modes_split_the_value_channels_into_blocks(monkeypatch, mode, dtype):
    """With dV from the values kernel, it (one program per block of value channels) and the query and
    key kernels' dP loops (summed over blocks of channels) are right when C spans several blocks, the
    last one part masked (20 channels in blocks of 16)."""
    monkeypatch.setattr(fused, "VALUES_CHANNEL_BLOCK", dict.fromkeys(fused.VALUES_CHANNEL_BLOCK, 16))
    monkeypatch.setattr(fused, "DP_CHANNEL_BLOCK", dict.fromkeys(fused.DP_CHANNEL_BLOCK, 16))
    inputs, order, inverse = random_problem(2, 2, 45, 16, 6, 20, dtype=dtype)
    outputs = fused._fused_forward(*inputs, order, inverse)
    grads = [torch.randn_like(outputs[0]), torch.randn_like(outputs[1])]
    got = fused._fused_backward(*grads, *inputs, order, inverse, *outputs, mode=mode)
    want = fused.chunk_attention_reference_backward(*(g.double() for g in grads), *(t.double() for t in inputs),
                                                    order, inverse)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    for name, got_grad, want_grad in zip(("queries", "keys", "learned_score", "values"), got, want):
        scale = max(1.0, want_grad.abs().max().item())
        assert (got_grad.double() - want_grad).abs().max() <= tolerance * scale, name


# int arguments that Triton's JIT sees divisible by 16 at the paper configuration (it specialises on it)
_DIVISIBLE_BY_16 = {"q_stride_n", "q_stride_l", "k_stride_n", "k_stride_l", "v_stride_n", "v_stride_l",
                    "ls_stride_n", "ls_stride_l", "chunk", "qk_dim", "v_dim"}


def _compile_for_gpu(name: str, value_type: str, arch: int, atomic: bool = False, config=None,
                     dp_in_blocks: bool = False, store_ds: bool = False, channel_block: int | None = None,
                     store_p: bool = False, load_dp: bool = False):
    """Ahead-of-time compile of one kernel for sm_``arch`` at the paper configuration (C=256, d=64,
    k=128) with ``config`` (rows, warps, stages; default its LAUNCH_CONFIGS entry): Triton's front end,
    LLVM and ptxas, no GPU needed. Float32 backward kernels as float32 training at batch 16 runs them
    (attend_and_mix: from the mixed gradient and the round weights, a few more registers than without)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    function = {"forward": fused._forward_kernel, "forward_weights": fused._forward_kernel,
                "queries": fused._backward_queries_kernel,
                "keys": fused._backward_keys_kernel, "keys_no_values": fused._backward_keys_kernel,
                "keys_from_dS": fused._backward_keys_kernel, "keys_from_dS_no_values": fused._backward_keys_kernel,
                "values": fused._backward_values_kernel}[name]
    kernel = fused._kernel(function, False)
    rows, num_warps, num_stages = config or fused.LAUNCH_CONFIGS[arch][name, "half" if value_type == "bf16"
                                                                       else "float32"]
    dp_in_blocks = dp_in_blocks or name.endswith("_no_values")
    channel_block = channel_block or {"forward": fused.FORWARD_CHANNEL_BLOCK, "values": fused.VALUES_CHANNEL_BLOCK,
                                      "forward_weights": {arch: 16}}.get(  # no values read: as _forward_by_matmul
        name, fused.DP_CHANNEL_BLOCK if dp_in_blocks else {arch: 256})[arch]
    constants = dict(BLOCK_M=rows, BLOCK_N=rows, BLOCK_D=64, BLOCK_C=channel_block, PRECISION="tf32",
                     INTERPRETED=False)
    if name == "queries":
        constants.update(EXACT_DELTA=value_type == "bf16", DELTA_ONLY=False, DP_IN_BLOCKS=dp_in_blocks,
                         STORE_DS=store_ds, STORE_P=store_p, LOAD_DP=load_dp)
    if name.startswith("keys"):
        constants.update(ATOMIC_GRAD_Q=atomic, WITH_GRAD_V=not name.endswith("_no_values"),
                         LOAD_DS=name.startswith("keys_from_dS"))
    if name.startswith("forward"):
        constants.update(WEIGHTS_ONLY=name == "forward_weights")
    else:
        constants.update(ROUND_WEIGHTED=value_type == "fp32")
    float32_outputs = {"OUT", "LSE", "DELTA", "ROUND_WEIGHTS", "GRAD_Q", "GRAD_K", "GRAD_V", "GRAD_LS", "GRAD_SCORES",
                       "KEY_WEIGHTS", "GRAD_WEIGHTS", "WEIGHTS"}
    signature, attributes = {}, {}
    for index, argument in enumerate(kernel.arg_names):
        if argument in constants:
            signature[argument] = "constexpr"
        elif argument.isupper():  # a pointer
            signature[argument] = ("*fp32" if argument in float32_outputs else
                                   "*i32" if argument == "ORDER" else f"*{value_type}")
            attributes[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[argument] = "i32"
            if argument in _DIVISIBLE_BY_16:
                attributes[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attributes)
    return triton_compile(source, GPUTarget("cuda", arch, 32), num_warps, num_stages)


@pytest.mark.slow
@pytest.mark.long  # 48 Triton compilations for sm_80/sm_90
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("value_type", ["bf16", "fp32"])
@pytest.mark.parametrize("name", ["forward", "queries", "queries with dP in blocks", "keys", "keys with atomic dQ",
                                  "values", "keys_no_values", "keys_no_values with atomic dQ", "queries storing dS",
                                  "queries with dP in blocks storing dS", "keys_from_dS", "keys_from_dS_no_values"])
def test_kernels_compile_for_gpus_within_their_resources(name, value_type, arch):
    """Catches what only a GPU compile would: Triton type/shape errors, shared memory over an A100's or
    H100's limit, and for the untimed sm_80 choices heavy register spilling (first seen as a fully
    spilled float32 backward kernel). The sm_90 configurations were timed on an H200, spills included
    (Triton 3.9's ptxas reports 0-1 KB per thread for them), so only their fit is asserted."""
    pytest.importorskip("triton.backends.nvidia")
    compiled = _compile_for_gpu(name.split()[0], value_type, arch, atomic=name.endswith("atomic dQ"),
                                dp_in_blocks="dP in blocks" in name, store_ds=name.endswith("storing dS"))
    assert compiled.metadata.shared <= SHARED_MEMORY_LIMIT[arch]
    spill = register_spill_bytes(compiled)
    assert arch >= 90 or spill is None or spill <= 256, f"{spill} bytes of register spills per thread"


@pytest.mark.slow
@pytest.mark.parametrize("atomic", [False, True], ids=["two kernels", "atomic dQ"])
@pytest.mark.parametrize(("arch", "value_type", "config"), [
    (arch, {"float32": "fp32", "half": "bf16"}[precision], config)
    for arch, by_precision in fused.TIMED_KEY_CONFIGS.items() for precision, configs in by_precision.items()
    for config in configs])
def test_timed_key_configurations_compile_within_the_gpus_resources(arch, value_type, config, atomic):
    """The key-kernel configurations the timed backward tries (TIMED_KEY_CONFIGS) fit the GPU's shared
    memory and spill little: they were picked for that (cuobjdump, Triton 3.9)."""
    pytest.importorskip("triton.backends.nvidia")
    compiled = _compile_for_gpu("keys", value_type, arch, atomic=atomic, config=config)
    assert compiled.metadata.shared <= SHARED_MEMORY_LIMIT[arch]
    spill = register_spill_bytes(compiled)
    assert spill is None or spill <= 256, f"{spill} bytes of register spills per thread"


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "value_type", "config"), [
    (arch, {"float32": "fp32", "half": "bf16"}[precision], config)
    for arch, by_precision in fused.TIMED_VALUES_CONFIGS.items() for precision, configs in by_precision.items()
    for config in configs])
def test_timed_values_configurations_compile_within_the_gpus_resources(arch, value_type, config):
    """The values-kernel configurations the timed backward tries (TIMED_VALUES_CONFIGS) fit the GPU's shared
    memory and spill nothing, on sm_90 the 64-row ones use wgmma, the point of them (32 rows compile to
    mma.sync), and those with two stages prefetch the next rows with cp.async. With the neighbour chunks
    unrolled in the kernel's loop, (64, 8, 2) with 256 channels needed 529 KB of shared memory."""
    pytest.importorskip("triton.backends.nvidia")
    compiled = _compile_for_gpu("values", value_type, arch, config=config[:3], channel_block=config[3])
    assert compiled.metadata.shared <= SHARED_MEMORY_LIMIT[arch]
    spill = register_spill_bytes(compiled)
    assert spill is None or spill == 0, f"{spill} bytes of register spills per thread"
    ptx = compiled.asm["ptx"]
    assert ("cp.async" in ptx) == (config[2] >= 2)
    if arch >= 90:
        assert ("wgmma.mma_async" in ptx) == (config[0] >= 64)


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "value_type", "config"), [
    (arch, {"float32": "fp32", "half": "bf16"}[precision], config)
    for arch, by_precision in fused.TIMED_QUERIES_CONFIGS.items() for precision, configs in by_precision.items()
    for config in configs])
def test_timed_query_configurations_compile_without_spills(arch, value_type, config):
    """The query-kernel configurations the timed backward tries with TIMED_CONFIGS_MODE (dP over blocks of
    channels, dS stored) fit the GPU's shared memory and spill nothing, unlike LAUNCH_CONFIGS' (64, 4, 1)."""
    pytest.importorskip("triton.backends.nvidia")
    assert fused.TIMED_CONFIGS_MODE == "stored_dS+values"
    compiled = _compile_for_gpu("queries", value_type, arch, config=config, dp_in_blocks=True, store_ds=True)
    assert compiled.metadata.shared <= SHARED_MEMORY_LIMIT[arch]
    assert register_spill_bytes(compiled) in (None, 0)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("value_type", ["bf16", "fp32"])
def test_the_forward_storing_the_weights_compiles_without_spills(arch, value_type):
    """The "weights+matmul" forward's kernel (WEIGHTS_ONLY: scores twice, P stored, no values) with its
    LAUNCH_CONFIGS entry fits the GPU's shared memory and spills nothing; on sm_90 its 64-row blocks run the
    score products on wgmma, the point of them."""
    pytest.importorskip("triton.backends.nvidia")
    compiled = _compile_for_gpu("forward_weights", value_type, arch)
    assert compiled.metadata.shared <= SHARED_MEMORY_LIMIT[arch]
    assert register_spill_bytes(compiled) in (None, 0)
    if arch >= 90:
        assert "wgmma.mma_async" in compiled.asm["ptx"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("value_type", ["bf16", "fp32"])
@pytest.mark.parametrize("load_dp", [False, True], ids=["stored_dS+matmul", "stored_dS+matmul+dP"])
def test_the_query_kernel_storing_the_weights_compiles_without_spills(arch, value_type, load_dp):
    """The "+matmul" backwards' query kernel (dS stored, the weights stored for the batched dV product, dP
    summed over blocks of channels or with "+dP" read from the batched dP product), with its LAUNCH_CONFIGS
    entry: it fits the GPU's shared memory and spills no more than the "stored_dS+values" query kernel (the
    weights' store only writes a tile the kernel holds; the read dP replaces the loop computing it)."""
    pytest.importorskip("triton.backends.nvidia")
    with_weights = _compile_for_gpu("queries", value_type, arch, dp_in_blocks=True, store_ds=True, store_p=True,
                                    load_dp=load_dp)
    without = _compile_for_gpu("queries", value_type, arch, dp_in_blocks=True, store_ds=True)
    assert with_weights.metadata.shared <= SHARED_MEMORY_LIMIT[arch]
    assert (register_spill_bytes(with_weights) or 0) <= (register_spill_bytes(without) or 0), \
        (register_spill_bytes(with_weights), register_spill_bytes(without))


@pytest.mark.parametrize(("capability", "generation"), [((8, 0), 80), ((8, 9), 80), ((9, 0), 90), ((10, 0), 90)])
def test_launch_configurations_follow_the_gpu_generation(monkeypatch, capability, generation):
    """The H200-timed configurations serve sm_90 and newer; older GPUs keep the A100-safe choices."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert fused._generation(torch.device("cuda", 0)) == generation
    assert fused._generation(torch.device("cpu")) == 90  # the interpreter runs the configurations GPUs use most
    assert set(fused.LAUNCH_CONFIGS) == set(fused.FORWARD_CHANNEL_BLOCK) == {80, 90}


def test_a_launch_short_of_the_gpus_resources_runs_fewer_rows_and_says_so(monkeypatch):
    """A configuration that does not fit the GPU (a Triton version that pipelines differently) is launched with
    half the rows until it fits, kept so for the next launches, and warned once: the timed choice and the kernel
    tables name the configuration asked for."""
    from triton.runtime.errors import OutOfResources

    launched = []

    class ShortOfSharedMemory:  # fits with at most 16 rows
        def __getitem__(self, grid):
            def launch(*arguments, **options):
                launched.append(options["BLOCK_M"])
                if options["BLOCK_M"] > 16:
                    raise OutOfResources(options["BLOCK_M"] * 4096, 65536, "shared memory")
            return launch

    monkeypatch.setattr(fused, "_kernel", lambda function, interpreted: ShortOfSharedMemory())
    monkeypatch.setattr(fused, "_working_rows", {})
    sizes = dict(chunk=64, qk_dim=16, v_dim=32, value_dtype=torch.float32, precision="ieee", strides=(), length=128,
                 padded_length=128, n_chunks=2, n_rounds=1)

    def launch():
        fused._launch(None, "values", lambda rows, channels: (1,), [torch.zeros(1)], sizes, channel_block=None,
                      config=(64, 8, 2))

    with pytest.warns(RuntimeWarning, match=r"values kernel with 64 rows \(8 warps, 2 stages, 32 value channels\) "
                                            r"ran out of the GPU's resources .*; it runs 32 rows") as warned:
        launch()
    assert launched == [64, 32, 16] and len(warned) == 2  # 64 -> 32 -> 16
    launched.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        launch()
    assert launched == [16]


# ------------------------------------------------------------------------------------------------
# The hashing kernel (bucket codes).
# ------------------------------------------------------------------------------------------------

HASH_SHAPES = {  # batch, length, dim, rounds, buckets
    "paper layer at 48x48": (1, 2304, 64, 3, 54),
    "partial block, odd sizes": (2, 150, 12, 3, 7),
    "fewer positions than a block, tiny dims": (1, 5, 2, 2, 3),
    "buckets a power of two": (2, 64, 16, 1, 16),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", HASH_SHAPES.values(), ids=HASH_SHAPES.keys())
def test_bucket_codes_kernel_is_the_argmax_of_the_float32_projections(shape, device):
    batch, length, dim, rounds, buckets = shape
    generator = torch.Generator().manual_seed(0)
    match = torch.randn(batch, length, dim + 3, generator=generator)[..., 3:]  # a strided view, like GLA's
    rotations = torch.randn(rounds, dim, buckets, generator=generator)
    codes = fused.bucket_codes_fused(match.to(device), rotations.to(device)).cpu()
    assert codes.dtype == torch.int64 and codes.shape == (batch, rounds, length)
    projections = torch.einsum("nld,tdb->ntlb", match.double(), rotations.double())
    top2 = projections.topk(min(2, buckets), dim=-1).values
    clear = (top2[..., 0] - top2[..., -1] > 1e-5) if buckets > 1 else torch.ones_like(codes, dtype=torch.bool)
    assert clear.float().mean() > 0.99  # float32 rounding may only decide near-ties
    assert torch.equal(codes[clear], projections.argmax(-1)[clear])


@pytest.mark.parametrize("device", DEVICES)
def test_bucket_codes_kernel_breaks_ties_like_torch_argmax(device):
    """Equal projections (a repeated rotation column): the first bucket wins, as in ``torch.argmax``.
    (Triton's interpreter breaks ties to the left whatever the kernel asks: compiled, on CUDA, this also
    checks the kernel's ``tie_break_left``.)"""
    generator = torch.Generator().manual_seed(1)
    match = torch.randn(1, 70, 8, generator=generator)
    column = torch.randn(8, 1, generator=generator)
    rotations = torch.cat([-column, column, torch.randn(8, 2, generator=generator), column, column], 1)[None]
    codes = fused.bucket_codes_fused(match.to(device), rotations.to(device)).cpu()
    # One matrix-vector product per column, so the repeated columns' projections tie exactly: einsum's
    # do not always (on an AVX-512 CPU its vectorised lanes round them 5e-7 apart).
    projections = torch.stack([match @ rotations[0, :, bucket] for bucket in range(rotations.shape[-1])], -1)
    expected = projections.argmax(-1)[:, None]
    assert all(torch.equal(projections[..., 1], projections[..., repeat]) for repeat in (4, 5))
    assert torch.equal(codes, expected)
    assert set(codes.unique().tolist()) <= {0, 1, 2, 3}  # the repeats at 4 and 5 never win


def test_bucket_codes_op_on_the_cpu_is_the_plain_argmax():
    torch.manual_seed(0)
    match, rotations = torch.randn(2, 40, 8), torch.randn(3, 8, 5)
    codes = fused.bucket_codes(match, rotations)
    assert torch.equal(codes, torch.einsum("nld,tdb->ntlb", match, rotations).argmax(-1))
    torch.library.opcheck(fused.bucket_codes_op, (match, rotations))


def test_hash_self_check_catches_a_wrong_kernel(monkeypatch):
    fused.hash_self_check(torch.device("cpu"))  # the real kernel passes
    monkeypatch.setattr(fused, "bucket_codes_fused", lambda match, rotations: torch.zeros(
        match.shape[0], rotations.shape[0], match.shape[1], dtype=torch.int64))
    with pytest.raises(RuntimeError, match="hash self-check: a picked bucket is"):
        fused.hash_self_check(torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gla_hashes_with_the_kernel_on_cuda(monkeypatch):
    from dlsn.models.gla import hash_codes

    calls = []
    original = fused.bucket_codes_fused
    monkeypatch.setattr(fused, "bucket_codes_fused", lambda *args: calls.append(1) or original(*args))
    match, rotations = torch.randn(2, 500, 64, device="cuda"), torch.randn(3, 64, 8, device="cuda")
    codes = hash_codes(match, rotations)
    assert calls and fused.fused_kernel_failure() is None
    assert fused.bucket_shortfall(codes, match, rotations) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_hash_kernel_compiles_for_gpus(arch):
    """The hashing kernel at the paper layer's sizes (d=64, up to 128 buckets) for sm_80 and sm_90."""
    pytest.importorskip("triton.backends.nvidia")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = fused._kernel(fused._hash_codes_kernel, False)
    constants = dict(BLOCK_L=fused.HASH_BLOCK_POSITIONS, BLOCK_D=64, BLOCK_B=128, INTERPRETED=False)
    pointers = {"MATCH": "*fp32", "ROTATIONS": "*fp32", "CODES": "*i64"}
    signature = {name: "constexpr" if name in constants else pointers.get(name, "i32") for name in kernel.arg_names}
    attributes = {(index,): [["tt.divisibility", 16]] for index, name in enumerate(kernel.arg_names) if name in pointers}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attributes)
    compiled = triton_compile(source, GPUTarget("cuda", arch, 32), fused.HASH_WARPS, 1)
    assert compiled.metadata.shared <= SHARED_MEMORY_LIMIT[arch]
    spill = register_spill_bytes(compiled)
    assert spill is None or spill == 0, f"{spill} bytes of register spills per thread"


# ------------------------------------------------------------------------------------------------
# Orthonormal rotations in one kernel (training on CUDA in eager mode).
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 64, 18), (2, 128, 64), (3, 50, 18), (2, 18, 18), (1, 4, 1)],
                         ids=["paper 48x48", "paper 128 buckets", "partial tile", "square", "one column"])
def test_orthonormal_kernel_gives_cholesky_qrs_q(shape, device):
    """Gram-Schmidt twice in float64 and Cholesky QR: the same Q (unique with diag(R) > 0) to float32."""
    from dlsn.models.gla import orthonormal_columns

    gaussian = torch.randn(*shape, generator=torch.Generator().manual_seed(4)).to(device)
    q = fused.orthonormal_columns_fused(gaussian)
    assert q.dtype == torch.float32 and q.shape == shape
    torch.testing.assert_close(q, orthonormal_columns(gaussian), rtol=0, atol=1e-6)


def test_orthonormal_kernel_survives_nearly_dependent_columns():
    torch.manual_seed(0)
    matrix = torch.randn(2, 64, 64, dtype=torch.float64)
    matrix[:, :, 1] = matrix[:, :, 0] + 1e-10 * torch.randn(2, 64, dtype=torch.float64)  # condition ~1e11
    q = fused.orthonormal_columns_fused(matrix)
    torch.testing.assert_close(q.mT @ q, torch.eye(64, dtype=torch.float64).expand(2, -1, -1), rtol=0, atol=1e-12)
    r = q.mT @ matrix  # the QR factor: upper triangular with a positive diagonal
    assert torch.tril(r, diagonal=-1).abs().max() < 1e-12 and (torch.diagonal(r, dim1=-2, dim2=-1) > 0).all()
    with pytest.raises(ValueError, match="expected tall matrices"):
        fused.orthonormal_columns_fused(matrix[:, :10])


def test_orthonormal_columns_fast_checks_the_kernel_and_falls_back(monkeypatch, fresh_fallback_state):
    """The kernel is taken for CUDA tensors with small tiles only; its self-check catches a wrong Q; a failure
    warns once and the plain function computes the result."""
    plain_calls = []

    def plain(matrix):
        plain_calls.append(matrix.shape)
        from dlsn.models.gla import orthonormal_columns
        return orthonormal_columns(matrix)

    gaussian = torch.randn(3, 64, 18)
    torch.testing.assert_close(fused.orthonormal_columns_fast(gaussian, plain), plain(gaussian))  # CPU: plain
    fused.orthonormal_self_check(torch.device("cpu"), plain)  # the real kernel passes
    monkeypatch.setattr(fused, "orthonormal_columns_fused", lambda matrix: matrix)  # not orthonormal
    with pytest.raises(RuntimeError, match="rotation self-check: the kernel's Q is .* away from Cholesky QR's"):
        fused.orthonormal_self_check(torch.device("cpu"), plain)

    class CudaLooking:  # an object that says it is on CUDA, to reach the kernel path without a GPU
        is_cuda = True
        device = torch.device("cpu")

        def __init__(self, *shape):
            self.shape = shape

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tile over ORTHONORMAL_MAX_TILE never reaches the kernel
        assert fused.orthonormal_columns_fast(CudaLooking(3, 128, 64), lambda matrix: "plain result") == "plain result"
        assert fused.orthonormal_columns_fast(CudaLooking(3, 64, 33), lambda matrix: "plain result") == "plain result"
    with pytest.warns(RuntimeWarning, match="fused rotation kernel failed"):
        result = fused.orthonormal_columns_fast(CudaLooking(3, 64, 18), lambda matrix: "plain result")
    assert result == "plain result" and fused.fused_kernel_failure() is not None


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("tile, max_spill", [((64, 32), 0), ((128, 64), 128)],
                         ids=["48x48 (18 buckets)", "128 buckets"])
def test_orthonormal_kernel_compiles_for_gpus(arch, tile, max_spill):
    """The orthonormalisation kernel for sm_80 and sm_90 at the paper layer's tiles (float64): no register
    spills at the training size, a few (80 bytes per thread, Triton 3.9) at the largest, 128 buckets."""
    pytest.importorskip("triton.backends.nvidia")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = fused._kernel(fused._orthonormal_columns_kernel, False)
    constants = dict(BLOCK_M=tile[0], BLOCK_N=tile[1])
    signature = {name: "constexpr" if name in constants else "*fp32" if name.isupper() else "i32"
                 for name in kernel.arg_names}
    attributes = {(index,): [["tt.divisibility", 16]] for index, name in enumerate(kernel.arg_names)
                  if name.isupper() and name not in constants}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attributes)
    compiled = triton_compile(source, GPUTarget("cuda", arch, 32), fused.ORTHONORMAL_WARPS, 1)
    assert compiled.metadata.shared <= SHARED_MEMORY_LIMIT[arch]
    spill = register_spill_bytes(compiled)
    assert spill is None or spill <= max_spill, f"{spill} bytes of register spills per thread"


# ------------------------------------------------------------------------------------------------
# Mixing the rounds (dlsn::mix_rounds).
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 3, 37, 20), (1, 2, 5, 300), (1, 1, 16, 256)],
                         ids=["partial position block", "two channel blocks", "one round"])
def test_mix_rounds_forward_and_backward_are_the_weighted_sum(shape, device):
    generator = torch.Generator().manual_seed(0)
    attended = torch.randn(*shape, generator=generator).to(device).requires_grad_(True)
    weights = torch.softmax(torch.randn(*shape[:3], generator=generator), 1).to(device).requires_grad_(True)
    mixed = fused.mix_rounds(attended, weights)
    exact = [t.detach().double().requires_grad_(True) for t in (attended, weights)]
    expected = (exact[0] * exact[1].unsqueeze(-1)).sum(1)
    torch.testing.assert_close(mixed.double(), expected, rtol=1e-6, atol=1e-6)
    grad = torch.randn(mixed.shape, generator=generator).to(device)
    got = torch.autograd.grad(mixed, (attended, weights), grad)
    want = torch.autograd.grad(expected, exact, grad.double())
    for name, got_grad, want_grad in zip(("attended", "weights"), got, want):
        torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-5, atol=1e-5, msg=name)


def test_mix_rounds_failure_surfaces_or_falls_back(monkeypatch, fresh_fallback_state):
    def broken_kernel(*args, **kwargs):
        raise RuntimeError("out of cheese")

    monkeypatch.setattr(fused, "_mix_launch", broken_kernel)
    attended, weights = torch.randn(1, 2, 5, 4, requires_grad=True), torch.full((1, 2, 5), 0.5, requires_grad=True)
    with pytest.raises(RuntimeError, match="out of cheese"):
        fused.mix_rounds(attended, weights)
    with pytest.warns(RuntimeWarning, match=r"fused round-mixing kernel failed \(RuntimeError: out of cheese\)"):
        mixed = fused.mix_rounds(attended, weights, fallback=True)
    torch.testing.assert_close(mixed, 0.5 * attended.sum(1))
    mixed.sum().backward()  # the backward computes it plainly as well
    torch.testing.assert_close(weights.grad, attended.detach().sum(-1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 3, 37, 20), (1, 2, 5, 300), (1, 1, 16, 256)],
                         ids=["partial row block", "two channel blocks", "one block"])
def test_the_float32_backwards_delta_is_each_rows_dot_product_less_the_log_sum_exps_gradient(shape, device):
    """``_delta`` (one kernel): ``dy . y - dlse`` per row, what the float32 backward's softmax term needs, for
    rows that fill no whole block, channels over two blocks (the second part-masked) and a strided ``dlse``."""
    generator = torch.Generator().manual_seed(0)
    grad_attended, attended = (torch.randn(*shape, generator=generator).to(device) for _ in range(2))
    grad_confidence = torch.randn(*shape[:2], 2 * shape[2], generator=generator).to(device)[..., ::2]
    delta = fused._delta(grad_attended, attended, grad_confidence)
    expected = (grad_attended.double() * attended.double()).sum(-1) - grad_confidence.double()
    assert delta.shape == shape[:3] and delta.dtype == torch.float32
    torch.testing.assert_close(delta.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 3, 37, 16, 20), (1, 2, 40, 10, 300), (1, 1, 9, 9, 8)],
                         ids=["padding, partial position block", "exact multiple, two channel blocks", "one chunk"])
def test_sorted_rows_summed_over_rounds_are_each_positions_rows_and_padded_duplicates(shape, device):
    """``_SortedWindows.sum_over_rounds`` (one kernel; the "+matmul" modes' dV): per-round results in the
    batched products' layout (``n + 2`` chunk positions per round, chunk position ``c`` holding sorted chunk
    ``c``) summed in image order, over the rounds and over each position's copies in the padded order."""
    batch, rounds, length, chunk, width = shape
    _, order, inverse = random_problem(batch, rounds, length, chunk, 1, 1)
    windows = fused._SortedWindows(order.to(device), inverse.to(device), chunk)
    n_chunks = order.shape[-1] // chunk
    generator = torch.Generator().manual_seed(1)
    sorted_rows = torch.randn(batch * rounds * (n_chunks + 2), chunk, width, generator=generator)
    expected = torch.zeros(batch, length, width, dtype=torch.float64)
    per_round = sorted_rows.double().view(batch, rounds, (n_chunks + 2) * chunk, width)
    for item, hash_round in itertools.product(range(batch), range(rounds)):  # every sorted entry, duplicates too
        expected[item].index_add_(0, order[item, hash_round], per_round[item, hash_round, :order.shape[-1]])
    summed = windows.sum_over_rounds(sorted_rows.to(device))
    assert summed.shape == (batch, length, width) and summed.dtype == torch.float32
    torch.testing.assert_close(summed.double().cpu(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("name", ["forward", "backward", "delta", "sum of sorted rows"])
def test_mix_rounds_kernels_compile_for_gpus(name, arch):
    """Both mixing kernels at the paper layer's C=256 (the backward holds all channels), the float32
    backward's delta kernel and the "+matmul" modes' sum of dV over the rounds, for sm_80 and sm_90: no spills."""
    pytest.importorskip("triton.backends.nvidia")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    function, constants, warps = {
        "forward": (fused._mix_rounds_kernel, dict(BLOCK_L=fused.MIX_BLOCK_POSITIONS, BLOCK_C=256), fused.MIX_WARPS),
        "backward": (fused._mix_rounds_backward_kernel, dict(BLOCK_L=fused.MIX_BLOCK_POSITIONS, BLOCK_C=256),
                     fused.MIX_WARPS),
        "delta": (fused._delta_kernel, dict(BLOCK_R=fused.DELTA_BLOCK_ROWS, BLOCK_C=fused.DELTA_BLOCK_CHANNELS),
                  fused.DELTA_WARPS),
        "sum of sorted rows": (fused._sum_sorted_rows_kernel,
                               dict(BLOCK_L=fused.SUM_BLOCK_POSITIONS, BLOCK_C=fused.SUM_BLOCK_CHANNELS),
                               fused.SUM_WARPS),
    }[name]
    kernel = fused._kernel(function, False)
    pointers = {argument: "*i64" if argument == "INVERSE" else "*fp32" for argument in kernel.arg_names
                if argument.isupper() and argument not in constants}
    signature = {argument: "constexpr" if argument in constants else pointers.get(argument, "i32")
                 for argument in kernel.arg_names}
    attributes = {(index,): [["tt.divisibility", 16]] for index, argument in enumerate(kernel.arg_names)
                  if argument in pointers}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attributes)
    compiled = triton_compile(source, GPUTarget("cuda", arch, 32), warps, 1)
    assert compiled.metadata.shared <= SHARED_MEMORY_LIMIT[arch]
    spill = register_spill_bytes(compiled)
    assert spill is None or spill == 0, f"{spill} bytes of register spills per thread"
