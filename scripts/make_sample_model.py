"""Re-create a shipped sample model: phantoms → train → held-out evaluation → model card.

    .venv/bin/python scripts/make_sample_model.py [--work runs/sample_model] [--out medvit_explain/assets/sample_model]
    .venv/bin/python scripts/make_sample_model.py --config configs/sample_roi_model.yaml \
        --out medvit_explain/assets/sample_roi

Everything (grids, seeds, epochs) comes from the config: configs/sample_model.yaml (sample-slice, the
default) or configs/sample_roi_model.yaml (sample-roi; --work defaults to runs/<config name>). The held-out
phantoms use a different seed and are never seen in training or model selection. A slice model is scored
per slice, an ROI model per nodule (the ROI views around each labelled nodule, their outputs averaged).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import yaml

from medvit_explain.model import load_model
from medvit_explain.phantom import GENERATOR_VERSION, make_phantom_groups
from medvit_explain.workflows.studies import find_studies
from medvit_explain.workflows.train import evaluate, load_rois, load_slices, train

ROOT = Path(__file__).resolve().parents[1]
# the generator of phantom folders whose stamp names none (made before generator 2.1 existed)
UNSTAMPED_GENERATOR = "2.0"
# where each shipped recipe's model goes (--out default); other configs need --out
SHIPPED = {"sample_model": "sample_model", "sample_roi_model": "sample_roi", "sample_roi3d_model": "sample_roi3d"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "sample_model.yaml"))
    parser.add_argument("--work", default=None, help="phantoms and scratch [default: runs/<config name>]")
    parser.add_argument("--out", default=None, help="checkpoint folder [default: the shipped model's for its config]")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted training run")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads [default: training.num_threads]")
    parser.add_argument("--device", default="cpu", help="where to train: cpu (default), cuda, cuda:N or auto")
    args = parser.parse_args()
    stem = Path(args.config).name.split(".")[0]
    if args.out is None and stem not in SHIPPED:
        parser.error(f"--out is required for {args.config} (defaults exist for {', '.join(SHIPPED)})")
    args.out = args.out or str(ROOT / "medvit_explain" / "assets" / SHIPPED[stem])
    config = yaml.safe_load(Path(args.config).read_text())
    recipe = config["training"]
    if args.threads:  # recorded in the checkpoint's provenance with the rest of the recipe
        recipe["num_threads"] = args.threads
    # relative to the working directory, so the checkpoint's provenance names no machine's absolute path
    work = Path(args.work or os.path.relpath(ROOT / "runs" / stem))
    t0 = time.perf_counter()
    workers = int(recipe.get("num_threads", 1))  # the phantoms are made in as many processes as training's threads
    generator = recipe["phantoms"].get("generator_version", GENERATOR_VERSION)
    for part, groups, seed in (("train", "groups", "train_seed"), ("test", "test_groups", "test_seed")):
        phantoms(work / part, recipe["phantoms"][groups], recipe["phantoms"][seed], workers, generator)
    t_data = time.perf_counter() - t0
    result = train(config, work / "train", args.out, epochs=args.epochs, device=args.device, resume=args.resume)
    model = load_model(args.out, device="cpu")
    if model.preprocessing["mode"] == "roi":  # every labelled nodule's views, un-jittered
        test = load_rois(find_studies(work / "test"), model, workers=workers)
    else:
        min_area = float(recipe.get("min_area_mm2", 10.0))
        test = load_slices(find_studies(work / "test"), model, all_slices=True, min_area_mm2=min_area)
    metrics = evaluate(model, test)
    total = time.perf_counter() - t0
    card = {
        "name": config["name"],
        "held_out": {
            "phantoms": sum(g["count"] for g in recipe["phantoms"]["test_groups"]),
            "seed": recipe["phantoms"]["test_seed"],
            **metrics,
        },
        "validation": result.validation,
        "selected_epoch": json.loads((Path(args.out) / "config.json").read_text())["provenance"]["epoch"],
        "timings_s": {
            "phantoms": round(t_data, 1),
            "training": round(result.seconds, 1),
            "per_epoch": round(result.seconds / max(1, len(result.history)), 1),
            "total": round(total, 1),
        },
        "trained_on": trained_on(args.device, recipe),
    }
    out = Path(args.out)
    (out / "model_card.json").write_text(json.dumps(card, indent=2))
    recipe_path = Path(args.config).resolve()
    shown = recipe_path.relative_to(ROOT) if recipe_path.is_relative_to(ROOT) else recipe_path
    (out / "MODEL_CARD.md").write_text(model_card_markdown(config, card, str(shown)))
    print(json.dumps(card, indent=2))
    import shutil

    shutil.rmtree(out.parent / f".{out.name}.train_state", ignore_errors=True)  # resume state, not shipped


def trained_on(device: str, recipe: dict) -> str:
    """The training device in words, for the model card: the GPU's name, or the CPU threads."""
    import torch

    from medvit_explain.model import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    return f"CPU, {int(recipe.get('num_threads') or torch.get_num_threads())} threads, torch {torch.__version__}"


