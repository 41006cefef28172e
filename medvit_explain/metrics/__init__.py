"""Measuring explanations: localization, faithfulness, compactness, class sensitivity, randomisation.

Definitions follow DESIGN.md ("Evaluation definitions"); each module cites its source. The dataset-level
driver is :func:`medvit_explain.evaluate.evaluate_explanations`.
"""

from __future__ import annotations

from .compat import explain_func
from .faithfulness import abpc, auc, perturbation_curves, removal_masks, score_outputs
from .localization import (
    SCORES,
    binary_scores,
    bounding_boxes,
    evidence_share,
    localization_scores,
    minmax,
    pointing_game,
)
from .maps import class_sensitivity, compactness, pearson, spearman
from .masks import body_mask, slice_masks
from .randomization import randomize_top_blocks

__all__ = [
    "SCORES",
    "abpc",
    "auc",
    "binary_scores",
    "body_mask",
    "bounding_boxes",
    "class_sensitivity",
    "compactness",
    "evidence_share",
    "explain_func",
    "localization_scores",
    "minmax",
    "pearson",
    "perturbation_curves",
    "pointing_game",
    "randomize_top_blocks",
    "removal_masks",
    "score_outputs",
    "slice_masks",
    "spearman",
]
