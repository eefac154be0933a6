"""The weight gradient of 3x3 convolutions other ways than cuDNN's (dlsn.models.conv_weight_grad): the numbers
of the Triton kernel (on the CPU, in Triton's interpreter) and of im2col, the timed choice that may put them in
GLA's backward, and the kernel's compiles for the GPUs (slow: ahead of time, no GPU needed)."""

from __future__ import annotations

import types

import pytest
import torch

from dlsn.models import chunk_attention, conv_weight_grad, float32_ops, timed_choice
from tests.helpers.gpu_compile import SHARED_MEMORY_LIMIT, register_spill_bytes, triton_compile
from tests.helpers.runs import load_script

CPU = torch.device("cpu")
SMALL_CONFIGS = [(16, 16, 16, 4, 1), (8, 16, 8, 4, 1)]

pytestmark = pytest.mark.skipif(not chunk_attention.triton_available(), reason="triton is not importable")


@pytest.fixture(autouse=True)
def fresh_choices():
    timed_choice.forget()
    yield
    timed_choice.forget()


def _problem(batch=2, channels=16, out_channels=12, height=5, width=7, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)

    def random(*shape):
        values = torch.randn(*shape, generator=generator, dtype=dtype)
        return values.contiguous(memory_format=torch.channels_last) if values.dim() == 4 else values

    return (random(batch, channels, height, width), random(batch, out_channels, height, width),
            random(out_channels, channels, 3, 3), random(out_channels))


def _reference(grad_y, x, weight, output_mask=(True, True, True)):
    return torch.ops.aten.convolution_backward(grad_y.double(), x.double(), weight.double(), [weight.shape[0]],
                                               [1, 1], [1, 1], [1, 1], False, [0, 0], 1, list(output_mask))


@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=["one input block", "taps x blocks"])
def test_the_kernel_is_the_convolutions_weight_gradient_with_padding_and_splits(config):
    """Positions split over several programs (their partial sums added), output channels (12) fewer than a
    block, taps reaching outside the image (zero padding); 16 input channels in blocks of 8 and of 16."""
    x, grad_y, weight, _ = _problem()
    exact = _reference(grad_y, x, weight)[1]
    for programs in (1, 64):  # one share of the positions, and several
        got = conv_weight_grad.weight_grad(x, grad_y, config, precision="ieee", programs=programs)
        assert got.shape == exact.shape and got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)


def test_im2col_is_the_convolutions_weight_gradient():
    x, grad_y, weight, _ = _problem()
    exact = _reference(grad_y, x, weight)[1]
    torch.testing.assert_close(conv_weight_grad.weight_grad_im2col(x, grad_y).double(), exact, rtol=1e-5, atol=1e-5)


def test_im2col_multiplies_in_tf32_on_cuda_whatever_the_setting():
    """Rounded as cuDNN's TF32 convolutions, though the training configs ask for "highest" matrix products;
    the setting is put back. The CPU's products are left alone."""
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        with float32_ops.float32_matmul_precision(torch.device("cuda"), "high"):  # nothing runs on the device
            assert torch.get_float32_matmul_precision() == "high"
        assert torch.get_float32_matmul_precision() == "highest"
        with float32_ops.float32_matmul_precision(CPU, "high"):
            assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(previous)


def test_the_kernel_refuses_what_it_cannot_compute():
    x, grad_y, _, _ = _problem()
    with pytest.raises(ValueError, match=r"expected float32 x \[N, C, H, W\] and grad_y \[N, O, H, W\], got "
                                         r"torch.float64 \(2, 16, 5, 7\)"):
        conv_weight_grad.weight_grad(x.double(), grad_y, SMALL_CONFIGS[0])
    with pytest.raises(ValueError, match=r"grad_y \[N, O, H, W\], got torch.float32 \(2, 16, 5, 7\) and "
                                         r"torch.float32 \(2, 12, 5, 6\)"):
        conv_weight_grad.weight_grad(x, grad_y[..., :6], SMALL_CONFIGS[0])


