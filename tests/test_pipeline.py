"""The smoke pipeline on the real bundled model: artifacts, reuse, the built book, the browser check, the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from avss_lib import cli
from avss_lib.errors import ConfigError
from avss_lib.pipeline import REPO_ROOT, build_book, load_profile, notebook_parameters, run_pipeline

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    run_dir = tmp_path_factory.mktemp("smoke_run")
    runs = run_pipeline("smoke", run_dir=run_dir)
    assert [r.status for r in runs] == ["ran"] * len(runs)
    return run_dir


@pytest.mark.slow
@needs_data
def test_activation_artifacts(smoke_run):
    stats = pd.read_parquet(smoke_run / "01_activations" / "stats.parquet")
    assert len(stats) == 30 * 3 and set(stats["site"]) == {"block_output", "mlp_activation", "attn_output"}
    assert stats.groupby("site")["layer"].apply(sorted).map(lambda v: v == list(range(30))).all()
    for column in ("pooled_var_padded", "elem_var", "sparsity_abs_1e-05_padded", "sparsity_rel_0.01"):
        assert stats[column].notna().all(), column
    block = stats[stats["site"] == "block_output"]
    assert block["cos_mean"].between(-1, 1).all() and (block["hidden"] == 576).all()
    meta = json.loads((smoke_run / "01_activations" / "meta.json").read_text())
    assert meta["model"]["sha256"] and meta["data"]["sha256"] and meta["n_layers"] == 30
    assert meta["data"]["source"] == "local" and meta["n_tokens"] > 0


@pytest.mark.slow
@needs_data
def test_ranking_artifacts(smoke_run):
    scores = pd.read_parquet(smoke_run / "02_avss_ranking" / "avss_scores.parquet")
    assert scores["variant"].iloc[0] == "authors_code" and scores.groupby("variant").size().eq(30).all()
    selections = pd.read_csv(smoke_run / "02_avss_ranking" / "selections.csv")
    fixed = selections[selections["rule"] == "fixed_fraction"]
    assert (fixed["n_pruned"] == 8).all()  # round(0.25 * 30) = 8 (7.5 rounds half up)


@pytest.mark.slow
@needs_data
def test_unchanged_notebooks_are_reused(smoke_run):
    assert [r.status for r in run_pipeline("smoke", run_dir=smoke_run)] == ["reused"] * len(load_profile("smoke")["notebooks"])


@pytest.mark.slow
@needs_data
def test_book_builds_and_renders_in_a_browser(smoke_run, tmp_path):
    html = build_book(smoke_run, tmp_path)
    for page in ("book/intro.html", "executed/01_activations.html", "executed/02_avss_ranking.html"):
        assert (html / page).is_file(), page
    assert len(list((html / "_images").glob("*.png"))) >= 3
    text = (html / "executed" / "02_avss_ranking.html").read_text()
    assert "Traceback" not in text and "activation entries per layer" in text
    if shutil.which("chromium") is None and not (Path("/usr/bin/chromium").exists()):
        pytest.skip("chromium is not installed (scripts/install_browser.sh installs it)")
    from avss_lib.browser_check import check_book

    problems = check_book(html, screenshot_page="executed/02_avss_ranking.html", screenshot_path=tmp_path / "shot.png")
    assert problems == []
    assert (tmp_path / "shot.png").stat().st_size > 10_000


def test_profile_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        load_profile("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("notebooks:\n  07_nothing: {}\n")
    with pytest.raises(ConfigError, match="unknown notebook"):
        load_profile(bad)
    bad.write_text("notebooks:\n  01_activations:\n    n_sample: 3\n")
    with pytest.raises(ConfigError, match="has no parameter.*n_sample"):
        notebook_parameters(load_profile(bad), "01_activations", tmp_path)


def test_cli_errors_are_one_line_and_nonzero(capsys):
    assert cli.main(["run", "--profile", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("avss: error: unknown profile") and "\n" not in err
    assert cli.main(["run", "--profile", "smoke", "--only", "09", "--run-dir", "/tmp/avss-cli-test"]) == 2
    assert "unknown notebook '09'" in capsys.readouterr().err


def test_cli_help_lists_parameters():
    out = subprocess.run([sys.executable, "-m", "avss_lib.cli", "run", "--help"], capture_output=True, text=True).stdout
    for option in ("--profile", "--params", "--only", "--force", "--set"):
        assert option in out


def test_every_notebook_is_registered_and_exists():
    from avss_lib.pipeline import NOTEBOOK_DIR, NOTEBOOKS

    assert sorted(NOTEBOOKS) == sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb"))
    for notebook, upstream in NOTEBOOKS.items():
        assert all(list(NOTEBOOKS).index(u) < list(NOTEBOOKS).index(notebook) for u in upstream)
