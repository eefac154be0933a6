"""Where a DLSN training step spends its GPU time, and which launch configuration suits the fused kernel.

    python scripts/profile_train_step.py > profile.txt            # on a CUDA machine, about 3 minutes
    python scripts/profile_train_step.py --max-seconds 180        # start nothing new after 3 minutes
    python scripts/profile_train_step.py --device cpu --small     # a smoke test on the CPU

Sections (``--sections``), each printed as soon as it is done:

* ``step``: the paper training step (x2, batch 16, 48x48 LR, L1, fused Adam; plain loop, eager) in
  bf16 autocast and in float32 with TF32: median step time, then ``torch.profiler``'s table of the
  operations and kernels with the most self device time over ``--profile-steps`` steps;
* ``gla``: one GLA layer (C=256, k=128, 3 hashes) forward+backward at batch 16, 48x48, the same two
  precisions: median time and profiler table;
* ``gla_batch1``: GLA forward+backward at batch 1, 48x48 and 96x96, float32 with TF32 (issue 9's
  launch-bound rows), this project's layer (``attention_impl=auto``: the fused kernel on a GPU; training
  mode: rotations drawn on the GPU) against the published layout of ``scripts/benchmark_gla.py``: median
  time, the host's time to issue one step, kernel launches per step, and the profiler's operations with
  the most host time and with the most device time;
* ``backward_modes``: the fused kernel's backward at the training size as each variant the training
  steps' timed choice tries (``chunk_attention.backward_variants``: two kernels or atomic additions
  from the key kernel for dQ, dV from the key kernel or a values kernel, and in float32 a few
  key-kernel configurations), bf16 and float32
  (TF32): median milliseconds (``--small``: one run each, and no variant pairing a query with a values
  kernel configuration, each of which runs alone);
* ``tune``: every launch configuration of ``--rows-options``, ``--warps``, ``--stages`` (and the
  forward's value-channel block, ``--channel-blocks``) for each of the fused kernel's kernels at the training size, in bf16
  and float32 (TF32), the backward's for each way of computing dQ and dV (``--backward-modes``: two
  kernels, or atomic additions from the key kernel, each with dV from the key kernel or a values kernel):
  median milliseconds, best first; ``--json`` writes them.
  ``--dtypes`` and ``--kernels`` narrow the sweep, e.g. to the float32 key kernel, the largest share of
  the float32 step's attention whose configurations a cut-short sweep never reached:
  ``--sections tune --dtypes float32 --kernels keys``; or to the kernels of the backward the timed choice
  picked at batch 16, at gpu_check's 96x96 row, each with 64, 128 and 256 value channels per program where
  it holds them: ``--sections tune --dtypes float32 --patch 96 --backward-modes stored_dS+values --kernels
  queries values keys_from_dS_no_values --channel-blocks 64 128 256 --rows-options 32 64``.
  The numbers feed ``LAUNCH_CONFIGS`` and ``BACKWARD_MODE`` (the GPU's generation) in
  ``dlsn/models/chunk_attention.py``.

``backward_modes`` and ``tune`` time the backward as a training step runs it at that size: in float32
where GLA attends and mixes the rounds in one node (``chunk_attention.attends_and_mixes``: batch 16 at
48x48 and 96x96), the kernels that read the mixed output's gradient and the round weights, which the
training steps' timed choice also times apart; elsewhere those that read the attended values' gradient.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dlsn.models import DLSN, GLA
from dlsn.models import chunk_attention as fused
from dlsn.models.gla import sort_into_chunks

SORT_KEY = "self_device_time_total"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(run, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        run()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def profiled(run, device: torch.device, steps: int) -> torch.profiler.profile:
    """``torch.profiler`` (host, and the device on CUDA) over ``steps`` calls of ``run``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(steps):
            run()
        synchronize(device)
    return profiler


