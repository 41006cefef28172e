"""ROI-mode training (items = the inference ROI views of each labelled nodule, nodule-level scores) and the
shipped models' names (``sample-slice`` / ``sample-roi``) with the default choice of explain / predict / batch."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

import medvit_explain.model.checkpoint as checkpoint
from medvit_explain.cli import cli
from medvit_explain.errors import CheckpointError
from medvit_explain.io import load_volume
from medvit_explain.model import TaskSpec, build_model, load_model, save_checkpoint
from medvit_explain.phantom import GENERATOR_VERSION, make_phantoms
from medvit_explain.prediction import model_inputs, predict
from medvit_explain.workflows.studies import find_studies
from medvit_explain.workflows.train import load_rois, nodule_scores

from .models import assert_resume_is_exact, tiny_config


def roi_config(image=24, patch=6, size_mm=24.0, **preprocessing):
    """A tiny ROI-mode ViT: a ``size_mm`` cube at 1 mm, views of ``image`` px (resized when they differ)."""
    config = tiny_config(image_size=(image, image), patch=patch, mode="roi")
    config["name"] = "tiny-roi"
    config["preprocessing"]["roi"]["size_mm"] = size_mm
    config["preprocessing"].update(preprocessing)
    if "in_chans" in preprocessing:
        config["architecture"]["kwargs"]["in_chans"] = preprocessing["in_chans"]
    return config


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("roi_phantoms")
    make_phantoms(out, seed=11, count=3, size=(96, 96, 32), spacing=(3.0, 3.0, 4.0), n_nodules=2)
    return out


def _nodules(study) -> list[dict]:
    return json.loads(open(study.labels).read())["nodules"]


@pytest.mark.parametrize("stem", [None, [8, 8]], ids=["patchify", "convstem"])
def test_roi_training_one_epoch_gives_a_checkpoint_that_predicts_rois(tmp_path, phantoms, stem):
    config = roi_config()
    if stem:  # a convolutional stem: its batch-norm statistics are learnt and saved with the weights
        config["architecture"].update(patch_embed="convstem", stem_widths=stem)
        config["architecture"]["kwargs"]["patch_size"] = 4
    config["training"] = {"seed": 1, "epochs": 1, "batch_size": 8, "val_fraction": 0.34, "token_label_weight": 1.0}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(config))
    out = tmp_path / "ckpt"
    args = ["train", "--config", recipe, "--data", phantoms, "--out", out, "--device", "cpu"]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    provenance = json.loads((out / "config.json").read_text())["provenance"]
    n_nodules = sum(len(_nodules(s)) for s in find_studies(phantoms))
    assert provenance["n_train_nodules"] + provenance["n_val_nodules"] == n_nodules
    assert provenance["n_train_views"] == 3 * provenance["n_train_nodules"]
    assert {"malignancy_auc", "malignancy_auc_views", "n_nodules"} <= set(provenance["validation"])
    assert set(provenance["validation"]["mae"]) == set(TaskSpec.default().names[1:])

    model = load_model(out, device="cpu")
    if stem:
        assert model.grid_size == (6, 6) and model.config["architecture"]["stem_widths"] == stem
        assert model.backbone.patch_embed.stem[1].running_mean.abs().sum() > 0
    study = find_studies(phantoms)[0]
    centres = np.array([n["center_mm"] for n in _nodules(study)])
    table = predict(model, load_volume(study.path), roi_centers=centres)
    assert [r["view"] for r in table.rows] == ["axial", "coronal", "sagittal", "mean"] * len(centres)
    logits = table.column("malignancy_logit").reshape(len(centres), 4)
    np.testing.assert_allclose(logits[:, 3], logits[:, :3].mean(1), rtol=1e-6)


def test_roi_training_resumes_exactly(tmp_path, phantoms):
    """Two epochs in one go equal one epoch and a resumed one: the jitter, turns and flips come from the
    saved torch RNG."""

    config = roi_config()
    config["training"] = {"seed": 3, "batch_size": 4, "val_fraction": 0.34, "token_label_weight": 1.0}
    config["training"]["select_by"] = "val_loss"
    assert_resume_is_exact(config, phantoms, tmp_path)


@pytest.mark.parametrize(
    "preprocessing",
    [
        {},  # 24 mm at 1 mm = 24 px: no resize
        {"image_size": [32, 32]},  # resized 24 → 32 px
        {"in_chans": 3, "channels": {"recipe": "adjacent_slices", "offsets": [-1, 0, 1]}},
    ],
    ids=["copies", "resized", "adjacent_slices"],
)
def test_training_items_are_the_inference_inputs(phantoms, preprocessing):
    """Un-jittered items equal ``RoiInputs`` at the nodule centres bit for bit; an item shifted by whole
    samples is the ``RoiInputs`` crop around the shifted centre (same trilinear samples). Compared one
    study at a time: the bilinear resize (``resized``) rounds by batch size (1 ulp), at inference too."""
    config = roi_config(**preprocessing)
    if "image_size" in preprocessing:
        config["architecture"]["kwargs"]["img_size"] = preprocessing["image_size"]
    torch.manual_seed(0)
    model = build_model(config).eval()
    studies = find_studies(phantoms)
    rois = load_rois(studies, model, margin=2, token_targets=True, progress=False)
    shift = np.array([2, -1, 1])  # canonical (L, P, S) samples of 1 mm; the phantoms' axes are L, P, S
    done = 0
    for s, study in enumerate(studies):
        volume, centres = load_volume(study.path), np.array([n["center_mm"] for n in _nodules(study)])
        items = np.flatnonzero(np.repeat(rois.study == s, 3))
        assert len(items) == 3 * len(centres)
        if not len(centres):
            continue
        expected = model_inputs(model, volume, roi_centers=centres).images()
        assert torch.equal(rois.item_images(items), expected)
        shifted = model_inputs(model, volume, roi_centers=centres + shift * 1.0).images()
        moved = rois.item_images(items, np.tile(shift, (len(items), 1)))
        torch.testing.assert_close(moved, shifted, rtol=0, atol=1e-5)
        assert not torch.equal(moved, expected)
        done += len(items)
    assert done == len(rois) > 0
    torch.testing.assert_close(rois.images, rois.item_images(np.arange(len(rois))), rtol=0, atol=0)
    tokens = rois.item_token_targets(np.arange(len(rois)))
    assert tokens.shape == (len(rois), 2, *model.backbone.patch_embed.grid_size)
    assert bool((tokens[:, 0].amax((-2, -1)) > 0).all())  # every view's centre lies in its nodule
    assert bool((tokens[:, 1] <= tokens[:, 0] + 1e-6).all())  # malignant ⊂ nodule


def test_nodule_scores_average_the_views_logits():
    """Four nodules × three views, by hand. Per nodule, the mean logit (the ``mean`` row) ranks both
    malignant nodules above both benign ones: AUC 1. The max over views (0.75), the mean of the views'
    probabilities (0.75) and single views (25/36) would each give another number."""
    spec = TaskSpec.default()
    mal, spic, diam = spec.index("malignancy"), spec.index("spiculation"), spec.index("diameter")
    logits = [[4, -1, -1], [0.6, 0.6, 0.6], [1, 1, 1], [2, -3, -3]]  # A mal, B benign, C mal, D benign
    raw = np.zeros((12, len(spec)))
    raw[:, mal] = np.ravel(logits)
    raw[0:3, diam] = [0.0, 0.0, 3.0]  # nodule A: mean 1 → 40 mm; the others 0 → 20 mm
    targets = np.full((4, len(spec)), np.nan, np.float32)
    targets[:, mal] = [1, 0, 1, 0]
    targets[:, diam] = 0.0  # 20 mm
    targets[:, spic] = 1.0  # 5 (outputs 0 → 3: off by 2)
    scores = nodule_scores(spec, raw, targets, n_views=3)
    assert scores["n_nodules"] == 4 and scores["n_views"] == 12
    assert scores["malignancy_auc"] == pytest.approx(1.0)
    assert scores["malignancy_auc_views"] == pytest.approx(25 / 36)
    assert scores["malignancy_accuracy"] == pytest.approx(0.75)  # B: mean logit 0.6 → p 0.65, benign
    assert scores["mae"]["diameter"] == pytest.approx(20.0 / 4)  # mm
    assert scores["mae"]["spiculation"] == pytest.approx(2.0)
    assert set(scores["mae"]) == {"diameter", "spiculation"}  # unlabelled targets are not scored


# --------------------------------------------------------------------- shipped model names and defaults


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """Tiny stand-ins for the shipped models: ``sample-slice`` (slice mode) and ``sample-roi`` (ROI mode)."""
    torch.manual_seed(0)
    slice_config = tiny_config()
    slice_config["name"] = "tiny-slice"
    slice_dir = save_checkpoint(build_model(slice_config), tmp_path / "shipped" / "sample_model")
    roi_dir = save_checkpoint(build_model(roi_config()), tmp_path / "shipped" / "sample_roi")
    monkeypatch.setattr(checkpoint, "SAMPLE_MODEL_DIR", slice_dir)
    monkeypatch.setattr(checkpoint, "SAMPLE_ROI_MODEL_DIR", roi_dir)
    return {"sample-slice": slice_dir, "sample-roi": roi_dir}


@pytest.fixture(scope="module")
def study(phantoms):
    """(CT path, centres CSV, nodule mask path) of the first phantom."""
    first = find_studies(phantoms)[0]
    centres = phantoms / "centres.csv"
    rows = ["x_mm,y_mm,z_mm"] + [",".join(map(str, n["center_mm"])) for n in _nodules(first)]
    centres.write_text("\n".join(rows) + "\n")
    return first.path, str(centres), first.nodule_mask


def _predict_json(args) -> dict:
    result = CliRunner().invoke(cli, ["predict", *map(str, args), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _logits(model_path, ct, centres=None) -> np.ndarray:
    roi = None if centres is None else np.loadtxt(centres, delimiter=",", skiprows=1, ndmin=2)
    return predict(load_model(model_path, device="cpu"), load_volume(ct), roi_centers=roi).column("malignancy_logit")


def test_names_resolve_to_the_shipped_models(shipped, study):
    ct, centres, _ = study
    assert load_model("sample-roi", device="cpu").config["name"] == "tiny-roi"
    assert load_model("sample-slice", device="cpu").config["name"] == "tiny-slice"
    assert load_model(device="cpu").config["name"] == "tiny-slice"  # None: sample-slice
    with_roi = _predict_json([ct, "--roi-centers", centres])  # ROIs and no --model: sample-roi
    np.testing.assert_allclose(
        [r["malignancy_logit"] for r in with_roi["rows"]], _logits(shipped["sample-roi"], ct, centres), rtol=1e-5
    )
    plain = _predict_json([ct])  # no ROIs: sample-slice, every slice
    assert plain["summary"]["mode"] == "slice"
    np.testing.assert_allclose(
        [r["malignancy_logit"] for r in plain["rows"]], _logits(shipped["sample-slice"], ct), rtol=1e-5
    )
    chosen = _predict_json([ct, "--roi-centers", centres, "--model", "sample-slice"])  # a name given wins
    np.testing.assert_allclose(
        [r["malignancy_logit"] for r in chosen["rows"]], _logits(shipped["sample-slice"], ct, centres), rtol=1e-5
    )


def test_explain_and_batch_default_to_sample_roi_with_rois(shipped, study, phantoms, tmp_path):
    ct, _, mask = study
    out = tmp_path / "explained"
    args = ["explain", ct, "--roi-mask", mask, "--method", "cdam", "--target", "malignancy", "--no-report"]
    result = CliRunner().invoke(cli, [str(a) for a in [*args, "--out", out, "--device", "cpu"]])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["model"]["name"] == "tiny-roi"
    manifest = tmp_path / "one.csv"
    manifest.write_text(f"study_id,path,nodule_mask\ns1,{ct},{mask}\n")
    runs = {"roi": ["--roi-from-mask"], "slice": []}
    for name, extra in runs.items():
        args = ["batch", manifest, "--out", tmp_path / f"batch_{name}", "--method", "cdam", "--target", "malignancy"]
        result = CliRunner().invoke(
            cli, [str(a) for a in [*args, *extra, "--no-report", "--no-audit", "--device", "cpu"]]
        )
        assert result.exit_code == 0, result.output
        summary = json.loads((tmp_path / f"batch_{name}" / "s1" / "summary.json").read_text())
        assert summary["model"]["name"] == f"tiny-{name}"


def test_missing_roi_model_is_one_line_naming_the_script(shipped, study, tmp_path, monkeypatch):
    ct, centres, _ = study
    monkeypatch.setattr(checkpoint, "SAMPLE_ROI_MODEL_DIR", tmp_path / "not_built")
    with pytest.raises(CheckpointError, match="make_sample_model.py --config configs/sample_roi_model.yaml"):
        load_model("sample-roi", device="cpu")
    for args in ([ct, "--roi-centers", centres], [ct, "--roi-centers", centres, "--model", "sample-roi"]):
        result = CliRunner().invoke(cli, ["predict", *map(str, args), "--device", "cpu"])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert (
            lines[0].startswith("error: the sample-roi model is not built yet") and "make_sample_model.py" in lines[0]
        )
    assert _predict_json([ct])["summary"]["mode"] == "slice"  # sample-slice is unaffected


def test_a_name_wins_over_a_local_folder_of_that_name(shipped, study, tmp_path, monkeypatch):
    """``--model sample-roi`` is the shipped model even beside a folder ``sample-roi`` (with a warning);
    ``./sample-roi`` and a ``Path`` mean the folder."""
    ct, centres, _ = study
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(5)
    save_checkpoint(build_model({**roi_config(), "name": "local-roi"}), tmp_path / "sample-roi")
    result = CliRunner().invoke(
        cli, ["predict", ct, "--roi-centers", centres, "--model", "sample-roi", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert "warning: --model sample-roi is the shipped model; write ./sample-roi" in result.stderr
    local = _predict_json([ct, "--roi-centers", centres, "--model", "./sample-roi"])
    np.testing.assert_allclose(
        [r["malignancy_logit"] for r in local["rows"]], _logits(tmp_path / "sample-roi", ct, centres), rtol=1e-5
    )
    assert load_model("sample-roi", device="cpu").config["name"] == "tiny-roi"
    from pathlib import Path

    assert load_model(Path("sample-roi"), device="cpu").config["name"] == "local-roi"


def test_feature_token_labels_split_each_patch_into_the_nodule_parts(phantoms, tmp_path):
    """``token_label_features``: after nodule / malignant, one channel per part (spicules, lobulation,
    calcification, ground glass) with the share of each patch in that part. The parts are disjoint pieces of
    the nodule mask, so their shares add up to at most the nodule's (the rest is the solid core); a part a
    study does not have is zero in all its views; a part the labels count appears in some view."""
    from medvit_explain.errors import MedvitInputError
    from medvit_explain.phantom import FEATURE_LABELS
    from medvit_explain.workflows.train import TOKEN_FEATURES, TokenLabelHead, _prepare

    assert [FEATURE_LABELS[k] for k in TOKEN_FEATURES] == ["spicules", "lobulation", "calcification", "ground_glass"]
    torch.manual_seed(0)
    model = build_model(roi_config()).eval()
    studies = find_studies(phantoms)
    rois = load_rois(studies, model, margin=2, token_targets=True, feature_tokens=True, progress=False)
    plain = load_rois(studies, model, margin=2, token_targets=True, progress=False)
    items = np.arange(len(rois))
    tokens = rois.item_token_targets(items, np.tile([1, -2, 0], (len(items), 1)))
    assert tokens.shape == (len(rois), 6, *model.backbone.patch_embed.grid_size)
    torch.testing.assert_close(tokens[:, :2], plain.item_token_targets(items, np.tile([1, -2, 0], (len(items), 1))))
    # stored as uint8 (share × 255, rounded): four rounded parts against one rounded whole
    assert bool((tokens[:, 2:].sum(1) <= tokens[:, 0] + 2.0 / 255).all())
    assert float((tokens[:, 0] - tokens[:, 2:].sum(1)).max()) > 0.5  # a core patch
    seen = 0
    for s, study in enumerate(studies):
        nodules = _nodules(study)
        views = np.flatnonzero(np.repeat(rois.study == s, 3))
        for c, label in enumerate(TOKEN_FEATURES):
            voxels = sum(n["feature_voxels"][FEATURE_LABELS[label]] for n in nodules)
            part = tokens[views, 2 + c]
            if voxels == 0:
                assert float(part.abs().max()) == 0.0
            elif any(n["feature_voxels"][FEATURE_LABELS[label]] >= 8 for n in nodules):
                assert float(part.max()) > 0.0, (study.path, FEATURE_LABELS[label])
                seen += 1
    assert seen >= 1

    head = TokenLabelHead(model, 6)
    assert head(torch.zeros(2, 1 + rois.grid[0] * rois.grid[1], model.backbone.embed_dim)).shape == (2, 6, *rois.grid)

    config = roi_config()
    config["training"] = {"seed": 1, "val_fraction": 0.34, "token_label_weight": 1.0, "token_label_features": True}
    run = _prepare(config, phantoms, None, 1, 1, "cpu", False)
    assert run.token_head.linear.out_features == 6 and run.train_set.token_cubes.shape[1] == 6
    assert run.token_head.shapes is None and run.train_set.view_shapes is None  # only when asked for

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in phantoms.glob(f"{Path(studies[0].path).name[:-7]}*"):
        if not f.name.endswith("_features.nii.gz"):
            (bare / f.name).symlink_to(f)
    with pytest.raises(MedvitInputError, match="features.nii.gz"):
        load_rois(find_studies(bare), model, token_targets=True, feature_tokens=True, progress=False)

    from medvit_explain.workflows.train import STUDIES_PER_LOADER, _loading_processes

    assert _loading_processes(2, 2 * STUDIES_PER_LOADER) == 2  # training: a process per thread when it pays
    assert _loading_processes(2, 2 * STUDIES_PER_LOADER - 1) == _loading_processes(1, 1000) == 1
    # read in two spawned processes: the same arrays in the same order, and the same one-line error
    parallel = load_rois(studies, model, margin=2, token_targets=True, feature_tokens=True, progress=False, workers=2)
    np.testing.assert_array_equal(parallel.cubes, rois.cubes)
    np.testing.assert_array_equal(parallel.token_cubes, rois.token_cubes)
    np.testing.assert_array_equal(parallel.study, rois.study)
    torch.testing.assert_close(parallel.nodule_targets, rois.nodule_targets, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(MedvitInputError, match="features.nii.gz"):
        load_rois(
            [*find_studies(bare), *studies], model, token_targets=True, feature_tokens=True, progress=False, workers=2
        )


def test_view_shape_targets_are_the_body_moments_each_view_shows(phantoms):
    """``view_shape_targets``: per view, half the log ratio of the body's in-plane second moments, half the
    log of its normal variance against their geometric mean, and the lobe and spicule shares of the nodule,
    equal to np.cov of the body's voxel coordinates (the nodule less its spicule and lobe voxels) and to
    voxel counts; a nodule too small for moments gets zeros."""
    from medvit_explain.phantom import FEATURE_LABELS
    from medvit_explain.workflows.train import TOKEN_FEATURES, view_shape_targets

    g = np.indices((31, 31, 31)).astype(float) - 15
    body = (g[0] / 11) ** 2 + (g[1] / 7) ** 2 + (g[2] / 4) ** 2 <= 1  # an ellipsoid, axes along x, y, z
    lobe = ((g[0] - 9) ** 2 + g[1] ** 2 + (g[2] - 3) ** 2 <= 9) & ~body  # a dome on it, off-centre
    spike = (g[0] == 0) & (g[2] == 0) & (g[1] > 7) & (g[1] <= 13)  # a strand along y
    part = {name: label for label, name in FEATURE_LABELS.items()}
    cube = np.zeros((2 + len(TOKEN_FEATURES), 31, 31, 31), np.uint8)
    cube[0] = 255 * (body | lobe | spike)
    cube[2 + TOKEN_FEATURES.index(part["lobulation"])] = 255 * lobe
    cube[2 + TOKEN_FEATURES.index(part["spicules"])] = 255 * spike
    views = ["axial", "coronal", "sagittal"]
    got = view_shape_targets(cube, views)
    cov = np.cov(np.argwhere(body).T.astype(float), bias=True)  # the body's moments, [x, y, z] voxel axes
    nodule = (body | lobe | spike).sum()
    for v, normal in enumerate((2, 1, 0)):
        plane = [a for a in range(3) if a != normal]
        lam = np.sort(np.linalg.eigvalsh(cov[np.ix_(plane, plane)]))
        expected = [
            0.5 * np.log(lam[1] / lam[0]),
            0.5 * np.log(cov[normal, normal] / np.sqrt(lam[0] * lam[1])),
            lobe.sum() / nodule,
            spike.sum() / nodule,
        ]
        np.testing.assert_allclose(got[v], expected, rtol=1e-4, atol=1e-6)
    assert got[1, 0] > got[2, 0] > got[0, 0] > 0 and got[0, 1] < 0 < got[2, 1]  # long in x, flat in z
    tiny = np.zeros_like(cube)
    tiny[0, 15, 15, 15:18] = 255
    assert not view_shape_targets(tiny, views).any()


def test_view_shape_head_trains_with_the_recipe_and_refuses_without_part_labels(phantoms, tmp_path):
    """``training.view_shape_weight``: the run's ROI set carries one view-shape row per view (equal to
    ``view_shape_targets`` of the nodule's un-jittered crop), the training-only head reads the pooled token,
    an epoch runs, and a recipe without feature token labels is refused with one clear error."""
    from medvit_explain.errors import MedvitInputError
    from medvit_explain.workflows.train import VIEW_SHAPE_TARGETS, _optimise, _prepare, _train_epoch, view_shape_targets

    config = roi_config()
    recipe = {"seed": 1, "val_fraction": 0.34, "batch_size": 8, "token_label_weight": 1.0}
    config["training"] = {**recipe, "token_label_features": True, "view_shape_weight": 4.0}
    run = _prepare(config, phantoms, None, 1, 1, "cpu", False)
    rois = run.train_set
    assert run.token_head.shapes.out_features == len(VIEW_SHAPE_TARGETS) == 4
    assert rois.view_shapes.shape == (len(rois), 4)
    m, n = rois.margin, rois.n
    for r in range(rois.n_nodules):
        inner = rois.token_cubes[r][:, m : m + n, m : m + n, m : m + n]
        expected = view_shape_targets(inner, rois.views)
        np.testing.assert_array_equal(rois.view_shapes[3 * r : 3 * r + 3].numpy(), expected)
    assert float(rois.view_shapes[:, 2:].max()) > 0.0 or float(rois.view_shapes[:, :2].abs().max()) > 0.0
    _optimise(run)
    before = run.token_head.shapes.weight.detach().clone()
    assert np.isfinite(_train_epoch(run, 0, False))
    assert not torch.equal(before, run.token_head.shapes.weight)  # the head is trained

    config["training"] = {**recipe, "view_shape_weight": 4.0}
    with pytest.raises(MedvitInputError, match="view_shape_weight needs"):
        _prepare(config, phantoms, None, 1, 1, "cpu", False)


def test_roi_probe_script_trains_and_scores(tmp_path, phantoms, capsys, monkeypatch):
    """scripts/roi_probe.py (the README's shape-biomarker probe): several --train folders are joined, a slab
    of planes replaces the recipe's channels, and each report line has the AUC and all eight MAEs."""
    import runpy
    import sys

    config = roi_config()
    config["training"] = {"batch_size": 8, "roi_jitter_mm": 2.0, "loss_weights": {"binary": 1.0, "regression": 8.0}}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(config))
    script = Path(__file__).resolve().parents[1] / "scripts" / "roi_probe.py"
    args = ["--config", recipe, "--train", phantoms, "--train", phantoms, "--test", phantoms]
    args += ["--net", "cnn", "--channels=-2,0,2", "--epochs", "2", "--every", "1", "--threads", "1"]
    monkeypatch.setattr(sys, "argv", [str(script), *map(str, args)])
    runpy.run_path(str(script), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    n = sum(len(_nodules(s)) for s in find_studies(phantoms))
    assert f"{2 * n} training nodules ({6 * n} views), {n} held out" in lines[0]
    reports = [line for line in lines if line.startswith("epoch ")]
    assert [r.split(" (")[0] for r in reports] == ["epoch 1", "epoch 2"]
    for report in reports:
        assert "AUC " in report and all(f" {name} " in report + " " for name in TaskSpec.default().names[1:])


def test_roi_probe_fused_views(tmp_path, phantoms, capsys, monkeypatch):
    """--net fused: each nodule's views side by side (equal to concatenating them along the width, nodule by
    nodule), one ViT input with three times the tokens, and a report per nodule."""
    import runpy
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "roi_probe.py"
    probe = runpy.run_path(str(script), run_name="roi_probe")
    views = torch.randn(2 * 3, 4, 5, 6)  # 2 nodules x 3 views, nodule-major
    expected = torch.stack([torch.cat(list(views[3 * b : 3 * b + 3]), dim=-1) for b in range(2)])
    assert torch.equal(probe["side_by_side"](views, 3), expected)
    config = roi_config()
    net = probe["fused_vit"](config, 3)
    h, w = config["architecture"]["kwargs"]["img_size"]
    assert net(torch.randn(2, config["preprocessing"]["in_chans"], h, 3 * w)).shape == (2, len(TaskSpec.default()))
    config["training"] = {"batch_size": 6, "roi_jitter_mm": 2.0}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(config))
    args = ["--config", recipe, "--train", phantoms, "--test", phantoms, "--net", "fused"]
    monkeypatch.setattr(sys, "argv", [str(script), *map(str, [*args, "--epochs", "1", "--threads", "1"])])
    runpy.run_path(str(script), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("fused: ")
    assert lines[-1].startswith("epoch 1 ") and "AUC " in lines[-1] and " sphericity " in lines[-1]


def test_make_sample_model_reuses_only_its_own_recipes_phantoms(tmp_path):
    """scripts/make_sample_model.py makes a recipe's phantoms once (stamped with its seed, groups and the
    generator version), reuses them on the next run, and stops with one line on a folder of another recipe or
    generator instead of training on it; folders from before the version stamp are generator 2.0's."""
    import runpy

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_sample_model.py"
    phantoms = runpy.run_path(str(script))["phantoms"]
    groups = [{"count": 2, "nodules": 1, "size": [48, 48, 16], "spacing": [4.0, 4.0, 6.0]}]
    folder = tmp_path / "train"
    phantoms(folder, groups, 5)
    made = sorted(p.name for p in folder.glob("*.json"))
    assert made == ["grid0_000.json", "grid0_001.json", "phantoms.json"]
    stamp = json.loads((folder / "phantoms.json").read_text())
    assert stamp == {"seed": 5, "groups": groups, "generator_version": GENERATOR_VERSION}
    assert all(len(_nodules(s)) == 1 for s in find_studies(folder))
    before = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    phantoms(folder, groups, 5)  # the same recipe: nothing is made again
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    for other_groups, other_seed in (([{**groups[0], "count": 3}], 5), (groups, 6)):
        with pytest.raises(SystemExit, match=r"holds phantoms of another recipe or generator .* remove it or give"):
            phantoms(folder, other_groups, other_seed)
    with pytest.raises(SystemExit, match=r"\(2 there; this one makes 2 with generator 2.1\)"):
        phantoms(folder, groups, 5, generator_version="2.1")  # same recipe, another generator
    # made before the version was stamped (generator 2.0): a stamp without it, or no stamp (judged by names)
    for old in ({"seed": 5, "groups": groups}, None):
        if old is None:
            (folder / "phantoms.json").unlink()
        else:
            (folder / "phantoms.json").write_text(json.dumps(old))
        phantoms(folder, groups, 5)  # generator 2.0: reused
        with pytest.raises(SystemExit, match=r"with generator 2.1\)"):
            phantoms(folder, groups, 5, generator_version="2.1")
    with pytest.raises(SystemExit, match=r"\(2 there; this one makes 3 with generator 2.0\)"):
        phantoms(folder, [{**groups[0], "count": 3}], 5)
    # a 2.1 recipe: its phantoms are generator 2.1's, stamped so
    new = tmp_path / "train21"
    phantoms(new, groups, 5, generator_version="2.1")
    assert json.loads((new / "phantoms.json").read_text())["generator_version"] == "2.1"
    assert json.loads((new / "grid0_000.json").read_text())["generator_version"] == "2.1"
    phantoms(new, groups, 5, generator_version="2.1")


def test_cdam_paths_script_reports_each_part_and_block(phantoms, tmp_path, capsys, monkeypatch):
    """scripts/cdam_paths.py on ROI views: a header, the six maps' lines for the part asked for, then one
    AG-CAM line per block whose masses add up to the whole map."""
    import runpy
    import sys

    torch.manual_seed(0)
    model_dir = save_checkpoint(build_model(roi_config()), tmp_path / "roi")
    script = Path(__file__).resolve().parents[1] / "scripts" / "cdam_paths.py"
    argv = [str(script), "--model", str(model_dir), "--data", str(phantoms), "--part", "1", "--threads", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("spiculation CDAM on ") and "views with core" in lines[0]
    assert [line.split()[0] for line in lines[1:7]] == ["cdam", "keys", "values", "query", "bias", "centred"]
    assert "mean on core +0.000, rest of nodule +0.000, outside +0.000" in lines[4]  # the query part is zero
    blocks = [line for line in lines[7:] if line.startswith("AG-CAM block ")]
    assert len(blocks) == len(build_model(roi_config()).backbone.blocks)
    assert sum(float(b.split(": ")[1].split()[0]) for b in blocks) == pytest.approx(1.0, abs=0.02)


def test_make_sample_model_names_the_training_device_in_the_card():
    """The model card says where a sample model was trained (a lent GPU's name, or the CPU threads)."""
    import runpy

    import yaml

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_sample_model.py"
    ns = runpy.run_path(str(script))
    assert ns["trained_on"]("cpu", {"num_threads": 2}).startswith("CPU, 2 threads, torch ")
    config = yaml.safe_load((script.parents[1] / "configs" / "sample_model.yaml").read_text())
    timings = {"phantoms": 35.0, "training": 84.0, "per_epoch": 3.5, "total": 149.0}
    held = {"seed": 1000, "phantoms": 20, "n_slices": 1023, "n_nodule_slices": 110, "mae": {"margin": 1.1}}
    held |= {"malignancy_auc": 0.98, "malignancy_accuracy": 0.97, "malignancy_auc_nodule_slices": 0.9}
    held |= {"malignancy_false_positives_nodule_free": 4}
    card = {"held_out": held, "selected_epoch": 13, "timings_s": timings, "trained_on": "NVIDIA H200 (CUDA 13.0)"}
    text = ns["model_card_markdown"](config, card)
    assert "Re-created in 2.5 min (phantoms 35 s, training 84 s, 4 s an epoch) on NVIDIA H200 (CUDA 13.0)." in text


def test_shape_oracle_features_and_script(tmp_path, phantoms, capsys, monkeypatch):
    """scripts/shape_oracle.py (the README's shape-grade bound): the axis ratio of a drawn ellipsoid's
    moments is its axis ratio, a view's planes see the in-plane ratio, and the script reports both graders
    for both biomarkers."""
    import runpy
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "shape_oracle.py"
    oracle = runpy.run_path(str(script), run_name="shape_oracle")
    g = np.mgrid[-20:21, -20:21, -20:21].reshape(3, -1).T.astype(float) * 0.5  # 0.5 mm voxels
    solid = g[(g[:, 0] / 9.0) ** 2 + (g[:, 1] / 6.0) ** 2 + (g[:, 2] / 3.0) ** 2 <= 1.0]  # axes 9, 6, 3 mm
    feats = oracle["_volume_features"](solid - solid.mean(0), 12.0)
    assert feats[0] == 12.0
    assert feats[1] == pytest.approx(3.0, rel=0.03) and feats[2] == pytest.approx(1.5, rel=0.03)
    assert feats[3] == pytest.approx(2.0, rel=0.03) and feats[5] < 0.02  # (almost) nothing beyond the ellipsoid
    # the axial view (normal z) of that ellipsoid: planes at -6 (empty), 0 (ratio 9 : 6) and +1 mm
    planes = oracle["_plane_features"](solid[:, :2], solid[:, 2], [-6.0, 0.0, 1.0], 0.25)
    assert planes[0] == 0.0 and planes[1:5] == [1.0, 0.0, 0.0, 0.0]
    assert planes[6] == pytest.approx(1.5, rel=0.05) and planes[5] > planes[10] > 0
    assert planes[9] < 0.02  # (almost) nothing beyond the central section's ellipse
    monkeypatch.setattr(sys, "argv", [str(script), "--train", str(phantoms), "--test", str(phantoms)])
    runpy.run_path(str(script), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    n = sum(len(_nodules(s)) for s in find_studies(phantoms))
    assert lines[0].endswith("held-out nodules") and int(lines[0].split()[0]) <= n
    expected = [("sphericity", "whole mask:"), ("sphericity", "body:"), ("lobulation", "whole mask:")]
    expected.append(("lobulation", "mask + lobe share:"))
    for (target, reading), line in zip(expected, lines[1:], strict=True):
        assert line.split()[0] == target and reading in line and "MAE 3D" in line and "per view (mean of 3)" in line
    # the readings: the body drops the spicule and lobe voxels; the lobe-share reading adds each plane's share
    spike = np.array([[x, 0.0, 0.0] for x in np.arange(9.5, 14.0, 0.5)])
    lobe = solid[solid[:, 0] > 7.0]
    points = np.concatenate([solid, spike])
    parts = np.concatenate([np.where(solid[:, 0] > 7.0, 3, 1), np.full(len(spike), 2)])
    readings = oracle["_readings"](points, parts, 12.0, [0.0, 1.0], 0.25)
    body = solid[solid[:, 0] <= 7.0]
    np.testing.assert_allclose(readings["body"][0], oracle["_volume_features"](body - body.mean(0), 12.0))
    np.testing.assert_allclose(readings["whole mask"][0], oracle["_volume_features"](points, 12.0))
    share = readings["mask + lobe share"][1][0][-2:]  # the axial view's two planes
    slab = np.abs(points[:, 2]) <= 0.25
    assert share[0] == pytest.approx(np.mean(parts[slab] == 3)) and share[0] > 0 and len(lobe) > 0
