"""Versions of the packages a result depends on (recorded in checkpoints, summary.json and reports)."""

from __future__ import annotations

PACKAGES = ("medvit-explain", "torch", "timm", "monai", "safetensors", "SimpleITK", "pydicom", "nibabel", "numpy")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """{distribution: version} for the installed ones among ``names`` (default :data:`PACKAGES`), in that order."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out
