"""evaluate / audit end to end on the sample phantoms with a tiny model, through CliRunner."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medvit_explain.cli import MedvitGroup
from medvit_explain.commands.evaluate import audit, evaluate
from medvit_explain.errors import MedvitInputError
from medvit_explain.evaluate import evaluate_explanations
from medvit_explain.metrics import explain_func

from .models import tiny_checkpoint, tiny_model

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two sample phantoms (the 160 × 160 × 40 ones) in a folder of their own."""
    out = tmp_path_factory.mktemp("phantoms")
    for name in ("phantom_001", "phantom_002"):
        for suffix in (".nii.gz", "_nodules.nii.gz", "_lungs.nii.gz", ".json"):
            shutil.copy(SAMPLE / f"{name}{suffix}", out / f"{name}{suffix}")
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    tiny_checkpoint(path, crop_body=True)
    return path


def _cli():
    return MedvitGroup(commands={"evaluate": evaluate, "audit": audit})


def test_evaluate_cli_writes_metrics_and_report(data, checkpoint, tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(
        _cli(),
        [
            "evaluate",
            str(data),
            "--model",
            str(checkpoint),
            "--device",
            "cpu",
            "--method",
            "cdam",
            "--method",
            "agcam",
            "--method",
            "attention",
            "--target",
            "malignancy",
            "--target",
            "spiculation",
            "--max-slices",
            "4",
            "--batch-size",
            "4",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "cdam" in result.output and "agcam" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "localization",
        "abpc",
        "compactness",
        "class_sensitivity",
        "randomization",
        "model",
        "n_slices",
        "n_nodules",
        "seed",
    ):
        assert key in metrics, key
    assert metrics["n_slices"] == 4
    assert set(metrics["abpc"]["cdam"]) == {"malignancy", "spiculation"}
    assert set(metrics["localization"]["agcam"]) >= {
        "pixel_accuracy",
        "iou",
        "dice",
        "precision",
        "recall",
        "box_iou",
        "pointing_game",
        "evidence_in_nodule",
        "evidence_in_lungs",
    }
    assert metrics["class_sensitivity"]["attention"] == pytest.approx(0.0, abs=1e-9)  # class-agnostic
    assert set(metrics["model"]["biomarker_mae"]) == {
        "spiculation",
        "subtlety",
        "calcification",
        "margin",
        "lobulation",
        "texture",
        "sphericity",
        "diameter",
    }
    html = (out / "evaluation.html").read_text()
    assert html.count("data:image/png;base64") >= 3
    assert not list(out.glob(".*"))  # no temporary files left
    # the ceiling: the nodule mask on the token grid, scored like a map
    ref = metrics["token_grid_reference"]
    assert ref["grid"] == [4, 4] and 0.0 < ref["localization"]["dice"] <= 1.0
    assert ref["localization_sweep"]["thresholds"] == metrics["localization_sweep"]["cdam"]["thresholds"]
    assert "ceiling on the 4 x 4 token grid" in result.output and "ceiling on the 4 x 4 token grid" in html


def test_evaluate_bad_input_exit_2_and_writes_nothing(data, checkpoint, tmp_path):
    out = tmp_path / "eval"
    runner = CliRunner()
    for args in ([str(tmp_path / "missing")], [str(data), "--target", "nonsense"], [str(data), "--method", "nonsense"]):
        result = runner.invoke(_cli(), ["evaluate", *args, "--model", str(checkpoint), "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1
        assert not out.exists()
    manifest = tmp_path / "bad.csv"
    manifest.write_text("image,labels\na.nii.gz,a.json\n")
    result = runner.invoke(_cli(), ["evaluate", str(manifest), "--model", str(checkpoint), "--out", str(out)])
    assert result.exit_code == 2 and "nodule_mask" in result.output
    assert not out.exists()


def test_evaluate_manifest_and_determinism(data):
    manifest = data / "manifest.csv"
    with open(manifest, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image", "nodule_mask", "labels"])
        writer.writerow(["phantom_002.nii.gz", "phantom_002_nodules.nii.gz", "phantom_002.json"])
    model = tiny_model(crop_body=True)
    kwargs = dict(
        methods=["cdam", "rollout"],
        targets=["malignancy", "margin"],
        max_slices=3,
        batch_size=2,
        randomize_blocks=2,
        progress=False,
    )
    a = evaluate_explanations(model, manifest, **kwargs).metrics
    b = evaluate_explanations(model, manifest, **kwargs).metrics
    assert a["abpc"] == b["abpc"] and a["localization"] == b["localization"]
    assert set(a["randomization_cascade"]["cdam"]) == {"1", "2"}
    assert a["n_studies"] == 1
    with pytest.raises(MedvitInputError):
        evaluate_explanations(model, data / "nothing_here", progress=False)


def test_audit_cli(data, checkpoint, tmp_path):
    out = tmp_path / "audit"
    # a broken study is reported and skipped, never aborting the audit
    (data / "broken.json").write_text('{"nodules": []}')
    (data / "broken.nii.gz").write_bytes(b"not an image")
    (data / "broken_nodules.nii.gz").write_bytes(b"not an image")
    try:
        result = CliRunner().invoke(
            _cli(), ["audit", str(data), "--model", str(checkpoint), "--device", "cpu", "--out", str(out)]
        )
    finally:
        for f in ("broken.json", "broken.nii.gz", "broken_nodules.nii.gz"):
            (data / f).unlink()
    assert result.exit_code == 0, result.output
    assert "broken" in result.output and "failed" in result.output
    summary = json.loads((out / "audit.json").read_text())
    assert summary["summary"]["n_studies"] == 2 and len(summary["summary"]["failures"]) == 1
    rows = list(csv.DictReader(open(out / "audit.csv")))
    assert {r["study"] for r in rows} == {"phantom_001", "phantom_002"}
    for r in rows:
        for key in ("cdam_in_nodule", "cdam_in_lungs", "cdam_outside_body", "agcam_in_nodule"):
            assert 0.0 <= float(r[key]) <= 1.0
    shares = [np.mean([float(r["cdam_in_nodule"]), float(r["agcam_in_nodule"])]) for r in rows]
    assert shares == sorted(shares)  # least evidence on the lesion first
    html = (out / "audit.html").read_text()
    assert html.count("data:image/png;base64") >= 4  # ROC/PR, reliability, one picture per study


def test_explain_func_shapes_and_quantus():
    model = tiny_model()
    x = torch.rand(3, 1, 32, 32).numpy()
    y = np.array([0, 5, 0])
    a = explain_func(model, x, y, method="cdam")
    assert a.shape == (3, 1, 32, 32) and a.dtype == np.float32
    quantus = pytest.importorskip("quantus", reason="quantus is an optional dev extra")
    metric = quantus.Sparseness(disable_warnings=True)
    scores = metric(
        model=model,
        x_batch=x,
        y_batch=y,
        a_batch=None,
        explain_func=explain_func,
        explain_func_kwargs={"method": "cdam"},
        device="cpu",
    )
    assert len(scores) == 3 and np.all(np.isfinite(scores))


def test_report_never_imports_a_workflow():
    """report/ renders typed results; importing a workflow back would make the old import circle."""
    import ast

    import medvit_explain.report as report

    moved = {"workflows", "evaluate", "audit", "train", "bench", "commands", "cli"}
    for path in Path(report.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                top = parts[0] if node.level == 2 else parts[1] if parts[0] == "medvit_explain" else None
                assert top not in moved, f"{path.name} imports {node.module}"


def test_largest_region_boxes_hand_case():
    from medvit_explain.metrics.localization import largest_region_boxes, localization_scores

    binary = torch.zeros(2, 8, 8, dtype=torch.bool)
    binary[0, 1:3, 1:3] = True  # 4 pixels
    binary[0, 4:7, 3] = True  # 3 pixels in a column, diagonal neighbour joins below
    binary[0, 7, 4] = True  # 8-connected to (6, 3): 4 pixels too, a tie -> the first region in raster order
    binary[0, 5, 6:8] = True  # 2 pixels
    boxes = largest_region_boxes(binary)
    want = torch.zeros(8, 8, dtype=torch.bool)
    want[1:3, 1:3] = True
    assert torch.equal(boxes[0], want) and not boxes[1].any()
    maps = torch.zeros(1, 8, 8)
    maps[0, 2:6, 2:4] = 1.0  # an L-shaped map: one region
    maps[0, 5, 4:6] = 1.0
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 2:6, 2:6] = True
    scores = localization_scores(maps, mask, map_boxes=True)
    # the map's box is rows 2..5 x cols 2..5 = the lesion's box: a perfect box IoU; the map itself is not
    assert abs(float(scores["box_iou"][0]) - 1.0) < 1e-9
    assert float(localization_scores(maps, mask)["box_iou"][0]) < 0.7


def test_agcam_protocol_keeps_correct_slices_and_fills_zero(data, tmp_path):
    from medvit_explain.model import load_model
    from medvit_explain.workflows.evaluate import correctly_classified, load_eval_slices
    from medvit_explain.workflows.scores import model_outputs
    from medvit_explain.workflows.studies import find_studies

    model = load_model(device="cpu")
    kwargs = dict(methods=["cdam"], targets=["malignancy"], max_slices=12, batch_size=8, randomize_blocks=0)
    result = evaluate_explanations(model, data, progress=False, protocol="agcam", **kwargs)
    m = result.metrics
    assert m["settings"]["protocol"] == "agcam" and m["settings"]["fill"] == 0.0
    sl = load_eval_slices(find_studies(data), model, max_slices=12, seed=0, progress=False)
    kept = correctly_classified(model, sl)
    logits = model_outputs(model, sl.images[kept.explained])[:, 0].numpy()
    labels = sl.targets[kept.explained, 0].numpy()
    assert np.array_equal(logits > 0, labels > 0.5) and 0 < len(kept.explained) <= len(sl.explained)
    assert m["n_slices"] == len(kept.explained)
    default = evaluate_explanations(model, data, progress=False, **kwargs).metrics
    assert default["settings"]["protocol"] == "default" and default["n_slices"] == len(sl.explained)
    with pytest.raises(MedvitInputError, match="unknown protocol 'paper'"):
        evaluate_explanations(model, data, progress=False, protocol="paper", **kwargs)
    done = CliRunner().invoke(
        _cli(),
        [
            "evaluate",
            str(data),
            "--method",
            "cdam",
            "--target",
            "malignancy",
            "--max-slices",
            "6",
            "--randomize-blocks",
            "0",
            "--protocol",
            "agcam",
            "--out",
            str(tmp_path / "ev"),
            "--device",
            "cpu",
        ],
    )
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["settings"]["protocol"] == "agcam"
    assert "the box of the binarised map's largest region" in (tmp_path / "ev" / "evaluation.html").read_text()


def test_negated_output_flips_one_column_of_any_head():
    """The benign-logit model: output k negated, the others unchanged, for a linear head (its row negated,
    so LRP-style methods still see a Linear), an MLP head and a softmax head (wrapped)."""
    from medvit_explain.model import build_model
    from medvit_explain.workflows.evaluate import _negated_output, _NegatedColumn

    from .models import tiny_config

    x = torch.randn(2, 1, 32, 32)
    softmax = [
        {"name": "m", "kind": "softmax", "classes": ["b", "m"], "positive": "m"},
        {"name": "d", "kind": "regression", "scale": [0, 4]},
    ]
    for head, spec, wrapped in (
        (None, "lidc", False),
        ({"layers": [{"linear": 8}, "relu", "linear"]}, "lidc", False),
        (None, softmax, True),
    ):
        torch.manual_seed(0)
        model = build_model({**tiny_config(), "head": head, "task_spec": spec}).eval()
        flipped = _negated_output(model, 0)
        assert isinstance(flipped.head, _NegatedColumn) == wrapped
        with torch.no_grad():
            a, b = model(x), flipped(x)
        torch.testing.assert_close(b[:, 0], -a[:, 0])
        torch.testing.assert_close(b[:, 1:], a[:, 1:])


def test_token_grid_mask_is_each_patch_share_and_its_scores_are_the_protocols():
    """token_grid_mask against a loop over patches; token_grid_reference against localization_scores on
    that map upsampled as the methods' maps are."""
    from medvit_explain.explainers import upsample
    from medvit_explain.metrics.localization import localization_scores
    from medvit_explain.workflows.evaluate import token_grid_mask, token_grid_reference

    rng = np.random.default_rng(3)
    masks = torch.from_numpy(rng.random((3, 32, 48)) > 0.7)
    masks[2] = False
    masks[2, 5:13, 20:31] = True  # one block across token borders
    got = token_grid_mask(masks, (4, 6))
    want = torch.zeros(3, 4, 6)
    for i in range(4):
        for j in range(6):
            want[:, i, j] = masks[:, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8].float().mean((1, 2))
    assert torch.allclose(got, want, atol=1e-7)

    class _Embed:
        grid_size = (4, 6)

    class _Backbone:
        patch_embed = _Embed()

    class _Model:
        backbone = _Backbone()

    class _Sl:
        nodule = masks[1:].numpy()
        targets = torch.tensor([[1.0], [0.0]])
        explained = np.array([0, 1])
        lungs = None

    class _Run:
        model, sl, primary, threshold, protocol = _Model(), _Sl(), 0, 0.5, "default"
        images = torch.zeros(2, 1, 32, 48)

    ref = token_grid_reference(_Run())
    scores = localization_scores(upsample(want[1:, None], (32, 48))[:, 0], masks[1:], threshold=0.5)
    assert ref["localization"]["dice"] == pytest.approx(float(scores["dice"].double().mean()))
    assert ref["localization"]["dice_malignant"] == pytest.approx(float(scores["dice"][0]))
    assert ref["localization_sweep"]["dice"][0] == pytest.approx(float(scores["dice@0.1"].double().mean()))
    assert ref["localization"]["dice"] > 0.5  # the mask's own token map finds the block


def test_localization_maps_are_the_maps_evaluate_scores(data, checkpoint, capsys, monkeypatch):
    """localization_maps per slice gives evaluate's localization means (the predicted class's map, the
    benign logit's for a class-sensitive method where the model says benign); scripts/compare_maps.py
    prints its per-method lines and paired differences from them."""
    import runpy
    import sys

    from medvit_explain.explainers import upsample
    from medvit_explain.metrics.localization import DEFAULT_SWEEP, localization_scores
    from medvit_explain.model import load_model
    from medvit_explain.workflows.evaluate import load_eval_slices, localization_maps
    from medvit_explain.workflows.studies import find_studies

    model = tiny_model(crop_body=True)
    sl = load_eval_slices(find_studies(data), model, max_slices=6, seed=0, progress=False)
    with torch.no_grad():  # move the malignancy bias so that the model calls some slices benign
        model.head.bias[0] -= model(sl.images[sl.explained])[:, 0].median()
    kwargs = dict(max_slices=6, seed=0, batch_size=4, progress=False)
    metrics = evaluate_explanations(
        model, data, methods=["cdam", "agcam", "attention"], targets=["malignancy"], randomize_blocks=0, **kwargs
    ).metrics
    logits = model(sl.images[sl.explained])[:, 0]
    assert (logits < 0).any() and (logits > 0).any()  # both classes, so the benign maps are exercised
    for method in ("cdam", "agcam", "attention"):
        maps = localization_maps(model, sl, method, batch_size=4)
        assert maps.shape == (len(sl.explained), 4, 4)
        up = upsample(maps[:, None], sl.images.shape[-2:])[:, 0]
        scores = localization_scores(up, torch.from_numpy(sl.nodule))
        for key in ("dice", "iou", "pointing_game", "evidence_in_nodule"):
            assert float(scores[key].double().mean()) == pytest.approx(metrics["localization"][method][key], abs=1e-9)

    script = Path(__file__).resolve().parents[1] / "scripts" / "compare_maps.py"
    argv = [str(script), "--data", str(data), "--model", str(checkpoint), "--method", "cdam", "--method", "attention"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert "malignant nodule slices (default protocol)" in lines[0] and "token-grid ceiling" in lines[0]
    assert lines[1].startswith("cdam") and lines[2].startswith("attention") and "peak token on the nodule" in lines[1]
    assert lines[3].split() == ["Dice", "by", "threshold:", *(f"{t:g}" for t in DEFAULT_SWEEP)]
    model_ckpt = load_model(checkpoint, device="cpu")  # what the script explains: the checkpoint, every slice
    sl_ckpt = load_eval_slices(find_studies(data), model_ckpt, progress=False)
    for line, method in zip(lines[4:6], ("cdam", "attention"), strict=True):
        maps = localization_maps(model_ckpt, sl_ckpt, method)
        up = upsample(maps[:, None], sl_ckpt.images.shape[-2:])[:, 0]
        scores = localization_scores(up, torch.from_numpy(sl_ckpt.nodule))
        malignant = sl_ckpt.targets[sl_ckpt.explained, 0].numpy() > 0.5
        want = [float(scores[f"dice@{t:g}"].double().numpy()[malignant].mean()) for t in DEFAULT_SWEEP]
        assert line.split()[0] == method and [float(v) for v in line.split()[1:]] == pytest.approx(want, abs=5e-4)
    assert lines[6].startswith("cdam - attention: Dice") and "95 % CI" in lines[6]
