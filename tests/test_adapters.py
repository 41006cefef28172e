"""wrap_model: timm, torchvision and MONAI ViTs become MedViTs with the original's outputs and CDAM.

Every model is tiny (image 32, patch 8, 2 blocks, width 32, 2 heads), random and seeded. CDAM is checked
against DESIGN.md's definition computed on the ORIGINAL module: T = output of the last block's first
LayerNorm, S_i = Σ_j T_ij ∂f/∂T_ij over the patch tokens (class token first, dropped), on the 4×4 grid.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torchvision
from monai.networks.blocks import MLPBlock, SABlock
from monai.networks.nets import ViT
from torch import nn

from medvit_explain.errors import CheckpointError, ModelNotSupportedError
from medvit_explain.explainers import explain
from medvit_explain.model import build_model, load_model, save_checkpoint
from medvit_explain.model.adapters import monai_vit_keys, wrap_model
from medvit_explain.model.checkpoint import _to_medvit_keys
from medvit_explain.pipeline import explain_volume
from medvit_explain.volume import Volume

K = 3  # outputs of every test module
OUTPUT_TOL = 1e-5
CDAM_TOL = 1e-5  # relative to the reference map's max |S|


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# -- the modules -------------------------------------------------------------------------------------
def timm_vit(in_chans: int = 1, **kwargs) -> nn.Module:
    kwargs.setdefault("num_classes", K)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        in_chans=in_chans,
        embed_dim=32,
        depth=2,
        num_heads=2,
        **kwargs,
    ).eval()


def torchvision_vit(in_chans: int = 3, **kwargs) -> nn.Module:
    tv = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=K, **kwargs
    )
    nn.init.normal_(tv.heads.head.weight)  # torchvision starts its head at zero: every map would be 0
    nn.init.normal_(tv.heads.head.bias)
    if in_chans != 3:
        tv.conv_proj = nn.Conv2d(in_chans, 32, kernel_size=8, stride=8)
    return tv.eval()


def monai_vit(in_chans: int = 1, proj_type: str = "conv", **kwargs) -> nn.Module:
    args = dict(
        in_channels=in_chans,
        img_size=32,
        patch_size=8,
        hidden_size=32,
        mlp_dim=64,
        num_layers=2,
        num_heads=2,
        proj_type=proj_type,
        classification=True,
        num_classes=K,
        spatial_dims=2,
    )
    vit = ViT(**{**args, **kwargs})
    with torch.no_grad():  # MONAI starts its class token and biases at zero; make every part count
        vit.cls_token.normal_()
        for name, p in vit.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    return vit.eval()


def original_forward(kind: str, module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The original module's outputs [B, K] (MONAI: its head Linear, pre-Tanh) and T, the output of its
    last block's first LayerNorm [B, 1 + N, D], from the module's own forward."""
    norm = {
        "timm": lambda m: m.blocks[-1].norm1,
        "torchvision": lambda m: m.encoder.layers[-1].ln_1,
        "monai": lambda m: m.blocks[-1].norm1,
    }[kind](module)
    seen: dict[str, torch.Tensor] = {}
    handles = [norm.register_forward_hook(lambda mod, args, out: seen.setdefault("tokens", out))]
    if kind == "monai":
        linear = module.classification_head
        linear = linear[0] if isinstance(linear, nn.Sequential) else linear
        handles.append(linear.register_forward_hook(lambda mod, args, out: seen.setdefault("logits", out)))
    try:
        out = module(x)
    finally:
        for h in handles:
            h.remove()
    return (seen["logits"] if kind == "monai" else out), seen["tokens"]


