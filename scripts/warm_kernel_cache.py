"""Compile the fused GLA kernels into Triton's on-disk cache, in parallel, before gpu_check.sh measures.

    python scripts/warm_kernel_cache.py                                    # on a CUDA machine
    python scripts/warm_kernel_cache.py --device cpu --small --workers 2   # the plumbing, on the CPU

Triton compiles a kernel when it is first launched with a new specialisation, in the launching process
and one kernel at a time. `scripts/check_fused_gla.py` alone launches more than a hundred distinct kernels:
every backward variant the training steps' timed choice may try (`chunk_attention.backward_variants`), in
float32 with true and with TF32 dot products and in bf16, at the self-check's sizes and at the paper
layer's, a few seconds of compilation each; in float32 also as the attention node with the round mixing
(`attend_and_mix`, float32 training at batch 16) runs them; and the configurations of the Triton weight
gradient that float32 training's timed choice offers for GLA's embeddings (`conv_weight_grad.CONFIGS`).
Every process that uses GLA's fused kernel on a GPU runs the self-check first (32 distinct kernels in
float32). This script launches the same work as independent tasks in parallel processes, so that the
steps after it find the kernels in Triton's cache (`TRITON_CACHE_DIR`, by default `~/.triton/cache`) and
spend the lent machine's time on checks and measurements instead.

A task compiles each kernel it launches that is not yet in the cache, also one that another task is
compiling at that moment. So:
- one task per backward variant, for the paper layer (per precision) and for the self-check (per precision
  and dot-product precision: one task for the whole float32 self-check compiled its 32 kernels one after
  the other, the longest task of all);
- the first task of each such group runs alone before the rest of its group: it compiles the kernels all
  of them launch (the forward, the hashing, the round mixing), and the others then compile only their own;
- the variants pairing a query-kernel with a values-kernel configuration (10 of float32's 25) are left out
  (`backward_variants(..., combinations=False)`): each kernel of a pair runs with the same specialisation in
  the variant with its configuration alone (tests/test_warm_kernel_cache.py checks that the tasks launch
  every kernel that all the variants launch);
- one process per core, up to 16 (a lent H100/H200 has 16): each compilation is single-threaded.

Nothing computed here is kept or checked: a task that fails is reported (exit status 1) and the others go
on; the check step that follows fails on the same problem, with its own error. On the CPU the kernels
run in Triton's interpreter and nothing is compiled: `--small` runs the tasks at toy sizes, to test this
script.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Executor, ProcessPoolExecutor, wait
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_fused_gla import (  # noqa: E402
    GLA_PROBLEMS,
    SELF_CHECK_PRECISIONS,
    backward_variant,
    forward_mode,
    gla_problem,
    outputs_and_gradients,
)

from dlsn.models import chunk_attention, conv_weight_grad  # noqa: E402


class Task(NamedTuple):
    kind: str  # "GLA forward+backward", "self-check" or "weight gradient"
    dtype: torch.dtype
    detail: str  # the backward variant (chunk_attention.backward_variants), or the weight-gradient configuration
    device: str
    problem: str  # GLA_PROBLEMS' size of the layer
    precision: str = "high"  # float32 matrix products: TF32 ("high", what GLA's auto runs) or true float32


def tasks(device: torch.device, small: bool) -> list[Task]:
    """The paper layer per precision and backward variant (its kernels are the slowest to compile: first),
    the self-check per precision, dot-product precision and backward variant, and the weight gradient per
    configuration."""
    problem = "small" if small else "paper"
    found = []
    for dtype in (torch.float32, torch.bfloat16):
        found += [Task("GLA forward+backward", dtype, variant, str(device), problem)
                  for variant in chunk_attention.backward_variants(device, dtype, combinations=False)]
    for dtype, precision in SELF_CHECK_PRECISIONS:
        found += [Task("self-check", dtype, variant, str(device), problem, precision)
                  for variant in chunk_attention.backward_variants(device, dtype, combinations=False)]
    if conv_weight_grad.triton is not None:
        found += [Task("weight gradient", torch.float32, conv_weight_grad.config_name(config), str(device), problem)
                  for config in conv_weight_grad.CONFIGS]
    return found


def group(task: Task) -> tuple | None:
    """Tasks of one group launch the same kernels besides their own variant's: the group's first task runs
    before the others. ``None``: a task of no group (the weight-gradient configurations share no kernel)."""
    return None if task.kind == "weight gradient" else (task.kind, task.dtype, task.precision)


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity where the platform has one; a container's
    machine may have many more)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_task(task: tuple) -> float:
    """Launch (and so compile) every kernel of one task (a :class:`Task`, or the tuple of its fields); its
    seconds."""
    kind, dtype, detail, device_name, problem, precision = Task(*task)
    device = torch.device(device_name)
    start = time.perf_counter()
    if kind == "self-check":
        torch.set_float32_matmul_precision(precision)
        chunk_attention.self_check(device, dtype, variants=[detail])
    elif kind == "weight gradient":
        # GLA's stacked embeddings' weight gradient, as its backward computes it where the configuration
        # wins the timed choice. Every size argument is a multiple of 16 here as at batch 16: the same
        # specialisation, so the same compiled kernel.
        channels, chunk_size, sizes = GLA_PROBLEMS[problem]
        config = conv_weight_grad.config_named(detail)
        for batch, size in sizes:
            layer, _, x, _ = gla_problem(channels, chunk_size, batch, size, device)
            stacked = sum(conv.out_channels for conv in (layer.match_embedding, layer.value_embedding,
                                                         layer.score_embedding))
            grad_y = torch.randn(batch, stacked, size, size, device=device)
            conv_weight_grad.weight_grad(x.contiguous(memory_format=torch.channels_last),
                                         grad_y.contiguous(memory_format=torch.channels_last), config,
                                         "tf32" if device.type == "cuda" else "ieee")
    else:
        torch.set_float32_matmul_precision(precision)
        channels, chunk_size, sizes = GLA_PROBLEMS[problem]
        for batch, size in sizes:
            fused, _, x, rotations = gla_problem(channels, chunk_size, batch, size, device)
            with backward_variant(device, dtype, detail):
                outputs_and_gradients(fused, x, rotations, bf16=dtype == torch.bfloat16)
                if dtype == torch.float32 and (batch, size) == sizes[0]:
                    # As float32 training at batch 16 runs it (attend_and_mix): backward kernels
                    # that read the mixed gradient and the round weights, other specialisations.
                    with chunk_attention.mixing_from(0):
                        outputs_and_gradients(fused, x, rotations)
                    # The forwards the timed choice may pick, once: in the group's second task, which runs beside
                    # the others (the first runs alone, and compiles only what they all launch).
                    if detail == chunk_attention.BACKWARD_MODES[1]:
                        for mode in chunk_attention.FORWARD_MODES[1:]:
                            with forward_mode(device, mode):
                                outputs_and_gradients(fused, x, rotations)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run_in_parallel(todo: list[Task], pool: Executor) -> int:
    """Run the tasks in ``pool``, each group's first task (:func:`group`) before the rest of its group, and
    report each as it ends; the number that failed. A failed first task still lets its group run: each task
    reports its own error."""
    leaders, followers = [], {}
    for task in todo:
        if (key := group(task)) in followers:
            followers[key].append(task)
        else:
            leaders.append(task)
            if key is not None:
                followers[key] = []
    failed = 0
    running = {pool.submit(run_task, task): task for task in leaders}
    while running:
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in done:
            task = running.pop(future)
            what = ", ".join((task.kind, str(task.dtype).removeprefix("torch."),
                              *([task.precision] if task.kind == "self-check" else []), task.detail))
            try:
                print(f"  {future.result():6.1f} s  {what}", flush=True)
            except Exception as error:  # noqa: BLE001 - report it, go on with the others
                failed += 1
                print(f"  FAILED  {what}: {type(error).__name__}: {error}", flush=True)
                print("".join(traceback.format_exception(error, limit=4)), flush=True)
            # A group's first task has ended (after any other, nothing is left to start): the kernels the
            # group shares are in the cache, the rest of the group compiles only its own.
            for follower in followers.pop(group(task), []):
                running[pool.submit(run_task, follower)] = follower
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="toy sizes (the CPU: tests this script)")
    parser.add_argument("--workers", type=int, default=min(16, available_cores()),
                        help="parallel processes (default: the CPU cores this process may use, at most 16)")
    parser.add_argument("--max-tasks", type=int, default=None, help="only the first tasks (a quicker test)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    todo = tasks(device, args.small)[:args.max_tasks]
    print(f"{len(todo)} tasks on {args.workers} processes; Triton cache: "
          f"{os.environ.get('TRITON_CACHE_DIR', '~/.triton/cache (default)')}", flush=True)
    start = time.perf_counter()
    # spawn: CUDA cannot be used in a forked child of a process that has initialised it
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        failed = run_in_parallel(todo, pool)
    print(f"done in {time.perf_counter() - start:.1f} s, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
