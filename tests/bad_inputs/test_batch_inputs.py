"""batch with bad manifests, hostile output folders and changed inputs, through the real CLI.

Refused cases: exit 2, one ``error:`` line, nothing written in --out. Planted links: their targets are
byte-identical afterwards. Resume: a study is skipped only when its record was made from the same input.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from medvit_explain.batch.job import job_lock
from medvit_explain.batch.manifest import MAX_ID_LENGTH, read_manifest
from medvit_explain.batch.records import clear_study_dir, input_identity
from medvit_explain.errors import MedvitInputError, OutputError

from ..models import tiny_checkpoint
from .batch import BAD_IDS, batch_options, other_scan, scans, snapshot, victim_folder, write_manifest
from .files import dicom_series, nifti, tiny_ct
from .harness import assert_refused, run_cli, run_cli_process

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("batch_ckpt") / "ckpt")


def batch(manifest: Path, out: Path, checkpoint: Path, *extra: str):
    return run_cli(["batch", manifest, "--out", out, *batch_options(checkpoint, *extra)])


def assert_ran(outcome) -> None:
    """A batch that finished: exit 0, no traceback, no error or warning line (its log lines are expected)."""
    assert outcome.exit_code == 0 and "Traceback" not in outcome.stderr, str(outcome)
    assert not outcome.errors and not outcome.warnings, str(outcome)


def results(out: Path) -> dict[str, dict]:
    with open(out / "results.csv", newline="") as stream:
        return {row["study_id"]: row for row in csv.DictReader(stream)}


def first_run(tmp_path: Path, checkpoint: Path) -> tuple[Path, Path, dict[str, Path]]:
    """Two studies a, b run to completion: (manifest, out, scans)."""
    inputs = scans(tmp_path / "in")
    manifest = write_manifest(tmp_path / "m.csv", [(name, str(path)) for name, path in inputs.items()])
    out = tmp_path / "out"
    outcome = batch(manifest, out, checkpoint)
    assert_ran(outcome)
    assert "0 already done, 2 to run" in outcome.stderr
    return manifest, out, inputs


# --------------------------------------------------------------------------- study ids
@pytest.mark.parametrize("case", list(BAD_IDS))
def test_bad_study_id_refused_before_anything_is_written(tmp_path, checkpoint, case):
    scan = nifti(tmp_path)
    manifest = write_manifest(tmp_path / "m.csv", [("ok", str(scan)), (BAD_IDS[case], str(scan))])
    out = tmp_path / "out"
    line = assert_refused(batch(manifest, out, checkpoint), match=r"line 3: study_id .*expected", absent=(out,))
    assert "letters, digits" in line  # says what is allowed


def test_folder_input_ids_follow_the_same_rules(tmp_path, checkpoint):
    """A folder's ids come from file names: made safe (no control character, no leading dot), and a name
    that is one of the job's own is refused, naming the file to rename."""
    folder = tmp_path / "scans"
    scans(folder, ("plain", "-dash", "ev\x1bil name"))
    ids = [s.study_id for s in read_manifest(folder)]
    assert sorted(ids) == ["dash", "ev_il_name", "plain"]
    nifti(folder, "audit.nii.gz")
    out = tmp_path / "out"
    assert_refused(batch(folder, out, checkpoint), match=r"audit\.nii\.gz.*study_id 'audit'", absent=(out,))


def test_longest_allowed_id_fits_every_output_name(tmp_path, checkpoint):
    """A 128-character id with the longest method name and DICOM maps: every file (and its temporary)
    fits a file name."""
    series = tmp_path / "series"
    dicom_series(series)
    study_id = "x" * MAX_ID_LENGTH
    manifest = write_manifest(tmp_path / "m.csv", [(study_id, str(series))])
    out = tmp_path / "out"
    extra = ("--method", "transformer-attribution", "--target", "calcification", "--dicom")
    outcome = batch(manifest, out, checkpoint, *extra)
    assert_ran(outcome)
    names = json.loads((out / study_id / ".done.json").read_text())["outputs"]
    assert any(item["name"].endswith("_transformer-attribution_calcification_pm.dcm") for item in names), names


