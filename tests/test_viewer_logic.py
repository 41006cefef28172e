"""Viewer helpers (no slicer / Qt / torch): commands, stream parsing, outputs, predictions, colour range;
and the 3D Slicer module's files (they cannot run here, so they are byte-compiled and checked)."""

from __future__ import annotations

import ast
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from medvit_explain import viewer_logic as vl
from medvit_explain.registry import method_names

ROOT = Path(__file__).resolve().parents[1]
SLICER = ROOT / "plugins" / "slicer"


# -- import lightness --------------------------------------------------------------------------------
def test_import_is_light():
    code = (
        "import sys, medvit_explain.viewer_logic as v; v.known_methods(); "
        "bad = [m for m in ('torch', 'numpy', 'slicer', 'qt', 'PyQt5', 'napari') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# -- command -----------------------------------------------------------------------------------------
def test_build_explain_command_is_an_argument_list():
    cmd = vl.build_explain_command(
        "/opt/Slicer/bin/PythonSlicer",
        "/tmp/in put/ct.nrrd",
        "/tmp/out dir",
        model="/m/ckpt",
        methods=["cdam", "cdam-smooth"],
        targets=["malignancy", "diameter"],
        device="cuda:1",
        batch_size=8,
    )
    assert cmd == [
        "/opt/Slicer/bin/PythonSlicer",
        "-m",
        "medvit_explain",
        "explain",
        "/tmp/in put/ct.nrrd",
        "--out",
        "/tmp/out dir",
        "--model",
        "/m/ckpt",
        "--method",
        "cdam",
        "--method",
        "cdam-smooth",
        "--target",
        "malignancy",
        "--target",
        "diameter",
        "--device",
        "cuda:1",
        "--batch-size",
        "8",
    ]
    assert all(isinstance(a, str) for a in cmd)


def test_build_explain_command_defaults_and_paths():
    cmd = vl.build_explain_command(Path("py"), Path("ct.nii.gz"), Path("out"))
    assert cmd == ["py", "-m", "medvit_explain", "explain", "ct.nii.gz", "--out", "out", "--device", "auto"]
    assert "--model" not in vl.build_explain_command("py", "ct", "out", model="  ")
    exact = vl.build_explain_command("py", "ct", "out", map_dtype="float32")
    assert exact[-2:] == ["--map-dtype", "float32"]


def test_build_explain_command_map_dtype_is_a_cli_choice():
    """The viewers offer exactly the CLI's --map-dtype choices (one vocabulary)."""
    from medvit_explain.commands.run import explain

    option = next(p for p in explain.params if p.name == "map_dtype")
    assert tuple(option.type.choices) == vl.MAP_DTYPES and option.default == "int16"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"methods": ["cdam", "gradcam++"]}, "unknown method 'gradcam\\+\\+'; expected one of cdam"),
        ({"device": "gpu"}, "unknown device 'gpu'"),
        ({"batch_size": 0}, "positive integer batch size, got 0"),
        ({"batch_size": True}, "positive integer batch size"),
        ({"map_dtype": "float16"}, "unknown map dtype 'float16'"),
    ],
)
def test_build_explain_command_refuses_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vl.build_explain_command("py", "ct", "out", **kwargs)


def test_python_m_medvit_explain_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "medvit_explain", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "explain" in out.stdout.lower()


# -- stream parsing ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "line, expected",
    [
        ("explain:  40%|████      | 4/10 [00:01<00:02,  3.20slice/s]", (4, 10)),
        ("100%|██████████| 64/64 [00:09<00:00,  6.9it/s]", (64, 64)),
        ("  0%|          | 0/128 [00:00<?, ?slice/s]", (0, 128)),
        ("a\r 10%|█         | 1/10 [00:00<00:01]\r 20%|██        | 2/10 [00:00<00:01]", (2, 10)),
        ("loaded model tiny (1/2 done)", None),
        ("error: input not found: x.nii.gz", None),
        ("", None),
    ],
)
def test_parse_progress(line, expected):
    progress = vl.parse_progress(line)
    if expected is None:
        assert progress is None
    else:
        assert (progress.done, progress.total) == expected
        assert progress.fraction == pytest.approx(expected[0] / expected[1])


