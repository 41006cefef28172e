"""The HTML report: one self-contained file (CSS inline, figures as base64 PNG, no script, no URL).

Layout: provenance (model, input, methods, targets, device) → probability of the primary target per
slice (per ROI in ROI mode) with the top slices marked → for each top slice a grid figure (rows =
methods, columns = CT + targets; maps on a diverging colour scale centred at 0) → predicted values on
the LIDC scales for those slices → all rows (collapsed) → timings → versions.

A volumetric model's result gets three orthogonal planes (axial, coronal, sagittal) per grid instead of one
slice: through each top ROI's centre (ROI mode, whole cubes), or, for the whole-volume mode (one input, one
probability, stated in a line), through the voxel where the first method's primary-target map is largest.

Every text that comes from the input, the model or the user is escaped with :func:`html.escape`.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import figures

__all__ = ["render_report", "write_report", "top_entries"]

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;padding:18px 26px;
color:#1d232a;background:#fff;font-size:14px;line-height:1.4}
h1{font-size:21px;margin:0 0 4px}h2{font-size:17px;margin:26px 0 8px;border-bottom:2px solid #d6dde5;
padding-bottom:3px}h3{font-size:15px;margin:18px 0 6px}
.sub{color:#5b6773;font-size:12.5px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-top:12px}
.card{border:1px solid #d6dde5;border-radius:6px;padding:8px 12px;min-width:250px;flex:1;background:#f8fafc}
.card h4{margin:0 0 4px;font-size:13px;color:#1f4e79;text-transform:uppercase;letter-spacing:.04em}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0}
th,td{border:1px solid #d6dde5;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#eef2f6;white-space:normal}
.scroll{overflow-x:auto;max-width:100%}td.l,th.l{text-align:left}
.kv td{border:none;padding:1px 8px 1px 0;text-align:left;white-space:normal;word-break:break-all}
.kv td:first-child{color:#5b6773;white-space:nowrap;word-break:normal}
code{font-family:Menlo,Consolas,monospace;font-size:12px}
img.fig{max-width:100%;height:auto;display:block;border:1px solid #e5e9ee}
.note{color:#5b6773;font-size:12px;margin:4px 0}
.hot{color:#c0392b;font-weight:600}
details summary{cursor:pointer;color:#1f4e79;margin:6px 0}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            return str(value)
        return f"{float(value):.{digits}g}"
    return str(value)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="fig" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _kv(rows: Iterable[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], left: int = 0) -> str:
    """An HTML table; the first ``left`` columns are left-aligned text."""
    head = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(header))
    body = []
    for row in rows:
        cells = "".join(f'<td class="{"l" if i < left else ""}">{_e(_fmt(v))}</td>' for i, v in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


# ---------------------------------------------------------------------------------------- content
def _scales(result, task_spec=None) -> dict[str, tuple[float, float]]:
    """Target name → LIDC scale (lo, hi) for regression targets, from the model's task spec."""
    spec = task_spec if task_spec is not None else getattr(result, "task_spec", None)
    if spec is None:
        try:
            from ..model.task import TaskSpec

            spec = TaskSpec.default()
        except Exception:  # the scales are a label only; the report does not need them
            return {}
    return {t.name: tuple(t.scale) for t in spec if getattr(t, "scale", None) is not None}


def _cube_mode(result) -> bool:
    """ROI mode with a volumetric model: one input per ROI, its whole cube (the one view ``3d``)."""
    from ..volumetric_inputs import CUBE_VIEW

    return result.predictions.mode == "roi" and list(getattr(result.inputs, "views", [])) == [CUBE_VIEW]


def _canonical_spacing(result) -> np.ndarray:
    """The voxel spacing (mm) along the canonical (LPS-reoriented) axes x, y, z."""
    return result.volume.spacing[np.argsort(result.inputs.ornt[:, 0])]


