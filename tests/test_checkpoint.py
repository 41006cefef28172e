"""Checkpoints: round trips, bare timm state dicts, refusal of unsafe / mismatched / unreadable files."""

from __future__ import annotations

import json
import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

from medvit_explain.errors import CheckpointError, DeviceError
from medvit_explain.model import FORMAT, SAMPLE_MODEL_DIR, build_model, load_model, save_checkpoint

ARCH = dict(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=2)


def tiny_config(**kwargs) -> dict:
    return {
        "name": "tiny",
        "architecture": {"timm_name": "vit_tiny_patch16_224", "kwargs": {**ARCH, **kwargs}},
        "task_spec": "lidc",
        "preprocessing": {"mode": "roi", "hu_window": [-1000, 400]},
    }


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def model():
    return build_model(tiny_config(reg_tokens=2)).eval()


@pytest.fixture
def x():
    return torch.randn(2, 1, 32, 32)


def _left_overs(folder):
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_directory_round_trip_bit_exact(model, x, tmp_path):
    out = save_checkpoint(model, tmp_path / "ckpt", provenance={"seed": 7, "metrics": {"auc": 0.9}})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    from medvit_explain.io.writer import usual_mode

    assert out.stat().st_mode & 0o777 == usual_mode(directory=True)
    assert all(p.stat().st_mode & 0o777 == usual_mode() for p in out.iterdir())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == FORMAT and cfg["name"] == "tiny"
    assert cfg["architecture"] == {
        "timm_name": "vit_tiny_patch16_224",
        "kwargs": {**ARCH, "reg_tokens": 2, "global_pool": "token"},
    }
    assert cfg["provenance"]["seed"] == 7 and cfg["provenance"]["metrics"] == {"auc": 0.9}
    assert "torch" in cfg["provenance"]["versions"] and "saved_at" in cfg["provenance"]
    loaded = load_model(out, device="cpu")
    assert not loaded.training and loaded.device == torch.device("cpu")
    assert torch.equal(loaded(x), model(x))
    assert loaded.preprocessing == model.preprocessing and loaded.preprocessing["mode"] == "roi"
    assert loaded.task_spec == model.task_spec and loaded.targets == model.targets
    assert loaded.config["provenance"]["seed"] == 7
    # overwrite an existing checkpoint atomically; nothing temporary left behind
    save_checkpoint(loaded, out, provenance={"seed": 8})
    assert json.loads((out / "config.json").read_text())["provenance"]["seed"] == 8
    assert _left_overs(tmp_path) == []


def test_safetensors_file_with_sibling_config(model, x, tmp_path):
    path = save_checkpoint(model, tmp_path / "weights.safetensors")
    assert (tmp_path / "weights.json").is_file()
    assert torch.equal(load_model(path, device="cpu")(x), model(x))
    assert _left_overs(tmp_path) == []


def test_refuses_to_overwrite_foreign_directory(model, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_checkpoint(model, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt"])
def test_bare_timm_state_dict_with_config(suffix, x, tmp_path):
    timm_model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=9, **ARCH).eval()
    state = timm_model.state_dict()
    path = tmp_path / f"timm{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    cfg_path = tmp_path / "my_config.json"
    cfg_path.write_text(json.dumps(tiny_config()))
    loaded = load_model(path, device="cpu", config=cfg_path)
    assert torch.equal(loaded.head.weight, timm_model.head.weight)
    assert torch.equal(loaded(x), timm_model(x))  # same ops in the same order
    # a config dict works too, and so does a bare file without any config → a clear error
    assert torch.equal(load_model(path, device="cpu", config=tiny_config())(x), loaded(x))
    with pytest.raises(CheckpointError, match="no config found"):
        load_model(path, device="cpu")


def test_full_medvit_state_dict_pth_and_wrapped(model, x, tmp_path):
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "full.pth")
    loaded = load_model(tmp_path / "full.pth", device="cpu", config=model.config)
    assert torch.equal(loaded(x), model(x))


