"""The timed choices between interchangeable implementations (dlsn.models.timed_choice).

Timing runs on CUDA only; here the GPU's clock is replaced by a fake one, and the real functions
around it (when to time, what is kept, what each op then runs) are tested on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from dlsn.models import chunk_attention as fused
from dlsn.models import float32_ops, timed_choice
from tests.test_chunk_attention import random_problem

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_choices():
    timed_choice.forget()
    yield
    timed_choice.forget()


@pytest.fixture
def timing_on_the_cpu(monkeypatch):
    """Timing allowed on the CPU, with a fake clock: a run costs what ``costs`` says for what it did."""
    monkeypatch.setattr(timed_choice, "timing_allowed", lambda device: True)
    runs: list[str] = []  # what the candidates did (each appends names)
    costs: dict[str, float] = {}  # milliseconds per name appended; 1 for others

    def fake_milliseconds(run, device):
        before = len(runs)
        run()
        return float(sum(costs.get(name, 1.0) for name in runs[before:]))

    monkeypatch.setattr(timed_choice, "milliseconds", fake_milliseconds)
    return runs, costs


def test_the_faster_candidate_is_kept_for_its_key(timing_on_the_cpu):
    runs, costs = timing_on_the_cpu
    costs.update(slow=5.0, fast=2.0)
    candidates = {"slow": lambda: runs.append("slow"), "fast": lambda: runs.append("fast")}
    assert timed_choice.fastest(("layer", 1), candidates, device=CPU, default="slow") == "fast"
    # One untimed run each, then REPEATS timed runs each, interleaved.
    assert runs == ["slow", "fast"] * (1 + timed_choice.REPEATS)
    runs.clear()
    assert timed_choice.fastest(("layer", 1), candidates, device=CPU, default="slow") == "fast"
    assert runs == [], "a kept choice is not timed again"
    assert timed_choice.choices() == {"layer 1": {"choice": "fast", "ms": {"slow": 5.0, "fast": 2.0}}}
    assert timed_choice.report("layer 1", timed_choice.choices()["layer 1"]) == "layer 1: fast (slow 5.000 ms, fast 2.000 ms)"
    costs.update(slow=1.0)
    assert timed_choice.fastest(("layer", 2), candidates, device=CPU, default="fast") == "slow"


def test_candidates_are_built_only_when_timed(timing_on_the_cpu, monkeypatch):
    """A function returning the candidates runs once, when they are timed: not on every call (the
    backward builds six partial functions), nor where timing is not allowed."""
    runs, _ = timing_on_the_cpu
    built = []

    def candidates():
        built.append(True)
        return {"a": lambda: runs.append("a"), "b": lambda: runs.append("b")}

    for _ in range(3):
        assert timed_choice.fastest("key", candidates, device=CPU, default="b") == "a"
    assert len(built) == 1
    monkeypatch.setattr(timed_choice, "timing_allowed", lambda device: False)
    assert timed_choice.fastest("another key", candidates, device=CPU, default="b") == "b"
    assert len(built) == 1


def test_a_candidate_that_fails_is_left_out(timing_on_the_cpu, caplog):
    runs, costs = timing_on_the_cpu
    costs.update(broken=0.1, slow=3.0)

    def broken():
        runs.append("broken")
        raise RuntimeError("out of resources")

    candidates = {"broken": broken, "slow": lambda: runs.append("slow")}
    assert timed_choice.fastest("key", candidates, device=CPU, default="broken") == "slow"
    assert timed_choice.choices()["key"]["ms"] == {"slow": 3.0}
    assert "broken failed, left out (RuntimeError: out of resources)" in caplog.text
    with pytest.raises(RuntimeError, match="out of resources"):  # nothing works: the error, not a choice
        timed_choice.fastest("other", {"broken": broken}, device=CPU, default="broken")
    assert "other" not in timed_choice.choices()


def test_nothing_is_timed_where_timing_is_not_allowed(monkeypatch):
    ran = []
    candidates = {"a": lambda: ran.append("a"), "b": lambda: ran.append("b")}
    # The CPU, and CUDA with cuDNN's heuristics or with deterministic algorithms: the default.
    assert timed_choice.fastest("key", candidates, device=CPU, default="b") == "b"
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert not timed_choice.timing_allowed(cuda)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    assert timed_choice.timing_allowed(cuda)
    torch.use_deterministic_algorithms(True)
    try:
        assert not timed_choice.timing_allowed(cuda)
    finally:
        torch.use_deterministic_algorithms(False)
    assert ran == [] and timed_choice.choices() == {}


def test_capture_keeps_an_earlier_choice_and_times_nothing(timing_on_the_cpu, monkeypatch):
    runs, costs = timing_on_the_cpu
    costs.update(a=3.0, b=1.0)
    candidates = {"a": lambda: runs.append("a"), "b": lambda: runs.append("b")}
    monkeypatch.setattr(timed_choice, "capturing", lambda device: True)
    assert timed_choice.fastest("first", candidates, device=CPU, default="a") == "a"
    assert runs == [] and timed_choice.choices() == {}
    monkeypatch.setattr(timed_choice, "capturing", lambda device: False)
    assert timed_choice.fastest("first", candidates, device=CPU, default="a") == "b"
    monkeypatch.setattr(timed_choice, "capturing", lambda device: True)
    runs.clear()
    assert timed_choice.fastest("first", candidates, device=CPU, default="a") == "b"
    assert runs == []


@pytest.fixture
def launches(monkeypatch):
    """The fused kernels launched: name, "-atomic" for the key kernel's atomic dQ, "@rows/warps/stages"
    for a configuration other than LAUNCH_CONFIGS' (the values kernel's with "/C" and its channels per program),
    " weighted" where the kernel reads the mixed output's gradient and the round weights; and the "+matmul"
    modes' batched products, "values_gradient" (dV) and "grad_weights" (dP)."""
    launched: list[str] = []
    original = fused._launch

    def recording_launch(function, name, *args, **kwargs):
        config = kwargs.get("config")
        channels = f"/C{kwargs['channel_block']}" if config and name == "values" else ""
        launched.append(name + ("-atomic" if kwargs.get("ATOMIC_GRAD_Q") else "")
                        + (f"@{'/'.join(map(str, config))}{channels}" if config else "")
                        + (" weighted" if kwargs.get("ROUND_WEIGHTED") else ""))
        return original(function, name, *args, **kwargs)

    monkeypatch.setattr(fused, "_launch", recording_launch)
    for name in ("_values_gradient_by_matmul", "_grad_weights_by_matmul"):  # the "+matmul" modes' batched products
        monkeypatch.setattr(fused, name, _recorded(getattr(fused, name), launched, name.split("_by_")[0].strip("_")))
    return launched