def top_entries(result, n: int = 3) -> list[dict[str, Any]]:
    """The slices to show in detail, best first.

    Slice mode: the ``n`` slices with the highest primary-target probability (the first slice when
    the model has no binary target). ROI mode: the ``n`` ROIs with the highest view-averaged
    probability, each shown on the axial slice through its centre. Volume mode (a volumetric model on the
    whole CT): the one row.

    Each entry: ``slice`` (canonical, for :meth:`ExplainResult.display_slice`), ``label`` (text),
    ``row`` (the predictions row); ROI entries also a ``window`` (rows, cols) of the displayed slice: the
    ROI's cube and as much again around it, so the nodule's parts are large enough to see. ROI entries of
    a volumetric model (cube mode) also have ``centre`` (the canonical voxel of the ROI's centre),
    ``half`` (voxels shown each side of it along each canonical axis) and ``window_mm``; their ``label``
    names the ROI only. The volume-mode entry has only ``row`` and ``label``.
    """
    table = result.predictions
    key = f"{table.primary}_prob"
    if table.mode == "volume":
        return [{"row": table.rows[0], "label": "the whole volume"}] if table.rows else []
    if table.mode == "slice":
        if not table.rows:
            return []
        if key in table.columns:
            prob = table.column(key)
            order = np.argsort(-prob, kind="stable")[:n]
        else:
            order = np.arange(min(n, len(table.rows)))
        out = []
        for i in order:
            row = table.rows[int(i)]
            out.append(
                {
                    "slice": int(row["slice"]),
                    "row": row,
                    "label": f"slice {row['slice']} (source index {row['source_index']}, "
                    f"z = {_fmt(row.get('z_mm', float('nan')))} mm)",
                }
            )
        return out
    from ..transforms import source_to_canonical_index

    nodules = [row for row in table.rows if row.get("view") == "mean"]
    if key in table.columns:
        nodules = sorted(nodules, key=lambda r: -r[key])
    volume = result.volume
    axis_of = np.argsort(result.inputs.ornt[:, 0])
    canon_shape = [volume.shape[int(a)] for a in axis_of]
    half_mm = float(result.inputs.size_mm)  # the cube's width each side of the centre: twice the ROI in all
    half = [max(1, int(np.ceil(half_mm / s))) for s in _canonical_spacing(result)]
    cube = _cube_mode(result)
    out = []
    for row in nodules[:n]:
        centre = np.array([row["center_x_mm"], row["center_y_mm"], row["center_z_mm"]])
        canon = source_to_canonical_index(volume.physical_to_index(centre), result.inputs.ornt, volume.shape)
        k = int(np.clip(np.rint(canon[2]), 0, canon_shape[2] - 1))
        cx, cy = (int(np.rint(canon[a])) for a in (0, 1))
        window = (
            slice(max(cy - half[1], 0), min(cy + half[1] + 1, canon_shape[1])),  # rows: canonical y
            slice(max(cx - half[0], 0), min(cx + half[0] + 1, canon_shape[0])),  # cols: canonical x
        )
        entry = {
            "slice": k,
            "row": row,
            "window": window,
            "label": f"ROI {row['roi']} (label {row['label']}), axial slice {k} through its centre, "
            f"a {2 * half_mm:g} mm window",
        }
        if cube:
            entry.update(
                centre=tuple(int(np.clip(np.rint(c), 0, s - 1)) for c, s in zip(canon, canon_shape)),
                half=tuple(half),
                window_mm=2 * half_mm,
                label=f"ROI {row['roi']} (label {row['label']})",
            )
        out.append(entry)
    return out


def _probability_section(result, top: list[dict[str, Any]]) -> str:
    table = result.predictions
    key = f"{table.primary}_prob"
    if not table.rows or key not in table.columns:
        return f'<p class="note">No binary target to plot ({_e(table.primary)} has no probability).</p>'
    if table.mode == "volume":
        return (
            f'<p>P({_e(table.primary)}) of the whole volume = <span class="hot">'
            f"{_e(_fmt(table.rows[0][key], 3))}</span> (one input: the whole CT).</p>"
        )
    cube = _cube_mode(result)
    if table.mode == "slice":
        png = figures.probability_plot(
            table.column("slice"), table.column(key), [t["slice"] for t in top], target=table.primary
        )
        alt = f"probability of {table.primary} per slice"
    else:
        rois = sorted({int(r["roi"]) for r in table.rows})
        views = [] if cube else [v for v in dict.fromkeys(r["view"] for r in table.rows) if v != "mean"]
        value = {(int(r["roi"]), r["view"]): r[key] for r in table.rows}
        png = figures.roi_probability_plot(
            [f"ROI {r}" for r in rois],
            {v: np.array([value.get((r, v), np.nan) for r in rois]) for v in views},
            np.array([value[(r, "mean")] for r in rois]),
            target=table.primary,
            **({"bar_label": "whole cube"} if cube else {}),
        )
        alt = f"probability of {table.primary} per ROI"
    if table.mode == "slice":
        legend = f"Top {len(top)} circled in red."
    elif cube:
        legend = "Bars: one input per ROI (the whole cube)."
    else:
        legend = "Bars: views averaged (logits averaged, then the probability); markers: each view."
    summary = table.summary()
    where = (
        f"slice {summary.get('max_malignancy_slice')}"
        if table.mode == "slice"
        else f"ROI {summary.get('max_malignancy_roi')}"
    )
    head = (
        f'<p>Highest P({_e(table.primary)}) = <span class="hot">'
        f"{_e(_fmt(summary.get('max_malignancy_prob', float('nan')), 3))}</span> at {_e(where)}. {legend}</p>"
    )
    return head + _img(png, alt)


