"""Several models in one run (a malignancy model + a biomarker model): one predictions table, one
report, an overlay per model and target; inputs shared where the preprocessing agrees."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medvit_explain.cli import cli
from medvit_explain.errors import TargetError
from medvit_explain.io import write_volume
from medvit_explain.model import build_model, save_checkpoint
from medvit_explain.outputs import write_outputs
from medvit_explain.pipeline import CombinedResult, explain_volume, input_count

from .models import tiny_config
from .test_pipeline import body_volume

MALIGNANCY = [{"name": "malignancy", "kind": "softmax", "classes": ["benign", "malignant"], "positive": "malignant"}]
BIOMARKERS = [
    {"name": "spiculation", "kind": "regression", "scale": [1, 5]},
    {"name": "diameter", "kind": "regression", "scale": [0, 40]},
]


def model_with(targets, seed, **kwargs):
    torch.manual_seed(seed)
    config = tiny_config(**kwargs)
    config["task_spec"] = {"targets": targets}
    return build_model(config).eval()


@pytest.fixture
def volume():
    return body_volume(np.eye(3), (0.8, 0.8, 2.0), shape=(24, 20, 7))


def test_two_models_share_inputs_and_equal_their_single_runs(volume, tmp_path):
    malignancy, biomarkers = model_with(MALIGNANCY, 0), model_with(BIOMARKERS, 1)
    both = explain_volume([malignancy, biomarkers], volume, methods=["cdam", "agcam"], batch_size=3)
    assert isinstance(both, CombinedResult)
    assert both.parts[0].inputs is both.parts[1].inputs  # one preprocessing pass for both
    assert input_count([malignancy, biomarkers], volume) == 7
    assert both.targets == ["malignancy", "spiculation", "diameter"]
    alone = [explain_volume(m, volume, methods=["cdam", "agcam"], batch_size=3) for m in (malignancy, biomarkers)]
    table = both.predictions
    assert table.columns == [
        "slice",
        "source_index",
        "z_mm",
        "malignancy_prob",
        "malignancy_logit",
        "spiculation",
        "diameter",
    ]
    assert table.primary == "malignancy"
    for single in alone:
        for column in single.predictions.output_columns:
            np.testing.assert_array_equal(table.column(column), single.predictions.column(column))
        for target in single.targets:
            for method in ("cdam", "agcam"):
                np.testing.assert_array_equal(both.map_array(method, target), single.map_array(method, target))
    written = write_outputs(both, tmp_path / "out", stem="ct")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert [n for n in names if n.endswith(".nii.gz")] == sorted(
        f"ct_{m}_{t}.nii.gz" for m in ("cdam", "agcam") for t in ("malignancy", "spiculation", "diameter")
    )
    summary = json.loads(written["summary"].read_text())
    assert [m["targets"] for m in summary["model"]["models"]] == [["malignancy"], ["spiculation", "diameter"]]
    assert summary["model"]["models"][0]["preprocessing"]["hu_window"] == [-1000.0, 400.0]
    html = written["report"].read_text()
    assert html.count("<h4>Model ") == 2 and "spiculation" in html


def test_models_that_preprocess_differently_get_a_pass_each(volume):
    small = model_with(MALIGNANCY, 0)
    large = model_with(BIOMARKERS, 1, image_size=(48, 48), patch=16, window=(-1200.0, 600.0))
    both = explain_volume([small, large], volume, methods=["cdam"], batch_size=4)
    assert both.parts[0].inputs is not both.parts[1].inputs
    assert input_count([small, large], volume) == 14
    single = explain_volume(large, volume, methods=["cdam"], batch_size=4)
    np.testing.assert_array_equal(both.map_array("cdam", "diameter"), single.map_array("cdam", "diameter"))
    np.testing.assert_array_equal(both.predictions.column("diameter"), single.predictions.column("diameter"))


def test_a_target_name_two_models_share_is_qualified(volume, tmp_path):
    a = model_with(MALIGNANCY, 0)
    b = model_with(MALIGNANCY + BIOMARKERS[:1], 2)
    save_checkpoint(a, tmp_path / "vit_a")
    save_checkpoint(b, tmp_path / "vit_b")
    from medvit_explain.model import load_model

    a, b = load_model(tmp_path / "vit_a", device="cpu"), load_model(tmp_path / "vit_b", device="cpu")
    both = explain_volume([a, b], volume, methods=["cdam"])
    assert both.targets == ["vit_a.malignancy", "vit_b.malignancy", "spiculation"]
    assert "vit_a.malignancy_prob" in both.predictions.columns and "vit_b.malignancy_logit" in both.predictions.columns
    assert both.predictions.primary == "vit_a.malignancy"
    picked = explain_volume([a, b], volume, methods=["cdam"], targets=["vit_b.malignancy", "spiculation"])
    assert picked.targets == ["vit_b.malignancy", "spiculation"]
    with pytest.raises(TargetError, match="'malignancy': several models have it; write <model>.<target>"):
        explain_volume([a, b], volume, methods=["cdam"], targets=["malignancy"])
    with pytest.raises(TargetError, match="'texture': no model has it"):
        explain_volume([a, b], volume, methods=["cdam"], targets=["texture"])


def test_cli_runs_two_checkpoints_into_one_folder(volume, tmp_path):
    ct = write_volume(volume, tmp_path / "ct.nii.gz")
    save_checkpoint(model_with(MALIGNANCY, 0), tmp_path / "malignancy")
    save_checkpoint(model_with(BIOMARKERS, 1), tmp_path / "biomarkers")
    out = tmp_path / "out"
    args = ["explain", ct, "--model", tmp_path / "malignancy", "--model", tmp_path / "biomarkers"]
    args += ["--method", "cdam", "--out", out, "--device", "cpu"]
    done = CliRunner().invoke(cli, [str(a) for a in args])
    assert done.exit_code == 0, done.output
    assert (out / "ct_cdam_malignancy.nii.gz").is_file() and (out / "ct_cdam_diameter.nii.gz").is_file()
    header = (out / "predictions.csv").read_text().splitlines()[0]
    assert header == "slice,source_index,z_mm,malignancy_prob,malignancy_logit,spiculation,diameter"
    assert (out / "report.html").is_file()
    bad = CliRunner().invoke(cli, [str(a) for a in [*args, "--model-config", tmp_path / "x.yaml"]])
    assert bad.exit_code == 2 and "one --model-config per --model" in bad.output
