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

The result is an :class:`EvaluationResult` (typed per method); :mod:`medvit_explain.report.evaluation`
renders it (``metrics.json``, ``evaluation.html``, the CLI table).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputNotFoundError, MedvitInputError
from ..metrics import (
    class_sensitivity,
    compactness,
    localization_scores,
    perturbation_curves,
    randomize_top_blocks,
    score_outputs,
    slice_masks,
    spearman,
)
from ..metrics.faithfulness import auc
from ..vocabulary import primary_target
from .labels import load_labelled_study, lung_mask_path
from .scores import model_outputs, slice_metrics
from .studies import find_studies

__all__ = [
    "EvalSlices",
    "EvaluationExamples",
    "EvaluationResult",
    "MethodEvaluation",
    "evaluate_explanations",
    "load_eval_slices",
    "localization_maps",
    "lung_mask_path",
    "token_grid_mask",
    "correctly_classified",
    "model_metrics",
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
model_metrics = slice_metrics  # the old name (``evaluate.model_metrics``)


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
class MethodEvaluation:
    """One method's measurements (each a mean over the explained slices unless said otherwise)."""

    localization: dict[str, float]  # LOCALIZATION_KEYS at the threshold
    localization_sweep: dict[str, list[float]]  # thresholds, dice, iou
    abpc: dict[str, float]  # per target
    deletion_auc: dict[str, float]
    insertion_auc: dict[str, float]
    curves: dict[str, dict[str, list[float]]]  # per target: mean morf / lerf curve
    compactness: float
    class_sensitivity: float
    class_sensitivity_pairs: Any
    randomization: float  # ρ with the deepest randomisation (NaN without one)
    randomization_cascade: dict[str, float]  # "k" -> ρ with the top k blocks re-initialised
    seconds: float


# the keys of metrics.json that hold one entry per method, in order, and the MethodEvaluation field of each
METHOD_KEYS = {
    "localization": "localization",
    "localization_sweep": "localization_sweep",
    "abpc": "abpc",
    "deletion_auc": "deletion_auc",
    "insertion_auc": "insertion_auc",
    "curves": "curves",
    "compactness": "compactness",
    "class_sensitivity": "class_sensitivity",
    "class_sensitivity_pairs": "class_sensitivity_pairs",
    "randomization": "randomization",
    "randomization_cascade": "randomization_cascade",
    "timings_s": "seconds",
}


@dataclass
class EvaluationExamples:
    """For the report: ``images`` [E, H, W] model inputs, ``nodule`` [E, H, W] masks and each method's
    predicted-class map [E, H, W] at input resolution."""

    images: np.ndarray | None = None
    nodule: np.ndarray | None = None
    maps: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class EvaluationResult:
    """What ``evaluate`` measured: per method, the model's own scores, the counts and the settings.

    :attr:`metrics` is what ``metrics.json`` holds (the same keys as ever)."""

    methods: dict[str, MethodEvaluation]
    model: dict[str, Any]
    targets: list[str]
    counts: dict[str, int]  # n_slices, n_nodules, n_studies, n_model_slices
    seed: int
    settings: dict[str, Any]
    total_seconds: float
    examples: EvaluationExamples = field(default_factory=EvaluationExamples)
    # the nodule mask itself as a token map, scored like the methods (:func:`token_grid_reference`)
    reference: dict[str, Any] | None = None

    @property
    def randomization_flagged(self) -> list[str]:
        """The methods whose maps barely change after the top blocks are re-initialised."""
        return [
            m for m, r in self.methods.items() if np.isfinite(r.randomization) and r.randomization > RANDOMIZATION_FLAG
        ]

    @property
    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            key: {m: getattr(r, attr) for m, r in self.methods.items()} for key, attr in METHOD_KEYS.items()
        }
        out["randomization_flagged"] = self.randomization_flagged
        if self.reference is not None:
            out["token_grid_reference"] = self.reference
        out["model"] = self.model
        out.update(self.counts)
        out.update(
            {
                "seed": self.seed,
                "methods": list(self.methods),
                "targets": self.targets,
                "settings": self.settings,
                "total_seconds": self.total_seconds,
            }
        )
        return out


# ----------------------------------------------------------------------------------------- the slices


