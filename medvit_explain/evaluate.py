"""Dataset-level evaluation of the explanation methods (``medvit-explain evaluate``).

For a folder of phantoms (or a manifest CSV) every labelled slice is scored by the model (slice-level
malignancy ROC AUC, accuracy at 0.5, biomarker MAE); the slices that contain a nodule (cross-section
≥ ``min_area_mm2``; at most ``max_slices`` of them, drawn with ``seed``) are explained by every method
for every target and the maps are measured (DESIGN.md, "Evaluation definitions"):

* localization (AG-CAM protocol) of the *predicted* malignancy class against the nodule mask: the map
  of the malignancy logit where the model says malignant, the map of the benign logit (the same model
  with that output negated) where it says benign; class-agnostic methods have one map for both;
* faithfulness (ABPC, deletion and insertion AUCs) of each target's map on that target's probability
  (binary) or value on its scale (regression), pixels removed to ``fill`` (default: the centre of the HU
  window in model input units);
* compactness of the raw token-grid maps, class sensitivity between the targets' maps, and the
  Spearman correlation with the maps of the model whose top ``k`` blocks are re-initialised.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputNotFoundError, MedvitInputError
from .metrics import (
    class_sensitivity,
    compactness,
    localization_scores,
    perturbation_curves,
    randomize_top_blocks,
    score_outputs,
    slice_masks,
    spearman,
)
from .metrics.faithfulness import auc
from .vocabulary import primary_target, to_json

__all__ = [
    "EvalSlices",
    "EvaluationResult",
    "evaluate_explanations",
    "load_eval_slices",
    "lung_mask_path",
    "write_evaluation",
]

LOCALIZATION_KEYS = (
    "pixel_accuracy",
    "iou",
    "dice",
    "precision",
    "recall",
    "box_pixel_accuracy",
    "box_iou",
    "box_dice",
    "box_precision",
    "box_recall",
    "pointing_game",
    "evidence_in_nodule",
    "evidence_in_lungs",
)
RANDOMIZATION_FLAG = 0.5  # mean Spearman ρ above this after randomisation: the maps did not change enough


@dataclass
class EvalSlices:
    """Every labelled slice (for the model metrics) and the explained nodule slices.

    ``images`` [N, C, H, W], ``targets`` [N, K] (normalised, NaN = unlabelled), ``study`` [N],
    ``has_nodule`` [N]; ``explained`` [M] indices into those; ``nodule`` / ``lungs`` [M, H, W] bool masks
    at model resolution; ``nodule_ids`` [M] sets of (study, nodule id) present.
    """

    images: torch.Tensor
    targets: torch.Tensor
    study: np.ndarray
    has_nodule: np.ndarray
    explained: np.ndarray
    nodule: np.ndarray
    lungs: np.ndarray | None
    nodule_ids: list[set]
    study_names: list[str]


@dataclass
class EvaluationResult:
    metrics: dict[str, Any]
    examples: dict[str, Any] = field(default_factory=dict)  # for the report: images, masks, maps


def lung_mask_path(image: str | Path) -> Path | None:
    """``<name>_lungs.nii.gz`` beside ``<name>.nii.gz`` (as ``make-phantom`` writes it), if present."""
    image = Path(image)
    name = image.name[:-7] if image.name.endswith(".nii.gz") else image.stem
    path = image.with_name(f"{name}_lungs.nii.gz")
    return path if path.exists() else None


def load_eval_slices(
    studies, model, *, min_area_mm2: float = 40.0, max_slices: int | None = None, seed: int = 0, progress: bool = True
) -> EvalSlices:
    """Preprocess every labelled slice of ``studies`` and the masks of the nodule slices to explain."""
    from tqdm.auto import tqdm

    from .io import load_volume
    from .train import load_labelled_study

    per_study = []
    for s, study in enumerate(tqdm(studies, desc="loading", unit="study", disable=not progress, leave=False)):
        inputs, mask, _, t, labelled, has_nodule = load_labelled_study(study, model, min_area_mm2)
        chosen = np.where(labelled)[0]
        lungs_path = lung_mask_path(study.image)
        lungs = load_volume(lungs_path).array if lungs_path is not None else None
        per_study.append((s, inputs, mask.array, lungs, t, chosen, has_nodule))
    # the nodule slices to explain, drawn over the whole set
    candidates = [(s, int(k)) for s, _, _, _, _, chosen, has in per_study for k in chosen if has[k]]
    if not candidates:
        raise MedvitInputError("no slice with a labelled nodule in the data: nothing to evaluate the maps on")
    if max_slices is not None and len(candidates) > max_slices:
        pick = np.sort(np.random.default_rng(seed).choice(len(candidates), max_slices, replace=False))
        candidates = [candidates[i] for i in pick]
    wanted = set(candidates)
    images, targets, study_idx, flags, explained, nod, lung, ids = [], [], [], [], [], [], [], []
    offset = 0
    any_lungs = all(item[3] is not None for item in per_study)
    for s, inputs, mask, lungs, t, chosen, has_nodule in per_study:
        images.append(inputs.images(chosen))
        targets.append(torch.from_numpy(t[chosen]))
        study_idx.append(np.full(len(chosen), s))
        flags.append(has_nodule[chosen])
        sel = [i for i, k in enumerate(chosen) if (s, int(k)) in wanted]
        if sel:
            ks = chosen[sel]
            labels = slice_masks(mask, inputs, ks)
            nod.append(labels > 0)
            ids.extend({(s, int(v)) for v in np.unique(plane) if v > 0} for plane in labels)
            if any_lungs:
                lung.append(slice_masks(lungs, inputs, ks) > 0)
            explained.extend(offset + i for i in sel)
        offset += len(chosen)
    return EvalSlices(
        torch.cat(images),
        torch.cat(targets),
        np.concatenate(study_idx),
        np.concatenate(flags),
        np.asarray(explained, dtype=np.int64),
        np.concatenate(nod),
        np.concatenate(lung) if any_lungs else None,
        ids,
        [st.name for st in studies],
    )


def _negated_output(model, k: int):
    """A copy of ``model`` whose output ``k`` is negated (the benign logit of a binary target)."""
    import copy

    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.head.weight[k].neg_()
        if clone.head.bias is not None:
            clone.head.bias[k].neg_()
    return clone.eval()


def _method_opts(method: str, seed: int, extra: dict | None) -> dict[str, Any]:
    from .registry import explainer_class

    opts = dict(extra or {})
    if "seed" in explainer_class(method).defaults:
        opts.setdefault("seed", seed)
    return opts


def _mean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if values.size and np.isfinite(values).any() else float("nan")


def evaluate_explanations(
    model,
    data,
    methods: Sequence[str] | None = None,
    targets=None,
    *,
    batch_size: int = 16,
    seed: int = 0,
    max_slices: int | None = None,
    randomize_blocks: int = 1,
    min_area_mm2: float = 40.0,
    threshold: float = 0.5,
    fill: float | None = None,
    steps: int = 11,
    method_options: dict[str, dict] | None = None,
    progress: bool = True,
    n_examples: int = 3,
) -> EvaluationResult:
    """Measure every method's maps on the nodule slices of ``data`` (see the module docstring).

    Args:
        model: a loaded model (device as placed; put in eval mode here).
        data: a phantom folder or a manifest CSV (see :func:`medvit_explain.train.find_studies`).
        methods: method names (default: every registered method).
        targets: target names / indices (default: all).
        max_slices: cap on the explained nodule slices (a seeded random subset).
        randomize_blocks: the sanity check re-initialises the top 1, 2, … ``k`` blocks (cascading).

    Returns:
        an :class:`EvaluationResult` whose ``metrics`` is what ``metrics.json`` holds.
    Raises:
        ``InputNotFoundError`` / ``MedvitInputError`` (data), ``MethodError``, ``TargetError``.
    """
    from tqdm.auto import tqdm

    from .explainers import explain, upsample
    from .registry import explainer_class, method_names
    from .transforms import window_mean

    if fill is None:  # the window's mean intensity in model-input units
        fill = window_mean(model.preprocessing)
    from .train import find_studies

    methods = list(methods) if methods else method_names()
    classes = {m: explainer_class(m) for m in methods}  # MethodError for an unknown name
    spec = model.task_spec
    target_idx = spec.resolve(targets)
    names = [spec.names[k] for k in target_idx]
    if randomize_blocks < 0:
        raise MedvitInputError(f"--randomize-blocks expected an integer >= 0, got {randomize_blocks}")
    if not Path(data).exists():
        raise InputNotFoundError(f"evaluation data not found: {data}")
    studies = find_studies(data)
    model.eval()
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    sl = load_eval_slices(
        studies, model, min_area_mm2=min_area_mm2, max_slices=max_slices, seed=seed, progress=progress
    )
    overall = model_metrics(model, sl.images, sl.targets, sl.has_nodule)
    images = sl.images[sl.explained]
    h, w = images.shape[-2:]
    primary = primary_target(spec.names, spec.kinds)
    with torch.no_grad():
        logits = torch.cat([model(images[i : i + 128].to(device)).float().cpu() for i in range(0, len(images), 128)])
    benign = (logits[:, primary] < 0).numpy() if spec.targets[primary].kind == "binary" else np.zeros(len(images), bool)
    negated = _negated_output(model, primary) if benign.any() else None
    depth = len(model.backbone.blocks)
    randomized = {k: randomize_top_blocks(model, k, seed=seed + k) for k in range(1, min(randomize_blocks, depth) + 1)}

    def forward(x: torch.Tensor) -> torch.Tensor:
        return score_outputs(model(x.to(device)), spec, target_idx)

    metrics: dict[str, Any] = {
        key: {}
        for key in (
            "localization",
            "localization_sweep",
            "abpc",
            "deletion_auc",
            "insertion_auc",
            "curves",
            "compactness",
            "class_sensitivity",
            "class_sensitivity_pairs",
            "randomization",
            "randomization_cascade",
            "timings_s",
        )
    }
    examples: dict[str, Any] = {}
    ex_idx = _example_indices(sl, n_examples)
    examples["images"] = images[ex_idx, 0].numpy()
    examples["nodule"] = sl.nodule[ex_idx]
    examples["maps"] = {}
    n_batches = (len(images) + batch_size - 1) // batch_size
    bar = tqdm(total=len(methods) * n_batches, desc="evaluate", unit="batch", disable=not progress, leave=False)
    for method in methods:
        t_method = time.perf_counter()
        opts = _method_opts(method, seed, (method_options or {}).get(method))
        sensitive = classes[method].class_sensitive
        maps, loc_maps, morf, lerf = [], [], [], []
        rand_maps: dict[int, list] = {k: [] for k in randomized}
        for b in range(n_batches):
            rows = slice(b * batch_size, (b + 1) * batch_size)
            x = images[rows].to(device)
            m = explain(model, x, method, targets=target_idx, **opts).float()  # [b, T, gh, gw]
            maps.append(m.cpu())
            loc = (
                m[:, target_idx.index(primary)]
                if primary in target_idx
                else explain(model, x, method, targets=[primary], **opts).float()[:, 0]
            )
            flip = torch.from_numpy(benign[rows])
            if sensitive and negated is not None and flip.any():
                loc = loc.clone()
                loc[flip.to(loc.device)] = explain(
                    negated, x[flip.to(x.device)], method, targets=[primary], **opts
                ).float()[:, 0]
            loc_maps.append(loc.cpu())
            up = upsample(m, (h, w))
            mo, le = perturbation_curves(forward, x, up, steps=steps, fill=fill, batch_size=256)
            morf.append(mo)
            lerf.append(le)
            for k, rmodel in randomized.items():
                rand_maps[k].append(explain(rmodel, x, method, targets=target_idx, **opts).float().cpu())
            bar.update(1)
        maps_t = torch.cat(maps)
        loc_t = torch.cat(loc_maps)
        scores = localization_scores(
            upsample(loc_t[:, None], (h, w))[:, 0],
            torch.from_numpy(sl.nodule),
            threshold=threshold,
            lungs=None if sl.lungs is None else torch.from_numpy(sl.lungs),
        )
        metrics["localization"][method] = {k: _mean(scores[k].numpy()) for k in LOCALIZATION_KEYS if k in scores}
        sweep = sorted({float(k.split("@")[1]) for k in scores if "@" in k})
        metrics["localization_sweep"][method] = {
            "thresholds": sweep,
            "dice": [_mean(scores[f"dice@{t:g}"].numpy()) for t in sweep],
            "iou": [_mean(scores[f"iou@{t:g}"].numpy()) for t in sweep],
        }
        morf_a, lerf_a = np.concatenate(morf), np.concatenate(lerf)  # [M, T, S]
        abpc_v = auc(lerf_a) - auc(morf_a)
        metrics["abpc"][method] = {n: _mean(abpc_v[:, i]) for i, n in enumerate(names)}
        metrics["deletion_auc"][method] = {n: _mean(auc(morf_a[:, i])) for i, n in enumerate(names)}
        metrics["insertion_auc"][method] = {n: _mean(auc(lerf_a[:, i])) for i, n in enumerate(names)}
        metrics["curves"][method] = {
            n: {"morf": morf_a[:, i].mean(0).tolist(), "lerf": lerf_a[:, i].mean(0).tolist()}
            for i, n in enumerate(names)
        }
        metrics["compactness"][method] = _mean(compactness(maps_t).numpy())
        per_image, pairs = class_sensitivity(maps_t, names)
        metrics["class_sensitivity"][method] = _mean(per_image.numpy())
        metrics["class_sensitivity_pairs"][method] = pairs
        cascade = {str(k): _mean(spearman(maps_t, torch.cat(v)).numpy()) for k, v in rand_maps.items()}
        metrics["randomization_cascade"][method] = cascade
        metrics["randomization"][method] = cascade[str(max(randomized))] if cascade else float("nan")
        metrics["timings_s"][method] = round(time.perf_counter() - t_method, 2)
        examples["maps"][method] = upsample(loc_t[ex_idx][:, None], (h, w))[:, 0].numpy()
    bar.close()
    metrics["randomization_flagged"] = [
        m for m, r in metrics["randomization"].items() if np.isfinite(r) and r > RANDOMIZATION_FLAG
    ]
    metrics["model"] = _model_block(overall, spec)
    metrics.update(
        {
            "n_slices": int(len(images)),
            "n_nodules": int(len(set().union(*sl.nodule_ids))) if sl.nodule_ids else 0,
            "n_studies": len(studies),
            "n_model_slices": int(len(sl.images)),
            "seed": int(seed),
            "methods": methods,
            "targets": names,
            "settings": {
                "min_area_mm2": min_area_mm2,
                "max_slices": max_slices,
                "threshold": threshold,
                "fill": fill,
                "steps": steps,
                "randomize_blocks": int(min(randomize_blocks, depth)),
                "randomization_flag_above": RANDOMIZATION_FLAG,
                "localization_target": spec.names[primary],
                "localization_class": "predicted",
                "batch_size": batch_size,
                "device": str(device),
                "data": str(data),
            },
            "total_seconds": round(time.perf_counter() - t0, 1),
        }
    )
    return EvaluationResult(metrics, examples)


def _example_indices(sl: EvalSlices, n: int) -> np.ndarray:
    """The explained slices with the largest nodule cross-sections (distinct studies first)."""
    area = sl.nodule.reshape(len(sl.nodule), -1).sum(1)
    order = np.argsort(-area, kind="stable")
    studies = sl.study[sl.explained]
    picked, seen = [], set()
    for i in order:
        if studies[i] not in seen:
            picked.append(int(i))
            seen.add(studies[i])
        if len(picked) == n:
            break
    return np.asarray(picked or order[:n].tolist(), dtype=np.int64)


@torch.no_grad()
def model_metrics(
    model, images: torch.Tensor, targets: torch.Tensor, has_nodule: np.ndarray, batch_size: int = 128
) -> dict[str, Any]:
    """Slice-level ROC AUC and accuracy at 0.5 of each binary target (also on nodule slices only), and
    the MAE on the target's scale of each regression target (labelled slices only)."""
    from .train import roc_auc

    device = next(model.parameters()).device
    outputs = torch.cat(
        [model(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    )
    spec = model.task_spec
    values = np.asarray(spec.to_values(outputs.numpy()))
    truth = np.asarray(spec.denormalize(targets.numpy()))
    out: dict[str, Any] = {"n_slices": len(images), "n_nodule_slices": int(np.sum(has_nodule)), "mae": {}}
    for k, target in enumerate(spec):
        valid = ~np.isnan(truth[:, k])
        if target.kind == "binary":
            y = truth[valid, k] > 0.5
            out[f"{target.name}_auc"] = roc_auc(y, values[valid, k])
            out[f"{target.name}_accuracy"] = float(np.mean((values[valid, k] > 0.5) == y)) if valid.any() else None
            nod = valid & has_nodule
            out[f"{target.name}_auc_nodule_slices"] = roc_auc(truth[nod, k] > 0.5, values[nod, k])
        elif valid.any():
            out["mae"][target.name] = float(np.mean(np.abs(values[valid, k] - truth[valid, k])))
    return out


def _model_block(overall: dict[str, Any], spec) -> dict[str, Any]:
    primary = spec.names[primary_target(spec.names, spec.kinds)]
    return {
        "malignancy_auc": overall.get(f"{primary}_auc"),
        "malignancy_accuracy": overall.get(f"{primary}_accuracy"),
        "malignancy_auc_nodule_slices": overall.get(f"{primary}_auc_nodule_slices"),
        "biomarker_mae": overall.get("mae", {}),
        "n_slices": overall.get("n_slices"),
        "n_nodule_slices": overall.get("n_nodule_slices"),
    }


def write_evaluation(result: EvaluationResult, out_dir: str | Path) -> dict[str, Path]:
    """``metrics.json`` and ``evaluation.html`` in ``out_dir`` (each written atomically)."""
    from .io.writer import atomic_path
    from .report.evaluation import render_evaluation

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MedvitInputError(f"--out {out} exists and is not a folder")
    html_text = render_evaluation(result)
    written = {"metrics": out / "metrics.json", "report": out / "evaluation.html"}
    with atomic_path(written["metrics"]) as tmp:
        tmp.write_text(to_json(result.metrics))
    with atomic_path(written["report"]) as tmp:
        tmp.write_text(html_text, encoding="utf-8")
    return written


def format_table(metrics: dict[str, Any]) -> str:
    """A plain-text method × metric table (what the CLI prints and the README shows)."""
    rows = table_rows(metrics)
    header = list(rows[0])
    widths = [max(len(str(h)), *(len(_cell(r[h])) for r in rows)) for h in header]
    lines = ["  ".join(str(h).ljust(wd) for h, wd in zip(header, widths, strict=True))]
    for r in rows:
        lines.append("  ".join(_cell(r[h]).ljust(wd) for h, wd in zip(header, widths, strict=True)))
    return "\n".join(lines)


def _cell(v) -> str:
    if isinstance(v, float):
        return "nan" if not np.isfinite(v) else f"{v:.3f}"
    return str(v)


def table_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method: the headline numbers (localization at 0.5, pointing game, evidence in the
    nodule and in the lungs, ABPC on the primary target, compactness, class sensitivity, rank correlation
    after randomisation). ABPC of the regression targets is in ``metrics["abpc"]`` (units of each scale)."""
    primary = metrics["settings"]["localization_target"]
    rows = []
    for m in metrics["methods"]:
        loc = metrics["localization"][m]
        abpc_m = metrics["abpc"][m]
        rows.append(
            {
                "method": m,
                "dice": loc.get("dice", float("nan")),
                "iou": loc.get("iou", float("nan")),
                "box_iou": loc.get("box_iou", float("nan")),
                "pointing": loc.get("pointing_game", float("nan")),
                "ev_nodule": loc.get("evidence_in_nodule", float("nan")),
                "ev_lungs": loc.get("evidence_in_lungs", float("nan")),
                f"abpc_{primary}": abpc_m.get(primary, float("nan")),
                "compact": metrics["compactness"][m],
                "class_sens": metrics["class_sensitivity"][m],
                "rand_rho": metrics["randomization"][m],
            }
        )
    return rows


def markdown_table(metrics: dict[str, Any]) -> str:
    """:func:`table_rows` as a Markdown table (for the README)."""
    rows = table_rows(metrics)
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r[h]) for h in header) + " |")
    return "\n".join(lines)
