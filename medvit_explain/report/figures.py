"""Report figures (matplotlib, Agg backend) rendered to PNG bytes.

Every function builds one figure, renders it and closes it: no pyplot state survives the call, and the
process's default backend is never switched (figures are created with ``Figure`` + ``FigureCanvasAgg``,
not ``pyplot``).

Maps are raw signed attributions, shown with a diverging colormap centred at 0: ``vmin = -v``,
``vmax = +v`` with ``v = max |map|`` over the shown slice of that method and target (a map that is 0
everywhere gets ``v = 1`` so the colour scale stays defined).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "CT_WINDOW",
    "MAP_CMAP",
    "PLANES",
    "display_plane",
    "plane_aspect",
    "probability_plot",
    "roi_probability_plot",
    "slice_grid",
    "symmetric_limit",
]

CT_WINDOW = (-1000.0, 400.0)  # HU shown from black to white (lung window of the LIDC experiments)
MAP_CMAP = "RdBu_r"  # diverging: red = evidence for the target, blue = against, white = 0
DPI = 100
PLANES = ("axial", "coronal", "sagittal")
_PLANE_AXES = {"axial": (1, 0), "coronal": (2, 0), "sagittal": (2, 1)}  # canonical axes of (rows, cols)


def _png(fig: Figure, dpi: int = DPI) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buffer, format="png", dpi=dpi)
    fig.clear()
    return buffer.getvalue()


def symmetric_limit(values: np.ndarray) -> float:
    """``max |values|`` over the finite entries (1.0 when that is 0 or nothing is finite)."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    v = float(np.max(np.abs(finite))) if finite.size else 0.0
    return v if v > 0 else 1.0


def probability_plot(
    slices: np.ndarray,
    prob: np.ndarray,
    top: Sequence[int],
    *,
    target: str = "malignancy",
    z_mm: np.ndarray | None = None,
) -> bytes:
    """Probability of ``target`` per slice (slice mode) with the ``top`` slice numbers marked.

    Args:
        slices: [S] displayed slice numbers (canonical, inferior → superior).
        prob: [S] probabilities in [0, 1].
        top: slice numbers to mark.
        z_mm: [S] optional slice positions (mm), shown on a secondary axis label.
    """
    slices = np.asarray(slices)
    prob = np.asarray(prob, dtype=np.float64)
    order = np.argsort(slices, kind="stable")
    fig = Figure(figsize=(9.0, 2.8))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(slices[order], prob[order], "-", color="#1f4e79", lw=1.5, marker="." if len(slices) < 80 else None)
    ax.axhline(0.5, color="0.6", lw=0.8, ls="--")
    by_slice = dict(zip(slices.tolist(), prob.tolist(), strict=True))
    for rank, s in enumerate(top, start=1):
        p = by_slice.get(int(s))
        if p is None:
            continue
        ax.plot([s], [p], "o", ms=8, mfc="none", mec="#c0392b", mew=2)
        # stagger the labels: the top slices are often neighbours
        ax.annotate(
            f"#{rank}: slice {int(s)}",
            (s, p),
            textcoords="offset points",
            xytext=(6, 8 + 12 * (rank - 1)),
            fontsize=8,
            color="#c0392b",
            arrowprops={"arrowstyle": "-", "color": "#c0392b", "lw": 0.6},
        )
    ax.set_xlim(slices.min() - 0.5, slices.max() + 0.5) if len(slices) else None
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("slice (inferior → superior)")
    ax.set_ylabel(f"P({target})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def roi_probability_plot(
    labels: Sequence[str],
    per_view: dict[str, np.ndarray],
    mean: np.ndarray,
    *,
    target: str = "malignancy",
    bar_label: str = "views averaged",
) -> bytes:
    """Probability of ``target`` per ROI: a bar for the view-averaged output (``bar_label``), a dot per view."""
    mean = np.asarray(mean, dtype=np.float64)
    x = np.arange(len(mean))
    fig = Figure(figsize=(max(5.5, 0.9 * len(mean) + 2.0), 2.8))
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(x, mean, color="#9dc3e6", edgecolor="#1f4e79", label=bar_label)
    markers = "os^dv<>"
    for i, (view, values) in enumerate(per_view.items()):
        ax.plot(x, values, markers[i % len(markers)], ls="none", ms=5, label=view)
    ax.axhline(0.5, color="0.6", lw=0.8, ls="--")
    ax.set_xticks(x, list(labels))
    ax.set_ylim(0, 1.3)  # headroom for the legend
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel(f"P({target})")
    ax.legend(fontsize=7, loc="upper center", ncols=min(4, len(per_view) + 1))
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _png(fig)


