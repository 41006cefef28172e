"""Heads described in the config (MLP, several heads side by side) and softmax targets: a user's own
module, saved the way its training script saves it, loads with a config alone and gives the module's
outputs, probabilities and CDAM maps (computed by the definition on the user's module)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from torch import nn

from medvit_explain.errors import CheckpointError
from medvit_explain.explainers import explain
from medvit_explain.model import build_model, load_model, save_checkpoint
from medvit_explain.model.task import TaskSpec

ARCH = {
    "timm_name": "vit_tiny_patch16_224",
    "kwargs": {"img_size": [32, 32], "patch_size": 8, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2},
}
SOFTMAX_SPEC = {
    "targets": [
        {"name": "malignancy", "kind": "softmax", "classes": ["benign", "malignant"], "positive": "malignant"},
        {"name": "diameter", "kind": "regression", "scale": [0, 40]},
    ]
}


class PeerModule(nn.Module):
    """What a LIDC training script builds: ``backbone`` (timm ViT, no head) and ``mlp_head``."""

    def __init__(self, head: nn.Module, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = timm.create_model(ARCH["timm_name"], pretrained=False, num_classes=0, **ARCH["kwargs"])
        self.mlp_head = head

    def forward(self, x):
        return self.mlp_head(self.backbone(x))


def cdam_by_definition(module: PeerModule, x: torch.Tensor, score) -> torch.Tensor:
    """DESIGN.md's CDAM on the user's own module: T = the last block's norm1 output, S_i = Σ_j T_ij ∂s/∂T_ij
    over the patch tokens, s = ``score(module(x))`` [B]."""
    tokens = {}
    handle = module.backbone.blocks[-1].norm1.register_forward_hook(lambda m, a, out: tokens.setdefault("t", out))
    try:
        out = module(x.clone())
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(score(out).sum(), tokens["t"])
    return (tokens["t"] * grad).sum(-1)[:, 1:].reshape(len(x), 4, 4).detach()


def lightning_ckpt(module: nn.Module, path):
    torch.save({"state_dict": module.state_dict(), "epoch": 7, "pytorch-lightning_version": "2.4.0"}, path)
    return path


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(3, 1, 32, 32)


def test_lightning_backbone_and_mlp_head_load_with_a_config(x, tmp_path):
    """``backbone.*`` + ``mlp_head.{0,3}.*`` (Linear–ReLU–Dropout–Linear) in a Lightning .ckpt: config
    ``head: {layers: ...}`` + ``rename: {mlp_head.: head.}`` → the module's outputs and CDAM maps."""
    peer = PeerModule(nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Dropout(0.2), nn.Linear(24, 9))).eval()
    config = {
        "architecture": ARCH,
        "head": {"layers": [{"linear": 24}, "relu", {"dropout": 0.2}, "linear"]},
        "task_spec": "lidc",
        "checkpoint": {"rename": {"mlp_head.": "head."}},
    }
    model = load_model(lightning_ckpt(peer, tmp_path / "epoch=7.ckpt"), device="cpu", config=config)
    with torch.no_grad():
        torch.testing.assert_close(model(x), peer(x), rtol=0, atol=1e-6)
    for k in (0, 4):
        want = cdam_by_definition(peer, x, lambda out, k=k: out[:, k])
        torch.testing.assert_close(explain(model, x, "cdam", targets=[k])[:, 0], want, rtol=1e-4, atol=1e-6)
    # saved under our names, with the head description; reloads with no rules
    again = load_model(save_checkpoint(model, tmp_path / "saved"), device="cpu")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["head"] == config["head"] and "checkpoint" not in saved
    with torch.no_grad():
        torch.testing.assert_close(again(x), peer(x), rtol=0, atol=1e-6)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.malignancy = nn.Linear(32, 1)
        self.biomarkers = nn.Sequential(nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 8))

    def forward(self, pooled):
        return torch.cat([self.malignancy(pooled), self.biomarkers(pooled)], -1)


def test_two_heads_side_by_side(x, tmp_path):
    peer = PeerModule(TwoHeads(), seed=2).eval()
    torch.save(peer.state_dict(), tmp_path / "two_heads.pth")
    config = {
        "architecture": ARCH,
        "head": {"parts": [{"outputs": 1}, {"outputs": 8, "layers": [{"linear": 16}, "gelu", "linear"]}]},
        "checkpoint": {"rename": {"mlp_head.malignancy.": "head.0.", "mlp_head.biomarkers.": "head.1."}},
    }
    model = load_model(tmp_path / "two_heads.pth", device="cpu", config=config)
    with torch.no_grad():
        torch.testing.assert_close(model(x), peer(x), rtol=0, atol=1e-6)
    want = cdam_by_definition(peer, x, lambda out: out[:, 6])
    torch.testing.assert_close(explain(model, x, "cdam", targets=["diameter"])[:, 0], want, rtol=1e-4, atol=1e-6)
    with pytest.raises(CheckpointError, match="the parts give 3 outputs in all, the task spec needs 9"):
        build_model({**config, "head": {"parts": [{"outputs": 1}, {"outputs": 2}]}})