def _load_study_slices(s: int, study, model, min_area_mm2: float):
    """One study's labelled slices: ``(s, inputs, mask, lungs, targets, chosen, has_nodule)``."""
    from ..io import load_volume

    inputs, mask, _, t, labelled, has_nodule = load_labelled_study(study, model, min_area_mm2)
    chosen = np.where(labelled)[0]
    lungs_path = lung_mask_path(study.path)
    lungs = load_volume(lungs_path).array if lungs_path is not None else None
    return s, inputs, mask.array, lungs, t, chosen, has_nodule


def _draw_candidates(per_study: list, max_slices: int | None, seed: int) -> set[tuple[int, int]]:
    """The (study, slice) pairs to explain: nodule slices, at most ``max_slices`` drawn with ``seed``."""
    candidates = [(s, int(k)) for s, _, _, _, _, chosen, has in per_study for k in chosen if has[k]]
    if not candidates:
        raise MedvitInputError("no slice with a labelled nodule in the data: nothing to evaluate the maps on")
    if max_slices is not None and len(candidates) > max_slices:
        pick = np.sort(np.random.default_rng(seed).choice(len(candidates), max_slices, replace=False))
        candidates = [candidates[i] for i in pick]
    return set(candidates)


def load_eval_slices(
    studies, model, *, min_area_mm2: float = 40.0, max_slices: int | None = None, seed: int = 0, progress: bool = True
) -> EvalSlices:
    """Preprocess every labelled slice of ``studies`` and the masks of the nodule slices to explain."""
    from tqdm.auto import tqdm

    bar = tqdm(studies, desc="loading", unit="study", disable=not progress, leave=False)
    per_study = [_load_study_slices(s, study, model, min_area_mm2) for s, study in enumerate(bar)]
    wanted = _draw_candidates(per_study, max_slices, seed)
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
        [st.study_id for st in studies],
    )


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


# ------------------------------------------------------------------------------------- the run


class _NegatedColumn(torch.nn.Module):
    """A head whose output ``k`` is negated: the benign logit of a binary target (for a softmax target,
    the log-odds of 'not the positive class'), whatever the head is built of."""

    def __init__(self, head: torch.nn.Module, k: int) -> None:
        super().__init__()
        self.inner, self.k = head, k

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        out = self.inner(pooled)
        sign = torch.ones(out.shape[-1], dtype=out.dtype, device=out.device)
        sign[self.k] = -1
        return out * sign


def _negated_output(model, k: int):
    """A copy of ``model`` whose output ``k`` is negated (the benign logit of a binary target): the row of
    the last Linear when output ``k`` is that Linear's (a plain head, as methods that propagate through the
    head's layers need), else a wrapper around any head."""
    import copy

    clone = copy.deepcopy(model)
    head = clone.head
    last = head if isinstance(head, torch.nn.Linear) else None
    if isinstance(head, torch.nn.Sequential) and len(head) and isinstance(head[-1], torch.nn.Linear):
        last = head[-1]
    if last is not None and getattr(head, "scores", None) is None:
        with torch.no_grad():
            last.weight[k].neg_()
            if last.bias is not None:
                last.bias[k].neg_()
    else:
        clone.head = _NegatedColumn(head, k)
    return clone.eval()


def _method_opts(method: str, seed: int, extra: dict | None) -> dict[str, Any]:
    from ..registry import explainer_class

    opts = dict(extra or {})
    if "seed" in explainer_class(method).defaults:
        opts.setdefault("seed", seed)
    return opts


def _mean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if values.size and np.isfinite(values).any() else float("nan")


@dataclass
class _Run:
    """What every method is measured with: the explained slices, the models and the settings."""

    model: Any
    device: torch.device
    spec: Any
    target_idx: list[int]
    names: list[str]
    primary: int
    sl: EvalSlices
    images: torch.Tensor  # [M, C, H, W] the explained slices
    benign: np.ndarray  # [M] the model predicts the primary target's negative class
    negated: Any  # the model with the primary output negated (None when no slice is benign)
    randomized: dict[int, Any]  # k -> the model with its top k blocks re-initialised
    batch_size: int
    seed: int
    threshold: float
    fill: float | torch.Tensor  # a removed pixel's value: one number, or one per channel [C, 1, 1]
    steps: int
    protocol: str = "default"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return score_outputs(self.model(x.to(self.device)), self.spec, self.target_idx)