def _recorded(function, names: list, name: str):
    def recorded(*args, **kwargs):
        names.append(name)
        return function(*args, **kwargs)

    return recorded


@pytest.fixture
def charged(timing_on_the_cpu, launches, monkeypatch):
    """The fake clock charges what ``launches`` records: each kernel launch and each batched product."""
    runs, _ = timing_on_the_cpu
    for name in ("_launch", "_values_gradient_by_matmul", "_grad_weights_by_matmul"):
        recording = getattr(fused, name)

        def charged_call(*args, recording=recording, **kwargs):
            result = recording(*args, **kwargs)
            runs.append(launches[-1])
            return result

        monkeypatch.setattr(fused, name, charged_call)


@pytest.mark.slow  # 16 backward variants in the interpreter, 85 s (the default suite had passed 15 minutes)
def test_timed_backward_runs_the_fastest_variant_and_is_exact(timing_on_the_cpu, launches, charged, monkeypatch):
    """float32 on generation 90 (the interpreter's): every mode, the two with dV in the key kernel also
    with TIMED_KEY_CONFIGS' key kernels, TIMED_CONFIGS_MODE also with each pair of TIMED_QUERIES_CONFIGS' and
    TIMED_VALUES_CONFIGS', MATMUL_MODE with each of TIMED_QUERIES_CONFIGS'. The fake clock charges a launch (and
    each batched product) 1 ms, the atomic key kernel with 16 rows 0.5 ms: "timed" keeps that variant, and
    the gradients it returns are the reference's."""
    runs, costs = timing_on_the_cpu
    monkeypatch.setattr(timed_choice, "REPEATS", 1)  # the fake clock's times repeat exactly: one timed run each
    costs["keys-atomic@16/8/1"] = 0.5
    monkeypatch.setattr(fused, "BACKWARD_MODE", dict.fromkeys(fused.BACKWARD_MODE, "timed"))
    monkeypatch.setitem(fused.TIMED_KEY_CONFIGS, 90, {"float32": ((32, 8, 1), (16, 8, 1))})
    monkeypatch.setitem(fused.TIMED_VALUES_CONFIGS, 90, {"float32": ((16, 4, 1, 8),)})
    monkeypatch.setitem(fused.TIMED_QUERIES_CONFIGS, 90, {"float32": ((16, 8, 1),)})
    inputs, order, inverse = random_problem(2, 2, 70, 32, 8, 12)  # 32-row chunks: the 16-row blocks differ
    outputs = fused._fused_forward(*inputs, order, inverse, mode="fused")
    grads = [torch.randn_like(outputs[0]), torch.randn_like(outputs[1])]
    launches.clear()
    got = fused._fused_backward(*grads, *inputs, order, inverse, *outputs)
    [(what, entry)] = timed_choice.choices().items()
    assert what.startswith("fused attention backward cpu torch.float32 ieee (2, 2, 96) 8 12 32"), what
    assert entry == {"choice": "atomic, keys 16/8/1", "ms": {
        "two_kernels": 2.0, "atomic": 1.0, "two_kernels+values": 3.0, "atomic+values": 2.0,
        "stored_dS": 2.0, "stored_dS+values": 3.0,
        "two_kernels, keys 32/8/1": 2.0, "atomic, keys 32/8/1": 1.0,
        "two_kernels, keys 16/8/1": 2.0, "atomic, keys 16/8/1": 0.5,
        "stored_dS+matmul": 3.0, "stored_dS+matmul+dP": 4.0,
        "stored_dS+values, values 16/4/1 C8": 3.0, "stored_dS+values, queries 16/8/1": 3.0,
        "stored_dS+values, queries 16/8/1, values 16/4/1 C8": 3.0, "stored_dS+matmul, queries 16/8/1": 3.0}}
    assert launches[-1] == "keys-atomic@16/8/1", "the gradients returned are the chosen variant's"
    launches.clear()
    fused._fused_backward(*grads, *inputs, order, inverse, *outputs)
    assert launches == ["keys-atomic@16/8/1"], "the kept choice runs alone"
    want = fused.chunk_attention_reference_backward(*[g.double() for g in grads],
                                                    *[t.double() for t in inputs], order, inverse)
    for name, got_grad, want_grad in zip(("queries", "keys", "learned", "values"), got, want):
        torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.slow  # about a minute in the interpreter (the default suite was near its 15 minutes)
