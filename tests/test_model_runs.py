"""Runs covering several models: run folders, the models list, the book's parts and the per-model claims table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from avss_lib.book import cli
from avss_lib.book.claims import agreement, models_claims_markdown, models_verdict_table
from avss_lib.book.model_comparison import (FIGURE, UNINFORMATIVE, avss_profiles, comparison_markdown,
                                            eavss_layers_side_by_side, mitigation_side_by_side, removed_layers,
                                            retention_side_by_side)
from avss_lib.book.model_runs import model_folder, model_folders, models_toc, run_models
from avss_lib.book.pipeline import REPO_ROOT, load_profile
from avss_lib.core.artifacts import (AVSS_SCORES, E2_PRIMARY, EAVSS_LAYERS, MODELS, PRUNED_SETS, RETENTION, done_record,
                                     read_models, verdict)
from avss_lib.core.io import write_json
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.verdicts import Condition, Verdict, to_records


def test_model_folders_are_safe_names_and_never_shared(tmp_path):
    assert model_folder("smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert model_folder("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB--SmolLM2-360M-Instruct"
    assert model_folder("/models/gemma-3-270m-q4_k_m.gguf") == "gemma-3-270m-q4_k_m"
    checkpoint = tmp_path / "my checkpoint"
    checkpoint.mkdir()
    assert model_folder(str(checkpoint)) == "my-checkpoint"
    assert model_folders(["gemma3-270m", "smollm2-135m-instruct"]) == {
        "gemma3-270m": "gemma3-270m", "smollm2-135m-instruct": "smollm2-135m-instruct"}
    with pytest.raises(ConfigError, match="would share the run folder 'gemma3-270m'"):
        model_folders(["gemma3-270m", "gemma3-270m"])
    with pytest.raises(ConfigError, match="at least one model"):
        model_folders([])


def test_run_models_runs_each_model_into_its_folder_and_records_the_list(tmp_path):
    calls = []
    results = run_models(lambda **kw: calls.append(kw) or [len(calls)], ["smollm2-135m-instruct", "org/model"],
                         tmp_path, {"seed": 7}, profile="smoke", force=True)
    assert calls == [
        {"run_dir": tmp_path / "smollm2-135m-instruct", "overrides": {"seed": 7, "model": "smollm2-135m-instruct"},
         "profile": "smoke", "force": True},
        {"run_dir": tmp_path / "org--model", "overrides": {"seed": 7, "model": "org/model"}, "profile": "smoke",
         "force": True}]
    assert results == {"smollm2-135m-instruct": [1], "org/model": [2]}
    assert read_models(tmp_path) == {"smollm2-135m-instruct": "smollm2-135m-instruct", "org--model": "org/model"}
    assert read_models(tmp_path / "smollm2-135m-instruct") is None  # each model's own folder is a one-model run
    (tmp_path / MODELS).write_text('{"models": [{"spec": "x"}]}')
    with pytest.raises(DataError, match="damaged"):
        read_models(tmp_path)


def test_book_of_two_models_has_the_study_a_part_per_model_and_the_verdicts():
    toc = yaml.safe_load((REPO_ROOT / "_toc.yml").read_text())
    pages = {"book/method", "models_compared", "claims", "book/limitations"} | {
        f"executed/{m}/{p}" for m in ("a", "b") for p in ("01_activations", "02_avss_ranking", "reproducibility")}
    pages.add("executed/a/03_pruning")  # model b has not run chapter 03
    assert models_toc(toc, ["a", "b"], pages.__contains__) == {
        "format": "jb-book", "root": "book/intro", "parts": [
            {"caption": "The study", "chapters": [{"file": "book/method"}]},
            {"caption": "a", "chapters": [{"file": f"executed/a/{p}"} for p in
                                          ("01_activations", "02_avss_ranking", "03_pruning", "reproducibility")]},
            {"caption": "b", "chapters": [{"file": f"executed/b/{p}"} for p in
                                          ("01_activations", "02_avss_ranking", "reproducibility")]},
            {"caption": "Verdicts", "chapters": [{"file": "models_compared"}, {"file": "claims"},
                                                 {"file": "book/limitations"}]}]}


def test_agreement_of_primary_verdicts():
    assert agreement({"a": "does not hold", "b": "does not hold"}) == "the models agree: does not hold"
    assert agreement({"a": "holds", "b": "inconclusive"}) == "the models disagree: a: holds; b: inconclusive"
    assert agreement({"a": "holds", "b": None}) == "tested only on a"
    assert agreement({"a": None, "b": None}) == "not tested"
    assert agreement({"a": "holds"}) == "one model"


def _verdict(claim: str, outcome: str, analysis: str = "primary") -> Verdict:
    return Verdict(claim=claim, subject="s", outcome=outcome, rule="r", summary=f"{claim} {outcome}",
                   conditions=(Condition("c", outcome == "holds", 1.0, 0.5),), analysis=analysis)


def test_claims_of_two_models_give_one_primary_verdict_per_claim_per_model(tmp_path):
    verdict("03_pruning").write(to_records([_verdict("A1", "does not hold"), _verdict("A1", "holds", "exploratory")]),
                                tmp_path / "a")
    verdict("04_hallucination_layers").write(to_records([_verdict("E1", "holds")]), tmp_path / "a")
    verdict("03_pruning").write(to_records([_verdict("A1", "does not hold")]), tmp_path / "b")
    verdict("04_hallucination_layers").write(to_records([_verdict("E1", "inconclusive")]), tmp_path / "b")
    runs = {"a": tmp_path / "a", "b": tmp_path / "b"}
    table = models_verdict_table(runs).set_index("claim")
    assert table.loc["A1", "a"] == "**does not hold**: A1 does not hold"  # the exploratory row is not the verdict
    assert table.loc["A1", "agreement"] == "the models agree: does not hold"
    assert table.loc["E1", "agreement"] == "the models disagree: a: holds; b: inconclusive"
    assert table.loc["E2", "a"] == "—" and table.loc["E2", "agreement"] == "not tested"
    headings = [line for line in models_claims_markdown(runs).splitlines() if line.startswith("#")]
    assert headings == ["# Claims: verdicts", "## a", "### Rules and conditions", "#### A1: s (primary, 03_pruning)",
                        "#### A1: s (exploratory, 03_pruning)", "#### E1: s (primary, 04_hallucination_layers)",
                        "## b", "### Rules and conditions", "#### A1: s (primary, 03_pruning)",
                        "#### E1: s (primary, 04_hallucination_layers)"]


def test_profiles_name_their_models_and_inherit_them(tmp_path):
    assert load_profile("default")["models"] is None
    assert load_profile("two_models")["models"] == ["smollm2-135m-instruct", "gemma3-270m"]
    assert load_profile("two_models")["notebooks"] == load_profile("default")["notebooks"]
    child = tmp_path / "child.yaml"
    child.write_text("extends: two_models\ncommon: {seed: 1}\n")
    assert load_profile(child)["models"] == ["smollm2-135m-instruct", "gemma3-270m"]
    child.write_text("extends: two_models\nmodels: gemma3-270m\n")
    with pytest.raises(ConfigError, match="'models' is a list"):
        load_profile(child)


def test_cli_models_option_runs_each_model_and_builds_one_book(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "run_models", lambda run, models, run_dir, overrides, **kw: seen.update(
        models=models, run_dir=run_dir, overrides=overrides, **kw))
    monkeypatch.setattr(cli, "run_pipeline", lambda *a, **kw: seen.update(single=kw["overrides"]))
    monkeypatch.setattr(cli, "build_book", lambda run_dir: seen.update(book=run_dir) or Path(run_dir))
    assert cli.main(["run", "--profile", "smoke", "--models", "a", "b", "--run-dir", str(tmp_path),
                     "--set", "seed=3"]) == 0
    assert seen == {"models": ["a", "b"], "run_dir": tmp_path, "overrides": {"seed": 3}, "profile": "smoke",
                    "only": None, "force": False, "book": tmp_path}
    seen.clear()
    assert cli.main(["run", "--profile", "two_models", "--model", "gemma3-270m", "--run-dir", str(tmp_path)]) == 0
    assert seen == {"single": {"model": "gemma3-270m"}, "book": tmp_path}  # --model: just that one model
    seen.clear()
    assert cli.main(["run", "--profile", "two_models", "--run-dir", str(tmp_path), "--no-book"]) == 0
    assert seen["models"] == ["smollm2-135m-instruct", "gemma3-270m"] and "book" not in seen
    with pytest.raises(SystemExit):
        cli.main(["run", "--model", "a", "--models", "b"])


def _comparison_run(run, n_layers: int, informative: bool) -> None:
    layers = list(range(n_layers))
    AVSS_SCORES.write(pd.DataFrame({"variant": "block_rel", "layer": layers, "variance": 1.0, "sparsity": 0.5,
                                    "avss": [float(i + 1) for i in layers],
                                    "avss_norm": [(i + 1) / sum(range(1, n_layers + 1)) for i in layers],
                                    "undefined": False, "rank": layers}), run)
    write_json({"parameters": {"primary_variant": "block_rel", "ratio": 0.25}}, done_record(run, "03_pruning"))
    PRUNED_SETS.write(pd.DataFrame({"method": ["avss:block_rel", "random:0"], "family": ["avss", "random"],
                                    "ratio": 0.25, "k": 1, "fraction_removed": 0.25, "arbitrary": False,
                                    "set_id": ["a", "b"], "layers": [[0], [2]]}), run)
    RETENTION.write(pd.DataFrame({
        "method": ["unpruned", "avss:block_rel"], "task_key": "sciq", "task": "sciq", "metric": "acc",
        "value": [0.8, 0.6], "low": 0.5, "high": 0.9, "retention": [100.0, 75.0], "retention_low": 60.0,
        "retention_high": 90.0, "chance": 0.25, "chance_corrected": [100.0, 63.6], "chance_corrected_low": 40.0,
        "chance_corrected_high": 85.25, "informative": informative}), run)
    EAVSS_LAYERS.write({"pooled": [3, 1], "lowest_avss": [0], "site": "block_output", "position": "question_last"}, run)
    E2_PRIMARY.write(pd.DataFrame({
        "metric": ["accuracy", "accuracy", "ece"], "other": ["base", "random", "base"], "value": [40.0, 40.0, 20.0],
        "value_low": 30.0, "value_high": 50.0, "other_value": [35.0, 38.0, 25.0], "other_low": 25.0,
        "other_high": 45.0, "diff": [5.0, 2.0, -5.0], "low": [1.0, -2.0, -9.0], "high": [9.0, 6.0, -1.0],
        "rel_change": [14.3, 5.3, -20.0], "se": 2.0, "mde": [12.0, 14.0, 6.0], "n": 100}), run)


def test_comparison_page_puts_the_models_side_by_side_at_relative_depth(tmp_path):
    _comparison_run(tmp_path / "a", 4, True)
    _comparison_run(tmp_path / "b", 8, False)
    runs = {"a": tmp_path / "a", "b": tmp_path / "b"}
    profiles = avss_profiles(runs)
    last = profiles.groupby("model").tail(1).set_index("model")
    assert last["relative depth"].to_dict() == {"a": 1.0, "b": 1.0}
    assert last["AVSS (÷ max)"].to_dict() == {"a": 1.0, "b": 1.0}
    assert profiles.set_index(["model", "layer"]).loc[("a", 1), "AVSS (÷ max)"] == pytest.approx(0.5)
    assert removed_layers(runs).to_dict("records") == [{"method": "avss:block_rel", "a": "0 (of 4)", "b": "0 (of 8)"}]
    assert retention_side_by_side(runs).to_dict("records") == [
        {"method": "avss:block_rel", "task": "sciq", "a": "63.6 [40.0, 85.2]", "b": UNINFORMATIVE}]
    assert eavss_layers_side_by_side(runs)["EAVSS layers (pooled)"].tolist() == ["1, 3 (of 4)", "1, 3 (of 8)"]
    mitigation = mitigation_side_by_side(runs).set_index(["model", "metric"])
    assert mitigation.loc[("a", "accuracy")].to_dict() == {
        "EAVSS arm": "40.0 [30.0, 50.0]", "untouched": "35.0 [25.0, 45.0]", "EAVSS − untouched": "+5.0 [+1.0, +9.0]",
        "MDE vs untouched": "12.0", "random layers": "38.0 [25.0, 45.0]", "EAVSS − random layers": "+2.0 [-2.0, +6.0]",
        "MDE vs random layers": "14.0"}
    assert mitigation.loc[("b", "ece"), "EAVSS − untouched"] == "-5.0 [-9.0, -1.0]"
    assert pd.isna(mitigation.loc[("b", "ece"), "random layers"])  # no random arm for ECE in this run
    page = comparison_markdown(runs, tmp_path)
    assert "## Mitigation, pooled over the data sets (%)" in page and "+5.0 [+1.0, +9.0]" in page
    assert (tmp_path / FIGURE).stat().st_size > 5_000
