"""Model arguments a user (or an attacker) may pass to ``--model`` / ``--model-config``: each builder
writes what it needs under ``folder`` and returns ``(model args, expected error regex)``."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from ..models import tiny_checkpoint


class Evil:
    """A pickle that would create a file if it were ever unpickled with full pickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _config_with(folder: Path, **architecture) -> Path:
    ckpt = tiny_checkpoint(folder / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["architecture"].update(architecture)
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


def missing_local_dir(folder):
    return ["--model", "local-dir:/nonexistent"], "never downloads or reads models"


def hub_name(folder):
    return ["--model", "hf-hub:timm/vit_small_patch16_224.augreg_in21k"], "never downloads or reads models"


def missing_folder(folder):
    return ["--model", folder / "no-such-model"], "checkpoint not found"


def empty_folder(folder):
    (folder / "empty").mkdir()
    return ["--model", folder / "empty"], "has no model.safetensors"


def config_hub_timm_name(folder):
    return ["--model", _config_with(folder, timm_name="hf-hub:timm/vit_tiny_patch16_224")], "timm_name"


def config_local_dir_timm_name(folder):
    return ["--model", _config_with(folder, timm_name="local-dir:/tmp/model")], "timm_name"


def config_pretrained(folder):
    ckpt = tiny_checkpoint(folder / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["architecture"]["kwargs"]["pretrained_cfg_overlay"] = {"file": "/etc/passwd"}
    (ckpt / "config.json").write_text(json.dumps(config))
    return ["--model", ckpt], "remove|cannot build|pretrained"


def reduce_pickle(folder):
    path = folder / "evil.pth"
    torch.save(Evil(folder / "pwned"), path)
    return ["--model", path, "--model-config", tiny_checkpoint(folder / "ckpt") / "config.json"], "not a plain tensor"


def raw_pickle(folder):
    path = folder / "raw.pth"
    path.write_bytes(pickle.dumps(Evil(folder / "pwned")))
    return ["--model", path, "--model-config", tiny_checkpoint(folder / "ckpt") / "config.json"], "checkpoint|tensor"


def garbage_safetensors(folder):
    path = folder / "junk.safetensors"
    path.write_bytes(b"\xff" * 64)
    return ["--model", path, "--model-config", tiny_checkpoint(folder / "ckpt") / "config.json"], "safetensors"


def truncated_safetensors(folder):
    ckpt = tiny_checkpoint(folder / "ckpt")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    return ["--model", ckpt], "safetensors"


def config_not_json(folder):
    ckpt = tiny_checkpoint(folder / "ckpt")
    (ckpt / "config.json").write_text("{not json")
    return ["--model", ckpt], "cannot read config"


def unknown_suffix(folder):
    path = folder / "weights.onnx"
    path.write_bytes(b"onnx")
    return ["--model", path], "unsupported checkpoint file"


CASES = {
    name: fn
    for name, fn in globals().items()
    if callable(fn) and not name.startswith("_") and fn.__module__ == __name__ and name not in ("Evil",)
}
