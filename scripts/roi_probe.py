"""How much of the ROI targets a network can learn from a recipe's ROI views: a probe, not a sample model.

Trains a small CNN (``--net cnn``) or the recipe's ViT plainly (``--net vit``: no token labels, the probe's
schedule), or that ViT reading a nodule's views side by side as one input (``--net fused``: a 48 x 144 image
of the axial, coronal and sagittal views, one token sequence, so attention can compare the views; one output
per nodule, batches of batch_size / 3 nodules so a step holds as many views) on the ROI views of the
``--train`` folders, with the recipe's preprocessing, channel recipe and augmentation (centre jitter, 90°
turns, flips) and its loss weights, and prints the held-out nodule-level malignancy AUC and the biomarker MAE
on ``--test`` (views averaged, as the predictions table's ``mean`` row) every ``--every`` epochs. The README's
"what would grade the shape biomarkers" paragraph was measured with it:

    .venv/bin/python scripts/roi_probe.py --config configs/sample_roi_model.yaml \\
        --train runs/sample_roi_model/train --test runs/sample_roi_model/test --net cnn

A ``--channels`` list (plane offsets in ROI samples, e.g. ``-6,-3,0,3,6``) replaces the recipe's channels
with an ``adjacent_slices`` slab of that many planes per view.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import yaml

from medvit_explain.model import build_model
from medvit_explain.workflows.scores import model_outputs, nodule_scores
from medvit_explain.workflows.studies import find_studies
from medvit_explain.workflows.train import jitter_margin, load_rois, roi_metrics, task_loss


def probe_cnn(in_chans: int, outputs: int) -> torch.nn.Module:
    """Four conv stages (32-64-128-128 channels, batch norm, 2× pooling between) and a linear head."""

    def stage(c_in, c_out, convs):
        layers = []
        for i in range(convs):
            layers += [torch.nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1), torch.nn.BatchNorm2d(c_out)]
            layers.append(torch.nn.ReLU())
        return layers

    return torch.nn.Sequential(
        *stage(in_chans, 32, 2),
        torch.nn.MaxPool2d(2),
        *stage(32, 64, 2),
        torch.nn.MaxPool2d(2),
        *stage(64, 128, 1),
        torch.nn.MaxPool2d(2),
        *stage(128, 128, 1),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(128, outputs),
    )


def side_by_side(views: torch.Tensor, n_views: int) -> torch.Tensor:
    """[B·V, C, H, W] views (nodule-major) -> [B, C, H, V·W]: each nodule's views in a row, one image."""
    b, (c, h, w) = len(views) // n_views, views.shape[1:]
    return views.reshape(b, n_views, c, h, w).permute(0, 2, 3, 1, 4).reshape(b, c, h, n_views * w)


def fused_vit(config: dict, n_views: int) -> torch.nn.Module:
    """The recipe's ViT with an input n_views times as wide (its grid n_views times as many tokens)."""
    wide = copy.deepcopy(config)
    h, w = wide["architecture"]["kwargs"]["img_size"]
    wide["architecture"]["kwargs"]["img_size"] = [h, n_views * w]
    wide["preprocessing"]["image_size"] = [h, n_views * w]
    return build_model(wide)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="an ROI recipe (its preprocessing, model, training)")
    parser.add_argument("--train", action="append", required=True, help="phantom folder (repeat for more)")
    parser.add_argument("--test", required=True, help="held-out phantom folder")
    parser.add_argument("--net", choices=("cnn", "vit", "fused"), default="cnn")
    parser.add_argument("--channels", default=None, help="plane offsets of a slab per view, e.g. -6,-3,0,3,6")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=None, help="peak one-cycle LR [cnn 2e-3, vit 1e-3]")
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = yaml.safe_load(open(args.config))
    if args.channels:
        offsets = [int(v) for v in args.channels.split(",")]
        config["preprocessing"]["channels"] = {"recipe": "adjacent_slices", "offsets": offsets}
        config["preprocessing"]["in_chans"] = config["architecture"]["kwargs"]["in_chans"] = len(offsets)
    recipe = config["training"]
    model = build_model(config)  # the preprocessing and task the probe is trained for (and the ViT)
    studies = [study for folder in args.train for study in find_studies(folder)]
    train = load_rois(studies, model, margin=jitter_margin(model, recipe), what="the --train folders")
    test = load_rois(find_studies(args.test), model, what=args.test)
    in_chans = int(config["preprocessing"]["in_chans"])
    net, n_views = model, len(train.views)
    if args.net == "cnn":
        net = probe_cnn(in_chans, len(model.task_spec))
        net.task_spec = model.task_spec  # what roi_metrics reads the targets from
    elif args.net == "fused":
        net = fused_vit(config, n_views)
    lr = args.lr or (2e-3 if args.net == "cnn" else 1e-3)
    batch = int(recipe.get("batch_size", 64))
    per_step = n_views if args.net == "fused" else 1  # views per sample
    batch //= per_step
    samples = len(train) // per_step
    steps = (samples + batch - 1) // batch
    opt = torch.optim.AdamW(net.parameters(), lr, weight_decay=float(recipe.get("weight_decay", 0.05)))
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=args.epochs * steps)
    kinds, weights = list(model.task_spec.score_kinds), recipe.get("loss_weights")
    print(
        f"{args.net}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters; "
        f"{train.n_nodules} training nodules ({len(train)} views), {test.n_nodules} held out",
        flush=True,
    )
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        net.train()
        order = torch.randperm(samples)
        for step in range(steps):
            chosen = order[step * batch : (step + 1) * batch]
            if per_step > 1:  # every view of the chosen nodules, nodule-major
                chosen = (chosen[:, None] * n_views + torch.arange(n_views)).reshape(-1)
            x, y, _ = train.training_batch(chosen, recipe, torch.device("cpu"))
            if per_step > 1:
                x, y = side_by_side(x, n_views), y[::n_views]
            loss = task_loss(net(x), y, kinds, weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
        if (epoch + 1) % args.every == 0 or epoch + 1 == args.epochs:
            with torch.no_grad():
                if per_step > 1:
                    net.eval()
                    raw = model_outputs(net, side_by_side(test.images, n_views), 128).numpy()
                    m = nodule_scores(model.task_spec, raw, test.nodule_targets.numpy(), 1)
                else:
                    m = roi_metrics(net, test)
            mae = " ".join(f"{k} {v:.2f}" for k, v in m["mae"].items())
            print(
                f"epoch {epoch + 1} ({time.perf_counter() - t0:.0f} s): AUC {m['malignancy_auc']:.3f}; MAE {mae}",
                flush=True,
            )


if __name__ == "__main__":
    main()
