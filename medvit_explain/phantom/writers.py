"""Writing phantoms to disk: NIfTI volumes, an optional DICOM series, the labels JSON; sets of phantoms."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..processes import map_in_processes
from ..vocabulary import FEATURES_SUFFIX, LUNGS_SUFFIX, NODULES_SUFFIX
from .generate import DEFAULT_SIZE, DEFAULT_SPACING, GENERATOR_VERSION, Phantom, generate_phantom
from .labels import _labels_json


def _atomic_json(obj: Any, path: Path) -> None:
    from ..io.writer import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def write_phantom(phantom: Phantom, out_dir: str | os.PathLike, name: str, format: str = "nifti") -> dict[str, Path]:
    """Write a phantom as files; returns ``{"ct", "nodule_mask", "lung_mask", "features", "json"[, "dicom"]}``
    paths.

    ``<name>.nii.gz`` (CT, int16 HU), ``<name>_nodules.nii.gz`` (int16 ids), ``<name>_lungs.nii.gz``
    (uint8), ``<name>_features.nii.gz`` (uint8 feature labels 0-5, see ``Phantom.features``),
    ``<name>.json`` (labels and generator arguments) and, for ``format="dicom"``, the CT as a
    series in ``<name>_dicom/`` (deterministic UIDs from the seed and name). Every file is written to a
    temporary name and renamed, so no partial file sits at a final path; the same phantom written twice
    gives byte-identical files.
    """
    from ..io.dicom_series import write_ct_series
    from ..io.writer import usual_mode, write_volume

    if format not in ("nifti", "dicom"):
        raise ValueError(f"expected format 'nifti' or 'dicom', got {format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "ct": write_volume(phantom.ct, out / f"{name}.nii.gz", dtype=np.int16),
        "nodule_mask": write_volume(phantom.nodule_mask, out / f"{name}{NODULES_SUFFIX}.nii.gz", dtype=np.int16),
        "lung_mask": write_volume(phantom.lung_mask, out / f"{name}{LUNGS_SUFFIX}.nii.gz", dtype=np.uint8),
        "features": write_volume(phantom.features, out / f"{name}{FEATURES_SUFFIX}.nii.gz", dtype=np.uint8),
    }
    if format == "dicom":
        final = out / f"{name}_dicom"
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}_dicom.", dir=out))
        os.chmod(tmp, usual_mode(directory=True))  # mkdtemp makes 0700; this folder becomes the series
        try:
            write_ct_series(
                phantom.ct,
                tmp,
                series_description=f"medvit-explain phantom {name}",
                uid_seed=f"phantom:{phantom.generator_version}:{phantom.seed}:{name}",
                patient_id=name,
                window=(-600.0, 1500.0),
            )
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        paths["dicom"] = final
    json_path = out / f"{name}.json"
    _atomic_json(_labels_json(phantom), json_path)
    paths["json"] = json_path
    return paths


def phantom_seed(seed: int, index: int) -> int:
    """The seed of phantom ``index`` in a set made from ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint32)[0])


def make_phantoms(
    out_dir: str | os.PathLike,
    seed: int,
    count: int = 1,
    format: str = "nifti",
    size: Sequence[int] = DEFAULT_SIZE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    name_prefix: str = "phantom",
    workers: int = 1,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Generate and write ``count`` phantoms ``<name_prefix>_000``, ``_001``, … into ``out_dir``.

    Phantom ``i`` uses ``phantom_seed(seed, i)``; extra keyword arguments go to ``generate_phantom``.
    ``workers`` > 1 makes them in that many spawned processes (the same files, byte for byte; as with any
    spawned process, a script calling this must do so under ``if __name__ == "__main__":``).
    Returns one dict per phantom: the paths of ``write_phantom`` plus ``name``, ``seed`` and ``nodules``.
    """
    jobs = [_PhantomJob(out_dir, seed, i, name_prefix, format, size, spacing, kwargs) for i in range(int(count))]
    return _make_all(jobs, workers)


def make_phantom_groups(
    out_dir: str | os.PathLike,
    groups: Sequence[Mapping[str, Any]],
    seed: int,
    name_prefix: str = "grid",
    workers: int = 1,
    generator_version: str = GENERATOR_VERSION,
) -> list[dict[str, Any]]:
    """Several :func:`make_phantoms` sets in one folder, one per grid: group ``g`` (``count``, ``size``,
    ``spacing``, optionally ``nodules``: that many nodules in each phantom instead of 0-3) uses seed
    ``seed + 100 g`` and names ``<name_prefix><g>_000``, … (the recipes in ``configs/sample_model.yaml``);
    ``workers`` processes share all the groups' phantoms; ``generator_version`` as in ``generate_phantom``."""
    jobs = [
        _PhantomJob(
            out_dir,
            seed + 100 * g,
            i,
            f"{name_prefix}{g}",
            "nifti",
            tuple(group["size"]),
            tuple(group["spacing"]),
            {"n_nodules": group.get("nodules"), "generator_version": generator_version},
        )
        for g, group in enumerate(groups)
        for i in range(int(group["count"]))
    ]
    return _make_all(jobs, workers)


@dataclass(frozen=True)
class _PhantomJob:
    """One phantom of a set (:func:`_make_one` makes it)."""

    out_dir: str | os.PathLike
    seed: int
    index: int
    name_prefix: str
    format: str
    size: Sequence[int]
    spacing: Sequence[float]
    kwargs: Mapping[str, Any]


def _make_one(job: _PhantomJob) -> dict[str, Any]:
    """``generate_phantom(phantom_seed(seed, index), …)`` written as ``<name_prefix>_<index:03d>``."""
    s = phantom_seed(job.seed, job.index)
    name = f"{job.name_prefix}_{job.index:03d}"
    ph = generate_phantom(s, size=job.size, spacing=job.spacing, **job.kwargs)
    paths = write_phantom(ph, job.out_dir, name, format=job.format)
    return {**paths, "name": name, "seed": s, "nodules": ph.nodules}


def _make_all(jobs: list[_PhantomJob], workers: int) -> list[dict[str, Any]]:
    """Every job's result in order: here, or over ``workers`` spawned processes (each phantom depends on its
    own seed only, so the files are the same either way)."""
    return list(map_in_processes(_make_one, jobs, workers))
