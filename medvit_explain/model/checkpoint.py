"""Checkpoints: safetensors weights + a JSON config; loading never executes code.

Layouts read by :func:`load_model`:

* a directory holding ``model.safetensors`` and ``config.json`` (what :func:`save_checkpoint` writes);
* ``weights.safetensors`` with a sibling ``weights.json`` / ``weights.yaml`` (or ``config.json``);
* a bare timm state dict (``.safetensors``, or ``.pth``/``.pt``/``.bin``/``.ckpt`` read with
  ``torch.load(weights_only=True)``; a Lightning ``.ckpt`` keeps it under ``state_dict``) plus ``config=``
  given separately. Its ``head.*`` go to our head (timm built with ``num_classes=K``), the rest to the
  backbone; a full MedViT state dict (``backbone.*``/``head.*``) is accepted as well.

A config may say how its checkpoint's key names map onto ours (applied in this order, before the
above)::

    checkpoint: {strip_prefix: "model.",                      # or a list of prefixes, tried in turn
                 rename: {"mlp_head.0.": "head.", "vit.": "backbone."},   # ordered prefix renames
                 source: torchvision}                         # or monai, or timm-filter (DINOv2, other timm sources)

A checkpoint written by :func:`save_checkpoint` has our names, so it is saved without these rules.

``config.json`` = ``{"format": "medvit-explain/1", "name", "architecture": {"timm_name", "kwargs"},
"task_spec", "preprocessing", "provenance"}``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from medvit_explain.errors import CheckpointError
from medvit_explain.model.device import resolve_device
from medvit_explain.model.keymaps import monai_key_name, monai_vit_keys, torchvision_vit_keys
from medvit_explain.model.network import FORMAT, MedViT, build_model, check_not_remote
from medvit_explain.vocabulary import ASSETS_DIR, DEFAULT_MODEL, SHIPPED_MODELS, jsonable

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
SAMPLE_MODEL_DIR = ASSETS_DIR / SHIPPED_MODELS["sample-slice"][2]
SAMPLE_ROI_MODEL_DIR = ASSETS_DIR / SHIPPED_MODELS["sample-roi"][2]
SAMPLE_ROI3D_MODEL_DIR = ASSETS_DIR / SHIPPED_MODELS["sample-roi3d"][2]
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- reading ----------------------------------------------------------------------------------------
def load_config(path: str | Path) -> dict[str, Any]:
    """Read a config (``.json``, or ``.yaml``/``.yml`` with ``yaml.safe_load``) into a dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"config not found: {str(path)!r}")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise CheckpointError(f"cannot read config {str(path)!r}: {_first_line(exc)}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"config {str(path)!r}: expected a mapping, got {type(data).__name__}")
    return data


def _plain_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if (
        not isinstance(obj, Mapping)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise CheckpointError(f"{str(path)!r} is not a plain tensor state dict (expected name → tensor)")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from ``.safetensors`` or a ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``:
    a pickle that would build any object other than tensors and containers is refused)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {str(path)!r}")
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types; all mean "unreadable"
            raise CheckpointError(f"cannot read safetensors file {str(path)!r}: {_first_line(exc)}") from exc
    elif suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            hint = " (a Lightning .ckpt: torch.save(ckpt['state_dict'], 'weights.pth'))" if suffix == ".ckpt" else ""
            raise CheckpointError(
                f"{str(path)!r} is not a plain tensor state dict: it holds objects that loading would have "
                f"to execute code to build (refused; save a state_dict or use .safetensors{hint})"
            ) from exc
        except (
            RuntimeError,
            EOFError,
            OSError,
            ValueError,
            zipfile.BadZipFile,
            AttributeError,
            KeyError,
        ) as exc:
            raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {_first_line(exc)}") from exc
    else:
        raise CheckpointError(
            f"unsupported checkpoint file {str(path)!r}; expected a directory or one of {', '.join(WEIGHT_SUFFIXES)}"
        )
    return _plain_state_dict(obj, path)


def _locate(path: Path, config: str | Path | Mapping[str, Any] | None) -> tuple[Path, dict[str, Any], Path | None]:
    """(weights file, config dict, base dir for relative paths in the config)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {str(path)!r}")
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise CheckpointError(f"checkpoint directory {str(path)!r} has no {WEIGHTS_NAME}")
        candidates = [path / f"config{s}" for s in CONFIG_SUFFIXES]
    else:
        if path.suffix.lower() not in WEIGHT_SUFFIXES:
            raise CheckpointError(
                f"unsupported checkpoint file {str(path)!r}; expected a checkpoint folder or one of "
                f"{', '.join(WEIGHT_SUFFIXES)}"
            )
        weights = path
        candidates = [path.with_suffix(s) for s in CONFIG_SUFFIXES] + [path.parent / CONFIG_NAME]
    if isinstance(config, Mapping):
        return weights, dict(config), None
    if config is not None:
        return weights, load_config(config), Path(config).parent
    for candidate in candidates:
        if candidate.is_file() and candidate != weights:
            return weights, load_config(candidate), candidate.parent
    raise CheckpointError(
        f"no config found for {str(path)!r}; expected {' or '.join(c.name for c in candidates)} beside it, "
        "or pass --model-config FILE (config= in Python)"
    )


def key_rules(config: Mapping[str, Any]) -> tuple[list[str], list[tuple[str, str]]]:
    """The config's ``checkpoint`` key rules: (prefixes to strip, ordered (old, new) prefix renames)."""
    rules = config.get("checkpoint") or {}
    where = "config checkpoint"
    if not isinstance(rules, Mapping):
        raise CheckpointError(f"{where}: expected a mapping with strip_prefix and/or rename, got {rules!r}")
    unknown = sorted(set(rules) - {"strip_prefix", "rename", "source"})
    if unknown:
        raise CheckpointError(
            f"{where}: unknown key(s) {', '.join(unknown)}; expected strip_prefix, rename and/or source"
        )
    if rules.get("source", "timm") not in SOURCES:
        raise CheckpointError(f"{where}.source: expected one of {', '.join(SOURCES)}, got {rules.get('source')!r}")
    strip = rules.get("strip_prefix") or []
    strip = [strip] if isinstance(strip, str) else strip
    rename = rules.get("rename") or {}
    if not isinstance(strip, (list, tuple)) or not all(isinstance(p, str) and p for p in strip):
        raise CheckpointError(f"{where}.strip_prefix: expected a key prefix or a list of them, got {strip!r}")
    if not isinstance(rename, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in rename.items()):
        raise CheckpointError(f"{where}.rename: expected a mapping of old to new key prefixes, got {rename!r}")
    return list(strip), list(rename.items())


def apply_key_rules(state: dict[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``state`` with the config's ``checkpoint`` rules applied to its key names: the first matching
    ``strip_prefix`` is removed from each key, then the first matching ``rename`` prefix is replaced."""
    strip, rename = key_rules(config)
    if not strip and not rename:
        return state
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = next((key[len(p) :] for p in strip if key.startswith(p)), key)
        new = next((n + new[len(o) :] for o, n in rename if new.startswith(o)), new)
        if new in out:
            raise CheckpointError(f"config checkpoint rules map two keys onto {new!r}; make the prefixes distinct")
        out[new] = value
    return out


def key_map(path: str | Path, config: str | Path | Mapping[str, Any]) -> list[str]:
    """How the keys of the weights at ``path`` map onto ours under ``config``: one line per pattern
    (indices written ``N``), e.g. ``encoder.layers.encoder_layer_N.ln_1.weight -> backbone.blocks.N.norm1.weight``;
    keys a ``timm-filter`` conversion drops or makes are listed as such. What ``medvit-explain convert`` prints."""
    weights, cfg, base_dir = _locate(Path(path).expanduser(), config)
    original = read_state_dict(weights)
    ruled = apply_key_rules(original, cfg)
    final = convert_source(ruled, cfg, build_model(cfg, base_dir=base_dir))
    source = (cfg.get("checkpoint") or {}).get("source")
    if source == "torchvision":
        named = list(_to_medvit_keys(torchvision_vit_keys(ruled)))
    elif source == "monai":  # qkv parts merged, some keys dropped or made: name what maps one to one
        named = [monai_key_name(k) for k in ruled]
    else:
        named = list(_to_medvit_keys(ruled))
    lines: list[str] = []
    for old, new in zip(original, named, strict=True):  # the rules and the key maps keep the order
        line = f"{_key_pattern(old)} -> {_key_pattern(new) if new in final else '(dropped)'}"
        if line not in lines:
            lines.append(line)
    made = [k for k in final if k not in set(named)]
    return lines + [f"(made by the conversion) -> {_key_pattern(k)}" for k in made]


def _key_pattern(key: str) -> str:
    """``blocks.3.attn.qkv.weight`` → ``blocks.N.attn.qkv.*``: one line per kind of key."""
    key = re.sub(r"(?<=[._])\d+(?=[._]|$)", "N", key)
    return re.sub(r"\.(weight|bias)$", ".*", key)


def convert_source(state: dict[str, torch.Tensor], config: Mapping[str, Any], model: MedViT) -> dict[str, torch.Tensor]:
    """``state`` (after the key rules) under our names, from the config's ``checkpoint.source``:
    ``timm`` (as it is), ``torchvision`` (:func:`torchvision_vit_keys`), ``monai`` (MONAI's ``ViT``:
    :func:`medvit_explain.model.adapters.monai_vit_keys`) or ``timm-filter`` (timm's own
    ``checkpoint_filter_fn`` for the backbone's architecture: DINOv2 / OpenCLIP / I-JEPA names, register
    tokens, position embeddings and patch embeddings resampled to the configured image and patch size)."""
    source = (config.get("checkpoint") or {}).get("source", "timm")
    if source == "torchvision":
        state = torchvision_vit_keys(state)
    elif source == "monai":
        heads = int(model.backbone.blocks[0].attn.num_heads)
        state = monai_vit_keys(state, heads, model.patch_size, model.input_size[0], proj_type=None)
    elif source == "timm-filter":
        from timm.models.vision_transformer import checkpoint_filter_fn

        head = {k: v for k, v in state.items() if k.startswith("head.")}
        body = {k.removeprefix("backbone."): v for k, v in state.items() if not k.startswith("head.")}
        state = {**checkpoint_filter_fn(body, model.backbone), **head}
    return _to_medvit_keys(state)


SOURCES = ("timm", "torchvision", "timm-filter", "monai")


def _prefix_hint(state: Mapping[str, torch.Tensor]) -> str:
    """What to put in the config when every key of the checkpoint starts with the same wrapper prefix."""
    firsts = {key.split(".", 1)[0] for key in state}
    if len(firsts) != 1 or next(iter(firsts)) in ("backbone", "head"):
        return ""
    prefix = next(iter(firsts)) + "."
    return f"; every key starts with {prefix!r}: add checkpoint: {{strip_prefix: {prefix!r}}} to the config"


def _to_medvit_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if any(k.startswith("backbone.") for k in state):
        return state
    return {(k if k.startswith("head.") else f"backbone.{k}"): v for k, v in state.items()}


def _list(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … (+{len(keys) - limit} more)" if len(keys) > limit else "")


def state_mismatch(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """How ``state`` differs from the state dict a model expects (shapes, missing keys, unexpected keys),
    one phrase each; empty when it fits."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {list(state[k].shape)} vs config {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    found = (
        ("shape mismatch", _list(shapes, 3)),
        ("missing keys", _list(missing)),
        ("unexpected keys", _list(unexpected)),
    )
    return [f"{label} {items}" for label, items in found if items]


def _check_match(state: Mapping[str, torch.Tensor], model: MedViT, where: str) -> None:
    parts = state_mismatch(state, model.state_dict())
    if not parts:
        return
    name = model.config.get("architecture", {}).get("timm_name")
    raise CheckpointError(
        f"weights {where} do not match the config ({name}, {model.num_targets} targets): "
        + "; ".join(parts)
        + _shape_hint(state, model)
    )


def _shape_hint(state: Mapping[str, torch.Tensor], model: MedViT) -> str:
    """What to put in the config when the checkpoint's geometry differs from the config's: the input
    channels and patch size read from the patch embedding, the image size from the position embedding,
    the head outputs from the last head layer."""
    hints = []
    proj = state.get("backbone.patch_embed.proj.weight")
    if (
        proj is not None
        and "stem_widths" not in model.config["architecture"]  # a stem's proj is 1x1: not the patch
        and proj.ndim == 4
        and tuple(proj.shape[1:]) != tuple(model.backbone.patch_embed.proj.weight.shape[1:])
    ):
        c, ph, pw = (int(v) for v in proj.shape[1:])
        hints.append(
            f"architecture.kwargs in_chans: {c} and patch_size: {ph if ph == pw else [ph, pw]} (the patch embedding's)"
        )
        ph_, pw_ = ph, pw
    else:
        ph_, pw_ = model.patch_size
    pos = state.get("backbone.pos_embed")
    if pos is not None and pos.ndim == 3 and pos.shape != model.backbone.pos_embed.shape:
        n = int(pos.shape[1])
        prefix = 0 if getattr(model.backbone, "no_embed_class", False) else model.num_prefix_tokens
        side = math.isqrt(max(n - prefix, 0))
        if side * side == n - prefix and side > 0:
            hints.append(
                f"architecture.kwargs img_size: [{side * ph_}, {side * pw_}] (pos_embed holds {n} tokens: "
                f"{prefix} prefix + {side}×{side} patches), or checkpoint: {{source: timm-filter}} to resample it"
            )
    if hints:
        return "; set " + " and ".join(hints)
    return ""


def is_shipped_name(path: str | Path | None) -> bool:
    """Whether ``path`` is the name of a shipped model (a ``str`` among :data:`SHIPPED_MODELS`; a ``Path``
    is always a path)."""
    return isinstance(path, str) and path in SHIPPED_MODELS


def shipped_model_dir(name: str) -> Path:
    """The folder of the shipped model ``name`` (read at call time, so a test can point it elsewhere);
    CheckpointError, in one line naming the script that makes it, when its weights are not there."""
    folder = {
        "sample-slice": SAMPLE_MODEL_DIR,
        "sample-roi": SAMPLE_ROI_MODEL_DIR,
        "sample-roi3d": SAMPLE_ROI3D_MODEL_DIR,
    }[name]
    if (folder / WEIGHTS_NAME).is_file():
        return folder
    _, recipe, default_out = SHIPPED_MODELS[name]
    make = f".venv/bin/python scripts/make_sample_model.py --config {recipe} --out medvit_explain/assets/{default_out}"
    if name == DEFAULT_MODEL:  # shipped with the package: missing means a broken install
        raise CheckpointError(
            f"the shipped sample model is missing ({str(folder)!r}); pass a checkpoint path or make it: {make}"
        )
    raise CheckpointError(
        f"the {name} model is not built yet ({str(folder)!r} has no {WEIGHTS_NAME}); make it with {make}, "
        "or pass --model sample-slice or a checkpoint"
    )


def resolve_model_path(path: str | Path | None) -> Path:
    """The checkpoint path for ``path``: a shipped model's folder for its name (``sample-slice``,
    ``sample-roi``; None = :data:`DEFAULT_MODEL`), else ``path`` itself. A name wins over a file or
    folder of that name in the working directory: write ``./sample-roi`` to mean the folder."""
    if path is None:
        path = DEFAULT_MODEL
    if is_shipped_name(path):
        return shipped_model_dir(str(path))
    return Path(path).expanduser()


def load_model(
    path: str | Path | None = None,
    device: str | torch.device = "auto",
    config: str | Path | Mapping[str, Any] | None = None,
) -> MedViT:
    """Load a :class:`MedViT` in eval mode on ``device`` (``auto|cpu|cuda|cuda:N``).

    ``path`` is a checkpoint directory, a weights file (``.safetensors``/``.pth``/``.pt``), the name of a
    shipped model (``"sample-slice"``: whole slices, ``"sample-roi"``: nodule ROIs; a name wins over a
    same-named folder, see :func:`resolve_model_path`) or None for ``sample-slice``. ``config`` (a path or
    a dict) overrides the config found beside the weights and is required for a bare timm state dict.
    Raises :class:`CheckpointError` (missing, unreadable, unsafe or mismatched) or :class:`DeviceError`,
    each with one line.
    """
    target = resolve_device(device)
    if path is not None:  # before it becomes a Path, which would fold the "//" of a URL
        check_not_remote(str(path), "--model", "there: pass a local checkpoint folder or weights file (see convert)")
    path = resolve_model_path(path)
    weights, cfg, base_dir = _locate(path, config)
    raw = apply_key_rules(read_state_dict(weights), cfg)
    model = build_model(cfg, base_dir=base_dir)
    state = convert_source(raw, cfg, model)
    try:
        _check_match(state, model, repr(str(weights)))
    except CheckpointError as exc:
        raise CheckpointError(str(exc) + _prefix_hint(raw)) from None
    model.load_state_dict(state, strict=True)
    from medvit_explain.io.checksum import file_sha256

    model.source_info = {"checkpoint": str(weights), "sha256": file_sha256(weights)}
    return model.to(target).eval()


# -- writing ----------------------------------------------------------------------------------------
def checkpoint_config(model: MedViT, provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config that :func:`save_checkpoint` writes: ``model.config`` with provenance merged
    (given keys win) plus ``saved_at`` and library versions."""
    if not isinstance(model, MedViT):
        raise TypeError(f"expected a MedViT, got {type(model).__name__}")
    config = jsonable(model.config)
    config.pop("checkpoint", None)  # the weights are saved under our own key names
    if not isinstance(config.get("architecture"), Mapping):
        raise CheckpointError("model has no architecture in its config; build it with build_model(config)")
    merged = dict(config.get("provenance") or {})
    merged.update(jsonable(dict(provenance or {})))
    merged["saved_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    from medvit_explain.versions import package_versions

    merged.setdefault("versions", package_versions())
    config["provenance"] = merged
    config["format"] = FORMAT
    return config


def _write_pair(model: MedViT, config: dict[str, Any], weights: Path, config_path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights), metadata={"format": "pt", "medvit_format": FORMAT})
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    from medvit_explain.io.writer import usual_mode

    os.chmod(weights.parent, usual_mode(directory=True))  # the temporary folder becomes the checkpoint
    for p in (weights, config_path):
        os.chmod(p, usual_mode())


CARD_NAMES = ("MODEL_CARD.md", "model_card.json")  # documentation that may sit beside a checkpoint


def save_checkpoint(model: MedViT, path: str | Path, provenance: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` atomically; returns the path.

    ``path`` ending in ``.safetensors`` → that file plus a sibling ``.json`` config; anything else → a
    directory with ``model.safetensors`` + ``config.json``. Files are written to a temporary name in the
    same folder and moved into place with ``os.replace``; an existing directory is replaced only if it
    holds nothing but a previous checkpoint.
    """
    path = Path(path).expanduser()
    config = checkpoint_config(model, provenance)
    try:
        json.dumps(config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"provenance must be JSON-serialisable: {_first_line(exc)}") from exc
    path.parent.mkdir(parents=True, exist_ok=True)

    if path.suffix.lower() == ".safetensors":
        config_path = path.with_suffix(".json")
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.stem}.tmp-", dir=path.parent))
        try:
            _write_pair(model, config, tmp_dir / path.name, tmp_dir / config_path.name)
            os.replace(tmp_dir / path.name, path)
            os.replace(tmp_dir / config_path.name, config_path)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        return path

    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"cannot write a checkpoint directory at {str(path)!r}: a file is there")
        other = sorted(p.name for p in path.iterdir() if p.name not in (WEIGHTS_NAME, CONFIG_NAME, *CARD_NAMES))
        if other:
            raise CheckpointError(
                f"refusing to overwrite {str(path)!r}: it holds files that are not a checkpoint ({_list(other)})"
            )
    from medvit_explain.io.writer import replace_folder

    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _write_pair(model, config, tmp_dir / WEIGHTS_NAME, tmp_dir / CONFIG_NAME)
        replace_folder(tmp_dir, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path
