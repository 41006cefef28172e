"""How well can the shape biomarkers (sphericity, lobulation) be read from a nodule's own mask?

A grader that sees the drawn nodule mask itself (no blur, no noise, no neighbours), the ground truth the
ROI model never gets, is fitted on the training phantoms and scored on held-out ones, twice:

* ``3D mask``: from the whole 3D mask (axis ratios of its second moments, how far its surface strays from
  the moment ellipsoid);
* ``per view``: from what one ROI view holds, the mask on the view's five planes (the sample-roi's 3 mm
  apart: extent, axis ratio and roughness on each), one prediction per view, averaged over the axial,
  coronal and sagittal views as the ROI model's ``mean`` row averages its views; and the same planes of
  the three views read together (one prediction from all of them), what a model that fuses its views
  could reach.

The per-view grader is the fair reference for a model that scores each view on its own; the 3D one says
what the phantoms hold at all. Gradient-boosted trees (scikit-learn, installed with grad-cam) on those
features; each biomarker's MAE on the LIDC 1-5 scale, with predicting the training median next to it.

    .venv/bin/python scripts/shape_oracle.py --train runs/sample_roi_model/train --test runs/sample_roi_model/test

(the folders ``scripts/make_sample_model.py --config configs/sample_roi_model.yaml`` writes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

TARGETS = ("sphericity", "lobulation")
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


def nodule_features(folder: Path, offsets, half: float):
    """For every labelled nodule of the phantoms in ``folder``: (3D features, per-view features [3, F],
    labels [sphericity, lobulation])."""
    vol, views, labels = [], [], []
    for meta in sorted(folder.glob("*.json")):
        if meta.name == "phantoms.json":
            continue
        nodules = json.loads(meta.read_text()).get("nodules") or []
        if not nodules:
            continue
        image = nib.load(str(meta.with_name(meta.name[: -len(".json")] + "_nodules.nii.gz")))
        ids = np.asarray(image.dataobj)
        spacing = np.abs(np.diag(image.affine)[:3])  # the phantoms' grids are axis-aligned
        for nodule in nodules:
            idx = np.argwhere(ids == nodule["id"])
            if len(idx) < 8:
                continue
            xyz = idx * spacing
            xyz = xyz - xyz.mean(0)
            vol.append(_volume_features(xyz, float(nodule["diameter_mm"])))
            per_view = []
            for axis in VIEW_NORMALS.values():
                keep = [a for a in range(3) if a != axis]
                per_view.append(_plane_features(xyz[:, keep], xyz[:, axis], offsets, half) + [nodule["diameter_mm"]])
            views.append(per_view)
            labels.append([float(nodule[t]) for t in TARGETS])
    return np.array(vol), np.array(views), np.array(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, type=Path)
    parser.add_argument("--test", required=True, type=Path)
    parser.add_argument("--offsets", default="-6,-3,0,3,6", help="plane offsets (mm) of a view [sample-roi's]")
    parser.add_argument("--half", type=float, default=1.5, help="half the slab a plane reads (mm)")
    args = parser.parse_args()
    from sklearn.ensemble import GradientBoostingRegressor

    offsets = [float(v) for v in args.offsets.split(",")]
    train = nodule_features(args.train, offsets, args.half)
    test = nodule_features(args.test, offsets, args.half)
    print(f"{len(train[2])} training nodules, {len(test[2])} held-out nodules")
    for k, target in enumerate(TARGETS):
        y, truth = train[2][:, k], test[2][:, k]

        def fit(x, labels):
            return GradientBoostingRegressor(n_estimators=200, max_depth=3, random_state=0).fit(x, labels)

        whole = fit(train[0], y).predict(test[0])
        n_feat = train[1].shape[-1]
        per_view = fit(train[1].reshape(-1, n_feat), np.repeat(y, 3)).predict(test[1].reshape(-1, n_feat))
        per_view = per_view.reshape(-1, 3).mean(1)
        joint = fit(train[1].reshape(len(y), -1), y).predict(test[1].reshape(len(truth), -1))
        print(
            f"{target:11s} MAE: 3D mask {np.abs(whole - truth).mean():.2f}, per view (mean of 3) "
            f"{np.abs(per_view - truth).mean():.2f}, three views read together {np.abs(joint - truth).mean():.2f}, "
            f"training median {np.abs(np.median(y) - truth).mean():.2f}"
        )


if __name__ == "__main__":
    main()
