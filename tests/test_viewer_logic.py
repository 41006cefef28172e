"""Viewer helpers (no slicer / Qt / torch): commands, stream parsing, outputs, predictions, colour range;
and the 3D Slicer module's files (they cannot run here, so they are byte-compiled and checked)."""

from __future__ import annotations

import ast
import json
import re
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


def test_cli_command_for_an_interpreter_a_script_a_venv_and_a_checkout(tmp_path):
    def executable(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
        return path

    python = executable(tmp_path / "env" / "bin" / "python3.11")
    assert vl.cli_command(python) == [str(python), "-m", "medvit_explain"]
    assert vl.cli_command(executable(tmp_path / "PythonSlicer"))[1:] == ["-m", "medvit_explain"]
    script = executable(tmp_path / "env" / "bin" / "medvit-explain")
    assert vl.cli_command(script) == [str(script)]
    assert vl.cli_command(tmp_path / "env") == [str(script)]  # a virtual environment
    checkout_script = executable(tmp_path / "checkout" / ".venv" / "bin" / "medvit-explain")
    assert vl.cli_command(tmp_path / "checkout") == [str(checkout_script)]  # a checkout with its .venv
    wrapper = executable(tmp_path / "run-medvit.sh")
    assert vl.cli_command(f"  {wrapper}  ") == [str(wrapper)]


@pytest.mark.parametrize(
    "name, match",
    [
        ("", "got an empty path"),
        ("missing", "got .*missing \\(missing\\)"),
        ("empty-dir", "expected a virtual environment or a checkout"),
        ("not-executable", "not executable"),
    ],
)
def test_cli_command_refuses_what_cannot_run(tmp_path, name, match):
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "not-executable").write_text("x")
    with pytest.raises(ValueError, match=match):
        vl.cli_command(tmp_path / name if name else "")


def test_explain_command_with_a_cli_prefix_and_roi_inputs():
    cli = ["/env/bin/medvit-explain"]
    cmd = vl.explain_command(cli, "ct.nrrd", "out", methods=["cdam"], roi_centers="c.csv", extra_args=["--no-report"])
    assert cmd == [
        "/env/bin/medvit-explain",
        "explain",
        "ct.nrrd",
        "--out",
        "out",
        "--method",
        "cdam",
        "--device",
        "auto",
        "--roi-centers",
        "c.csv",
        "--no-report",
    ]
    assert vl.explain_command(cli, "ct", "out", roi_mask="m.nrrd")[-2:] == ["--roi-mask", "m.nrrd"]
    assert vl.explain_command(cli, "ct", "out", methods=["anything"])[6] == "anything"  # the CLI checks it
    with pytest.raises(ValueError, match="unknown method 'x'; expected one of cdam, agcam"):
        vl.explain_command(cli, "ct", "out", methods=["x"], method_names=["cdam", "agcam"])
    with pytest.raises(ValueError, match="either ROI centres or an ROI mask, got both"):
        vl.explain_command(cli, "ct", "out", roi_centers="c.csv", roi_mask="m.nrrd")
    with pytest.raises(ValueError, match="got an empty one"):
        vl.explain_command([], "ct", "out")
    py = vl.build_explain_command("py", "ct", "out", roi_mask="m.nrrd")
    assert py[:4] == ["py", "-m", "medvit_explain", "explain"] and py[-2:] == ["--roi-mask", "m.nrrd"]


def test_method_list_from_the_cli_output():
    assert vl.list_methods_command(["medvit-explain"]) == ["medvit-explain", "list-methods", "--json"]
    out = subprocess.run(
        vl.list_methods_command([sys.executable, "-m", "medvit_explain"]), capture_output=True, text=True, check=True
    )
    rows = vl.parse_method_list(out.stdout)
    assert [r["name"] for r in rows] == method_names() and all("citation" in r for r in rows)
    noisy = "UserWarning: something\n  warnings.warn(x)\n" + out.stdout + "\n"
    assert vl.parse_method_list(noisy) == rows
    with pytest.raises(ValueError, match="expected the JSON method list.*got: error: boom"):
        vl.parse_method_list("[not json\nerror: boom")


def test_model_targets_from_a_config_without_torch(tmp_path):
    shipped = vl.model_targets()
    assert [t["name"] for t in shipped][:2] == ["malignancy", "subtlety"] and shipped[0]["kind"] == "binary"
    spec = {"task_spec": {"targets": [{"name": "a", "kind": "binary"}, {"name": "b", "kind": "regression"}]}}
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(spec))
    assert [t["name"] for t in vl.model_targets(tmp_path / "ckpt")] == ["a", "b"]
    (tmp_path / "w.json").write_text(json.dumps(spec))
    assert [t["name"] for t in vl.model_targets(tmp_path / "w.safetensors")] == ["a", "b"]  # sibling config
    (tmp_path / "named.json").write_text(json.dumps({"task_spec": "lidc"}))
    assert vl.model_targets(tmp_path / "named.json") is None  # the CLI knows, the viewer does not
    assert vl.model_targets(tmp_path / "nowhere") is None
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="expected a JSON model config"):
        vl.model_targets(tmp_path / "bad.json")
    (tmp_path / "unnamed.json").write_text(json.dumps({"task_spec": {"targets": [{"kind": "binary"}]}}))
    with pytest.raises(ValueError, match="expected named targets"):
        vl.model_targets(tmp_path / "unnamed.json")


