"""Speed and memory of GLA and DLSN: the reference and the fused attention, and the published layout.

Prints, per case, the median wall time over ``--repeats`` runs (after ``--warmup`` runs) and the peak
memory: on the CPU the peak RSS of a fresh process (every case runs in its own subprocess), on CUDA
the peak of ``torch.cuda.max_memory_allocated`` above what was allocated before the timed runs
(the cases run in one process there; a case that fails prints its error and the others go on).

    python scripts/benchmark_gla.py                    # all cases on CPU (reference implementation)
    python scripts/benchmark_gla.py --device cuda      # on a GPU
    python scripts/benchmark_gla.py --baseline         # also the published algorithm, for comparison
    python scripts/benchmark_gla.py --impls reference fused --device cuda   # both attention implementations
    python scripts/benchmark_gla.py --train-batches 1 2   # training step at batch 1 (published figure) and 2
    python scripts/benchmark_gla.py --breakdown        # also seconds in convolutions and matrix products
    python scripts/benchmark_gla.py --device cuda --targets --json out.json --markdown
                                                       # issue 9's model-level targets, published/reference/fused
    python scripts/benchmark_gla.py --targets --smoke --repeats 2   # the same cases at toy sizes, on the CPU

Cases: GLA (C=256, k=128, 3 hashes) forward and forward+backward at LR sizes 48, 96, 192, and one
training step (forward, L1 loss, backward, Adam) of the paper-configuration DLSN on 2x3x48x48, and that
network's forward pass (no autograd) on 1x3x48x48.
``--targets`` runs instead the model-level rows of issue 9's target table: GLA forward+backward at
batch 1 48x48 and 96x96 and batch 16 96x96, and the paper DLSN (x2) forward of one whole LR image of
128x128 and 360x360 (no autograd), each for the published layout, the reference and the fused
implementation (``--impls`` to change).
Implementation ``compiled`` (training kinds only: evaluation runs eagerly) is ``fused`` under ``torch.compile``
with the options of train.py's compiled training steps (``COMPILE_OPTIONS``, configs/module/sr.yaml: CUDA graphs,
static shapes); on a GPU the GLA rows then show what the paper experiments' training steps get, where ``fused`` is
the eager layer the targets judge. ``--compile-backend eager`` (the CPU rehearsal) only traces.
``--baseline`` (implementation ``published``) runs the same computation the way the published code lays
it out (the MLP on every gathered key copy, adjacent chunks concatenated for every tensor).
``--published-src DIR`` (the ``src/`` folder of a laoyangui/DLSN checkout, as ``scripts/gpu_check.sh --fetch``
brings it) adds implementation ``authors``: the authors' own GLA layer and DLSN network, as published
(random rotations drawn on the CPU and copied to the GPU on every call, as their code does). It is what
issue 9's targets compare with; their code calls ``.cuda()``, so on the CPU (``--smoke`` rehearsals)
``.cuda()`` is made a no-op in that case's process. Their weights are their own random initialisation:
time and memory do not depend on the weights' values.
``--breakdown`` profiles the case once more and splits its time into convolutions, matrix products
(the arithmetic every implementation of the same math must do) and everything else. ``--kernel-table
ROWS`` profiles it once more (three runs) and lists its ROWS largest GPU kernels by device time, with
the total over all of them (on the CPU: ``aten`` operators by host time); both are in the JSON.
This project's forward+backward cases run as ``train.py``'s training steps do, with cuDNN's autotuner
and so the fused kernel's timed choices (printed under the case; ``--cudnn-autotune off``: cuDNN's
heuristics and the untimed defaults); the published code and the forward-only (evaluation) cases never.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from dlsn.models import DLSN, GLA, chunk_attention, kernel_failures, timed_choice
from dlsn.models.allocator import keep_freed_memory
from dlsn.models.gla import KEY_NORM_EPS, draw_rotations, gla_layers, number_of_buckets

IMPLS = ("published", "reference", "fused", "authors", "compiled")
TRAINING_KINDS = ("gla_forward_backward", "dlsn_train_step")
KINDS = ("gla_forward", *TRAINING_KINDS, "dlsn_forward")
# torch.compile's options in train.py's compiled training steps (configs/module/sr.yaml's ``compile`` less
# ``enabled``; tests/test_benchmark_gla.py keeps them equal)
COMPILE_OPTIONS = dict(mode="reduce-overhead", fullgraph=False, dynamic=False)
TARGET_CASES = [  # issue 9, model-level rows
    dict(kind="gla_forward_backward", size=48, batch=1),
    dict(kind="gla_forward_backward", size=96, batch=1),
    dict(kind="gla_forward_backward", size=96, batch=16),
    dict(kind="dlsn_forward", size=128, batch=1),
    dict(kind="dlsn_forward", size=360, batch=1),
]
PAPER_WIDTHS = {"gla": dict(channels=256, chunk_size=128, n_hashes=3), "dlsn": {}}  # DLSN's defaults are the paper's
SMOKE_WIDTHS = {"gla": dict(channels=16, chunk_size=8, n_hashes=2),
                "dlsn": dict(n_feats=16, n_resgroups=1, n_resblocks=1, chunk_size=8, n_hashes=2)}


def published_layout_forward(layer: GLA, x: torch.Tensor) -> torch.Tensor:
    """GLA computed with the published code's tensor layout (same math, for timing only)."""
    n, c, h, w = x.shape
    length, k, hashes = h * w, layer.chunk_size, layer.n_hashes
    match = F.relu(layer.match_embedding(x)).flatten(2).transpose(1, 2)
    value = F.relu(layer.value_embedding(x)).flatten(2).transpose(1, 2)
    score_input = F.relu(layer.score_embedding(x)).flatten(2).transpose(1, 2)
    buckets = number_of_buckets(length, k)
    rotations = draw_rotations(hashes, match.shape[-1], buckets).to(x.device)
    codes = torch.einsum("nld,tdb->ntlb", match, rotations).argmax(-1)
    codes = (codes + torch.arange(hashes, device=x.device).view(1, -1, 1) * buckets).reshape(n, -1)
    order = codes.sort(dim=-1, stable=True).indices
    undo = order.argsort(dim=-1)
    positions = order % length

    def gather(t):
        return t.gather(1, positions.unsqueeze(-1).expand(-1, -1, t.shape[-1])).reshape(n, hashes, length, -1)

    def chunked(t):
        pad = -length % k
        if pad:
            t = torch.cat([t, t[:, :, -pad:]], dim=2)
        return t.reshape(n, hashes, -1, k, t.shape[-1])

    def adjacent(t):
        return torch.cat([t, torch.roll(t, 1, dims=2), torch.roll(t, -1, dims=2)], dim=3)

    queries = chunked(gather(match))
    keys = adjacent(F.normalize(queries, dim=-1, eps=KEY_NORM_EPS))
    values = adjacent(chunked(gather(value)))
    learned = layer.score_mlp(adjacent(chunked(gather(score_input)))).transpose(-1, -2)
    scores = torch.einsum("nhcid,nhcjd->nhcij", queries, keys) + learned
    confidence = torch.logsumexp(scores, dim=-1, keepdim=True)
    attended = torch.einsum("nhcij,nhcjd->nhcid", torch.exp(scores - confidence), values)
    padded = attended.shape[2] * k
    attended = attended.reshape(n, hashes, padded, c)[:, :, :length].reshape(n, -1, c)
    confidence = confidence.reshape(n, hashes, padded)[:, :, :length].reshape(n, -1)
    attended = attended.gather(1, undo.unsqueeze(-1).expand(-1, -1, c)).reshape(n, hashes, length, c)
    weights = torch.softmax(confidence.gather(1, undo).reshape(n, hashes, length, 1), dim=1)
    out = (attended * weights).sum(1).transpose(1, 2).reshape(n, c, h, w)
    return x + layer.res_scale * out


