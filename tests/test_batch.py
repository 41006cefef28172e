"""batch: manifests, the local and Ray engines, resumability after kill -9, failures and bad manifests."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from medvit_explain.batch import read_manifest
from medvit_explain.batch.records import file_digest
from medvit_explain.cli import cli
from medvit_explain.commands.batch import batch
from medvit_explain.errors import MedvitInputError
from medvit_explain.io import load_volume
from medvit_explain.phantom import make_phantoms

from .bad_inputs.batch import batch_options
from .models import tiny_checkpoint

if "batch" not in cli.commands:  # until cli.py registers it
    cli.add_command(batch)

ROOT = Path(__file__).resolve().parents[1]
SIZE, SPACING = (48, 48, 12), (7.0, 7.0, 10.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Five tiny phantoms (the first two also as DICOM series) and a tiny checkpoint."""
    root = tmp_path_factory.mktemp("batch_data")
    make_phantoms(root / "ph", seed=5, count=2, size=SIZE, spacing=SPACING, format="dicom")
    make_phantoms(root / "more", seed=6, count=3, size=SIZE, spacing=SPACING, name_prefix="extra")
    return {"root": root, "ph": root / "ph", "more": root / "more", "ckpt": tiny_checkpoint(root / "ckpt")}


def options(data, *extra, audit=False):
    return batch_options(data["ckpt"], *extra, audit=audit)


def write_manifest(path: Path, rows: list[dict], columns=("study_id", "path", "labels", "nodule_mask")) -> Path:
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def phantom_rows(folder: Path, names) -> list[dict]:
    return [
        {
            "study_id": n,
            "path": str(folder / f"{n}.nii.gz"),
            "labels": str(folder / f"{n}.json"),
            "nodule_mask": str(folder / f"{n}_nodules.nii.gz"),
        }
        for n in names
    ]


def results(out: Path) -> dict[str, dict]:
    with open(out / "results.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == len({r["study_id"] for r in rows}), "a study appears twice in results.csv"
    return {r["study_id"]: r for r in rows}


def check_done_study(out: Path, study_id: str, source: str | None = None) -> dict:
    """The record lists files that exist with its sizes and checksums, and every map loads on the CT's grid."""
    study_dir = out / study_id
    record = json.loads((study_dir / ".done.json").read_text())
    names = {item["name"] for item in record["outputs"]}
    assert {"predictions.csv", "summary.json", f"{study_id}_cdam_malignancy.nii.gz"} <= names
    for item in record["outputs"]:
        path = study_dir / item["name"]
        assert path.stat().st_size == item["bytes"] and file_digest(path) == item["sha256"]
    json.loads((study_dir / "summary.json").read_text())
    map_volume = load_volume(study_dir / f"{study_id}_cdam_malignancy.nii.gz")
    if source is not None:
        assert map_volume.same_grid(load_volume(source), atol=1e-4)
    assert np.isfinite(map_volume.array).all()
    return record


def test_manifest_folder_scan_and_csv(data, tmp_path):
    studies = {s.study_id: s for s in read_manifest(data["ph"])}
    assert sorted(studies) == ["phantom_000", "phantom_000_dicom", "phantom_001", "phantom_001_dicom"]
    for name in ("phantom_000", "phantom_000_dicom"):  # labels and masks beside the image / series folder
        assert studies[name].labels.endswith("phantom_000.json")
        assert studies[name].nodule_mask.endswith("phantom_000_nodules.nii.gz")
        assert studies[name].malignancy in (0, 1)
    # a CSV: relative paths from the CSV's folder; malignancy column wins over labels
    manifest = write_manifest(
        data["ph"] / "m.csv",
        [{"study_id": "a", "path": "phantom_000.nii.gz", "labels": "phantom_000.json", "malignancy": "1"}],
        columns=("study_id", "path", "labels", "malignancy"),
    )
    try:
        (study,) = read_manifest(manifest)
        assert study.path == str(data["ph"] / "phantom_000.nii.gz") and study.malignancy == 1
    finally:
        manifest.unlink()
    bad_id = write_manifest(
        tmp_path / "bad.csv", [{"study_id": "../x", "path": str(data["ph"] / "phantom_000.nii.gz")}]
    )
    with pytest.raises(MedvitInputError, match="study_id"):
        read_manifest(bad_id)


def test_one_manifest_format_for_every_workflow(data, tmp_path):
    """train / evaluate / audit (find_studies) and batch (read_manifest) read the same CSV into one Study
    type; the older training layout (image instead of path, no study_id) is read too."""
    from medvit_explain.workflows.studies import Study, find_phantoms, find_studies

    ph = data["ph"]
    image, mask, labels = ph / "phantom_000.nii.gz", ph / "phantom_000_nodules.nii.gz", ph / "phantom_000.json"
    legacy = tmp_path / "legacy.csv"
    legacy.write_text(f"image,nodule_mask,labels\n{image},{mask},{labels}\n")
    (a,) = find_studies(legacy)
    (b,) = read_manifest(legacy)
    assert isinstance(a, Study) and isinstance(b, Study)
    assert a.study_id == b.study_id == "phantom_000.nii.gz" and a.path == b.path == str(image)
    assert a.labels == b.labels and a.nodule_mask == b.nodule_mask
    assert a.malignancy is None and b.malignancy in (0, 1)  # find_studies reads the labels with the study
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text(f"study_id,path,labels\nx,{image},{labels}\n")
    assert read_manifest(unlabelled)[0].nodule_mask is None
    with pytest.raises(MedvitInputError, match="nodule_mask"):
        find_studies(unlabelled)
    assert [s.study_id for s in find_phantoms(ph)] == ["phantom_000", "phantom_001"]  # not the DICOM series


@pytest.mark.parametrize("case", ["missing column", "missing file", "duplicate id", "bad label", "no manifest"])
def test_bad_manifest_one_line_exit_2(data, tmp_path, case):
    rows = phantom_rows(data["more"], ["extra_000", "extra_001"])
    manifest = tmp_path / "m.csv"
    if case == "missing column":
        write_manifest(manifest, rows, columns=("study_id", "labels"))
    elif case == "missing file":
        rows[1]["path"] = str(tmp_path / "nowhere.nii.gz")
        write_manifest(manifest, rows)
    elif case == "duplicate id":
        rows[1]["study_id"] = rows[0]["study_id"]
        write_manifest(manifest, rows)
    elif case == "bad label":
        rows[0]["malignancy"] = "maybe"
        write_manifest(manifest, rows, columns=("study_id", "path", "malignancy"))
    else:
        manifest = tmp_path / "absent.csv"
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["batch", str(manifest), "--out", str(out), *options(data)])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    assert not out.exists(), "nothing may be written for a bad manifest"