class _Evil:
    """Unpickling this would create a marker file (stands in for os.system)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch_zip", "raw_pickle", "inside_state_dict"])
def test_code_executing_pickle_refused(how, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if how == "torch_zip":
        torch.save(_Evil(marker), path)
    elif how == "inside_state_dict":
        torch.save({"head.weight": torch.zeros(9, 32), "head.bias": _Evil(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_Evil(marker)))
    assert not marker.exists()
    with pytest.raises(CheckpointError) as info:
        load_model(path, device="cpu", config=tiny_config())
    assert not marker.exists()
    msg = str(info.value)
    assert "\n" not in msg
    if how != "raw_pickle":
        assert "not a plain tensor state dict" in msg


@pytest.mark.parametrize(
    "change, match",
    [
        ({"embed_dim": 48}, "shape mismatch"),
        ({"img_size": 48}, "pos_embed"),
        ({"reg_tokens": 0}, "unexpected keys backbone.reg_token"),
        ({"depth": 3}, "missing keys backbone.blocks.2"),
    ],
)
def test_mismatched_config_refused(model, change, match, tmp_path):
    path = save_checkpoint(model, tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architecture"]["kwargs"].update(change)
    cfg["preprocessing"]["image_size"] = None  # re-derived from the model
    with pytest.raises(CheckpointError, match=match) as info:
        load_model(path / "model.safetensors", device="cpu", config=cfg)
    assert "\n" not in str(info.value)


def test_mismatched_targets_refused(model, tmp_path):
    path = save_checkpoint(model, tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    cfg["task_spec"]["targets"] = cfg["task_spec"]["targets"][:3]
    with pytest.raises(CheckpointError, match=r"head\.weight \[9, 32\] vs config \[3, 32\]"):
        load_model(path / "model.safetensors", device="cpu", config=cfg)


@pytest.mark.parametrize(
    "name, data",
    [
        ("junk.safetensors", b"not a tensor file"),
        ("junk.pth", b"\x00\x01garbage"),
        ("empty.pt", b""),
        ("weights.ckpt", b""),
    ],
)
def test_unreadable_files_refused(name, data, tmp_path):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        load_model(path, device="cpu", config=tiny_config())
    assert "\n" not in str(info.value)


def test_missing_paths_and_configs(model, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nothing", device="cpu")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path / "empty_dir", device="cpu")
    path = save_checkpoint(model, tmp_path / "ckpt")
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read config"):
        load_model(path, device="cpu")


def test_sample_model_missing_is_a_clear_error(tmp_path, monkeypatch):
    import medvit_explain.model.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "SAMPLE_MODEL_DIR", tmp_path / "no_sample_model")
    with pytest.raises(CheckpointError, match="sample model is missing"):
        load_model(device="cpu")


def test_sample_model_loads():
    model = load_model(device="cpu")
    assert (SAMPLE_MODEL_DIR / "model.safetensors").is_file()
    assert model.targets[0] == "malignancy" and len(model.targets) == 9
    assert len(model.source_info["sha256"]) == 64


def test_bad_device_fails_before_reading(tmp_path):
    with pytest.raises(DeviceError, match="expected auto, cpu, cuda or cuda:N"):
        load_model(tmp_path / "nothing", device="gpu0")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_on_cuda(model, x, tmp_path):
    path = save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_model(path, device="cuda")
    assert loaded.device.type == "cuda"
    assert torch.allclose(loaded(x.cuda()).cpu(), model(x), atol=1e-4)


def _lightning_ckpt(model, path, extra=None):
    """A Lightning-style checkpoint of ``model``: the weights under ``state_dict`` with the LightningModule's
    attribute prefix ``model.`` and the head in an ``mlp_head`` Sequential, beside training state."""
    state = {}
    for key, value in model.state_dict().items():
        key = key.replace("head.", "mlp_head.0.", 1) if key.startswith("head.") else key
        state["model." + key] = value.clone()
    ckpt = {"state_dict": state, "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0"}
    ckpt["hyper_parameters"] = {"lr": 1e-4, "targets": ["malignancy"]}
    ckpt.update(extra or {})
    torch.save(ckpt, path)
    return path


RULES = {"strip_prefix": "model.", "rename": {"mlp_head.0.": "head."}}


def test_lightning_ckpt_with_key_rules_equals_the_original(model, x, tmp_path):
    """A .ckpt (weights_only) with `checkpoint: {strip_prefix, rename}` in the config gives the original
    model's outputs and CDAM maps; saved again, it reloads without the rules (our names)."""
    from medvit_explain.explainers import explain

    config = {**tiny_config(reg_tokens=2), "checkpoint": RULES}
    ckpt = _lightning_ckpt(model, tmp_path / "epoch=3.ckpt")
    loaded = load_model(ckpt, device="cpu", config=config)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(explain(loaded, x, "cdam"), explain(model, x, "cdam"), rtol=0, atol=1e-6)
    again = load_model(save_checkpoint(loaded, tmp_path / "converted"), device="cpu")
    assert "checkpoint" not in json.loads((tmp_path / "converted" / "config.json").read_text())
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    with pytest.raises(
        CheckpointError, match="every key starts with 'model.': add checkpoint: {strip_prefix: 'model.'}"
    ):
        load_model(ckpt, device="cpu", config=tiny_config(reg_tokens=2))  # without the rules: says which keys