def _grid_note(overlay: bool, shown: str, orientation: str) -> str:
    return (
        '<p class="note">Rows: methods; columns: the CT (window '
        f"[{figures.CT_WINDOW[0]:g}, {figures.CT_WINDOW[1]:g}] HU) then each target. Maps are the raw signed "
        f"values on a diverging scale centred at 0 ({_e(figures.MAP_CMAP)}: red = evidence for the target's "
        f"output, blue = against), limits ±max|map| of that {shown}, method and target"
        + ("; drawn over the CT with opacity growing with |value|" if overlay else "")
        + f". {orientation}</p>"
    )


def _grid_section(result, top: list[dict[str, Any]], overlay: bool) -> str:
    if not result.methods or not result.targets:
        return '<p class="note">No maps (no method or no target requested).</p>'
    if result.predictions.mode == "volume" or _cube_mode(result):
        return _plane_section(result, top, overlay)
    aspect = result.display_aspect()
    key = f"{result.predictions.primary}_prob"
    parts = [_grid_note(overlay, "slice", "Radiological orientation: patient right on the image left.")]
    for rank, entry in enumerate(top, start=1):
        k = entry["slice"]
        window = entry.get("window", (slice(None), slice(None)))
        ct = result.display_slice(k)[window]
        maps = {m: {t: result.display_slice(k, m, t)[window] for t in result.targets} for m in result.methods}
        prob = entry["row"].get(key)
        score = f" &middot; P({_e(result.predictions.primary)}) = {prob:.3f}" if prob is not None else ""
        # the heading says which slice this is; the figure keeps no title of its own
        png = figures.slice_grid(ct, maps, aspect=aspect, overlay=overlay)
        parts.append(f"<h3>#{rank} &mdash; {_e(entry['label'])}{score}</h3>")
        parts.append(_img(png, f"maps for {entry['label']}"))
    return "".join(parts)


def _map_order(result) -> list[tuple[str, str]]:
    """Every (method, target), the first method's primary-target map first (volume mode centres its
    planes on that map's maximum)."""
    primary = result.predictions.primary
    first = (result.methods[0], primary if primary in result.targets else result.targets[0])
    return [first] + [(m, t) for m in result.methods for t in result.targets if (m, t) != first]


def _plane_section(result, top: list[dict[str, Any]], overlay: bool) -> str:
    """A volumetric model's maps: three orthogonal planes per entry, each a grid figure. Cube mode: through
    each top ROI's centre, windowed to twice the ROI; volume mode: through the voxel where the first
    method's primary-target map is largest, the whole field of view. Each map is put on the source grid
    once and every plane of every entry cut from it."""
    from ..orientation import reoriented_view
    from ..transforms import source_to_canonical_index

    volume, ornt = result.volume, result.inputs.ornt
    centres = [entry.get("centre") for entry in top]
    planes = [{p: {m: dict.fromkeys(result.targets) for m in result.methods} for p in figures.PLANES} for _ in top]
    peak = None
    for method, target in _map_order(result):
        source = result.map_array(method, target)
        if peak is None and None in centres:
            # source.T is the C-ordered buffer map_array returns: argmax without a copy
            voxel = np.unravel_index(np.argmax(source.T), source.T.shape)[::-1]
            canon = source_to_canonical_index(np.array(voxel, dtype=np.float64), ornt, volume.shape)
            peak = (method, target, tuple(int(v) for v in voxel))
            centres = [tuple(int(c) for c in np.rint(canon)) if c is None else c for c in centres]
        canonical = reoriented_view(source, ornt)
        for entry, centre, cut in zip(top, centres, planes, strict=True):
            for plane in figures.PLANES:
                # a copy: a view would keep the whole source-grid map alive (18 maps of a clinical CT: GBs)
                cut[plane][method][target] = figures.display_plane(canonical, plane, centre, entry.get("half")).copy()
        del source, canonical
    ct = reoriented_view(volume.array, ornt)
    spacing = _canonical_spacing(result)
    key = f"{result.predictions.primary}_prob"
    parts = [
        _grid_note(
            overlay,
            "plane",
            "Radiological orientation: patient right on the image left; coronal and sagittal planes with "
            "superior at the top, sagittal with anterior on the left.",
        )
    ]
    for rank, (entry, centre, cut) in enumerate(zip(top, centres, planes, strict=True), start=1):
        prob = entry["row"].get(key)
        score = f" &middot; P({_e(result.predictions.primary)}) = {prob:.3f}" if prob is not None else ""
        if peak is None:
            parts.append(f"<h3>#{rank} &mdash; {_e(entry['label'])}{score}</h3>")
        else:
            method, target, voxel = peak
            parts.append(
                f'<h3>Whole volume{score}</h3><p class="note">Planes through source voxel '
                f"{_e(voxel)}, where the {_e(method)} map of {_e(target)} is largest; the whole field of view.</p>"
            )
        for plane in figures.PLANES:
            if peak is None:
                label = f"{entry['label']}, {plane} plane through its centre, a {entry['window_mm']:g} mm window"
            else:
                label = f"whole volume, {plane} plane through voxel {peak[2]}"
            png = figures.slice_grid(
                figures.display_plane(ct, plane, centre, entry.get("half")),
                cut[plane],
                aspect=figures.plane_aspect(spacing, plane),
                overlay=overlay,
            )
            parts.append(f'<h4 class="plane">{_e(label)}</h4>')
            parts.append(_img(png, f"maps for {label}"))
    return "".join(parts)