def test_engine_options_need_ray_engine(data, tmp_path):
    result = CliRunner().invoke(
        cli, ["batch", str(data["more"]), "--out", str(tmp_path / "o"), "--workers", "2", *options(data)]
    )
    assert result.exit_code == 2 and "--engine ray" in result.output


def test_local_engine_end_to_end_and_resume(data, tmp_path):
    """A folder with NIfTI and DICOM studies; outputs, records, results; a re-run skips; a damaged study is redone."""
    out = tmp_path / "out"
    args = ["batch", str(data["ph"]), "--out", str(out), *options(data, "--dicom", audit=True)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    table = results(out)
    assert sorted(table) == ["phantom_000", "phantom_000_dicom", "phantom_001", "phantom_001_dicom"]
    for study_id, row in table.items():
        assert row["status"] == "done" and row["error"] == ""
        assert 0.0 <= float(row["max_malignancy_prob"]) <= 1.0 and row["malignancy_label"] in ("0", "1")
        assert float(row["total_s"]) > 0
        source = data["ph"] / (study_id if study_id.endswith("_dicom") else f"{study_id}.nii.gz")
        record = check_done_study(out, study_id, str(source))
        has_dicom = any(item["name"].startswith("dicom/") for item in record["outputs"])
        assert has_dicom == study_id.endswith("_dicom")  # --dicom: DICOM maps for the DICOM studies only
    # the NIfTI and the DICOM copy of a phantom give the same predictions
    a = (out / "phantom_000" / "predictions.csv").read_text()
    assert a == (out / "phantom_000_dicom" / "predictions.csv").read_text()
    job = json.loads((out / "batch.json").read_text())
    assert job["state"] == "finished" and job["progress"]["done"] == 4 and job["progress"]["studies_per_min"] > 0
    # labels exist: the whole-set audit report, over every labelled study
    assert f"audit: {out / 'audit' / 'audit.html'}" in result.output
    assert json.loads((out / "audit" / "audit.json").read_text())["summary"]["n_studies"] == 4

    # re-run: everything is skipped, records untouched
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/.done.json")}
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0 and "4 already done" in result.output, result.output
    assert "audit: unchanged" in result.output
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("*/.done.json")}

    # a truncated output and a half-written study (no record, junk inside) are redone from scratch
    victim = out / "phantom_001" / "phantom_001_cdam_malignancy.nii.gz"
    victim.write_bytes(victim.read_bytes()[:100])
    (out / "phantom_000" / ".done.json").unlink()
    (out / "phantom_000" / "junk.tmp").write_text("half")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0 and "2 already done, 2 to run" in result.output, result.output
    assert not (out / "phantom_000" / "junk.tmp").exists()
    for study_id in ("phantom_000", "phantom_001"):
        check_done_study(out, study_id, str(data["ph"] / f"{study_id}.nii.gz"))
    for p, stamp in stamps.items():
        if p.parent.name.endswith("_dicom"):
            assert p.stat().st_mtime_ns == stamp