def _attention_impl(case: dict) -> str:
    return {"published": "reference", "authors": "reference", "compiled": "fused"}.get(case["impl"], case["impl"])


def _compiled(case: dict, forward):
    """``forward`` as the ``compiled`` implementation runs it (train.py's compiled training steps' options)."""
    if case["impl"] != "compiled":
        return forward
    if case["kind"] not in TRAINING_KINDS:
        raise ValueError(f"implementation 'compiled' times training kinds only ({', '.join(TRAINING_KINDS)}): "
                         f"evaluation runs eagerly, got {case['kind']}")
    backend = case.get("compile_backend", "inductor")
    options = COMPILE_OPTIONS if backend == "inductor" else dict(COMPILE_OPTIONS, mode=None)
    return torch.compile(forward, backend=backend, **options)


def authors_model(case: dict, widths: dict, device: torch.device) -> torch.nn.Module:
    """The authors' GLA layer (gla_* kinds) or DLSN x2 (dlsn_* kinds) from ``case["published_src"]``."""
    from benchmark_train_step import import_published, published_network

    if device.type != "cuda":  # their code moves tensors with .cuda(): keep them where they are
        torch.Tensor.cuda = lambda tensor, *args, **kwargs: tensor
    torch.manual_seed(0)
    if case["kind"].startswith("dlsn_"):
        paper = dict(n_feats=256, n_resgroups=10, n_resblocks=4, chunk_size=128, n_hashes=3)
        config = dict(paper | widths["dlsn"], reduction=4, res_scale=0.1)
        return published_network(case["published_src"], config).to(device)
    model = import_published(case["published_src"])
    gla = widths["gla"]
    return model.attention.GLA(n_hashes=gla["n_hashes"], channels=gla["channels"], reduction=4,
                               chunk_size=gla["chunk_size"]).to(device)


