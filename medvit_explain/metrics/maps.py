"""Scores of the maps themselves: compactness, class sensitivity, and the correlations used by the
model-randomisation sanity check.

Maps are ``[N, T, h, w]`` (any resolution; the evaluation uses the raw token grid).
"""

from __future__ import annotations

from itertools import combinations

import torch
from torch import Tensor

__all__ = ["class_sensitivity", "compactness", "pearson", "spearman"]


def compactness(maps: Tensor, fraction: float = 0.05) -> Tensor:
    """Share of a map's pixels with ``|S| ≤ fraction · max|S|`` (higher = more compact), per map
    ``[..., h, w]`` → ``[...]``. A map that is 0 everywhere scores 1."""
    a = maps.float().abs().flatten(-2)
    return (a <= fraction * a.amax(-1, keepdim=True)).double().mean(-1)


def pearson(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """Pearson r between maps over the last two dims (``[..., h, w]`` → ``[...]``).

    When either map is constant r is undefined; it is set to 1 (the pair is not told apart), so a
    constant map never yields NaN."""
    a = a.double().flatten(-2)
    b = b.double().flatten(-2)
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    degenerate = (na <= eps) | (nb <= eps)
    r = (a * b).sum(-1) / (na * nb).clamp(min=eps)
    return torch.where(degenerate, torch.ones_like(r), r.clamp(-1, 1))


def _ranks(x: Tensor) -> Tensor:
    from scipy.stats import rankdata

    flat = x.double().flatten(-2).cpu().numpy()
    return torch.from_numpy(rankdata(flat, axis=-1)).reshape(x.shape)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation between maps over the last two dims (average ranks for ties).
    Both maps constant → 1 (nothing changed); one constant → 0 (its ranks carry no order)."""
    ra, rb = _ranks(a), _ranks(b)
    r = pearson(ra, rb)
    ca = ra.flatten(-2).amax(-1) == ra.flatten(-2).amin(-1)
    cb = rb.flatten(-2).amax(-1) == rb.flatten(-2).amin(-1)
    return torch.where(ca ^ cb, torch.zeros_like(r), r)


def class_sensitivity(maps: Tensor, names: list[str] | None = None) -> tuple[Tensor, dict[str, float]]:
    """``1 − |Pearson r|`` between the maps of every pair of targets on the same image.

    Args:
        maps: ``[N, T, h, w]`` with ``T ≥ 2``.
        names: target names for the pair keys (default ``"0"``, ``"1"``, …).

    Returns:
        (per image ``[N]``: the mean over pairs; per pair ``"a|b"``: the mean over images). Higher = the
        method's maps change more with the target (more class-discriminative); 0 for a method whose maps
        are the same for every target.
    """
    n, t = maps.shape[:2]
    names = names or [str(i) for i in range(t)]
    if t < 2:
        return torch.full((n,), float("nan"), dtype=torch.float64), {}
    pairs = {}
    per_image = torch.zeros(n, dtype=torch.float64)
    for i, j in combinations(range(t), 2):
        d = 1.0 - pearson(maps[:, i], maps[:, j]).abs()
        pairs[f"{names[i]}|{names[j]}"] = float(d.mean())
        per_image += d.cpu()
    return per_image / len(pairs), pairs