def _start(model, sl: EvalSlices, target_idx: list[int], randomize_blocks: int, **settings) -> _Run:
    """Predict the explained slices (benign or not), and build the negated and randomised models."""
    spec = model.task_spec
    device = next(model.parameters()).device
    images = sl.images[sl.explained]
    primary = primary_target(spec.names, spec.score_kinds)
    logits = model_outputs(model, images)
    benign = (logits[:, primary] < 0).numpy() if spec.targets[primary].probability else np.zeros(len(images), bool)
    negated = _negated_output(model, primary) if benign.any() else None
    depth = len(model.backbone.blocks)
    randomized = {
        k: randomize_top_blocks(model, k, seed=settings["seed"] + k) for k in range(1, min(randomize_blocks, depth) + 1)
    }
    names = [spec.names[k] for k in target_idx]
    return _Run(model, device, spec, target_idx, names, primary, sl, images, benign, negated, randomized, **settings)


def _localization_map(
    run: _Run, x: torch.Tensor, m: torch.Tensor, rows: slice, method: str, opts, sensitive
) -> torch.Tensor:
    """[b, gh, gw]: the map of the predicted class of the primary target (the benign logit's map where
    the model says benign, for a class-sensitive method)."""
    from ..explainers import explain

    primary = run.primary
    if primary in run.target_idx:
        loc = m[:, run.target_idx.index(primary)]
    else:
        loc = explain(run.model, x, method, targets=[primary], **opts).float()[:, 0]
    flip = torch.from_numpy(run.benign[rows])
    if sensitive and run.negated is not None and flip.any():
        loc = loc.clone()
        loc[flip.to(loc.device)] = explain(
            run.negated, x[flip.to(x.device)], method, targets=[primary], **opts
        ).float()[:, 0]
    return loc


def localization_maps(
    model, sl: EvalSlices, method: str, *, batch_size: int = 16, seed: int = 0, options: dict | None = None
) -> torch.Tensor:
    """[M, gh, gw]: the map ``evaluate`` scores for localization on each explained slice of ``sl``, the
    primary target's map of the class the model predicts (for a class-sensitive method the benign logit's map
    where the model says benign); per slice, with no other measurement. ``localization_scores`` on these
    maps upsampled to the slices gives ``evaluate``'s localization per slice (``scripts/compare_maps.py``)."""
    from ..explainers import explain
    from ..registry import explainer_class

    model.eval()
    spec = model.task_spec
    primary = primary_target(spec.names, spec.score_kinds)
    run = _start(model, sl, [primary], 0, batch_size=batch_size, seed=seed, threshold=0.5, fill=0.0, steps=11)
    opts = _method_opts(method, seed, options)
    sensitive = explainer_class(method).class_sensitive
    out = []
    for start in range(0, len(run.images), batch_size):
        rows = slice(start, start + batch_size)
        x = run.images[rows].to(run.device)
        m = explain(model, x, method, targets=[primary], **opts).float()
        out.append(_localization_map(run, x, m, rows, method, opts, sensitive).cpu())
    return torch.cat(out)


def _explain_all(run: _Run, method: str, opts: dict, sensitive: bool, bar):
    """Every batch of the explained slices: ``(maps [M, T, gh, gw], loc [M, gh, gw], morf, lerf
    [M, T, S], randomised maps {k: [M, T, gh, gw]})``."""
    from ..explainers import explain, upsample

    h, w = run.images.shape[-2:]
    maps, loc_maps, morf, lerf = [], [], [], []
    rand_maps: dict[int, list] = {k: [] for k in run.randomized}
    for start in range(0, len(run.images), run.batch_size):
        rows = slice(start, start + run.batch_size)
        x = run.images[rows].to(run.device)
        m = explain(run.model, x, method, targets=run.target_idx, **opts).float()  # [b, T, gh, gw]
        maps.append(m.cpu())
        loc_maps.append(_localization_map(run, x, m, rows, method, opts, sensitive).cpu())
        mo, le = perturbation_curves(
            run.forward, x, upsample(m, (h, w)), steps=run.steps, fill=run.fill, batch_size=256
        )
        morf.append(mo)
        lerf.append(le)
        for k, rmodel in run.randomized.items():
            rand_maps[k].append(explain(rmodel, x, method, targets=run.target_idx, **opts).float().cpu())
        bar.update(1)
    rand = {k: torch.cat(v) for k, v in rand_maps.items()}
    return torch.cat(maps), torch.cat(loc_maps), np.concatenate(morf), np.concatenate(lerf), rand


