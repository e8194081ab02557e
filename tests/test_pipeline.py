"""The smoke pipeline on the real bundled model: artifacts, reuse, the built book, the browser check, the CLI."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from avss_lib.book import cli
from avss_lib.core import artifacts
from avss_lib.core.artifacts import AVSS_SCORES, write_models
from avss_lib.core.errors import ConfigError
from avss_lib.book.pipeline import build_book, load_profile, notebook_parameters, run_pipeline

from conftest import needs_data


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
    assert "Traceback" not in text
    n_layers = AVSS_SCORES.read(smoke_run)["layer"].nunique()
    pasted = re.findall(r'<span class="pasted-text">([^<]*)</span>', text)
    assert str(n_layers) in pasted  # the chapter's prose shows the run's layer count, glued from its data
    if shutil.which("chromium") is None and not (Path("/usr/bin/chromium").exists()):
        pytest.skip("chromium is not installed (scripts/install_browser.sh installs it)")
    from avss_lib.testing.browser_check import check_book

    problems = check_book(html, screenshot_page="executed/02_avss_ranking.html", screenshot_path=tmp_path / "shot.png")
    assert problems == []
    assert (tmp_path / "shot.png").stat().st_size > 10_000


@pytest.mark.slow
@needs_data
def test_book_of_a_two_model_run_builds_and_renders(smoke_run, tmp_path):
    """Two models' chapters in one book (here the smoke run twice, as two folders) build without clashes."""
    run = tmp_path / "run"
    for folder in ("first", "second"):
        shutil.copytree(smoke_run, run / folder)
    write_models(run, {"first": "smollm2-135m-instruct", "second": "smollm2-135m-instruct"})
    html = build_book(run, tmp_path / "out")
    for folder in ("first", "second"):
        for page in ("01_activations", "05_mitigation", "reproducibility"):
            assert (html / "executed" / folder / f"{page}.html").is_file(), (folder, page)
    assert not (html / "executed" / "01_activations.html").exists() and (html / "claims.html").is_file()
    if shutil.which("chromium") is None and not (Path("/usr/bin/chromium").exists()):
        pytest.skip("chromium is not installed (scripts/install_browser.sh installs it)")
    from avss_lib.testing.browser_check import check_book

    assert check_book(html, screenshot_page=None) == []


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
    out = subprocess.run([sys.executable, "-m", "avss_lib.book.cli", "run", "--help"], capture_output=True, text=True).stdout
    for option in ("--profile", "--params", "--only", "--force", "--set"):
        assert option in out


def test_every_notebook_is_registered_and_exists():
    from avss_lib.book.pipeline import NOTEBOOK_DIR, NOTEBOOKS

    assert sorted(NOTEBOOKS) == sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb"))
    for notebook, upstream in NOTEBOOKS.items():
        assert all(list(NOTEBOOKS).index(u) < list(NOTEBOOKS).index(notebook) for u in upstream)


def test_fingerprint_covers_exactly_the_modules_a_notebook_uses():
    from avss_lib.book.pipeline import library_modules

    def used(notebook: str) -> set[str]:
        root = Path(__file__).resolve().parents[1]
        return {str(m.relative_to(root).with_suffix("")).replace("/", ".") for m in library_modules(notebook)}

    pruning = used("03_pruning")
    assert {"avss_lib.pruning.stage", "avss_lib.pruning.figures", "avss_lib.pruning.display"} <= pruning  # the notebook's
    assert {"avss_lib.ranking.baselines", "avss_lib.core.harness", "avss_lib.core.metrics"} <= pruning  # transitively
    # a change in a later wing or in the book's machinery does not re-run 03
    assert not {m for m in pruning if m.startswith(("avss_lib.mitigation", "avss_lib.hallucination", "avss_lib.book.pipeline"))}
    assert not {m for m in used("01_activations") if m.startswith("avss_lib.pruning")}


