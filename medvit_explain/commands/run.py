"""predict, train and explain: the commands that run the model."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click

from .options import (
    batch_size_option,
    default_model,
    device_option,
    explain_options,
    load_model_cli,
    load_models_cli,
    modality_option,
    model_config_option,
    model_option,
    out_dir_option,
    series_option,
)
from .roi import resolve_roi, roi_centers_option, roi_mask_option


def _explained(table) -> str:
    """``"40 slices"`` / ``"3 ROI(s)"``: what a run went over."""
    if table.mode == "roi":
        return f"{sum(1 for row in table.rows if row.get('view') == 'mean')} ROI(s)"
    if table.mode == "volume":
        return "the whole volume"
    return f"{len(table.rows)} slices"


def _input_unit(model, with_rois: bool) -> str:
    """What one input is, for the progress bar: a slice or an ROI view (2D models), an ROI cube or the whole
    volume (volumetric models)."""
    first = model[0] if isinstance(model, (list, tuple)) else model
    if getattr(first, "spatial_dims", 2) == 3:
        return "ROI" if with_rois else "volume"
    return "view" if with_rois else "slice"


def _progress_bar(total: int, desc: str, unit: str = "slice"):
    """A tqdm bar on stderr. When stderr is a pipe (a viewer reading the progress) every update is printed,
    the last one included: tqdm's 0.1 s refresh interval would otherwise drop the final "n/n" of a fast run,
    and a viewer's progress bar would stop short."""
    from tqdm.auto import tqdm

    piped = not sys.stderr.isatty()
    every = {"mininterval": 0, "miniters": 1} if piped else {}
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, **every)


@click.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=str))
@model_option
@model_config_option
@click.option(
    "--out",
    "out_csv",
    type=click.Path(dir_okay=False, path_type=str),
    default=None,
    help="Write the table to this CSV.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the rows and the summary as JSON.")
@batch_size_option
@device_option
@series_option
@modality_option
@roi_centers_option
@roi_mask_option
def predict(
    input_path,
    model_path,
    model_config,
    out_csv,
    as_json,
    batch_size,
    device,
    series_uid,
    allow_modality,
    roi_centers,
    roi_mask,
):
    """Score every slice (or every nodule ROI) with every target of the model.

    \b
    Example:
      medvit-explain predict sample_data/phantom_000.nii.gz --out predictions.csv
    """
    from ..errors import OutputError, os_error_message
    from ..io import load_volume
    from ..outputs.writing import output_folder
    from ..pipeline import input_count
    from ..prediction import predict as run_predict

    model_path = model_path or default_model(bool(roi_centers or roi_mask))
    model = load_model_cli(model_path, device, model_config)
    volume = load_volume(input_path, series_uid=series_uid, allow_modality=allow_modality)
    centres, mask = resolve_roi(roi_centers, roi_mask)
    total = input_count(model, volume, centres, mask)
    if out_csv and Path(out_csv).is_dir():
        raise OutputError(f"--out {out_csv} is a folder; give the CSV file to write")
    with output_folder(Path(out_csv).parent) if out_csv else contextlib.nullcontext():
        with _progress_bar(total, "predict", unit=_input_unit(model, centres is not None or mask is not None)) as bar:
            table = run_predict(
                model, volume, batch_size=batch_size, roi_centers=centres, roi_mask=mask, progress=bar.update
            )
        if out_csv:
            try:
                table.to_csv(out_csv)
            except OSError as exc:
                raise OutputError("cannot write " + os_error_message(exc, out_csv)) from None
    summary = table.summary()
    if as_json:
        click.echo(json.dumps({"columns": table.columns, "rows": table.rows, "summary": summary}))
        return
    if table.mode == "slice" and "max_malignancy_slice" in summary:
        click.echo(
            f"{len(table.rows)} slices; highest {table.primary}: slice {summary['max_malignancy_slice']} "
            f"(source index {summary['max_malignancy_source_index']}), "
            f"p = {summary['max_malignancy_prob']:.3f}"
        )
    elif table.mode == "volume" and "max_malignancy_prob" in summary:
        click.echo(f"whole volume: {table.primary} p = {summary['max_malignancy_prob']:.3f}")
    elif summary.get("nodules"):
        for row in summary["nodules"]:
            click.echo(
                f"ROI {row['roi']} (label {row['label']}): {table.primary} p = {row[f'{table.primary}_prob']:.3f}"
            )
    else:  # no probability to rank by (a regression-only model)
        click.echo(f"{_explained(table)} scored (no binary target to rank by)")
    if out_csv:
        click.echo(f"wrote {out_csv}")