def run_case(case: dict) -> dict:
    if case.get("keep_freed_memory"):
        keep_freed_memory()
    device = torch.device(case["device"])
    torch.set_float32_matmul_precision(case.get("matmul_precision", "highest"))
    # Training-kind cases of this project run as train.py's training steps do: cuDNN's autotuner on
    # (CudnnAutotune; fixed sizes), and with it the fused kernel's timed choices. The published code
    # keeps cuDNN's heuristics (its trainer never sets the flag); forward-only cases stand for evaluation.
    autotuned = (case.get("cudnn_autotune", False) and case["kind"] in TRAINING_KINDS
                 and case["impl"] in ("reference", "fused", "compiled"))
    torch.backends.cudnn.benchmark = autotuned
    chosen_before = set(timed_choice.choices())  # on CUDA the cases share one process
    torch.manual_seed(0)
    # --smoke: a toy network and toy inputs of the same kinds (checks the script, measures nothing).
    widths = SMOKE_WIDTHS if case.get("smoke") else PAPER_WIDTHS
    if case["kind"].startswith("dlsn_") and case["impl"] == "authors":
        model = authors_model(case, widths, device)
    elif case["kind"].startswith("dlsn_"):
        model = DLSN(scale=2, attention_impl=_attention_impl(case), **widths["dlsn"]).to(device)
        if case["impl"] == "published":  # every GLA computed in the published layout
            for layer in gla_layers(model):
                layer.forward = lambda x, rotations=None, layer=layer: published_layout_forward(layer, x)
    if case["kind"] == "dlsn_forward":
        lr = torch.rand(case["batch"], 3, case["size"], case["size"], device=device)

        def step():
            with torch.no_grad():
                model(lr)
    elif case["kind"] == "dlsn_train_step":
        # Fused Adam as configs/optim/adam.yaml trains; torch's default Adam (as published) for the baseline.
        published = case["impl"] in ("published", "authors")
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=None if published else True)
        lr = torch.rand(case["batch"], 3, case["size"], case["size"], device=device)
        hr = torch.rand(case["batch"], 3, 2 * case["size"], 2 * case["size"], device=device)
        network = _compiled(case, model.forward)

        def step():
            optimizer.zero_grad(set_to_none=True)
            F.l1_loss(network(lr), hr).backward()
            optimizer.step()
    else:
        if case["impl"] == "authors":
            forward = authors_model(case, widths, device)
        else:
            layer = GLA(**widths["gla"], attention_impl=_attention_impl(case)).to(device)
            forward = (lambda t: published_layout_forward(layer, t)) if case["impl"] == "published" else layer
            forward = _compiled(case, forward)
        x = torch.randn(case["batch"], widths["gla"]["channels"], case["size"], case["size"], device=device)
        if case["kind"] == "gla_forward":
            def step():
                with torch.no_grad():
                    forward(x)
        else:
            x.requires_grad_(True)

            def step():
                forward(x).square().mean().backward()

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=case["precision"] == "bf16")

    def timed_step():
        with autocast:
            step()

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(case["warmup"]):  # allocator, kernels (Triton compiles on the first call)
        timed_step()
    synchronize()
    if device.type == "cuda":
        allocated_before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(case["repeats"]):
        start = time.perf_counter()
        timed_step()
        synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - allocated_before) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    result = {"median_s": statistics.median(times), "peak_mb": peak_mb, "cudnn_autotune": autotuned}
    chosen = {what: entry for what, entry in timed_choice.choices().items() if what not in chosen_before}
    if chosen:
        result["timed_choices"] = chosen
    # On CUDA the cases share one process: after a kernel's failure this case and every later one time the
    # fallback, and the summary says so.
    if case["impl"] != "authors" and (failures := kernel_failures()):
        result["kernel_failures"] = failures
    if case["impl"] != "authors" and (left_out := chunk_attention.left_out_variants()):
        result["left_out_variants"] = left_out  # ways the timed choices no longer offer: failed the self-check
    if case.get("breakdown") or case.get("kernel_table"):
        # Profiled apart from the timed runs (the profiler slows the host); the breakdown averages as many
        # runs as were timed, the kernel table alone three at most.
        from profile_train_step import profiled

        steps = case["repeats"] if case.get("breakdown") else min(3, case["repeats"])
        profiler = profiled(timed_step, device, steps)
        if case.get("breakdown"):
            result.update(time_by_operator_kind(profiler, device, steps))
        if case.get("kernel_table"):
            result.update(top_kernels(profiler, device, steps, case["kernel_table"]))
    return result