def test_corrupt_study_is_recorded_and_retried(data, tmp_path):
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b" + os.urandom(300))
    rows = phantom_rows(data["more"], ["extra_000", "extra_001"])
    rows.insert(1, {"study_id": "broken", "path": str(corrupt)})
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    args = ["batch", str(manifest), "--out", str(out), *options(data)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert "failed: broken:" in result.output
    table = results(out)
    assert [table[s]["status"] for s in ("extra_000", "broken", "extra_001")] == ["done", "failed", "done"]
    assert table["broken"]["error"] and "\n" not in table["broken"]["error"]
    failure = json.loads((out / "broken" / ".failed.json").read_text())
    assert failure["error"] == table["broken"]["error"] and "Traceback" in failure["traceback"]
    assert not (out / "broken" / ".done.json").exists()
    for study_id in ("extra_000", "extra_001"):
        check_done_study(out, study_id)

    # a re-run keeps the failure without retrying it; --retry-failed retries it (fixed now)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "2 already done, 1 failed before" in result.output, result.output
    corrupt.write_bytes((data["more"] / "extra_002.nii.gz").read_bytes())
    result = CliRunner().invoke(cli, [*args, "--retry-failed"])
    assert result.exit_code == 0, result.output
    assert results(out)["broken"]["status"] == "done" and not (out / "broken" / ".failed.json").exists()
    check_done_study(out, "broken")


def test_kill_9_then_rerun_finishes_each_study_once(data, tmp_path):
    names = ["extra_000", "extra_001", "extra_002"]
    rows = phantom_rows(data["more"], names) + [
        {"study_id": f"ph{i}", "path": str(data["ph"] / f"phantom_00{i}.nii.gz")} for i in range(2)
    ]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    args = ["batch", str(manifest), "--out", str(out), *options(data)]
    script = (
        "import sys; from medvit_explain.cli import cli; from medvit_explain.commands.batch import batch; "
        "cli.add_command(batch) if 'batch' not in cli.commands else None; "
        "cli(sys.argv[1:], prog_name='medvit-explain')"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 90
        while not list(out.glob("*/.done.json")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no study finished in time"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    done_before = {p.parent.name: p.read_text() for p in out.glob("*/.done.json")}
    assert 1 <= len(done_before) < len(rows), "the kill must land mid-way"
    for study_id in done_before:  # what is counted done after the kill is complete
        check_done_study(out, study_id)

    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert f"{len(done_before)} already done, {len(rows) - len(done_before)} to run" in result.output
    table = results(out)
    assert sorted(table) == sorted(r["study_id"] for r in rows)
    for study_id in table:
        assert table[study_id]["status"] == "done"
        check_done_study(out, study_id)
    for study_id, text in done_before.items():  # not redone: the record is the one from the killed run
        assert (out / study_id / ".done.json").read_text() == text
    leftovers = [p.name for p in out.rglob(".*") if p.name not in (".done.json", ".lock")]
    assert not leftovers, leftovers


def test_ray_engine_end_to_end_on_two_cpu_workers(data, tmp_path):
    ray = pytest.importorskip("ray", reason="the Ray engine needs the 'ray' extra")
    rows = phantom_rows(data["more"], ["extra_000", "extra_001"]) + [
        {"study_id": "ph0", "path": str(data["ph"] / "phantom_000.nii.gz")}
    ]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out, local_out = tmp_path / "out", tmp_path / "local"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = CliRunner().invoke(
            cli, ["batch", str(manifest), "--out", str(out), "--engine", "ray", "--workers", "2", *options(data)]
        )
        assert result.exit_code == 0, result.output
        assert "2 worker(s)" in result.output
    finally:
        ray.shutdown()
    table = results(out)
    assert all(row["status"] == "done" for row in table.values()) and len(table) == 3
    assert len({row["worker"] for row in table.values()}) == 2, "both workers took studies"
    for study_id in table:
        check_done_study(out, study_id)
    # the same records and numbers as the local engine
    result = CliRunner().invoke(cli, ["batch", str(manifest), "--out", str(local_out), *options(data)])
    assert result.exit_code == 0, result.output
    local = results(local_out)
    for study_id, row in table.items():
        assert float(row["max_malignancy_prob"]) == pytest.approx(
            float(local[study_id]["max_malignancy_prob"]), abs=1e-5
        )
        ray_pred = np.loadtxt(out / study_id / "predictions.csv", delimiter=",", skiprows=1)
        local_pred = np.loadtxt(local_out / study_id / "predictions.csv", delimiter=",", skiprows=1)
        np.testing.assert_allclose(ray_pred, local_pred, atol=1e-4)