def profile_table(run, device: torch.device, steps: int, rows: int) -> str:
    events = profiled(run, device, steps).key_averages()
    # Kernels only: an operator's row repeats the time of the kernels it launched.
    kernel_ms = sum(event.self_device_time_total for event in events
                    if event.device_type == torch.autograd.DeviceType.CUDA) / 1e3 / steps
    header = f"GPU kernel time per step: {kernel_ms:.1f} ms\n"
    sort_by = SORT_KEY if device.type == "cuda" else "self_cpu_time_total"
    return header + events.table(sort_by=sort_by, row_limit=rows, max_name_column_width=90)


def precisions(device: torch.device):
    """(label, autocast context factory) for bf16 autocast and float32 with TF32 matrix products."""
    yield "bf16-mixed", lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    yield "32-true (TF32)", contextlib.nullcontext


def section_step(args, device) -> None:
    config = dict(scale=2, n_feats=args.channels, n_resgroups=args.groups, n_resblocks=args.blocks,
                  chunk_size=args.chunk, n_hashes=3, res_scale=0.1)
    generator = torch.Generator().manual_seed(0)
    lr = torch.rand(args.batch, 3, args.patch, args.patch, generator=generator).to(device)
    hr = torch.rand(args.batch, 3, 2 * args.patch, 2 * args.patch, generator=generator).to(device)
    for label, autocast in precisions(device):
        torch.manual_seed(0)
        net = DLSN(**config).to(device)
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-4, fused=device.type == "cuda")

        def step():
            with autocast():
                loss = F.l1_loss(net(lr), hr)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        milliseconds = median_ms(step, device, args.warmup, args.repeats)
        print(f"\n## training step, {label}: {milliseconds:.1f} ms (median of {args.repeats})", flush=True)
        print(profile_table(step, device, args.profile_steps, args.rows), flush=True)
        del net, optimizer


def section_gla(args, device) -> None:
    torch.manual_seed(0)
    layer = GLA(args.channels, chunk_size=args.chunk, n_hashes=3, reduction=4).to(device)
    layer.to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, args.channels, args.patch, args.patch, device=device)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    for label, autocast in precisions(device):
        def step():
            with autocast():
                out = layer(x)
            out.float().square().mean().backward()

        milliseconds = median_ms(step, device, args.warmup, args.repeats)
        print(f"\n## GLA forward+backward, batch {args.batch}, {args.patch}x{args.patch}, {label}: "
              f"{milliseconds:.2f} ms (median of {args.repeats}; fused kernel failure: {fused.fused_kernel_failure()})",
              flush=True)
        print(profile_table(step, device, args.profile_steps, args.rows), flush=True)