def test_profiles_extend_others_key_by_key(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("extends: smoke\ncommon: {seed: 7}\nnotebooks:\n  02_avss_ranking: {ratio: 0.5}\n"
                     "  05_mitigation: null\n")
    smoke, merged = load_profile("smoke"), load_profile(child)
    assert merged["common"] == {**smoke["common"], "seed": 7}
    assert merged["notebooks"]["02_avss_ranking"] == {**smoke["notebooks"]["02_avss_ranking"], "ratio": 0.5}
    assert merged["notebooks"]["01_activations"] == smoke["notebooks"]["01_activations"]
    assert "05_mitigation" not in merged["notebooks"]
    full = load_profile("full")
    assert full["common"]["device"] == "cuda" and full["notebooks"]["05_mitigation"]["seeds"] == [0, 1, 2]
    default = load_profile("default")["notebooks"]
    assert full["notebooks"]["01_activations"] == default["01_activations"]  # not listed in full.yaml: inherited
    assert full["notebooks"]["04_hallucination_layers"] == {**default["04_hallucination_layers"], "batch_size": 64}
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"extends: {loop}\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_profile(loop)


@pytest.mark.slow
@needs_data
def test_changing_one_parameter_of_03_reruns_only_03_and_its_dependents(smoke_run, tmp_path):
    from avss_lib.book import pipeline

    run = tmp_path / "run"  # a copy of the run's records; parameters keep naming the original run folder
    for done in smoke_run.glob("*/_done.json"):
        (run / done.parent.name).mkdir(parents=True)
        shutil.copy2(done, run / done.parent.name / "_done.json")
    profile = load_profile("smoke")
    profile["notebooks"]["03_pruning"]["speed_repeats"] += 1

    def stale() -> set[str]:
        return {nb for nb in profile["notebooks"]
                if pipeline._fingerprint(nb, notebook_parameters(profile, nb, smoke_run), run)
                != json.loads((run / nb / "_done.json").read_text())["fingerprint"]}

    assert stale() == {"03_pruning"}
    done03 = run / "03_pruning" / "_done.json"  # once 03 has re-run, its new fingerprint reaches 06 only
    fresh = pipeline._fingerprint("03_pruning", notebook_parameters(profile, "03_pruning", smoke_run), run)
    done03.write_text(json.dumps({**json.loads(done03.read_text()), "fingerprint": fresh}))
    assert stale() == {"06_performance"}


@pytest.mark.slow
def test_checkpoints_resume_only_the_same_run(tmp_path, monkeypatch):
    """A folder left by an interrupted run with the same fingerprint is kept (to resume); any other is emptied."""
    import nbformat

    from avss_lib.book import pipeline

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell('value = 1\nrun_dir = "x"', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("from pathlib import Path\n"
                                          "(Path(run_dir) / '99_toy' / 'result.txt').write_text(str(value))")]
    nb.metadata.update({"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                        "language_info": {"name": "python"}})
    nbformat.write(nb, notebooks / "99_toy.ipynb")
    monkeypatch.setattr(pipeline, "NOTEBOOK_DIR", notebooks)
    monkeypatch.setattr(pipeline, "NOTEBOOKS", {"99_toy": ()})
    monkeypatch.setattr(artifacts, "STAGES", ("99_toy",))
    run = tmp_path / "run"
    out = run / "99_toy"

    def params(value: int) -> dict:
        return {"value": value, "run_dir": str(run)}

    assert pipeline.run_notebook("99_toy", params(1), run).status == "ran"
    (out / "checkpoint.bin").write_text("of value 1")
    assert pipeline.run_notebook("99_toy", params(1), run).status == "reused"
    (out / "_done.json").unlink()  # as if the run had been interrupted: same fingerprint, so it resumes
    assert pipeline.run_notebook("99_toy", params(1), run).status == "ran"
    assert (out / "checkpoint.bin").is_file() and (out / "_done.json").is_file()
    assert pipeline.run_notebook("99_toy", params(2), run).status == "ran"  # other parameters: start afresh
    assert not (out / "checkpoint.bin").exists() and (out / "result.txt").read_text() == "2"
    (out / "checkpoint.bin").write_text("of value 2")
    pipeline.run_notebook("99_toy", params(2), run, force=True)
    assert not (out / "checkpoint.bin").exists()
    # a self-keyed folder (its files name what they depend on) survives a change of parameters or code, not --force
    monkeypatch.setitem(pipeline.SELF_KEYED, "99_toy", ("_keyed",))
    (out / "_keyed").mkdir()
    (out / "_keyed" / "set-abc123.pkl").write_text("keyed")
    (out / "checkpoint.bin").write_text("of value 2")
    assert pipeline.run_notebook("99_toy", params(3), run).status == "ran"
    assert (out / "_keyed" / "set-abc123.pkl").is_file() and not (out / "checkpoint.bin").exists()
    pipeline.run_notebook("99_toy", params(3), run, force=True)
    assert not (out / "_keyed").exists()
