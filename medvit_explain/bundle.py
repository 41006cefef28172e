"""A medvit-explain model as a MONAI bundle: :func:`export_bundle` (the ``export-bundle`` command).

::

    BUNDLE/
      configs/metadata.json       the MONAI bundle metadata, every value from the model (targets,
                                  preprocessing, input size, versions) and the methods' papers
      configs/inference.json      a MONAI bundle config: model_chain's transforms → ExplainViTd → Invertd
                                  → one SaveImaged per map; ``python -m monai.bundle run`` writes the
                                  overlays ``medvit-explain explain --map-dtype float32`` writes
      configs/logging.conf        console logging (what ConfigWorkflow looks for by default)
      models/model/               our checkpoint folder (model.safetensors + config.json, save_checkpoint)
      docs/README.md              the model, its preprocessing, the methods, how to run it, the licence
      docs/metadata_schema.json   the JSON schema the metadata is verified against (see below)
      docs/license.txt            Apache-2.0, like the package

**No ``models/model.pt``.** The MONAI Bundle Specification names a pickled state dict ``model.pt``;
unpickling can execute code, so the weights stay in safetensors and the config loads them with
:func:`medvit_explain.model.load_model` (tensors and JSON only: no code runs from the checkpoint).

**The metadata schema.** ``metadata.json`` names MONAI's official schema URL (``schema``), but
``verify_metadata`` downloads it unless ``--filepath`` already exists, and there is no network here. The
schema shipped with the package (``assets/monai_bundle_schema.json``, copied to ``docs/metadata_schema.json``)
is JSON Schema draft-07 written from the text of the specification's ``metadata.json`` section (its
mandatory keys and their types, the tensor format specifiers of ``network_data_format``); the bundle is
verified against that, not against the downloaded official file.

**Where the bundle is.** ``bundle_root`` is evaluated at run time by :func:`running_bundle_root`: the
folder above the running config's ``configs/`` (the folder MONAI's ``ConfigWorkflow`` itself puts on
``sys.path``), so the bundle runs from any working folder and after being moved or copied. A config
parsed outside a ``ConfigWorkflow`` (``verify_net_in_out``, a bare ``ConfigParser``) is given
``bundle_root`` explicitly.

MONAI is imported only where a function needs it; this module itself imports the standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import MedvitInputError

__all__ = [
    "BUNDLE_FORMAT",
    "SCHEMA_PATH",
    "SCHEMA_URL",
    "bundle_metadata",
    "export_bundle",
    "inference_config",
    "require_input",
    "running_bundle_root",
]

SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"
SCHEMA_PATH = Path(__file__).resolve().parent / "assets" / "monai_bundle_schema.json"
BUNDLE_FORMAT = "medvit-explain-bundle/1"  # metadata["medvit_explain"]["format"]: marks a bundle we wrote
BUNDLE_ENTRIES = ("configs", "models", "docs")  # what a bundle folder holds (so what a re-export may replace)
CHECKPOINT_DIR = "models/model"
SAMPLE_MODEL_FACTS = {  # what the shipped sample model's checkpoint does not say about itself
    "authors": "medvit-explain contributors",
    "data_source": "synthetic chest-CT phantoms made by medvit_explain.phantom (recipe and seeds: "
    "configs/sample_model.yaml, scripts/make_sample_model.py); the model has never seen a real CT",
    "data_type": "nifti (synthetic phantoms)",
}

LOGGING_CONF = """\
[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""

LICENSE_TXT = """\
Licensed under the Apache License, Version 2.0 (the "License"), like medvit-explain; you may not use
these files except in compliance with the License. You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software distributed under the License is
distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
See the License for the specific language governing permissions and limitations under the License.
"""


# ------------------------------------------------------------------------------ used by inference.json


def running_bundle_root() -> str:
    """The folder of the bundle whose config is being run: MONAI's ``ConfigWorkflow`` on the call stack,
    its config folder's parent when that folder is ``configs/`` (MONAI's own rule), absolute.

    ``inference.json`` has ``"bundle_root": {"_target_": "medvit_explain.bundle.running_bundle_root"}``, so
    ``python -m monai.bundle run --config_file B/configs/inference.json`` finds ``B/models/model`` from any
    working folder, wherever ``B`` was copied. Raises :class:`MedvitInputError` outside a workflow."""
    from monai.bundle import ConfigWorkflow

    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, ConfigWorkflow):
            root = Path(owner.config_root_path)
            return str((root.parent if root.name == "configs" else root).resolve())
        frame = frame.f_back
    raise MedvitInputError(
        "expected the bundle config to run in MONAI's ConfigWorkflow (python -m monai.bundle run), "
        "got none to tell where the bundle is; set bundle_root to the bundle folder (--bundle_root BUNDLE)"
    )