def host_ms(run, device: torch.device, repeats: int) -> float:
    """Median time to issue one ``run`` (the device idle before each): what a launch-bound step costs."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    synchronize(device)
    return statistics.median(times) * 1e3


def kernels_per_step(run, device: torch.device, steps: int) -> tuple[float, str]:
    """Kernel launches per ``run`` and the profiler's tables of the operations with the most host time and
    (on CUDA) the most device time."""
    profiler = profiled(run, device, steps)
    events = profiler.events()
    launches = sum(event.device_type == torch.autograd.DeviceType.CUDA for event in events) / steps
    averages = profiler.key_averages()
    tables = [averages.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70)]
    if device.type == "cuda":
        tables.append(averages.table(sort_by=SORT_KEY, row_limit=15, max_name_column_width=70))
    return launches, "\n".join(tables)


def section_gla_batch1(args, device) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchmark_gla import published_layout_forward

    torch.manual_seed(0)
    layer = GLA(args.channels, chunk_size=args.chunk, n_hashes=3, reduction=4).to(device)
    for size in args.batch1_sizes:
        x = torch.randn(1, args.channels, size, size, device=device, requires_grad=True)
        for name, forward in (("this project", layer),
                              ("published layout", lambda t: published_layout_forward(layer, t))):
            def step():
                forward(x).square().mean().backward()

            milliseconds = median_ms(step, device, args.warmup, args.repeats)
            issue = host_ms(step, device, args.repeats)
            launches, table = kernels_per_step(step, device, args.profile_steps)
            print(f"\n## GLA forward+backward, batch 1, {size}x{size}, float32 (TF32), {name}: {milliseconds:.2f} ms "
                  f"(median of {args.repeats}); host {issue:.2f} ms to issue a step; {launches:.0f} kernels per step",
                  flush=True)
            print(table, flush=True)


def kernel_inputs(args, device, dtype):
    generator = torch.Generator().manual_seed(0)
    length, qk_dim = args.patch * args.patch, args.channels // 4

    def random(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    queries = random(args.batch, length, qk_dim)
    keys = F.normalize(random(args.batch, length, qk_dim).float(), dim=-1).to(dtype)
    learned_score = random(args.batch, length, args.chunk)
    values = random(args.batch, length, args.channels)
    codes = torch.randint(0, max(1, length // args.chunk), (args.batch, 3, length), generator=generator).to(device)
    order, inverse = sort_into_chunks(codes, min(args.chunk, length))
    return queries, keys, learned_score, values, order, inverse


def backward_as_trained(inputs, attended, confidence):
    """The fused backward as a training step runs it at these sizes, as ``run(mode=None, configs=None)``,
    and what it reads. Float32 values where GLA attends and mixes in one node (``attends_and_mixes``:
    batch 16 at 48x48 and 96x96): the kernels read the mixed output's gradient and the round weights
    (``round_weights``), other specialisations than the ``[N, T, L, C]`` incoming gradient's; elsewhere that
    gradient and the confidences'. Random gradients: times do not depend on the values."""
    values = inputs[3]
    if fused.attends_and_mixes(values, attended.shape[1]):
        round_weights = torch.softmax(confidence, dim=1)
        mixed = (attended * round_weights.unsqueeze(-1)).sum(1)
        grad_mixed = torch.randn_like(mixed)
        delta = fused.mixed_row_terms(grad_mixed, mixed, round_weights)

        def run(mode=None, configs=None):
            fused._fused_backward(grad_mixed, None, *inputs, None, confidence, mode=mode, configs=configs,
                                  delta=delta, round_weights=round_weights)

        return run, "from the mixed output's gradient and the round weights (attend_and_mix)"
    grads = (torch.randn_like(attended), torch.randn_like(confidence))

    def run(mode=None, configs=None):
        fused._fused_backward(*grads, *inputs, attended, confidence, mode=mode, configs=configs)

    return run, "from the attended values' and the confidences' gradients"


def section_backward_modes(args, device) -> None:
    print(f"\n## fused kernel backward, each variant the timed choice tries (mode, key kernel configuration; "
          f"chunk_attention.backward_variants), batch {args.batch}, L={args.patch ** 2}, C={args.channels}, "
          f"k={args.chunk}", flush=True)
    for dtype in (torch.bfloat16, torch.float32):
        inputs = kernel_inputs(args, device, dtype)
        attended, confidence = fused._fused_forward(*inputs)
        backward, reads = backward_as_trained(inputs, attended, confidence)
        timings = []
        # --small (the interpreter, seconds per run): each launch configuration in one variant, one run each
        for name, (mode, configs) in fused.backward_variants(device, dtype, combinations=not args.small).items():
            runs = (0, 1) if args.small else (args.warmup, args.repeats)
            timings.append(f"{name} {median_ms(functools.partial(backward, mode, configs), device, *runs):.3f} ms")
        print(f"{dtype}, {reads}: " + "; ".join(timings), flush=True)


KERNELS = ("forward", "forward_weights", "queries", "keys", "values", "keys_no_values", "keys_from_dS",
           "keys_from_dS_no_values")
FORWARD_KERNELS = {"forward": "fused", "forward_weights": "weights+matmul"}  # the forward mode that runs each