def _localization(run: _Run, loc_t: torch.Tensor) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The localization scores at the threshold, and the Dice / IoU threshold sweep."""
    from ..explainers import upsample

    h, w = run.images.shape[-2:]
    scores = localization_scores(
        upsample(loc_t[:, None], (h, w))[:, 0],
        torch.from_numpy(run.sl.nodule),
        threshold=run.threshold,
        lungs=None if run.sl.lungs is None else torch.from_numpy(run.sl.lungs),
        map_boxes=run.protocol == "agcam",
    )
    at_threshold = {k: _mean(scores[k].numpy()) for k in LOCALIZATION_KEYS if k in scores}
    labels = run.sl.targets[run.sl.explained, run.primary].numpy()
    malignant = labels > 0.5  # slices through a malignant nodule (NaN labels compare False)
    at_threshold["dice_malignant"] = _mean(scores["dice"].numpy()[malignant]) if malignant.any() else None
    at_threshold["n_malignant"] = int(malignant.sum())
    sweep = sorted({float(k.split("@")[1]) for k in scores if "@" in k})
    swept = {
        "thresholds": sweep,
        "dice": [_mean(scores[f"dice@{t:g}"].numpy()) for t in sweep],
        "iou": [_mean(scores[f"iou@{t:g}"].numpy()) for t in sweep],
    }
    return at_threshold, swept


def token_grid_mask(nodule: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[M, gh, gw]: the share of each token's patch that lies in the nodule, for masks [M, H, W].

    The best a token-level map can say: the localization scores of this map, upsampled and binarised like
    the methods' maps, are the ceiling the token grid sets on them (a 16 × 16 grid over a slice makes a
    token ~22 mm, about a whole nodule)."""
    return torch.nn.functional.adaptive_avg_pool2d(nodule.float()[:, None], tuple(grid))[:, 0]


def token_grid_reference(run: _Run) -> dict[str, Any]:
    """The localization scores (at the threshold, and the sweep) of :func:`token_grid_mask` on the
    explained slices: what a perfect token map would score under the same protocol."""
    grid = tuple(int(g) for g in run.model.backbone.patch_embed.grid_size)
    at_threshold, sweep = _localization(run, token_grid_mask(torch.from_numpy(run.sl.nodule), grid))
    keep = ("iou", "dice", "precision", "recall", "box_iou", "dice_malignant", "n_malignant")
    return {
        "localization": {k: v for k, v in at_threshold.items() if k in keep},
        "localization_sweep": sweep,
        "grid": list(grid),
    }


def _measure(run: _Run, method: str, opts: dict, sensitive: bool, bar) -> tuple[MethodEvaluation, torch.Tensor]:
    """One method's :class:`MethodEvaluation` and its localization maps [M, gh, gw]."""
    t_method = time.perf_counter()
    maps_t, loc_t, morf_a, lerf_a, rand = _explain_all(run, method, opts, sensitive, bar)
    localization, sweep = _localization(run, loc_t)
    abpc_v = auc(lerf_a) - auc(morf_a)
    names = run.names
    per_image, pairs = class_sensitivity(maps_t, names)
    cascade = {str(k): _mean(spearman(maps_t, v).numpy()) for k, v in rand.items()}
    result = MethodEvaluation(
        localization=localization,
        localization_sweep=sweep,
        abpc={n: _mean(abpc_v[:, i]) for i, n in enumerate(names)},
        deletion_auc={n: _mean(auc(morf_a[:, i])) for i, n in enumerate(names)},
        insertion_auc={n: _mean(auc(lerf_a[:, i])) for i, n in enumerate(names)},
        curves={
            n: {"morf": morf_a[:, i].mean(0).tolist(), "lerf": lerf_a[:, i].mean(0).tolist()}
            for i, n in enumerate(names)
        },
        compactness=_mean(compactness(maps_t).numpy()),
        class_sensitivity=_mean(per_image.numpy()),
        class_sensitivity_pairs=pairs,
        randomization=cascade[str(max(run.randomized))] if cascade else float("nan"),
        randomization_cascade=cascade,
        seconds=round(time.perf_counter() - t_method, 2),
    )
    return result, loc_t