def _value_columns(result) -> list[str]:
    table = result.predictions
    meta = {"slice", "source_index", "z_mm", "roi", "label", "view", "center_x_mm", "center_y_mm", "center_z_mm"}
    if table.mode == "volume":
        meta.add("volume")
    return [c for c in table.columns if c not in meta]


def _value_header(columns: Sequence[str], scales: dict[str, tuple[float, float]]) -> list[str]:
    out = []
    for c in columns:
        if c in scales:
            lo, hi = scales[c]
            out.append(f"{c} ({lo:g}–{hi:g})")
        else:
            out.append(c)
    return out


def _biomarker_section(result, top: list[dict[str, Any]], scales) -> str:
    table = result.predictions
    values = _value_columns(result)
    meta = {"slice": ["slice", "source_index", "z_mm"], "volume": ["volume"]}.get(table.mode, ["roi", "label", "view"])
    rows = [[e["row"].get(c, "") for c in meta + values] for e in top]
    note = (
        '<p class="note">Regression targets on their LIDC scales (range in brackets: subtlety 5 = obvious, '
        "calcification 6 = absent, margin 5 = sharp, texture 5 = solid, sphericity 5 = round; diameter in "
        "mm); binary targets as probability and logit.</p>"
    )
    return note + _table(meta + _value_header(values, scales), rows, left=0)


def _all_rows_section(result, scales) -> str:
    table = result.predictions
    if not table.rows:
        return ""
    values = _value_columns(result)
    meta = [c for c in table.columns if c not in values]
    rows = [[row.get(c, "") for c in meta + values] for row in table.rows]
    return (
        f"<details><summary>All {len(rows)} rows of the prediction table</summary>"
        + _table(meta + _value_header(values, scales), rows)
        + "</details>"
    )


def _versions() -> dict[str, str]:
    from ..versions import package_versions

    out = {"python": platform.python_version()}
    out.update(package_versions())
    try:
        import matplotlib

        out["matplotlib"] = matplotlib.__version__
    except ImportError:  # pragma: no cover - matplotlib is what draws this report
        pass
    return out


_CARD_KEYS = ("label", "name", "checkpoint", "sha256", "targets", "preprocessing", "preprocessing_defaults")


def _model_card(info: dict[str, Any]) -> str:
    return _kv(
        [
            ("name", info.get("name", "?")),
            ("checkpoint", info.get("checkpoint", "(not loaded from a file)")),
            ("sha256", info.get("sha256", "n/a")),
            ("targets", ", ".join(info.get("targets", []))),
            *[(k, v) for k, v in info.items() if k not in _CARD_KEYS],
        ]
    )