def cdam_by_definition(kind: str, module: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, K, gh, gw]: S_i = Σ_j T_ij ∂f_c/∂T_ij on the original module, prefix tokens dropped."""
    logits, tokens = original_forward(kind, module, x)
    maps = []
    for c in range(logits.shape[1]):
        (grad,) = torch.autograd.grad(logits[:, c].sum(), tokens, retain_graph=True)
        patches = (tokens * grad).sum(-1)[:, -grid[0] * grid[1] :]  # prefix tokens (class, registers) first
        maps.append(patches.reshape(x.shape[0], *grid))
    return torch.stack(maps, 1).detach()


CASES = {  # id → (kind, build the module, input channels)
    "timm-1ch": ("timm", lambda: timm_vit(1), 1),
    "timm-3ch-reg-tokens": ("timm", lambda: timm_vit(3, reg_tokens=2, no_embed_class=True, init_values=1e-3), 3),
    "torchvision-3ch": ("torchvision", lambda: torchvision_vit(3), 3),
    "torchvision-1ch": ("torchvision", lambda: torchvision_vit(1), 1),
    "monai-conv-1ch": ("monai", lambda: monai_vit(1, "conv"), 1),
    "monai-perceptron-3ch": ("monai", lambda: monai_vit(3, "perceptron", qkv_bias=True), 3),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """(kind, original module, images, wrapped model), built once per case (the tests only read them)."""
    kind, make, chans = CASES[request.param]
    torch.manual_seed(0)
    module = make()
    return kind, module, torch.randn(2, chans, 32, 32), wrap_model(module)


def test_outputs_equal_the_original(case):
    kind, module, x, model = case
    assert model.targets == [f"output_{i}" for i in range(K)]
    assert model.input_size == (x.shape[1], 32, 32) and model.grid_size == (4, 4)
    assert not model.training and not model.backbone.training
    with torch.no_grad():
        want, _ = original_forward(kind, module, x)
        got = model(x)
    assert (got - want).abs().max().item() <= OUTPUT_TOL


def test_cdam_equals_the_definition_on_the_original(case):
    kind, module, x, model = case
    want = cdam_by_definition(kind, module, x, (4, 4))
    got = explain(model, x, "cdam")
    assert got.shape == want.shape == (2, K, 4, 4)
    assert want.abs().max() > 0
    assert ((got - want).abs().max() / want.abs().max()).item() <= CDAM_TOL


def test_save_and_load_give_the_same_outputs(case, tmp_path):
    _, module, x, _ = case
    model = wrap_model(module, ["a", "b", "c"], name="wrapped")
    save_checkpoint(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m", device="cpu")
    assert loaded.targets == ["a", "b", "c"] and loaded.config["name"] == "wrapped"
    assert loaded.config["architecture"] == model.config["architecture"]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_the_users_module_is_not_changed():
    module = monai_vit(1).train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    hooks = (len(module.classification_head[0]._forward_hooks), len(module.blocks[-1].norm1._forward_hooks))
    model = wrap_model(module)
    assert all(m.training for m in module.modules())  # the eval() for the check is undone
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert (len(module.classification_head[0]._forward_hooks), len(module.blocks[-1].norm1._forward_hooks)) == hooks
    assert not any(p is q for p in model.parameters() for q in module.parameters())


# -- MONAI details -----------------------------------------------------------------------------------
def _swap_attention(vit: nn.Module, **kwargs) -> nn.Module:
    for blk in vit.blocks:
        blk.attn = SABlock(32, 2, **kwargs)
    return vit


def _swap_mlp(vit: nn.Module, act) -> nn.Module:
    for blk in vit.blocks:
        blk.mlp = MLPBlock(32, 64, act=act)
    return vit


MONAI_VARIANTS = {
    "linear-head": lambda: monai_vit(post_activation=None),
    "sincos": lambda: monai_vit(pos_embed_type="sincos"),
    "separate-qkv-with-bias": lambda: _swap_attention(monai_vit(), use_combined_linear=False, qkv_bias=True),
    "no-out-proj": lambda: _swap_attention(monai_vit(), include_fc=False),
    "flash-attention": lambda: _swap_attention(monai_vit(), use_flash_attention=True),
    "save-attn-dropout": lambda: monai_vit(save_attn=True, dropout_rate=0.1),
    "gelu-tanh": lambda: _swap_mlp(monai_vit(), ("GELU", {"approximate": "tanh"})),
}


@pytest.mark.filterwarnings("ignore:torch.meshgrid")  # MONAI's sincos embedding, not ours
@pytest.mark.parametrize("variant", list(MONAI_VARIANTS))
def test_monai_variants_are_mapped(variant):
    module = MONAI_VARIANTS[variant]()
    model = wrap_model(module)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        want, _ = original_forward("monai", module, x)
        assert (model(x) - want).abs().max().item() <= OUTPUT_TOL
    if variant == "linear-head":
        assert "head" not in model.config["provenance"]
    if variant == "save-attn-dropout":
        assert model.config["architecture"]["kwargs"]["attn_drop_rate"] == pytest.approx(0.1)


@pytest.mark.parametrize("proj_type", ["conv", "perceptron"])
def test_monai_vit_keys_gives_the_weights_wrap_model_gives(proj_type):
    module = monai_vit(3, proj_type)
    wrapped = wrap_model(module)
    assert wrapped.config["architecture"]["norm_eps"] == 1e-5
    assert wrapped.config["architecture"]["kwargs"]["no_embed_class"] is True
    for given in (proj_type, None):  # None: read from the keys
        state = monai_vit_keys(module.state_dict(), num_heads=2, patch_size=8, in_chans=3, proj_type=given)
        model = build_model(wrapped.config)
        model.load_state_dict(_to_medvit_keys(state), strict=True)
        ours = wrapped.state_dict()
        assert all(torch.equal(v, ours[k]) for k, v in model.state_dict().items())


def test_monai_vit_keys_refuses_what_it_does_not_know():
    state = monai_vit(1).state_dict()
    with pytest.raises(CheckpointError, match=r"'blocks.0.attn.rel_pos.weight' is not part of a MONAI ViT"):
        monai_vit_keys({**state, "blocks.0.attn.rel_pos.weight": torch.zeros(2)}, 2, 8, 1, "conv")
    with pytest.raises(CheckpointError, match=r"expected \[D, 3, 8, 8\]"):
        monai_vit_keys(state, 2, 8, 3, "conv")
    with pytest.raises(CheckpointError, match=r"divisible by num_heads=5"):
        monai_vit_keys(state, 5, 8, 1, "conv")
    # stale cross-attention weights of older MONAI versions are dropped
    stale = {**state, "blocks.0.cross_attn.out_proj.weight": torch.zeros(32, 32)}
    assert monai_vit_keys(stale, 2, 8, 1, "conv").keys() == monai_vit_keys(state, 2, 8, 1, "conv").keys()


def test_monai_non_square_grid_needs_the_image_size():
    module = monai_vit(img_size=(32, 16))
    with pytest.raises(ModelNotSupportedError, match=r"8 patches are not a square grid: pass preprocessing="):
        wrap_model(module)
    model = wrap_model(module, preprocessing={"image_size": [32, 16]})
    assert model.grid_size == (4, 2)
    x = torch.randn(2, 1, 32, 16)
    want = cdam_by_definition("monai", module, x, (4, 2))
    got = explain(model, x, "cdam")
    assert ((got - want).abs().max() / want.abs().max()).item() <= CDAM_TOL
    with pytest.raises(CheckpointError, match=r"gives 16 patches; the MONAI ViT has position embeddings for 8"):
        wrap_model(module, preprocessing={"image_size": [32, 32]})


# -- targets, task specs, MedViT ---------------------------------------------------------------------
def test_targets_and_task_spec():
    module = timm_vit(num_classes=9)
    assert wrap_model(module, task_spec="lidc").targets[0] == "malignancy"
    with pytest.raises(CheckpointError, match=r"task spec has 9 outputs \(malignancy, .*\) but the module has 3"):
        wrap_model(timm_vit(), task_spec="lidc")
    with pytest.raises(CheckpointError, match=r"targets: expected 3 names \(one per module output\), got 2"):
        wrap_model(timm_vit(), ["a", "b"])
    with pytest.raises(TypeError, match="not both"):
        wrap_model(timm_vit(), ["a", "b", "c"], task_spec="lidc")
    model = wrap_model(module, task_spec="lidc", preprocessing={"mode": "roi", "hu_window": [-1000, 400]})
    assert model.preprocessing["mode"] == "roi" and model.preprocessing["image_size"] == [32, 32]
    assert model.preprocessing["in_chans"] == 1


def test_a_two_class_softmax_head_is_explained_by_its_log_odds():
    """num_classes=2 trained with cross entropy: a softmax target, scored and explained by z_1 − z_0."""
    module = monai_vit(1, num_classes=2)
    spec = {"targets": [{"name": "malignancy", "kind": "softmax", "classes": ["benign", "malignant"], "positive": 1}]}
    model = wrap_model(module, task_spec=spec)
    assert model.targets == ["malignancy"]
    x = torch.randn(2, 1, 32, 32)
    logits, tokens = original_forward("monai", module, x)
    with torch.no_grad():
        assert (model(x)[:, 0] - (logits[:, 1] - logits[:, 0])).abs().max().item() <= OUTPUT_TOL
    (grad,) = torch.autograd.grad((logits[:, 1] - logits[:, 0]).sum(), tokens)
    want = (tokens * grad).sum(-1)[:, 1:].reshape(2, 4, 4).detach()
    got = explain(model, x, "cdam")[:, 0]
    assert ((got - want).abs().max() / want.abs().max()).item() <= CDAM_TOL
    with pytest.raises(CheckpointError, match=r"task spec has 2 outputs \(malignancy\) but the module has 3"):
        wrap_model(monai_vit(1), task_spec=spec)


def test_a_medvit_is_returned_as_it_is():
    model = wrap_model(timm_vit())
    assert wrap_model(model) is model
    assert wrap_model(model, ["output_0", "output_1", "output_2"]) is model
    with pytest.raises(CheckpointError, match=r"task spec has 9 outputs .* but the module has 3"):
        wrap_model(model, task_spec="lidc")
    with pytest.raises(CheckpointError, match="does not relabel"):
        wrap_model(model, ["x", "y", "z"])


# -- refusals ----------------------------------------------------------------------------------------
def _causal(vit):
    for blk in vit.blocks:
        blk.attn = SABlock(32, 2, causal=True, sequence_length=17)
    return vit


class _ChangedForward(ViT):
    def forward(self, x):
        logits, hidden = super().forward(x)
        return logits, hidden


class _ScaledHeadInput(ViT):
    """A ViT whose forward does something its layout does not show."""

    def forward(self, x):
        x = self.patch_embedding(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.classification_head(2 * self.norm(x)[:, 0])


REFUSALS = {
    "resnet": (
        lambda: torchvision.models.resnet18(num_classes=K),
        r"expected a timm VisionTransformer, a torchvision VisionTransformer or MONAI's ViT "
        r"\(2D or 3D, classification=True\); got ResNet",
    ),
    "monai-no-classification": (
        lambda: ViT(1, 32, 8, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2, spatial_dims=2),
        r"MONAI ViT with classification=False has no head: pass classification=True",
    ),
    "monai-3d-noncubic-without-size": (
        lambda: ViT(1, (16, 32, 16), 8, hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2, classification=True),
        r"its 16 patches are not a cubic grid: pass preprocessing=\{'image_size': \[D, H, W\]\}",
    ),
    "monai-causal": (lambda: _causal(monai_vit()), r"blocks\[0\]\.attn: causal=True"),
    "monai-dim-head": (
        lambda: _swap_attention(monai_vit(), dim_head=8),
        r"blocks\[0\]\.attn: dim_head / hidden_input_size giving an inner width 16",
    ),
    "monai-relu": (lambda: _swap_mlp(monai_vit(), "RELU"), r"blocks\[0\]\.mlp: activation ReLU\(\) is not supported"),
    "monai-flash-dropout": (
        lambda: _swap_attention(monai_vit(), use_flash_attention=True, dropout_rate=0.1),
        r"use_flash_attention=True with dropout_rate=0.1: MONAI then drops attention weights even in eval mode",
    ),
    "monai-changed-forward": (
        lambda: _ScaledHeadInput(
            1, 32, 8, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2, classification=True, spatial_dims=2
        ),
        r"the wrapped model's outputs differ from the _ScaledHeadInput's by",
    ),
    "torchvision-representation-size": (
        lambda: torchvision_vit(representation_size=16),
        r"representation_size=16 has a pre-logits layer \(heads.pre_logits \+ Tanh\)",
    ),
    "timm-no-head": (lambda: timm_vit(num_classes=0), r"has no head \(num_classes=0\): build it with num_classes=K"),
    "timm-no-class-token": (
        lambda: timm_vit(class_token=False, global_pool="avg"),
        r"without a class token \(class_token=False\)",
    ),
    "timm-undescribable-part": (
        lambda: _with_part(timm_vit(), "blocks.1.mlp.act", nn.Tanh()),
        r"part 'blocks.1.mlp.act' is Tanh\(\); its description .* builds GELU",
    ),
}


def _with_part(module: nn.Module, path: str, part: nn.Module) -> nn.Module:
    parent, name = path.rsplit(".", 1)
    setattr(module.get_submodule(parent), name, part)
    return module


@pytest.mark.parametrize("refusal", list(REFUSALS))
def test_refusals_name_the_part(refusal):
    make, message = REFUSALS[refusal]
    with pytest.raises(ModelNotSupportedError, match=message) as info:
        wrap_model(make())
    assert "\n" not in str(info.value)


def test_a_subclass_with_an_equivalent_forward_is_accepted():
    module = _ChangedForward(
        1, 32, 8, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2, classification=True, spatial_dims=2
    ).eval()
    wrap_model(module)


# -- end to end --------------------------------------------------------------------------------------
def test_explain_volume_with_a_wrapped_monai_vit():
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 400, size=(20, 18, 6)).astype(np.float32)
    volume = Volume(array, (-30.0, 12.5, 7.0), (0.7, 0.7, 1.25), np.eye(3), {"path": "synthetic"})
    model = wrap_model(
        monai_vit(1), ["nodule", "calcified", "solid"], preprocessing={"hu_window": [-1000, 400], "crop_body": False}
    )
    result = explain_volume(model, volume, methods=["cdam", "agcam"], targets=["nodule", "solid"], batch_size=4)
    for method in ("cdam", "agcam"):
        for target in ("nodule", "solid"):
            heat = result.map_array(method, target)
            assert heat.shape == array.shape and np.isfinite(heat).all()
    assert np.abs(result.map_array("cdam", "nodule")).max() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_wrapped_model_stays_on_the_modules_device():
    module = monai_vit(1).cuda()
    model = wrap_model(module)
    assert model.device.type == "cuda"
    x = torch.randn(2, 1, 32, 32, device="cuda")
    with torch.no_grad():
        want, _ = original_forward("monai", module, x)
        assert (model(x) - want).abs().max().item() <= 1e-3


def test_monai_state_dict_loads_with_source_monai_and_convert_lists_the_keys(tmp_path):
    """A MONAI ViT's own state dict + a config with ``checkpoint: {source: monai}`` (the architecture
    wrap_model writes) loads to the same outputs; ``convert`` prints how the keys mapped."""
    import json

    from click.testing import CliRunner
    from monai.networks.nets import ViT

    from medvit_explain.cli import cli
    from medvit_explain.model import load_model, wrap_model

    torch.manual_seed(0)
    vit = ViT(
        in_channels=1,
        img_size=(32, 32),
        patch_size=(8, 8),
        hidden_size=32,
        mlp_dim=64,
        num_layers=2,
        num_heads=2,
        spatial_dims=2,
        classification=True,
        num_classes=2,
    ).eval()
    torch.save(vit.state_dict(), tmp_path / "monai_vit.pth")
    config = {**wrap_model(vit, targets=["malignancy", "spiculation"]).config, "checkpoint": {"source": "monai"}}
    (tmp_path / "monai_vit.json").write_text(json.dumps(config))
    loaded = load_model(tmp_path / "monai_vit.pth", device="cpu")
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), vit.classification_head[0](_monai_cls(vit, x)), rtol=0, atol=1e-5)
    done = CliRunner().invoke(
        cli,
        [
            "convert",
            str(tmp_path / "monai_vit.pth"),
            "--model-config",
            str(tmp_path / "monai_vit.json"),
            "--out",
            str(tmp_path / "converted"),
        ],
    )
    assert done.exit_code == 0, done.output
    assert "blocks.N.attn.out_proj.* -> backbone.blocks.N.attn.proj.*" in done.output
    assert "classification_head.N.* -> head.*" in done.output
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "converted", device="cpu")(x), loaded(x), rtol=0, atol=0)


def _monai_cls(vit, x):
    """The final-norm class token of a MONAI ViT (what its classification head reads)."""
    seen = {}
    handle = vit.classification_head.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    try:
        vit(x)
    finally:
        handle.remove()
    return seen["x"]