def test_ids_differing_only_in_case_are_duplicates(tmp_path, checkpoint):
    scan = nifti(tmp_path)
    manifest = write_manifest(tmp_path / "m.csv", [("Study1", str(scan)), ("study1", str(scan))])
    out = tmp_path / "out"
    assert_refused(batch(manifest, out, checkpoint), match="duplicate study_id 'study1'.*case", absent=(out,))


# --------------------------------------------------------------------------- the manifest itself
@pytest.mark.parametrize("case", ["no manifest", "missing column", "duplicate id", "missing file"])
def test_bad_manifest_refused(tmp_path, checkpoint, case):
    scan = nifti(tmp_path)
    manifest = tmp_path / "m.csv"
    match = {
        "no manifest": "manifest not found",
        "missing column": "missing the column.*path",
        "duplicate id": "duplicate study_id 'a'",
        "missing file": r"line 3: path not found: .*nowhere\.nii\.gz",
    }[case]
    if case == "missing column":
        write_manifest(manifest, [("a",)], columns=("study_id",))
    elif case == "duplicate id":
        write_manifest(manifest, [("a", str(scan)), ("a", str(scan))])
    elif case == "missing file":
        write_manifest(manifest, [("a", str(scan)), ("b", str(tmp_path / "nowhere.nii.gz"))])
    out = tmp_path / "out"
    assert_refused(batch(manifest, out, checkpoint), match=match, absent=(out,))


def test_unreadable_study_is_recorded_and_echoed_printably(tmp_path, checkpoint):
    """A study whose file cannot be read fails alone (exit 1): its folder holds only the failure record,
    and neither the log nor the summary echoes the control characters of its file name."""
    scan = nifti(tmp_path)
    broken = tmp_path / "bro\x1b[2Jken\r.nii.gz"
    broken.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 2)
    manifest = write_manifest(tmp_path / "m.csv", [("good", str(scan)), ("broken", str(broken))])
    out = tmp_path / "out"
    outcome = batch(manifest, out, checkpoint)
    assert outcome.exit_code == 1 and "Traceback" not in outcome.stderr, str(outcome)
    assert not CONTROL.search(outcome.stdout + outcome.stderr.replace("\n", "")), str(outcome)
    assert "failed: broken: " in outcome.stdout
    assert sorted(p.name for p in (out / "broken").iterdir()) == [".failed.json"]
    table = results(out)
    assert table["good"]["status"] == "done" and table["broken"]["status"] == "failed"


# --------------------------------------------------------------------------- links planted in --out
@pytest.mark.parametrize("name", ["b", "audit"])
def test_linked_folder_in_out_is_refused_and_its_target_untouched(tmp_path, checkpoint, name):
    manifest, out, _ = first_run(tmp_path, checkpoint)
    victim = victim_folder(tmp_path / "victim", "b")
    shutil.rmtree(out / name, ignore_errors=True)
    (out / name).symlink_to(victim, target_is_directory=True)
    (out / "a" / ".done.json").unlink()  # a study to redo: the job would write if it were not refused
    before, victim_before = snapshot(out), snapshot(victim)
    assert_refused(batch(manifest, out, checkpoint), match=f"{name} is a symbolic link")
    assert snapshot(victim) == victim_before
    assert snapshot(out) == before


def test_linked_lock_is_refused_and_its_target_not_truncated(tmp_path, checkpoint):
    manifest, out, _ = first_run(tmp_path, checkpoint)
    victim = tmp_path / "victim.txt"
    victim.write_text("a file the lock must not empty\n")
    (out / ".lock").unlink()
    (out / ".lock").symlink_to(victim)
    before = snapshot(out)
    assert_refused(batch(manifest, out, checkpoint), match=r"\.lock is a symbolic link")
    assert victim.read_text() == "a file the lock must not empty\n"
    assert snapshot(out) == before
    # the lock itself (past the up-front check) opens without following the link or truncating
    with pytest.raises(OutputError, match="symbolic link"):
        with job_lock(out):
            pass
    assert victim.read_text() == "a file the lock must not empty\n"


