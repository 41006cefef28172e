"""Training the malignancy + biomarker ViT on labelled CT slices (phantoms or a manifest).

Data: a folder of phantoms as ``make-phantom`` writes them (``<name>.nii.gz``, ``<name>_nodules.nii.gz``,
``<name>.json``) or a manifest CSV (:mod:`.studies`: ``study_id,path,nodule_mask,labels``, or the older
``image,nodule_mask,labels``; ``labels`` is a JSON file in the phantom format:
``{"nodules": [{"id", "malignancy", "subtlety", ..., "diameter_mm"}]}``), paths relative to the CSV.
Slices go through exactly the preprocessing used at inference (``SliceInputs``).

Slice labels (:mod:`.labels`): a slice is labelled from the nodules whose cross-section in it is at
least ``min_area_mm2`` (malignancy = max over them; biomarkers of the largest); slices that only graze a
nodule (smaller cross-sections) are ambiguous and left out of training and evaluation; the other
slices are negatives with no biomarker labels (masked out of the regression loss).

ROI mode (``preprocessing.mode: roi``): the items are the views (axial, coronal, sagittal …) of the ROI
around each labelled nodule (centre: ``nodules[].center_mm``, else its label's centroid in the mask), each
with its nodule's targets (:class:`RoiSet`). Each ROI's cube is sampled once by the inference
preprocessing (``RoiInputs``), with ``ceil(roi_jitter_mm / spacing_mm)`` extra samples on every side: an
un-jittered item is bit for bit what ``RoiInputs`` gives at inference, and a jittered one is the sub-cube
shifted by whole samples, i.e. the crop ``RoiInputs`` samples around the shifted centre (same trilinear
samples, up to float rounding), without keeping the CT in memory. Views are then rotated by multiples of
90° and mirrored at random. Validation and selection are per nodule: its raw outputs averaged over its
views, as the predictions table's ``mean`` row (:func:`nodule_scores`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MedvitInputError
from ..metrics.masks import slice_masks
from ..phantom import FEATURE_LABELS
from ..processes import map_in_processes
from .labels import (
    BIOMARKER_KEYS,
    load_labelled_study,
    load_study_volumes,
    nodule_centres,
    nodule_targets,
    read_nodules,
    slice_targets,
)
from .scores import model_outputs, nodule_scores, roc_auc, slice_metrics
from .studies import Study, find_studies
from .target_localization import TARGET_FEATURE, load_features

__all__ = [
    "BIOMARKER_KEYS",
    "RoiSet",
    "SliceSet",
    "Study",
    "TokenLabelHead",
    "VIEW_SHAPE_TARGETS",
    "evaluate",
    "find_studies",
    "forward_with_tokens",
    "jitter_margin",
    "load_labelled_study",
    "load_rois",
    "load_slices",
    "nodule_scores",
    "roc_auc",
    "roi_metrics",
    "slice_targets",
    "split_studies",
    "task_loss",
    "train",
    "view_shape_targets",
]


# the nodule parts a feature token label marks (after nodule / malignant nodule): spicules, lobulation,
# calcification, ground glass -- each the part of a biomarker's own (target_localization.TARGET_FEATURE)
TOKEN_FEATURES = tuple(sorted(TARGET_FEATURE.values()))


@dataclass
class SliceSet:
    """Preprocessed slices and their targets: ``images`` [N, C, H, W], ``targets`` [N, K] (NaN = no
    label), ``study`` [N] study index, ``has_nodule`` [N] bool, ``token_targets`` [N, 2, gh, gw]
    (share of each patch inside a nodule / inside a malignant nodule: the token labels)."""

    images: torch.Tensor
    targets: torch.Tensor
    study: np.ndarray
    has_nodule: np.ndarray
    token_targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)

    def counts(self, split: str) -> dict[str, int]:
        """What a checkpoint's provenance records of this set (``split``: train / val)."""
        return {f"n_{split}_slices": len(self)}

    def training_batch(self, idx: torch.Tensor, recipe: dict, dev: torch.device):
        """Slices ``idx`` as (images, targets, token targets) on ``dev``, left-right mirrored at random
        (``augment_flip``: lungs are near-symmetric and labels do not change)."""
        x, y, tok = self.images[idx].to(dev), self.targets[idx].to(dev), self.token_targets[idx].to(dev)
        if bool(recipe.get("augment_flip", True)):
            mirror = (torch.rand(len(x), device=dev) < 0.5)[:, None, None, None]
            x = torch.where(mirror, x.flip(-1), x)
            tok = torch.where(mirror, tok.flip(-1), tok)
        return x, y, tok


def _choose_slices(
    labelled: np.ndarray, has_nodule: np.ndarray, background_ratio: float, all_slices: bool, rng
) -> np.ndarray:
    """Every nodule slice plus ``background_ratio`` as many random nodule-free ones (or every labelled one)."""
    if all_slices:
        return np.where(labelled)[0]
    pos = np.where(labelled & has_nodule)[0]
    neg = np.where(labelled & ~has_nodule)[0]
    n_neg = min(len(neg), max(1, int(round(background_ratio * max(len(pos), 1)))))
    return np.sort(np.concatenate([pos, rng.choice(neg, n_neg, replace=False)])) if len(neg) else pos