def require_input(path: Any) -> str:
    """``path`` (the config's ``input``) as a string; a one-line error when it was not given."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise MedvitInputError(f"expected --input CT (a CT file or a DICOM series folder), got {path!r}")
    return str(path)


# --------------------------------------------------------------------------------------------- configs


def inference_config(model, methods: Sequence[str]) -> dict[str, Any]:
    """The bundle's ``inference.json``: ids ``bundle_root``, ``input``, ``output_dir``, ``device``,
    ``methods``, ``targets`` (null: all), ``model`` (``load_model`` of ``models/model``), ``preprocessing``
    (:func:`medvit_explain.monai_transforms.model_chain`'s transforms, their settings read from the model's
    ``preprocessing`` written here as ``model_preprocessing``), ``explain`` (``ExplainViTd``),
    ``postprocessing`` (``Invertd`` of the maps + one ``SaveImaged`` per map key) and ``run``."""
    from .vocabulary import jsonable

    transforms = "medvit_explain.monai_transforms"
    prep = "@model_preprocessing"
    return {
        "bundle_root": {"_target_": "medvit_explain.bundle.running_bundle_root"},
        "input": "",
        "output_dir": "$@bundle_root + '/output'",
        "device": "$'cuda' if torch.cuda.is_available() else 'cpu'",
        "methods": list(methods),
        "targets": None,
        "batch_size": 16,
        "precision": "fp32",
        "series_uid": None,
        "allow_modality": False,
        "model_preprocessing": jsonable(model.preprocessing),
        "model": {
            "_target_": "medvit_explain.model.load_model",
            "path": f"$@bundle_root + '/{CHECKPOINT_DIR}'",
            "device": "@device",
        },
        "preprocessing": {
            "_target_": "monai.transforms.Compose",
            "transforms": [
                {
                    "_target_": f"{transforms}.LoadCTd",
                    "keys": "image",
                    "series_uid": "@series_uid",
                    "allow_modality": "@allow_modality",
                },
                {"_target_": f"{transforms}.OrientLPSd", "keys": "image"},
                {
                    "_target_": f"{transforms}.CropBodyd",
                    "keys": "image",
                    "threshold_hu": f"{prep}#body_threshold_hu",
                    "aspect": f"${prep}#image_size#0 / {prep}#image_size#1",
                    "enabled": f"{prep}#crop_body",
                },
                {"_target_": f"{transforms}.HUWindowd", "keys": "image", "preprocessing": prep},
                {"_target_": f"{transforms}.ResizeToModeld", "keys": "image", "image_size": f"{prep}#image_size"},
                {"_target_": f"{transforms}.InputChannelsd", "keys": "image", "preprocessing": prep},
                {"_target_": f"{transforms}.NormalizeChannelsd", "keys": "image", "preprocessing": prep},
            ],
        },
        "explain": {
            "_target_": f"{transforms}.ExplainViTd",
            "keys": "image",
            "model": "@model",
            "methods": "@methods",
            "targets": "@targets",
            "batch_size": "@batch_size",
            "precision": "@precision",
        },
        "save_map": {
            "_target_": "monai.transforms.SaveImaged",
            "_mode_": "callable",
            "output_dir": "@output_dir",
            "separate_folder": False,
            "resample": False,
            "output_dtype": "$np.float32",
            "print_log": False,
        },
        "postprocessing": {
            "_target_": "monai.transforms.Compose",
            "transforms": "$[monai.transforms.Invertd(@explain.map_keys, @preprocessing, orig_keys='image')]"
            " + [@save_map(keys=k, output_postfix=k) for k in @explain.map_keys]",
        },
        "run": [
            {"_target_": "medvit_explain.bundle.require_input", "path": "@input"},
            "$@postprocessing(@explain(@preprocessing({'image': @input})))",
        ],
    }


def _fmt(value: float) -> str:
    return f"{float(value):g}"


def _window_text(window) -> str:
    return f"HU window [{_fmt(window.lo)}, {_fmt(window.hi)}] scaled to [{_fmt(window.a)}, {_fmt(window.b)}]"


def _input_channels(prep) -> tuple[dict[str, str], list[float]]:
    """(channel_def, value_range) of the network input, from the typed preprocessing."""
    windows = prep.channel_windows()
    means = prep.mean or (0.0,) * prep.in_chans
    stds = prep.std or (1.0,) * prep.in_chans
    channel_def, lows, highs = {}, [], []
    for c, window in enumerate(windows):
        if prep.channels.recipe == "adjacent_slices":
            what = f"axial CT slice k{prep.channels.offsets[c]:+d} (clamped to the volume)"
        else:
            what = "axial CT slice"
        text = f"{what}, {_window_text(window)}"
        if prep.mean is not None:
            text += f", then (x - {_fmt(means[c])}) / {_fmt(stds[c])}"
        channel_def[str(c)] = text
        lo, hi = sorted((window.a, window.b))
        lows.append((lo - means[c]) / stds[c])
        highs.append((hi - means[c]) / stds[c])
    return channel_def, [float(min(lows)), float(max(highs))]


def _target_text(target) -> str:
    description = target.description.rstrip(". ")
    if target.kind == "regression":
        scale = f" on [{_fmt(target.scale[0])}, {_fmt(target.scale[1])}]" if target.scale else ""
        what = f"regression, normalised value (v - {_fmt(target.mean)}) / {_fmt(target.std)}{scale}"
    elif target.kind == "multiclass":
        what = f"softmax over {', '.join(target.classes)}: log-odds of {target.classes[target.positive]}"
    else:
        what = "binary, logit (its sigmoid is the probability)"
    return f"{target.name}: {what}" + (f" ({description})" if description else "")


def _numbers(data: Any, prefix: str = "") -> dict[str, float]:
    """The float leaves of a nested mapping, keys joined with ``_``."""
    out: dict[str, float] = {}
    if isinstance(data, Mapping):
        for key, value in data.items():
            out.update(_numbers(value, f"{prefix}{key}_"))
    elif isinstance(data, float):  # counts and seeds are ints: context, not metrics
        out[prefix.rstrip("_")] = data
    return out


def _eval_metrics(model, card: Mapping[str, Any] | None) -> tuple[dict[str, float], str]:
    """(metrics, where they come from): a model card's held-out results, else the validation recorded in
    the checkpoint's provenance, else none."""
    if card and isinstance(card.get("held_out"), Mapping):
        return _numbers(card["held_out"]), "held-out results of the model card (docs/model_card.json)"
    validation = (model.config.get("provenance") or {}).get("validation")
    if isinstance(validation, Mapping):
        return _numbers(validation), "validation results recorded in the checkpoint (used for model selection)"
    return {}, "none recorded in the checkpoint"