@pytest.mark.long
def test_timed_values_and_query_configurations_run_as_chosen_and_are_exact(timing_on_the_cpu, launches, charged,
                                                                          monkeypatch):
    """A values-kernel and a query-kernel configuration the timed backward picks together are launched as
    chosen: their rows, the values kernel's channels per program (8 of 12: a second, part-masked block), and
    the query kernel's 16-row blocks of 32-row chunks, storing dS for the key kernel; the gradients are the
    reference's."""
    runs, costs = timing_on_the_cpu
    monkeypatch.setattr(timed_choice, "REPEATS", 1)  # the fake clock's times repeat exactly: one timed run each
    # stored_dS+values with both: 0.5 + 0 + 1; with either alone 2.5 or 2; every other variant 2 or more
    costs.update({"values@16/4/1/C8": 0.0, "queries@16/8/1": 0.5, "keys-atomic": 2.0})
    monkeypatch.setattr(fused, "BACKWARD_MODE", dict.fromkeys(fused.BACKWARD_MODE, "timed"))
    monkeypatch.setitem(fused.TIMED_KEY_CONFIGS, 90, {})
    monkeypatch.setitem(fused.TIMED_VALUES_CONFIGS, 90, {"float32": ((16, 4, 1, 8),)})
    monkeypatch.setitem(fused.TIMED_QUERIES_CONFIGS, 90, {"float32": ((16, 8, 1),)})
    inputs, order, inverse = random_problem(2, 2, 70, 32, 8, 12)
    outputs = fused._fused_forward(*inputs, order, inverse, mode="fused")
    grads = [torch.randn_like(outputs[0]), torch.randn_like(outputs[1])]
    launches.clear()
    got = fused._fused_backward(*grads, *inputs, order, inverse, *outputs)
    [entry] = timed_choice.choices().values()
    assert entry["choice"] == "stored_dS+values, queries 16/8/1, values 16/4/1 C8", entry
    assert entry["ms"]["stored_dS+values, queries 16/8/1, values 16/4/1 C8"] == 1.5
    assert launches[-3:] == ["queries@16/8/1", "values@16/4/1/C8", "keys_from_dS_no_values"]
    want = fused.chunk_attention_reference_backward(*[g.double() for g in grads],
                                                    *[t.double() for t in inputs], order, inverse)
    for name, got_grad, want_grad in zip(("queries", "keys", "learned", "values"), got, want):
        torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-4, atol=1e-4, msg=name)