def _preprocessing_section(info: dict[str, Any]) -> str:
    """The preprocessing a model ran with, every value, the defaults marked (what its config left out)."""
    pre = info.get("preprocessing")
    if not pre:
        return ""
    defaults = set(info.get("preprocessing_defaults") or [])
    rows = []
    for key, value in pre.items():
        items = value.items() if key == "roi" and isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            name = key if sub is None else f"{key}.{sub}"
            source = "model" if key in ("image_size", "in_chans") else "config"  # must equal the backbone's
            rows.append([name, json.dumps(v), "default" if name in defaults or key in defaults else source])
    label = f"<h3>{_e(info['label'])}</h3>" if "label" in info else ""
    left = _e(", ".join(sorted(defaults)))
    note = f'<p class="note">The config left these to the defaults: {left}.</p>' if defaults else ""
    return label + note + _table(["setting", "value", "from"], rows, left=3)


def render_report(result, *, top: int = 3, overlay: bool = True, task_spec=None, title: str | None = None) -> str:
    """The report of ``result`` (an :class:`~medvit_explain.pipeline.ExplainResult`) as an HTML string."""
    meta = result.volume.metadata
    info = result.model_info or {}
    input_path = meta.get("path", "(in memory)")
    title = title or f"medvit-explain — {Path(str(input_path).rstrip('/')).name or input_path}"
    scales = _scales(result, task_spec)
    entries = top_entries(result, top)

    models = info.get("models") or [info]
    model_cards = [
        f'<div class="card"><h4>Model{" " + _e(m["label"]) if "label" in m else ""}</h4>{_model_card(m)}</div>'
        for m in models
    ]
    input_card = _kv(
        [
            ("path", input_path),
            ("format", meta.get("format", "?")),
            ("modality", meta.get("modality", result.volume.modality)),
            ("shape [X, Y, Z]", " × ".join(str(s) for s in result.volume.shape)),
            ("spacing (mm)", " × ".join(f"{float(s):.4g}" for s in result.volume.spacing)),
            ("sha256", meta.get("sha256", "n/a")),
            *([("series UID", meta["series_uid"])] if meta.get("series_uid") else []),
            *([("resampled", meta["resampled"])] if meta.get("resampled") else []),
        ]
    )
    run_card = _kv(
        [
            ("methods", ", ".join(result.methods)),
            ("targets", ", ".join(result.targets)),
            ("mode", result.predictions.mode),
            ("rows", len(result.predictions.rows)),
            ("device", result.device),
        ]
    )
    timings = sorted(result.timings.items(), key=lambda kv: -kv[1])
    total = sum(v for _, v in timings)
    timing_rows = [[k, f"{v:.3f}", f"{100 * v / total:.0f} %" if total > 0 else ""] for k, v in timings]
    generated = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    mode = result.predictions.mode
    per = {"slice": " per slice", "roi": " per ROI"}.get(mode, "")
    maps_heading = (
        "Whole volume: maps"
        if mode == "volume"
        else f"Top {len(entries)} {'slices' if mode == 'slice' else 'ROIs'}: maps"
    )

    body = [
        f"<h1>{_e(title)}</h1>",
        f'<div class="sub">generated {_e(generated)} &middot; medvit-explain explanation report</div>',
        '<div class="cards">',
        *model_cards,
        f'<div class="card"><h4>Input</h4>{input_card}</div>',
        f'<div class="card"><h4>Run</h4>{run_card}</div>',
        "</div>",
        f"<h2>{_e('Probability of ' + result.predictions.primary)}{per}</h2>",
        _probability_section(result, entries),
        f"<h2>{maps_heading}</h2>",
        _grid_section(result, entries, overlay),
        "<h2>Predicted values</h2>",
        _biomarker_section(result, entries, scales),
        _all_rows_section(result, scales),
        "<h2>Preprocessing</h2>",
        *[_preprocessing_section(m) for m in models],
        "<h2>Timings (s)</h2>",
        _table(["stage", "seconds", "share"], timing_rows, left=1),
        "<h2>Device and versions</h2>",
        _kv([("device", result.device), *(_versions().items())]),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{_e(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(result, path: str | os.PathLike, *, top: int = 3, overlay: bool = True, task_spec=None) -> Path:
    """Write the report of ``result`` to ``path`` atomically (temporary name, then rename).

    Args:
        result: an :class:`~medvit_explain.pipeline.ExplainResult`.
        path: the ``.html`` file to write (parent folders are created).
        top: how many slices (ROIs) to show in detail, by primary-target probability.
        overlay: draw maps over the CT (else the maps alone, beside the CT).
        task_spec: for the LIDC scale labels (default: the result's, else the packaged LIDC spec).

    Returns:
        ``path``.
    """
    from ..io.writer import atomic_path

    text = render_report(result, top=top, overlay=overlay, task_spec=task_spec)
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path
