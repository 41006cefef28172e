"""Output locations that cannot be written: read-only file systems, /proc, no permission, a full disk, a
file-size limit, names too long. Each ends in one ``error:`` line (exit 2), nothing at the final paths, and
no folder left behind that the run created."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

from .files import nifti
from .harness import assert_clean, assert_refused, run_cli, run_cli_process

EXPLAIN = ["--method", "cdam", "--no-report"]


@contextlib.contextmanager
def tmpfs(where: Path, options: str):
    """A small tmpfs mounted at ``where`` (root only); the test is skipped, with the reason, where mounting
    is not possible (no privileges, no mount command, a sandbox)."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'}): needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    return nifti(tmp_path_factory.mktemp("ct"))


@pytest.mark.parametrize("command", ["explain", "predict"])
def test_read_only_file_system(tmp_path, ct, command):
    with tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        out = ro / "out"
        args = [command, ct, "--out", out / "p.csv" if command == "predict" else out]
        line = assert_refused(run_cli(args + (EXPLAIN if command == "explain" else [])), match="read-only file system")
        assert "choose another --out" in line
        assert not out.exists()


@pytest.mark.parametrize("out", ["/proc/medvit-out", "/proc/self/medvit-out", "/sys/medvit-out"])
@pytest.mark.parametrize("command", ["explain", "predict"])
def test_pseudo_file_systems(ct, command, out):
    target = [out + "/p.csv"] if command == "predict" else [out]
    assert_refused(run_cli([command, ct, "--out", *target] + (EXPLAIN if command == "explain" else [])))
    assert not Path(out).exists()


