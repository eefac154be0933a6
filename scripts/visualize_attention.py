"""Where one query pixel looks: a heatmap of an attention layer's weights over the image.

    python scripts/visualize_attention.py WEIGHTS --image LR.png --query ROW COL [--layer I] [--output map.png]

``WEIGHTS`` is this project's checkpoint (``best.ckpt``), a ``.safetensors`` export or the authors'
DLSN ``.pt``; it is read with :func:`dlsn.checkpoint.read_weights` (tensors only, no code from the
file) and the network rebuilt from the config it records. ``--image`` is the network's (LR) input
(``--hr``: an HR image, bicubic-downscaled by the network's scale first); ``--query ROW COL`` is the
query pixel in LR coordinates (the feature maps of DLSN and EDSR have the LR size); ``--layer`` picks
the attention layer (0 = the first in forward order, -1 the last). The network runs once on the
image (hash rotations from ``--seed``, as in validation), the chosen layer's input is kept, and
:meth:`dlsn.models.GLA.query_attention` recomputes that layer's scores for the one query.

What the PNG shows, left to right (each map sums to 1 over the image; a position that is a key in
several rounds, or twice in one round, gets the sum of its weights):

1. the LR image with the query marked;
2. **attention**: the weight each position receives from the query, ``sum_t w_t softmax_j(s_t(i, j))``
   over the hash rounds ``t``, each round weighted by ``w_t``, the layer's own mixing weight for this
   query (``softmax_t`` of the rounds' log-sum-exp confidences);
3. **dot-product part**: the softmax of the dot-product term ``m_i . m_j / |m_j|`` alone over the
   same keys, rounds weighted by the same ``w_t``: where plain similarity would look (NLSN's LSH
   attention on these buckets);
4. **learned part** (GLA only): the softmax of the learned term ``fc(u_j)[slot(i)]`` alone over the
   same keys, rounds weighted by the same ``w_t``: where the learned score alone would look.

Positions outside every round's chunk neighbourhood get no weight (blank). Colours use a square-root
scale, so that small weights remain visible. The paper's claim is that GLA also draws on textures of
low dot-product similarity: compare panels 2 and 3 (and 4). ``--save-maps`` also writes the maps as
``.npz``; the round weights and the top positions of each map are printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from dlsn.checkpoint import CheckpointError, build_network, load_into, read_weights
from dlsn.data.io import read_image
from dlsn.imresize import imresize
from dlsn.models.attention import attention_layers
from dlsn.utils.files import atomic_write

PANELS = {
    "attention": "attention (layer's weights)",
    "dot_product": "dot-product part: softmax(m_i . m_j/|m_j|)",
    "learned": "learned part: softmax(fc(u_j)[slot(i)])",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", type=Path, help="checkpoint (.ckpt), .safetensors export or the authors' .pt")
    parser.add_argument("--image", type=Path, required=True, help="the network's LR input image (--hr: an HR image)")
    parser.add_argument("--query", type=int, nargs=2, metavar=("ROW", "COL"), required=True,
                        help="query pixel, LR coordinates (row, column from the top left)")
    parser.add_argument("--layer", type=int, default=0, help="attention layer in forward order (0 first, -1 last)")
    parser.add_argument("--output", type=Path, default=Path("attention.png"), help="PNG to write")
    parser.add_argument("--hr", action="store_true", help="the image is HR: bicubic-downscale it by the scale first")
    parser.add_argument("--seed", type=int, default=0, help="hash rotation seed (validation uses module.rotation_seed=0)")
    parser.add_argument("--save-maps", action="store_true", help="also write the maps as <output>.npz")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow a full unpickler for files that need one (runs code from the file)")
    return parser.parse_args(argv)


def load_network(path: Path, trust: bool) -> torch.nn.Module:
    weights = read_weights(path, trust=trust)
    if weights.config is None:
        raise CheckpointError(f"{path}: the file records no network config (a bare state_dict); "
                              "use a checkpoint, a .safetensors export or the authors' .pt")
    net = build_network(weights.config, source=str(path), trust=trust)
    load_into(net, weights.state_dict, source=str(path))
    return net.eval()


def read_input(path: Path, scale: int, rgb_range: float, downscale: bool) -> torch.Tensor:
    image = read_image(path)
    if downscale:
        image = imresize(image, 1 / scale)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0).float() * (rgb_range / 255)


def layer_input(net: torch.nn.Module, layer: torch.nn.Module, lr: torch.Tensor):
    """Run ``net`` on ``lr`` and return the arguments the layer was called with (features, rotations)."""
    captured = {}

    def keep(module, args):
        captured["args"] = args

    handle = layer.register_forward_pre_hook(keep)
    try:
        with torch.no_grad():
            net(lr)
    finally:
        handle.remove()
    features, *rest = captured["args"]
    return features, (rest[0] if rest else None)


def draw(path: Path, image: np.ndarray, maps: dict[str, np.ndarray], query: tuple[int, int], title: str) -> None:
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * (len(maps) + 1), 4.6), layout="constrained")
    axes = figure.subplots(1, len(maps) + 1)
    gray = image.mean(axis=2)
    axes[0].imshow(image)
    axes[0].set_title("input (LR), query marked")
    for axis, (name, heat) in zip(axes[1:], maps.items()):
        axis.imshow(gray, cmap="gray", vmin=0, vmax=255)
        shown = np.ma.masked_where(heat <= 0, heat)
        mappable = axis.imshow(shown, cmap="inferno", alpha=0.85, norm=PowerNorm(0.5, vmin=0, vmax=heat.max()))
        figure.colorbar(mappable, ax=axis, shrink=0.8)
        axis.set_title(PANELS[name], fontsize=9)
    for axis in axes:
        axis.plot(query[1], query[0], marker="+", color="cyan", markersize=14, markeredgewidth=2)
        axis.set_axis_off()
    figure.suptitle(title, fontsize=10)
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=100), mode="wb")


def top_positions(heat: np.ndarray, count: int = 5) -> list[tuple[int, int, float]]:
    flat = np.argsort(heat, axis=None)[::-1][:count]
    return [(int(i // heat.shape[1]), int(i % heat.shape[1]), float(heat.flat[i])) for i in flat]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        net = load_network(args.weights, args.trust_checkpoint).to(args.device)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    layers = attention_layers(net)
    if not layers:
        print(f"error: {args.weights}: the network has no attention layer (attention=none?)", file=sys.stderr)
        return 2
    if not -len(layers) <= args.layer < len(layers):
        print(f"error: --layer {args.layer}: the network has {len(layers)} attention layers "
              f"(0..{len(layers) - 1}, or negative from the end)", file=sys.stderr)
        return 2
    layer = layers[args.layer]
    if hasattr(net, "set_rotation_seed"):
        net.set_rotation_seed(args.seed)
    lr = read_input(args.image, net.scale, getattr(net, "rgb_range", 1.0), args.hr).to(args.device)
    features, rotations = layer_input(net, layer, lr)
    height, width = features.shape[-2:]
    row, col = args.query
    if not (0 <= row < height and 0 <= col < width):
        print(f"error: --query {row} {col} is outside the {height}x{width} LR image", file=sys.stderr)
        return 2
    query = layer.query_attention(features, row * width + col, rotations)
    names = ["attention", "dot_product"] + (["learned"] if query.learned_scores is not None else [])
    maps = {name: query.heatmap(name).cpu().numpy() for name in names}

    kind = type(layer).__name__
    round_weights = ", ".join(f"{w:.3f}" for w in query.round_weights.tolist())
    title = (f"{args.weights.name}: {kind} layer {args.layer % len(layers)} of {len(layers)}, query (row {row}, "
             f"col {col}) of {height}x{width}; rounds weighted {round_weights}")
    image = (lr[0].permute(1, 2, 0).cpu().numpy() * (255 / getattr(net, "rgb_range", 1.0))).clip(0, 255).astype(np.uint8)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    draw(args.output, image, maps, (row, col), title)
    print(f"{kind} layer {args.layer % len(layers)}: query ({row}, {col}), {query.key_positions.shape[0]} round(s) "
          f"of {query.key_positions.shape[1]} keys, round weights {round_weights}")
    for name, heat in maps.items():
        tops = ", ".join(f"({r}, {c}) {w:.3g}" for r, c, w in top_positions(heat))
        print(f"  {name:12s} top positions: {tops}")
    if args.save_maps:
        npz = args.output.with_suffix(".npz")
        atomic_write(npz, lambda handle: np.savez(handle, **maps, round_weights=query.round_weights.cpu().numpy()),
                     mode="wb")
        print(f"maps: {npz}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