def test_timed_forward_keeps_the_faster_way_for_float32_values_only(timing_on_the_cpu, monkeypatch):
    """Float32 values: both forwards (FORWARD_MODES) run on first use at a size, are timed and the faster is
    kept (the fake clock charges a kernel launch 1 ms, the "weights+matmul" forward's 0.5); its outputs are the
    reference's. bfloat16 values are not timed (TIMED_FORWARD_DTYPES): the fused kernel runs."""
    runs, costs = timing_on_the_cpu
    monkeypatch.setattr(timed_choice, "REPEATS", 1)  # the fake clock's times repeat exactly: one timed run each
    costs["forward_weights"] = 0.5
    launched = []
    original = fused._launch

    def recording(function, name, *args, **kwargs):
        launched.append(name)
        runs.append(name)
        return original(function, name, *args, **kwargs)

    monkeypatch.setattr(fused, "_launch", recording)
    inputs, order, inverse = random_problem(2, 2, 37, 16, 8, 12)
    outputs = fused._fused_forward(*inputs, order, inverse)
    [(what, entry)] = timed_choice.choices().items()
    assert what.startswith("fused attention forward cpu torch.float32 ieee (2, 2, 48) 8 12 16"), what
    assert entry == {"choice": "weights+matmul", "ms": {"fused": 1.0, "weights+matmul": 0.5}}
    # each once untimed, once timed, then the choice
    assert launched == ["forward", "forward_weights", "forward", "forward_weights", "forward_weights"]
    for got, want in zip(outputs, fused.chunk_attention_reference(*[t.double() for t in inputs], order, inverse)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    launched.clear()
    fused._fused_forward(*inputs, order, inverse)
    assert launched == ["forward_weights"], "the kept choice runs alone"
    launched.clear()
    fused._fused_forward(*[t.bfloat16() for t in inputs], order, inverse)
    assert launched == ["forward"] and len(timed_choice.choices()) == 1


def test_backward_variants_follow_the_precision_and_generation():
    gpu = torch.device("cpu")  # the interpreter stands for generation 90
    assert list(fused.backward_variants(gpu, torch.bfloat16)) == [
        "two_kernels", "atomic", "two_kernels+values", "atomic+values", "stored_dS", "stored_dS+values",
        "stored_dS+matmul", "stored_dS+matmul+dP"]
    modes = len(fused.BACKWARD_MODES)
    float32 = fused.backward_variants(gpu, torch.float32)
    keys, values = fused.TIMED_KEY_CONFIGS[90]["float32"], fused.TIMED_VALUES_CONFIGS[90]["float32"]
    queries = fused.TIMED_QUERIES_CONFIGS[90]["float32"]
    pairs = (len(queries) + 1) * (len(values) + 1) - 1  # either may stay LAUNCH_CONFIGS', not both
    assert len(float32) == modes + 2 * len(keys) + pairs + len(queries)
    assert list(float32)[:modes] == list(fused.BACKWARD_MODES)
    assert [configs for _, configs in float32.values()][:modes + 2 * len(keys)] == [{}] * modes + [
        {"keys": c} for c in keys for _ in "12"]
    paired = [configs for _, configs in float32.values()][modes + 2 * len(keys):-len(queries)]
    assert {(c.get("queries"), c.get("values")) for c in paired} == {
        (q, v) for q in (None, *queries) for v in (None, *values)} - {(None, None)}
    assert list(float32.values())[-len(queries):] == [("stored_dS+matmul", {"queries": c}) for c in queries]
    # the key configurations are the "keys" kernel's: not for the modes that run another key kernel; the values
    # and query configurations are tried with the mode that was fastest at batch 16, the query configurations
    # also with the mode that runs the same query kernel and computes dV by a matrix product
    assert {mode for mode, configs in float32.values() if "keys" in configs} == {"two_kernels", "atomic"}
    assert {mode for mode, configs in float32.values() if "values" in configs} == {
        fused.TIMED_CONFIGS_MODE} == {"stored_dS+values"}
    assert {mode for mode, configs in float32.values() if "queries" in configs} == {
        fused.TIMED_CONFIGS_MODE, fused.MATMUL_MODE}
    # without the combinations (checks in the interpreter): each configuration alone, in the same order
    singles = fused.backward_variants(gpu, torch.float32, combinations=False)
    assert list(singles) == [name for name, (_, configs) in float32.items() if len(configs) <= 1]
    assert len(singles) == modes + 2 * len(keys) + 2 * len(queries) + len(values)


def test_backward_without_timing_runs_the_two_kernels(launches, monkeypatch):
    monkeypatch.setattr(fused, "BACKWARD_MODE", dict.fromkeys(fused.BACKWARD_MODE, "timed"))
    inputs, order, inverse = random_problem(1, 2, 20, 10, 4, 6)
    outputs = fused._fused_forward(*inputs, order, inverse)  # not timed either
    launches.clear()
    fused._fused_backward(torch.randn_like(outputs[0]), torch.randn_like(outputs[1]), *inputs, order, inverse,
                          *outputs)
    assert launches == ["queries", "keys"] and timed_choice.choices() == {}


# The kernels of each backward mode in BACKWARD_MODES' order, with LAUNCH_CONFIGS' configurations.
BATCHED_PRODUCTS = ("values_gradient", "grad_weights")
WEIGHTED_MODES_LAUNCHES = ("queries", "keys", "keys-atomic", "queries", "values", "keys_no_values", "values",
                           "keys_no_values-atomic", "queries", "keys_from_dS", "queries", "values",
                           "keys_from_dS_no_values", "queries", "values_gradient", "keys_from_dS_no_values",
                           "grad_weights", "queries", "values_gradient", "keys_from_dS_no_values")


@pytest.mark.slow  # 1.5-2.5 minutes in the interpreter
@pytest.mark.long
def test_self_check_runs_every_backward_variant_a_timed_choice_may_pick(launches, monkeypatch):
    monkeypatch.setattr(fused, "BACKWARD_MODE", dict.fromkeys(fused.BACKWARD_MODE, "timed"))
    monkeypatch.setitem(fused.TIMED_KEY_CONFIGS, 90, {"float32": ((16, 8, 1),)})
    monkeypatch.setitem(fused.TIMED_VALUES_CONFIGS, 90, {"float32": ((16, 4, 1, 8),)})
    monkeypatch.setitem(fused.TIMED_QUERIES_CONFIGS, 90, {"float32": ((16, 8, 1),)})
    fused.self_check(CPU)
    assert launches == ["forward", "forward_weights",  # float32: also the "weights+matmul" forward
                        "queries", "keys", "keys-atomic", "queries", "values", "keys_no_values",
                        "values", "keys_no_values-atomic", "queries", "keys_from_dS", "queries", "values",
                        "keys_from_dS_no_values",
                        "queries", "values_gradient", "keys_from_dS_no_values",  # stored_dS+matmul
                        "grad_weights", "queries", "values_gradient", "keys_from_dS_no_values",  # its +dP
                        "queries", "keys@16/8/1", "keys-atomic@16/8/1",
                        "queries", "values@16/4/1/C8", "keys_from_dS_no_values",
                        "queries@16/8/1", "values", "keys_from_dS_no_values",
                        "queries@16/8/1", "values@16/4/1/C8", "keys_from_dS_no_values",
                        "queries@16/8/1", "values_gradient", "keys_from_dS_no_values",
                        # float32: each mode again as attend_and_mix runs it
                        *(name if name in BATCHED_PRODUCTS else f"{name} weighted" for name in WEIGHTED_MODES_LAUNCHES)]
    launches.clear()
    # combinations=False: the variants of backward_variants(..., combinations=False), which leaves out the pairs
    asked = []
    variants = fused.backward_variants
    monkeypatch.setattr(fused, "backward_variants", lambda *args: asked.append(args) or variants(*args))
    fused.self_check(CPU, torch.bfloat16, combinations=False)
    assert asked == [(CPU, torch.bfloat16, False)]
    monkeypatch.setattr(fused, "backward_variants", variants)
    launches.clear()
    fused.self_check(CPU, torch.bfloat16)  # no alternative configurations in half precision
    assert launches == ["forward", "queries", "keys", "queries", "keys-atomic", "queries", "values",
                        "keys_no_values", "queries", "values", "keys_no_values-atomic", "queries", "keys_from_dS",
                        "queries", "values", "keys_from_dS_no_values", "queries", "values_gradient",
                        "keys_from_dS_no_values", "grad_weights", "queries", "values_gradient", "keys_from_dS_no_values"]
    launches.clear()
    monkeypatch.setattr(fused, "BACKWARD_MODE", dict.fromkeys(fused.BACKWARD_MODE, "two_kernels"))
    fused.self_check(CPU)
    assert launches == ["forward", "forward_weights", "queries", "keys", "queries weighted", "keys weighted"]


def test_timed_float32_convolution_keeps_the_faster_method(timing_on_the_cpu, monkeypatch):
    """Timing is CUDA's: on the CPU the method is resolved directly, with the split products charged less."""
    runs, costs = timing_on_the_cpu
    costs.update(split_tf32=1.0, ieee=4.0)
    convolve = float32_ops._conv2d_float32_by
    monkeypatch.setattr(float32_ops, "_conv2d_float32_by",
                        lambda method, *args: runs.append(method) or convolve(method, *args))
    monkeypatch.setattr(float32_ops, "FLOAT32_CONV_METHOD", "timed")
    x, weight, bias = torch.randn(2, 8, 6, 6), torch.randn(4, 8, 3, 3), torch.randn(4)
    assert float32_ops.float32_conv_method(x, weight, bias, 1) == "split_tf32"
    assert timed_choice.choices() == {"float32 convolution cpu torch.float32 (2, 8, 6, 6) (4, 8, 3, 3) torch.contiguous_format":
                                      {"choice": "split_tf32", "ms": {"ieee": 4.0, "split_tf32": 1.0}}}
    costs.update(split_tf32=5.0)
    x = x.contiguous(memory_format=torch.channels_last)  # another key: timed again
    assert float32_ops.float32_conv_method(x, weight, bias, 1) == "ieee"
    monkeypatch.setattr(float32_ops, "FLOAT32_CONV_METHOD", "split_tf32")
    assert float32_ops.float32_conv_method(x, weight, bias, 1) == "split_tf32"
    # The CPU op itself always computes plain float32, whatever the setting.
    runs.clear()
    torch.testing.assert_close(float32_ops.conv2d_float32(x, weight, bias, 1),
                               torch.nn.functional.conv2d(x, weight, bias, padding=1))
    assert runs == ["ieee"]


def test_untimed_float32_convolution_splits_large_inputs_only(monkeypatch):
    """Where nothing is timed (evaluation; here the CPU), the method follows the input's positions:
    cuDNN without TF32 for a batch-1 training patch, the split TF32 products for a batch of them and for
    a 360x360 image (their timed and measured winners on an H200)."""
    monkeypatch.setattr(float32_ops, "FLOAT32_CONV_METHOD", "timed")
    weight, bias = torch.empty(64, 256, 3, 3, device="meta"), torch.empty(64, device="meta")

    def method(batch, height, width):
        return float32_ops.float32_conv_method(torch.empty(batch, 256, height, width, device="meta"), weight, bias, 1)

    assert method(1, 48, 48) == "ieee"
    assert method(1, 128, 128) == "ieee"
    assert method(16, 48, 48) == "split_tf32"
    assert method(1, 360, 360) == "split_tf32"
    assert method(1, 182, 182) == "split_tf32" and method(1, 181, 181) == "ieee"  # 181^2 = 32761 < 32768 <= 182^2
    assert timed_choice.choices() == {}