@pytest.mark.parametrize("method", ["im2col", conv_weight_grad.config_name(conv_weight_grad.CONFIGS[-1])])
@pytest.mark.parametrize("output_mask", [(True, True, True), (False, True, True), (True, True, False)])
def test_convolution_backward_by_each_method_equals_cudnns(monkeypatch, method, output_mask):
    """Each gradient asked for, none other; the weight's in the weight's memory format."""
    x, grad_y, weight, _ = _problem()
    monkeypatch.setattr(conv_weight_grad, "WEIGHT_GRAD_METHOD", method)
    got = conv_weight_grad.convolution_backward(grad_y, x, weight, 1, output_mask)
    for asked, gradient, reference in zip(output_mask, got, _reference(grad_y, x, weight, output_mask)):
        assert (gradient is None) == (not asked)
        if asked:
            torch.testing.assert_close(gradient.double(), reference, rtol=1e-5, atol=1e-5)
    assert got[1].is_contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(conv_weight_grad, "WEIGHT_GRAD_METHOD", "triton 1/2/3/4/5")
    with pytest.raises(ValueError, match=r"WEIGHT_GRAD_METHOD: expected 'timed', 'cudnn' or one of "
                                         r"\['im2col', .*'triton 64/64/64/4/3'\], got 'triton 1/2/3/4/5'"):
        conv_weight_grad.convolution_backward(grad_y, x, weight, 1, output_mask)


def test_the_other_methods_stand_in_only_where_they_compute_the_same():
    x, _, weight, _ = _problem()
    assert conv_weight_grad.alternatives_apply(x, weight, 1)
    assert not conv_weight_grad.alternatives_apply(x, weight, 0)  # another padding
    assert not conv_weight_grad.alternatives_apply(x.double(), weight.double(), 1)
    assert not conv_weight_grad.alternatives_apply(x[:, :, :3, :3], weight[..., :1, :1], 1)  # not 3x3
    # On CUDA, TF32 convolutions (the kernel's precision) must be allowed, by either API of the setting
    cuda_x = types.SimpleNamespace(dtype=torch.float32, is_cuda=True)  # what alternatives_apply reads of an input
    conv = torch.backends.cudnn.conv
    previous = conv.fp32_precision, torch.backends.cudnn.allow_tf32
    try:
        conv.fp32_precision = "ieee"
        assert not float32_ops.cudnn_tf32_allowed() and not conv_weight_grad.alternatives_apply(cuda_x, weight, 1)
        conv.fp32_precision = "tf32"
        assert float32_ops.cudnn_tf32_allowed() and conv_weight_grad.alternatives_apply(cuda_x, weight, 1)
        torch.backends.cudnn.allow_tf32 = False  # the legacy switch: the per-operation setting reads "none"
        assert not float32_ops.cudnn_tf32_allowed()
        torch.backends.cudnn.allow_tf32 = True
        assert float32_ops.cudnn_tf32_allowed()
    finally:
        torch.backends.cudnn.allow_tf32 = previous[1]
        conv.fp32_precision = previous[0]


@pytest.fixture
def fake_clock(monkeypatch):
    """Timing allowed on the CPU; a candidate costs ``costs[its name]`` milliseconds (cuDNN 1)."""
    monkeypatch.setattr(timed_choice, "timing_allowed", lambda device: True)
    costs: dict[str, float] = {}

    def fake_milliseconds(run, device):
        run()
        return costs.get(run.args[0] if run.func is conv_weight_grad._by else "cudnn", 1.0)

    monkeypatch.setattr(timed_choice, "milliseconds", fake_milliseconds)
    monkeypatch.setattr(conv_weight_grad, "CONFIGS", tuple(SMALL_CONFIGS))
    return costs