def phantoms(
    folder: Path, groups: list[dict], seed: int, workers: int = 1, generator_version: str = GENERATOR_VERSION
) -> None:
    """Make the recipe's phantoms in ``folder``, or reuse them if it holds exactly those: the same
    ``phantoms.json`` stamp (seed, groups, generator version), or, for a folder made before the stamp, the same
    phantom names. A folder of another recipe or generator (say the last one's, under the same
    ``runs/<config name>``) stops the run. Stamps and folders from before the version was stamped are
    ``UNSTAMPED_GENERATOR``'s."""
    stamp = {"seed": seed, "groups": groups, "generator_version": generator_version}
    names = {f"grid{g}_{i:03d}" for g, group in enumerate(groups) for i in range(int(group["count"]))}
    if folder.exists():
        path = folder / "phantoms.json"
        found = {p.name.removesuffix(".json") for p in folder.glob("grid*_[0-9][0-9][0-9].json")}
        if path.exists():
            same = {"generator_version": UNSTAMPED_GENERATOR, **json.loads(path.read_text())} == stamp
        else:
            same = found == names and generator_version == UNSTAMPED_GENERATOR
        if not same:
            raise SystemExit(
                f"error: {folder} holds phantoms of another recipe or generator ({len(found)} there; this one "
                f"makes {len(names)} with generator {generator_version}): remove it or give --work"
            )
        return
    make_phantom_groups(folder, groups, seed, workers=workers, generator_version=generator_version)
    (folder / "phantoms.json").write_text(json.dumps(stamp))


def model_card_markdown(config: dict, card: dict, recipe_path: str = "configs/sample_model.yaml") -> str:
    held, arch = card["held_out"], config["architecture"]["kwargs"]
    t = card["timings_s"]
    roi = config["preprocessing"].get("mode") == "roi"
    volumetric = config["architecture"].get("patch_embed") == "conv3d"
    channels = config["preprocessing"].get("channels") or {}
    slab = (
        f", each with the {'planes' if roi else 'slices'} at offsets {channels['offsets']} as "
        f"{len(channels['offsets'])} channels"
        if channels.get("recipe") == "adjacent_slices"
        else ""
    )
    stem = config["architecture"].get("stem_widths")
    patch = f"patch {arch['patch_size']}" + (f" through a convolutional stem {stem}" if stem else "")
    if roi:
        box = config["preprocessing"]["roi"]
        what = (
            f"{box['size_mm']} mm nodule cubes sampled every {box['spacing_mm']} mm, each one "
            f"{' x '.join(map(str, arch['img_size']))} voxel input: a volumetric ViT with 3D patches"
            if volumetric
            else f"{box['size_mm']} mm nodule ROIs sampled every {box['spacing_mm']} mm, cut in "
            f"{len(box['views'])} views ({', '.join(box['views'])}) of {arch['img_size'][0]} px{slab}"
        )
        scores = [
            f"- nodules: {held['n_nodules']}" + ("" if volumetric else f" ({held['n_views']} views)"),
            f"- **nodule-level malignancy ROC AUC: {held['malignancy_auc']:.3f}** "
            + ("(one input per nodule" if volumetric else "(each nodule's views' logits averaged")
            + f", as the predictions table's `mean` row; accuracy at 0.5: {held['malignancy_accuracy']:.3f})",
            *([] if volumetric else [f"- malignancy ROC AUC over single views: {held['malignancy_auc_views']:.3f}"]),
            "",
            f"| biomarker (LIDC scale; diameter in mm) | MAE per nodule{'' if volumetric else ' (views averaged)'} |",
        ]
    else:
        what = f"{arch['img_size'][0]} px whole slices{slab}"
        scores = [
            f"- slices: {held['n_slices']} ({held['n_nodule_slices']} through a nodule)",
            f"- **slice-level malignancy ROC AUC: {held['malignancy_auc']:.3f}** "
            f"(accuracy at 0.5: {held['malignancy_accuracy']:.3f})",
        ]
        false_alarms = held.get("malignancy_false_positives_nodule_free")
        if false_alarms is not None:
            scores.append(
                f"- nodule-free slices called malignant (P > 0.5): {false_alarms} "
                f"({false_alarms / held['phantoms']:.1f} per phantom)"
            )
        scores += [
            f"- malignancy ROC AUC on nodule slices only (malignant vs benign nodule): "
            f"{held['malignancy_auc_nodule_slices']:.3f}",
            "",
            "| biomarker (LIDC scale) | MAE on nodule slices |",
        ]
    start = config["training"].get("init_from")
    origin = f"from `{start}` (its weights as the start)" if start else "from scratch"
    lines = [
        f"# {config['name']}",
        "",
        f"A small timm ViT ({what}; {patch}, {arch['depth']} blocks, "
        f"{arch['embed_dim']} dims, {arch['num_heads']} heads) with one linear head for malignancy (binary logit) "
        f"and the eight LIDC biomarkers (normalised regression), trained {origin} on synthetic chest-CT "
        "phantoms (`medvit_explain.phantom`). **It has never seen a real CT: it is a demo and test model, not a "
        f"clinical one.** Recipe and seeds: `{recipe_path}`; kept epoch {card['selected_epoch']}.",
        "",
        f"## Held-out phantoms (seed {held['seed']}, {held['phantoms']} phantoms, never used in training or selection)",
        "",
        *scores,
        "|---|---|",
        *[f"| {k} | {v:.2f} |" for k, v in held["mae"].items()],
        "",
        f"Re-created in {t['total'] / 60:.1f} min (phantoms {t['phantoms']:.0f} s, training {t['training']:.0f} s, "
        f"{t['per_epoch']:.0f} s an epoch) on {card.get('trained_on', 'this machine')}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
