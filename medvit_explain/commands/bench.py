"""``medvit-explain bench``: explanation cost beside a plain forward pass, and memory (workflows.bench; a
volumetric model: workflows.bench_volumetric)."""

from __future__ import annotations

import click

from .options import device_option, map_dtype_option, method_option, model_option


def _volume(ctx, param, value):
    if value is None:
        return None
    x, y, z = value
    if min(x, y) < 32 or z < 1:
        raise click.BadParameter(f"expected at least 32 x 32 voxels in plane and 1 slice, got {x} x {y} x {z}")
    return (x, y, z)


@click.command()
@model_option
@click.option(
    "--arch",
    default=None,
    metavar="NAME",
    help="A timm ViT with random weights instead of a checkpoint (e.g. vit_small_patch16_224; "
    "1 channel, 9 LIDC targets).",
)
@click.option(
    "--image-size",
    type=click.IntRange(min=16),
    default=None,
    help="With --arch: input size in pixels [default: the variant's].",
)
@click.option(
    "--slices",
    type=click.IntRange(min=1),
    default=None,
    help="Slices in the timed batch (the same slices for every measurement); a volumetric model: inputs "
    "(nodule cubes or whole volumes) [default: 16; volumetric: 8].",
)
@device_option
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Warm runs per measurement (the median is reported).",
)
@method_option(default=(), help="Only these methods (repeat) [default: every method in list-methods].")
@click.option(
    "--loop-slices",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Slices (volumetric: inputs) the per-slice, per-target loop runs on (its time is scaled to --slices).",
)
@click.option(
    "--volume",
    type=(int, int, int),
    default=None,
    callback=_volume,
    metavar="X Y Z",
    help="Phantom volume for end to end and memory (memory also runs 4 x Z) [default: 192 192 32]; a volumetric "
    "model: the phantom its timed inputs come from [default: 256 256 64].",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Slices per pass end to end."
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default="fp32",
    show_default=True,
    help="Autocast precision end to end (volumetric: in the whole-volume memory case).",
)
@click.option("--no-memory", is_flag=True, help="Skip the memory subprocesses.")
@click.option(
    "--volumetric-volume",
    "volumetric_volume",
    type=(int, int, int),
    default=None,
    callback=_volume,
    metavar="X Y Z",
    help="A volumetric model: the phantom CT (at 0.7 x 0.7 x 1.0 mm) of the whole-volume memory case "
    "[default: 512 512 300].",
)
@click.option(
    "--e2e-size",
    "e2e_size",
    type=(int, int, int),
    default=None,
    callback=_volume,
    metavar="X Y Z",
    help="Also run the whole explain job (overlays and report) on a phantom of this size at 0.7 x 0.7 x 1.0 mm "
    "in fresh processes, e.g. 512 512 300: stage seconds, bytes written, peak RSS.",
)
@click.option("--e2e-only", is_flag=True, help="Run only the --e2e-size case.")
@map_dtype_option
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON instead of the table.")
def bench(
    model_path,
    arch,
    image_size,
    slices,
    device,
    repeats,
    methods,
    loop_slices,
    volume,
    batch_size,
    precision,
    no_memory,
    volumetric_volume,
    e2e_size,
    e2e_only,
    map_dtype,
    as_json,
):
    """Time every explainer against a plain forward pass, the papers' per-slice loop and pytorch-grad-cam;
    end to end slices per second; peak memory for N and 4 x N slices.

    A volumetric (3D) model gets its own bench: cdam, agcam, attention, rollout and gradcam on a batch of
    phantom cubes (or whole volumes) against a forward, the papers' loop, and peak memory of a forward vs
    cdam + agcam for a batch of 8 crops of 64^3 voxels and for a whole 512 x 512 x 300 CT, each in a fresh
    process.

    \b
    Example:
      medvit-explain bench                                        # the sample model, a few minutes on CPU
      medvit-explain bench --arch vit_small_patch16_224 --slices 8 --json
      medvit-explain bench --e2e-size 512 512 300 --e2e-only          # a clinical-size CT, ~2 minutes
      medvit-explain bench --model sample-roi3d                   # a volumetric model, a few minutes on CPU
    """
    from ..report.bench import format_table
    from ..workflows.bench import DEFAULT_VOLUME, bench_model, run_bench, to_json
    from ..workflows.bench_volumetric import is_volumetric

    if model_path and arch:
        raise click.BadParameter("expected --model or --arch, got both")
    if e2e_only and not e2e_size:
        raise click.BadParameter("--e2e-only needs --e2e-size X Y Z")
    if image_size and not arch:
        raise click.BadParameter("--image-size needs --arch (a checkpoint has its own input size)")
    model = bench_model(model_path, arch, device, image_size)
    if is_volumetric(model):
        if e2e_size or e2e_only:
            raise click.BadParameter(
                "--e2e-size / --e2e-only are for 2D models (a volumetric model: see the memory cases)"
            )
        _bench_volumetric(
            model, slices, repeats, methods, loop_slices, volume, no_memory, volumetric_volume, precision, as_json
        )
        return
    if volumetric_volume:
        raise click.BadParameter("--volumetric-volume needs a volumetric model (spatial_dims 3)")
    source = (
        {"arch": arch, "image_size": image_size, "seed": 0}
        if arch
        else {"model_path": model_path}
        if model_path
        else {"model_path": None}
    )

    def say(msg: str) -> None:
        click.echo(f"[bench] {msg}", err=True)

    result = run_bench(
        model,
        slices=slices or 16,
        repeats=repeats,
        methods=list(methods) or None,
        loop_slices=loop_slices,
        volume=volume or DEFAULT_VOLUME,
        memory=not no_memory,
        batch_size=batch_size,
        precision=precision,
        model_source=source,
        progress=say,
        clinical_size=e2e_size,
        clinical_only=e2e_only,
        map_dtype=map_dtype,
    )
    click.echo(to_json(result) if as_json else format_table(result))


def _bench_volumetric(
    model, items, repeats, methods, loop_items, phantom, no_memory, whole_volume, precision, as_json
) -> None:
    from ..report.bench import format_volumetric_table
    from ..workflows.bench import to_json
    from ..workflows.bench_volumetric import (
        DEFAULT_ITEMS,
        DEFAULT_PHANTOM,
        DEFAULT_WHOLE_VOLUME,
        run_bench_volumetric,
    )

    def say(msg: str) -> None:
        click.echo(f"[bench] {msg}", err=True)

    result = run_bench_volumetric(
        model,
        items=items or DEFAULT_ITEMS,
        repeats=repeats,
        methods=list(methods) or None,
        loop_items=loop_items,
        phantom_size=phantom or DEFAULT_PHANTOM,
        memory=not no_memory,
        whole_volume=whole_volume or DEFAULT_WHOLE_VOLUME,
        precision=precision,
        progress=say,
    )
    click.echo(to_json(result.to_dict()) if as_json else format_volumetric_table(result))