@click.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Model + training recipe YAML (e.g. configs/sample_model.yaml).",
)
@click.option(
    "--data",
    required=True,
    type=click.Path(path_type=str),
    help="Folder of phantoms (make-phantom) or a manifest CSV (study_id, path, nodule_mask, labels).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=str), help="Checkpoint folder.")
@click.option(
    "--val-data",
    default=None,
    type=click.Path(path_type=str),
    help="Held-out data (default: a split of --data by study).",
)
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override the recipe's epochs.")
@click.option("--seed", type=int, default=None, help="Override the recipe's seed.")
@click.option("--resume", is_flag=True, help="Continue from the last finished epoch of an earlier run.")
@device_option
def train(config_path, data, out, val_data, epochs, seed, resume, device):
    """Train a ViT malignancy + biomarker model on phantoms or a manifest.

    \b
    Example:
      medvit-explain make-phantom runs/train --seed 0 --count 40
      medvit-explain train --config configs/sample_model.yaml --data runs/train --out runs/model
    """
    from ..model import load_config
    from ..workflows.train import train as run_train

    config = load_config(config_path)
    result = run_train(config, data, out, val_data=val_data, resume=resume, epochs=epochs, seed=seed, device=device)
    val = result.validation
    click.echo(
        f"best validation loss {result.best_val_loss:.4f}; malignancy AUC "
        f"{val.get('malignancy_auc', float('nan')):.3f}; checkpoint in {out}"
    )


@click.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=str))
@out_dir_option("Output folder [default: <stem>_explain/ next to the input].")
@explain_options
@series_option
@roi_centers_option
@roi_mask_option
def explain(input_path, out_dir, series_uid, roi_centers, roi_mask, options):
    """Explain a CT: maps on the source grid, predictions.csv, summary.json and report.html.

    \b
    Example:
      medvit-explain explain sample_data/phantom_000.nii.gz
      medvit-explain explain scan_dicom/ --method cdam --target malignancy --target spiculation --dicom
    """
    from ..io import load_volume
    from ..outputs import write_outputs
    from ..outputs.layout import volume_stem
    from ..outputs.writing import output_folder
    from ..pipeline import check_targets, explain_volume, input_count

    # everything that can fail on bad input is checked before the output folder is touched
    paths = options.model_paths or (default_model(bool(roi_centers or roi_mask)),)
    models = load_models_cli(paths, options.device, options.model_configs)
    model = models[0] if len(models) == 1 else models
    volume = load_volume(input_path, series_uid=series_uid, allow_modality=options.allow_modality)
    check_targets(model, options.targets)
    centres, mask = resolve_roi(roi_centers, roi_mask)
    if options.dicom:
        from ..io.dicom_output import dicom_sources

        dicom_sources(volume)  # everything --dicom needs from the input, checked before any work
    stem = volume_stem(input_path)
    out = Path(out_dir) if out_dir else Path(input_path).resolve().parent / f"{stem}_explain"
    total = input_count(model, volume, centres, mask)
    with output_folder(out):
        with _progress_bar(total, "explain", unit=_input_unit(model, centres is not None or mask is not None)) as bar:
            result = explain_volume(
                model,
                volume,
                methods=list(options.methods),
                targets=options.targets,
                batch_size=options.batch_size,
                precision=options.precision,
                roi_centers=centres,
                roi_mask=mask,
                progress=bar.update,
            )
        n_maps = len(result.methods) * len(result.targets)
        with _progress_bar(n_maps, "write", unit="map") as bar:
            written = write_outputs(
                result,
                out,
                stem=stem,
                map_dtype=options.map_dtype,
                report=options.report,
                dicom=options.dicom,
                progress=bar.update,
            )
    summary = result.predictions.summary()
    where = f"{len(written)} files in {out}" + (f"; report: {written['report']}" if "report" in written else "")
    if "max_malignancy_slice" in summary:
        click.echo(
            f"top {result.predictions.primary}: slice {summary['max_malignancy_slice']} "
            f"(source index {summary['max_malignancy_source_index']}) p = "
            f"{summary['max_malignancy_prob']:.3f}; {where}"
        )
    elif result.predictions.mode == "volume" and "max_malignancy_prob" in summary:
        click.echo(
            f"the whole volume explained ({result.predictions.primary} p = {summary['max_malignancy_prob']:.3f}); "
            f"{where}"
        )
    elif "max_malignancy_roi" in summary:
        click.echo(
            f"{len(summary.get('nodules', []))} ROI(s) explained (top {result.predictions.primary}: "
            f"ROI {summary['max_malignancy_roi']}, p = {summary['max_malignancy_prob']:.3f}); {where}"
        )
    else:  # no probability to rank by (a regression-only model)
        click.echo(f"{_explained(result.predictions)} explained (no binary target to rank by); {where}")
