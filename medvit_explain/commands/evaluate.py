"""evaluate and audit: measuring the explanations and auditing the model on a labelled dataset."""

from __future__ import annotations

from pathlib import Path

import click

from .options import (
    batch_size_option,
    device_option,
    load_model_cli,
    method_option,
    model_option,
    out_dir_option,
    parse_targets,
    target_option,
)


def _all_methods():
    from ..registry import method_names

    return method_names()


def _out_dir(out: str | None, default: str) -> Path:
    from ..errors import MedvitInputError

    path = Path(out) if out else Path(default)
    if path.exists() and not path.is_dir():
        raise MedvitInputError(f"--out {path} exists and is not a folder")
    return path


@click.command()
@click.argument("data", metavar="DATA", type=click.Path(path_type=str))
@method_option(default=(), help="Explanation method (repeat for several) [default: every method of list-methods].")
@target_option
@out_dir_option("Folder for metrics.json and evaluation.html.", default="evaluation")
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json instead of the table.")
@model_option
@device_option
@batch_size_option
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed (slice subset, stochastic methods, randomised blocks)."
)
@click.option(
    "--max-slices",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Explain at most N nodule slices (a seeded random subset) [default: all].",
)
@click.option(
    "--randomize-blocks",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    metavar="K",
    help="Sanity check: re-initialise the top 1..K blocks (cascading); 0 skips it.",
)
@click.option(
    "--min-area",
    "min_area_mm2",
    type=click.FloatRange(min=0),
    default=40.0,
    show_default=True,
    help="A slice counts as a nodule slice from this nodule cross-section (mm²).",
)
@click.option(
    "--protocol",
    type=click.Choice(["default", "agcam"]),
    default="default",
    show_default=True,
    help="agcam: the AG-CAM paper's protocol (correctly classified slices only, boxes from the map's largest "
    "region, removed pixels set to 0).",
)
def evaluate(
    data,
    methods,
    targets,
    out_dir,
    as_json,
    model_path,
    device,
    batch_size,
    seed,
    max_slices,
    randomize_blocks,
    min_area_mm2,
    protocol,
):
    """Measure every explanation method on labelled phantoms (or a manifest CSV).

    Localization against the nodule masks (AG-CAM protocol), faithfulness (ABPC, deletion, insertion),
    compactness, class sensitivity and a model-randomisation sanity check; also the model's own ROC AUC,
    accuracy and biomarker MAE. Writes metrics.json and evaluation.html and prints a method × metric table.

    \b
    Example:
      medvit-explain evaluate sample_data --method cdam --method agcam --out eval/
      medvit-explain evaluate sample_data --protocol agcam --out eval_agcam/
    """
    import torch

    from ..report.evaluation import ceiling_line, format_table, write_evaluation
    from ..workflows.evaluate import evaluate_explanations

    methods = list(methods) if methods else _all_methods()
    out = _out_dir(out_dir, "evaluation")
    model = load_model_cli(model_path, device)
    torch.manual_seed(seed)
    result = evaluate_explanations(
        model,
        data,
        methods,
        parse_targets(targets),
        batch_size=batch_size,
        seed=seed,
        max_slices=max_slices,
        randomize_blocks=randomize_blocks,
        min_area_mm2=min_area_mm2,
        protocol=protocol,
    )
    written = write_evaluation(result, out)
    if as_json:
        click.echo(written["metrics"].read_text())
        return
    m = result.metrics
    if m.get("mode") == "roi":
        click.echo(
            f"{m['n_nodules']} nodules ({m['n_views']} views, {m['n_studies']} studies); model malignancy AUC "
            f"{_num(m['model'].get('malignancy_auc'))} per nodule; target-specific localization:"
        )
        click.echo(format_table(m))
        click.echo(f"wrote {written['metrics']} and {written['report']}")
        return
    click.echo(
        f"{m['n_slices']} nodule slices ({m['n_nodules']} nodules, {m['n_studies']} studies); model "
        f"malignancy AUC {_num(m['model'].get('malignancy_auc'))} on {m['n_model_slices']} slices"
    )
    click.echo(format_table(m))
    if ceiling_line(m):
        click.echo(ceiling_line(m))
    if m["randomization_flagged"]:
        click.echo(f"sanity check flagged: {', '.join(m['randomization_flagged'])}")
    click.echo(f"wrote {written['metrics']} and {written['report']}")


def _num(value) -> str:
    return "nan" if value is None else f"{float(value):.3f}"


@click.command()
@click.argument("data", metavar="DATA", type=click.Path(path_type=str))
@model_option
@method_option(help="Explanation method for the evidence check (repeat for several).")
@out_dir_option("Folder for audit.html, audit.csv and audit.json.", default="audit")
@click.option(
    "--top-slices",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Slices per study (highest P(malignancy)) whose evidence is measured.",
)
@click.option("--json", "as_json", is_flag=True, help="Print audit.json.")
@device_option
@batch_size_option
def audit(data, model_path, methods, out_dir, top_slices, as_json, device, batch_size):
    """Audit malignancy predictions over labelled studies: ROC / PR, calibration, and where the evidence is.

    A study is malignant if any of its nodules is; its score is the highest slice probability. For each
    study the share of positive CDAM / AG-CAM evidence inside the nodule, the lungs and outside the body is
    measured on its top slices; studies with evidence mostly outside the lesion are listed first.

    \b
    Example:
      medvit-explain audit sample_data --out audit/
    """
    from ..report.evaluation import write_audit
    from ..workflows.audit import audit as run_audit

    methods = list(methods)
    out = _out_dir(out_dir, "audit")
    model = load_model_cli(model_path, device)

    def report(name: str, message: str) -> None:
        click.echo(f"warning: study {name} failed and was skipped: {message}", err=True)

    result = run_audit(model, data, methods=methods, batch_size=batch_size, top_slices=top_slices, on_failure=report)
    written = write_audit(result, out)
    if as_json:
        click.echo(written["json"].read_text())
        return
    s = result.summary
    study = s.get("study") or {}
    click.echo(
        f"{s['n_studies']} studies audited ({len(result.failures)} failed); study-level AUC "
        f"{_num(study.get('auc'))}, sensitivity {_num(study.get('sensitivity'))}, specificity "
        f"{_num(study.get('specificity'))}, ECE {_num(study.get('ece'))}"
    )
    outside = [r["study"] for r in result.rows if r.get("mostly_outside_lesion")]
    if outside:
        click.echo(f"evidence mostly outside the lesion: {', '.join(outside)}")
    click.echo(f"wrote {written['report']}, {written['csv']} and {written['json']}")


__all__ = ["audit", "evaluate"]