CONVOLUTION_OPS = ("convolution",)  # mkldnn_/cudnn_convolution, convolution_backward, ...
MATMUL_OPS = ("aten::bmm", "aten::baddbmm", "aten::mm", "aten::addmm")


def time_by_operator_kind(profiler, device: torch.device, repeats: int) -> dict:
    """Seconds per step spent in convolutions and in matrix products, from a profile of ``repeats`` steps.

    Self times of ``aten::`` operators only, so nothing is counted twice (on CUDA an operator's
    device time is that of the kernels it launched; the kernels' own rows are skipped). On CUDA the
    device (kernel) time is used, on CPU the host time.
    """
    convolution_us = matmul_us = 0.0
    for event in profiler.key_averages():
        if not event.key.startswith("aten::"):
            continue
        self_us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if any(name in event.key for name in CONVOLUTION_OPS):
            convolution_us += self_us
        elif event.key in MATMUL_OPS:
            matmul_us += self_us
    return {"convolution_s": convolution_us / 1e6 / repeats, "matmul_s": matmul_us / 1e6 / repeats}


def top_kernels(profiler, device: torch.device, steps: int, rows: int) -> dict:
    """Where a case's time goes, from a profile of ``steps`` steps: on CUDA the ``rows`` kernels with the
    most device time, on the CPU the ``aten::`` operators with the most self host time (a kernel's or an
    operator's own time only, so no time is counted twice), per step, with the total over all of them."""
    if device.type == "cuda":
        events = [event for event in profiler.key_averages()
                  if event.device_type == torch.autograd.DeviceType.CUDA]
        self_us = [event.self_device_time_total for event in events]
    else:
        events = [event for event in profiler.key_averages() if event.key.startswith("aten::")]
        self_us = [event.self_cpu_time_total for event in events]
    ranked = sorted(zip(self_us, events, strict=True), key=lambda pair: -pair[0])
    return {"kernels_on": "device" if device.type == "cuda" else "host", "kernel_ms": sum(self_us) / 1e3 / steps,
            "kernels": [{"name": event.key[:160], "ms": us / 1e3 / steps, "calls": event.count / steps}
                        for us, event in ranked[:rows]]}


def kernel_table_lines(numbers: dict) -> list[str]:
    what = "GPU kernels" if numbers["kernels_on"] == "device" else "aten operators (host time)"
    lines = [f"    {numbers['kernel_ms']:.2f} ms per run in {what}; the largest:"]
    lines += [f"    {kernel['ms']:9.3f} ms {kernel['calls']:5.0f}x  {kernel['name'][:100]}" for kernel in numbers["kernels"]]
    return lines


def case_label(case: dict) -> str:
    if case["kind"] == "dlsn_forward":
        shape = f"{case['batch']}x3x{case['size']}x{case['size']}"
    elif case["kind"] == "dlsn_train_step":
        shape = f"{case['batch']}x3x{case['size']}x{case['size']}"
    else:
        shape = f"{case['size']}x{case['size']}" + (f" batch {case['batch']}" if case["batch"] != 1 else "")
    return f"{case['impl']} {case['kind']} {shape}"


