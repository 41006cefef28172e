"""HTML for ``evaluation.html`` (explanation metrics) and ``audit.html`` (dataset audit), the files
beside them (``metrics.json``; ``audit.csv``, ``audit.json``) and the evaluation's text tables.

The workflows (:mod:`medvit_explain.workflows.evaluate`, ``.audit``) compute typed results; this module
renders what it is given and never imports a workflow.

Self-contained like the explanation report (inline CSS, base64 PNG figures, escaped text); figures are
drawn with ``Figure`` + ``FigureCanvasAgg`` (no pyplot state).
"""

from __future__ import annotations

import csv
import datetime as _dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..errors import MedvitInputError
from ..io.writer import atomic_path
from ..vocabulary import to_json
from . import figures
from .html import _CSS, _e, _fmt, _img, _kv, _table

__all__ = [
    "format_table",
    "ceiling_line",
    "markdown_table",
    "render_audit",
    "render_evaluation",
    "study_figure",
    "table_rows",
    "write_audit",
    "write_evaluation",
]

_LOWER_IS_BETTER = {"deletion_auc", "rand_rho"}


def _page(title: str, body: Sequence[str]) -> str:
    generated = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    head = [f"<h1>{_e(title)}</h1>", f'<div class="sub">generated {_e(generated)} &middot; medvit-explain</div>']
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{_e(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(head + list(body)) + "\n</body></html>\n"
    )


# ---------------------------------------------------------------------------------------- figures
def bar_panels(rows: list[dict[str, Any]], keys: Sequence[str]) -> bytes:
    """One horizontal bar chart per metric (methods on the y axis)."""
    methods = [r["method"] for r in rows]
    n = len(keys)
    cols = min(4, n)
    nrows = (n + cols - 1) // cols
    fig = Figure(figsize=(3.2 * cols, 0.28 * len(methods) * nrows + 1.0 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, cols, squeeze=False)).ravel()
    y = np.arange(len(methods))
    for ax, key in zip(axes, keys, strict=False):
        values = np.array([np.nan if r[key] is None else float(r[key]) for r in rows], dtype=float)
        colours = ["#c0392b" if m in ("cdam", "agcam") else "#7f9fbf" for m in methods]
        ax.barh(y, np.nan_to_num(values), color=colours)
        ax.set_yticks(y, methods if ax in axes[::cols] else [""] * len(methods), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(key + (" (lower = better)" if key in _LOWER_IS_BETTER else ""), fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.grid(alpha=0.3, axis="x")
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    return figures._png(fig)


def curve_plot(curves: dict[str, dict[str, list[float]]], target: str) -> bytes:
    """Mean MoRF (solid) and LeRF (dashed) curves of every method for ``target``."""
    fig = Figure(figsize=(9.0, 3.2))
    ax1, ax2 = fig.subplots(1, 2)
    for method, per_target in curves.items():
        c = per_target.get(target)
        if not c:
            continue
        x = np.linspace(0, 100, len(c["morf"]))
        lw = 2.2 if method in ("cdam", "agcam") else 1.0
        ax1.plot(x, c["morf"], lw=lw, label=method)
        ax2.plot(x, c["lerf"], lw=lw, ls="--", label=method)
    for ax, name in ((ax1, "MoRF (most relevant removed first)"), (ax2, "LeRF (least relevant first)")):
        ax.set_xlabel("pixels removed (%)")
        ax.set_ylabel(f"score of {target}")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=7, ncols=2)
    fig.tight_layout()
    return figures._png(fig)


def sweep_plot(sweep: dict[str, dict[str, list[float]]], ceiling: dict[str, list[float]] | None = None) -> bytes:
    """Dice against the threshold for each method; ``ceiling`` (a sweep of the nodule mask on the token
    grid) dashed and grey."""
    fig = Figure(figsize=(5.5, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    for method, s in sweep.items():
        ax.plot(s["thresholds"], s["dice"], marker=".", lw=2.2 if method in ("cdam", "agcam") else 1.0, label=method)
    if ceiling:
        ax.plot(ceiling["thresholds"], ceiling["dice"], ls="--", color="0.4", lw=1.2, label="mask on token grid")
    ax.set_xlabel("binarisation threshold (min–max map)")
    ax.set_ylabel("Dice vs nodule mask")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncols=2)
    fig.tight_layout()
    return figures._png(fig)


def example_grid(examples) -> bytes:
    """Rows: example slices; columns: the image with the nodule outlined, then each method's map
    (``examples``: ``images``, ``nodule`` [E, H, W] and ``maps`` {method: [E, H, W]})."""
    images, nodule, maps = examples.images, examples.nodule, examples.maps
    methods = list(maps)
    n = len(images)
    fig = Figure(figsize=(1.6 * (1 + len(methods)), 1.7 * max(1, n)))
    axes = fig.subplots(max(1, n), 1 + len(methods), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(images[i], cmap="gray", vmin=0, vmax=1)
        axes[i, 0].contour(nodule[i].astype(float), levels=[0.5], colors="#f1c40f", linewidths=0.8)
        for j, m in enumerate(methods, start=1):
            v = figures.symmetric_limit(maps[m][i])
            axes[i, j].imshow(maps[m][i], cmap=figures.MAP_CMAP, vmin=-v, vmax=v)
            axes[i, j].contour(nodule[i].astype(float), levels=[0.5], colors="k", linewidths=0.6)
            if i == 0:
                axes[i, j].set_title(m, fontsize=8)
        if i == 0:
            axes[i, 0].set_title("input + nodule", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(pad=0.3)
    return figures._png(fig)


def roc_pr_plot(curves: dict[str, dict[str, Any]]) -> bytes:
    """ROC and precision–recall curves for each level (``{"study": {...}, "slice": {...}}``)."""
    fig = Figure(figsize=(9.0, 3.4))
    ax1, ax2 = fig.subplots(1, 2)
    for level, c in curves.items():
        if c.get("fpr") is None:
            continue
        ax1.plot(c["fpr"], c["tpr"], drawstyle="steps-post", label=f"{level} (AUC {_fmt(c['auc'], 3)})")
        ax2.plot(c["recall"], c["precision"], drawstyle="steps-post", label=f"{level} (AP {_fmt(c['ap'], 3)})")
    ax1.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    ax1.set_xlabel("1 − specificity")
    ax1.set_ylabel("sensitivity")
    ax1.set_title("ROC", fontsize=10)
    ax2.set_xlabel("recall")
    ax2.set_ylabel("precision")
    ax2.set_title("precision–recall", fontsize=10)
    for ax in (ax1, ax2):
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right" if ax is ax1 else "lower left")
    fig.tight_layout()
    return figures._png(fig)


def reliability_plot(calibration: dict[str, dict[str, Any]]) -> bytes:
    fig = Figure(figsize=(4.6, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--", label="perfect")
    for level, c in calibration.items():
        conf, acc, count = (np.asarray(c[k], dtype=float) for k in ("confidence", "frequency", "count"))
        keep = count > 0
        ax.plot(conf[keep], acc[keep], marker="o", label=f"{level} (ECE {_fmt(c['ece'], 3)})")
    ax.set_xlabel("mean predicted probability (bin)")
    ax.set_ylabel("observed frequency of malignancy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figures._png(fig)


def study_figure(
    ct: np.ndarray,
    maps: dict[str, np.ndarray],
    nodule: np.ndarray | None,
    body: np.ndarray | None,
    *,
    aspect: float = 1.0,
    title: str = "",
) -> bytes:
    """One slice of a study: the CT with the nodule (yellow) and body (cyan) outlines, then each method's
    map over the CT (diverging, ±max|map|)."""
    lo, hi = figures.CT_WINDOW
    fig = Figure(figsize=(2.6 * (1 + len(maps)), 3.1))
    axes = fig.subplots(1, 1 + len(maps), squeeze=False)[0]
    axes[0].imshow(ct, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
    axes[0].set_title("CT", fontsize=9)
    for ax, (name, m) in zip(axes[1:], maps.items(), strict=True):
        v = figures.symmetric_limit(m)
        ax.imshow(ct, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        alpha = np.clip(np.abs(np.nan_to_num(m)) / v, 0, 1) * 0.85
        ax.imshow(m, cmap=figures.MAP_CMAP, vmin=-v, vmax=v, aspect=aspect, alpha=alpha, interpolation="nearest")
        ax.set_title(name, fontsize=9)
    for ax in axes:
        if nodule is not None and nodule.any():
            ax.contour(nodule.astype(float), levels=[0.5], colors="#f1c40f", linewidths=1.0)
        if body is not None and body.any():
            ax.contour(body.astype(float), levels=[0.5], colors="#17becf", linewidths=0.6)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9, x=0.01, ha="left")
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 0.92 if title else 1))
    return figures._png(fig)


# ---------------------------------------------------------------------------------------- evaluation
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
                "dice_malig": _or_nan(loc.get("dice_malignant")),
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


def ceiling_line(metrics: dict[str, Any]) -> str | None:
    """One sentence on the token-grid ceiling of the localization scores (None without one)."""
    ref = metrics.get("token_grid_reference")
    if not ref:
        return None
    loc = ref["localization"]
    gh, gw = ref["grid"]
    malig = loc.get("dice_malignant")
    return (
        f"ceiling on the {gh} x {gw} token grid (the nodule mask averaged over each token's patch, scored like "
        f"a map): Dice {_cell(_or_nan(loc.get('dice')))}"
        + ("" if malig is None else f", dice_malig {_cell(float(malig))}")
        + f", IoU {_cell(_or_nan(loc.get('iou')))}"
    )


def _or_nan(v) -> float:
    return float("nan") if v is None else float(v)


def _cell(v) -> str:
    if isinstance(v, float):
        return "nan" if not np.isfinite(v) else f"{v:.3f}"
    return str(v)


def format_table(metrics: dict[str, Any]) -> str:
    """A plain-text method × metric table (what the CLI prints and the README shows); for an ROI model the
    target-specific localization table."""
    if metrics.get("mode") == "roi":
        return format_rows(target_localization_rows(metrics))
    return format_rows(table_rows(metrics))


def markdown_table(metrics: dict[str, Any]) -> str:
    """:func:`table_rows` as a Markdown table (for the README)."""
    rows = table_rows(metrics)
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r[h]) for h in header) + " |")
    return "\n".join(lines)


def _evaluation_cards(m: dict[str, Any]) -> list[str]:
    """The data, model and settings cards at the top of ``evaluation.html``."""
    settings, model = m["settings"], m["model"]
    data = [
        ("data", settings["data"]),
        ("studies", m["n_studies"]),
        ("explained nodule slices", m["n_slices"]),
        ("nodules in them", m["n_nodules"]),
        ("slices scored by the model", m["n_model_slices"]),
        ("seed", m["seed"]),
    ]
    scores = [
        ("malignancy ROC AUC", _fmt(model.get("malignancy_auc"), 3)),
        ("accuracy at 0.5", _fmt(model.get("malignancy_accuracy"), 3)),
        ("AUC on nodule slices", _fmt(model.get("malignancy_auc_nodule_slices"), 3)),
        *[(f"MAE {k}", _fmt(v, 3)) for k, v in (model.get("biomarker_mae") or {}).items()],
    ]
    return [
        '<div class="cards">',
        '<div class="card"><h4>Data</h4>' + _kv(data) + "</div>",
        '<div class="card"><h4>Model (all labelled slices)</h4>' + _kv(scores) + "</div>",
        '<div class="card"><h4>Settings</h4>' + _kv([(k, v) for k, v in settings.items() if k != "data"]) + "</div>",
        "</div>",
    ]


def _evaluation_summary(m: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """The method × metric table with its definitions, the sanity flag and the bar panels."""
    settings = m["settings"]
    primary = settings["localization_target"]
    header = list(rows[0])
    agcam = settings.get("protocol") == "agcam"
    which = "correctly classified nodule slices" if agcam else "nodule slices"
    boxes = (
        "box_: the box of the binarised map's largest region against the nodule's box, the AG-CAM paper's protocol"
        if agcam
        else "box_: the binarised map against the nodule's bounding box"
    )
    body = [
        "<h2>Summary (method × metric)</h2>",
        '<p class="note">Localization: the predicted-class map of '
        f"{_e(primary)} on {which}, bilinear to the input, min–max, binarised at "
        f"{_e(settings['threshold'])}, against the nodule mask ({boxes}); dice_malig = the Dice on the slices "
        "through a malignant nodule only; pointing = map maximum "
        "inside the nodule; ev_nodule / ev_lungs = share of the positive map mass inside the nodule / lungs. "
        f"abpc_{_e(primary)} = AUC(LeRF) − AUC(MoRF) on P({_e(primary)}), removed pixels set to "
        f"{_e(settings['fill'])} (higher = more faithful); compact = "
        "share of |S| ≤ 5 % of max|S|; class_sens = 1 − |Pearson r| between targets' maps (0 for a "
        "class-agnostic method); rand_rho = Spearman ρ between the maps of the trained model and of the model "
        "with its top blocks re-initialised (lower = the method depends on the learned weights; flagged when "
        f"&gt; {_e(m['settings']['randomization_flag_above'])}).</p>",
        _table(header, [[r[h] for h in header] for r in rows], left=1),
    ]
    ceiling = ceiling_line(m)
    if ceiling:
        body.append(f'<p class="note">{_e(ceiling)}</p>')
    if m.get("randomization_flagged"):
        body.append(
            f'<p class="hot">Sanity check flagged (maps barely change after randomisation): '
            f"{_e(', '.join(m['randomization_flagged']))}</p>"
        )
    return body + [_img(bar_panels(rows, header[1:]), "metrics per method")]


def _evaluation_details(m: dict[str, Any]) -> list[str]:
    """Localization sweep, faithfulness tables and curves, randomisation cascade and timings."""
    ceiling = (m.get("token_grid_reference") or {}).get("localization_sweep")
    body = [
        "<h2>Localization threshold sweep</h2>",
        _img(sweep_plot(m["localization_sweep"], ceiling), "Dice vs threshold"),
    ]
    loc_keys = list(next(iter(m["localization"].values())))
    body.append(_table(["method", *loc_keys], [[k, *v.values()] for k, v in m["localization"].items()], left=1))
    body.append("<h2>Faithfulness</h2>")
    for target in m["targets"][:1]:
        body.append(_img(curve_plot(m["curves"], target), f"perturbation curves for {target}"))
    targets = m["targets"]
    for key, label in (
        ("abpc", "ABPC (higher = better)"),
        ("deletion_auc", "Deletion AUC = AUC(MoRF) (lower = better)"),
        ("insertion_auc", "Insertion AUC = AUC(LeRF) (higher = better)"),
    ):
        body.append(f"<h3>{_e(label)}</h3>")
        body.append(
            _table(["method", *targets], [[k, *[v.get(t) for t in targets]] for k, v in m[key].items()], left=1)
        )
    body.append(
        '<p class="note">Binary targets are scored on their probability, regression targets on their '
        "value on the LIDC scale (so their ABPC is in scale units).</p>"
    )
    return body + [
        "<h2>Model randomisation (cascading)</h2>",
        _table(
            ["method", *[f"top {k} block(s)" for k in next(iter(m["randomization_cascade"].values()))]],
            [[k, *v.values()] for k, v in m["randomization_cascade"].items()],
            left=1,
        ),
        "<h2>Timings (s)</h2>",
        _table(["method", "seconds"], list(m["timings_s"].items()), left=1),
    ]


def target_localization_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method × target with a feature of its own: the share of the target's positive evidence
    on that feature (``own``), the malignancy map's share on it (``malignancy``), the feature's share of the
    nodule's area (chance) and the number of views measured."""
    reference = metrics["settings"].get("reference_target", "malignancy")
    rows = []
    for method, per_target in metrics.get("target_localization", {}).items():
        for target, v in per_target.items():
            rows.append(
                {
                    "method": method,
                    "target": target,
                    "feature": v["feature"],
                    "own": v["own"] if v["own"] is not None else float("nan"),
                    reference: v[reference] if v[reference] is not None else float("nan"),
                    "area": v["area"] if v["area"] is not None else float("nan"),
                    "n": v["n"],
                }
            )
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """Rows of dicts as a plain-text table."""
    if not rows:
        return "(nothing measured)"
    header = list(rows[0])
    widths = [max(len(str(h)), *(len(_cell(r[h])) for r in rows)) for h in header]
    lines = ["  ".join(str(h).ljust(wd) for h, wd in zip(header, widths, strict=True))]
    lines += ["  ".join(_cell(r[h]).ljust(wd) for h, wd in zip(header, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def render_roi_evaluation(result) -> str:
    """``evaluation.html`` for an ROI model's :class:`~medvit_explain.workflows.roi_evaluation.RoiEvaluationResult`."""
    m = result.metrics
    model = m["model"]
    data = [
        ("data", m["settings"]["data"]),
        ("studies", m["n_studies"]),
        ("nodules", m["n_nodules"]),
        ("views", m["n_views"]),
        ("views with feature labels", m["n_views_with_features"]),
    ]
    scores = [
        ("malignancy ROC AUC (per nodule)", _fmt(model.get("malignancy_auc"), 3)),
        ("accuracy at 0.5", _fmt(model.get("malignancy_accuracy"), 3)),
        *[(f"MAE {k}", _fmt(v, 3)) for k, v in (model.get("biomarker_mae") or {}).items()],
    ]
    rows = target_localization_rows(m)
    reference = m["settings"].get("reference_target", "malignancy")
    body = [
        '<div class="cards">',
        '<div class="card"><h4>Data</h4>' + _kv(data) + "</div>",
        '<div class="card"><h4>Model (views averaged per nodule)</h4>' + _kv(scores) + "</div>",
        "</div>",
        "<h2>Target-specific localization</h2>",
        '<p class="note">For each biomarker with a ground-truth part of its own (spiculation → spicules, '
        "lobulation → lobulation bumps, calcification → calcification, texture → ground glass): the share of "
        "the map's evidence for that part on the nodule that lies on that part (own; evidence for a part is the "
        "positive part of the map, or for calcification and texture, whose scores fall when the part is present, "
        "the negative part; a method whose maps are never negative is taken as it is), the same share for the "
        f"{_e(reference)} map on the same views, and the part's share of the nodule's area (what a map uniform "
        "over the nodule would get). A class-discriminative map has own &gt; "
        f"{_e(reference)}; n = views where the part is present and both maps have positive evidence on the "
        "nodule.</p>",
    ]
    if rows:
        header = list(rows[0])
        body.append(_table(header, [[r[h] for h in header] for r in rows], left=3))
    else:
        body.append('<p class="hot">No feature labels (&lt;name&gt;_features.nii.gz) were found beside the data.</p>')
    body += ["<h2>Timings (s)</h2>", _table(["method", "seconds"], list(m["timings_s"].items()), left=1)]
    return _page("medvit-explain — explanation evaluation (nodule ROIs)", body)


def render_evaluation(result) -> str:
    """``evaluation.html`` for an ``EvaluationResult`` (:mod:`medvit_explain.workflows.evaluate`): its
    ``metrics`` dict and its ``examples`` (images, nodule masks, maps per method); an ROI model's result
    has its own page (:func:`render_roi_evaluation`)."""
    m = result.metrics
    if m.get("mode") == "roi":
        return render_roi_evaluation(result)
    body = _evaluation_cards(m) + _evaluation_summary(m, table_rows(m))
    if result.examples.maps:
        body += [
            "<h2>Examples: predicted-class maps on nodule slices</h2>",
            '<p class="note">Nodule outlined; maps raw signed, red = evidence for the predicted class.</p>',
            _img(example_grid(result.examples), "example maps"),
        ]
    body += _evaluation_details(m)
    return _page("medvit-explain — explanation evaluation", body)


def _out_folder(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MedvitInputError(f"--out {out} exists and is not a folder")
    return out


def write_evaluation(result, out_dir: str | Path) -> dict[str, Path]:
    """``metrics.json`` and ``evaluation.html`` in ``out_dir`` (each written atomically)."""
    out = _out_folder(out_dir)
    html_text = render_evaluation(result)
    written = {"metrics": out / "metrics.json", "report": out / "evaluation.html"}
    with atomic_path(written["metrics"]) as tmp:
        tmp.write_text(to_json(result.metrics))
    with atomic_path(written["report"]) as tmp:
        tmp.write_text(html_text, encoding="utf-8")
    return written


# ---------------------------------------------------------------------------------------- audit
def render_audit(result) -> str:
    """``audit.html`` for an ``AuditResult`` (:mod:`medvit_explain.workflows.audit`)."""
    s = result.summary
    body = [
        '<div class="cards">',
        '<div class="card"><h4>Data</h4>'
        + _kv(
            [
                ("data", s["data"]),
                ("studies audited", s["n_studies"]),
                ("failed", len(result.failures)),
                ("methods", ", ".join(s["methods"])),
                ("study label", "malignant if any nodule in its JSON is"),
                ("study score", "max slice P(malignancy)"),
            ]
        )
        + "</div>",
    ]
    for level in ("study", "slice"):
        c = s.get(level) or {}
        body.append(
            f'<div class="card"><h4>{_e(level)} level</h4>'
            + _kv(
                [
                    ("n (malignant)", f"{c.get('n')} ({c.get('n_positive')})"),
                    ("ROC AUC", _fmt(c.get("auc"), 3)),
                    ("average precision", _fmt(c.get("ap"), 3)),
                    (f"sensitivity at {s['threshold']:g}", _fmt(c.get("sensitivity"), 3)),
                    (f"specificity at {s['threshold']:g}", _fmt(c.get("specificity"), 3)),
                    ("ECE (10 bins)", _fmt(c.get("ece"), 3)),
                ]
            )
            + "</div>"
        )
    body.append("</div>")
    curves = {lvl: s[lvl] for lvl in ("study", "slice") if s.get(lvl)}
    body += [
        "<h2>Discrimination</h2>",
        _img(roc_pr_plot(curves), "ROC and PR curves"),
        "<h2>Calibration</h2>",
        _img(reliability_plot({lvl: c["calibration"] for lvl, c in curves.items()}), "reliability diagram"),
    ]
    if result.failures:
        body += [
            "<h2>Failed studies (skipped)</h2>",
            _table(["study", "error"], [[f["study"], f["error"]] for f in result.failures], left=2),
        ]
    body += [
        "<h2>Right for the right reason?</h2>",
        '<p class="note">Share of the positive malignancy evidence (positive map mass) on the study\'s top '
        f"{s['top_slices']} slice(s) by P(malignancy) that lies inside the nodule(s), inside the lungs and "
        "outside the body. Studies whose evidence sits mostly outside the lesion come first.</p>",
    ]
    header = list(result.rows[0]) if result.rows else []
    body.append(_table(header, [[r[h] for h in header] for r in result.rows], left=1))
    if result.pictures:
        body.append("<h2>Pictures (ordered as above)</h2>")
        for name, picture in result.pictures:
            png = study_figure(
                picture.ct,
                picture.maps,
                picture.nodule,
                picture.body,
                aspect=picture.aspect,
                title=picture.title,
            )
            body += [f"<h3>{_e(name)}</h3>", _img(png, f"maps of {name}")]
    return _page("medvit-explain — malignancy audit", body)


def write_audit(result, out_dir: str | Path) -> dict[str, Path]:
    """``audit.html``, ``audit.csv`` and ``audit.json`` in ``out_dir`` (each written atomically)."""
    out = _out_folder(out_dir)
    html_text = render_audit(result)
    written = {"report": out / "audit.html", "csv": out / "audit.csv", "json": out / "audit.json"}
    with atomic_path(written["report"]) as tmp:
        tmp.write_text(html_text, encoding="utf-8")
    with atomic_path(written["csv"]) as tmp:
        with open(tmp, "w", newline="") as stream:
            header = list(result.rows[0]) if result.rows else ["study"]
            writer = csv.DictWriter(stream, fieldnames=header)
            writer.writeheader()
            for r in result.rows:
                writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    with atomic_path(written["json"]) as tmp:
        tmp.write_text(to_json({"summary": result.summary, "studies": result.rows}))
    return written