@pytest.mark.parametrize(
    "rules, match",
    [
        ("model.", "expected a mapping with strip_prefix"),
        ({"strip": "model."}, "unknown key"),
        ({"strip_prefix": 3}, "strip_prefix: expected a key prefix"),
        ({"rename": ["mlp_head.0.", "head."]}, "rename: expected a mapping"),
        ({"strip_prefix": ["model.", "model.mlp_head.0."], "rename": {"mlp_head.0.": "backbone.cls_token"}}, "."),
    ],
)
def test_bad_key_rules_are_one_line_errors(model, tmp_path, rules, match):
    ckpt = _lightning_ckpt(model, tmp_path / "last.ckpt")
    with pytest.raises(CheckpointError, match=match) as info:
        load_model(ckpt, device="cpu", config={**tiny_config(reg_tokens=2), "checkpoint": rules})
    assert "\n" not in str(info.value)


def test_lightning_ckpt_with_objects_is_refused_with_a_hint(model, tmp_path):
    ckpt = _lightning_ckpt(model, tmp_path / "bad.ckpt", extra={"callbacks": {"cb": pickle.PickleError("x")}})
    with pytest.raises(CheckpointError, match=r"refused.*Lightning \.ckpt: torch\.save\(ckpt\['state_dict'\]"):
        load_model(ckpt, device="cpu", config={**tiny_config(reg_tokens=2), "checkpoint": RULES})


def test_torchvision_vit_loads_with_source_torchvision(tmp_path):
    """A torchvision VisionTransformer's state dict, with `checkpoint: {source: torchvision}`, gives the
    torchvision module's outputs, and CDAM equals the definition computed on the torchvision module itself
    (T = the last encoder layer's ln_1 output, S_i = Σ_j T_ij ∂f/∂T_ij, class token dropped)."""
    import torchvision

    from medvit_explain.explainers import explain

    tv = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=128, num_classes=9
    ).eval()
    torch.save(tv.state_dict(), tmp_path / "vit_b_16_lidc.pth")
    config = tiny_config(in_chans=3)
    config["preprocessing"] = {"mode": "slice", "in_chans": 3, "hu_window": [-1000, 400]}
    config["checkpoint"] = {"source": "torchvision"}
    model = load_model(tmp_path / "vit_b_16_lidc.pth", device="cpu", config=config)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv(x), rtol=1e-5, atol=1e-5)

    tokens = {}
    last = tv.encoder.layers[-1].ln_1
    handle = last.register_forward_hook(lambda mod, args, out: tokens.setdefault("t", out))
    try:
        xr = x.clone()
        out = tv(xr)
    finally:
        handle.remove()
    for target in (0, 5):
        (grad,) = torch.autograd.grad(out[:, target].sum(), tokens["t"], retain_graph=True)
        want = (tokens["t"] * grad).sum(-1)[:, 1:].reshape(2, 4, 4)
        got = explain(model, x, "cdam", targets=[target])[:, 0]
        torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-5)

    bad = {**tv.state_dict(), "heads.pre_logits.weight": torch.zeros(2, 2)}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="'heads.pre_logits.weight' is not part of a torchvision"):
        load_model(tmp_path / "bad.pth", device="cpu", config=config)
    with pytest.raises(CheckpointError, match="source: expected one of timm, torchvision"):
        load_model(tmp_path / "vit_b_16_lidc.pth", device="cpu", config={**config, "checkpoint": {"source": "tf"}})


