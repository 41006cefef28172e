"""Where AG-CAM's malignancy map comes from: each block's term on a few malignant nodule slices.

    .venv/bin/python scripts/agcam_layers.py [--data runs/v2/test] [--model sample-slice] [--n 4]

For the first ``--n`` held-out slices through a malignant nodule (largest cross-section first): the CT
with the nodule outlined, CDAM and AG-CAM for malignancy, then AG-CAM's term of each block
(:func:`medvit_explain.explainers.agcam.agcam_layers`, whose sum over the blocks is the AG-CAM map) with
its share of the map's mass and of that block's mass inside the nodule. Writes ``docs/agcam_layers.png``
and prints the shares per block averaged over every malignant nodule slice of ``--data``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from medvit_explain.explainers import explain, upsample  # noqa: E402
from medvit_explain.explainers.agcam import agcam_layers  # noqa: E402
from medvit_explain.model import load_model  # noqa: E402
from medvit_explain.transforms import Preprocessing  # noqa: E402
from medvit_explain.workflows.evaluate import load_eval_slices  # noqa: E402
from medvit_explain.workflows.studies import find_studies  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "runs" / "v2" / "test"))
    parser.add_argument("--model", default="sample-slice")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "docs" / "agcam_layers.png"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_model(args.model, device="cpu")
    sl = load_eval_slices(find_studies(args.data), model, progress=False)
    primary = model.task_spec.names.index("malignancy")
    malignant = sl.targets[sl.explained, primary].numpy() > 0.5
    idx = sl.explained[malignant]
    nodule = sl.nodule[malignant]
    x = sl.images[idx]
    centre = Preprocessing.from_config(model.preprocessing).channels.centre  # the slice itself
    layers = torch.cat([agcam_layers(model, x[i : i + 32], ["malignancy"])[:, 0] for i in range(0, len(x), 32)])
    cdam = torch.cat(
        [explain(model, x[i : i + 32], "cdam", targets=["malignancy"])[:, 0] for i in range(0, len(x), 32)]
    )
    size = x.shape[-2:]
    up = upsample(layers, size).numpy()  # [M, K, H, W]
    mass = up.sum(axis=(2, 3))  # each block's mass (terms are non-negative)
    inside = (up * nodule[:, None]).sum(axis=(2, 3))
    share_of_map = mass / np.maximum(mass.sum(1, keepdims=True), 1e-12)
    share_inside = inside / np.maximum(mass, 1e-12)
    print(f"{len(idx)} malignant nodule slices; per block: AG-CAM mass share, share of it in the nodule")
    for k in range(up.shape[1]):
        print(f"block {k}: {share_of_map[:, k].mean():.3f}  {share_inside[:, k].mean():.3f}")
    print(f"nodule's share of the image: {nodule.mean():.4f}")
    order = np.argsort(-nodule.sum(axis=(1, 2)))[: args.n]
    K = up.shape[1]
    fig, axes = plt.subplots(len(order), 3 + K, figsize=(2.2 * (3 + K), 2.3 * len(order)), squeeze=False)
    cdam_up = upsample(cdam[:, None], size)[:, 0].numpy()
    for r, i in enumerate(order):
        ct = x[i, centre].numpy()
        panels = [("CT, nodule", None), ("CDAM", cdam_up[i]), ("AG-CAM (sum)", up[i].sum(0))]
        panels += [
            (f"block {k}: {share_of_map[i, k]:.0%} of mass,\n{share_inside[i, k]:.0%} in nodule", up[i, k])
            for k in range(K)
        ]
        for c, (title, m) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(ct, cmap="gray")
            if m is not None:
                lim = float(np.abs(m).max()) or 1.0
                ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=0.6)
            ax.contour(nodule[i], levels=[0.5], colors="yellow", linewidths=0.6)
            ax.set_title(title, fontsize=7)
            ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
