"""The one method registry: class metadata, lazy loading, a plugin through the entry point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medvit_explain.cli import cli
from medvit_explain.errors import MethodError
from medvit_explain.explainers import Explainer, explain, explain_many
from medvit_explain.registry import ENTRY_POINT_GROUP, explainer_class, list_methods, method_names, register

from .models import tiny_checkpoint, tiny_model

ROOT = Path(__file__).resolve().parents[1]
BUILT_IN = [
    "cdam",
    "cdam-smooth",
    "cdam-integrated",
    "agcam",
    "attention",
    "rollout",
    "chefer",
    "transformer-attribution",
    "legrad",
    "gradsam",
    "attnlrp",
    "gradcam",
    "ig",
    "smoothgrad",
    "inputxgrad",
]


def test_importing_the_registry_and_cli_help_stay_light():
    code = (
        "import sys, medvit_explain.registry, medvit_explain.cli as c; "
        "from click.testing import CliRunner; CliRunner().invoke(c.cli, ['explain', '--help']); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_built_in_methods_declare_themselves():
    assert method_names()[: len(BUILT_IN)] == BUILT_IN
    for row in list_methods():
        cls = explainer_class(row["name"])
        assert issubclass(cls, Explainer) and cls.name == row["name"]
        assert row["title"] and row["citation"] and isinstance(row["class_sensitive"], bool)
        assert row["kind"] in ("attention", "attention-gradient", "gradient") and row["space"] in ("token", "pixel")
        assert row["options"] == dict(cls.defaults)
    assert explainer_class("agcam").joint_with == ("cdam",)
    with pytest.raises(MethodError, match="unknown method 'nope'; expected one of: cdam"):
        explainer_class("nope")


def test_option_rules_live_on_the_class():
    with pytest.raises(MethodError, match="n_steps expected an integer >= 2 for cdam-integrated"):
        explainer_class("cdam-integrated").check_options({"n_steps": 1})
    with pytest.raises(MethodError, match="does not accept option"):
        explainer_class("attention").check_options({"n_steps": 3})
    with pytest.raises(MethodError, match="pool expected 'sum' or 'mean'"):
        explainer_class("ig").check_options({"pool": "max"})
    assert explainer_class("smoothgrad").check_options({"n_samples": 3})["n_samples"] == 3


def test_register_refuses_bad_classes():
    class NoName(Explainer):
        title, citation = "t", "c"

    class Underscore(Explainer):
        name, title, citation = "my_method", "t", "c"

    class Taken(Explainer):
        name, title, citation = "cdam", "t", "c"

    with pytest.raises(TypeError, match="expected a subclass"):
        register(object)
    for cls, match in ((NoName, "expected lower-case"), (Underscore, "expected lower-case"), (Taken, "taken")):
        with pytest.raises(ValueError, match=match):
            register(cls)
    assert explainer_class("cdam").__name__ == "CDAM"


def test_explain_many_shares_a_forward_only_where_declared(monkeypatch):
    """explain_many asks the lead method (AG-CAM) to run its partners jointly; results equal separate calls."""
    model = tiny_model()
    images = torch.rand(2, 1, 32, 32)
    agcam = explainer_class("agcam")
    calls = []
    original = agcam.explain_jointly

    def spy(self, partners, imgs, targets):
        calls.append(sorted(partners))
        return original(self, partners, imgs, targets)

    monkeypatch.setattr(agcam, "explain_jointly", spy)
    got = explain_many(model, images, ["cdam", "attention", "agcam"], targets=[0, 3])
    assert calls == [["cdam"]]
    for m in ("cdam", "attention", "agcam"):
        assert torch.equal(got[m], explain(model, images, m, targets=[0, 3])), m
    explain_many(model, images, ["agcam"], targets=[0])
    assert calls == [["cdam"]]  # no partner asked for: AG-CAM ran on its own


def _plugin(tmp_path: Path) -> dict[str, str]:
    """A package merely on PYTHONPATH, with a dist-info that declares the entry point."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(ROOT / "docs" / "examples" / "embed_gxi.py", site / "embed_gxi.py")
    info = site / "embed_gxi-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: embed-gxi\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nembed-gxi = embed_gxi:EmbeddingGxI\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_entry_point_plugin_is_listed_and_runs(tmp_path):
    """`list-methods --json` lists the plugin and `explain --method embed-gxi` writes its overlays; its
    maps are gradient × input at the embeddings (checked against the definition on the same model)."""
    from medvit_explain.io import load_volume, write_volume
    from medvit_explain.volume import Volume

    env = _plugin(tmp_path)
    listed = subprocess.run(
        [sys.executable, "-m", "medvit_explain", "list-methods", "--json"], capture_output=True, text=True, env=env
    )
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert set(BUILT_IN) < set(rows) and rows["embed-gxi"]["title"] == "Gradient x input at the patch embeddings"

    rng = np.random.default_rng(0)
    ct = write_volume(
        Volume(rng.uniform(-1000, 400, (32, 32, 3)).astype(np.float32), (0, 0, 0), (1, 1, 2), np.eye(3)),
        tmp_path / "ct.nii.gz",
    )
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "medvit_explain", "explain", str(ct), "--model", str(ckpt), "--out", str(out)]
    cmd += ["--method", "embed-gxi", "--target", "malignancy", "--no-report", "--map-dtype", "float32"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    written = load_volume(out / "ct_embed-gxi_malignancy.nii.gz").array
    assert np.abs(written).max() > 0

    sys.path.insert(0, str(tmp_path / "site"))
    try:
        from embed_gxi import EmbeddingGxI
    finally:
        sys.path.remove(str(tmp_path / "site"))
    from medvit_explain.explainers.base import inspect_model
    from medvit_explain.model import load_model
    from medvit_explain.pipeline import explain_volume

    model = load_model(ckpt, device="cpu")
    volume = load_volume(ct)
    result = explain_volume(model, volume, ["cdam"], ["malignancy"])
    images = result.inputs.images(np.arange(3))
    maps = EmbeddingGxI(model, inspect_model(model), EmbeddingGxI.check_options({}))(images, [0])
    vit = model.backbone
    for b in range(3):  # the definition written out with autograd, one slice at a time
        t = vit._pos_embed(vit.patch_embed(images[b : b + 1])).detach().requires_grad_(True)
        f = model.head(vit.forward_head(vit.norm(vit.blocks(vit.norm_pre(t))), pre_logits=True))[0, 0]
        (g,) = torch.autograd.grad(f, t)
        want = (g * t).sum(-1)[0, 1:].reshape(maps.shape[-2:])
        torch.testing.assert_close(maps[b, 0], want.detach(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(written, result.inputs.project(maps[:, 0]), atol=1e-6)


def test_unknown_method_is_one_line_exit_2(tmp_path):
    res = CliRunner().invoke(cli, ["explain", str(tmp_path / "ct.nii.gz"), "--method", "magic"])
    assert res.exit_code == 2 and res.output.startswith("error:") and "unknown method 'magic'" in res.output