def _check(model, data, methods, targets, randomize_blocks: int) -> tuple[list[str], dict, list[int]]:
    """Methods, their classes and the target indices; raises for a bad name or missing data."""
    from ..registry import explainer_class, method_names

    methods = list(methods) if methods else method_names()
    classes = {m: explainer_class(m) for m in methods}  # MethodError for an unknown name
    target_idx = model.task_spec.resolve(targets)
    if randomize_blocks < 0:
        raise MedvitInputError(f"--randomize-blocks expected an integer >= 0, got {randomize_blocks}")
    if not Path(data).exists():
        raise InputNotFoundError(f"evaluation data not found: {data}")
    return methods, classes, target_idx


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
    protocol: str = "default",
) -> EvaluationResult:
    """Measure every method's maps on the nodule slices of ``data`` (see the module docstring).

    Args:
        model: a loaded model (device as placed; put in eval mode here).
        data: a phantom folder or a manifest CSV (see :func:`medvit_explain.workflows.studies.find_studies`).
        methods: method names (default: every registered method).
        targets: target names / indices (default: all).
        max_slices: cap on the explained nodule slices (a seeded random subset).
        randomize_blocks: the sanity check re-initialises the top 1, 2, … ``k`` blocks (cascading).
        protocol: ``"default"`` (above) or ``"agcam"``, the AG-CAM paper's: only the slices whose primary
            target the model classifies correctly; ``box_*`` scores from the box of the binarised map's
            largest region against the lesion's box; ABPC with removed pixels set to 0 in the model's
            input space (unless ``fill`` is given).

    Returns:
        an :class:`EvaluationResult` whose ``metrics`` is what ``metrics.json`` holds; for an ROI-mode
        model a :class:`~medvit_explain.workflows.roi_evaluation.RoiEvaluationResult` (nodule-level scores
        and target-specific localization; the slice measures above need whole slices).
    Raises:
        ``InputNotFoundError`` / ``MedvitInputError`` (data), ``MethodError``, ``TargetError``.
    """
    from ..transforms import Preprocessing, channel_fill

    if Preprocessing.from_config(model.preprocessing).mode == "roi":
        from ..registry import method_names
        from .roi_evaluation import evaluate_roi_explanations

        if not Path(data).exists():
            raise InputNotFoundError(f"evaluation data not found: {data}")
        methods = list(methods) if methods else method_names()
        return evaluate_roi_explanations(model, data, methods, targets, batch_size=batch_size, progress=progress)
    if protocol not in PROTOCOLS:
        raise MedvitInputError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    if fill is None and protocol == "agcam":
        fill = 0.0  # the paper removes pixels to 0 in the normalised input space
    if fill is None:  # each channel's window centre in model-input units; [C, 1, 1] when the channels differ
        values = channel_fill(model.preprocessing, torch.float64)
        same = bool((values == values[0]).all())
        fill = float(values[0]) if same else values.float()[:, None, None]
    methods, classes, target_idx = _check(model, data, methods, targets, randomize_blocks)
    studies = find_studies(data)
    model.eval()
    t0 = time.perf_counter()
    sl = load_eval_slices(
        studies, model, min_area_mm2=min_area_mm2, max_slices=max_slices, seed=seed, progress=progress
    )
    overall = slice_metrics(model, sl.images, sl.targets, sl.has_nodule)
    if protocol == "agcam":
        sl = correctly_classified(model, sl, batch_size)
    run = _start(
        model,
        sl,
        target_idx,
        randomize_blocks,
        batch_size=batch_size,
        seed=seed,
        threshold=threshold,
        fill=fill,
        steps=steps,
        protocol=protocol,
    )
    per_method, examples = _measure_all(run, methods, classes, method_options, n_examples, progress)
    settings = {
        "protocol": protocol,
        "min_area_mm2": min_area_mm2,
        "max_slices": max_slices,
        "threshold": threshold,
        "fill": fill.flatten().tolist() if torch.is_tensor(fill) else fill,
        "steps": steps,
        "randomize_blocks": int(min(randomize_blocks, len(model.backbone.blocks))),
        "randomization_flag_above": RANDOMIZATION_FLAG,
        "localization_target": run.spec.names[run.primary],
        "localization_class": "predicted",
        "batch_size": batch_size,
        "device": str(run.device),
        "data": str(data),
    }
    total = round(time.perf_counter() - t0, 1)
    counts = _counts(run, len(studies))
    return EvaluationResult(
        per_method,
        _model_block(overall, run.spec),
        run.names,
        counts,
        int(seed),
        settings,
        total,
        examples,
        reference=token_grid_reference(run),
    )