def test_clearing_a_linked_study_folder_deletes_nothing_behind_it(tmp_path):
    """A link that appears while the job runs: the study folder is refused, not emptied through it."""
    victim = victim_folder(tmp_path / "victim", "s")
    before = snapshot(victim)
    (tmp_path / "s").symlink_to(victim, target_is_directory=True)
    with pytest.raises(MedvitInputError, match="symbolic link"):
        clear_study_dir(tmp_path / "s")
    assert snapshot(victim) == before


def test_file_where_a_study_folder_goes_is_refused(tmp_path, checkpoint):
    manifest, out, _ = first_run(tmp_path, checkpoint)
    shutil.rmtree(out / "b")
    (out / "b").write_text("a file of the user's\n")
    before = snapshot(out)
    assert_refused(batch(manifest, out, checkpoint), match="b is a file where that study's folder goes")
    assert snapshot(out) == before


# --------------------------------------------------------------------------- resume and the input's identity
def test_input_identity_of_a_file_a_series_folder_and_a_header(tmp_path):
    """Cheap identities: size and mtime_ns of a file; of every file of a folder; an .mhd's data file too."""
    scan = nifti(tmp_path)
    first = input_identity(scan)
    assert first == input_identity(scan) and first["path"] == str(scan.resolve())
    os.utime(scan, ns=(first["mtime_ns"] + 1, first["mtime_ns"] + 1))
    assert input_identity(scan) != first  # rewritten in place, same size
    series = tmp_path / "series"
    dicom_series(series)
    before = input_identity(series)
    assert before["files"] == 5 and before == input_identity(series)
    victim = sorted(series.iterdir())[2]
    os.utime(victim, ns=(1, 1))
    assert input_identity(series) != before  # one slice replaced by an older file
    header = tmp_path / "ct.mhd"
    header.write_text("ElementDataFile = ct.raw\n")
    (tmp_path / "ct.raw").write_bytes(b"\0" * 8)
    before = input_identity(header)
    (tmp_path / "ct.raw").write_bytes(b"\1" * 9)
    assert input_identity(header) != before
    assert input_identity(tmp_path / "gone.nii.gz")["missing"] is True


def test_resume_unchanged_skips_every_study(tmp_path, checkpoint):
    manifest, out, _ = first_run(tmp_path, checkpoint)
    records = {p: p.read_bytes() for p in out.glob("*/.done.json")}
    outcome = batch(manifest, out, checkpoint)
    assert_ran(outcome)
    assert "2 already done, 0 to run" in outcome.stderr and "input changed" not in outcome.stderr
    assert records == {p: p.read_bytes() for p in out.glob("*/.done.json")}


def test_resume_redoes_a_study_whose_file_was_replaced(tmp_path, checkpoint):
    manifest, out, inputs = first_run(tmp_path, checkpoint)
    old_predictions = (out / "a" / "predictions.csv").read_text()
    old_b = (out / "b" / ".done.json").read_bytes()
    other_scan(inputs["a"])  # same path, another scan
    outcome = batch(manifest, out, checkpoint)
    assert_ran(outcome)
    assert "1 already done, 1 to run" in outcome.stderr and "1 of them because its input changed" in outcome.stderr
    assert "1 of them because their input changed" in outcome.stdout
    record = json.loads((out / "a" / ".done.json").read_text())
    assert record["input"] == input_identity(inputs["a"])
    assert (out / "a" / "predictions.csv").read_text() != old_predictions  # new numbers
    new_prob = record["summary"]["max_malignancy_prob"]  # results.csv shows the new scan's numbers
    assert float(results(out)["a"]["max_malignancy_prob"]) == pytest.approx(new_prob, rel=1e-5)
    assert (out / "b" / ".done.json").read_bytes() == old_b  # the unchanged study is skipped


def test_resume_redoes_a_study_pointed_at_another_file(tmp_path, checkpoint):
    manifest, out, inputs = first_run(tmp_path, checkpoint)
    elsewhere = other_scan(tmp_path / "elsewhere" / "c.nii.gz")
    write_manifest(manifest, [("a", str(elsewhere)), ("b", str(inputs["b"]))])
    outcome = batch(manifest, out, checkpoint)
    assert_ran(outcome)
    assert "1 already done, 1 to run" in outcome.stderr and "input changed" in outcome.stderr
    record = json.loads((out / "a" / ".done.json").read_text())
    assert record["path"] == str(elsewhere) and record["input"]["path"] == str(elsewhere)
    assert results(out)["a"]["path"] == str(elsewhere)


