"""How well can the shape biomarkers (sphericity, lobulation) be read from a nodule's own mask?

A grader that sees the drawn nodule itself (no blur, no noise, no neighbours), the ground truth the ROI
model never gets, is fitted on the training phantoms and scored on held-out ones, from three readings:

* ``whole mask``: the nodule's instance mask, spicules and lobes included;
* ``body``: that mask without its spicule and lobe voxels (``<name>_features.nii.gz`` labels 2 and 3), the
  shape that sphericity draws (an elongated ellipsoid): spicules and lobes pull its second moments about;
* ``mask + lobe share`` (lobulation): the whole mask's features with each plane's share of lobe voxels,
  what a reader that tells the lobes apart (as the model's part token labels teach it to) has.

and for each reading three graders:

* ``3D``: from the whole 3D reading (axis ratios of its second moments, how far its surface strays from
  the moment ellipsoid);
* ``per view``: from what one ROI view holds, the reading on the view's five planes (the sample-roi's 3 mm
  apart: extent, axis ratio and roughness on each), one prediction per view, averaged over the axial,
  coronal and sagittal views as the ROI model's ``mean`` row averages its views;
* ``together``: the same planes of the three views read at once (one prediction from all of them), what a
  model that fuses its views could reach.

The per-view grader is the fair reference for a model that scores each view on its own; the 3D one says
what the phantoms hold at all. Gradient-boosted trees (scikit-learn, installed with grad-cam) on those
features; each biomarker's MAE on the LIDC 1-5 scale, with predicting the training median next to it.

    .venv/bin/python scripts/shape_oracle.py --train runs/roi_dense/train --test runs/roi_dense/test

(the folders ``scripts/make_sample_model.py --config configs/sample_roi_model.yaml --work runs/roi_dense``
writes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from medvit_explain.phantom import FEATURE_LABELS

TARGETS = ("sphericity", "lobulation")
_PART = {name: label for label, name in FEATURE_LABELS.items()}
SPICULES, LOBES = _PART["spicules"], _PART["lobulation"]  # labels of the features map
READINGS = {"sphericity": ("whole mask", "body"), "lobulation": ("whole mask", "mask + lobe share")}
VIEW_NORMALS = {"axial": 2, "coronal": 1, "sagittal": 0}  # the patient axis each view's planes are normal to


def _plane_features(points: np.ndarray, normal: np.ndarray, offsets, half: float) -> list[float]:
    """Per plane at ``offsets`` mm along the normal (a slab ± ``half`` mm): voxel count, axis ratio of the
    in-plane second moments, the spread of the radius, and (roughness) the spread of the radius in the frame
    where the section's moment ellipse is a circle, with the share of voxels beyond that ellipse."""
    out: list[float] = []
    for off in offsets:
        p = points[np.abs(normal - off) <= half]
        if len(p) < 4:
            out += [float(len(p)), 1.0, 0.0, 0.0, 0.0]
            continue
        c = p - p.mean(0)
        ev, vec = np.linalg.eigh(np.cov(c.T) + 1e-3 * np.eye(2))
        r = np.linalg.norm(c, axis=1)
        w = np.linalg.norm((c @ vec) / np.sqrt(ev[None]), axis=1)  # a disc of radius 2 for a solid ellipse
        out += [
            float(len(p)),
            float(np.sqrt(ev[-1] / ev[0])),
            float(r.std() / (r.mean() + 1e-6)),
            float(w.std() / (w.mean() + 1e-6)),
            float(np.mean(w > 2.0)),
        ]
    return out


def _volume_features(xyz: np.ndarray, diameter: float) -> list[float]:
    """3D: the diameter, the three axis ratios, the radial spread in the moment ellipsoid's frame and the
    share of voxels beyond it."""
    ev, vec = np.linalg.eigh(np.cov(xyz.T) + 1e-3 * np.eye(3))
    q = np.linalg.norm((xyz @ vec) / np.sqrt(ev[None]), axis=1)
    return [
        diameter,
        float(np.sqrt(ev[2] / ev[0])),
        float(np.sqrt(ev[2] / ev[1])),
        float(np.sqrt(ev[1] / ev[0])),
        float(q.std() / (q.mean() + 1e-6)),
        float(np.mean(q > np.sqrt(5.0))),
    ]


def _lobe_shares(is_lobe: np.ndarray, normal: np.ndarray, offsets, half: float) -> list[float]:
    """The share of lobe voxels in each plane's slab (0 where a slab is empty)."""
    out = []
    for off in offsets:
        slab = np.abs(normal - off) <= half
        out.append(float(is_lobe[slab].mean()) if slab.any() else 0.0)
    return out


