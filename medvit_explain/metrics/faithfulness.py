"""Faithfulness by pixel removal: MoRF / LeRF curves, ABPC, deletion and insertion AUCs.

Samek et al. (2017), as used by the CDAM paper: pixels are removed in the order of the map (most
relevant first, MoRF; least relevant first, LeRF) in ``steps`` equal steps from 0 % to 100 %; a removed
pixel takes the value ``fill`` (every channel). The score is the target's probability (binary targets)
or its value on the target's scale (regression). ABPC = AUC(LeRF) − AUC(MoRF) (trapezoid on [0, 1]);
higher = the map ranks pixels by their effect on the output. Deletion AUC = AUC(MoRF) (lower is better).
Insertion (start from the fully removed image, put back the most relevant pixels first) passes through
exactly the LeRF images in reverse, so with equal steps its AUC equals AUC(LeRF) (higher is better).

Ties in the map are broken by pixel order (stable sort), so a constant map gives identical MoRF and LeRF
curves and ABPC = 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["abpc", "auc", "perturbation_curves", "removal_masks", "score_outputs"]


def auc(curves: np.ndarray) -> np.ndarray:
    """Trapezoid area of curves ``[..., S]`` sampled at ``S`` equal steps over [0, 1]."""
    curves = np.asarray(curves, dtype=np.float64)
    dx = 1.0 / (curves.shape[-1] - 1)
    return dx * (curves[..., 1:] + curves[..., :-1]).sum(-1) / 2.0


def abpc(morf: np.ndarray, lerf: np.ndarray) -> np.ndarray:
    """AUC(LeRF) − AUC(MoRF) per curve."""
    return auc(lerf) - auc(morf)


def score_outputs(outputs: Tensor, task_spec, target_idx: Sequence[int]) -> Tensor:
    """Raw outputs ``[M, K]`` → scores ``[M, len(target_idx)]``: sigmoid(logit) for binary targets, the
    value on the target's scale (``output · std + mean``) for regression targets."""
    cols = []
    for k in target_idx:
        target = task_spec.targets[k]
        x = outputs[:, k].float()
        cols.append(torch.sigmoid(x) if target.probability else x * target.std + target.mean)
    return torch.stack(cols, 1)


def removal_masks(maps: Tensor, steps: int = 11) -> tuple[Tensor, Tensor]:
    """Which pixels are removed at each step: MoRF and LeRF masks ``[N, steps, H, W]`` (bool) for maps
    ``[N, H, W]``; step ``s`` removes ``round(s / (steps - 1) · H·W)`` pixels."""
    n, h, w = maps.shape
    flat = maps.float().reshape(n, -1)
    p = flat.shape[1]
    counts = torch.round(torch.linspace(0, 1, steps, device=maps.device) * p).long()  # [S]
    out = []
    for order in (torch.argsort(-flat, dim=1, stable=True), torch.argsort(flat, dim=1, stable=True)):
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(p, device=maps.device).expand(n, p))
        out.append((rank[:, None, :] < counts[None, :, None]).reshape(n, steps, h, w))
    return out[0], out[1]


@torch.no_grad()
def perturbation_curves(
    forward: Callable[[Tensor], Tensor],
    images: Tensor,
    maps: Tensor,
    *,
    steps: int = 11,
    fill: float | Tensor = 0.5,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """MoRF and LeRF curves ``[N, T, steps]`` (numpy float64).

    Args:
        forward: images ``[M, C, H, W]`` → scores ``[M, T]`` (column ``t`` scores target ``t``).
        images: ``[N, C, H, W]`` model inputs.
        maps: ``[N, T, H, W]`` maps at image resolution; target ``t``'s curve removes pixels by map ``t``
            and reads score column ``t``.
        fill: the value a removed pixel takes (model input units): a number, or one per channel ``[C, 1, 1]``.
        batch_size: perturbed images per forward call (all steps, both orders and all targets of a few
            images go through together).

    The unperturbed (0 %) and fully removed (100 %) images are shared by every target and both orders,
    so each image costs ``2 + 2 · T · (steps − 2)`` rows, evaluated in large batches.
    """
    n, t_count, h, w = maps.shape
    if images.shape[0] != n or tuple(images.shape[-2:]) != (h, w):
        raise ValueError(f"expected maps [N, T, H, W] matching images {tuple(images.shape)}, got {tuple(maps.shape)}")
    inner = steps - 2
    rows_per_image = 2 + 2 * t_count * inner
    per_chunk = max(1, batch_size // rows_per_image)
    morf = np.zeros((n, t_count, steps))
    lerf = np.zeros((n, t_count, steps))
    for start in range(0, n, per_chunk):
        x = images[start : start + per_chunk]
        m = maps[start : start + per_chunk].to(x.device)
        b = len(x)
        mo, le = removal_masks(m.reshape(b * t_count, h, w), steps)  # [b·T, S, H, W]
        removed = torch.cat([mo[:, 1:-1], le[:, 1:-1]], 1).reshape(b, t_count * 2 * inner, 1, h, w)
        value = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
        perturbed = torch.where(removed, value, x[:, None])
        ends = torch.stack([x, value.expand_as(x)], 1)  # [b, 2, C, H, W]
        batch = torch.cat([ends, perturbed], 1).flatten(0, 1)  # [b · rows, C, H, W]
        scores = torch.cat([forward(batch[i : i + batch_size]) for i in range(0, len(batch), batch_size)])
        scores = scores.reshape(b, rows_per_image, t_count).double().cpu().numpy()
        first, last = scores[:, 0], scores[:, 1]  # [b, T]
        inner_scores = scores[:, 2:].reshape(b, t_count, 2, inner, t_count)
        idx = np.arange(t_count)
        own = inner_scores[:, idx, :, :, idx]  # [T, b, 2, inner]: target t's curve reads column t
        own = np.moveaxis(own, 0, 1)  # [b, T, 2, inner]
        for curves, o in ((morf, 0), (lerf, 1)):
            curves[start : start + b, :, 0] = first
            curves[start : start + b, :, -1] = last
            curves[start : start + b, :, 1:-1] = own[:, :, o]
    return morf, lerf