PROTOCOLS = ("default", "agcam")


def correctly_classified(model, sl: EvalSlices, batch_size: int = 64) -> EvalSlices:
    """``sl`` with only the explained slices whose primary target (malignancy) the model gets right
    (logit > 0 ⇔ label > 0.5; unlabelled slices dropped): the AG-CAM paper explains correctly
    classified images only. Raises when none is left."""
    spec = model.task_spec
    primary = primary_target(spec.names, spec.score_kinds)
    if not spec.targets[primary].probability:
        raise MedvitInputError("the agcam protocol needs a binary (or softmax) target to classify")
    logits = model_outputs(model, sl.images[sl.explained], batch_size)[:, primary].numpy()
    labels = sl.targets[sl.explained, primary].numpy()
    keep = ~np.isnan(labels) & ((logits > 0) == (labels > 0.5))
    if not keep.any():
        raise MedvitInputError("no explained slice is classified correctly; the agcam protocol has nothing to measure")
    return EvalSlices(
        sl.images,
        sl.targets,
        sl.study,
        sl.has_nodule,
        sl.explained[keep],
        sl.nodule[keep],
        None if sl.lungs is None else sl.lungs[keep],
        [ids for ids, k in zip(sl.nodule_ids, keep, strict=True) if k],
        sl.study_names,
    )


def _counts(run: _Run, n_studies: int) -> dict[str, int]:
    sl = run.sl
    return {
        "n_slices": int(len(run.images)),
        "n_nodules": int(len(set().union(*sl.nodule_ids))) if sl.nodule_ids else 0,
        "n_studies": n_studies,
        "n_model_slices": int(len(sl.images)),
    }


def _measure_all(
    run: _Run, methods: list[str], classes: dict, method_options: dict | None, n_examples: int, progress: bool
) -> tuple[dict[str, MethodEvaluation], EvaluationExamples]:
    """Every method's :class:`MethodEvaluation`, and the example slices with each method's map."""
    from tqdm.auto import tqdm

    from ..explainers import upsample
    from ..transforms import Preprocessing

    ex_idx = _example_indices(run.sl, n_examples)
    centre = Preprocessing.from_config(run.model.preprocessing).channels.centre  # the slice itself
    examples = EvaluationExamples(run.images[ex_idx, centre].numpy(), run.sl.nodule[ex_idx])
    n_batches = (len(run.images) + run.batch_size - 1) // run.batch_size
    bar = tqdm(total=len(methods) * n_batches, desc="evaluate", unit="batch", disable=not progress, leave=False)
    per_method = {}
    for method in methods:
        opts = _method_opts(method, run.seed, (method_options or {}).get(method))
        per_method[method], loc_t = _measure(run, method, opts, classes[method].class_sensitive, bar)
        examples.maps[method] = upsample(loc_t[ex_idx][:, None], run.images.shape[-2:])[:, 0].numpy()
    bar.close()
    return per_method, examples


def _model_block(overall: dict[str, Any], spec) -> dict[str, Any]:
    primary = spec.names[primary_target(spec.names, spec.score_kinds)]
    return {
        "malignancy_auc": overall.get(f"{primary}_auc"),
        "malignancy_accuracy": overall.get(f"{primary}_accuracy"),
        "malignancy_auc_nodule_slices": overall.get(f"{primary}_auc_nodule_slices"),
        "biomarker_mae": overall.get("mae", {}),
        "n_slices": overall.get("n_slices"),
        "n_nodule_slices": overall.get("n_nodule_slices"),
    }
