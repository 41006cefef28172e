"""One vocabulary: the CLI, the API, the writers and the viewers accept the same words."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import numpy as np
import pytest
import torch

from medvit_explain import viewer_logic, vocabulary
from medvit_explain.commands.options import DEVICE
from medvit_explain.errors import TargetError
from medvit_explain.explainers.base import resolve_targets as explainer_targets
from medvit_explain.model.task import TaskSpec
from medvit_explain.outputs import volume_stem

ROOT = Path(__file__).resolve().parents[1]
DEVICE_WORDS = ["auto", "cpu", "cuda", "cuda:0", "cuda:12", " CUDA ", "mps", "tpu", "cuda:", "gpu", ""]


def _cli_accepts(text: str) -> bool:
    try:
        DEVICE.convert(text, None, None)
        return True
    except click.BadParameter:
        return False


def _viewer_accepts(text: str) -> bool:
    try:
        viewer_logic.build_explain_command("py", "ct", "out", device=text, methods=[])
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("word", DEVICE_WORDS)
def test_devices_agree(word):
    """The CLI, the viewers' command builder and the model's device parser accept the same strings
    (``mps`` was accepted by the viewers once and refused by the CLI)."""
    from medvit_explain.errors import DeviceError
    from medvit_explain.model.device import resolve_device

    expected = vocabulary.is_device(word)
    assert _cli_accepts(word) == expected
    assert _viewer_accepts(word.strip().lower()) == vocabulary.is_device(word.strip().lower())
    try:
        resolve_device(word)
        parsed = True
    except DeviceError as exc:
        parsed = "not available" in str(exc)  # a valid word for a GPU this machine does not have
    assert parsed == expected


def test_viewer_device_menus_offer_valid_devices():
    ui = (ROOT / "plugins" / "slicer" / "MedViTExplain" / "Resources" / "UI" / "MedViTExplain.ui").read_text()
    combo = ui[ui.index('name="deviceComboBox"') :].split("</widget>")[0]
    slicer_items = re.findall(r"<string>([^<]+)</string>", combo)
    assert slicer_items and all(vocabulary.is_device(item) for item in slicer_items)
    assert all(vocabulary.is_device(d) for d in vocabulary.DEVICE_CHOICES)


def test_image_suffixes_agree(tmp_path):
    from medvit_explain.napari._reader import get_reader

    assert set(vocabulary.VOLUME_SUFFIXES) < set(vocabulary.IMAGE_SUFFIXES)
    for suffix in vocabulary.IMAGE_SUFFIXES:
        assert volume_stem(f"/data/scan_01{suffix}") == "scan_01"
        assert volume_stem(f"/data/scan_01{suffix.upper()}") == "scan_01"
        path = tmp_path / f"ct{suffix}"
        path.write_bytes(b"")
        assert get_reader(str(path)) is not None, suffix


def test_primary_target_is_one_rule():
    assert vocabulary.primary_target(["texture", "malignancy"], ["regression", "binary"]) == 1
    assert vocabulary.primary_target(["a", "b", "c"], ["regression", "binary", "binary"]) == 1
    assert vocabulary.primary_target(["a"], ["regression"]) == 0
    assert viewer_logic.PRIMARY_COLUMN == f"{vocabulary.PRIMARY_TARGET}_prob"


CASES = [
    None,
    "all",
    "malignancy",
    3,
    "3",
    np.int64(2),
    "margin,texture",
    ["diameter", 0, "diameter"],
    torch.tensor([1, 1]),
]


@pytest.mark.parametrize("targets", CASES, ids=[repr(c) for c in CASES])
def test_target_resolution_is_one_rule(targets):
    """The task spec (CLI, pipeline) and the explainers (API) resolve targets the same way."""
    spec = TaskSpec.default()
    want = vocabulary.resolve_targets(spec.names, targets)
    assert spec.resolve(targets) == want == explainer_targets(spec.names, targets)
    assert len(want) == len(set(want))  # duplicates dropped everywhere


@pytest.mark.parametrize("bad", ["spiculated", 9, -1, True, 1.5, ["malignancy", "x"], []])
def test_unknown_targets_fail_the_same_way(bad):
    spec = TaskSpec.default()
    for resolve in (spec.resolve, lambda t: explainer_targets(spec.names, t)):
        with pytest.raises(TargetError):
            resolve(bad)


def test_json_is_one_writer():
    data = {"a": (1, 2), "b": np.float32(0.5), "c": np.int64(3), "d": float("nan"), Path("p"): Path("/x")}
    assert json.loads(vocabulary.to_json(data)) == {"a": [1, 2], "b": 0.5, "c": 3, "d": None, "p": "/x"}
