"""Shared fixtures: the smoke pipeline on the real bundled model, run once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from avss_lib.book.pipeline import REPO_ROOT, run_pipeline
from avss_lib.core.artifacts import verdict
from avss_lib.core.verdicts import Verdict, from_records

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """A fresh run folder with every notebook of the smoke profile executed (each stage's tests read it)."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    run_dir = tmp_path_factory.mktemp("smoke_run")
    runs = run_pipeline("smoke", run_dir=run_dir)
    assert [r.status for r in runs] == ["ran"] * len(runs)
    return run_dir


def stage_verdicts(run_dir: Path, stage: str, claim: str) -> list[Verdict]:
    """The verdicts a stage wrote, checked to be about ``claim`` and to record the conditions they decided on."""
    verdicts = from_records(verdict(stage).read(run_dir))
    assert verdicts and {v.claim for v in verdicts} == {claim}
    assert all(v.conditions and v.rule for v in verdicts)
    return verdicts
