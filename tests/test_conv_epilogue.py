"""The fused convolution epilogue (dlsn/models/conv_epilogue.py) against the eager formula.

On the CPU the Triton kernel runs in Triton's interpreter: the same arithmetic as on the GPU, slow, so
the problems are small (two blocks of the kernel, the second one partial).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from dlsn.models import DLSN
from dlsn.models import conv_epilogue
from dlsn.models.conv_epilogue import conv2d_epilogue

pytestmark = pytest.mark.skipif(not conv_epilogue.triton_available(),
                                reason="the fused epilogue needs the triton package")

CHANNELS_LAST = torch.channels_last

# Each epilogue the model uses, and the remaining combination.
EPILOGUES = {
    "relu": dict(relu=True),
    "residual": dict(residual=True),
    "scale+residual": dict(scale=0.1, residual=True),
    "relu+scale+residual": dict(relu=True, scale=0.1, residual=True),
}


def conv_problem(channels: int, seed: int = 0, height: int = 7, width: int = 9):
    """Channels-last x, weight and residual ([2, C, H, W]), and a bias."""
    generator = torch.Generator().manual_seed(seed)

    def random(*shape, std=1.0):
        return (std * torch.randn(*shape, generator=generator)).contiguous(memory_format=CHANNELS_LAST)

    x = random(2, channels, height, width)
    weight = random(channels, channels, 3, 3, std=channels ** -0.5 / 3)
    bias = torch.randn(channels, generator=generator)
    residual = random(2, channels, height, width)
    return x, weight, bias, residual


def epilogue_arguments(name: str, residual: torch.Tensor) -> dict:
    arguments = dict(EPILOGUES[name])
    arguments["residual"] = residual if arguments.get("residual") else None
    return arguments


def eager_as_on_the_gpu(x, weight, bias, *, padding=1, relu=False, scale=1.0, residual=None):
    """The reference formula in the order eager PyTorch computes it on the GPU: cuDNN convolves without
    bias, then ``add_`` adds the bias in the convolution's dtype (one rounding per stored tensor)."""
    output = F.conv2d(x, weight, None, padding=padding)
    output = output + bias.to(output.dtype).view(1, -1, 1, 1)
    if relu:
        output = torch.relu(output)
    if scale != 1.0:
        output = scale * output
    if residual is not None:
        output = residual + output
    return output


@pytest.mark.parametrize("channels", [16, 24])
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_fused_equals_reference_bitwise_in_float32(channels, epilogue):
    """Bitwise against eager's order on the GPU (bias added after the bias-free convolution). oneDNN on
    the CPU may add the bias inside its convolution, before rounding: there the reference is within
    float32 rounding."""
    x, weight, bias, residual = conv_problem(channels)
    arguments = epilogue_arguments(epilogue, residual)
    fused = conv2d_epilogue(x, weight, bias, impl="fused", **arguments)
    assert fused.dtype == torch.float32 and fused.is_contiguous(memory_format=CHANNELS_LAST)
    assert torch.equal(fused, eager_as_on_the_gpu(x, weight, bias, **arguments))
    reference = conv2d_epilogue(x, weight, bias, impl="reference", **arguments)
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-6)
    assert torch.equal(x, conv_problem(channels)[0]) and torch.equal(residual, conv_problem(channels)[3])


@pytest.mark.parametrize("epilogue, output_dtype", [("relu", torch.bfloat16), ("scale+residual", torch.float32)])
def test_fused_rounds_like_eager_under_bfloat16_autocast(epilogue, output_dtype):
    """CPU autocast convolves in bfloat16. The float32 residual makes the output float32, so the rounding
    to bfloat16 after the bias and after the scaling shows in it."""
    x, weight, bias, residual = conv_problem(24, seed=1)
    arguments = epilogue_arguments(epilogue, residual)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = conv2d_epilogue(x, weight, bias, impl="fused", **arguments)
        on_the_gpu = eager_as_on_the_gpu(x, weight, bias, **arguments)
        reference = conv2d_epilogue(x, weight, bias, impl="reference", **arguments)
        bias_free = F.conv2d(x, weight, None, padding=1).float()
    assert fused.dtype == on_the_gpu.dtype == reference.dtype == output_dtype
    assert torch.equal(fused, on_the_gpu)
    # Not bitwise against the CPU reference: there oneDNN adds the bias to the float32 accumulator before
    # its one rounding to bfloat16, where the GPU (and the kernel) round the bias-free convolution first.
    # That extra rounding moves the result by at most 2^-8 of |conv| (bfloat16's unit roundoff), the
    # final roundings by 2^-8 of the result each: within 2^-7 of |conv| + |result|.
    error = (fused.float() - reference.float()).abs()
    assert (error <= 2**-7 * (bias_free.abs() + reference.float().abs())).all()