def bundle_metadata(
    model,
    methods: Sequence[str],
    version: str = "0.1.0",
    source: str = "",
    card: Mapping[str, Any] | None = None,
    facts: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The bundle's ``metadata.json`` for ``model`` (a :class:`~medvit_explain.model.MedViT`): the MONAI
    Bundle Specification's keys, each value read from the model (targets, preprocessing, input size,
    provenance), the installed versions and the registry's citations of ``methods``; plus ``medvit_explain``
    (what exported it, the checkpoint's SHA-256 is added by :func:`export_bundle`). ``authors``,
    ``copyright``, ``data_source`` and ``data_type`` come from ``facts``, else the config (top level or
    provenance), else say they were not recorded."""
    from .registry import explainer_class
    from .transforms import Preprocessing

    prep = Preprocessing.from_config(model.preprocessing)
    c, h, w = model.input_size
    spec = model.task_spec
    name = str(model.config.get("name") or "medvit")
    provenance = model.config.get("provenance") or {}
    channel_def, value_range = _input_channels(prep)
    metrics, metrics_source = _eval_metrics(model, card)
    from .versions import package_versions

    versions = package_versions(
        ("monai", "torch", "numpy", "medvit-explain", "timm", "safetensors", "SimpleITK", "pydicom", "nibabel")
    )
    required = {k: v for k, v in versions.items() if k not in ("monai", "torch", "numpy")}
    citations = list(dict.fromkeys(explainer_class(m).citation for m in methods))
    titles = ", ".join(f"{m} ({explainer_class(m).title})" for m in methods)
    target_names = ", ".join(model.targets)
    arch = model.config.get("architecture") or {}
    about = (spec.description or target_names).rstrip(". ")
    facts = dict(facts or {})

    def fact(key: str) -> Any:
        return facts.get(key) or model.config.get(key) or provenance.get(key)

    authors = fact("authors")
    copyright = fact("copyright")
    copyright = copyright or (f"Copyright (c) {authors}" if authors else "not recorded in the checkpoint")
    authors = authors or "not recorded in the checkpoint"
    train_data = fact("data_source") or provenance.get("train_data")
    return {
        "schema": SCHEMA_URL,
        "version": version,
        "changelog": {version: f"exported by medvit-explain from {source or 'a checkpoint'}"},
        "monai_version": versions.get("monai", ""),
        "pytorch_version": versions.get("torch", ""),
        "numpy_version": versions.get("numpy", ""),
        "required_packages_version": required,
        # MONAI >= 1.4 reads optional_packages_version as a deprecated alias of required_packages_version and
        # replaces the one with the other when it parses the metadata: the two must say the same
        "optional_packages_version": dict(required),
        "name": name,
        "task": f"Axial-slice CT scoring of {target_names} by a Vision Transformer, with explanation maps",
        "description": (
            f"{name}: a timm {arch.get('timm_name', 'VisionTransformer')} ({c} input channel(s), {h} x {w} input, "
            f"{model.grid_size[0]} x {model.grid_size[1]} patch tokens) with one score per target "
            f"({about}). The bundle scores every axial slice of a CT and writes, per method and target, a map on "
            f"the CT's own voxel grid: {titles}."
        ),
        "authors": authors,
        "copyright": copyright,
        "data_source": str(train_data) if train_data else "not recorded in the checkpoint",
        "data_type": str(fact("data_type") or "CT volumes in HU"),
        "image_classes": (
            f"{c} channel(s) of {h} x {w} axial slices cut from a CT in HU (NIfTI, NRRD, MHA or a DICOM series), "
            f"oriented LPS{', cropped to the body' if prep.crop_body else ''}: "
            + "; ".join(f"channel {k}: {v}" for k, v in channel_def.items())
        ),
        "label_classes": "; ".join(_target_text(t) for t in spec),
        "pred_classes": (
            f"{len(model.targets)} raw scores per slice, one per target, in the order {target_names}; the bundle "
            "writes <stem>_<method>_<target>.nii.gz maps (float32, signed) on the CT's grid"
        ),
        "eval_metrics": metrics,
        "eval_metrics_source": metrics_source,
        "intended_use": str(
            model.config.get("intended_use")
            or "Research on explaining a ViT's CT predictions; not a medical device, not for diagnostic use."
        ),
        "references": citations,
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": c,
                    "spatial_shape": [h, w],
                    "dtype": "float32",
                    "value_range": value_range,
                    "is_patch_data": False,
                    "channel_def": channel_def,
                }
            },
            "outputs": {
                "pred": {
                    "type": "tuples",
                    "format": "scores",
                    "modality": "n/a",
                    "num_channels": len(model.targets),
                    "spatial_shape": [],
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": False,
                    "channel_def": {str(k): _target_text(t) for k, t in enumerate(spec)},
                }
            },
        },
        "medvit_explain": {
            "format": BUNDLE_FORMAT,
            "exported_with": versions.get("medvit-explain", ""),
            "source": source,
            "checkpoint": CHECKPOINT_DIR,
            "methods": list(methods),
        },
    }


# ------------------------------------------------------------------------------------------------ docs


def _preprocessing_rows(prep) -> list[tuple[str, str]]:
    h, w = prep.image_size
    crop = (
        f"body box (HU > {_fmt(prep.body_threshold_hu)}) in X and Y, grown to the {h}:{w} aspect"
        if prep.crop_body
        else "off (whole slice)"
    )
    windows = "; ".join(dict.fromkeys(_window_text(wd) for wd in prep.channel_windows()))
    channels = {
        "copies": f"the slice copied into {prep.in_chans} channel(s)",
        "hu_windows": f"one HU window per channel ({prep.in_chans})",
        "adjacent_slices": f"slices k{', k'.join(f'{o:+d}' for o in prep.channels.offsets)} (clamped)",
    }[prep.channels.recipe]
    norm = (
        "per channel (x - mean) / std, mean " + str(list(prep.mean)) + ", std " + str(list(prep.std))
        if prep.mean is not None
        else "none"
    )
    return [
        ("LoadCTd", "read the CT in HU (SimpleITK for NIfTI / NRRD / MHA, pydicom for DICOM)"),
        ("OrientLPSd", "axes to patient left, posterior, superior (no resampling)"),
        ("CropBodyd", crop),
        ("HUWindowd", windows),
        ("ResizeToModeld", f"every axial slice bilinear to {h} x {w} (rows x columns)"),
        ("InputChannelsd", channels),
        ("NormalizeChannelsd", norm),
    ]


def bundle_readme(model, metadata: Mapping[str, Any], methods: Sequence[str], sha256: str, card: bool) -> str:
    """``docs/README.md``: the model, its targets and preprocessing, the methods, the two commands, the
    weights, the schema and the licence."""
    from .registry import explainer_class
    from .transforms import Preprocessing

    prep = Preprocessing.from_config(model.preprocessing)
    name = metadata["name"]
    lines = [
        f"# {name} (MONAI bundle)",
        "",
        metadata["description"],
        "",
        f"Intended use: {metadata['intended_use']}",
        "",
        "## Targets",
        "",
        "| # | target | output |",
        "|---|---|---|",
    ]
    for k, target in enumerate(model.task_spec):
        lines.append(f"| {k} | {target.name} | {_target_text(target).split(': ', 1)[1]} |")
    lines += ["", "## Preprocessing (`configs/inference.json` → `preprocessing`)", ""]
    lines += ["| step | what |", "|---|---|"]
    lines += [f"| `{step}` | {what} |" for step, what in _preprocessing_rows(prep)]
    lines += [
        "",
        "The settings are the model's own (`models/model/config.json` → `preprocessing`, copied into",
        "`inference.json` as `model_preprocessing`): the same steps and arithmetic as `medvit-explain explain`.",
        "",
        "## Methods",
        "",
        "| method | what | paper |",
        "|---|---|---|",
    ]
    for m in methods:
        cls = explainer_class(m)
        lines.append(f"| `{m}` | {cls.title} | {cls.citation} |")
    lines += [
        "",
        "Each map is signed (positive: evidence for the target's score) and written as float32 NIfTI on the",
        "CT's own voxel grid, `<stem>_<method>_<target>.nii.gz`.",
        "",
        "## Run it",
        "",
        "```bash",
        "python -m monai.bundle run --config_file BUNDLE/configs/inference.json --input CT --output_dir OUT",
        "medvit-explain explain CT --model BUNDLE/models/model --map-dtype float32   # the same maps, and a report",
        "```",
        "",
        "`CT` is a NIfTI / NRRD / MHA file or a DICOM series folder; the first command runs from any folder and",
        "writes `OUT/<stem>_<method>_<target>.nii.gz` (default `OUT`: `BUNDLE/output`), the same maps as the",
        "second (tested to 1e-5 of each map's largest value). Other settings of `inference.json`, given the same",
        "way: `--device cpu`, `--methods \"['cdam']\"`, `--targets \"['malignancy']\"` (default: all targets),",
        "`--batch_size 8`, `--series_uid UID`, `--allow_modality True`. `python -m monai.bundle` needs the `fire`",
        "package. `bundle_root` is found at run time (the folder above `configs/`); a tool that parses the config",
        "outside `monai.bundle run`, such as `verify_net_in_out`, is given `--bundle_root BUNDLE`:",
        "",
        "```bash",
        "python -m monai.bundle verify_net_in_out model --meta_file BUNDLE/configs/metadata.json \\",
        "    --config_file BUNDLE/configs/inference.json --bundle_root BUNDLE --device cpu",
        "```",
        "",
        "Like every MONAI bundle config, `inference.json` runs code (`_target_` and `$` expressions): run",
        "bundles you trust.",
        "",
        "## Weights",
        "",
        "`models/model/` is a medvit-explain checkpoint folder (`model.safetensors` + `config.json`), exported",
        f"from {metadata['medvit_explain']['source'] or 'a checkpoint'}; SHA-256 of the weights: `{sha256}`.",
        "The config loads it with `medvit_explain.model.load_model`, which reads safetensors tensors and JSON",
        "only: no code runs from the checkpoint. There is no `models/model.pt`: the MONAI Bundle Specification",
        "names a pickled state dict, and loading a pickle can execute code.",
        "",
        f"Training data: {metadata['data_source']}.",
        "",
        f"Evaluation ({metadata['eval_metrics_source']}): "
        + (", ".join(f"{k} {v:.3g}" for k, v in metadata["eval_metrics"].items()) or "none")
        + ".",
    ]
    if card:
        lines += ["", "The model card that came with the checkpoint is in `docs/` (`MODEL_CARD.md`)."]
    lines += [
        "",
        "## Metadata and its schema",
        "",
        "`configs/metadata.json` names MONAI's official schema URL (`schema`). The bundle is verified against",
        "`docs/metadata_schema.json` instead: a JSON schema (draft-07) that medvit-explain wrote from the text of the",
        "MONAI Bundle Specification (its mandatory keys, their types and the tensor format of",
        "`network_data_format`), not the official schema file, which was not downloaded. With `--filepath`",
        "pointing at an existing file, `verify_metadata` downloads nothing:",
        "",
        "```bash",
        "python -m monai.bundle verify_metadata --meta_file BUNDLE/configs/metadata.json \\",
        "    --filepath BUNDLE/docs/metadata_schema.json",
        "```",
        "",
        "(`verify_metadata` needs `jsonschema`; without `--filepath` on an existing file it downloads the URL.)",
        "",
        "## Licence",
        "",
        "Apache-2.0, like medvit-explain (`docs/license.txt`).",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- write


def _is_bundle(path: Path) -> bool:
    try:
        meta = json.loads((path / "configs" / "metadata.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and (meta.get("medvit_explain") or {}).get("format") == BUNDLE_FORMAT


def _check_out(out: Path) -> None:
    """Refuse a file, or a non-empty folder that is not a bundle written by :func:`export_bundle`."""
    if not out.exists():
        return
    if not out.is_dir():
        raise MedvitInputError(f"--out {out} is a file; expected a folder for the bundle")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not _is_bundle(out):
        shown = ", ".join(entries[:4]) + (f", … (+{len(entries) - 4} more)" if len(entries) > 4 else "")
        raise MedvitInputError(
            f"refusing to overwrite {out}: it is not empty ({shown}) and not a bundle written by export-bundle; "
            "choose another --out"
        )
    other = [e for e in entries if e not in BUNDLE_ENTRIES]
    if other:
        raise MedvitInputError(
            f"refusing to overwrite the bundle {out}: it also holds {', '.join(other)} (outputs of a run?); "
            "move them out or choose another --out"
        )


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def export_bundle(
    model_path: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    methods: Sequence[str] = ("cdam", "agcam"),
    version: str = "0.1.0",
) -> Path:
    """Write a MONAI bundle of the model at ``model_path`` (None: the shipped sample model) to ``out_dir``
    and return its path. Atomic: built in a temporary folder beside ``out_dir`` and renamed into place; a
    non-empty ``out_dir`` is replaced only if it is a bundle this function wrote (and holds nothing else).
    ``methods`` are the bundle's default methods (its ``methods`` id; also the metadata's references).

    Raises :class:`MedvitInputError` (exit code 2 in the CLI) for a folder it will not overwrite, an ROI-mode
    model (the MONAI chain is slice mode), an unknown method or an unreadable checkpoint."""
    from .io.checksum import file_sha256
    from .io.writer import replace_folder, usual_mode
    from .model import load_model, save_checkpoint
    from .model.checkpoint import CARD_NAMES, resolve_model_path  # CARD_NAMES: beside a checkpoint, copied to docs/
    from .registry import explainer_class
    from .transforms import Preprocessing

    out = Path(out_dir).expanduser().absolute()  # "." has no name to put a temporary folder beside
    _check_out(out)
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise MedvitInputError("expected at least one method for the bundle, got none")
    for m in methods:
        explainer_class(m)  # MethodError for an unknown one
    model = load_model(model_path, device="cpu")
    if Preprocessing.from_config(model.preprocessing).mode != "slice":
        raise MedvitInputError(
            f"expected a slice-mode model for a MONAI bundle (the MONAI chain is slice mode), got "
            f"{model.preprocessing.get('mode')!r}; explain an ROI model with medvit-explain explain --roi-centers"
        )
    source_dir = resolve_model_path(model_path)
    source = "the shipped sample model" if model_path is None else str(model_path)
    cards = [source_dir / n for n in CARD_NAMES if source_dir.is_dir() and (source_dir / n).is_file()]
    card = None
    if any(p.name == "model_card.json" for p in cards):
        with contextlib.suppress(OSError, ValueError):
            card = json.loads((source_dir / "model_card.json").read_text(encoding="utf-8"))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, usual_mode(directory=True))  # the temporary folder becomes the bundle
        for sub in ("configs", "docs"):
            (tmp / sub).mkdir()
        checkpoint = save_checkpoint(model, tmp / CHECKPOINT_DIR, provenance={"bundle_source": source})
        sha256 = file_sha256(checkpoint / "model.safetensors")
        facts = SAMPLE_MODEL_FACTS if model_path is None else None
        metadata = bundle_metadata(model, methods, version, source, card if isinstance(card, Mapping) else None, facts)
        metadata["medvit_explain"]["checkpoint_sha256"] = sha256
        _write_json(tmp / "configs" / "metadata.json", metadata)
        _write_json(tmp / "configs" / "inference.json", inference_config(model, methods))
        (tmp / "configs" / "logging.conf").write_text(LOGGING_CONF, encoding="utf-8")
        shutil.copyfile(SCHEMA_PATH, tmp / "docs" / "metadata_schema.json")
        for path in cards:
            shutil.copyfile(path, tmp / "docs" / path.name)
        readme = bundle_readme(model, metadata, methods, sha256, card=bool(cards))
        (tmp / "docs" / "README.md").write_text(readme, encoding="utf-8")
        (tmp / "docs" / "license.txt").write_text(LICENSE_TXT, encoding="utf-8")
        for path in tmp.rglob("*"):
            os.chmod(path, usual_mode(directory=path.is_dir()))
        _check_out(out)  # again: something may have appeared there meanwhile
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
