"""ROI options shared by predict and explain: nodule centres from a file, or an instance mask."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import click
import numpy as np

from ..errors import MedvitInputError

roi_centers_option = click.option(
    "--roi-centers",
    type=click.Path(dir_okay=False, path_type=str),
    default=None,
    metavar="FILE",
    help="Nodule centres (LPS mm): a CSV with x_mm,y_mm,z_mm columns or a phantom JSON (nodules[].center_mm).",
)
roi_mask_option = click.option(
    "--roi-mask",
    type=click.Path(dir_okay=False, path_type=str),
    default=None,
    metavar="FILE",
    help="Nodule instance mask (labels 1..n) on the CT's grid; each label's centroid is an ROI.",
)


def read_roi_centers(path: str) -> np.ndarray:
    """[R, 3] LPS mm centres from a CSV (x_mm,y_mm,z_mm or x,y,z) or a JSON ({"nodules": [{"center_mm"}]})."""
    p = Path(path)
    if not p.exists():
        raise MedvitInputError(f"ROI centres file not found: {p}")
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(p.read_text())
            items = data["nodules"] if isinstance(data, dict) else data
            centres = [item["center_mm"] if isinstance(item, dict) else item for item in items]
        else:
            with open(p, newline="") as stream:
                rows = list(csv.DictReader(stream))
            keys = next(
                (k for k in (("x_mm", "y_mm", "z_mm"), ("x", "y", "z")) if rows and set(k) <= set(rows[0])), None
            )
            if keys is None:
                raise MedvitInputError(f"{p}: expected CSV columns x_mm,y_mm,z_mm (LPS millimetres)")
            centres = [[float(row[k]) for k in keys] for row in rows]
        array = np.asarray(centres, dtype=np.float64).reshape(-1, 3)
    except (KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
        raise MedvitInputError(f"cannot read ROI centres from {p}: {exc}") from None
    if len(array) == 0 or not np.all(np.isfinite(array)):
        raise MedvitInputError(f"{p} holds no valid ROI centre (expected finite x, y, z in mm)")
    return array


def resolve_roi(roi_centers: str | None, roi_mask: str | None):
    """(centres or None, mask Volume or None) from the two options (mutually exclusive)."""
    if roi_centers and roi_mask:
        raise click.UsageError("use either --roi-centers or --roi-mask, not both")
    if roi_mask:
        from ..io import load_volume

        return None, load_volume(roi_mask)
    if roi_centers:
        return read_roi_centers(roi_centers), None
    return None, None