def test_the_timed_choice_keeps_the_faster_and_leaves_out_a_kernel_that_disagrees(fake_clock, monkeypatch, caplog):
    costs = fake_clock
    x, grad_y, weight, _ = _problem()
    costs.update({"im2col": 2.0, "triton 16/16/16/4/1": 0.5, "triton 8/16/8/4/1": 0.25})
    assert conv_weight_grad.weight_grad_method(grad_y, x, weight, 1) == "triton 8/16/8/4/1"
    [(what, entry)] = timed_choice.choices().items()
    assert what == ("convolution weight gradient cpu (2, 16, 5, 7) (12, 16, 3, 3) torch.channels_last "
                    "torch.channels_last")
    assert entry == {"choice": "triton 8/16/8/4/1",
                     "ms": {"cudnn": 1.0, "im2col": 2.0, "triton 16/16/16/4/1": 0.5, "triton 8/16/8/4/1": 0.25}}
    # The choice runs: the gradient is the kernel's (here the reference's to rounding)
    got = conv_weight_grad.convolution_backward(grad_y, x, weight, 1, (True, True, True))
    for gradient, reference in zip(got, _reference(grad_y, x, weight)):
        torch.testing.assert_close(gradient.double(), reference, rtol=1e-5, atol=1e-5)

    # A configuration whose gradient is off (a miscompile) is never timed, whatever it would cost
    timed_choice.forget()
    correct = conv_weight_grad.weight_grad

    def off_for_the_fastest(x, grad_y, config, *args, **kwargs):
        result = correct(x, grad_y, config, *args, **kwargs)
        return result * 1.05 if config == SMALL_CONFIGS[1] else result

    monkeypatch.setattr(conv_weight_grad, "weight_grad", off_for_the_fastest)
    with caplog.at_level("WARNING", logger="dlsn.models.conv_weight_grad"):
        assert conv_weight_grad.weight_grad_method(grad_y, x, weight, 1) == "triton 16/16/16/4/1"
    assert ("weight gradient triton 8/16/8/4/1 differs from cuDNN's by 5.00e-02 of an output channel's largest "
            "entry" in caplog.text)
    assert list(next(iter(timed_choice.choices().values()))["ms"]) == ["cudnn", "im2col", "triton 16/16/16/4/1"]


def test_a_kernel_wrong_only_in_channels_with_small_gradients_is_left_out(fake_clock, monkeypatch, caplog):
    """The agreement is judged per output channel: GLA's match channels get much smaller gradients than its value
    and score channels, and an error there (or in the partial last block of channels) is 5% of its own channel,
    5e-4 of the gradient's largest entry."""
    costs = fake_clock
    x, grad_y, weight, _ = _problem()
    grad_y[:, -1] *= 1e-2  # the last output channel's gradient a hundred times smaller than the others'
    costs.update({"triton 8/16/8/4/1": 0.25})
    correct = conv_weight_grad.weight_grad

    def off_in_the_last_channel(x, grad_y, config, *args, **kwargs):
        result = correct(x, grad_y, config, *args, **kwargs)
        if config == SMALL_CONFIGS[1]:
            result[-1] += 0.05 * result[-1].abs().max()
        return result

    monkeypatch.setattr(conv_weight_grad, "weight_grad", off_in_the_last_channel)
    with caplog.at_level("WARNING", logger="dlsn.models.conv_weight_grad"):
        assert conv_weight_grad.weight_grad_method(grad_y, x, weight, 1) != "triton 8/16/8/4/1"
    assert "weight gradient triton 8/16/8/4/1 differs from cuDNN's by 5.00e-02" in caplog.text
    # A channel whose gradient is almost nothing (1e-5 of the others') is judged on a thousandth of the largest
    # entry: its relative rounding can be large under TF32, and 5% of it is 5e-7 of the gradient.
    grad_y[:, -1] *= 1e-3
    timed_choice.forget()
    assert conv_weight_grad.weight_grad_method(grad_y, x, weight, 1) == "triton 8/16/8/4/1"