def test_cli_error_message():
    stderr = "explain:  10%|█ | 1/10\nerror: input not found: /x/ct.nii.gz (check the path)\n"
    assert vl.cli_error_message(stderr) == "input not found: /x/ct.nii.gz (check the path)"
    tb = 'Traceback (most recent call last):\n  File "x", line 1\nRuntimeError: CUDA out of memory\n'
    assert vl.cli_error_message(tb) == "RuntimeError: CUDA out of memory"
    assert vl.cli_error_message(" 50%|█| 1/2\n") is None


def test_run_command_streams_progress_and_lines():
    script = (
        "import sys, time\n"
        "print('loading model', flush=True)\n"
        "for i in range(4):\n"
        "    sys.stderr.write(f'\\r explain: {25*i}%|#  | {i}/3 [00:00<00:00]'); sys.stderr.flush()\n"
        "sys.stderr.write('\\n'); print('wrote out/', flush=True)\n"
    )
    lines, progress = [], []
    text = vl.run_command([sys.executable, "-c", script], on_line=lines.append, on_progress=progress.append)
    assert lines == ["loading model", "wrote out/"]
    assert [(p.done, p.total) for p in progress] == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert "wrote out/" in text


def test_run_command_raises_the_cli_error_line():
    script = "import sys; sys.stderr.write('error: expected a 3D volume, got 2D\\n'); sys.exit(2)"
    with pytest.raises(vl.ExplainCommandError, match="^expected a 3D volume, got 2D$") as info:
        vl.run_command([sys.executable, "-c", script])
    assert info.value.returncode == 2
    with pytest.raises(vl.ExplainCommandError, match="exit code 3"):
        vl.run_command([sys.executable, "-c", "import sys; sys.exit(3)"])


def test_run_command_refuses_a_shell_string():
    with pytest.raises(TypeError, match="argument list"):
        vl.run_command("echo hi; rm -rf /")


# -- outputs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path, stem",
    [
        ("a/scan.nii.gz", "scan"),
        ("scan.NRRD", "scan"),
        ("/data/dicom_series/", "dicom_series"),
        ("x.y.mha", "x.y"),
        ("weird", "weird"),
    ],
)
def test_volume_stem(path, stem):
    assert vl.volume_stem(path) == stem


def test_parse_overlay_name_with_dashes_and_underscores():
    methods = method_names()
    assert vl.parse_overlay_name("ct_cdam_malignancy.nii.gz") == ("ct", "cdam", "malignancy")
    assert vl.parse_overlay_name("my_ct_01_cdam-smooth_malignancy.nii.gz") == ("my_ct_01", "cdam-smooth", "malignancy")
    assert vl.parse_overlay_name("p_cdam-integrated_nodule_size.nii.gz", methods) == (
        "p",
        "cdam-integrated",
        "nodule_size",
    )
    # a stem that itself contains a method name: the given stem decides
    assert vl.parse_overlay_name("lung_ig_case_ig_diameter.nii.gz", stem="lung_ig_case") == (
        "lung_ig_case",
        "ig",
        "diameter",
    )
    assert vl.parse_overlay_name("lung_ig_case_ig_diameter.nii.gz", targets=["diameter"]) == (
        "lung_ig_case",
        "ig",
        "diameter",
    )
    assert vl.parse_overlay_name("ct_unknownmethod_malignancy.nii.gz") is None
    assert vl.parse_overlay_name("ct_cdam_.nii.gz") is None
    assert vl.parse_overlay_name("ct_cdam_malignancy.nrrd") is None
    assert vl.parse_overlay_name("ct_cdam_malignancy.nii.gz", targets=["diameter"]) is None


def test_overlay_name_round_trip():
    for method in method_names():
        name = vl.overlay_name("scan_2", method, "malignancy")
        assert vl.parse_overlay_name(name) == ("scan_2", method, "malignancy")