def backward_kernels(mode: str, dtype: torch.dtype) -> list[str]:
    """The kernels swept in backward ``mode``: the query kernel where the mode runs it (float32's atomic
    modes do not; in the modes that compute dV apart it sums dP over blocks of channels, or with "+dP" reads
    it, with the same ``LAUNCH_CONFIGS`` entry), its key kernel and its values kernel (the "+values" modes; the
    "+matmul" modes' batched products are cuBLAS's, not swept)."""
    atomic, values_kernel = mode.startswith("atomic"), mode.endswith("+values")
    queries = [] if atomic and dtype == torch.float32 else ["queries"]
    return queries + (["values"] if values_kernel else []) + [fused._key_kernel_name(mode)]


def section_tune(args, device) -> list[dict]:
    results = []
    for dtype in [{"bf16": torch.bfloat16, "float32": torch.float32}[name] for name in args.dtypes]:
        inputs = kernel_inputs(args, device, dtype)
        attended, confidence = fused._fused_forward(*inputs)
        backward, reads = backward_as_trained(inputs, attended, confidence)
        precision_class = "float32" if dtype == torch.float32 else "half"
        generation = fused._generation(device)
        configs = fused.LAUNCH_CONFIGS[generation]
        original = dict(configs)
        # Value channels per program of the kernels that hold a [rows, C] accumulator (--channel-blocks).
        channel_block_tables = {"forward": fused.FORWARD_CHANNEL_BLOCK, "values": fused.VALUES_CHANNEL_BLOCK}
        original_channel_blocks = {name: table[generation] for name, table in channel_block_tables.items()}
        original_channel_block = original_channel_blocks["forward"]
        original_mode = fused.BACKWARD_MODE[generation]
        defaults = ", ".join(f"{kernel} {'/'.join(map(str, original[kernel, precision_class]))}" for kernel in KERNELS)
        print(f"\n## fused kernel launch configurations (LAUNCH_CONFIGS[{generation}]), {dtype}, batch {args.batch}, "
              f"L={args.patch ** 2}, C={args.channels}, k={args.chunk} (defaults: {defaults}; forward channel block "
              f"{original_channel_block}, values {original_channel_blocks['values']}, backward {original_mode}); "
              f"the backward {reads}", flush=True)
        sweeps = [(name, None) for name in FORWARD_KERNELS] + [(name, mode) for mode in args.backward_modes
                                         for name in backward_kernels(mode, dtype)]
        sweeps = [(name, mode) for name, mode in sweeps if name in args.kernels]
        for name, mode in sweeps:
            channel_blocks = args.channel_blocks if name in channel_block_tables else [None]
            if mode:
                fused.BACKWARD_MODE[generation] = mode
            timings = []
            for rows, warps, stages, channel_block in itertools.product(args.rows_options, args.warps, args.stages,
                                                                        channel_blocks):
                if time.perf_counter() > args.deadline:
                    print(f"(--max-seconds reached: the rest of the {name} configurations not timed)", flush=True)
                    break
                configs[name, precision_class] = (rows, warps, stages)
                if channel_block:
                    channel_block_tables[name][generation] = channel_block
                fused._working_rows.clear()
                if name in FORWARD_KERNELS:
                    run = functools.partial(fused._fused_forward, *inputs, mode=FORWARD_KERNELS[name])
                else:  # the backward runs both kernels: time it whole, and with the other kernel at its default
                    run = backward
                label = dict(kernel=name, dtype=str(dtype), rows=rows, warps=warps, stages=stages,
                             channel_block=channel_block, backward_mode=mode)
                try:
                    milliseconds = median_ms(run, device, args.tune_warmup, args.tune_repeats)
                    rows_used = [v for k, v in fused._working_rows.items() if k[0] == name]
                    label |= dict(ms=round(milliseconds, 4), rows_used=rows_used[0] if rows_used else None)
                except Exception as error:  # noqa: BLE001 - a configuration that does not compile
                    label |= dict(ms=None, error=f"{type(error).__name__}: {str(error)[:200]}")
                timings.append(label)
                results.append(label)
                configs.update(original)
                for table_name, table in channel_block_tables.items():
                    table[generation] = original_channel_blocks[table_name]
            fused.BACKWARD_MODE[generation] = original_mode
            timings.sort(key=lambda r: float("inf") if r["ms"] is None else r["ms"])
            what = f"forward ({FORWARD_KERNELS[name]})" if name in FORWARD_KERNELS else f"backward ({mode}, {name} varied)"
            print(f"{what}: " + "; ".join(
                f"{r['rows']}/{r['warps']}/{r['stages']}" + (f"/c{r['channel_block']}" if r["channel_block"] else "")
                + (f" {r['ms']:.3f} ms" if r["ms"] is not None else " failed")
                + (f" (rows {r['rows_used']})" if r.get("rows_used") not in (None, r["rows"]) else "")
                for r in timings), flush=True)
        fused._working_rows.clear()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sections", nargs="+", default=["gla", "step", "gla_batch1", "backward_modes", "tune"],
                        choices=["step", "gla", "gla_batch1", "backward_modes", "tune"])
    parser.add_argument("--small", action="store_true", help="toy sizes (a CPU smoke test)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=30, help="rows of each profiler table")
    parser.add_argument("--rows-options", type=int, nargs="+", default=[32, 64, 16])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--channel-blocks", type=int, nargs="+", default=None,
                        help="value channels per program swept for the forward and values kernels (default 128 "
                             "256; --small: 16)")
    parser.add_argument("--patch", type=int, default=None,
                        help="LR patch side of the step, gla and tune sections (default 48, the training size; "
                             "96: the batch-16 96x96 GLA row of gpu_check)")
    parser.add_argument("--backward-modes", nargs="+", choices=fused.BACKWARD_MODES, default=list(fused.BACKWARD_MODES),
                        help="ways of computing dQ and dV to sweep (dlsn/models/chunk_attention.py BACKWARD_MODE)")
    parser.add_argument("--dtypes", nargs="+", choices=["bf16", "float32"], default=["bf16", "float32"],
                        help="value precisions to tune (float32: TF32 dot products)")
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS),
                        help="kernels to tune (keys_no_values: the key kernel of the +values modes; keys_from_dS, "
                             "keys_from_dS_no_values: those of the stored_dS modes)")
    parser.add_argument("--tune-repeats", type=int, default=10)
    parser.add_argument("--tune-warmup", type=int, default=2, help="untimed runs before each configuration's")
    parser.add_argument("--json", default=None, help="write the tuning results to this file")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="start no section and time no configuration after this many seconds")
    args = parser.parse_args(argv)
    args.deadline = time.perf_counter() + (args.max_seconds or float("inf"))
    device = torch.device(args.device)
    torch.set_float32_matmul_precision("high")  # as train.py's paper recipes: TF32 matrix products
    if args.small:
        args.__dict__.update(channels=16, chunk=8, groups=1, blocks=1, batch=2, patch=6, batch1_sizes=[6], warmup=1, repeats=2,
                             profile_steps=1, rows_options=[8, 16], warps=[4], stages=[1],
                             channel_blocks=args.channel_blocks or [16], tune_repeats=1, tune_warmup=0)
    else:
        args.__dict__.update(channels=256, chunk=128, groups=10, blocks=4, batch=16, patch=args.patch or 48,
                             batch1_sizes=[48, 96], channel_blocks=args.channel_blocks or [128, 256])
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), flush=True)
    results = []
    for section in args.sections:
        started = time.perf_counter()
        if started > args.deadline:
            print(f"\n## {section}: skipped (--max-seconds reached)", flush=True)
            continue
        if section == "tune":
            if device.type != "cuda" and not args.small:
                print("\n## tune: skipped (needs CUDA, or --small for the interpreter)")
                continue
            results = section_tune(args, device)
            if args.json:
                with open(args.json, "w") as file:
                    json.dump(results, file, indent=1)
        else:
            if section == "backward_modes" and device.type != "cuda" and not args.small:
                print("\n## backward_modes: skipped (needs CUDA, or --small for the interpreter)")
                continue
            {"step": section_step, "gla": section_gla, "gla_batch1": section_gla_batch1,
             "backward_modes": section_backward_modes}[section](args, device)
        print(f"({section}: {time.perf_counter() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