def test_softmax_head_probability_and_maps(x, tmp_path):
    """A 2-logit softmax head (benign, malignant) + a regression output: the probability is the softmax's,
    and CDAM / AG-CAM explain the positive class's log-odds z_malignant − z_benign."""
    peer = PeerModule(nn.Linear(32, 3), seed=3).eval()
    with torch.no_grad():
        peer.mlp_head.weight.mul_(4)  # probabilities away from 0.5, so a wrong formula shows
    torch.save(peer.state_dict(), tmp_path / "softmax.pth")
    config = {"architecture": ARCH, "task_spec": SOFTMAX_SPEC, "checkpoint": {"rename": {"mlp_head.": "head."}}}
    model = load_model(tmp_path / "softmax.pth", device="cpu", config=config)
    with torch.no_grad():
        z = peer(x)
        values = model.predict_values(x)
    true_prob = torch.softmax(z[:, :2], -1)[:, 1]
    torch.testing.assert_close(values[:, 0], true_prob, rtol=0, atol=1e-6)
    torch.testing.assert_close(values[:, 1], z[:, 2] * 20 + 20, rtol=0, atol=1e-4)
    assert float((true_prob - torch.sigmoid(z[:, 1])).abs().max()) > 0.05  # reading z_malignant alone is wrong

    log_odds = lambda out: out[:, 1] - out[:, 0]  # noqa: E731
    want = cdam_by_definition(peer, x, log_odds)
    torch.testing.assert_close(explain(model, x, "cdam", targets=["malignancy"])[:, 0], want, rtol=1e-4, atol=1e-6)
    # AG-CAM on the same score: equal to AG-CAM of a binary head whose one logit is z1 - z0
    binary = build_model({"architecture": ARCH, "task_spec": {"targets": [{"name": "m", "kind": "binary"}]}}).eval()
    binary.backbone.load_state_dict(peer.backbone.state_dict())
    with torch.no_grad():
        binary.head.weight.copy_(peer.mlp_head.weight[1:2] - peer.mlp_head.weight[0:1])
        binary.head.bias.copy_(peer.mlp_head.bias[1:2] - peer.mlp_head.bias[0:1])
    got, want = explain(model, x, "agcam", targets=[0]), explain(binary, x, "agcam", targets=[0])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    again = load_model(save_checkpoint(model, tmp_path / "saved"), device="cpu")
    assert again.task_spec.targets[0].classes == ("benign", "malignant")
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_softmax_with_three_classes_scores_the_log_odds():
    spec = TaskSpec.from_dict(
        [{"name": "texture", "kind": "softmax", "classes": ["ground_glass", "part_solid", "solid"], "positive": 2}]
    )
    raw = torch.randn(5, 3)
    p = torch.softmax(raw, -1)[:, 2]
    score = spec.scores(raw)[:, 0]
    torch.testing.assert_close(score, torch.log(p) - torch.log1p(-p), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(spec.to_values(spec.scores(raw))[:, 0], p, rtol=1e-6, atol=1e-6)
    assert spec.output_width == 3 and spec.score_kinds == ["binary"]


def test_softmax_explain_volume_reports_the_softmax_probability(tmp_path):
    """End to end: predictions table columns of a softmax target are the positive class's probability and
    log-odds."""
    from medvit_explain.pipeline import explain_volume

    from .test_pipeline import body_volume

    torch.manual_seed(0)
    model = build_model({"architecture": ARCH, "task_spec": SOFTMAX_SPEC, "preprocessing": {"crop_body": False}})
    result = explain_volume(model.eval(), body_volume(np.eye(3), (1.0, 1.0, 2.0)), methods=["cdam"], batch_size=4)
    table = result.predictions
    assert "malignancy_prob" in table.columns and "malignancy_logit" in table.columns
    images = result.inputs.images(list(range(result.inputs.n_items)))
    with torch.no_grad():
        pooled = model.backbone.forward_head(model.backbone.forward_features(images), pre_logits=True)
        want = torch.softmax(model.head.raw(pooled)[:, :2], -1)[:, 1].numpy()
    assert abs(table.column("malignancy_prob") - want).max() < 1e-5


@pytest.mark.parametrize(
    "head, match",
    [
        ({"layers": [{"linear": 8}, "relu"]}, "last layer to be linear with 9 outputs"),
        ({"layers": [{"linear": 8}, "swish", "linear"]}, "unknown layer 'swish'"),
        ({"layers": [{"linear": 0}, "linear"]}, r"expected \{linear: N\} with N > 0"),
        ({"layers": [{"dropout": 1.5}, "linear"]}, r"expected \{dropout: p\}"),
        ({"mlp": [8]}, r"expected linear, \{layers: \[...\]\} or \{parts: \[...\]\}"),
        ({"parts": [{"outputs": 0}]}, "outputs: expected a positive integer"),
    ],
)
def test_head_description_errors(head, match):
    with pytest.raises(CheckpointError, match=match) as info:
        build_model({"architecture": ARCH, "head": head})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "target, match",
    [
        ({"name": "m", "kind": "softmax", "classes": ["a", "b"]}, "say which class is reported"),
        ({"name": "m", "kind": "softmax", "classes": ["a", "b"], "positive": "c"}, "positive 'c' is not one of"),
        ({"name": "m", "kind": "softmax", "classes": ["a"], "positive": "a"}, "two or more distinct names"),
        ({"name": "m", "kind": "binary", "classes": ["a", "b"]}, "belong to a softmax target"),
        ({"name": "m", "kind": "ordinal"}, "expected binary .*, regression .* or softmax/multiclass"),
    ],
)
def test_softmax_target_errors(target, match):
    with pytest.raises(CheckpointError, match=match):
        TaskSpec.from_dict([target])


def test_num_classes_in_kwargs_says_where_outputs_come_from():
    arch = {**ARCH, "kwargs": {**ARCH["kwargs"], "num_classes": 9}}
    with pytest.raises(CheckpointError, match="remove num_classes from architecture.kwargs: the outputs come from"):
        build_model({"architecture": arch})
