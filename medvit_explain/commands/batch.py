"""batch: explain many studies (a manifest CSV or a folder), resumably, locally or on Ray."""

from __future__ import annotations

import dataclasses

import click

from .options import default_model, explain_options, out_dir_option


@click.command()
@click.argument("manifest", type=click.Path(path_type=str))
@out_dir_option("Output folder: DIR/<study_id>/, DIR/results.csv, DIR/batch.json (re-run to resume).", required=True)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: this process, one device. ray: a pool of model-holding Ray workers.",
)
@click.option(
    "--ray-address",
    default=None,
    metavar="ADDR",
    help="Join a Ray cluster (auto, host:6379 or ray://host:10001) [default: start a local Ray].",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Ray workers, each holding the model [default: GPUs / --gpus-per-worker, or 1].",
)
@click.option(
    "--gpus-per-worker",
    type=click.FloatRange(min=0.0),
    default=None,
    help="GPUs per Ray worker (0.5 packs two on a GPU) [default: 1 if the cluster has GPUs, else 0].",
)
@click.option("--retry-failed", is_flag=True, help="Run the studies that failed before again.")
@click.option("--no-audit", is_flag=True, help="Skip the whole-set audit report (run when studies have labels).")
@explain_options
@click.option(
    "--roi-from-mask",
    is_flag=True,
    help="Explain nodule ROIs taken from each study's nodule_mask instead of every slice.",
)
@click.pass_context
def batch(
    ctx,
    manifest,
    out_dir,
    engine,
    ray_address,
    workers,
    gpus_per_worker,
    retry_failed,
    no_audit,
    roi_from_mask,
    options,
):
    """Explain every study of MANIFEST into --out; re-run the same command to resume.

    MANIFEST is a CSV with the columns study_id,path (optional nodule_mask, labels, malignancy), or a
    folder whose NIfTI/NRRD/MHA files and DICOM series folders become studies. A study_id names the
    study's folder in --out: 1 to 128 letters, digits, '.', '_' or '-', not starting with '.', and not
    results.csv, batch.json or audit. A study is skipped when its completion record says it is done from
    the same input (path, size, modification time); a failed study is recorded and the others go on
    (exit code 1 if any study failed; --retry-failed runs them again, a changed input too).

    \b
    Example:
      medvit-explain batch sample_data --out runs/batch
      medvit-explain batch studies.csv --out runs/batch --engine ray --workers 4 --gpus-per-worker 1
    """
    ray_options = {"--ray-address": ray_address, "--workers": workers, "--gpus-per-worker": gpus_per_worker}
    for name, value in ray_options.items():
        if engine == "local" and value is not None:
            raise click.UsageError(f"{name} needs --engine ray")

    from ..batch import BatchSettings, run_batch

    if len(options.model_paths) > 1:
        raise click.BadParameter(
            "batch runs one model per job; run one batch per model (or `explain` with several --model)",
            param_hint="--model",
        )
    given = dataclasses.asdict(options)
    paths, configs = given.pop("model_paths"), given.pop("model_configs")
    given["model_path"] = paths[0] if paths else default_model(roi_from_mask)
    given["model_config"] = (configs or (None,))[0]
    settings = BatchSettings(**given, roi_from_mask=roi_from_mask)
    summary = run_batch(
        manifest,
        out_dir,
        settings,
        engine=engine,
        ray_address=ray_address,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        retry_failed=retry_failed,
        audit=not no_audit,
        log=lambda line: click.echo(line, err=True),
    )
    _echo_summary(summary)
    if summary.failed:
        ctx.exit(1)


def _echo_summary(summary) -> None:
    from ..errors import printable

    rate = "" if summary.studies_per_min is None else f" at {summary.studies_per_min:.1f} studies/min"
    redone = f", {summary.changed} of them because their input changed" if summary.changed else ""
    click.echo(
        f"{summary.done}/{summary.total} studies done, {summary.failed} failed "
        f"({summary.ran} processed{redone} in {summary.elapsed_s:.1f} s{rate}); "
        f"results: {printable(summary.results_csv)}"
    )
    for study_id, error in summary.failures:
        click.echo(f"failed: {printable(study_id)}: {printable(error)}")
    if summary.audit is not None:
        click.echo(f"audit: {printable(summary.audit)}")