def test_find_outputs(tmp_path):
    names = [
        "ct_cdam_malignancy.nii.gz",
        "ct_cdam-smooth_malignancy.nii.gz",
        "ct_agcam_diameter.nii.gz",
        "ct_x_cdam_malignancy.nii.gz",  # another stem
        ".ct_cdam_diameter.nii.gz.tmp123.nii.gz",  # a file still being written
        "predictions.csv",
        "summary.json",
        "report.html",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    found = vl.find_outputs(tmp_path, "ct")
    assert found == {
        ("agcam", "diameter"): tmp_path / "ct_agcam_diameter.nii.gz",
        ("cdam", "malignancy"): tmp_path / "ct_cdam_malignancy.nii.gz",
        ("cdam-smooth", "malignancy"): tmp_path / "ct_cdam-smooth_malignancy.nii.gz",
    }
    assert list(vl.find_outputs(tmp_path, "ct_x")) == [("cdam", "malignancy")]
    assert vl.find_outputs(tmp_path, "ct", targets=["diameter"]) == {
        ("agcam", "diameter"): tmp_path / "ct_agcam_diameter.nii.gz"
    }
    assert vl.find_outputs(tmp_path / "missing", "ct") == {}


# -- predictions -----------------------------------------------------------------------------------------
CSV = """slice,source_index,z_mm,malignancy_prob,malignancy_logit,subtlety,diameter
0,5,-10.5,0.1,-2.19722,3.2,11
1,4,-8,0.9,2.19722,3.1,12.5
2,3,-5.5,0.9,2.19722,2.9,
3,2,-3,nan,nan,1,2
"""


def test_parse_predictions_and_top_slice(tmp_path):
    path = tmp_path / "predictions.csv"
    path.write_text(CSV)
    columns, rows = vl.parse_predictions(path)
    assert columns == ["slice", "source_index", "z_mm", "malignancy_prob", "malignancy_logit", "subtlety", "diameter"]
    assert rows[0] == {
        "slice": 0,
        "source_index": 5,
        "z_mm": -10.5,
        "malignancy_prob": 0.1,
        "malignancy_logit": -2.19722,
        "subtlety": 3.2,
        "diameter": 11.0,
    }
    assert isinstance(rows[0]["slice"], int) and rows[2]["diameter"] is None
    best = vl.top_slice(rows)
    assert best["slice"] == 1 and best["source_index"] == 4  # first of the tie; NaN never wins
    assert vl.top_slice(rows, "diameter")["slice"] == 1
    assert vl.top_slice([]) is None
    assert vl.top_slice([{"slice": 0}]) is None


def test_top_slice_roi_mode_uses_the_mean_rows():
    rows = [
        {"roi": 1, "view": "axial", "malignancy_prob": 0.99},
        {"roi": 1, "view": "mean", "malignancy_prob": 0.6},
        {"roi": 2, "view": "mean", "malignancy_prob": 0.7},
    ]
    assert vl.top_slice(rows)["roi"] == 2


# -- colour range ---------------------------------------------------------------------------------------
def test_color_range_symmetric():
    assert vl.color_range((-0.2, 0.5)) == (-0.5, 0.5)
    assert vl.color_range([-3.0, 1.0]) == (-3.0, 3.0)
    assert vl.color_range([[0.1, -0.4], [float("nan"), 0.2]]) == (-0.4, 0.4)
    assert vl.color_range((0.0, 0.0)) == (-1.0, 1.0)  # a constant map never collapses the window
    assert vl.color_range([]) == (-1.0, 1.0)
    a = np.zeros((4, 5, 6), np.float32)
    a[0, 0, 0], a[1, 1, 1] = -2e-7, 1e-7
    lo, hi = vl.color_range(a)
    assert hi == pytest.approx(2e-7) and lo == -hi
    a = np.linspace(-1, 1, 1001)
    a[0] = -100.0  # one outlier
    lo, hi = vl.color_range(a, percentile=99)
    assert hi == pytest.approx(0.99, abs=0.01) and lo == -hi
    with pytest.raises(ValueError, match="percentile"):
        vl.color_range(a, percentile=0)


# -- the 3D Slicer extension (cannot run here: compile it and check its layout) ----------------------------
def test_slicer_extension_layout():
    module = SLICER / "MedViTExplain"
    for rel in [
        "CMakeLists.txt",
        "README.md",
        "MedViTExplain/CMakeLists.txt",
        "MedViTExplain/MedViTExplain.py",
        "MedViTExplain/Resources/UI/MedViTExplain.ui",
        "MedViTExplain/Resources/Icons/MedViTExplain.png",
    ]:
        assert (SLICER / rel).is_file(), rel
    top = (SLICER / "CMakeLists.txt").read_text()
    for key in [
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
        "add_subdirectory(MedViTExplain)",
    ]:
        assert key in top
    cmake = (module / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in cmake and "Resources/UI/${MODULE_NAME}.ui" in cmake
    assert "set(MODULE_NAME MedViTExplain)" in cmake
    assert (module / "Resources" / "Icons" / "MedViTExplain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_slicer_module_compiles_and_has_the_four_classes(tmp_path):
    import py_compile

    source = SLICER / "MedViTExplain" / "MedViTExplain.py"
    py_compile.compile(str(source), cfile=str(tmp_path / "m.pyc"), doraise=True)
    tree = ast.parse(source.read_text())
    classes = {
        node.name: [b.id if isinstance(b, ast.Name) else ast.unparse(b) for b in node.bases]
        for node in tree.body
        if isinstance(node, ast.ClassDef)
    }
    assert classes["MedViTExplain"] == ["ScriptedLoadableModule"]
    assert "ScriptedLoadableModuleWidget" in classes["MedViTExplainWidget"]
    assert classes["MedViTExplainLogic"] == ["ScriptedLoadableModuleLogic"]
    assert classes["MedViTExplainTest"] == ["ScriptedLoadableModuleTest"]
    text = source.read_text()
    assert "shell=True" not in text and "os.system" not in text
    assert "viewer_logic" in text and "pip_install" in text


def test_slicer_ui_file_is_valid_and_names_the_widgets():
    root = ET.parse(SLICER / "MedViTExplain" / "Resources" / "UI" / "MedViTExplain.ui").getroot()
    names = {w.get("name") for w in root.iter("widget")}
    text = (SLICER / "MedViTExplain" / "MedViTExplain.py").read_text()
    for name in [
        "inputSelector",
        "modelPathLineEdit",
        "methodsList",
        "targetsList",
        "deviceComboBox",
        "applyButton",
        "mapSelector",
        "opacitySlider",
        "scoresTable",
    ]:
        assert name in names, name
        assert f"ui.{name}" in text, name


def test_bundled_sample_ct_is_a_ct_or_none():
    path = vl.bundled_sample_ct()
    if path is not None:
        assert path.name.endswith(".nii.gz") and "_nodules" not in path.name and "_lungs" not in path.name


@pytest.mark.slow  # two CLI subprocesses (torch import each): ~20-40 s on 2 busy cores
def test_the_slicer_path_end_to_end(tmp_path):
    """What the Slicer Logic does, minus Slicer: build the command, run the real CLI, read its outputs."""
    import torch

    from medvit_explain.io import load_volume, write_volume
    from medvit_explain.model import build_model, save_checkpoint
    from medvit_explain.volume import Volume

    torch.manual_seed(0)
    arch = dict(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    ckpt = save_checkpoint(
        build_model(
            {"name": "tiny", "architecture": {"timm_name": "vit_tiny_patch16_224", "kwargs": arch}, "task_spec": "lidc"}
        ),
        tmp_path / "ckpt",
    )
    array = np.random.default_rng(0).normal(-600, 200, (24, 20, 5)).astype(np.float32)
    ct = write_volume(
        Volume(array, (1.0, -2.0, 3.0), (0.8, 0.9, 2.5), np.diag([-1.0, 1.0, 1.0])), tmp_path / "input.nrrd"
    )
    out = tmp_path / "out"
    cmd = vl.build_explain_command(
        sys.executable,
        ct,
        out,
        model=ckpt,
        methods=["cdam", "agcam"],
        targets=["malignancy", "diameter"],
        device="cpu",
        batch_size=2,
    )
    lines: list[str] = []
    vl.run_command(cmd, on_line=lines.append)
    found = vl.find_outputs(out, vl.volume_stem(ct), targets=["malignancy", "diameter"])
    assert sorted(found) == [
        ("agcam", "diameter"),
        ("agcam", "malignancy"),
        ("cdam", "diameter"),
        ("cdam", "malignancy"),
    ]
    overlay, source = load_volume(found[("cdam", "diameter")]), load_volume(ct)
    assert overlay.shape == source.shape and np.allclose(overlay.affine_lps, source.affine_lps, atol=1e-5)
    columns, rows = vl.parse_predictions(out / "predictions.csv")
    assert columns[:4] == ["slice", "source_index", "z_mm", "malignancy_prob"] and len(rows) == 5
    assert vl.top_slice(rows)["malignancy_prob"] == max(r["malignancy_prob"] for r in rows)
    lo, hi = vl.color_range(overlay.array)
    assert lo == -hi and hi > 0

    bad = vl.build_explain_command(sys.executable, tmp_path / "missing.nii.gz", out, model=ckpt, device="cpu")
    with pytest.raises(vl.ExplainCommandError) as info:
        vl.run_command(bad)
    assert info.value.returncode == 2 and "missing.nii.gz" in str(info.value) and "\n" not in str(info.value)