@contextlib.contextmanager
def _effective_user(uid: int):
    """Run the block with effective uid ``uid`` (root can switch back: its saved uid stays 0)."""
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.mark.parametrize("command", ["explain", "predict"])
def test_no_permission(ct, command):
    """A folder the user may not write into. Root may write anywhere, so as root the command runs with
    the effective user ``nobody`` (the input is copied where nobody can read it)."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="medvit-perm-"))
    try:
        base.chmod(0o755)
        readable = Path(shutil.copy(ct, base / "ct.nii.gz"))
        readable.chmod(0o644)
        locked = base / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        out = locked / "out"
        args = [command, readable, "--out", out / "p.csv" if command == "predict" else out]
        args += EXPLAIN if command == "explain" else []
        with _effective_user(65534) if os.geteuid() == 0 else contextlib.nullcontext():
            outcome = run_cli(args)
        line = assert_refused(outcome, match="permission denied")
        assert "choose a folder you can write to" in line
        assert not out.exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("command", ["explain", "predict"])
def test_full_disk(tmp_path, ct, command):
    """A disk with room for the probe and a few overlays, not all: nothing of the run is kept."""
    with tmpfs(tmp_path / "small", "size=20k") as small:
        out = small / "out"
        args = [command, ct, "--out", out / "p.csv" if command == "predict" else out]
        if command == "predict":  # fill the disk to the last byte: the (empty) probe file fits, the table not
            with open(small / "filler", "wb", buffering=0) as stream, contextlib.suppress(OSError):
                while True:
                    stream.write(b"\0" * 512)
        outcome = run_cli(args + (EXPLAIN if command == "explain" else []))
        assert_refused(outcome, match="no space left on device")
        assert not out.exists() or not any(out.iterdir()), list(out.rglob("*"))


def test_file_size_limit_explain(tmp_path, ct):
    """Under ``ulimit -f`` (RLIMIT_FSIZE) every overlay larger than the limit fails with EFBIG: the run
    ends in one error line and exit 2, nothing at the final paths (was: exit 0 with truncated overlays)."""
    out = tmp_path / "out"
    outcome = run_cli_process(["explain", ct, "--out", out, *EXPLAIN], fsize_limit=1500)
    assert_refused(outcome, match="file.size limit|file too large")
    assert not out.exists() or not any(out.iterdir()), list(out.rglob("*"))


def test_file_size_limit_itk_writer(tmp_path):
    """ITK's NIfTI writer only prints ``NWAD: wrote only 0 of N bytes`` under a file-size limit and returns
    normally; make-phantom (which writes through ITK) must still fail and leave no file behind."""
    out = tmp_path / "ph"
    outcome = run_cli_process(["make-phantom", out, "--seed", "1", "--size", "32", "32", "16"], fsize_limit=6000)
    assert_refused(outcome, match="file.size limit|file too large|cut short")
    assert not list(out.glob("*.nii.gz")), list(out.iterdir())


def test_long_dotted_file_name(tmp_path):
    """A 230-character dotted file name: outputs get a shortened stem (with a hash) instead of a traceback."""
    name = ".".join(["part"] * 45) + ".nii.gz"
    ct = nifti(tmp_path, name)
    out = tmp_path / "out"
    assert_clean(run_cli(["explain", ct, "--out", out, *EXPLAIN]))
    names = sorted(p.name for p in out.iterdir())
    assert all(len(n.encode()) < 200 for n in names) and any(n.endswith("_cdam_malignancy.nii.gz") for n in names)


def test_explain_dot_inside_series_folder(tmp_path):
    """``explain .`` from inside a series folder: the stem is the folder's name and the default output
    folder lies beside the input, not inside it (was: ``./_explain/_cdam_...``)."""
    from .files import dicom_series

    dicom_series(tmp_path / "chest")
    assert_clean(run_cli(["explain", ".", *EXPLAIN], cwd=tmp_path / "chest"))
    assert sorted(p.name for p in (tmp_path / "chest").iterdir() if not p.suffix == ".dcm") == []
    assert (tmp_path / "chest_explain" / "chest_cdam_malignancy.nii.gz").is_file()


def test_rerun_says_what_it_replaced_and_cleans_a_killed_run(tmp_path, ct):
    """A second run into the same folder names the files it replaced (one warning line); a killed run's
    staging folder and temporary files are removed by the next run."""
    out = tmp_path / "out"
    assert_clean(run_cli(["explain", ct, "--out", out, *EXPLAIN]))
    dead = out / ".medvit-explain-run-999999999-abcd"  # a pid that cannot be running
    dead.mkdir()
    (dead / "ct_cdam_malignancy.nii.gz").write_bytes(b"partial")
    (out / ".ct_cdam_malignancy.nii.gz.x1y2z3.nii.gz").write_bytes(b"partial")
    outcome = run_cli(["explain", ct, "--out", out, *EXPLAIN])
    assert_clean(outcome, warnings_allowed=1)
    assert outcome.warnings and "replaced 11 earlier output(s)" in outcome.warnings[0]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_out_is_a_file(tmp_path, ct):
    (tmp_path / "taken").write_text("x")
    assert_refused(run_cli(["explain", ct, "--out", tmp_path / "taken", *EXPLAIN]), match="not a folder|is a file")
    assert (tmp_path / "taken").read_text() == "x"
    assert_refused(run_cli(["predict", ct, "--out", tmp_path]), match="is a (directory|folder)")


def test_roi_centre_outside_the_volume(tmp_path, ct):
    """Centres metres away from the scan are refused, not scored as padding."""
    centres = tmp_path / "centres.csv"
    centres.write_text("x_mm,y_mm,z_mm\n0,0,12\n5000,0,12\n")
    for command in ("predict", "explain"):
        out = tmp_path / f"out-{command}"
        args = [command, ct, "--roi-centers", centres, "--out", out / "p.csv" if command == "predict" else out]
        assert_refused(run_cli(args + (EXPLAIN if command == "explain" else [])), match="outside the CT", absent=(out,))


def test_dicom_output_of_a_tilted_series_is_refused_before_writing(tmp_path):
    """A gantry-tilted series is resampled on reading (said in a warning and in summary.json); ``--dicom``
    then cannot reference the source images and is refused up front, before any NIfTI map or table is
    written (was: the Parametric Map writer failed after the overlays and predictions.csv were written)."""
    import json

    from .images import tilted_series

    tilted_series(tmp_path / "tilt")
    out = tmp_path / "out"
    line = assert_refused(
        run_cli(["explain", tmp_path / "tilt", "--out", out, "--dicom", *EXPLAIN]),
        match="--dicom cannot reference the source images: the series was resampled",
        absent=(out,),
        warnings_allowed=1,
    )
    assert "gantry tilt" in line
    outcome = run_cli(["explain", tmp_path / "tilt", "--out", out, *EXPLAIN])
    assert_clean(outcome, warnings_allowed=1)
    assert "gantry tilt 15.0° corrected" in outcome.warnings[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input"]["resampled"].startswith("gantry tilt 15.0° corrected")
