"""Check the GPU-only claims of the model side before timing it (run first by scripts/gpu_check.sh).

    python scripts/check_fused_gla.py --json check.json          # on a CUDA machine, ~1-2 minutes
    python scripts/check_fused_gla.py --device cpu --small        # a smoke test of this script on the CPU

``--small`` (toy layers, for Triton's interpreter) runs each backward launch configuration once: the variants
pairing a query with a values kernel configuration are left to the GPU run (``backward_variants(...,
combinations=False)``).

Checks, each printed as PASS/FAIL with its numbers:

1. the fused kernel's self-check (float64 reference, padding, blocks, strided inputs) in float32
   (true float32 and TF32 dot products) and bfloat16;
2. GLA with the fused kernel (its backward as each variant the training steps may time and pick:
   ``chunk_attention.backward_variants``) against the reference implementation, paper layer (C=256,
   k=128, 3 hashes) at 48x48 batch 2 and 96x96 batch 1, same weights and rotations: output, input
   and parameter gradients, float32 with TF32 matrix products on both sides (to 2e-2 of each
   tensor's largest entry) and under bfloat16 autocast (error against float32 at most 1.25x the
   reference's own bfloat16 error + 0.01); in float32 also each variant as training's attention node
   with the round mixing runs it (``attend_and_mix``: the kernels reading the mixed output's gradient
   and the round weights) against its separate nodes (to 1e-2);
3. the match embedding in true float32 with cuDNN TF32 on (against a float64 convolution), by each
   ``FLOAT32_CONV_METHOD`` (cuDNN with TF32 off, split products on TF32 tensor cores), and its time at
   the training size (CUDA); the hashing kernel (``bucket_codes``): every bucket it picks attains the
   float64 maximum to float32 rounding at the paper layer's sizes, and its time against the einsum and
   argmax it replaces (CUDA);
4. training-time rotations drawn on the GPU: no host synchronisation, capturable in a CUDA graph, the
   orthonormalisation kernel equal to Cholesky QR;
5. a GLA training forward+backward (fused, rotations drawn inside, cuDNN's autotuner on as in the
   training steps, so the timed choices are made in the warm-up and kept) without host
   synchronisation (``torch.cuda.set_sync_debug_mode("error")``), and captured and replayed as a CUDA
   graph;
6. ``torch.compile(GLA, fullgraph=True)`` forward+backward matches eager, TF32 (``--no-compile`` skips it).

Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from dlsn.models import GLA
from dlsn.models import chunk_attention, conv_epilogue, conv_weight_grad, float32_ops, timed_choice
from dlsn.models.float32_ops import conv2d_float32, projections_float32
from dlsn.models.gla import draw_rotations, draw_rotations_on_device, number_of_buckets, orthonormal_columns

# The self-check's precisions (dtype, float32 matmul precision), and the GLA problems of check 2 (channels,
# chunk size, [(batch, size)]), at the paper layer's sizes and at --small's: scripts/warm_kernel_cache.py
# compiles the kernels of the same runs.
SELF_CHECK_PRECISIONS = ((torch.float32, "highest"), (torch.float32, "high"), (torch.bfloat16, "highest"))
GLA_PROBLEMS = {"paper": (256, 128, [(2, 48), (1, 96)]), "small": (16, 8, [(2, 6), (1, 9)])}
# The attention node with the round mixing (attend_and_mix) against the separate nodes, TF32 dot products on both
# sides: the round weights scale the probabilities (and dP) inside the kernels, where the separate nodes scale
# the incoming gradient before them, so TF32 rounds other numbers: about 1e-3 of the largest entry of one dV
# block (simulated, 384 x 384 x 256). The self-check's TF32 tolerance: a wrong kernel is off by about 1.
WEIGHTED_AGREEMENT = chunk_attention.SELF_CHECK_TOLERANCE["tf32"]

RESULTS: list[dict] = []
JSON_FILE: dict = {}  # --json: path and header; rewritten after every check, so a run cut short keeps its results


def write_json() -> None:
    if JSON_FILE:
        JSON_FILE["path"].write_text(json.dumps(JSON_FILE["header"] | {"results": RESULTS}, indent=1))


def check(name: str):
    """Run the decorated function now; record PASS (it returned details), or FAIL (it raised)."""
    def run(function):
        start = time.perf_counter()
        try:
            details = function() or {}
            status = "PASS"
        except Exception as error:  # noqa: BLE001 - every failure is a reported result
            details = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=6)}
            status = "FAIL"
        seconds = time.perf_counter() - start
        RESULTS.append(dict(check=name, status=status, seconds=round(seconds, 1), **details))
        write_json()
        shown = {k: v for k, v in details.items() if k != "traceback"}
        print(f"[{status}] {name} ({seconds:.1f} s) {json.dumps(shown)}", flush=True)
        if status == "FAIL":
            print(details["traceback"], flush=True)
        return function
    return run


def median_cuda_ms(run, warmup: int = 3, repeats: int = 20) -> float:
    """Median milliseconds of ``run()`` on the current CUDA stream (CUDA events)."""
    for _ in range(warmup):
        run()
    device = torch.device("cuda", torch.cuda.current_device())
    return statistics.median(timed_choice.milliseconds(run, device) for _ in range(repeats))


def gla_problem(channels, chunk_size, batch, size, device):
    """The fused and the reference GLA (3 hashes) with the same weights, an input and its rotations."""
    torch.manual_seed(0)
    reference = GLA(channels, chunk_size=chunk_size, n_hashes=3, attention_impl="reference").to(device)
    fused = GLA(channels, chunk_size=chunk_size, n_hashes=3, attention_impl="fused").to(device)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(batch, channels, size, size, device=device)
    rotations = torch.nn.init.orthogonal_(
        torch.empty(3, channels // 4, number_of_buckets(size * size, chunk_size))).to(device)
    return fused, reference, x, rotations


def outputs_and_gradients(layer, x, rotations, bf16=False):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        output = layer(x, rotations)
    output.float().square().mean().backward()
    return [output.detach().float(), x.grad] + [p.grad for p in layer.parameters()]


@contextlib.contextmanager
def backward_variant(device: torch.device, dtype: torch.dtype, name: str):
    """The fused backward as the variant ``name`` of ``chunk_attention.backward_variants`` (its mode, and
    its key, query or values kernel's launch configurations for ``dtype``), restored after."""
    mode, variant_configs = chunk_attention.backward_variants(device, dtype)[name]
    generation = chunk_attention._generation(device)
    saved_modes = dict(chunk_attention.BACKWARD_MODE)
    saved_channels = dict(chunk_attention.VALUES_CHANNEL_BLOCK)
    configs = chunk_attention.LAUNCH_CONFIGS[generation]
    saved_configs = dict(configs)
    chunk_attention.BACKWARD_MODE.update(dict.fromkeys(saved_modes, mode))
    precision = chunk_attention._precision_class(dtype)
    for kernel in ("keys", "queries"):
        if kernel in variant_configs:
            configs[kernel, precision] = variant_configs[kernel]
    if "values" in variant_configs:
        configs["values", precision] = variant_configs["values"][:3]
        chunk_attention.VALUES_CHANNEL_BLOCK[generation] = variant_configs["values"][3]
    try:
        yield
    finally:
        chunk_attention.BACKWARD_MODE.update(saved_modes)
        chunk_attention.VALUES_CHANNEL_BLOCK.update(saved_channels)
        configs.update(saved_configs)


@contextlib.contextmanager
def forward_mode(device: torch.device, mode: str):
    """The fused forward as ``mode`` (one of ``chunk_attention.FORWARD_MODES``), restored after."""
    saved = dict(chunk_attention.FORWARD_MODE)
    chunk_attention.FORWARD_MODE.update(dict.fromkeys(saved, mode))
    try:
        yield
    finally:
        chunk_attention.FORWARD_MODE.update(saved)


def names(layer):
    return ["output", "input gradient"] + [f"grad {n}" for n, _ in layer.named_parameters()]


def agreement(layer, got, want, tolerance: float) -> dict:
    """``layer``'s output and gradients ``got`` against ``want``, each to ``tolerance`` of its largest entry
    (asserted): the worst and its error."""
    errors = {n: ((g - w).abs().max() / w.abs().max().clamp_min(1e-12)).item()
              for n, g, w in zip(names(layer), got, want)}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tolerance, f"{worst} differs by {errors[worst]:.3g} of its largest entry"
    return {"worst": worst, "relative_error": errors[worst]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny layers (for a CPU smoke test)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.json:
        JSON_FILE.update(path=Path(args.json), header={"device": str(device), "torch": torch.__version__})
        write_json()
    cuda = device.type == "cuda"
    torch.set_float32_matmul_precision("highest")
    channels, chunk_size, sizes = GLA_PROBLEMS["small" if args.small else "paper"]
    combinations = not args.small  # in the interpreter each variant costs seconds
    print(f"torch {torch.__version__}, triton "
          f"{getattr(chunk_attention.triton, '__version__', 'absent')}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if cuda else "")
          + f", cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}", flush=True)

    for dtype, matmul_precision in SELF_CHECK_PRECISIONS:
        @check(f"fused kernel self-check, {dtype}, float32 matmul precision {matmul_precision}")
        def _():
            torch.set_float32_matmul_precision(matmul_precision)
            try:
                chunk_attention.self_check(device, dtype, combinations)
            finally:
                torch.set_float32_matmul_precision("highest")

    for batch, size in sizes:
        # Every backward (mode, kernel configurations) and forward the float32 training steps' timed choices may pick.
        ways = [(f"backward {variant}", functools.partial(backward_variant, device, torch.float32, variant))
                for variant in chunk_attention.backward_variants(device, torch.float32, combinations)]
        ways += [(f"forward {mode}", functools.partial(forward_mode, device, mode))
                 for mode in chunk_attention.FORWARD_MODES[1:]]
        for what, way in ways:
            @check(f"fused ({what}) vs reference GLA C={channels} k={chunk_size} {batch}x{size}x{size}, "
                   f"float32, matmul precision high")
            def _():
                # TF32 dot products (what auto uses in float32): true float32 is checked strictly, at 1e-4, by
                # the self-check above; its kernels compile slowly at this size and auto never runs them.
                fused, reference, x, rotations = gla_problem(channels, chunk_size, batch, size, device)
                torch.set_float32_matmul_precision("high")  # both sides: TF32
                try:
                    with way():
                        got = outputs_and_gradients(fused, x, rotations)
                    want = outputs_and_gradients(reference, x, rotations)
                finally:
                    torch.set_float32_matmul_precision("highest")
                return agreement(fused, got, want, 2e-2)

        for variant in chunk_attention.backward_variants(device, torch.bfloat16, combinations):
            @check(f"fused (backward {variant}) vs reference GLA C={channels} k={chunk_size} {batch}x{size}x{size}, "
                   f"bf16 autocast")
            def _():
                fused, reference, x, rotations = gla_problem(channels, chunk_size, batch, size, device)
                exact = outputs_and_gradients(reference, x, rotations)
                with backward_variant(device, torch.bfloat16, variant):
                    fused_low = outputs_and_gradients(fused, x, rotations, bf16=True)
                reference_low = outputs_and_gradients(reference, x, rotations, bf16=True)

                def error(got, want):
                    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()

                worst_ratio, worst = 0.0, None
                for n, f, r, e in zip(names(fused), fused_low, reference_low, exact):
                    fused_error, reference_error = error(f, e), error(r, e)
                    assert fused_error <= 1.25 * reference_error + 0.01, \
                        f"{n}: error {fused_error:.4f}, reference in bf16 {reference_error:.4f}"
                    if fused_error / (reference_error + 1e-12) > worst_ratio:
                        worst_ratio, worst = fused_error / (reference_error + 1e-12), (n, fused_error, reference_error)
                return {"largest_error_ratio_to_reference": worst_ratio, "where": worst}

    training_batch, training_size = (2, sizes[0][1]) if args.small else (16, 48)

    @check(f"fused GLA C={channels} k={chunk_size} {training_batch}x{training_size}x{training_size} float32 training: "
           f"attention and round mixing in one node (attend_and_mix) vs separate, matmul precision high")
    def _():
        fused, _, x, rotations = gla_problem(channels, chunk_size, training_batch, training_size, device)
        # The paper's training batch is above MIX_KERNEL_MIN_ELEMENTS; the small layer is lowered to it.
        attends_and_mixes = chunk_attention.attends_and_mixes
        threshold = 0 if args.small else chunk_attention.MIX_KERNEL_MIN_ELEMENTS
        torch.set_float32_matmul_precision("high")
        try:
            with chunk_attention.mixing_from(threshold):
                used = chunk_attention.attends_and_mixes(x.new_empty(training_batch, training_size ** 2, channels), 3)
                one_node = outputs_and_gradients(fused, x, rotations)
                chunk_attention.attends_and_mixes = lambda values, n_rounds: False
                separate = outputs_and_gradients(fused, x, rotations)
        finally:
            chunk_attention.attends_and_mixes = attends_and_mixes
            torch.set_float32_matmul_precision("highest")
        assert used, "attends_and_mixes() is False at the training size"
        return agreement(fused, one_node, separate, WEIGHTED_AGREEMENT)

    # Every backward the float32 training steps' timed choice may pick, as the one node runs it (kernels that
    # read the mixed gradient and the round weights: their own compiled specialisations, which the checks
    # against the reference above do not launch), against the same variant's separate nodes. At the first
    # paper size, lowered to the mixing kernel as warm_kernel_cache.py compiles them.
    weighted_batch, weighted_size = sizes[0]
    for variant in chunk_attention.backward_variants(device, torch.float32, combinations):
        @check(f"fused (backward {variant}) in float32 training's attention node (attend_and_mix, round-weighted "
               f"kernels) vs its separate nodes, GLA C={channels} k={chunk_size} "
               f"{weighted_batch}x{weighted_size}x{weighted_size}, matmul precision high")
        def _():
            fused, _, x, rotations = gla_problem(channels, chunk_size, weighted_batch, weighted_size, device)
            torch.set_float32_matmul_precision("high")
            try:
                with backward_variant(device, torch.float32, variant):
                    with chunk_attention.mixing_from(0):
                        one_node = outputs_and_gradients(fused, x, rotations)
                    separate = outputs_and_gradients(fused, x, rotations)
            finally:
                torch.set_float32_matmul_precision("highest")
            return agreement(fused, one_node, separate, WEIGHTED_AGREEMENT)

    @check(f"fused GLA C={channels} k={chunk_size} {training_batch}x{training_size}x{training_size} float32 training: "
           f"the embeddings' convolutions in one autograd node (relu_convolution_groups) vs separate nodes")
    def _():
        fused, _, x, rotations = gla_problem(channels, chunk_size, training_batch, training_size, device)
        in_one_node, apart = float32_ops.relu_convolutions_in_one_node, float32_ops.match_convolution_apart
        if not cuda:  # the match convolution apart as on CUDA, where the one node saves a backward convolution
            float32_ops.match_convolution_apart = lambda x: True
        torch.set_float32_matmul_precision("high")
        details = {}
        try:
            used = float32_ops.relu_convolutions_in_one_node(x, fused.value_embedding.weight)
            for way in ("one_node", "separate"):
                if way == "separate":
                    float32_ops.relu_convolutions_in_one_node = lambda *tensors: False
                details[way] = outputs_and_gradients(fused, x, rotations)
                if cuda:  # the layer's forward and backward, as benchmark_gla.py times it
                    details[f"{way}_layer_forward_backward_ms"] = round(
                        median_cuda_ms(lambda: outputs_and_gradients(fused, x, rotations)), 3)
        finally:
            float32_ops.relu_convolutions_in_one_node, float32_ops.match_convolution_apart = in_one_node, apart
            torch.set_float32_matmul_precision("highest")
        one_node, separate = details.pop("one_node"), details.pop("separate")
        assert used, "relu_convolutions_in_one_node() is False in float32 training"
        return agreement(fused, one_node, separate, 1e-3) | details

    @check(f"GLA embeddings' weight gradient C={channels} {training_batch}x{training_size}x{training_size}: each method "
           f"the timed choice offers (conv_weight_grad.methods(): im2col, Triton configurations) vs true float32, "
           f"cuDNN's beside it")
    def _():
        torch.manual_seed(0)
        stacked = channels // 4 + 2 * channels  # match, value and score embeddings, as one convolution's backward
        x, grad_y = (torch.randn(training_batch, width, training_size, training_size, device=device).contiguous(
            memory_format=torch.channels_last) for width in (channels, stacked))
        weight = torch.randn(stacked, channels, 3, 3, device=device)
        weight_only = (False, True, False)
        with float32_ops._cudnn_tf32(device, enabled=False):
            exact = conv_weight_grad._cudnn(grad_y, x, weight, 1, weight_only)[1]
        scale = exact.abs().max().item()
        details = {}
        ways = {name: functools.partial(conv_weight_grad._by, name, grad_y, x, weight, 1, weight_only)
                for name in conv_weight_grad.methods()}
        ways["cudnn"] = functools.partial(conv_weight_grad._cudnn, grad_y, x, weight, 1, weight_only)
        with float32_ops._cudnn_tf32(device, enabled=True):
            for name, way in ways.items():
                details[f"{name} error"] = (way()[1] - exact).abs().max().item() / scale
                if cuda:  # information: the timed choice decides in training
                    details[f"{name} ms"] = round(median_cuda_ms(way), 4)
        others = [name for name in details if name.endswith("error") and not name.startswith("cudnn")]
        worst = max(others, key=details.get)
        assert details[worst] <= conv_weight_grad.AGREEMENT, f"{worst} is {details[worst]:.3g} of the largest entry"
        return details

    @check("match embedding in true float32 with cuDNN TF32 on, each method")
    def _():
        torch.manual_seed(0)
        x = torch.randn(2, channels, 24, 24, device=device, dtype=torch.float64)
        weight = torch.randn(channels // 4, channels, 3, 3, device=device, dtype=torch.float64) / (3 * channels ** 0.5)
        bias = torch.zeros(channels // 4, device=device, dtype=torch.float64)
        exact = F.conv2d(x, weight, bias, padding=1)
        previous = torch.backends.cudnn.allow_tf32
        previous_method = float32_ops.FLOAT32_CONV_METHOD
        torch.backends.cudnn.allow_tf32 = True
        details = {}
        # The training size's match convolution (batch 16, 48x48): information, each method's time.
        timed_input = torch.relu(torch.randn(16, channels, 48, 48, device=device)).contiguous(
            memory_format=torch.channels_last) if cuda else None
        # Whole images as evaluation convolves them (cuDNN's heuristics, nothing timed): what
        # SPLIT_TF32_MIN_POSITIONS decides between (128x128 below it, 360x360 above).
        image_inputs = {size: torch.relu(torch.randn(1, channels, size, size, device=device)).contiguous(
            memory_format=torch.channels_last) for size in (128, 360)} if cuda else {}
        try:
            for method in float32_ops.FLOAT32_CONV_METHODS:
                float32_ops.FLOAT32_CONV_METHOD = method
                got = conv2d_float32(x.float(), weight.float(), bias.float(), 1)
                details[f"{method}_error"] = (got.double() - exact).abs().max().item()
                for autotune in (False, True) if cuda else ():  # heuristics (evaluation), autotuner (training)
                    benchmark = torch.backends.cudnn.benchmark
                    torch.backends.cudnn.benchmark = autotune
                    try:
                        details[f"{method}_ms_at_16x{channels}x48x48" + ("_autotuned" if autotune else "")] = round(
                            median_cuda_ms(lambda: conv2d_float32(timed_input, weight.float(), bias.float(), 1)), 4)
                    finally:
                        torch.backends.cudnn.benchmark = benchmark
                for size, image in image_inputs.items():
                    details[f"{method}_ms_at_1x{channels}x{size}x{size}"] = round(
                        median_cuda_ms(lambda: conv2d_float32(image, weight.float(), bias.float(), 1)), 4)
            if cuda:  # the split's element-wise kernels against the PyTorch formulas: same bits; both times
                arguments = (timed_input, weight.float(), bias.float(), 1)
                details["split_kernels_equal_formulas_bitwise"] = torch.equal(
                    float32_ops.split_tf32_conv2d(*arguments, kernels=True),
                    float32_ops.split_tf32_conv2d(*arguments, kernels=False))
                for kernels in (True, False):
                    details[f"split_tf32_ms_at_16x{channels}x48x48_{'kernels' if kernels else 'formulas'}"] = round(
                        median_cuda_ms(lambda: float32_ops.split_tf32_conv2d(*arguments, kernels=kernels)), 4)
            plain = F.conv2d(x.float(), weight.float(), bias.float(), padding=1)
            details["tf32_conv2d_error"] = (plain.double() - exact).abs().max().item()
            still_on = torch.backends.cudnn.allow_tf32
        finally:
            torch.backends.cudnn.allow_tf32 = previous
            float32_ops.FLOAT32_CONV_METHOD = previous_method
        for method in float32_ops.FLOAT32_CONV_METHODS:
            assert details[f"{method}_error"] < 1e-4, f"{method}: differs from float64 by {details[f'{method}_error']:.3g}"
        assert still_on, "the op did not restore cudnn.allow_tf32"
        assert details.get("split_kernels_equal_formulas_bitwise", True), "the split kernels differ from the formulas"
        return details

    @check(f"hashing kernel against float64 projections, d={channels // 4}, 3 rounds")
    def _():
        torch.manual_seed(0)
        details = {}
        # The training batch (16) at the training patch, and one 96x96 image; ReLU'd like GLA's match.
        for batch, size in ((2, sizes[0][1]), (1, sizes[1][1])) if args.small else ((16, 48), (1, 96)):
            length = size * size
            match = torch.relu(torch.randn(batch, length, channels // 4, device=device))
            rotations = draw_rotations(3, channels // 4, number_of_buckets(length, chunk_size)).to(device)
            codes = chunk_attention.bucket_codes_fused(match, rotations)
            shortfall = chunk_attention.bucket_shortfall(codes, match, rotations)
            plain = projections_float32(match, rotations).argmax(-1)
            entry = {"largest_relative_shortfall": shortfall,
                     "fraction_unlike_einsum_argmax": (codes != plain).float().mean().item()}
            if cuda:  # information: the kernel against the einsum and argmax it replaces
                entry["kernel_ms"] = round(median_cuda_ms(lambda: chunk_attention.bucket_codes_fused(match, rotations)), 4)
                entry["einsum_argmax_ms"] = round(median_cuda_ms(
                    lambda: projections_float32(match, rotations).argmax(-1)), 4)
            details[f"{batch}x{size}x{size}"] = entry
            assert shortfall <= 1e-5, f"a picked bucket is {shortfall:.3g} (relative) below the largest projection"
        return details

    if cuda:
        @check("convolution epilogues (bias, ReLU, scale, residual in one kernel) equal the eager formula, "
               "C=256, 360x360 (float32 and bf16 autocast), with their times")
        def _():
            # The whole-image forward's residual blocks and groups (dlsn/models/dlsn.py), in inference.
            torch.manual_seed(0)
            size = 24 if args.small else 360
            x = torch.randn(1, channels, size, size, device=device).contiguous(memory_format=torch.channels_last)
            residual = torch.randn_like(x)
            weight = (0.02 * torch.randn(channels, channels, 3, 3, device=device)).contiguous(
                memory_format=torch.channels_last)
            bias = torch.randn(channels, device=device)
            epilogues = {"relu": dict(relu=True), "residual": dict(residual=residual),
                         "scale+residual": dict(scale=0.1, residual=residual)}
            details = {}
            with torch.no_grad():
                for precision in ("float32", "bf16"):
                    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")
                    for name, epilogue in epilogues.items():
                        def run(impl, epilogue=epilogue):
                            with autocast:
                                return conv_epilogue.conv2d_epilogue(x, weight, bias, impl=impl, **epilogue)
                        fused_output, reference_output = run("fused"), run("reference")
                        details[f"{precision} {name}"] = {
                            "bitwise_equal": torch.equal(fused_output, reference_output),
                            "largest_difference": (fused_output.float() - reference_output.float()).abs().max().item(),
                            "fused_ms": round(median_cuda_ms(lambda: run("fused")), 4),
                            "reference_ms": round(median_cuda_ms(lambda: run("reference")), 4)}
            unequal = [name for name, entry in details.items() if not entry["bitwise_equal"]]
            assert not unequal and conv_epilogue.fused_kernel_failure() is None, (unequal, details)
            return details

    if cuda:
        @check("rotations drawn on the GPU: no host synchronisation, CUDA-graph capture, kernel = Cholesky QR")
        def _():
            draw_rotations_on_device(3, 64, 18, device=device)  # warm-up: handles, workspaces
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                draw_rotations_on_device(3, 64, 128, device=device)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.cuda.graph(graph):
                graphed = draw_rotations_on_device(3, 64, 18, device=device)
            draws = []
            for _ in range(2):
                graph.replay()
                torch.cuda.synchronize()
                draws.append(graphed.clone())
            error = (draws[0].mT @ draws[0] - torch.eye(18, device=device)).abs().max().item()
            assert error < 1e-5 and not torch.equal(draws[0], draws[1]), (error, "replays drew the same matrices")
            # Eager CUDA draws orthonormalise with one kernel (Gram-Schmidt twice, float64): Cholesky QR's Q.
            agreement, milliseconds = {}, {}
            for shape in ((3, 64, 18), (3, 128, 64)):
                gaussian = torch.randn(*shape, device=device)
                kernel_q = chunk_attention.orthonormal_columns_fused(gaussian)
                agreement[str(shape)] = (kernel_q - orthonormal_columns(gaussian)).abs().max().item()
                milliseconds[f"kernel {shape}"] = round(median_cuda_ms(
                    lambda: chunk_attention.orthonormal_columns_fused(gaussian)), 4)
                milliseconds[f"cholesky_qr {shape}"] = round(median_cuda_ms(lambda: orthonormal_columns(gaussian)), 4)
            assert max(agreement.values()) < 1e-5 and chunk_attention.fused_kernel_failure() is None, agreement
            return {"orthonormality_error": error, "kernel_vs_cholesky_qr": agreement, "gpu_ms": milliseconds}

        # Defined before the check below: @check runs its function at once.
        def graphed_training_step():
            layer = GLA(channels, chunk_size=chunk_size, n_hashes=3, attention_impl="fused").to(device)
            x = torch.randn(2, channels, sizes[0][1], sizes[0][1], device=device, requires_grad=True)

            def step():  # autocast's weight-cast cache must be off around CUDA-graph capture
                with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                    output = layer(x)
                output.float().square().mean().backward()
                return output

            for _ in range(2):  # warm-up: Triton compiles, self-check, cuDNN plans, timed choices
                step()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                graphed_output = step()
            outputs = []
            for _ in range(2):
                graph.replay()
                torch.cuda.synchronize()
                outputs.append(graphed_output.detach().clone())
            assert all(torch.isfinite(o).all() for o in outputs)
            assert not torch.equal(*outputs), "replays used the same rotations"
            return {"timed_choices": timed_choice.choices()}

        @check("GLA training step (fused, rotations drawn inside, cuDNN autotuner and timed choices on): "
               "no host synchronisation, CUDA graph")
        def _():
            benchmark = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = True  # as the training steps run (CudnnAutotune)
            try:
                return graphed_training_step()
            finally:
                torch.backends.cudnn.benchmark = benchmark

    if not args.no_compile:
        impl = "fused" if cuda else "reference"

        @check(f"torch.compile(GLA, fullgraph=True) forward+backward equals eager ({impl}, float32, TF32)")
        def _():
            torch.manual_seed(0)
            # The paper layer as above: its Triton kernels are compiled already.
            layer = GLA(channels, chunk_size=chunk_size, n_hashes=3, attention_impl=impl).to(device)
            size = sizes[0][1]
            x = torch.randn(2, layer.channels, size, size, device=device)
            rotations = torch.nn.init.orthogonal_(
                torch.empty(3, layer.channels // 4, number_of_buckets(size * size, layer.chunk_size))).to(device)
            start = time.perf_counter()
            torch.set_float32_matmul_precision("high")  # the kernels compiled above
            try:
                compiled = torch.compile(layer, fullgraph=True)
                got = outputs_and_gradients(compiled, x, rotations)
                compile_s = time.perf_counter() - start
                want = outputs_and_gradients(layer, x, rotations)
            finally:
                torch.set_float32_matmul_precision("highest")
            error = max(((g - w).abs().max() / w.abs().max().clamp_min(1e-12)).item() for g, w in zip(got, want))
            assert error <= 2e-2, f"compiled differs from eager by {error:.3g}"  # both TF32, other kernels
            return {"relative_error": error, "first_call_s": round(compile_s, 1)}

    failed = [r["check"] for r in RESULTS if r["status"] == "FAIL"]
    print(f"{len(RESULTS) - len(failed)} passed, {len(failed)} failed", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