def _token_targets(mask: np.ndarray, inputs, chosen: np.ndarray, nodules: list[dict], grid) -> torch.Tensor:
    """[n, 2, gh, gw]: the share of each patch inside a nodule and inside a malignant nodule."""
    malignant_ids = [int(n["id"]) for n in nodules if int(n.get("malignancy", 0)) == 1]
    labels = torch.from_numpy(slice_masks(mask, inputs, chosen).astype(np.float32))
    maps = torch.stack([(labels > 0).float(), torch.isin(labels, torch.tensor(malignant_ids + [-1.0])).float()], 1)
    return F.adaptive_avg_pool2d(maps, grid)


def load_slices(
    studies: Sequence[Study],
    model,
    *,
    min_area_mm2: float = 10.0,
    background_ratio: float = 1.0,
    all_slices: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> SliceSet:
    """Preprocess the labelled slices of ``studies``: every nodule slice plus ``background_ratio`` as
    many random nodule-free slices (or every labelled slice with ``all_slices``)."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    images, targets, study_idx, nodule_flags, token_targets = [], [], [], [], []
    grid = tuple(model.backbone.patch_embed.grid_size)
    for s, study in enumerate(tqdm(studies, desc="loading", unit="study", disable=not progress)):
        inputs, mask, nodules, t, labelled, has_nodule = load_labelled_study(study, model, min_area_mm2)
        chosen = _choose_slices(labelled, has_nodule, background_ratio, all_slices, rng)
        if len(chosen) == 0:
            continue
        images.append(inputs.images(chosen))
        token_targets.append(_token_targets(mask.array, inputs, chosen, nodules, grid))
        targets.append(torch.from_numpy(t[chosen]))
        study_idx.append(np.full(len(chosen), s))
        nodule_flags.append(has_nodule[chosen])
    if not images:
        raise MedvitInputError("no labelled slices found in the training data")
    return SliceSet(
        torch.cat(images),
        torch.cat(targets),
        np.concatenate(study_idx),
        np.concatenate(nodule_flags),
        torch.cat(token_targets),
    )


def roi_view_images(config, views: Sequence[str], cubes: Sequence[np.ndarray], view_of: Sequence[int]) -> torch.Tensor:
    """Model inputs [B, C, H, W] from HU cubes [n, n, n] on canonical axes, item b = view ``views[view_of[b]]``
    of ``cubes[b]``: what :meth:`RoiInputs.images <medvit_explain.transforms.RoiInputs.images>` does after
    sampling its cube (the view plane(s) by the channel recipe, window, resize, normalisation). A volumetric
    model's one view ``"3d"``: the whole cube, [B, C, D, H, W], as :class:`~medvit_explain.volumetric_inputs.
    CubeInputs` gives it."""
    from ..transforms import _view_plane, channel_images
    from ..volumetric_inputs import CUBE_VIEW, cube_images

    if tuple(views) == (CUBE_VIEW,):
        return cube_images(config, cubes)
    recipe = config.channels
    offsets = recipe.offsets if recipe.recipe == "adjacent_slices" else (0,)  # cube planes per input
    planes = [np.ascontiguousarray(_view_plane(c, views[v], o)) for c, v in zip(cubes, view_of) for o in offsets]
    hu = torch.from_numpy(np.stack(planes))
    index = torch.arange(len(hu)).reshape(len(cubes), -1) if recipe.recipe == "adjacent_slices" else None
    return channel_images(config, hu, index)


@dataclass
class RoiSet:
    """Nodule ROIs for ROI-mode training and scoring. Items are ROI-major like ``RoiInputs``: item
    ``i`` is view ``views[i % V]`` of nodule ``i // V``.

    ``cubes`` [M, N, N, N] float32: each nodule's HU cube as ``RoiInputs`` samples it, ``margin`` samples
    larger on every side (N = n + 2·margin) so that crops around a shifted centre can be cut from it;
    ``token_cubes`` [M, L, N, N, N] uint8 (or None): the share (×255) of each cube sample inside a nodule /
    a malignant nodule (L = 2), then inside each part of ``TOKEN_FEATURES`` (L = 6; the token labels);
    ``nodule_targets`` [M, K] (normalised, NaN = no label);
    ``study`` [M] study index; ``grid`` the model's token grid; ``view_shapes`` [M·V, 4] float32 (or None):
    what each view shows of its nodule's shape (:func:`view_shape_targets`; with the feature token cubes)."""

    config: Any  # transforms.Preprocessing
    views: tuple[str, ...]
    n: int
    margin: int
    cubes: np.ndarray
    nodule_targets: torch.Tensor
    study: np.ndarray
    grid: tuple[int, ...]
    token_cubes: np.ndarray | None = None
    view_shapes: torch.Tensor | None = None
    _images: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.cubes) * len(self.views)

    @property
    def n_nodules(self) -> int:
        return len(self.cubes)

    @property
    def targets(self) -> torch.Tensor:
        """[M·V, K]: each view carries its nodule's targets."""
        return self.nodule_targets.repeat_interleave(len(self.views), 0)

    @property
    def has_nodule(self) -> np.ndarray:
        return np.ones(len(self), bool)

    @property
    def images(self) -> torch.Tensor:
        """[M·V, C, H, W]: every view un-jittered (= ``RoiInputs.images()`` at the nodule centres); made once."""
        if self._images is None:
            self._images = self.item_images(np.arange(len(self)))
        return self._images

    def counts(self, split: str) -> dict[str, int]:
        """What a checkpoint's provenance records of this set (``split``: train / val)."""
        return {f"n_{split}_nodules": self.n_nodules, f"n_{split}_views": len(self)}

    def _crops(self, cubes: np.ndarray, items: np.ndarray, shifts: np.ndarray | None) -> list[np.ndarray]:
        """The [..., n, n, n] crop of each item's cube, moved by ``shifts`` [B, 3] samples (canonical axes)."""
        m, n = self.margin, self.n
        shifts = np.zeros((len(items), 3), np.int64) if shifts is None else np.asarray(shifts, np.int64)
        if np.any(np.abs(shifts) > m):
            raise ValueError(f"expected shifts within ±{m} samples (the cubes' margin), got {np.abs(shifts).max()}")
        lo = m + shifts
        return [
            cubes[i // len(self.views), ..., a : a + n, b : b + n, c : c + n]
            for i, (a, b, c) in zip(np.asarray(items, np.int64).tolist(), lo.tolist())
        ]

    def item_images(self, items: Sequence[int] | np.ndarray, shifts: np.ndarray | None = None) -> torch.Tensor:
        """Model inputs [B, C, H, W] of ``items``, each ROI centre moved by ``shifts`` [B, 3] cube samples."""
        items = np.asarray(items, np.int64)
        crops = self._crops(self.cubes, items, shifts)
        return roi_view_images(self.config, self.views, crops, items % len(self.views))

    def item_token_targets(self, items: Sequence[int] | np.ndarray, shifts: np.ndarray | None = None):
        """[B, L, gh, gw] ([B, L, gd, gh, gw] for a volumetric model) share of each patch inside a nodule / a
        malignant nodule (and each nodule part: ``token_cubes``; None without token cubes)."""
        if self.token_cubes is None:
            return None
        from ..transforms import _view_plane
        from ..volumetric_inputs import CUBE_VIEW

        items = np.asarray(items, np.int64)
        crops = self._crops(self.token_cubes, items, shifts)
        if self.views == (CUBE_VIEW,):
            cubes = np.stack([c.transpose(0, 3, 2, 1) for c in crops])  # [2, x, y, z] -> the model's [2, D, H, W]
            return F.adaptive_avg_pool3d(torch.from_numpy(cubes.astype(np.float32) / 255.0), self.grid)
        views = [self.views[v] for v in (items % len(self.views)).tolist()]
        planes = np.stack([np.stack([_view_plane(c, view) for c in crop]) for crop, view in zip(crops, views)])
        return F.adaptive_avg_pool2d(torch.from_numpy(planes.astype(np.float32) / 255.0), self.grid)

    def training_batch(self, idx: torch.Tensor, recipe: dict, dev: torch.device):
        """Items ``idx`` as (images, targets, token targets or None) on ``dev``: each ROI centre moved by a
        random whole number of samples within the margin (``roi_jitter_mm``), each view rotated by a random
        multiple of 90° (``augment_rot90``, square inputs) and mirrored at random (``augment_flip``)."""
        items = idx.numpy()
        shifts = torch.randint(-self.margin, self.margin + 1, (len(items), 3)).numpy() if self.margin else None
        x, tok = self.item_images(items, shifts), self.item_token_targets(items, shifts)
        pairs = [x] if tok is None else [x, tok]
        square = x.shape[-1] == x.shape[-2] and self.grid[-1] == self.grid[-2]  # turned in the (H, W) plane
        if bool(recipe.get("augment_rot90", True)) and square:
            turns = torch.randint(0, 4, (len(x),))
            pairs = [_rotate(t, turns) for t in pairs]
        if bool(recipe.get("augment_flip", True)):
            mirror = (torch.rand(len(x)) < 0.5).reshape(-1, *([1] * (x.ndim - 1)))
            pairs = [torch.where(mirror, t.flip(-1), t) for t in pairs]
        x, tok = pairs[0], (pairs[1] if tok is not None else None)
        y = self.nodule_targets[torch.as_tensor(items // len(self.views))]
        return x.to(dev), y.to(dev), (tok.to(dev) if tok is not None else None)


def _rotate(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] (or [B, C, D, H, W]) with image b rotated by ``turns[b]`` quarter turns in (H, W) (H = W)."""
    out = images.clone()
    for k in (1, 2, 3):
        chosen = turns == k
        if chosen.any():
            out[chosen] = torch.rot90(images[chosen], k, (-2, -1))
    return out


VIEW_NORMAL_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}  # of a canonical (L, P, S) ROI cube
VIEW_SHAPE_TARGETS = ("in_plane_elongation", "normal_extent", "lobe_share", "spicule_share")


def view_shape_targets(token_cube: np.ndarray, views: Sequence[str]) -> np.ndarray:
    """[V, 4] float32: what each view of one nodule shows of its shape, from its ROI cube's token shares
    ``token_cube`` [2 + len(TOKEN_FEATURES), n, n, n] (uint8 ×255; canonical axes), for the training-only
    view-shape head (``training.view_shape_weight``):

    * ``in_plane_elongation``: ½·ln(λ1 / λ2) of the body's second moments in the view's plane (λ1 ≥ λ2; the
      body is the nodule without its spicules and lobes, the ellipsoid that sphericity draws), 0 when round;
    * ``normal_extent``: ½·ln(σ²_normal / √(λ1·λ2)), the body's extent along the view's normal against its
      extent in the plane (> 0: longer across the view than in it);
    * ``lobe_share``, ``spicule_share``: the share of the nodule's volume in its lobes, in its spicules.

    Each is unchanged by the 90° turns and mirroring of training (in-plane), so one value serves every
    augmented copy; a nodule with under 8 body samples gets zeros."""
    shares = token_cube.astype(np.float32) / 255.0
    nodule = shares[0]
    labels = {name: label for label, name in FEATURE_LABELS.items()}
    spicules, lobes = (shares[2 + TOKEN_FEATURES.index(labels[name])] for name in ("spicules", "lobulation"))
    body = np.clip(nodule - spicules - lobes, 0.0, None)
    total, mass = float(nodule.sum()), float(body.sum())
    out = np.zeros((len(views), len(VIEW_SHAPE_TARGETS)), np.float32)
    if mass < 8.0:
        return out
    grid = np.indices(body.shape, dtype=np.float32).reshape(3, -1)
    w = body.reshape(-1) / mass
    centred = grid - (grid @ w)[:, None]
    cov = (centred * w) @ centred.T
    for v, view in enumerate(views):
        normal = VIEW_NORMAL_AXIS[view]
        plane = [a for a in range(3) if a != normal]
        lam = np.clip(np.linalg.eigvalsh(cov[np.ix_(plane, plane)]), 1e-6, None)
        out[v] = (
            0.5 * np.log(lam[1] / lam[0]),
            0.5 * np.log(max(float(cov[normal, normal]), 1e-6) / float(np.sqrt(lam[0] * lam[1]))),
            float(lobes.sum()) / total,
            float(spicules.sum()) / total,
        )
    return out


def _binary_volume(mask, keep: np.ndarray):
    """The mask as a float32 volume on its grid: 1 where its label is in ``keep``, else 0."""
    return mask.with_array(np.isin(mask.array, keep).astype(np.float32))


def _features_volume(study: Study, volume):
    """The nodule-part labels of ``study`` (``<name>_features.nii.gz`` on the CT's grid); required here."""
    features = load_features(study.path, volume)
    if features is None:
        raise MedvitInputError(
            f"{study.path} has no <name>_features.nii.gz beside it: feature token labels "
            "(training.token_label_features) need phantoms v2 (make-phantom writes it)"
        )
    return features


@dataclass(frozen=True)
class _RoiJob:
    """One study's ROI loading, everything it needs picklable (it may run in a spawned process)."""

    study: Study
    preprocessing: dict
    task_spec: Any
    margin: int
    token_targets: bool
    feature_tokens: bool


def _study_rois(job: _RoiJob) -> tuple[int, list, list, np.ndarray | None]:
    """(samples per side of the inference cube, the nodules' cubes, their token-label cubes, their targets) of
    one study; targets ``None`` when it has no labelled nodule."""
    import dataclasses

    from ..prediction import check_centres_inside
    from ..transforms import Preprocessing, RoiInputs

    config = Preprocessing.from_config(job.preprocessing)
    nodules = read_nodules(job.study)
    if not nodules:
        return 0, [], [], None
    volume, mask = load_study_volumes(job.study)
    centres = nodule_centres(nodules, mask)
    check_centres_inside(centres, volume)
    n = RoiInputs(volume, config, centres).n  # the inference cube's samples per side
    # the same sample positions and 2·margin more: t = arange(N) - (N - 1) / 2 holds arange(n) - (n - 1) / 2
    size_mm = (n + 2 * job.margin) * config.roi.spacing_mm
    big = dataclasses.replace(config, roi=dataclasses.replace(config.roi, size_mm=size_mm))
    inputs = RoiInputs(volume, big, centres)
    assert inputs.n == n + 2 * job.margin, (inputs.n, n, job.margin)
    cubes = [inputs.cube(r) for r in range(len(centres))]
    tokens = []
    if job.token_targets:
        ids = np.array([int(x["id"]) for x in nodules])
        malignant = np.array([int(x["id"]) for x in nodules if int(x.get("malignancy", 0)) == 1] + [-1])
        shares = [RoiInputs(_binary_volume(mask, keep), big, centres) for keep in (ids, malignant)]
        if job.feature_tokens:
            features = _features_volume(job.study, volume)
            shares += [RoiInputs(_binary_volume(features, [label]), big, centres) for label in TOKEN_FEATURES]
        tokens = [np.stack([np.rint(255 * sh.cube(r)).astype(np.uint8) for sh in shares]) for r in range(len(ids))]
    return n, cubes, tokens, nodule_targets(job.task_spec, nodules)


STUDIES_PER_LOADER = 16  # a spawned loader costs seconds of imports; a study about half a second to read


def _loading_processes(threads: int, n_studies: int) -> int:
    """How many processes training reads its studies in: one per thread, when each gets enough studies to
    repay its start-up (``STUDIES_PER_LOADER``); else this one."""
    return threads if threads > 1 and n_studies >= STUDIES_PER_LOADER * threads else 1


def load_rois(
    studies: Sequence[Study],
    model,
    *,
    margin: int = 0,
    token_targets: bool = False,
    feature_tokens: bool = False,
    view_shapes: bool = False,
    progress: bool = True,
    what: str = "the data",
    workers: int = 1,
) -> RoiSet:
    """The ROI views of every labelled nodule of ``studies`` for ``model`` (its ROI preprocessing),
    cubes sampled ``margin`` samples larger on every side (the room for centre jitter); with
    ``token_targets`` also the nodule / malignant-nodule share of each sample (the token labels), and with
    ``feature_tokens`` after those the share of each nodule part of :data:`TOKEN_FEATURES` (spicules,
    lobulation, calcification, ground glass; from ``<name>_features.nii.gz``, which each study then needs),
    and with ``view_shapes`` (2D views, after both) what each view shows of its nodule's shape
    (:func:`view_shape_targets`). ``workers`` > 1 reads the studies in that many spawned processes (the
    same arrays, in the same order). MedvitInputError naming ``what`` when no study has a nodule or a
    features map is missing."""
    from tqdm.auto import tqdm

    from ..transforms import Preprocessing

    config = Preprocessing.from_config(model.preprocessing)
    pre = dict(model.preprocessing)
    jobs = [_RoiJob(study, pre, model.task_spec, margin, token_targets, feature_tokens) for study in studies]
    n = 0
    cubes, tokens, targets, study_idx = [], [], [], []
    with tqdm(total=len(jobs), desc="loading ROIs", unit="study", disable=not progress) as bar:
        for s, (size, study_cubes, study_tokens, study_targets) in enumerate(
            map_in_processes(_study_rois, jobs, workers)
        ):
            bar.update(1)
            if study_targets is None:
                continue
            n = size
            cubes += study_cubes
            tokens += study_tokens
            targets.append(study_targets)
            study_idx.append(np.full(len(study_targets), s))
    if not cubes:
        raise MedvitInputError(
            f"no labelled nodule in {what} ({len(studies)} studies): ROI mode needs the labels' nodules"
        )
    from ..volumetric_inputs import CUBE_VIEW

    views = (CUBE_VIEW,) if len(config.image_size) == 3 else tuple(config.roi.views)
    shapes = None
    if view_shapes and token_targets and feature_tokens and views != (CUBE_VIEW,):  # of the crop, not the margin
        inner = slice(margin, margin + n)
        per_nodule = [view_shape_targets(t[:, inner, inner, inner], views) for t in tokens]
        shapes = torch.from_numpy(np.concatenate(per_nodule))
    return RoiSet(
        config=config,
        views=views,
        n=n,
        margin=margin,
        cubes=np.stack(cubes),
        nodule_targets=torch.from_numpy(np.concatenate(targets)),
        study=np.concatenate(study_idx),
        grid=tuple(model.backbone.patch_embed.grid_size),
        token_cubes=np.stack(tokens) if token_targets else None,
        view_shapes=shapes,
    )


def roi_metrics(model, data: RoiSet, batch_size: int = 128) -> dict[str, Any]:
    """:func:`nodule_scores` of ``model`` on the un-jittered views of ``data`` (the model is put in eval mode)."""
    model.eval()
    raw = model_outputs(model, data.images, batch_size).numpy()
    return nodule_scores(model.task_spec, raw, data.nodule_targets.numpy(), len(data.views))


class TokenLabelHead(torch.nn.Module):
    """Training-only auxiliary head: each patch token predicts whether its patch lies in a nodule and
    in a malignant nodule (token labelling, Jiang et al., "All Tokens Matter", NeurIPS 2021), and with
    ``channels`` = 2 + len(TOKEN_FEATURES) also in which nodule parts. It teaches a small ViT trained from
    scratch where lesions (and their parts) are; it is not part of the saved model.

    With ``view_shapes`` > 0 (ROI mode, ``training.view_shape_weight``) a second linear layer reads the
    model's pooled token (what its heads read) and predicts what the view shows of its nodule's shape
    (:func:`view_shape_targets`), so that the representation the biomarker heads read carries it."""

    def __init__(self, model, channels: int = 2, view_shapes: int = 0):
        super().__init__()
        self.prefix = int(model.backbone.num_prefix_tokens)
        self.grid = tuple(model.backbone.patch_embed.grid_size)
        self.linear = torch.nn.Linear(model.backbone.embed_dim, channels)
        self.shapes = torch.nn.Linear(model.backbone.embed_dim, view_shapes) if view_shapes else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, P+N, D] final-norm tokens → [B, channels, gh, gw] (3D: [B, channels, gd, gh, gw]) logits."""
        logits = self.linear(tokens[:, self.prefix :])
        return logits.transpose(1, 2).reshape(len(tokens), self.linear.out_features, *self.grid)


def forward_with_tokens(model, x: torch.Tensor, pooled: bool = False):
    """The model's outputs and its final-norm tokens from one pass (same maths as ``model(x)``); with
    ``pooled`` also the pooled token the heads read."""
    tokens = model.backbone.forward_features(x)
    pool = model.backbone.forward_head(tokens, pre_logits=True)
    return (model.head(pool), tokens, pool) if pooled else (model.head(pool), tokens)


def task_loss(
    outputs: torch.Tensor, targets: torch.Tensor, kinds: Sequence[str], weights: dict[str, float] | None = None
) -> torch.Tensor:
    """BCE-with-logits on binary targets + MSE on normalised regression targets; NaN targets masked."""
    weights = weights or {"binary": 1.0, "regression": 1.0}
    binary = torch.tensor([k == "binary" for k in kinds], device=outputs.device)
    valid = ~torch.isnan(targets)
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    bce = F.binary_cross_entropy_with_logits(outputs, safe.clamp(0, 1), reduction="none")
    mse = (outputs - safe) ** 2
    loss = torch.zeros((), device=outputs.device)
    for mask, per, w in ((valid & binary, bce, weights["binary"]), (valid & ~binary, mse, weights["regression"])):
        if mask.any():
            loss = loss + w * per[mask].mean()
    return loss


def evaluate(model, data: SliceSet | RoiSet, batch_size: int = 128) -> dict[str, Any]:
    """Slice-level malignancy ROC AUC and accuracy at 0.5, and biomarker MAE (LIDC scale) per target
    (:func:`.scores.slice_metrics`; the model is put in eval mode); for a :class:`RoiSet` the same per
    nodule (:func:`roi_metrics`)."""
    if isinstance(data, RoiSet):
        return roi_metrics(model, data, batch_size)
    model.eval()
    out = slice_metrics(model, data.images, data.targets, data.has_nodule, batch_size)
    mae = out.pop("mae")
    return {**out, "mae": mae} if mae else out  # as checkpoints have always recorded it: "mae" last, if any


def split_studies(studies: Sequence[Study], val_fraction: float, seed: int) -> tuple[list[Study], list[Study]]:
    order = np.random.default_rng(seed).permutation(len(studies))
    n_val = max(1, int(round(val_fraction * len(studies)))) if len(studies) > 1 else 0
    val = [studies[i] for i in sorted(order[:n_val])]
    train = [studies[i] for i in sorted(order[n_val:])]
    return train, val


# ------------------------------------------------------------------------------------ the training run


@dataclass
class TrainResult:
    """What a training run gives: the best validation loss and the metrics of the kept checkpoint
    (``validation``: AUC, accuracy, MAE, …), the per-epoch ``history``, the selection rule and its best
    score, and the seconds spent (a resumed run adds the earlier ones)."""

    best_val_loss: float
    validation: dict[str, Any]
    history: list[dict[str, Any]]
    select_by: str
    best_score: float
    seconds: float


@dataclass
class _Run:
    """What one training run holds: the data, the model and its optimiser, and the progress so far
    (the resumable part: ``start_epoch``, ``best_loss``, ``best_score``, ``history``, ``elapsed_before``)."""

    recipe: dict
    seed: int
    epochs: int
    dev: torch.device
    model: Any
    token_head: TokenLabelHead
    train_set: SliceSet | RoiSet
    val_set: SliceSet | RoiSet
    n_val_studies: int
    optimizer: Any = None
    scheduler: Any = None
    steps_per_epoch: int = 0
    batch_size: int = 64
    select_by: str = "val_loss"
    start_epoch: int = 0
    best_loss: float = float("inf")
    best_score: float = -float("inf")
    history: list = field(default_factory=list)
    elapsed_before: float = 0.0
    best_metrics: dict = field(default_factory=dict)


def jitter_margin(model, recipe: dict) -> int:
    """The room for an ROI recipe's centre jitter (``roi_jitter_mm``, default 3): whole cube samples on every
    side, ``ceil(roi_jitter_mm / spacing_mm)``."""
    spacing = float(model.preprocessing["roi"]["spacing_mm"])
    return int(math.ceil(float(recipe.get("roi_jitter_mm", 3.0)) / spacing - 1e-9))


def _prepare(config: dict, data, val_data, seed: int, epochs: int, device: str, progress: bool) -> _Run:
    """Seed, studies (split unless ``val_data``), model, token head and the preprocessed slices."""
    from ..model import build_model, resolve_device

    recipe = dict(config.get("training", {}))
    torch.manual_seed(seed)
    if recipe.get("num_threads"):
        torch.set_num_threads(int(recipe["num_threads"]))
    dev = resolve_device(device)
    studies = find_studies(data)
    if val_data:
        train_studies, val_studies = studies, find_studies(val_data)
    else:
        train_studies, val_studies = split_studies(studies, float(recipe.get("val_fraction", 0.2)), seed)
    model = build_model(config).to(dev)
    if recipe.get("init_from"):
        _start_from(model, str(recipe["init_from"]))
    roi_mode = model.preprocessing.get("mode") == "roi"
    features = roi_mode and bool(recipe.get("token_label_features", False))
    shapes = roi_mode and bool(float(recipe.get("view_shape_weight", 0.0)))
    tokens = bool(float(recipe.get("token_label_weight", 0.0)))
    if shapes and not (tokens and features) or shapes and len(model.preprocessing["image_size"]) == 3:
        raise MedvitInputError(
            "training.view_shape_weight needs a 2D ROI recipe with token labels and feature token labels "
            "(token_label_weight > 0, token_label_features: true): the view shapes are read from them"
        )
    token_head = TokenLabelHead(model, 2 + len(TOKEN_FEATURES) * features, len(VIEW_SHAPE_TARGETS) * shapes)
    token_head = token_head.to(dev)
    if roi_mode:
        margin = jitter_margin(model, recipe)
        loaders = _loading_processes(int(recipe.get("num_threads") or 1), len(train_studies))
        train_set = load_rois(
            train_studies,
            model,
            margin=margin,
            token_targets=tokens,
            feature_tokens=tokens and features,
            view_shapes=shapes,
            progress=progress,
            what="the training data",
            workers=loaders,
        )
        val_set = load_rois(val_studies, model, progress=progress, what="the validation studies", workers=loaders)
        return _Run(recipe, seed, epochs, dev, model, token_head, train_set, val_set, len(val_studies))
    min_area = float(recipe.get("min_area_mm2", 10.0))
    train_set = load_slices(
        train_studies,
        model,
        min_area_mm2=min_area,
        seed=seed,
        progress=progress,
        background_ratio=float(recipe.get("background_ratio", 1.0)),
    )
    val_set = load_slices(val_studies, model, min_area_mm2=min_area, seed=seed + 1, all_slices=True, progress=progress)
    return _Run(recipe, seed, epochs, dev, model, token_head, train_set, val_set, len(val_studies))


def _start_from(model, checkpoint: str) -> None:
    """Copy the weights of ``checkpoint`` (a path or a shipped model's name; the same architecture and
    outputs) into ``model``: the recipe's ``init_from``, to continue training a model on new data.

    A one-channel checkpoint also starts a model that reads neighbouring slices (``adjacent_slices``, the
    same architecture otherwise): its patch embedding goes to the channel of offset 0 and the other channels
    start at zero, so the new model begins as exactly the old one on the centre slice (inflation)."""
    from ..errors import CheckpointError
    from ..model import load_model
    from ..transforms import ChannelRecipe

    start = load_model(checkpoint, device="cpu")
    state = start.state_dict()
    channels = ChannelRecipe.from_config(model.preprocessing.get("channels"))
    key = next((k for k, v in state.items() if k.endswith("patch_embed.proj.weight") and v.ndim == 4), None)
    target = model.state_dict().get(key) if key else None
    if channels.recipe == "adjacent_slices" and target is not None and state[key].shape[1] == 1:
        if target.shape[1] != len(channels.offsets) or target.shape[0] != state[key].shape[0]:
            raise CheckpointError(f"training.init_from {checkpoint!r}: its patch embedding does not fit the recipe's")
        inflated = torch.zeros_like(target)
        inflated[:, channels.centre] = state[key][:, 0]
        state = {**state, key: inflated}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc).strip())
        raise CheckpointError(f"training.init_from {checkpoint!r} does not fit the recipe's model: {first}") from None


def _optimise(run: _Run) -> None:
    """AdamW over the model and the token head; linear warm-up, then a cosine decay per step."""
    recipe = run.recipe
    run.batch_size = int(recipe.get("batch_size", 64))
    run.steps_per_epoch = math.ceil(len(run.train_set) / run.batch_size)
    run.optimizer = torch.optim.AdamW(
        [*run.model.parameters(), *run.token_head.parameters()],
        lr=float(recipe.get("lr", 1e-3)),
        weight_decay=float(recipe.get("weight_decay", 0.05)),
    )
    warmup = int(recipe.get("warmup_epochs", 2)) * run.steps_per_epoch
    total = run.epochs * run.steps_per_epoch

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lr_factor)
    # model selection: the lowest validation loss, or the highest value of a validation metric
    run.select_by = str(recipe.get("select_by", "val_loss"))


def _resume(run: _Run, state_dir: Path, out: Path) -> None:
    """Restore the model, optimiser, scheduler, RNG, token head and progress from ``state_dir``."""
    from ..model.checkpoint import load_model

    state = torch.load(state_dir / "state.pt", weights_only=True)
    run.model.load_state_dict(load_model(state_dir / "model", device=str(run.dev)).state_dict())
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if "token_head" in state:  # the training-only head is part of the resumable state, not of the model
        run.token_head.load_state_dict(state["token_head"])
    run.start_epoch, run.best_loss = int(state["epoch"]) + 1, float(state["best_loss"])
    run.best_score = float(state.get("best_score", _saved_score(out, run.select_by, run.best_loss)))
    run.elapsed_before = float(state.get("elapsed", 0.0))
    run.history = json.loads(state_dir.joinpath("history.json").read_text())


def _train_epoch(run: _Run, epoch: int, progress: bool) -> float:
    """One epoch over the shuffled training items (slices or ROI views); returns the mean training loss."""
    from tqdm.auto import tqdm

    recipe, dev, model = run.recipe, run.dev, run.model
    kinds = list(model.task_spec.score_kinds)
    weights = recipe.get("loss_weights")
    token_weight = float(recipe.get("token_label_weight", 0.0))
    token_pos_weight = torch.tensor(float(recipe.get("token_label_pos_weight", 1.0)), device=dev)
    shape_weight = float(recipe.get("view_shape_weight", 0.0)) if run.token_head.shapes is not None else 0.0
    model.train()
    order = torch.randperm(len(run.train_set))
    running = 0.0
    bar = tqdm(range(run.steps_per_epoch), desc=f"epoch {epoch + 1}/{run.epochs}", unit="batch", disable=not progress)
    for step in bar:
        idx = order[step * run.batch_size : (step + 1) * run.batch_size]
        x, y, tok = run.train_set.training_batch(idx, recipe, dev)  # augmented as the set's mode needs
        outputs, tokens, pooled = forward_with_tokens(model, x, pooled=True)
        loss = task_loss(outputs, y, kinds, weights)
        if shape_weight:  # what each view shows of its nodule's shape (unchanged by the augmentation)
            shapes = run.train_set.view_shapes[idx].to(dev)
            loss = loss + shape_weight * F.mse_loss(run.token_head.shapes(pooled), shapes)
        if token_weight and tok is not None:
            loss = loss + token_weight * F.binary_cross_entropy_with_logits(
                run.token_head(tokens), tok, pos_weight=token_pos_weight
            )
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.scheduler.step()
        running += loss.item()
        bar.set_postfix(loss=f"{running / (step + 1):.4f}")
    return running / run.steps_per_epoch


@torch.no_grad()
def _validation_loss(run: _Run) -> float:
    run.model.eval()
    kinds, weights, val = list(run.model.task_spec.score_kinds), run.recipe.get("loss_weights"), run.val_set
    losses = [
        float(
            task_loss(
                run.model(val.images[i : i + 256].to(run.dev)), val.targets[i : i + 256].to(run.dev), kinds, weights
            )
        )
        for i in range(0, len(val), 256)
    ]
    return float(np.mean(losses))


def _keep_if_best(run: _Run, epoch: int, val_loss: float, metrics: dict, config: dict, data, val_data, out) -> None:
    """Save the checkpoint to ``out`` when this epoch's selection score beats the best so far."""
    from ..model import save_checkpoint

    score = -val_loss if run.select_by == "val_loss" else float(metrics.get(run.select_by, float("nan")))
    run.best_loss = min(run.best_loss, val_loss)
    if not score > run.best_score:  # NaN never wins
        return
    run.best_score, run.best_metrics = score, metrics
    provenance = {
        "recipe": config.get("training", {}),
        "seed": run.seed,
        "epoch": epoch + 1,
        "train_data": str(data),
        "val_data": str(val_data or f"{run.n_val_studies} held-out studies of {data}"),
        **run.train_set.counts("train"),
        **run.val_set.counts("val"),
        "validation": metrics,
    }
    save_checkpoint(run.model, out, provenance=provenance)


def _save_state(run: _Run, epoch: int, state_dir: Path, elapsed: float) -> None:
    """The resumable state after ``epoch``: the model, optimiser, scheduler, RNG and history."""
    from ..model import save_checkpoint

    state_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(run.model, state_dir / "model")
    torch.save(
        {
            "epoch": epoch,
            "best_loss": run.best_loss,
            "best_score": run.best_score,
            "elapsed": elapsed,
            "optimizer": run.optimizer.state_dict(),
            "token_head": run.token_head.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        },
        state_dir / "state.tmp",
    )
    os.replace(state_dir / "state.tmp", state_dir / "state.pt")
    (state_dir / "history.json").write_text(json.dumps(run.history, indent=1))


def train(
    config: dict,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    val_data: str | None = None,
    resume: bool = False,
    epochs: int | None = None,
    seed: int | None = None,
    device: str = "auto",
    progress: bool = True,
) -> TrainResult:
    """Train a model from ``config`` (architecture, task_spec, preprocessing, training) on ``data``.

    Writes the best checkpoint (``training.select_by``: ``val_loss`` or a validation metric such as
    ``malignancy_auc``) to ``out`` and the resumable state to
    ``out/../<name>.last/``; returns the validation metrics of the best epoch.
    """
    recipe = dict(config.get("training", {}))
    seed = int(recipe.get("seed", 0) if seed is None else seed)
    epochs = int(recipe.get("epochs", 30) if epochs is None else epochs)
    out = Path(out)
    state_dir = out.parent / f".{out.name}.train_state"
    run = _prepare(config, data, val_data, seed, epochs, device, progress)
    _optimise(run)
    if resume and (state_dir / "state.pt").exists():
        _resume(run, state_dir, out)
    t_start = time.perf_counter()
    for epoch in range(run.start_epoch, epochs):
        train_loss = _train_epoch(run, epoch, progress)
        val_loss = _validation_loss(run)
        metrics = evaluate(run.model, run.val_set)
        run.history.append(
            {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_malignancy_auc": metrics.get("malignancy_auc"),
            }
        )
        _keep_if_best(run, epoch, val_loss, metrics, config, data, val_data, out)
        _save_state(run, epoch, state_dir, run.elapsed_before + time.perf_counter() - t_start)
        if progress:
            print(
                f"epoch {epoch + 1}: train {train_loss:.4f} val {val_loss:.4f} "
                f"auc {metrics.get('malignancy_auc', float('nan')):.3f}",
                flush=True,
            )
    return TrainResult(
        best_val_loss=run.best_loss,
        validation=run.best_metrics,
        history=run.history,
        select_by=run.select_by,
        best_score=run.best_score,
        seconds=run.elapsed_before + time.perf_counter() - t_start,
    )


def _saved_score(out: Path, select_by: str, best_loss: float) -> float:
    """The selection score of the checkpoint already at ``out`` (for a run resumed from an older state)."""
    if select_by == "val_loss":
        return -best_loss
    try:
        validation = json.loads((Path(out) / "config.json").read_text())["provenance"]["validation"]
        return float(validation[select_by])
    except (OSError, KeyError, ValueError, TypeError):
        return -float("inf")
