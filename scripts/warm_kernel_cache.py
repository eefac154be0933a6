"""Compile the fused GLA kernels into Triton's on-disk cache, in parallel, before gpu_check.sh measures.

    python scripts/warm_kernel_cache.py                                    # on a CUDA machine
    python scripts/warm_kernel_cache.py --device cpu --small --workers 2   # the plumbing, on the CPU

Triton compiles a kernel when it is first launched with a new specialisation, in the launching process
and one kernel at a time. `scripts/check_fused_gla.py` alone launches about sixty distinct kernels: every
backward variant the training steps' timed choice may try (`chunk_attention.backward_variants`), in
float32 with true and with TF32 dot products and in bf16, at the self-check's sizes and at the paper
layer's, a few seconds of compilation each; in float32 also as the attention node with the round mixing
(`attend_and_mix`, float32 training at batch 16) runs them; and the configurations of the Triton weight
gradient that float32 training's timed choice offers for GLA's embeddings (`conv_weight_grad.CONFIGS`).
This script launches the same work as independent tasks in parallel processes (one per precision and
backward variant, one per weight-gradient configuration), so that the steps after
it find the kernels in Triton's cache (`TRITON_CACHE_DIR`, by default `~/.triton/cache`) and spend the
lent machine's time on checks and measurements instead.

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
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_fused_gla import (  # noqa: E402
    GLA_PROBLEMS,
    SELF_CHECK_PRECISIONS,
    backward_variant,
    gla_problem,
    outputs_and_gradients,
)

from dlsn.models import chunk_attention, conv_weight_grad  # noqa: E402


def tasks(device: torch.device, small: bool) -> list[tuple]:
    """(kind, dtype, detail, device, problem size): the paper layer per precision and backward variant
    (its kernels are the slowest to compile: first), then the self-check per precision."""
    problem = "small" if small else "paper"
    found = []
    for dtype in (torch.float32, torch.bfloat16):
        found += [("GLA forward+backward", dtype, variant, str(device), problem)
                  for variant in chunk_attention.backward_variants(device, dtype)]
    found += [("self-check", dtype, precision, str(device), problem) for dtype, precision in SELF_CHECK_PRECISIONS]
    if conv_weight_grad.triton is not None:
        found += [("weight gradient", torch.float32, conv_weight_grad.config_name(config), str(device), problem)
                  for config in conv_weight_grad.CONFIGS]
    return found


def run_task(task: tuple) -> float:
    """Launch (and so compile) every kernel of one task; its seconds."""
    kind, dtype, detail, device_name, problem = task
    device = torch.device(device_name)
    start = time.perf_counter()
    if kind == "self-check":
        torch.set_float32_matmul_precision(detail)
        chunk_attention.self_check(device, dtype)
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
        torch.set_float32_matmul_precision("high")  # TF32 dot products in float32: what GLA's auto runs
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
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="toy sizes (the CPU: tests this script)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="parallel processes (default: the CPU cores, at most 8)")
    parser.add_argument("--max-tasks", type=int, default=None, help="only the first tasks (a quicker test)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    todo = tasks(device, args.small)[:args.max_tasks]
    print(f"{len(todo)} tasks on {args.workers} processes; Triton cache: "
          f"{os.environ.get('TRITON_CACHE_DIR', '~/.triton/cache (default)')}", flush=True)
    start, failed = time.perf_counter(), 0
    # spawn: CUDA cannot be used in a forked child of a process that has initialised it
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_task, task): task for task in todo}
        for future in as_completed(futures):
            kind, dtype, detail, _, _ = futures[future]
            what = f"{kind}, {str(dtype).removeprefix('torch.')}, {detail}"
            try:
                print(f"  {future.result():6.1f} s  {what}", flush=True)
            except Exception as error:  # noqa: BLE001 - report it, go on with the others
                failed += 1
                print(f"  FAILED  {what}: {type(error).__name__}: {error}", flush=True)
                print("".join(traceback.format_exception(error, limit=4)), flush=True)
    print(f"done in {time.perf_counter() - start:.1f} s, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
