"""Bad model arguments through predict and explain: one error line, exit 2, nothing written, no code
from a checkpoint executed, no network request."""

from __future__ import annotations

import pytest

from . import models
from .files import nifti
from .harness import assert_refused, run_cli


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    return nifti(tmp_path_factory.mktemp("ct"))


@pytest.mark.parametrize("case", sorted(models.CASES))
@pytest.mark.parametrize("command", ["predict", "explain"])
def test_bad_model_argument(tmp_path, ct, case, command):
    model_args, match = models.CASES[case](tmp_path)
    out = tmp_path / "out"
    target = out / "p.csv" if command == "predict" else out
    extra = ["--method", "cdam", "--no-report"] if command == "explain" else []
    assert_refused(run_cli([command, ct, *model_args, "--out", target, *extra]), match=match, absent=(out,))
    assert not (tmp_path / "pwned").exists()