def test_cudnn_stays_where_nothing_is_timed_or_the_kernel_does_not_apply(fake_clock, monkeypatch):
    costs = fake_clock
    costs.update({"triton 16/16/16/4/1": 0.5})
    x, grad_y, weight, _ = _problem()
    assert conv_weight_grad.weight_grad_method(grad_y, x.double(), weight.double(), 1) == "cudnn"
    monkeypatch.setattr(conv_weight_grad, "WEIGHT_GRAD_METHOD", "cudnn")
    assert conv_weight_grad.weight_grad_method(grad_y, x, weight, 1) == "cudnn"
    assert timed_choice.choices() == {}
    monkeypatch.setattr(conv_weight_grad, "WEIGHT_GRAD_METHOD", "timed")
    monkeypatch.setattr(timed_choice, "timing_allowed", lambda device: False)  # the CPU, evaluation
    # ... where the choice is not even looked up (no key built per backward)
    monkeypatch.setattr(timed_choice, "fastest", lambda *args, **kwargs: pytest.fail("looked up a timed choice"))
    assert conv_weight_grad.weight_grad_method(grad_y, x, weight, 1) == "cudnn"
    assert timed_choice.choices() == {}


def test_gla_embeddings_backward_takes_the_chosen_weight_gradient(monkeypatch):
    """relu_convolution_groups' backward (GLA's three embeddings in float32 training) computes its stacked weight
    gradient with the method chosen, and the gradients stay those of cuDNN."""
    x, _, weight, bias = _problem(out_channels=12)
    sizes = [3, 5, 4]
    leaves = [tensor.detach().requires_grad_(True) for tensor in (x, weight, bias)]

    def gradients():
        groups = float32_ops.relu_convolution_groups(*leaves, sizes, padding=1, first_in_float32=False)
        loss = sum((group * torch.linspace(-1, 1, group.numel()).view_as(group)).sum() for group in groups)
        return torch.autograd.grad(loss, leaves)

    expected = gradients()
    used = []
    kernel = conv_weight_grad.weight_grad
    monkeypatch.setattr(conv_weight_grad, "weight_grad", lambda *args, **kwargs: used.append(args[2]) or kernel(
        *args, **kwargs))
    last = conv_weight_grad.config_name(conv_weight_grad.CONFIGS[-1])
    monkeypatch.setattr(conv_weight_grad, "WEIGHT_GRAD_METHOD", last)
    for got, want in zip(gradients(), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert used == [conv_weight_grad.CONFIGS[-1]]


def test_the_benchmark_times_the_configurations_the_model_offers():
    script = load_script("benchmark_weight_grad")
    assert set(conv_weight_grad.CONFIGS) <= set(script.TRITON_CONFIGS["paper"])


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_every_configuration_compiles_for_the_gpus_without_spills(arch):
    """Each configuration the model offers or the benchmark times compiles (sm_90: to wgmma, the point of the
    larger tiles), fits the GPU's shared memory and spills no registers."""
    pytest.importorskip("triton.backends.nvidia")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = triton.jit(conv_weight_grad._weight_grad_kernel)
    benchmarked = load_script("benchmark_weight_grad").TRITON_CONFIGS["paper"]
    configs = dict.fromkeys([*conv_weight_grad.CONFIGS, *benchmarked])
    for rows, outputs, inputs, warps, stages in configs:
        constants = dict(BLOCK_P=rows, BLOCK_O=outputs, BLOCK_C=inputs, KERNEL=3, PAD=1, PRECISION="tf32")
        signature, attributes = {}, {}
        for index, argument in enumerate(kernel.arg_names):
            if argument in constants:
                signature[argument] = "constexpr"
            elif argument.isupper():  # a pointer
                signature[argument] = "*fp32"
                attributes[(index,)] = [["tt.divisibility", 16]]
            else:
                signature[argument] = "i32"
                if argument in ("in_channels", "out_channels", "positions_per_split"):
                    attributes[(index,)] = [["tt.divisibility", 16]]
        source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attributes)
        compiled = triton_compile(source, GPUTarget("cuda", arch, 32), warps, stages)
        what = f"sm_{arch}, {rows}/{outputs}/{inputs}/{warps}/{stages}"
        assert compiled.metadata.shared <= SHARED_MEMORY_LIMIT[arch], what
        assert register_spill_bytes(compiled) in (None, 0), what
        if arch >= 90:
            assert "wgmma.mma_async" in compiled.asm["ptx"], what

