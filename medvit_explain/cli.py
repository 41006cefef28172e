"""The ``medvit-explain`` command line: a thin click layer over the Python API.

Imports here stay light (click and the registry only) so ``--help`` is instant; each command imports
what it needs when it runs. Every user error (a ``MedvitInputError`` or a bad option) becomes one line
on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys
import warnings

import click

from .commands.options import modality_option, series_option
from .errors import OS_ADVICE, MedvitInputError, MedvitWarning, os_error_message, printable
from .vocabulary import PHANTOM_GENERATOR_VERSIONS


class MedvitGroup(click.Group):
    """A group that reports user errors as one line with exit code 2 (no traceback).

    Our own warnings (:class:`~medvit_explain.errors.MedvitWarning`) are printed as one ``warning:``
    line each; other libraries' warnings (deprecations, pickling notes) are silenced.
    """

    def invoke(self, ctx: click.Context):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("always", MedvitWarning)
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except MedvitInputError as exc:
                _fail(str(exc))
            except click.UsageError as exc:
                _fail(exc.format_message())
            except click.exceptions.FileError as exc:
                _fail(exc.format_message())
            except OSError as exc:
                if exc.errno not in OS_ADVICE:
                    raise
                _fail(os_error_message(exc))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = "warning: " + " ".join(printable(message).split())
    if "tqdm" in sys.modules:  # a progress bar may be on the line: clear it, print, draw it again
        sys.modules["tqdm"].tqdm.write(text, file=sys.stderr)
    else:
        click.echo(text, err=True)


def _fail(message: str) -> None:
    click.echo("error: " + " ".join(printable(message).split()), err=True)
    sys.exit(2)


@click.group(cls=MedvitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="medvit-explain")
def cli() -> None:
    """Explain Vision Transformer predictions on CT scans (CDAM, AG-CAM and baselines).

    \b
    Start with:
      medvit-explain explain scan.nii.gz          # maps, predictions and a report
      medvit-explain inspect scan_dicom/          # what a file or folder holds
      medvit-explain list-methods                 # the explanation methods
    """


@cli.command()
@click.argument("path", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (shape, spacing, origin, direction, ...).")
@series_option
@modality_option
def inspect(path: str, as_json: bool, series_uid: str | None, allow_modality: bool) -> None:
    """Show a CT's shape, spacing, origin, direction (LPS), modality and HU range.

    \b
    Example:
      medvit-explain inspect sample_data/phantom_000.nii.gz --json
    """
    from pathlib import Path

    from .io import find_dicom_series, load_volume

    volume = load_volume(path, series_uid=series_uid, allow_modality=allow_modality)
    info = {
        "shape": list(volume.shape),
        "spacing": [float(v) for v in volume.spacing],
        "origin": [float(v) for v in volume.origin],
        "direction": [float(v) for v in volume.direction.reshape(-1)],
        "modality": volume.modality,
        "hu_min": float(volume.array.min()),
        "hu_max": float(volume.array.max()),
    }
    if as_json:
        click.echo(json.dumps(info))
        return
    for key, value in info.items():
        click.echo(f"{key:10s} {value}")
    if Path(path).is_dir():
        for series in find_dicom_series(path):
            click.echo(f"series     {series.describe()}")


@cli.command("make-phantom")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--seed", type=int, required=True, help="Random seed (same seed, same files).")
@click.option("--count", type=click.IntRange(min=1), default=1, show_default=True, help="Number of phantoms.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["nifti", "dicom"]),
    default="nifti",
    show_default=True,
    help="dicom also writes a CT DICOM series folder per phantom.",
)
@click.option("--size", type=(int, int, int), default=None, help="Voxels along x, y, z [default: 256 256 64].")
@click.option(
    "--spacing", type=(float, float, float), default=None, help="Voxel size in mm along x, y, z [default: 1.4 1.4 2.5]."
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Processes making phantoms at once (the same files with any number).",
)
@click.option(
    "--generator-version",
    type=click.Choice(PHANTOM_GENERATOR_VERSIONS),
    default=PHANTOM_GENERATOR_VERSIONS[0],
    show_default=True,
    help="2.1 draws the sphericity, lobulation and margin grades as visible steps at the grid; 2.2 also makes "
    "each lobulation step at least 1 mm on any grid.",
)
def make_phantom(
    out_dir: str, seed: int, count: int, fmt: str, size, spacing, workers: int, generator_version: str
) -> None:
    """Generate synthetic chest-CT phantoms with nodules, masks and labels.

    \b
    Example:
      medvit-explain make-phantom phantoms/ --seed 7 --count 4 --format dicom
    """
    from .phantom import DEFAULT_SIZE, DEFAULT_SPACING, make_phantoms

    size = tuple(size or DEFAULT_SIZE)
    spacing = tuple(spacing or DEFAULT_SPACING)
    if min(size) < 16 or min(spacing) <= 0:
        raise click.BadParameter(f"expected --size of at least 16 voxels and --spacing > 0, got {size} and {spacing}")
    written = make_phantoms(
        out_dir,
        seed=seed,
        count=count,
        format=fmt,
        size=size,
        spacing=spacing,
        workers=workers,
        generator_version=generator_version,
    )
    click.echo(f"wrote {len(written)} phantom(s) to {out_dir}")


@cli.command("list-methods")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_methods_cmd(as_json: bool) -> None:
    """List the explanation methods, their papers and whether they are class-sensitive.

    \b
    Example:
      medvit-explain list-methods
    """
    from .registry import list_methods

    methods = list_methods()
    if as_json:
        click.echo(json.dumps(methods, indent=2))
        return
    for m in methods:
        sensitive = "class-sensitive" if m["class_sensitive"] else "class-agnostic"
        click.echo(f"{m['name']:16s} {sensitive:15s} {m['title']}")
        click.echo(f"{'':16s} {'':15s} {m['citation']}")


def _add_commands() -> None:
    from .commands.batch import batch
    from .commands.bench import bench
    from .commands.bundle import export_bundle
    from .commands.evaluate import audit, evaluate
    from .commands.model import convert
    from .commands.run import explain, predict, train

    for command in (predict, train, explain, evaluate, audit, batch, bench, convert, export_bundle):
        cli.add_command(command)


_add_commands()


def main() -> None:
    cli(prog_name="medvit-explain")


if __name__ == "__main__":
    main()
