"""Where a CDAM map's sign comes from: its value at each patch token split by the path through the last
attention block, on the nodule parts of held-out ROI views.

    .venv/bin/python scripts/cdam_paths.py --model sample-roi --data runs/roi_v21/test [--target spiculation]

CDAM's score of patch token i is S_i = Σ_j T_ij ∂f/∂T_ij with T the output of the last block's first LayerNorm.
In the last block only the class token's output reaches the head, so T_i reaches f through the class token's
attention alone: as a key (where the class token looks), as a value (what it reads there), and as a query
(its own row, which does not reach the head). With T copied once per role, S_i = S_i(keys) + S_i(values) +
S_i(query) exactly (:func:`cdam_by_path`; S_i(query) is zero for every patch token). Also split off: the
LayerNorm's bias (β · ∂f/∂T_i, the part of S_i every token shares) and the tokens less their mean.

For each of those maps the script prints, over the views that show the part (``--part``, a label of the
phantoms' ``<name>_features.nii.gz``; default 2, spicules), its mean on the part's pixels, on the rest of the
nodule and outside it (bilinear to the view, in units of the view's max |CDAM|), how many views have a
negative mean on the part, and the share of the positive evidence on the part. Then AG-CAM's term of each
block for the same target (where the class token looked, block by block): its share of the map's mass and the
share of that term on the part.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medvit_explain.explainers.agcam import agcam_layers
from medvit_explain.explainers.base import attention_gate, attention_output, split_qkv
from medvit_explain.model import load_model
from medvit_explain.phantom import FEATURE_LABELS
from medvit_explain.workflows.roi_evaluation import load_roi_views
from medvit_explain.workflows.studies import find_studies

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("keys", "values", "query")


def _last_block_by_role(blk, x_in: torch.Tensor, leaves: dict[str, torch.Tensor]) -> torch.Tensor:
    """timm's ``Block.forward`` (eval mode) on ``x_in``, with the first LayerNorm's output T entering the
    attention as three separate leaf copies (``leaves``: T and one copy per role). An output gate (newer
    timm) is computed from each row's own token, so it goes with the query: neither reaches the head from a
    patch token."""
    attn = blk.attn
    t = blk.norm1(x_in)
    copies = {role: t.detach().clone().requires_grad_(True) for role in ROLES}
    leaves.update(T=t.detach(), **copies)
    q = split_qkv(attn, attn.qkv(copies["query"]))[0]
    k = split_qkv(attn, attn.qkv(copies["keys"]))[1]
    v = split_qkv(attn, attn.qkv(copies["values"]))[2]
    a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
    x = x_in + blk.ls1(attention_output(attn, a @ v, attention_gate(attn, copies["query"])))
    return x + blk.ls2(blk.mlp(blk.norm2(x)))


def cdam_by_path(model, images: torch.Tensor, target: int) -> dict[str, torch.Tensor]:
    """CDAM of ``target`` at every patch token ([B, *grid] each) split by role in the last attention
    (``keys``, ``values``, ``query``; they sum to CDAM), with the sum (``cdam``), the LayerNorm bias's part
    (``bias``) and the part of the tokens less their mean over the patch tokens (``centred``)."""
    bb = model.backbone
    if bb.global_pool != "token" or getattr(bb, "dist_token", None) is not None:
        raise ValueError("cdam_by_path needs a ViT whose head reads the class token alone (global_pool 'token')")
    blk = bb.blocks[-1]
    leaves: dict[str, torch.Tensor] = {}
    handle = blk.register_forward_hook(lambda m, args, out: _last_block_by_role(m, args[0], leaves))
    try:
        outputs = model(images)
    finally:
        handle.remove()
    grads = torch.autograd.grad(outputs[:, target].sum(), [leaves[r] for r in ROLES])
    t = leaves["T"]
    grid = tuple(int(g) for g in bb.patch_embed.grid_size)
    n = math.prod(grid)
    parts = {role: (t * g).sum(-1) for role, g in zip(ROLES, grads, strict=True)}
    g_all = sum(grads)
    parts["cdam"] = sum(parts[r] for r in ROLES)
    beta = blk.norm1.bias
    parts["bias"] = (beta.detach() * g_all).sum(-1) if beta is not None else torch.zeros_like(parts["cdam"])
    patch = t[:, -n:]
    parts["centred"] = ((t - patch.mean(1, keepdim=True)) * g_all).sum(-1)
    return {k: v[:, -n:].reshape(len(images), *grid).detach() for k, v in parts.items()}


def part_statistics(maps: torch.Tensor, features: np.ndarray, part: int, scale: np.ndarray) -> dict[str, float]:
    """A token map [V, gh, gw] bilinear to the views' pixels ([V, H, W] feature labels): its mean on the part,
    on the rest of the nodule and outside (in units of ``scale`` per view), the share of views whose mean on
    the part is negative, and the share of the positive evidence on the part (mean over views)."""
    up = F.interpolate(maps[:, None].float(), size=features.shape[-2:], mode="bilinear", align_corners=False)
    m = up[:, 0].numpy() / scale[:, None, None]
    on, rest, outside = features == part, (features > 0) & (features != part), features == 0

    def mean_on(mask):
        return np.array([m[i][mask[i]].mean() if mask[i].any() else np.nan for i in range(len(m))])

    positive = np.clip(m, 0, None)
    share = (positive * on).sum((1, 2)) / np.maximum(positive.sum((1, 2)), 1e-12)
    part_mean = mean_on(on)
    return {
        "part": float(np.nanmean(part_mean)),
        "rest": float(np.nanmean(mean_on(rest))),
        "outside": float(np.nanmean(mean_on(outside))),
        "negative_views": float(np.mean(part_mean < 0)),
        "positive_share": float(share.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sample-roi")
    parser.add_argument("--data", default=str(ROOT / "runs" / "sample_roi_model" / "test"))
    parser.add_argument("--target", default="spiculation")
    parser.add_argument("--part", type=int, default=2, help=f"feature label {FEATURE_LABELS}")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    views = load_roi_views(find_studies(args.data), model, progress=False)
    names = [t.name for t in model.task_spec]
    chosen = np.where((views.features == args.part).reshape(len(views.features), -1).any(1))[0]
    images, features = views.images[chosen], views.features[chosen]
    batches = [
        cdam_by_path(model, images[i : i + args.batch_size], names.index(args.target))
        for i in range(0, len(images), args.batch_size)
    ]
    maps = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    scale = maps["cdam"].abs().flatten(1).amax(1).numpy() + 1e-12
    part = FEATURE_LABELS[args.part]
    print(
        f"{args.target} CDAM on {len(images)} views with {part} (model {args.model}); values in units of each "
        f"view's max |CDAM|"
    )
    for name in ("cdam", "keys", "values", "query", "bias", "centred"):
        s = part_statistics(maps[name], features, args.part, scale)
        print(
            f"{name:8s} mean on {part} {s['part']:+.3f}, rest of nodule {s['rest']:+.3f}, outside "
            f"{s['outside']:+.3f} | views with a negative mean on {part} {s['negative_views']:.2f} | positive "
            f"evidence on {part} {s['positive_share']:.3f}"
        )
    target = names.index(args.target)
    layers = torch.cat(  # [V, blocks, gh, gw], each block's AG-CAM term (non-negative)
        [
            agcam_layers(model, images[i : i + args.batch_size], [target])[:, 0]
            for i in range(0, len(images), args.batch_size)
        ]
    )
    total = layers.flatten(1).sum(1).clamp_min(1e-12)
    for k in range(layers.shape[1]):
        s = part_statistics(layers[:, k], features, args.part, np.ones(len(images)))
        mass = float((layers[:, k].flatten(1).sum(1) / total).mean())
        print(f"AG-CAM block {k}: {mass:.2f} of the map's mass, {s['positive_share']:.3f} of it on {part}")


if __name__ == "__main__":
    main()