def test_fused_writes_into_the_convolution_output_unless_the_dtype_changes():
    x, weight, bias, residual = conv_problem(16)
    assert conv2d_epilogue(x, weight, bias, impl="fused", residual=residual).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bfloat16 convolution, float32 residual: a new tensor
        output = conv2d_epilogue(x, weight, bias, impl="fused", residual=residual)
    assert output.dtype == torch.float32 and output.is_contiguous(memory_format=CHANNELS_LAST)


def test_non_channels_last_input_falls_back_to_the_reference(monkeypatch):
    x, weight, bias, residual = conv_problem(16)
    x, residual = x.contiguous(), residual.contiguous()
    monkeypatch.setattr(conv_epilogue, "_launch_epilogue", _must_not_launch)
    output = conv2d_epilogue(x, weight, bias, impl="fused", relu=True, residual=residual, scale=0.5)
    expected = 0.5 * torch.relu(F.conv2d(x, weight, bias, padding=1)) + residual
    torch.testing.assert_close(output, expected, rtol=0, atol=0)


def _must_not_launch(*args, **kwargs):
    raise AssertionError("the fused kernel was launched")


def test_auto_uses_the_reference_on_the_cpu_and_with_autograd(monkeypatch):
    x, weight, bias, residual = conv_problem(16)
    monkeypatch.setattr(conv_epilogue, "_launch_epilogue", _must_not_launch)
    expected = conv2d_epilogue(x, weight, bias, impl="reference", residual=residual, scale=0.1)
    assert torch.equal(conv2d_epilogue(x, weight, bias, residual=residual, scale=0.1), expected)

    # What "auto" would do on a GPU (on_gpu=True), everything else as given:
    assert conv_epilogue._wants_fused(x, weight, bias, residual, on_gpu=True)
    assert not conv_epilogue._wants_fused(x, weight, bias, residual)  # CPU tensors
    trained = weight.clone().requires_grad_(True)
    assert not conv_epilogue._wants_fused(x, trained, bias, residual, on_gpu=True)
    with torch.no_grad():
        assert conv_epilogue._wants_fused(x, trained, bias, residual, on_gpu=True)
    assert not conv_epilogue._wants_fused(x.contiguous(), weight, bias, residual, on_gpu=True)
    assert not conv_epilogue._wants_fused(x, weight, bias, residual.contiguous(), on_gpu=True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not conv_epilogue._wants_fused(x, weight, bias, residual, on_gpu=True)


def test_auto_falls_back_after_a_kernel_failure_and_warns_once(monkeypatch):
    x, weight, bias, residual = conv_problem(16)
    monkeypatch.setattr(conv_epilogue, "_failure", None)
    monkeypatch.setattr(conv_epilogue, "_wants_fused", functools.partial(conv_epilogue._wants_fused, on_gpu=True))

    def failing_launch(*args, **kwargs):
        raise RuntimeError("no kernel today")

    monkeypatch.setattr(conv_epilogue, "_launch_epilogue", failing_launch)
    expected = conv2d_epilogue(x, weight, bias, impl="reference", relu=True, residual=residual)
    with pytest.warns(RuntimeWarning, match="no kernel today"):
        assert torch.equal(conv2d_epilogue(x, weight, bias, relu=True, residual=residual), expected)
    assert "no kernel today" in conv_epilogue.fused_kernel_failure()
    monkeypatch.setattr(conv_epilogue, "_launch_epilogue", _must_not_launch)  # given up: not tried again
    assert torch.equal(conv2d_epilogue(x, weight, bias, relu=True, residual=residual), expected)


def test_bad_arguments_are_named():
    x, weight, bias, residual = conv_problem(16)
    for impl in ("fused", "reference", "auto"):
        with pytest.raises(ValueError, match=r"residual must have the convolution output's shape \(2, 16, 7, 9\)"):
            conv2d_epilogue(x, weight, bias, residual=residual[:, :, :1], impl=impl)
    with pytest.raises(ValueError, match="impl must be one of"):
        conv2d_epilogue(x, weight, bias, impl="triton")


def test_dlsn_output_is_bitwise_the_same_with_the_fused_epilogue(monkeypatch):
    torch.manual_seed(0)
    model = DLSN(2, n_feats=16, n_resgroups=2, n_resblocks=2, chunk_size=16, n_hashes=1).eval()
    model.set_rotation_seed(0)
    x = torch.rand(1, 3, 9, 11).contiguous(memory_format=CHANNELS_LAST)
    with torch.no_grad():
        # The reference in eager's order on the GPU (see test_fused_equals_reference_bitwise_in_float32),
        # so that the CPU's oneDNN, whatever it does with a bias, cannot move a hash bucket.
        monkeypatch.setattr(conv_epilogue, "conv2d_epilogue_reference", eager_as_on_the_gpu)
        expected = model(x)

        # "auto" as on a GPU: every epilogue of the residual blocks and groups, and GLA's embedding
        # convolution (bias and ReLU), goes through the kernel.
        launches = []
        launch = conv_epilogue._launch_epilogue
        monkeypatch.setattr(conv_epilogue, "_failure", None)
        monkeypatch.setattr(conv_epilogue, "_wants_fused",
                            functools.partial(conv_epilogue._wants_fused, on_gpu=True))
        monkeypatch.setattr(conv_epilogue, "_launch_epilogue",
                            lambda *args, **kwargs: launches.append(1) or launch(*args, **kwargs))
        fused = model(x)
    # per group: two per residual block, one for GLA's stacked embeddings, one for the group's conv; then
    # the body's last convolution with the long skip
    assert len(launches) == 2 * (2 * 2 + 1 + 1) + 1
    assert conv_epilogue.fused_kernel_failure() is None  # (a failing kernel would fall back to the reference)
    assert torch.equal(fused, expected)


# ---------------------------------------------------------------- compiled for GPUs, without a GPU

def _ptx_for_gpu(arch: int, value_type: str, output_type: str, **epilogue) -> str:
    """PTX of the kernel for sm_``arch`` (Triton's ahead-of-time compiler and ptxas, no GPU needed),
    launched as :func:`conv_epilogue._launch_epilogue` launches it on CUDA."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = conv_epilogue._kernel(False)
    constants = dict(HAS_BIAS=True, RELU=epilogue.get("relu", False), HAS_SCALE="scale" in epilogue,
                     HAS_RESIDUAL="residual" in epilogue, WIDE_OFFSETS=False, BLOCK=conv_epilogue.BLOCK)
    if not constants["HAS_RESIDUAL"]:
        constants["RESIDUAL"] = None  # as a launch with residual=None specialises it
    pointers = {"Y": value_type, "BIAS": value_type, "RESIDUAL": output_type, "OUT": output_type}
    signature, attributes = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = f"*{pointers[name]}"
            attributes[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name == "scale" else "i32"  # numel is not specialised on
            if name == "channels":  # 256 at the paper configuration
                attributes[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attributes)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=conv_epilogue.GPU_LAUNCH_OPTIONS)
    return compiled.asm["ptx"]


@pytest.mark.parametrize("arch", [80, 90])
def test_kernel_compiles_for_gpus_with_vector_loads_and_no_fused_multiply_add(arch):
    """Each epilogue of the model compiles for sm_80 and sm_90 in float32 and bf16, as launched on CUDA;
    the convolution output is read 16 bytes at a time, and no multiply-add is fused (eager rounds
    ``scale * t`` before adding the residual: ``GPU_LAUNCH_OPTIONS``)."""
    pytest.importorskip("triton.backends.nvidia")
    import re

    for value_type, output_type in (("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32")):
        for name, epilogue in EPILOGUES.items():
            if value_type != output_type and not epilogue.get("residual"):
                continue  # without a residual the output has the convolution's dtype
            ptx = _ptx_for_gpu(arch, value_type, output_type, **epilogue)
            assert re.search(r"ld\.global(\.\w+)*\.v4", ptx), (value_type, output_type, name)
            assert not re.search(r"\bfma\.rn\.f32", ptx), (value_type, output_type, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_on_the_gpu_auto_fuses_and_equals_the_eager_formula_bitwise(precision):
    """On CUDA eager PyTorch adds the bias after cuDNN's convolution, as the kernel does: "auto" (what
    the model runs in inference) gives the reference's bits, in float32 and under bf16 autocast."""
    x, weight, bias, residual = (t.cuda() for t in conv_problem(32, height=33, width=35))
    launched = []
    original = conv_epilogue._launch_epilogue
    for name in EPILOGUES:
        arguments = epilogue_arguments(name, residual)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            expected = conv2d_epilogue(x, weight, bias, impl="reference", **arguments)
            conv_epilogue._launch_epilogue = lambda *a, **k: launched.append(name) or original(*a, **k)
            try:
                fused = conv2d_epilogue(x, weight, bias, **arguments)
            finally:
                conv_epilogue._launch_epilogue = original
        assert torch.equal(fused, expected), name
    assert launched == list(EPILOGUES) and conv_epilogue.fused_kernel_failure() is None
