"""Localization of the lesion by a map (the AG-CAM protocol, DESIGN.md "Evaluation definitions").

Leem & Seo (AAAI 2024) upsample the map bilinearly to the image, min–max it, binarise at 0.5 and compare
the binary map with the ground truth: pixel accuracy, IoU, Dice, precision and recall, each as
``(x + 1e-5) / (y + 1e-5)`` and averaged over images. CT has lesion masks, so the masks are compared
directly; the box variant (the paper's ImageNet boxes) replaces each lesion mask by its filled bounding
box. Also: the pointing game (is the map's maximum inside the lesion) and the share of the map's positive
mass inside a region.

All functions take maps already at image resolution ``[N, H, W]`` (torch, any float dtype) and boolean
masks ``[N, H, W]`` (torch or numpy) and return one value per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SCORES",
    "SMOOTH",
    "binary_scores",
    "bounding_boxes",
    "largest_region_boxes",
    "evidence_share",
    "localization_scores",
    "minmax",
    "pointing_game",
]

SMOOTH = 1e-5
SCORES = ("pixel_accuracy", "iou", "dice", "precision", "recall")
DEFAULT_SWEEP = tuple(np.round(np.arange(0.1, 0.91, 0.1), 2).tolist())


def _bool(mask) -> Tensor:
    return torch.as_tensor(np.asarray(mask) if not isinstance(mask, Tensor) else mask).bool()


def minmax(maps: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-image min–max to [0, 1] over the last two dims with an epsilon (a constant map → zeros)."""
    flat = maps.float().flatten(-2)
    lo = flat.amin(-1)[..., None, None]
    hi = flat.amax(-1)[..., None, None]
    return (maps.float() - lo) / (hi - lo + eps)


def binary_scores(pred: Tensor, mask: Tensor, smooth: float = SMOOTH) -> dict[str, Tensor]:
    """Pixel accuracy, IoU, Dice, precision, recall of binary ``pred`` against ``mask`` ([N, H, W] each),
    each ``(x + smooth) / (y + smooth)``; [N] float64 per score."""
    pred, mask = _bool(pred).flatten(1), _bool(mask).flatten(1)
    tp = (pred & mask).sum(1).double()
    fp = (pred & ~mask).sum(1).double()
    fn = (~pred & mask).sum(1).double()
    tn = (~pred & ~mask).sum(1).double()
    return {
        "pixel_accuracy": (tp + tn + smooth) / (tp + tn + fp + fn + smooth),
        "iou": (tp + smooth) / (tp + fp + fn + smooth),
        "dice": (2 * tp + smooth) / (2 * tp + fp + fn + smooth),
        "precision": (tp + smooth) / (tp + fp + smooth),
        "recall": (tp + smooth) / (tp + fn + smooth),
    }


def bounding_boxes(mask: Tensor) -> Tensor:
    """Each image's mask replaced by its filled bounding box ([N, H, W] bool; an empty mask stays empty)."""
    mask = _bool(mask)
    rows, cols = mask.any(2), mask.any(1)  # [N, H], [N, W]
    out = torch.zeros_like(mask)
    for i in range(len(mask)):
        r, c = torch.nonzero(rows[i]).flatten(), torch.nonzero(cols[i]).flatten()
        if len(r) and len(c):
            out[i, r[0] : r[-1] + 1, c[0] : c[-1] + 1] = True
    return out


def largest_region_boxes(binary: Tensor) -> Tensor:
    """Each image's binary map replaced by the filled bounding box of its largest connected region
    (8-connected; ties: the first found), the box weakly-supervised localization draws from a map's
    contours (the AG-CAM paper's protocol); an empty map stays empty. [N, H, W] bool."""
    from scipy import ndimage

    binary = _bool(binary)
    out = torch.zeros_like(binary)
    structure = np.ones((3, 3), dtype=bool)
    for i, plane in enumerate(binary.numpy()):
        labels, n = ndimage.label(plane, structure=structure)
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel())[1:]
        rows, cols = ndimage.find_objects(labels)[int(np.argmax(sizes))]
        out[i, rows, cols] = True
    return out


def pointing_game(maps: Tensor, mask: Tensor) -> Tensor:
    """[N] bool: the map's maximum lies inside ``mask`` (any pixel attaining the maximum counts).
    A constant map points nowhere (a miss)."""
    mask = _bool(mask).flatten(1)
    flat = maps.float().flatten(1)
    hi, lo = flat.amax(1), flat.amin(1)
    at_max = flat >= hi[:, None]
    return (at_max & mask).any(1) & (hi > lo)


def evidence_share(maps: Tensor, region: Tensor) -> Tensor:
    """[N] share of the positive mass ``Σ max(S, 0)`` that lies inside ``region`` (0 when the map has no
    positive mass, never NaN)."""
    pos = maps.float().clamp(min=0).flatten(1).double()
    inside = (pos * _bool(region).flatten(1)).sum(1)
    total = pos.sum(1)
    return torch.where(total > 0, inside / total.clamp(min=1e-300), torch.zeros_like(total))


def localization_scores(
    maps: Tensor,
    mask,
    *,
    threshold: float = 0.5,
    sweep: Sequence[float] = DEFAULT_SWEEP,
    lungs=None,
    eps: float = 1e-8,
    map_boxes: bool = False,
) -> dict[str, Tensor]:
    """Every localization score per image ([N] each) for maps ``[N, H, W]`` at image resolution.

    Keys: the :data:`SCORES` at ``threshold`` against the mask, the same with a ``box_`` prefix against
    the bounding boxes (the binarised map against the lesion's box; with ``map_boxes``, as the AG-CAM
    paper: the box of the binarised map's largest region against the lesion's box), ``dice@t`` /
    ``iou@t`` for each ``t`` of ``sweep``, ``pointing_game`` (0/1), ``evidence_in_nodule`` and (with
    ``lungs``) ``evidence_in_lungs``.
    """
    mask = _bool(mask)
    norm = minmax(maps, eps)
    out: dict[str, Tensor] = {}
    pred = norm >= threshold
    out.update(binary_scores(pred, mask))
    boxed = largest_region_boxes(pred) if map_boxes else pred
    out.update({f"box_{k}": v for k, v in binary_scores(boxed, bounding_boxes(mask)).items()})
    for t in sweep:
        scores = binary_scores(norm >= t, mask)
        out[f"dice@{t:g}"] = scores["dice"]
        out[f"iou@{t:g}"] = scores["iou"]
    out["pointing_game"] = pointing_game(maps, mask).double()
    out["evidence_in_nodule"] = evidence_share(maps, mask)
    if lungs is not None:
        out["evidence_in_lungs"] = evidence_share(maps, _bool(lungs))
    return out
