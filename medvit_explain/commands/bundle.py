"""export-bundle: a model → a MONAI bundle (metadata, inference config, safetensors checkpoint, docs)."""

from __future__ import annotations

import click

from .options import method_option, model_option, out_dir_option


@click.command("export-bundle")
@model_option
@out_dir_option("Bundle folder to write (replaced only if it holds a bundle written by export-bundle).", required=True)
@method_option(help="The bundle's default explanation method (repeat for several); see list-methods.")
@click.option("--bundle-version", default="0.1.0", show_default=True, help="The bundle's version (metadata.json).")
def export_bundle(model_path, out_dir, methods, bundle_version):
    """Write a MONAI bundle of a model: configs/metadata.json, configs/inference.json (the model-input chain,
    the explainers, the maps back on the CT's grid), models/model/ (the safetensors checkpoint) and docs/.

    \b
    Example:
      medvit-explain export-bundle --out sample_bundle
      python -m monai.bundle run --config_file sample_bundle/configs/inference.json \\
          --input scan.nii.gz --output_dir out
    """
    from ..bundle import export_bundle as write_bundle

    path = write_bundle(model_path, out_dir, methods=list(methods), version=bundle_version)
    click.echo(f"wrote the MONAI bundle {path} (methods: {', '.join(methods)})")
