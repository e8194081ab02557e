"""The smoke pipeline on the real bundled model: artifacts, reuse, the built book, the browser check, the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from avss_lib.book import cli
from avss_lib.core.errors import ConfigError
from avss_lib.book.pipeline import REPO_ROOT, build_book, load_profile, notebook_parameters, run_pipeline

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


def _verdicts(run_dir: Path, notebook: str, claim: str) -> list[dict]:
    rows = json.loads((run_dir / notebook / "verdict.json").read_text())
    assert rows and {r["claim"] for r in rows} == {claim}
    assert all(r["verdict"] in ("holds", "does not hold", "inconclusive") and r["ours"] for r in rows)
    return rows


@pytest.mark.slow
@needs_data
def test_pruning_artifacts(smoke_run):
    out = smoke_run / "03_pruning"
    retention = pd.read_csv(out / "retention.csv")
    tasks = {"nq_open", "triviaqa", "sciq", "truthfulqa_mc", "truthfulqa_gen", "wikiqa", "sst2", "wikitext2"}
    assert set(retention["task_key"]) == tasks
    methods = set(retention["method"])
    assert {"unpruned", "avss:authors_code", "random", "last_k", "block_influence", "angular_distance",
            "delta_ppl"} <= methods
    base = retention[retention["method"] == "unpruned"]
    assert (base["retention"] == 100).all() and (base["low"] <= base["value"]).all()
    assert (base["value"] <= base["high"]).all()
    plan = pd.read_csv(out / "pruned_sets.csv")
    assert (plan[plan["ratio"] == 0.25]["k"] == 8).all()
    comparison = pd.read_csv(out / "comparison.csv")
    assert {"random", "last_k"} <= set(comparison["baseline"]) and (comparison["low"] <= comparison["high"]).all()
    speed = json.loads((out / "speed.json").read_text())
    assert speed["n_removed"] == 8 and speed["seconds_pruned"] > 0
    precision = pd.read_csv(out / "precision.csv")  # the smoke profile evaluates in bfloat16
    assert set(precision["dtype"]) == {"bfloat16"} and precision["value_float32"].notna().all()
    assert len(list((out / "_sets").glob("*.pkl"))) == json.loads((out / "meta.json").read_text())["unique_sets"]
    _verdicts(smoke_run, "03_pruning", "A1")


@pytest.mark.slow
@needs_data
def test_hallucination_artifacts(smoke_run):
    out = smoke_run / "04_hallucination_layers"
    answers = pd.read_parquet(out / "answers.parquet")
    datasets = {"nq_open", "triviaqa", "sciq", "truthfulqa_mc", "wikiqa"}
    assert set(answers["dataset"]) == datasets and answers["confidence"].between(0, 1).all()
    assert {"correct_exact_match", "correct_alias_containment"} <= set(answers.columns)
    scores = pd.read_parquet(out / "eavss_scores.parquet")
    assert {"hsav", "hss", "eavss", "probe_auroc", "p_value"} <= set(scores.columns)
    layers = json.loads((out / "eavss_layers.json").read_text())
    assert len(layers["pooled"]) == layers["k"] or layers["excluded"]
    _verdicts(smoke_run, "04_hallucination_layers", "E1")


@pytest.mark.slow
@needs_data
def test_mitigation_artifacts(smoke_run):
    out = smoke_run / "05_mitigation"
    split = pd.read_parquet(out / "split.parquet")
    assert set(split["split"]) == {"train", "eval"}
    arms = pd.read_csv(out / "arms.csv")
    assert {"base", "eavss", "random", "lowest_avss", "all", "lm_only"} == set(arms["arm"])
    metrics = pd.read_csv(out / "arm_metrics.csv")
    assert {"accuracy", "hallucination_rate", "ece"} <= set(metrics["metric"])
    assert len(pd.read_csv(out / "comparisons.csv")) > 0
    assert json.loads((out / "meta.json").read_text())["settings"]["eval_dtype"] == "bfloat16"
    _verdicts(smoke_run, "05_mitigation", "E2")


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
    from avss_lib.testing.browser_check import check_book

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
    assert {"avss_lib.pruning.study", "avss_lib.pruning.report", "avss_lib.core.models"} <= pruning  # the notebook's
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
