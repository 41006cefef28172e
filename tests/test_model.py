"""TaskSpec, MedViT, build_model and resolve_device (tiny models, CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medvit_explain.errors import CheckpointError, DeviceError, ModelNotSupportedError, TargetError
from medvit_explain.model import (
    MedViT,
    TaskSpec,
    build_model,
    load_config,
    load_task_spec,
    resolve_device,
    validate_preprocessing,
)

ROOT = Path(__file__).resolve().parents[1]
LIDC_NAMES = [
    "malignancy",
    "subtlety",
    "calcification",
    "margin",
    "lobulation",
    "spiculation",
    "diameter",
    "texture",
    "sphericity",
]


def tiny_config(**kwargs) -> dict:
    arch = dict(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    arch.update(kwargs)
    return {
        "name": "tiny",
        "architecture": {"timm_name": "vit_tiny_patch16_224", "kwargs": arch},
        "task_spec": "lidc",
    }


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# -- TaskSpec ---------------------------------------------------------------------------------------
def test_default_spec_order_and_kinds():
    spec = TaskSpec.default()
    assert spec.names == LIDC_NAMES
    assert spec.kinds == ["binary"] + ["regression"] * 8
    assert spec["calcification"].scale == (1.0, 6.0)
    assert spec["diameter"].scale == (0.0, 40.0)
    assert spec.binary_indices == [0] and spec.regression_indices == list(range(1, 9))
    # normalisation maps each scale to [-1, 1]
    for t in spec.targets[1:]:
        assert (t.scale[0] - t.mean) / t.std == -1.0 and (t.scale[1] - t.mean) / t.std == 1.0


def test_packaged_spec_is_a_copy_of_configs():
    packaged = ROOT / "medvit_explain" / "model" / "task_lidc.yaml"
    assert packaged.read_text() == (ROOT / "configs" / "task_lidc.yaml").read_text()
    assert TaskSpec.from_yaml(ROOT / "configs" / "task_lidc.yaml") == TaskSpec.default()


def test_spec_dict_round_trip():
    spec = TaskSpec.default()
    assert TaskSpec.from_dict(spec.to_dict()) == spec
    assert TaskSpec.from_dict(yaml.safe_load(yaml.safe_dump(spec.to_dict()))) == spec


def test_index_and_resolve():
    spec = TaskSpec.default()
    assert spec.index("spiculation") == 5
    assert spec.index(5) == 5 and spec.index(np.int64(5)) == 5 and spec.index("5") == 5
    assert spec.resolve(None) == list(range(9))
    assert spec.resolve("all") == list(range(9))
    assert spec.resolve("malignancy") == [0]
    assert spec.resolve(["diameter", 0, "diameter"]) == [6, 0]
    assert spec.resolve("margin,texture") == [3, 7]


@pytest.mark.parametrize("bad", ["spiculated", 9, -1, "", 1.5, True, ["malignancy", "foo"]])
def test_unknown_target_lists_valid_names(bad):
    spec = TaskSpec.default()
    with pytest.raises(TargetError) as info:
        spec.resolve(bad) if isinstance(bad, list) or bad == "" else spec.index(bad)
    msg = str(info.value)
    assert "\n" not in msg
    for name in LIDC_NAMES:
        assert name in msg


def test_normalize_denormalize_round_trip_torch_and_numpy():
    spec = TaskSpec.default()
    values = np.array([[1.0, 1, 1, 1, 1, 1, 0, 1, 1], [0.0, 5, 6, 5, 5, 5, 40, 5, 5], [1.0, 3, 3.5, 2, 4, 3, 20, 3, 3]])
    normed = spec.normalize(values)
    assert np.allclose(normed[0, 1:], -1) and np.allclose(normed[1, 1:], 1) and np.allclose(normed[2, [1, 2, 6]], 0)
    assert np.array_equal(normed[:, 0], values[:, 0])  # binary labels untouched
    assert np.allclose(spec.denormalize(normed), values)
    t = torch.tensor(values, dtype=torch.float64).reshape(3, 1, 9)  # any leading dims
    tn = spec.normalize(t)
    assert tn.dtype == torch.float64 and tn.shape == (3, 1, 9)
    assert torch.allclose(tn.reshape(3, 9), torch.from_numpy(normed))
    assert torch.allclose(spec.denormalize(tn), t)
    # a subset of columns
    sub = spec.normalize(np.array([40.0, 1.0]), targets=["diameter", "subtlety"])
    assert np.allclose(sub, [1.0, -1.0])
    with pytest.raises(ValueError, match=r"\[\.\.\., 9\]"):
        spec.normalize(np.zeros((2, 3)))


def test_to_values_probability_and_scale():
    spec = TaskSpec.default()
    out = torch.zeros(2, 9)
    out[1, 0] = 2.0
    out[1, 6] = 0.5
    vals = spec.to_values(out)
    assert vals[0, 0] == 0.5 and torch.isclose(vals[1, 0], torch.sigmoid(torch.tensor(2.0)))
    assert vals[0, 6] == 20.0 and vals[1, 6] == 30.0 and vals[0, 2] == 3.5
    assert np.allclose(spec.to_values(out.numpy()), vals.numpy())


def test_spec_validation_errors():
    with pytest.raises(CheckpointError, match="softmax target 'a': expected classes"):
        TaskSpec.from_dict({"targets": [{"name": "a", "kind": "multiclass"}]})
    with pytest.raises(CheckpointError, match="kind"):
        TaskSpec.from_dict({"targets": [{"name": "a", "kind": "ordinal"}]})
    with pytest.raises(CheckpointError, match="twice"):
        TaskSpec.from_dict({"targets": [{"name": "a", "kind": "binary"}, {"name": "a", "kind": "binary"}]})
    with pytest.raises(CheckpointError, match="lo < hi"):
        TaskSpec.from_dict({"targets": [{"name": "a", "kind": "regression", "scale": [5, 1]}]})
    with pytest.raises(CheckpointError, match="at least one"):
        TaskSpec.from_dict({"targets": []})
    with pytest.raises(CheckpointError, match="not found"):
        load_task_spec("no_such_spec.yaml")
    # defaults: mean = centre, std = half range; nested normalization accepted
    spec = TaskSpec.from_dict(
        [
            {"name": "d", "kind": "regression", "scale": [0, 10]},
            {"name": "e", "kind": "regression", "normalization": {"mean": 1, "std": 2}},
        ]
    )
    assert (spec["d"].mean, spec["d"].std, spec["e"].mean, spec["e"].std) == (5.0, 5.0, 1.0, 2.0)


# -- MedViT -----------------------------------------------------------------------------------------
def test_forward_contract_identity():
    model = build_model(tiny_config()).eval()
    x = torch.randn(3, 1, 32, 32)
    out = model(x)
    bb = model.backbone
    ref = model.head(bb.forward_head(bb.forward_features(x), pre_logits=True))
    assert out.shape == (3, 9)
    assert torch.equal(out, ref)
    assert bb.global_pool == "token" and bb.cls_token is not None
    assert model.targets == LIDC_NAMES and model.task_spec == TaskSpec.default()


@pytest.mark.parametrize(
    "kwargs, size, grid, prefix",
    [
        ({"reg_tokens": 4}, (1, 32, 32), (4, 4), 5),
        ({"img_size": (32, 48)}, (1, 32, 48), (4, 6), 1),
        ({"img_size": [32, 48], "reg_tokens": 2, "in_chans": 3}, (3, 32, 48), (4, 6), 3),
    ],
)
def test_variants_geometry_from_backbone(kwargs, size, grid, prefix):
    model = build_model(tiny_config(**kwargs)).eval()
    assert model.input_size == size and model.grid_size == grid and model.num_prefix_tokens == prefix
    assert model.preprocessing["image_size"] == list(size[1:]) and model.preprocessing["in_chans"] == size[0]
    x = torch.randn(2, *size)
    bb = model.backbone
    assert bb.forward_features(x).shape == (2, prefix + grid[0] * grid[1], 32)
    assert torch.equal(model(x), model.head(bb.forward_head(bb.forward_features(x), pre_logits=True)))


def test_deit_distilled_and_avg_pool_variants():
    cfg = tiny_config()
    cfg["architecture"]["timm_name"] = "deit_tiny_distilled_patch16_224"
    model = build_model(cfg).eval()
    assert model.num_prefix_tokens == 2 and model(torch.randn(1, 1, 32, 32)).shape == (1, 9)
    model = build_model(tiny_config(class_token=False, global_pool="avg"))
    assert model.num_prefix_tokens == 0 and model(torch.randn(1, 1, 32, 32)).shape == (1, 9)


def test_predict_values():
    model = build_model(tiny_config()).eval()
    x = torch.randn(2, 1, 32, 32)
    vals = model.predict_values(x)
    assert not vals.requires_grad
    assert torch.allclose(vals, model.task_spec.to_values(model(x)))
    as_dict = model.predict_values(x, as_dict=True)
    assert list(as_dict) == LIDC_NAMES and as_dict["malignancy"].shape == (2,)
    assert ((as_dict["malignancy"] > 0) & (as_dict["malignancy"] < 1)).all()


def test_build_model_errors():
    with pytest.raises(CheckpointError, match="no_such_vit"):
        build_model({"architecture": {"timm_name": "no_such_vit"}})
    with pytest.raises(CheckpointError, match="pretrained"):
        build_model(tiny_config(pretrained=True))
    with pytest.raises(CheckpointError, match="num_classes"):
        build_model(tiny_config(num_classes=9))
    with pytest.raises(CheckpointError, match="format"):
        build_model({**tiny_config(), "format": "other/2"})
    with pytest.raises(CheckpointError, match="architecture"):
        build_model({"task_spec": "lidc"})
    with pytest.raises(CheckpointError, match="class token"):
        build_model(tiny_config(class_token=False))
    with pytest.raises(ModelNotSupportedError, match="VisionTransformer"):
        build_model({"architecture": {"timm_name": "resnet18", "kwargs": {"in_chans": 1, "global_pool": "avg"}}})


def test_preprocessing_defaults_and_validation():
    model = build_model(tiny_config())
    pp = model.preprocessing
    assert pp["mode"] == "slice" and pp["hu_window"] == [-1000.0, 400.0] and pp["crop_body"] is True
    assert pp["body_threshold_hu"] == -500.0 and pp["roi"]["views"] == ["axial", "coronal", "sagittal"]
    assert model.config["preprocessing"] == pp
    roi = validate_preprocessing({"mode": "roi", "roi": {"size_mm": 40}}, (1, 32, 32))
    assert roi["roi"] == {"size_mm": 40.0, "spacing_mm": 1.0, "views": ["axial", "coronal", "sagittal"]}
    with pytest.raises(CheckpointError, match="does not match the model"):
        build_model({**tiny_config(), "preprocessing": {"image_size": [64, 64]}})
    for bad, match in [
        ({"mode": "volume"}, "mode"),
        ({"hu_window": [400, -1000]}, "lo < hi"),
        ({"crop_body": "yes"}, "crop_body"),
        ({"roi": {"views": ["axial", "oblique"]}}, "views"),
        ({"roi": {"size_mm": 0}}, "size_mm"),
        ({"spacing": 1}, "unknown keys"),
        ({"scale_to": [1, 1]}, "scale_to"),
    ]:
        with pytest.raises(CheckpointError, match=match):
            validate_preprocessing(bad, (1, 32, 32))


def test_sample_model_config_builds():
    cfg = load_config(ROOT / "configs" / "sample_model.yaml")
    model = build_model(cfg, base_dir=ROOT / "configs")
    assert isinstance(model, MedViT)
    assert model.input_size == (5, 256, 256) and model.grid_size == (16, 16)  # the slice and four neighbours
    assert model.preprocessing["channels"] == {"recipe": "adjacent_slices", "offsets": [-2, -1, 0, 1, 2]}
    assert model.preprocessing["scale_to"] == [-2.0, 2.0]
    assert model.targets == LIDC_NAMES
    training = model.config["training"]
    for key in (
        "epochs",
        "batch_size",
        "lr",
        "weight_decay",
        "seed",
        "val_fraction",
        "min_area_mm2",
        "phantoms",
    ):
        assert key in training
    assert {"train_seed", "test_seed", "groups", "test_groups"} <= set(training["phantoms"])


# -- devices ----------------------------------------------------------------------------------------
def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ["gpu", "cuda:x", "cuda:-1", "tpu", "", "cuda:0:1"]:
        with pytest.raises(DeviceError, match="expected auto, cpu, cuda or cuda:N") as info:
            resolve_device(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(DeviceError, match="expected"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="not available"):
            resolve_device("cuda")
    else:
        assert resolve_device("cuda:0") == torch.device("cuda", 0)