def test_write_roi_centers_is_what_roi_centers_reads(tmp_path):
    from medvit_explain.commands.roi import read_roi_centers

    path = vl.write_roi_centers(tmp_path / "c.csv", [(-61.358, 21.401, -35.297), [1e-3, 2.5, -40]])
    assert path.read_text().splitlines()[0] == "x_mm,y_mm,z_mm"
    assert np.array_equal(read_roi_centers(str(path)), [[-61.358, 21.401, -35.297], [1e-3, 2.5, -40.0]])
    with pytest.raises(ValueError, match="at least one ROI centre"):
        vl.write_roi_centers(tmp_path / "e.csv", [])
    with pytest.raises(ValueError, match="finite"):
        vl.write_roi_centers(tmp_path / "n.csv", [(0.0, float("nan"), 1.0)])


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


def test_parse_progress_keeps_the_bar_label():
    assert vl.parse_progress("explain:  40%|####  | 4/10 [00:01<00:02]").label == "explain"
    assert vl.parse_progress("write: 100%|##| 1/1 [00:00<00:00,  8.36map/s]").label == "write"
    assert vl.parse_progress(" 10%|#  | 1/10").label == ""


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


def test_robust_window_from_a_percentile_of_the_non_zero_values():
    a = np.zeros((4, 50, 50), np.float32)  # mostly 0 outside the body
    rng = np.random.default_rng(0)
    inside = rng.normal(0, 1, (2, 20, 20)).astype(np.float32)
    a[1:3, 10:30, 10:30] = inside
    a[2, 15, 15] = 40.0  # one peak
    lo, hi = vl.robust_window(a)
    nonzero = np.abs(a[a != 0])
    assert hi == pytest.approx(np.percentile(nonzero, 99)) and lo == -hi and hi < 40.0
    assert vl.robust_window(a, 100.0) == (-40.0, 40.0)
    assert vl.robust_window(np.abs(a), 90.0) == (0.0, pytest.approx(np.percentile(nonzero, 90)))  # AG-CAM: >= 0
    assert vl.robust_window(np.zeros(5)) == (0.0, 1.0)
    assert vl.robust_window(np.array([0.0, -0.0, np.nan, -2.0])) == (-2.0, 2.0)
    with pytest.raises(ValueError, match="percentile in \\(0, 100\\], got 0"):
        vl.robust_window(a, 0)


def test_overlay_colors_have_a_transparent_centre():
    signed = vl.overlay_colors(256)
    alpha = [c[3] for c in signed]
    assert len(signed) == 256 and alpha[127] == alpha[128] == 0.0 and alpha[0] == alpha[255] == 1.0
    t = [abs(2 * i / 255 - 1) for i in range(256)]
    assert all((a == 0.0) == (ti < vl.DEFAULT_TRANSPARENT_FRACTION) for a, ti in zip(alpha, t))
    assert all(a1 <= a2 for a1, a2 in zip(alpha[128:], alpha[129:]))  # alpha grows with |value|
    assert all(a1 >= a2 for a1, a2 in zip(alpha[:128], alpha[1:128]))
    red, blue = signed[255], signed[0]
    assert red[:3] == (1.0, 1.0, 0.0) and blue[2] == 1.0 and blue[0] < 0.5  # yellow for, light blue against
    positive = vl.overlay_colors(256, signed=False, transparent_fraction=0.25)
    assert [c[3] for c in positive[:64]] == [0.0] * 64 and positive[64][3] > 0 and positive[255][:3] == (1.0, 1.0, 0.0)
    assert vl.overlay_colors(4, transparent_fraction=0.0)[0][3] == 1.0
    for kwargs, match in [({"n": 1}, "at least 2 colours"), ({"transparent_fraction": 1.0}, "in \\[0, 1\\)")]:
        with pytest.raises(ValueError, match=match):
            vl.overlay_colors(**kwargs)