def _readings(xyz: np.ndarray, parts: np.ndarray, diameter: float, offsets, half: float) -> dict:
    """One nodule's (3D features, per-view features [3, F]) for each reading (module docstring): ``xyz``
    its voxels (mm, centred), ``parts`` their feature labels."""
    is_lobe = parts == LOBES
    body = xyz[(parts != SPICULES) & ~is_lobe]
    body = body - body.mean(0) if len(body) >= 8 else xyz

    def read(points, lobes=None):
        views = []
        for axis in VIEW_NORMALS.values():
            keep = [a for a in range(3) if a != axis]
            f = _plane_features(points[:, keep], points[:, axis], offsets, half) + [diameter]
            if lobes is not None:
                f += _lobe_shares(lobes, points[:, axis], offsets, half)
            views.append(f)
        whole = _volume_features(points, diameter) + ([] if lobes is None else [float(lobes.mean())])
        return whole, views

    return {"whole mask": read(xyz), "body": read(body), "mask + lobe share": read(xyz, is_lobe)}


def nodule_features(folder: Path, offsets, half: float) -> tuple[dict, np.ndarray]:
    """For every labelled nodule of the phantoms in ``folder``: {reading: (3D features [M, F], per-view
    features [M, 3, F])} and the labels [M, 2] (sphericity, lobulation)."""
    found: dict[str, tuple[list, list]] = {}
    labels = []
    for meta in sorted(folder.glob("*.json")):
        if meta.name == "phantoms.json":
            continue
        nodules = json.loads(meta.read_text()).get("nodules") or []
        if not nodules:
            continue
        stem = meta.name[: -len(".json")]
        image = nib.load(str(meta.with_name(stem + "_nodules.nii.gz")))
        ids = np.asarray(image.dataobj)
        parts = np.asarray(nib.load(str(meta.with_name(stem + "_features.nii.gz"))).dataobj)
        spacing = np.abs(np.diag(image.affine)[:3])  # the phantoms' grids are axis-aligned
        for nodule in nodules:
            idx = np.argwhere(ids == nodule["id"])
            if len(idx) < 8:
                continue
            xyz = idx * spacing
            xyz = xyz - xyz.mean(0)
            for name, (whole, views) in _readings(
                xyz, parts[tuple(idx.T)], float(nodule["diameter_mm"]), offsets, half
            ).items():
                found.setdefault(name, ([], []))
                found[name][0].append(whole)
                found[name][1].append(views)
            labels.append([float(nodule[t]) for t in TARGETS])
    return {name: (np.array(v), np.array(w)) for name, (v, w) in found.items()}, np.array(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, type=Path)
    parser.add_argument("--test", required=True, type=Path)
    parser.add_argument("--offsets", default="-6,-3,0,3,6", help="plane offsets (mm) of a view [sample-roi's]")
    parser.add_argument("--half", type=float, default=1.5, help="half the slab a plane reads (mm)")
    args = parser.parse_args()
    from sklearn.ensemble import GradientBoostingRegressor

    offsets = [float(v) for v in args.offsets.split(",")]
    train, y_train = nodule_features(args.train, offsets, args.half)
    test, y_test = nodule_features(args.test, offsets, args.half)
    print(f"{len(y_train)} training nodules, {len(y_test)} held-out nodules")

    def fit(x, labels):
        return GradientBoostingRegressor(n_estimators=200, max_depth=3, random_state=0).fit(x, labels)

    for k, target in enumerate(TARGETS):
        y, truth = y_train[:, k], y_test[:, k]
        for reading in READINGS[target]:
            (vol, views), (vol_test, views_test) = train[reading], test[reading]
            whole = fit(vol, y).predict(vol_test)
            n_feat = views.shape[-1]
            per_view = fit(views.reshape(-1, n_feat), np.repeat(y, 3)).predict(views_test.reshape(-1, n_feat))
            per_view = per_view.reshape(-1, 3).mean(1)
            joint = fit(views.reshape(len(y), -1), y).predict(views_test.reshape(len(truth), -1))
            print(
                f"{target:11s} {reading + ':':18s} MAE 3D {np.abs(whole - truth).mean():.2f}, per view (mean of 3) "
                f"{np.abs(per_view - truth).mean():.2f}, three views read together "
                f"{np.abs(joint - truth).mean():.2f}, training median {np.abs(np.median(y) - truth).mean():.2f}"
            )


if __name__ == "__main__":
    main()
