"""Evaluate synthetic SR pairs on every rank of a torchrun job and write what rank 0 computed.

Run by tests/test_distributed.py as
``python -m torch.distributed.run --nproc_per_node 2 eval_worker.py OUT.json N_IMAGES``.
Rank 0 writes the synced metrics of two splits: the unpadded eval sampler and, as a control
showing what the sampler prevents, torch's padded DistributedSampler.
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dlsn.data.samplers import UnpaddedEvalSampler, eval_sampler
from dlsn.metrics import PSNR_Y, SSIM_Y


class SyntheticPairs(Dataset):
    """Deterministic (sr, hr, index) triples; sizes vary so images cannot share batches."""

    def __init__(self, count: int, seed: int = 1234):
        generator = torch.Generator().manual_seed(seed)
        self.pairs = []
        for index in range(count):
            height, width = 24 + 2 * index, 20 + index
            hr = torch.rand(3, height, width, generator=generator)
            # A different noise level per image so every image has a clearly different PSNR.
            noise = (0.01 + 0.02 * index) * torch.randn(3, height, width, generator=generator)
            self.pairs.append(((hr + noise).clamp(0, 1), hr))

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        sr, hr = self.pairs[index]
        return sr, hr, index


def evaluate(loader, crop_border=2):
    psnr, ssim = PSNR_Y(crop_border=crop_border, rgb_range=1.0), SSIM_Y(crop_border=crop_border, rgb_range=1.0)
    seen = []
    for sr, hr, index in loader:
        psnr.update(sr, hr)
        ssim.update(sr, hr)
        seen += index.tolist()
    # compute() all-gathers the sum/count states of every rank (the same call on each rank).
    result = {"psnr": psnr.compute().item(), "ssim": ssim.compute().item(),
              # compute() syncs inside a context and then restores this rank's own states, so the
              # count read afterwards is local: totals must come from a reduction, not from .count.
              "count_after_compute": int(psnr.count.item())}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, seen)
    result["indices_per_rank"] = gathered
    return result


def main():
    out_path, image_count = sys.argv[1], int(sys.argv[2])
    dist.init_process_group("gloo")
    dataset = SyntheticPairs(image_count)
    sampler = eval_sampler(dataset)
    assert isinstance(sampler, UnpaddedEvalSampler), type(sampler)
    unpadded = evaluate(DataLoader(dataset, batch_size=1, sampler=sampler))
    padded_sampler = DistributedSampler(dataset, shuffle=False)
    padded = evaluate(DataLoader(dataset, batch_size=1, sampler=padded_sampler))
    if dist.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump({"world_size": dist.get_world_size(), "unpadded": unpadded, "padded": padded}, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
