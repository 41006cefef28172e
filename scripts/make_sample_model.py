"""Re-create the shipped sample model: phantoms → train → held-out evaluation → model card.

    .venv/bin/python scripts/make_sample_model.py [--work runs/sample_model] [--out medvit_explain/assets/sample_model]

Everything (grids, seeds, epochs) comes from configs/sample_model.yaml. The held-out phantoms use a
different seed and are never seen in training or model selection.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from medvit_explain.model import load_model
from medvit_explain.phantom import make_phantom_groups
from medvit_explain.workflows.studies import find_studies
from medvit_explain.workflows.train import evaluate, load_slices, train

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(ROOT / "configs" / "sample_model.yaml"))
    parser.add_argument("--work", default=str(ROOT / "runs" / "sample_model"))
    parser.add_argument("--out", default=str(ROOT / "medvit_explain" / "assets" / "sample_model"))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted training run")
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    recipe = config["training"]
    work = Path(args.work)
    t0 = time.perf_counter()
    if not (work / "train").exists():
        make_phantom_groups(work / "train", recipe["phantoms"]["groups"], recipe["phantoms"]["train_seed"])
    if not (work / "test").exists():
        make_phantom_groups(work / "test", recipe["phantoms"]["test_groups"], recipe["phantoms"]["test_seed"])
    t_data = time.perf_counter() - t0
    result = train(config, work / "train", args.out, epochs=args.epochs, device="cpu", resume=args.resume)
    model = load_model(args.out, device="cpu")
    test = load_slices(
        find_studies(work / "test"), model, all_slices=True, min_area_mm2=float(recipe.get("min_area_mm2", 10.0))
    )
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
        "timings_s": {"phantoms": round(t_data, 1), "training": round(result.seconds, 1), "total": round(total, 1)},
    }
    out = Path(args.out)
    (out / "model_card.json").write_text(json.dumps(card, indent=2))
    (out / "MODEL_CARD.md").write_text(model_card_markdown(config, card))
    print(json.dumps(card, indent=2))
    import shutil

    shutil.rmtree(out.parent / f".{out.name}.train_state", ignore_errors=True)  # resume state, not shipped


def model_card_markdown(config: dict, card: dict) -> str:
    held, arch = card["held_out"], config["architecture"]["kwargs"]
    t = card["timings_s"]
    lines = [
        f"# {config['name']}",
        "",
        f"A small timm ViT ({arch['img_size'][0]} px input, patch {arch['patch_size']}, {arch['depth']} blocks, "
        f"{arch['embed_dim']} dims, {arch['num_heads']} heads) with one linear head for malignancy (binary logit) "
        "and the eight LIDC biomarkers (normalised regression), trained from scratch on synthetic chest-CT "
        "phantoms (`medvit_explain.phantom`). **It has never seen a real CT: it is a demo and test model, not a "
        "clinical one.** Recipe and seeds: `configs/sample_model.yaml`.",
        "",
        f"## Held-out phantoms (seed {held['seed']}, {held['phantoms']} phantoms, never used in training or selection)",
        "",
        f"- slices: {held['n_slices']} ({held['n_nodule_slices']} through a nodule)",
        f"- **slice-level malignancy ROC AUC: {held['malignancy_auc']:.3f}** "
        f"(accuracy at 0.5: {held['malignancy_accuracy']:.3f})",
        f"- malignancy ROC AUC on nodule slices only (malignant vs benign nodule): "
        f"{held['malignancy_auc_nodule_slices']:.3f}",
        "",
        "| biomarker (LIDC scale) | MAE on nodule slices |",
        "|---|---|",
        *[f"| {k} | {v:.2f} |" for k, v in held["mae"].items()],
        "",
        f"Re-created in {t['total'] / 60:.1f} min on this machine (phantoms {t['phantoms']:.0f} s, "
        f"training {t['training']:.0f} s).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
