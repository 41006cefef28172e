"""Options shared by several commands, validated in one place."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import click

from ..vocabulary import DEFAULT_MAP_DTYPE, DEFAULT_MODEL, DEFAULT_ROI_MODEL, EXPECTED_DEVICES, MAP_DTYPES, is_device


class DeviceType(click.ParamType):
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (availability is checked when the model is placed)."""

    name = "device"

    def convert(self, value, param, ctx):
        if not is_device(str(value)):
            self.fail(f"expected {EXPECTED_DEVICES}, got {value!r}", param, ctx)
        return str(value).strip().lower()


DEVICE = DeviceType()

device_option = click.option(
    "--device",
    type=DEVICE,
    default="auto",
    show_default=True,
    help=f"{EXPECTED_DEVICES} (auto: a GPU if there is one).",
)
# the shipped models' names and the default choice, said once for every --model
MODEL_HELP = (
    "Checkpoint folder or weights file, or a shipped model: sample-slice (whole slices), sample-roi "
    "(nodule ROIs, 3 views) or sample-roi3d (3D nodule cubes, a volumetric ViT). Default: sample-roi when "
    "ROIs are given, else sample-slice. A name wins over a folder of that name here; write ./sample-roi for "
    "the folder."
)
model_option = click.option("--model", "model_path", default=None, metavar="CKPT", help=MODEL_HELP)
model_config_option = click.option(
    "--model-config",
    default=None,
    metavar="FILE",
    help="Config (JSON/YAML) for a bare timm state dict given with --model.",
)
models_option = click.option(
    "--model",
    "model_paths",
    multiple=True,
    metavar="CKPT",
    help=MODEL_HELP + " Repeat to run several models (e.g. a malignancy and a biomarker model) into one "
    "table and report.",
)
model_configs_option = click.option(
    "--model-config",
    "model_configs",
    multiple=True,
    metavar="FILE",
    help="Config (JSON/YAML) for weights given with --model (one per --model, same order, when several).",
)
batch_size_option = click.option(
    "--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Slices per pass."
)
precision_option = click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default="fp32",
    show_default=True,
    help="Autocast precision for the model and explainers.",
)
series_option = click.option(
    "--series",
    "series_uid",
    default=None,
    metavar="UID",
    help="SeriesInstanceUID to load when a DICOM folder holds several series.",
)
modality_option = click.option("--allow-modality", is_flag=True, help="Load a non-CT DICOM instead of refusing it.")
map_dtype_option = click.option(
    "--map-dtype",
    type=click.Choice(MAP_DTYPES),
    default=DEFAULT_MAP_DTYPE,
    show_default=True,
    help="Overlay storage: int16 (compact, NIfTI scl_slope; within max|map|/4094 of the exact values) "
    "or float32 (exact). Also used for the DICOM Parametric Maps.",
)


class MethodName(click.ParamType):
    """A registered explanation method (``medvit-explain list-methods``). The registry is read only when
    a value is checked, so ``--help`` does not import the explainers (and torch)."""

    name = "method"

    def convert(self, value, param, ctx):
        from ..registry import method_names

        names = method_names()
        if value not in names:
            self.fail(f"unknown method {value!r}; expected one of {', '.join(names)} (see list-methods)", param, ctx)
        return value


METHOD = MethodName()


def method_option(default=("cdam", "agcam"), help="Explanation method (repeat for several); see list-methods."):
    """``--method`` (repeatable) for every command that takes methods; ``default=()`` means "all"."""
    return click.option(
        "--method",
        "methods",
        multiple=True,
        default=default,
        show_default=bool(default),
        type=METHOD,
        metavar="METHOD",
        help=help,
    )


target_option = click.option(
    "--target",
    "targets",
    multiple=True,
    default=("all",),
    show_default=True,
    help="Target name or index (repeat for several), or 'all'.",
)


def parse_targets(targets) -> list[str] | None:
    """``--target`` values → None (all) or a list of names/indices (comma lists allowed)."""
    items = [t.strip() for value in targets for t in str(value).split(",") if t.strip()]
    if not items or "all" in items:
        return None
    return [int(t) if t.isdigit() else t for t in items]