def test_record_without_input_identity_is_redone(tmp_path, checkpoint):
    """Records of an older version carry no input identity: the study is redone, not trusted."""
    manifest, out, _ = first_run(tmp_path, checkpoint)
    record = json.loads((out / "a" / ".done.json").read_text())
    del record["input"]
    (out / "a" / ".done.json").write_text(json.dumps(record))
    outcome = batch(manifest, out, checkpoint)
    assert_ran(outcome)
    assert "1 already done, 1 to run" in outcome.stderr
    assert "input" in json.loads((out / "a" / ".done.json").read_text())


# --------------------------------------------------------------------------- write failures
def test_write_failures_end_in_one_line_or_a_clean_failure_record(tmp_path, checkpoint):
    """Under a file-size limit (``ulimit -f``): the job's own files fail → one error line, exit 2, no
    temporary left; a limit only one study's map exceeds → that study fails alone and keeps no output."""
    small = nifti(tmp_path / "in", "small.nii.gz")
    big = nifti(tmp_path / "in", "big.nii.gz", tiny_ct(shape=(160, 150, 20)))  # its map: over 48 kB
    manifest = write_manifest(tmp_path / "m.csv", [("small", str(small)), ("big", str(big))])
    args = ["batch", manifest, "--out", tmp_path / "out", *batch_options(checkpoint)]

    tiny = run_cli_process(args, fsize_limit=64)  # not even results.csv fits
    assert tiny.exit_code == 2 and "Traceback" not in tiny.stderr, str(tiny)
    assert len(tiny.errors) == 1 and re.search("cannot write the batch output.*file-size limit", tiny.errors[0])
    assert all(line.startswith(("error:", "2 studies:")) for line in tiny.lines), str(tiny)  # the plan, the error
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name != ".lock"]

    shutil.rmtree(tmp_path / "out")
    some = run_cli_process(args, fsize_limit=48_000)
    assert some.exit_code == 1 and "Traceback" not in some.stderr, str(some)
    table = results(tmp_path / "out")
    assert table["small"]["status"] == "done" and table["big"]["status"] == "failed", table
    assert "file-size limit" in table["big"]["error"]
    assert sorted(p.name for p in (tmp_path / "out" / "big").iterdir()) == [".failed.json"]


# ------------------------------------------------------------------ the image corpus through batch
def test_image_corpus_through_batch(tmp_path, checkpoint):
    """Every bad image of ``images.CASES`` as one study of a single batch job beside a good one: the good
    study is done, every bad one fails alone (exit 1) with a ``.failed.json`` whose error is the same one
    line ``explain`` prints (matching the case), nothing else in its folder, no traceback, no control
    character on the terminal. (The cases whose path does not exist are refused for the whole job up
    front: tested in ``test_bad_manifest_refused``.)"""
    from .images import CASES

    rows, expected = [("good", str(nifti(tmp_path)))], {}
    for name, build in CASES.items():
        folder = tmp_path / "in" / name
        folder.mkdir(parents=True)
        case = build(folder)
        if not case.path.exists():
            continue
        rows.append((name, str(case.path)))
        expected[name] = case.match
    out = tmp_path / "out"
    outcome = batch(write_manifest(tmp_path / "m.csv", rows), out, checkpoint)
    assert outcome.exit_code == 1 and "Traceback" not in outcome.stderr, str(outcome)
    assert not CONTROL.search(outcome.stdout + outcome.stderr.replace("\n", "").replace("\r", ""))
    table = results(out)
    assert table["good"]["status"] == "done"
    for name, match in expected.items():
        assert table[name]["status"] == "failed", (name, table[name])
        assert sorted(p.name for p in (out / name).iterdir()) == [".failed.json"], name
        error = json.loads((out / name / ".failed.json").read_text())["error"]
        assert "\n" not in error and re.search(match, error, re.IGNORECASE), (name, error, match)