def run_in_subprocess(case: dict) -> dict:
    result = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)],
                            capture_output=True, text=True)
    if result.returncode:
        return {"error": (result.stderr.strip().splitlines() or ["exit status %d" % result.returncode])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_in_process(case: dict) -> dict:
    try:
        return run_case(case)
    except Exception as error:  # noqa: BLE001 - report and go on with the other cases
        return {"error": f"{type(error).__name__}: {error}".splitlines()[0][:300]}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def markdown_table(results: list[dict], memory_label: str) -> str:
    """One row per case and implementation, with the ratios to the published code's time and memory: the
    authors' own code where it was measured, else the published layout."""
    def baseline_of(r):
        key = (r["kind"], r["size"], r["batch"], r["precision"])
        for impl in ("authors", "published"):
            base = next((b for b in results if b["impl"] == impl and (b["kind"], b["size"], b["batch"],
                                                                       b["precision"]) == key), None)
            if base and "error" not in base:
                return base
        return None

    lines = [f"| case | implementation | median ms | {memory_label} | speed vs published | memory vs published |",
             "|---|---|---|---|---|---|"]
    for r in results:
        shape = case_label(r).split(" ", 2)[2]
        name = f"{r['kind']} {shape} ({r['precision']}, matmul {r.get('matmul_precision', 'highest')})"
        if "error" in r:
            lines.append(f"| {name} | {r['impl']} | error: {r['error']} | | | |")
            continue
        base = baseline_of(r)
        speed = memory = ""
        if base and base is not r:
            speed = f"{base['median_s'] / r['median_s']:.2f}x vs {base['impl']}"
            memory = f"{r['peak_mb'] / base['peak_mb']:.2f}x" if base["peak_mb"] > 0 else ""
        lines.append(f"| {name} | {r['impl']} | {1000 * r['median_s']:.1f} | {r['peak_mb']:.0f} | {speed} | {memory} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    parser.add_argument("--sizes", type=int, nargs="+", default=[48, 96, 192])
    parser.add_argument("--impls", nargs="+", choices=IMPLS,
                        help="implementations to time (default: reference; with --targets published, reference and "
                             "fused, and authors with --published-src)")
    parser.add_argument("--baseline", action="store_true", help="also time the published layout")
    parser.add_argument("--targets", action="store_true", help="issue 9's model-level cases instead")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, help="only the cases of these kinds")
    parser.add_argument("--compile-backend", default="inductor", choices=["inductor", "eager"],
                        help="torch.compile backend of implementation 'compiled' (eager: traces only, for a "
                             "rehearsal on the CPU)")
    parser.add_argument("--published-src", default=None,
                        help="src/ of a laoyangui/DLSN checkout: adds implementation 'authors' (their own code)")
    parser.add_argument("--smoke", action="store_true",
                        help="toy widths and sizes (C=16, k=8, sides / 16, batch <= 2): checks the script on any "
                             "device in seconds, measures nothing")
    parser.add_argument("--precision", choices=["32", "bf16"], default="32", help="bf16: under autocast")
    parser.add_argument("--matmul-precision", choices=["highest", "high"], default="highest",
                        help="torch.set_float32_matmul_precision for every case (high: TF32 matrix products, "
                             "which GLA's auto implementation needs to use the fused kernel in float32)")
    parser.add_argument("--no-train-step", action="store_true")
    parser.add_argument("--train-batches", type=int, nargs="+", default=[2],
                        help="batch sizes of the DLSN training step (the published figure is batch 1)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc malloc: no mmap, no trimming (dlsn/models/allocator.py): fewer page "
                             "faults at large sizes, higher peak RSS")
    parser.add_argument("--breakdown", action="store_true",
                        help="also profile each case: seconds per step in convolutions and matrix products")
    parser.add_argument("--kernel-table", type=int, default=0, metavar="ROWS",
                        help="profile each case once more and print (and record) its ROWS largest GPU kernels by "
                             "device time (on the CPU: aten operators by host time)")
    parser.add_argument("--cudnn-autotune", default="on", choices=["on", "off"],
                        help="this project's forward+backward cases with cuDNN's autotuner and the fused kernel's "
                             "timed choices, as train.py's training steps (default); off: cuDNN's heuristics")
    parser.add_argument("--json", help="write every case and its numbers to this file")
    parser.add_argument("--markdown", action="store_true", help="finish with a markdown table (ratios)")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return

    impls = args.impls or (["published", "reference", "fused"] if args.targets else ["reference"])
    if args.baseline and "published" not in impls:
        impls = ["published", *impls]
    if args.published_src and "authors" not in impls:
        impls = ["authors", *impls]
    if "authors" in impls and not args.published_src:
        parser.error("implementation 'authors' needs --published-src (the src/ folder of laoyangui/DLSN)")
    cases = []
    for impl in impls:
        if args.targets:
            cases += [dict(case, impl=impl, repeats=args.repeats) for case in TARGET_CASES]
            continue
        for kind in ("gla_forward", "gla_forward_backward"):
            for size in args.sizes:
                repeats = args.repeats if size <= 96 or args.device != "cpu" else max(2, args.repeats // 2)
                cases.append(dict(kind=kind, size=size, batch=1, impl=impl, repeats=repeats))
        if not args.no_train_step:
            cases.append(dict(kind="dlsn_forward", size=48, batch=1, impl=impl, repeats=args.repeats))
            for batch in args.train_batches:
                cases.append(dict(kind="dlsn_train_step", size=48, batch=batch, impl=impl,
                                  repeats=max(2, args.repeats // 2)))
    # Implementation "compiled" stands for the compiled training steps: no evaluation (forward-only) cases.
    cases = [case for case in cases if (not args.kinds or case["kind"] in args.kinds)
             and (case["impl"] != "compiled" or case["kind"] in TRAINING_KINDS)]
    if args.smoke:
        for case in cases:
            case.update(smoke=True, paper_size=case["size"], paper_batch=case["batch"],
                        size=max(4, case["size"] // 16), batch=min(case["batch"], 2))
    for case in cases:
        case.update(device=args.device, warmup=args.warmup, precision=args.precision, published_src=args.published_src,
                    matmul_precision=args.matmul_precision, cudnn_autotune=args.cudnn_autotune == "on",
                    keep_freed_memory=args.keep_freed_memory, breakdown=args.breakdown,
                    kernel_table=args.kernel_table, compile_backend=args.compile_backend)
    if args.list:
        for case in cases:
            print(case_label(case))
        return

    cuda = args.device.startswith("cuda")
    memory_label = "step peak MB" if cuda else "peak RSS MB"
    allocator = "keep_freed_memory()" if args.keep_freed_memory else "default malloc settings"
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name(args.device)})" if cuda else "")
          + f", threads {torch.get_num_threads()}, {allocator}, precision {args.precision}, "
          f"float32 matmul precision {args.matmul_precision}", flush=True)
    breakdown_header = f"{'conv s':>10}{'matmul s':>10}{'other s':>10}" if args.breakdown else ""
    print(f"{'case':<58}{'median s':>10}{memory_label:>14}{breakdown_header}", flush=True)
    results = []

    def write_json() -> None:
        with open(args.json, "w") as file:
            json.dump({"torch": torch.__version__, "device": args.device,
                       "device_name": torch.cuda.get_device_name(args.device) if cuda else "cpu",
                       "cases": results}, file, indent=1)

    for case in cases:
        numbers = run_in_process(case) if cuda else run_in_subprocess(case)
        results.append(dict(case, **numbers))
        if args.json:  # after every case: a run cut short keeps what it measured
            write_json()
        if "error" in numbers:
            print(f"{case_label(case):<58} error: {numbers['error']}", flush=True)
            continue
        row = f"{case_label(case):<58}{numbers['median_s']:>10.4f}{numbers['peak_mb']:>14.0f}"
        if args.breakdown:
            other = numbers["median_s"] - numbers["convolution_s"] - numbers["matmul_s"]
            row += f"{numbers['convolution_s']:>10.4f}{numbers['matmul_s']:>10.4f}{other:>10.4f}"
        print(row, flush=True)
        for what, entry in numbers.get("timed_choices", {}).items():
            print(f"    timed choice: {timed_choice.report(what, entry)}", flush=True)
        if "kernels" in numbers:
            print("\n".join(kernel_table_lines(numbers)), flush=True)
    if args.markdown:
        print()
        print(markdown_table(results, memory_label))
    if any("error" in r for r in results) or any(not math.isfinite(r.get("median_s", 0)) for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
