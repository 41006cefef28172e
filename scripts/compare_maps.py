"""Slice by slice: do the seed methods' maps localize the nodule better than the baselines'?

    .venv/bin/python scripts/compare_maps.py [--data runs/v2/test] [--model sample-slice] [--protocol default]

On the held-out slices through a malignant nodule, with the maps ``evaluate`` scores (the predicted class's
map of malignancy, :func:`medvit_explain.workflows.evaluate.localization_maps`), prints for each method:

* its Dice (threshold 0.5 of min-max, as ``evaluate``), also on the slices the model calls malignant and
  on those it calls benign, and the token-grid ceiling beside them;
* where its peak token lies: on a token that holds part of the nodule, next to one, elsewhere; and how often
  it is the token holding the most of the nodule;
* the area its binarised map covers, in nodule areas, on the slices the model calls malignant and on those
  it calls benign (there a class-sensitive map shows the evidence for *benign*);
* its mean Dice at each threshold of the sweep (0.1 … 0.9 of min-max), so a loss at 0.5 can be told from a
  loss at every threshold;

then, for each seed method against each baseline, the paired difference in Dice with a 95 % bootstrap
interval over slices, and on how many slices each is ahead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from medvit_explain.explainers import upsample
from medvit_explain.metrics.localization import localization_scores, minmax
from medvit_explain.model import load_model
from medvit_explain.workflows.evaluate import (
    correctly_classified,
    load_eval_slices,
    localization_maps,
    token_grid_mask,
)
from medvit_explain.workflows.scores import model_outputs
from medvit_explain.workflows.studies import find_studies

ROOT = Path(__file__).resolve().parents[1]


def peak_places(maps: np.ndarray, share: np.ndarray) -> dict[str, float]:
    """Share of maps [M, gh, gw] whose largest token is on a token holding nodule (``share`` > 0), next to
    one (8-neighbourhood), elsewhere; and on the token with the largest ``share``."""
    on = near = top = 0
    for m, s in zip(maps, share, strict=True):
        r, c = np.unravel_index(np.argmax(m), m.shape)
        holds = s > 0
        on += bool(holds[r, c])
        near += bool(not holds[r, c] and holds[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2].any())
        top += (r, c) == np.unravel_index(np.argmax(s), s.shape)
    n = max(len(maps), 1)
    return {"on": on / n, "next_to": near / n, "elsewhere": 1 - (on + near) / n, "most_nodule": top / n}


def paired(a: np.ndarray, b: np.ndarray, seed: int = 0, n_boot: int = 4000) -> tuple[float, float, float]:
    """Mean of ``a - b`` and its 95 % percentile-bootstrap interval (slices resampled with replacement)."""
    d = a - b
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def split(values: np.ndarray, called: np.ndarray, stat) -> str:
    """``stat`` of ``values`` on the slices called malignant / on those called benign (nan when none)."""
    benign = ~called
    return f"{stat(values[called]):.3f} / {stat(values[benign]) if benign.any() else float('nan'):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "runs" / "v2" / "test"))
    parser.add_argument("--model", default="sample-slice")
    parser.add_argument("--method", action="append", default=None, help="[cdam agcam attention rollout]")
    parser.add_argument("--seed-method", action="append", default=None, help="[cdam agcam]")
    parser.add_argument("--protocol", choices=["default", "agcam"], default="default")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.method or ["cdam", "agcam", "attention", "rollout"]
    seeds = [m for m in (args.seed_method or ["cdam", "agcam"]) if m in methods]

    model = load_model(args.model, device="cpu")
    sl = load_eval_slices(find_studies(args.data), model, progress=False)
    if args.protocol == "agcam":
        sl = correctly_classified(model, sl)
    images = sl.images[sl.explained]
    malignant = sl.targets[sl.explained, 0].numpy() > 0.5
    called = (model_outputs(model, images)[:, 0] > 0).numpy()[malignant]
    nodule = torch.from_numpy(sl.nodule)
    grid = tuple(int(g) for g in model.backbone.patch_embed.grid_size)
    share = token_grid_mask(nodule, grid).numpy()[malignant]
    size = images.shape[-2:]
    ceiling = localization_scores(upsample(torch.from_numpy(share)[:, None], size)[:, 0], nodule[malignant])
    print(
        f"{int(malignant.sum())} malignant nodule slices ({args.protocol} protocol), {int(called.sum())} called "
        f"malignant; token-grid ceiling: Dice {float(ceiling['dice'].double().mean()):.3f}"
    )
    nodule_area = np.maximum(sl.nodule[malignant].mean((1, 2)), 1.0 / np.prod(size))  # at least one pixel
    dice, sweeps = {}, {}
    for method in methods:
        maps = localization_maps(model, sl, method)[torch.from_numpy(malignant)]
        up = upsample(maps[:, None], size)[:, 0]
        scores = localization_scores(up, nodule[malignant])
        dice[method] = scores["dice"].double().numpy()
        sweeps[method] = {
            k.removeprefix("dice@"): float(v.double().mean()) for k, v in scores.items() if k.startswith("dice@")
        }
        area = (minmax(up) >= 0.5).double().mean((1, 2)).numpy() / nodule_area
        where = peak_places(maps.numpy(), share)
        print(
            f"{method:10s} Dice {dice[method].mean():.3f} "
            f"(called malignant / benign {split(dice[method], called, np.mean)})"
            f" | peak token on the nodule {where['on']:.2f}, next to it {where['next_to']:.2f}, elsewhere "
            f"{where['elsewhere']:.2f}, on its largest token {where['most_nodule']:.2f} | binarised area in "
            f"nodule areas, median, called malignant / benign {split(area, called, np.median)}"
        )
    print("Dice by threshold: " + " ".join(f"{t:>6s}" for t in next(iter(sweeps.values()))))
    for method, sweep in sweeps.items():
        print(f"  {method:16s}" + " ".join(f"{v:6.3f}" for v in sweep.values()))
    for s in seeds:
        for b in methods:
            if b in seeds:
                continue
            mean, lo, hi = paired(dice[s], dice[b])
            ahead, behind = int((dice[s] > dice[b]).sum()), int((dice[s] < dice[b]).sum())
            print(f"{s} - {b}: Dice {mean:+.3f} (95 % CI {lo:+.3f} .. {hi:+.3f}); ahead on {ahead}, behind on {behind}")


if __name__ == "__main__":
    main()