def test_dinov2_names_load_with_source_timm_filter(tmp_path):
    """A DINOv2 checkpoint in the facebookresearch layout (register_tokens, mask_token, the class token's
    position folded into pos_embed) plus a head of the user's, with `checkpoint: {source: timm-filter}`
    (timm's checkpoint_filter_fn), gives the timm DINOv2-style model's outputs."""
    config = tiny_config(reg_tokens=4, no_embed_class=True, init_values=1e-5)
    config["preprocessing"] = {"mode": "slice", "hu_window": [-1000, 400]}
    original = build_model(config).eval()
    with torch.no_grad():
        original.backbone.pos_embed.normal_(std=0.02)
        original.backbone.cls_token.normal_(std=0.02)
        original.backbone.reg_token.normal_(std=0.02)
    vit = original.backbone
    cls_pos = torch.randn(1, 1, vit.embed_dim) * 0.02
    meta = {f"backbone.{k}" for k in ("cls_token", "reg_token", "pos_embed")}
    facebook = {k.removeprefix("backbone."): v for k, v in original.state_dict().items() if k not in meta}
    facebook.update(
        pos_embed=torch.cat([cls_pos, vit.pos_embed.detach()], dim=1),
        cls_token=vit.cls_token.detach() - cls_pos,
        register_tokens=vit.reg_token.detach().clone(),
        mask_token=torch.zeros(1, vit.embed_dim),
    )
    save_file({k: v.contiguous() for k, v in facebook.items()}, str(tmp_path / "dinov2_lidc.safetensors"))
    x = torch.randn(2, 1, 32, 32)
    loaded = load_model(
        tmp_path / "dinov2_lidc.safetensors", device="cpu", config={**config, "checkpoint": {"source": "timm-filter"}}
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), original(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(CheckpointError, match="unexpected keys .*register_tokens"):
        load_model(tmp_path / "dinov2_lidc.safetensors", device="cpu", config=config)


def test_convert_command_writes_a_checkpoint_that_loads_without_config(model, x, tmp_path):
    from click.testing import CliRunner

    from medvit_explain.cli import cli

    ckpt = _lightning_ckpt(model, tmp_path / "epoch=3.ckpt")
    (tmp_path / "lightning.json").write_text(json.dumps({**tiny_config(reg_tokens=2), "checkpoint": RULES}))
    out = tmp_path / "converted"
    res = CliRunner().invoke(
        cli, ["convert", str(ckpt), "--model-config", str(tmp_path / "lightning.json"), "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "model.mlp_head.N.* -> head.*" in res.output and "model.backbone.blocks.N.attn.qkv.* -> " in res.output
    torch.testing.assert_close(load_model(out, device="cpu")(x), model(x), rtol=0, atol=0)
    res = CliRunner().invoke(cli, ["convert", str(ckpt), "--out", str(tmp_path / "nope")])
    assert res.exit_code == 2 and res.output.startswith("error: no config found") and not (tmp_path / "nope").exists()