def default_model(roi: bool) -> str:
    """The shipped model a command uses without ``--model``: ``sample-roi`` when it is given nodule ROIs
    (``--roi-centers`` / ``--roi-mask`` / ``--roi-from-mask``), else ``sample-slice``."""
    return DEFAULT_ROI_MODEL if roi else DEFAULT_MODEL


def load_model_cli(model_path, device, model_config=None):
    """Load the model for a command (``sample-slice`` when ``model_path`` is None; a shipped model's name
    wins over a same-named path, with a one-line warning when such a path exists here); a config that
    leaves preprocessing settings to the defaults gets a one-line warning on stderr naming them."""
    from pathlib import Path

    from ..model import load_model
    from ..model.checkpoint import is_shipped_name

    if is_shipped_name(model_path) and Path(model_path).exists():
        click.echo(
            f"warning: --model {model_path} is the shipped model; write ./{model_path} for the one here", err=True
        )
    model = load_model(model_path, device=device, config=model_config)
    defaults = list(getattr(model, "preprocessing_defaults", []) or [])
    if defaults:
        name = model.config.get("name", "the model")
        click.echo(
            f"warning: {name}: preprocessing {', '.join(defaults)} not set in its config; using the defaults "
            "(summary.json lists every value used)",
            err=True,
        )
    return model


def load_models_cli(model_paths, device, model_configs=()):
    """The models of ``--model`` (repeatable; none: ``sample-slice``), each with the ``--model-config`` at
    the same position (give none, or one per ``--model``)."""
    paths, configs = list(model_paths or [None]), list(model_configs or [])
    if configs and len(configs) != len(paths):
        raise click.BadParameter(
            f"expected one --model-config per --model (in the same order), got {len(configs)} for {len(paths)}",
            param_hint="--model-config",
        )
    return [load_model_cli(p, device, c) for p, c in zip(paths, configs or [None] * len(paths), strict=True)]


def out_dir_option(help: str, default: str | None = None, required: bool = False):
    """``--out DIR`` (an output folder) with the command's own default and help."""
    return click.option(
        "--out",
        "out_dir",
        type=click.Path(file_okay=False, path_type=str),
        default=default,
        required=required,
        show_default=default is not None,
        help=help,
    )


dicom_option = click.option(
    "--dicom", is_flag=True, help="Also write the maps as DICOM Parametric Maps (for DICOM inputs)."
)
no_report_option = click.option("--no-report", is_flag=True, help="Skip report.html.")


@dataclass(frozen=True)
class ExplainOptions:
    """What ``explain`` and ``batch`` share, as one value (``targets`` already parsed: None = all)."""

    model_paths: tuple[str, ...]
    model_configs: tuple[str, ...]
    methods: tuple[str, ...]
    targets: list[str | int] | None
    device: str
    batch_size: int
    precision: str
    dicom: bool
    report: bool
    map_dtype: str
    allow_modality: bool


def explain_options(command):
    """The options ``explain`` and ``batch`` share, in one order, with one default and one help text each
    (model, config, methods, targets, device, batch size, precision, DICOM output, report, map storage,
    modality), handed to the command as one :class:`ExplainOptions` argument ``options``."""
    names = ("model_paths", "model_configs", "methods", "targets", "device", "batch_size", "precision", "dicom")
    names += ("no_report", "map_dtype", "allow_modality")

    run = command

    @functools.wraps(run)
    def with_options(*args, **kwargs):
        given = {name: kwargs.pop(name) for name in names}
        given["methods"] = tuple(given["methods"])
        given["model_paths"], given["model_configs"] = tuple(given["model_paths"]), tuple(given["model_configs"])
        given["targets"] = parse_targets(given["targets"])
        given["report"] = not given.pop("no_report")
        return run(*args, options=ExplainOptions(**given), **kwargs)

    command = with_options
    for option in reversed(
        [
            models_option,
            model_configs_option,
            method_option(),
            target_option,
            device_option,
            batch_size_option,
            precision_option,
            dicom_option,
            no_report_option,
            map_dtype_option,
            modality_option,
        ]
    ):
        command = option(command)
    return command