def display_plane(
    canonical: np.ndarray, plane: str, centre: Sequence[int], half: Sequence[int] | None = None
) -> np.ndarray:
    """The ``plane`` (axial, coronal or sagittal) through canonical voxel ``centre`` of a canonical (LPS)
    ``[x, y, z]`` array, as displayed ([rows, cols]): axial rows anterior→posterior, cols patient
    right→left; coronal rows superior→inferior, cols right→left; sagittal rows superior→inferior, cols
    anterior→posterior. ``half``: voxels kept each side of the centre along each canonical axis (None:
    the whole field of view). A view of ``canonical``, no copy."""
    from ..transforms import VIEW_NORMAL_AXIS, display_plane_at

    if half is None:
        index: list = [slice(None)] * 3
    else:
        index = [slice(max(int(c) - int(h), 0), int(c) + int(h) + 1) for c, h in zip(centre, half, strict=True)]
    normal = VIEW_NORMAL_AXIS[plane]
    index[normal] = slice(None)  # the window is in-plane; the plane itself is picked by its index
    return display_plane_at(canonical[tuple(index)], plane, int(centre[normal]))


def plane_aspect(canonical_spacing: Sequence[float], plane: str) -> float:
    """Pixel aspect (row spacing / column spacing) of :func:`display_plane`'s ``plane``, from the
    spacing along the canonical axes."""
    rows, cols = _PLANE_AXES[plane]
    return float(canonical_spacing[rows] / canonical_spacing[cols])


def slice_grid(
    ct: np.ndarray,
    maps: dict[str, dict[str, np.ndarray]],
    *,
    aspect: float = 1.0,
    title: str = "",
    ct_window: tuple[float, float] = CT_WINDOW,
    overlay: bool = True,
    cmap: str = MAP_CMAP,
) -> bytes:
    """One slice: the CT, then every method's map for every target.

    Rows are methods, columns are ``[CT] + targets``. Each map has its own symmetric colour range
    ``±max|map|`` over this slice and a colorbar. With ``overlay`` the map is drawn over the CT with an
    opacity that grows with ``|map| / max|map|`` (0 is transparent, so the anatomy shows through
    where the map is near 0); without it the map is drawn alone.

    Args:
        ct: [rows, cols] HU, already in display orientation.
        maps: ``{method: {target: [rows, cols] map}}`` (same shape as ``ct``).
        aspect: pixel height / width (row spacing / column spacing).
    """
    methods = list(maps)
    targets = list(next(iter(maps.values()))) if maps else []
    n_rows, n_cols = max(1, len(methods)), 1 + len(targets)
    rows, cols = ct.shape
    cell_h = 1.9
    cell_w = float(np.clip(cell_h * cols / (rows * aspect), 1.2, 3.2)) + 0.35  # + colorbar
    fig = Figure(figsize=(cell_w * n_cols, cell_h * n_rows + (0.45 if title else 0.15)))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    lo, hi = ct_window
    for r in range(n_rows):
        ax = axes[r, 0]
        ax.imshow(ct, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if r == 0:
            ax.set_title("CT", fontsize=11)
        if methods:
            ax.set_ylabel(methods[r], fontsize=12, fontweight="bold")
        for c, target in enumerate(targets, start=1):
            ax = axes[r, c]
            m = np.asarray(maps[methods[r]][target], dtype=np.float64)
            v = symmetric_limit(m)
            if overlay:
                ax.imshow(ct, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
                alpha = np.clip(np.abs(np.nan_to_num(m)) / v, 0.0, 1.0) * 0.85
                im = ax.imshow(m, cmap=cmap, vmin=-v, vmax=v, aspect=aspect, interpolation="nearest", alpha=alpha)
            else:
                im = ax.imshow(m, cmap=cmap, vmin=-v, vmax=v, aspect=aspect, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(target, fontsize=11)
            cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, ticks=[-v, 0.0, v])
            cb.solids.set_alpha(1.0)
            cb.ax.set_yticklabels([f"{-v:.2g}", "0", f"{v:.2g}"], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11, x=0.01, ha="left")
    fig.tight_layout(pad=0.4, h_pad=0.6, w_pad=0.4)
    return _png(fig)
