"""Speed and memory of GLA and of a DLSN training step.

Prints, per case, the median wall time over ``--repeats`` runs and the peak memory (peak RSS of a
fresh process on CPU, peak allocated GPU memory on CUDA). Each case runs in its own subprocess so
that peaks do not mix.

    python scripts/benchmark_gla.py                    # all cases on CPU
    python scripts/benchmark_gla.py --device cuda      # on a GPU
    python scripts/benchmark_gla.py --baseline         # also the published algorithm, for comparison
    python scripts/benchmark_gla.py --train-batches 1 2   # training step at batch 1 (published figure) and 2
    python scripts/benchmark_gla.py --breakdown        # also seconds in convolutions and matrix products

Cases: GLA (C=256, k=128, 3 hashes) forward and forward+backward at LR sizes 48, 96, 192, and one
training step (forward, L1 loss, backward, Adam) of the paper-configuration DLSN on 2x3x48x48, and that
network's forward pass (no autograd) on 1x3x48x48.
``--baseline`` runs the same computation the way the published code lays it out (the MLP on every
gathered key copy, adjacent chunks concatenated for every tensor), for a same-machine comparison.
``--breakdown`` profiles the case once more and splits its time into convolutions, matrix products
(the arithmetic every implementation of the same math must do) and everything else.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from dlsn.models import DLSN, GLA  # noqa: E402
from dlsn.models.gla import KEY_NORM_EPS, draw_rotations, gla_layers, number_of_buckets  # noqa: E402


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


def run_case(case: dict) -> dict:
    if case["keep_freed_memory"]:
        from dlsn.utils.allocator import keep_freed_memory  # imported only here: dlsn.utils pulls in Hydra

        keep_freed_memory()
    device = torch.device(case["device"])
    torch.manual_seed(0)
    if case["kind"].startswith("dlsn_"):
        model = DLSN(scale=2).to(device)
        if case["baseline"]:  # every GLA computed in the published layout
            for layer in gla_layers(model):
                layer.forward = lambda x, rotations=None, layer=layer: published_layout_forward(layer, x)
    if case["kind"] == "dlsn_forward":
        lr = torch.rand(case["batch"], 3, 48, 48, device=device)

        def step():
            with torch.no_grad():
                model(lr)
    elif case["kind"] == "dlsn_train_step":
        # Fused Adam as configs/optim/adam.yaml trains; torch's default Adam (as published) for the baseline.
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=None if case["baseline"] else True)
        lr = torch.rand(case["batch"], 3, 48, 48, device=device)
        hr = torch.rand(case["batch"], 3, 96, 96, device=device)

        def step():
            optimizer.zero_grad(set_to_none=True)
            F.l1_loss(model(lr), hr).backward()
            optimizer.step()
    else:
        layer = GLA(256, chunk_size=128, n_hashes=3).to(device)
        forward = (lambda t: published_layout_forward(layer, t)) if case["baseline"] else layer
        size = case["size"]
        x = torch.randn(1, 256, size, size, device=device)
        if case["kind"] == "gla_forward":
            def step():
                with torch.no_grad():
                    forward(x)
        else:
            x.requires_grad_(True)

            def step():
                forward(x).square().mean().backward()

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (allocator, kernels)
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(case["repeats"]):
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    result = {"median_s": statistics.median(times), "peak_mb": peak_mb}
    if case.get("breakdown"):
        result.update(time_by_operator_kind(step, synchronize, device, case["repeats"]))
    return result


CONVOLUTION_OPS = ("convolution",)  # mkldnn_/cudnn_convolution, convolution_backward, ...
MATMUL_OPS = ("aten::bmm", "aten::baddbmm", "aten::mm", "aten::addmm")


def time_by_operator_kind(step, synchronize, device: torch.device, repeats: int) -> dict:
    """Seconds per step spent in convolutions and in matrix products, from ``torch.profiler``.

    Self times of ``aten::`` operators only, so nothing is counted twice (on CUDA an operator's
    device time is that of the kernels it launched; the kernels' own rows are skipped). On CUDA the
    device (kernel) time is used, on CPU the host time.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(repeats):
            step()
        synchronize()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[48, 96, 192])
    parser.add_argument("--baseline", action="store_true", help="also time the published layout")
    parser.add_argument("--no-train-step", action="store_true")
    parser.add_argument("--train-batches", type=int, nargs="+", default=[2],
                        help="batch sizes of the DLSN training step (the published figure is batch 1)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc malloc: no mmap, no trimming (dlsn/utils/allocator.py): fewer page "
                             "faults at large sizes, higher peak RSS")
    parser.add_argument("--breakdown", action="store_true",
                        help="also profile each case: seconds per step in convolutions and matrix products")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return

    cases = []
    for baseline in ([False, True] if args.baseline else [False]):
        for kind in ("gla_forward", "gla_forward_backward"):
            for size in args.sizes:
                repeats = args.repeats if size <= 96 or args.device != "cpu" else max(2, args.repeats // 2)
                cases.append(dict(kind=kind, size=size, baseline=baseline, repeats=repeats))
    if not args.no_train_step:
        for baseline in ([False, True] if args.baseline else [False]):
            cases.append(dict(kind="dlsn_forward", size=48, baseline=baseline, batch=1, repeats=args.repeats))
            for batch in args.train_batches:
                cases.append(dict(kind="dlsn_train_step", size=48, baseline=baseline, batch=batch,
                                  repeats=max(2, args.repeats // 2)))

    memory_label = "peak GPU MB" if args.device.startswith("cuda") else "peak RSS MB"
    allocator = "keep_freed_memory()" if args.keep_freed_memory else "default malloc settings"
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, {allocator}")
    breakdown_header = f"{'conv s':>10}{'matmul s':>10}{'other s':>10}" if args.breakdown else ""
    print(f"{'case':<46}{'median s':>10}{memory_label:>14}{breakdown_header}")
    for case in cases:
        case["device"] = args.device
        case["keep_freed_memory"] = args.keep_freed_memory
        case["breakdown"] = args.breakdown
        result = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)],
                                capture_output=True, text=True, check=True)
        numbers = json.loads(result.stdout.strip().splitlines()[-1])
        label = ("published layout " if case["baseline"] else "") + case["kind"]
        if not case["kind"].startswith("dlsn_"):
            label += f" {case['size']}x{case['size']}"
        else:
            label += f" {case['batch']}x3x48x48"
        row = f"{label:<46}{numbers['median_s']:>10.3f}{numbers['peak_mb']:>14.0f}"
        if args.breakdown:
            other = numbers["median_s"] - numbers["convolution_s"] - numbers["matmul_s"]
            row += f"{numbers['convolution_s']:>10.3f}{numbers['matmul_s']:>10.3f}{other:>10.3f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
