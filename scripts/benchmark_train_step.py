"""Time one DLSN training step: this project (eager and compiled, float32 and bf16) against the published code.

The step is the paper's (x2, batch 16, 48x48 LR patches, L1 loss, Adam): forward, backward and the
optimizer update. Cases:

* ``project``: this project's training step as it runs in ``train.py``: SRModule inside a Lightning
  Trainer (skip rule decided on the device, fused Adam, cuDNN's autotuner for the training steps as in
  the paper recipes: ``--cudnn-autotune off`` keeps cuDNN's heuristics), on batches already on the device;
* ``project-compiled``: the same with ``module.compile`` (torch.compile, mode ``--compile-mode``);
* ``published``: the authors' DLSN (``--published-src``: the ``src/`` folder of a checkout of
  laoyangui/DLSN; CUDA only, it calls ``.cuda()``) in a plain loop with torch's default Adam, as
  their trainer does.

For each precision (``--precisions``) and case the script prints the median step time over windows
of steps after warm-up, the peak memory and the warm-up time (which includes compilation), then a
markdown table with the project/published ratios; ``--json FILE`` writes the raw numbers. Two peaks:
``peak_mb`` over the timed steps (what every step of a long run needs) and ``warmup_peak_mb`` over the
warm-up. They differ where the first steps try things once: cuDNN's autotuner times candidate
algorithms with their workspaces (it skips a candidate that does not fit, so this peak never stops a
run), the timed choices time their variants, torch.compile compiles. On the H200 (2026-11-27) the
compiled float32 step peaked at 16.3 GB with the autotuner on and 8.4 GB with it off: hence both.

    python scripts/benchmark_train_step.py --device cuda --published-src .published/DLSN/src --json step.json
    python scripts/benchmark_train_step.py --device cpu --n-feats 16 --n-resgroups 1 --batch 2 --patch 16 --steps 4   # a smoke test
    python scripts/benchmark_train_step.py --device cuda --cases project-compiled --precisions 32-true \
        --matmul-precision high --float32-conv ieee --backward-mode two_kernels   # without the timed choices
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dlsn.models import chunk_attention as fused
from dlsn.models import conv_weight_grad, float32_ops, kernel_failures, timed_choice


def paper_config(args: argparse.Namespace) -> dict[str, Any]:
    return dict(scale=2, n_feats=args.n_feats, n_resgroups=args.n_resgroups, n_resblocks=args.n_resblocks,
                reduction=4, chunk_size=args.chunk_size, n_hashes=args.n_hashes, res_scale=0.1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def end_warmup(device: torch.device) -> float | None:
    """The warm-up's peak (MB); the peak restarts for the timed steps. Call after synchronising."""
    warmup_peak = peak_mb(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return warmup_peak


def batches(args: argparse.Namespace, device: torch.device, count: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    size = (args.batch, 3, args.patch, args.patch)
    return [{"lr": torch.rand(size, generator=generator).to(device),
             "hr": torch.rand(size[:2] + (2 * args.patch, 2 * args.patch), generator=generator).to(device)}
            for _ in range(count)]


def window_times(step_times: list[float], window: int) -> list[float]:
    """Seconds per step of consecutive windows: robust against the host running ahead of the device."""
    return [(step_times[i + window] - step_times[i]) / window for i in range(0, len(step_times) - window, window)]


# ---------------------------------------------------------------------------------------- project


def time_project(args: argparse.Namespace, device: torch.device, precision: str, compiled: bool) -> dict[str, Any]:
    import lightning as L

    from dlsn.callbacks import CudnnAutotune
    from dlsn.lightning_module import SRModule
    from dlsn.models import DLSN

    torch.manual_seed(0)
    net = DLSN(**paper_config(args))
    compile_options = {"enabled": compiled, "mode": args.compile_mode} if compiled else False
    module = SRModule(net, scale=2, optimizer=functools.partial(torch.optim.Adam, lr=1e-4, fused=True),
                      compile=compile_options, max_consecutive_skips=None)
    data = batches(args, device, 4)
    total = args.warmup + args.steps
    stamps: list[float] = []
    warmup_peak: list[float | None] = []

    class Stamp(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *rest) -> None:
            if trainer.global_step == args.warmup:
                synchronize(device)  # steady state from here: compilation and warm-up are behind
                warmup_peak.append(end_warmup(device))
                stamps.append(time.perf_counter())
            elif trainer.global_step > args.warmup:
                stamps.append(time.perf_counter())

    class Loader(torch.utils.data.IterableDataset):
        def __iter__(self):
            for index in range(total):
                yield data[index % len(data)]

    trainer = L.Trainer(accelerator=device.type, devices=1, precision=precision, max_steps=total, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[Stamp()] + ([CudnnAutotune()] if args.cudnn_autotune == "on" else []))
    reset_peak(device)
    counts_before = compile_cache_counts() if compiled else None
    started = time.perf_counter()
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(Loader(), batch_size=None))
    synchronize(device)
    stamps[-1] = time.perf_counter()  # the last step's work included
    warmup_s = stamps[0] - started
    result = {"step_s": statistics.median(window_times(stamps, args.window)), "warmup_s": warmup_s,
              "peak_mb": peak_mb(device), "warmup_peak_mb": warmup_peak[0], "steps": len(stamps) - 1}
    if compiled:
        result["compile_cache"] = compile_cache_counts(counts_before)
    return result


def compile_cache_counts(before: dict[str, int] | None = None) -> dict[str, int]:
    """torch.compile's on-disk cache lookups so far in this process (less ``before``): Inductor's compiled
    graphs (``fxgraph_*``) and AOTAutograd's joint graphs (``autograd_*``). A warm-up that found the graphs
    compiled by an earlier process shows hits and no misses."""
    from torch._dynamo.utils import counters

    counts = {f"fxgraph_{what}": counters["inductor"][f"fxgraph_cache_{what}"] for what in ("hit", "miss", "bypass")}
    counts |= {f"autograd_{what}": counters["aot_autograd"][f"autograd_cache_{what}"]
               for what in ("hit", "miss", "bypass")}
    return {key: value - (before or {}).get(key, 0) for key, value in counts.items()}


# -------------------------------------------------------------------------------------- published


def import_published(published_src: str | Path) -> types.ModuleType:
    """The authors' ``model`` package from the ``src/`` folder of a laoyangui/DLSN checkout."""
    source = Path(published_src).resolve()
    if not (source / "model" / "dlsn.py").is_file():
        raise SystemExit(f"--published-src {source}: expected the src/ folder of laoyangui/DLSN (model/dlsn.py)")
    if str(source) not in sys.path:
        sys.path.insert(0, str(source))
    if "matplotlib" not in sys.modules:  # their model module imports pyplot only to set a backend
        with contextlib.suppress(ImportError):
            import matplotlib  # noqa: F401
    if "matplotlib" not in sys.modules:
        pyplot = types.SimpleNamespace(switch_backend=lambda *a, **k: None)
        sys.modules["matplotlib"] = types.SimpleNamespace(pyplot=pyplot)
        sys.modules["matplotlib.pyplot"] = pyplot
    import model.attention
    import model.dlsn

    return model


def published_network(published_src: str | Path, config: dict[str, Any]) -> torch.nn.Module:
    """The authors' DLSN (x2) for ``config`` (keys of :func:`paper_config`), built with their options."""
    model = import_published(published_src)
    options = argparse.Namespace(n_resgroups=config["n_resgroups"], n_resblocks=config["n_resblocks"],
                                 n_feats=config["n_feats"], reduction=config["reduction"], scale=[2], rgb_range=1,
                                 n_colors=3, res_scale=config["res_scale"], chunk_size=config["chunk_size"],
                                 n_hashes=config["n_hashes"])
    return model.dlsn.DLSN(options)


def published_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The authors' DLSN from ``--published-src`` (their argparse options as a namespace)."""
    torch.manual_seed(0)
    return published_network(args.published_src, paper_config(args)).to(device)


def time_published(args: argparse.Namespace, device: torch.device, precision: str) -> dict[str, Any]:
    model = published_model(args, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)  # torch's default implementation, as theirs
    data = batches(args, device, 4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    reset_peak(device)
    stamps, started, warmup_peak = [], time.perf_counter(), None
    for index in range(args.warmup + args.steps):
        batch = data[index % len(data)]
        with autocast:
            loss = F.l1_loss(model(batch["lr"]), batch["hr"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if index + 1 == args.warmup:
            synchronize(device)
            warmup_peak = end_warmup(device)
        if index + 1 >= args.warmup:
            stamps.append(time.perf_counter())
    synchronize(device)
    stamps[-1] = time.perf_counter()
    return {"step_s": statistics.median(window_times(stamps, args.window)), "warmup_s": stamps[0] - started,
            "peak_mb": peak_mb(device), "warmup_peak_mb": warmup_peak, "steps": len(stamps) - 1}


# ------------------------------------------------------------------------------------------- main


def memory_text(result: dict[str, Any]) -> str:
    """``peak`` over the timed steps, and the warm-up's where it was higher (CUDA only)."""
    if result.get("peak_mb") is None:
        return "-"
    text = f"{result['peak_mb']:.0f} MB"
    warmup = result.get("warmup_peak_mb")
    if warmup is not None and warmup > result["peak_mb"] + 0.5:
        text += f" (warm-up peak {warmup:.0f} MB)"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # In order of importance, so that a run cut short keeps the headline numbers.
    parser.add_argument("--precisions", nargs="+", default=["bf16-mixed", "32-true"])
    parser.add_argument("--cases", nargs="+", default=["published", "project-compiled", "project"],
                        choices=["project", "project-compiled", "published"])
    parser.add_argument("--published-src", default=None, help="src/ of a laoyangui/DLSN checkout (CUDA only)")
    parser.add_argument("--compile-mode", default="reduce-overhead")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--patch", type=int, default=48)
    parser.add_argument("--n-feats", type=int, default=256)
    parser.add_argument("--n-resgroups", type=int, default=10)
    parser.add_argument("--n-resblocks", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--n-hashes", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5, help="steps before timing (compilation included)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (at least 10 for the issue's medians)")
    parser.add_argument("--window", type=int, default=2, help="steps per timed window")
    parser.add_argument("--matmul-precision", default=None, choices=["highest", "high", "medium"],
                        help="torch.set_float32_matmul_precision for every case (high: TF32 matrix products)")
    parser.add_argument("--cudnn-autotune", default="on", choices=["on", "off"],
                        help="this project's cases: cuDNN's autotuner for the training steps (on: as the paper "
                             "recipes' dlsn.callbacks.CudnnAutotune) or its heuristics; the published code "
                             "runs as its trainer does (heuristics)")
    parser.add_argument("--float32-conv", choices=float32_ops.FLOAT32_CONV_METHOD_CHOICES,
                        default=float32_ops.FLOAT32_CONV_METHOD,
                        help="this project's match convolution on CUDA (dlsn/models/float32_ops.py FLOAT32_CONV_METHOD)")
    parser.add_argument("--backward-mode", choices=fused.BACKWARD_MODE_CHOICES, default=None,
                        help="this project's fused attention backward (dlsn/models/chunk_attention.py "
                             "BACKWARD_MODE; default: the GPU generation's)")
    parser.add_argument("--weight-grad", choices=("timed", "cudnn", *conv_weight_grad.methods()),
                        default=conv_weight_grad.WEIGHT_GRAD_METHOD,
                        help="GLA's embeddings' weight gradient in eager float32 training with cuDNN's TF32 "
                             "(dlsn/models/conv_weight_grad.py WEIGHT_GRAD_METHOD); the compiled and bf16 steps "
                             "keep cuDNN's whatever this says")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    # How this project computes the match convolution, the attention backward and the embeddings' weight
    # gradient ("timed": the fastest, timed on first use in the training steps): to time the step with one
    # way forced.
    float32_ops.FLOAT32_CONV_METHOD = args.float32_conv
    conv_weight_grad.WEIGHT_GRAD_METHOD = args.weight_grad
    if args.backward_mode:
        for generation in fused.BACKWARD_MODE:
            fused.BACKWARD_MODE[generation] = args.backward_mode
    if args.matmul_precision:
        torch.set_float32_matmul_precision(args.matmul_precision)
    cases = [c for c in args.cases if c != "published" or args.published_src]
    if "published" in args.cases and not args.published_src:
        print("published: skipped (no --published-src)")
    if "published" in cases and device.type != "cuda":
        print("published: skipped (the authors' code runs on CUDA only)")
        cases.remove("published")

    results, printed_choices = [], set()
    for precision in args.precisions:
        for case in cases:
            try:
                if case == "published":
                    result = time_published(args, device, precision)
                else:
                    result = time_project(args, device, precision, compiled=case == "project-compiled")
            except Exception as err:  # e.g. out of memory: report it, go on with the next case
                print(f"train_step {case} {precision}: {type(err).__name__}: {err}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            result |= {"case": case, "precision": precision, "device": str(device),
                       "matmul_precision": torch.get_float32_matmul_precision(),
                       "cudnn_autotune": case != "published" and args.cudnn_autotune == "on",
                       "float32_conv": None if case == "published" else float32_ops.FLOAT32_CONV_METHOD,
                       "backward_mode": None if case == "published" else fused._backward_mode(device),
                       "weight_grad": None if case == "published" else conv_weight_grad.WEIGHT_GRAD_METHOD,
                       # what "timed" picked so far in this process, with each candidate's time
                       "timed_choices": None if case == "published" else timed_choice.choices()}
            if case != "published" and (failures := kernel_failures()):  # this case and later ones timed the fallback
                result["kernel_failures"] = failures
            if case != "published" and (left_out := fused.left_out_variants()):  # failed the self-check: not offered
                result["left_out_variants"] = left_out
            results.append(result)
            if args.json:  # after every case: a run cut short keeps what it measured
                Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
            print(f"train_step {case:17s} {precision:10s} {result['step_s'] * 1e3:9.1f} ms/step  "
                  f"peak {memory_text(result)}  warm-up {result['warmup_s']:.1f} s", flush=True)
            if "compile_cache" in result:
                print("  compile cache: " + ", ".join(f"{key} {value}" for key, value in result["compile_cache"].items()),
                      flush=True)
            for what, entry in (result["timed_choices"] or {}).items():
                if what in printed_choices:
                    continue
                printed_choices.add(what)
                print(f"  timed choice: {timed_choice.report(what, entry)}", flush=True)

    print("\n| precision | case | ms/step | peak memory | warm-up | vs published |\n|---|---|---|---|---|---|")
    for result in results:
        published = next((r for r in results if r["case"] == "published" and r["precision"] == result["precision"]), None)
        ratio = f"{published['step_s'] / result['step_s']:.2f}x" if published else "-"
        print(f"| {result['precision']} | {result['case']} | {result['step_s'] * 1e3:.1f} | {memory_text(result)} | "
              f"{result['warmup_s']:.1f} s | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
