"""Training (a few steps on tiny phantoms, resume) and `medvit-explain predict`."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medvit_explain.cli import cli
from medvit_explain.io import write_volume
from medvit_explain.model import build_model, load_model, save_checkpoint
from medvit_explain.phantom import make_phantoms
from medvit_explain.prediction import predict
from medvit_explain.train import roc_auc, slice_targets, task_loss

from .models import tiny_checkpoint, tiny_config


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    make_phantoms(out, seed=3, count=3, size=(64, 64, 16), spacing=(5.6, 5.6, 10.0), n_nodules=2)
    return out


def tiny_recipe(**training):
    """The tiny test model with a two-epoch training recipe (``training`` overrides its keys)."""
    config = tiny_config()
    config["training"] = {
        "seed": 1,
        "epochs": 2,
        "batch_size": 8,
        "lr": 1e-3,
        "warmup_epochs": 1,
        "min_area_mm2": 20.0,
        "val_fraction": 0.34,
        "token_label_weight": 1.0,
        **training,
    }
    return config


def test_train_then_resume(tmp_path, phantoms):
    import yaml

    config = tiny_recipe(seed=1)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "ckpt"
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "--config",
            str(path),
            "--data",
            str(phantoms),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    model = load_model(out, device="cpu")
    provenance = json.loads((out / "config.json").read_text())["provenance"]
    assert provenance["seed"] == 1 and provenance["epoch"] == 1 and "validation" in provenance
    state = tmp_path / ".ckpt.train_state"
    assert json.loads((state / "history.json").read_text())[-1]["epoch"] == 1
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "--config",
            str(path),
            "--data",
            str(phantoms),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--resume",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    history = json.loads((state / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]  # resumed at epoch 2, not from scratch
    assert model.targets == load_model(out, device="cpu").targets


def test_train_bad_data(tmp_path):
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "--config",
            "configs/sample_model.yaml",
            "--data",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2 and result.output.startswith("error:")
    assert not (tmp_path / "o").exists()


def test_slice_targets_hand_made():
    """Two nodules in one slice: malignancy is the max, biomarkers come from the larger one; a graze is
    left out; an empty slice is a negative without biomarker labels."""
    from medvit_explain.model import TaskSpec

    spec = TaskSpec.default()
    mask = np.zeros((10, 10, 4), np.int16)
    mask[0:2, 0:2, 0] = 1  # 4 px
    mask[5:9, 5:9, 0] = 2  # 16 px
    mask[0:1, 0:1, 1] = 2  # graze: 1 px
    nodules = [
        {"id": 1, "malignancy": 1, "spiculation": 5, "diameter_mm": 4.0},
        {"id": 2, "malignancy": 0, "spiculation": 1, "diameter_mm": 9.0},
    ]
    t, labelled, has_nodule = slice_targets(spec, nodules, mask, pixel_area_mm2=1.0, min_area_mm2=3.0)
    values = spec.denormalize(t)
    assert labelled.tolist() == [True, False, True, True] and has_nodule.tolist() == [True, False, False, False]
    assert values[0, spec.index("malignancy")] == 1
    assert values[0, spec.index("spiculation")] == pytest.approx(1.0)
    assert values[0, spec.index("diameter")] == pytest.approx(9.0)
    assert values[2, spec.index("malignancy")] == 0 and np.isnan(values[2, spec.index("spiculation")])


def test_task_loss_masks_missing_labels():
    kinds = ["binary", "regression"]
    out = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    y = torch.tensor([[1.0, float("nan")], [0.0, 0.0]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out[:, 0], y[:, 0]) + 1.0
    assert task_loss(out, y, kinds).item() == pytest.approx(expected.item())


def test_roc_auc_against_pairs():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50).astype(bool)
    s = rng.normal(size=50) + y
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]
    assert roc_auc(y, s) == pytest.approx(np.mean(pairs))


@pytest.mark.parametrize(
    "arch",
    [
        {"reg_tokens": 4},
        {"img_size": [32, 48]},
    ],
)
def test_predict_register_tokens_and_non_square_grid(tmp_path, arch):
    config = tiny_config()
    config["architecture"]["kwargs"].update(arch)
    if "img_size" in arch:
        config["preprocessing"]["image_size"] = arch["img_size"]
    torch.manual_seed(0)
    ckpt = save_checkpoint(build_model(config), tmp_path / "ckpt")
    from medvit_explain.phantom import generate_phantom

    ph = generate_phantom(1, size=(48, 40, 6), spacing=(7.0, 8.0, 10.0), n_nodules=1)
    path = write_volume(ph.ct, tmp_path / "ct.nii.gz")
    result = CliRunner().invoke(
        cli, ["predict", str(path), "--model", str(ckpt), "--out", str(tmp_path / "p.csv"), "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["rows"]) == 6 and "malignancy_prob" in data["columns"]
    model = load_model(ckpt, device="cpu")
    table = predict(model, ph.ct)
    probs = table.column("malignancy_prob")
    logits = table.column("malignancy_logit")
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits)), rtol=1e-5)
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert len(lines) == 7
    # explainers work on the same model
    from medvit_explain.explainers import explain
    from medvit_explain.prediction import model_inputs

    images = model_inputs(model, ph.ct).images(np.arange(6))
    maps = explain(model, images, "cdam", targets=["malignancy", "diameter"])
    assert maps.shape == (6, 2, *model.backbone.patch_embed.grid_size)


def test_predict_values_match_model(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    model = load_model(ckpt, device="cpu")
    from medvit_explain.phantom import generate_phantom

    ph = generate_phantom(2, size=(48, 48, 5), spacing=(7.0, 7.0, 10.0), n_nodules=1)
    table = predict(model, ph.ct, batch_size=2)
    from medvit_explain.prediction import model_inputs

    inputs = model_inputs(model, ph.ct)
    with torch.no_grad():
        raw = model(inputs.images(np.arange(5))).numpy()
    values = model.task_spec.to_values(raw)
    np.testing.assert_allclose(table.column("malignancy_logit"), raw[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(table.column("diameter"), values[:, model.task_spec.index("diameter")], rtol=1e-5)
    assert table.summary()["max_malignancy_slice"] == int(np.argmax(raw[:, 0]))


def test_resume_continues_exactly(tmp_path, phantoms):
    """Two epochs in one go and one epoch + a resumed one give the same weights (token head included)."""
    from .models import assert_resume_is_exact

    assert_resume_is_exact(tiny_recipe(seed=2, select_by="val_loss"), phantoms, tmp_path)


def test_init_from_copies_a_checkpoint_and_refuses_another_architecture(tmp_path):
    """``training.init_from``: the recipe's model starts from the checkpoint's weights (bit for bit); a
    checkpoint of another architecture is one CheckpointError line."""
    from medvit_explain.errors import CheckpointError
    from medvit_explain.workflows.train import _start_from

    from .models import tiny_model

    ckpt = tiny_checkpoint(tmp_path / "start", seed=3)
    model = build_model(tiny_config())
    _start_from(model, str(ckpt))
    start = tiny_model(seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), start.state_dict().values()))
    other = build_model(tiny_config(patch=16))
    with pytest.raises(CheckpointError, match="does not fit the recipe's model") as info:
        _start_from(other, str(ckpt))
    assert "\n" not in str(info.value)


def test_init_from_inflates_a_one_channel_checkpoint_to_adjacent_slices(tmp_path):
    """A one-channel checkpoint starts a 2.5D model (``adjacent_slices``): the patch embedding on the channel
    of offset 0, zeros on the others, so the new model's outputs equal the old model's on the centre slice
    whatever the neighbours hold; every other weight is copied bit for bit."""
    from medvit_explain.workflows.train import _start_from

    from .models import tiny_model

    ckpt = tiny_checkpoint(tmp_path / "start", seed=4)
    config = tiny_config()
    config["architecture"]["kwargs"]["in_chans"] = 3
    config["preprocessing"].update(in_chans=3, channels={"recipe": "adjacent_slices", "offsets": [-2, 0, 2]})
    model = build_model(config).eval()
    _start_from(model, str(ckpt))
    start = tiny_model(seed=4).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), start(x[:, 1:2]), rtol=1e-5, atol=1e-6)
    weight = model.backbone.patch_embed.proj.weight
    assert torch.equal(weight[:, 1], start.backbone.patch_embed.proj.weight[:, 0])
    assert float(weight[:, [0, 2]].abs().max()) == 0.0


def test_the_sample_slice_recipe_builds_the_shipped_models_architecture():
    """``configs/sample_model.yaml`` (from scratch, a convolutional stem) builds the architecture, channels and
    preprocessing of the shipped ``sample-slice``: its weights load into the recipe's model, outputs equal."""
    from pathlib import Path

    from medvit_explain.model import load_config, load_model

    root = Path(__file__).parents[1]
    config = load_config(root / "configs" / "sample_model.yaml")
    assert "init_from" not in config["training"]
    model = build_model(config, base_dir=root / "configs").eval()
    shipped = load_model("sample-slice", device="cpu").eval()
    assert shipped.config["architecture"] == model.config["architecture"]
    assert shipped.config["architecture"]["patch_embed"] == "convstem"
    assert shipped.preprocessing == model.preprocessing
    model.load_state_dict(shipped.state_dict(), strict=True)
    x = torch.randn(2, *model.input_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), shipped(x))