# -- the 3D Slicer extension (cannot run here: compile it and check its layout) ----------------------------
def test_slicer_extension_layout():
    """The layout the Extensions Index builds: the extension at a repository root, a license there, the
    metadata, an icon and a screenshot whose URLs name files of this folder, and a catalog entry."""
    module = SLICER / "MedViTExplain"
    for rel in [
        "CMakeLists.txt",
        "README.md",
        "LICENSE",
        "MedViTExplain.json",
        "Screenshots/MedViTExplain_overlay.png",
        "MedViTExplain/CMakeLists.txt",
        "MedViTExplain/MedViTExplain.py",
        "MedViTExplain/Resources/UI/MedViTExplain.ui",
        "MedViTExplain/Resources/Icons/MedViTExplain.png",
        "MedViTExplain/Testing/CMakeLists.txt",
    ]:
        assert (SLICER / rel).is_file(), rel
    top = (SLICER / "CMakeLists.txt").read_text()
    meta = dict(re.findall(r'set\((EXTENSION_\w+) "([^"]*)"\)', top))
    assert re.search(r"project\s*\(\s*MedViTExplain\s*\)", top) and "add_subdirectory(MedViTExplain)" in top
    assert meta["EXTENSION_CATEGORY"] == "Informatics" and meta["EXTENSION_DEPENDS"] == "PyTorch"
    assert meta["EXTENSION_CONTRIBUTORS"] and len(meta["EXTENSION_DESCRIPTION"]) > 80
    raw = "https://raw.githubusercontent.com/medvit-explain/SlicerMedViTExplain/main/"
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in meta[key].split():
            assert url.startswith(raw) and url.endswith(".png"), url
            image = SLICER / url[len(raw) :]
            assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", url  # a real image of this folder
    assert meta["EXTENSION_HOMEPAGE"].startswith("https://github.com/medvit-explain/SlicerMedViTExplain")
    entry = json.loads((SLICER / "MedViTExplain.json").read_text())
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "dicom_support_rule", "build_subdirectory", "enabled", "tier"}  # fmt: skip
    assert set(entry) <= allowed and {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["category"] == meta["EXTENSION_CATEGORY"] and entry["build_dependencies"] == ["PyTorch"]
    repo = entry["scm_url"].rstrip("/").split("/")[-1].removesuffix(".git")
    assert "slicer" in repo.lower() and meta["EXTENSION_HOMEPAGE"].split("#")[0].endswith(repo)
    assert "Apache License" in (SLICER / "LICENSE").read_text()[:200]
    cmake = (module / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in cmake and "Resources/UI/${MODULE_NAME}.ui" in cmake
    assert "set(MODULE_NAME MedViTExplain)" in cmake and "slicer_add_python_unittest" in cmake
    assert (module / "Resources" / "Icons" / "MedViTExplain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readme = (SLICER / "README.md").read_text()
    assert "5.2 or newer" in readme and "rendering made outside 3D Slicer" in readme


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
    assert "viewer_logic" in text and "pip_install" in text and "PyTorchUtils" in text
    assert "saveNode(" not in text  # it would re-point the CT's storage node at a temporary file
    ast.parse(text, feature_version=(3, 9))  # Slicer 5.2-5.8 run Python 3.9


def test_slicer_ui_file_is_valid_and_names_the_widgets():
    root = ET.parse(SLICER / "MedViTExplain" / "Resources" / "UI" / "MedViTExplain.ui").getroot()
    names = {w.get("name") for w in root.iter("widget")}
    text = (SLICER / "MedViTExplain" / "MedViTExplain.py").read_text()
    for name in [
        "inputSelector",
        "roiSelector",
        "modelPathLineEdit",
        "methodsList",
        "targetsList",
        "deviceComboBox",
        "batchSizeSpinBox",
        "reportCheckBox",
        "applyButton",
        "cancelButton",
        "progressBar",
        "statusLabel",
        "mapSelector",
        "opacitySlider",
        "percentileSlider",
        "transparentSlider",
        "jumpTopButton",
        "showScoresButton",
        "openReportButton",
        "executablePathLineEdit",
        "outputFolderLineEdit",
        "installButton",
        "setupLabel",
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


def test_piped_progress_reaches_the_total(tmp_path):
    """Through a pipe the CLI prints every progress update, the last "n/n" included, however fast the run
    (tqdm's refresh interval would drop it, and a viewer's bar would stop short)."""
    ct = Path(__file__).resolve().parents[1] / "sample_data" / "phantom_000.nii.gz"
    args = [sys.executable, "-m", "medvit_explain", "explain", str(ct), "--method", "cdam", "--target", "malignancy"]
    done = subprocess.run([*args, "--out", str(tmp_path / "out"), "--no-report"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    seen = [p for p in map(vl.parse_progress, re.split(r"[\r\n]", done.stderr)) if p is not None]
    explain = [p for p in seen if p.label == "explain"]
    assert explain and explain[-1].done == explain[-1].total == 40


def test_parse_predictions_of_volumetric_runs(tmp_path):
    """A volumetric model's tables: ROI cubes (view ``3d`` and the mean) and one whole-volume row."""
    cubes = tmp_path / "cubes.csv"
    cubes.write_text(
        "roi,label,view,center_x_mm,malignancy_prob\n0,2,3d,1.5,0.2\n0,2,mean,1.5,0.2\n1,5,3d,-3.0,0.9\n1,5,mean,-3.0,0.9\n"
    )
    _, rows = vl.parse_predictions(cubes)
    assert rows[2] == {"roi": 1, "label": 5, "view": "3d", "center_x_mm": -3.0, "malignancy_prob": 0.9}
    assert vl.top_slice(rows) == rows[3]  # only the per-nodule rows compete
    whole = tmp_path / "whole.csv"
    whole.write_text("volume,malignancy_prob,subtlety\n0,0.7,3.1\n")
    _, rows = vl.parse_predictions(whole)
    assert rows == [{"volume": 0, "malignancy_prob": 0.7, "subtlety": 3.1}]
