"""The hallucination-layer stage's artifacts in the smoke run (see conftest.smoke_run), checked against each other."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pandas as pd
import pytest

from avss_lib.book.pipeline import load_profile
from avss_lib.core import artifacts as art
from avss_lib.core.splits import EVALUATION, SELECTION, side_ids
from avss_lib.hallucination.answers import DATASETS, hallucination_labels
from avss_lib.hallucination.eavss import EavssConfig, eavss_table
from avss_lib.hallucination.group_stats import SmallClassWarning
from avss_lib.hallucination.layer_rankings import top_k_layers
from avss_lib.hallucination.verdict import e1_level, e1_verdicts
from conftest import needs_data, stage_verdicts

STAGE = "04_hallucination_layers"


def _params() -> dict:
    return load_profile("smoke")["notebooks"][STAGE]


@pytest.mark.slow
@needs_data
def test_answers_and_provenance(smoke_run):
    answers = art.ANSWERS.read(smoke_run)
    params = _params()
    assert list(dict.fromkeys(answers["dataset"])) == list(params["datasets"]) == list(DATASETS)
    assert (answers.groupby("dataset", sort=False).size() <= params["n"]).all()
    assert (answers["correct"] == answers[f"correct_{params['label_convention']}"]).all()
    provenance = art.PROVENANCE_04.read(smoke_run)
    assert provenance["model"]["spec"] == load_profile("smoke")["common"]["model"]
    assert set(provenance["answer_settings"]) == set(DATASETS) == set(provenance["example_stats"])
    for name, settings in provenance["answer_settings"].items():
        rows = int((answers["dataset"] == name).sum())
        assert settings["benchmark"]["n"] == rows and settings["benchmark"]["files"] and settings["benchmark"]["sha256"]
    always = {"load_model", "answers", "example_stats", "analysis", "secondary_example_stats", "secondary_analysis",
              "other_convention_analysis"}
    assert always <= set(provenance["timings_s"]) <= always | {"causal_check"}
    assert ("causal_check" in provenance["timings_s"]) == art.CAUSAL_CHECK.exists(smoke_run)


@pytest.mark.slow
@needs_data
def test_scores_recompute_from_the_example_statistics(smoke_run):
    """EAVSS_SCORES equal EAVSS recomputed from EXAMPLE_STATS and the ANSWERS labels (definition of eavss.py)."""
    params = _params()
    answers, stats, scores = (a.read(smoke_run) for a in (art.ANSWERS, art.EXAMPLE_STATS, art.EAVSS_SCORES))
    config = EavssConfig(variance=params.get("variance", "pooled_var_masked"),
                         sparsity=params.get("sparsity", "sparsity_rel_0.01"), min_class=params["min_class"])
    for name in DATASETS:
        rows = stats[(stats["dataset"] == name) & (stats["site"] == params["site"])].drop(columns="dataset")
        labels = hallucination_labels(answers, name).loc[list(dict.fromkeys(rows["example_id"]))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SmallClassWarning)
            expected = eavss_table(rows, labels, config).table.droplevel("site")
        got = scores[scores["dataset"] == name].set_index("layer")
        pd.testing.assert_frame_equal(got[["hsav", "hss", "eavss", "score", "rank"]], expected, check_names=False)
        finite = got["score"].notna()
        np.testing.assert_allclose(got.loc[finite, "eavss"], got.loc[finite, "hsav"] - got.loc[finite, "hss"])
        np.testing.assert_allclose(got.loc[finite, "score"], got.loc[finite, "eavss"].abs())


@pytest.mark.slow
@needs_data
def test_layers_follow_the_scores_and_notebook_02(smoke_run):
    params = _params()
    layers = art.EAVSS_LAYERS.read(smoke_run)
    scores, summary = art.EAVSS_SCORES.read(smoke_run), art.E1_SUMMARY.read(smoke_run).set_index("dataset")
    assert set(layers) == {"k", "site", "position", "label_convention", "per_dataset", "pooled", "excluded",
                           "lowest_avss", "avss_variant", "avss_rule"}
    assert layers["k"] == params["k"] and layers["site"] == params["site"]
    for name, top in layers["per_dataset"].items():
        score = scores[scores["dataset"] == name].set_index("layer")["score"]
        assert top == (top_k_layers(score, params["k"]) if score.notna().all() else [])
        assert summary.loc[name, "top_k"] == top
    assert layers["excluded"] == [name for name in DATASETS if not summary.loc[name, "usable"]]
    usable = [name for name in DATASETS if name not in layers["excluded"]]
    if usable:
        ranks = pd.DataFrame({n: scores[scores["dataset"] == n].set_index("layer")["score"].rank(ascending=False)
                              for n in usable})
        assert layers["pooled"] == top_k_layers(-ranks.mean(axis=1), params["k"])
    else:
        assert layers["pooled"] == []
    selections = art.SELECTIONS.read(smoke_run)
    chosen = selections[(selections["variant"] == layers["avss_variant"]) & (selections["rule"] == layers["avss_rule"])]
    assert layers["lowest_avss"] == chosen["layers"].iloc[0]  # fixed_fraction: the k lowest pruning ranks


@pytest.mark.slow
@needs_data
def test_verdict_conditions_are_the_summary_numbers(smoke_run):
    verdict, exploratory, other_labels = stage_verdicts(smoke_run, STAGE, "E1")
    assert other_labels.analysis == "exploratory" and other_labels.subject.endswith("alias_containment labels")
    conventions = art.E1_CONVENTIONS.read(smoke_run)
    assert set(conventions["convention"]) == {"exact_match", "alias_containment"}
    assert set(conventions["dataset"]) == {"nq_open", "triviaqa"}
    params = _params()
    assert (verdict.analysis, exploratory.analysis) == ("primary", "exploratory")
    assert params["position"] in verdict.subject and params["secondary_position"] in exploratory.subject
    secondary = art.E1_SECONDARY.read(smoke_run).set_index("dataset")
    assert (secondary["position"] == params["secondary_position"]).all()
    recomputed = e1_verdicts(secondary.drop(columns="position"), min_class=params["min_class"], site=params["site"],
                             position=params["secondary_position"])[0]
    assert (exploratory.outcome, exploratory.conditions) == (recomputed.outcome, recomputed.conditions)
    summary = art.E1_SUMMARY.read(smoke_run).set_index("dataset")
    scores = art.EAVSS_SCORES.read(smoke_run)
    passed, signalled = [], []
    for name, row in summary.iterrows():
        assert verdict.condition("usable", name).met == bool(row["usable"])
        if not row["usable"]:
            assert not [c for c in verdict.conditions if c.group == name and c.name != "usable"]
            continue
        signal, stable, valid = (verdict.condition(c, name) for c in ("signal", "stable", "valid"))
        assert signal.value == pytest.approx(scores.loc[scores["dataset"] == name, "p_value_max"].min())
        assert signal.met == (signal.value < signal.threshold)
        assert stable.value == pytest.approx(row["split_half_rho_median"])
        assert stable.met == (stable.value >= stable.threshold)
        assert valid.met == (valid.value is not None and valid.value >= valid.threshold)
        passed.append(signal.met and stable.met and valid.met)
        signalled.append(signal.met)
    level = ("not testable" if not passed else "supported" if sum(passed) > len(passed) / 2
             else "partly supported" if any(signalled) else "not supported")
    assert e1_level(verdict) == level
    assert verdict.numbers["n_pass_all"] == sum(passed) and verdict.numbers["n_usable"] == len(passed)


@pytest.mark.slow
@needs_data
def test_every_glue_key_of_the_chapter_is_glued(smoke_run):
    """The book is built with warnings as errors: every key the markdown pastes must be glued by the run."""
    notebook = json.loads((smoke_run / "executed" / f"{STAGE}.ipynb").read_text())
    markdown = "\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "markdown")
    used = set(re.findall(r"\{glue:(?:text|md)\}`([A-Za-z0-9_]+)", markdown))
    used |= set(re.findall(r"```\{glue:md\} ([A-Za-z0-9_]+)", markdown))
    glued = {o["metadata"]["scrapbook"]["name"] for c in notebook["cells"] if c["cell_type"] == "code"
             for o in c.get("outputs", []) if "scrapbook" in o.get("metadata", {})}
    assert used and used <= glued, sorted(used - glued)


@pytest.mark.slow
@needs_data
def test_layers_are_chosen_on_the_selection_half_only(smoke_run):
    """The split covers every answer once; the statistics that chose the layers hold selection-half examples only."""
    answers, split, stats = (a.read(smoke_run) for a in (art.ANSWERS, art.QUESTION_SPLIT, art.EXAMPLE_STATS))
    assert sorted(zip(split["dataset"], split["id"].astype(str))) == sorted(zip(answers["dataset"],
                                                                                  answers["id"].astype(str)))
    for name in DATASETS:
        selection = set(side_ids(split, name, SELECTION))
        assert selection and set(side_ids(split, name, EVALUATION))
        measured = set(stats.loc[stats["dataset"] == name, "example_id"].astype(str))
        assert measured and measured <= selection


@pytest.mark.slow
@needs_data
def test_the_causal_check_asks_evaluation_half_questions_only(smoke_run):
    if not art.CAUSAL_CHECK.exists(smoke_run):
        assert not art.EAVSS_LAYERS.read(smoke_run)["pooled"]  # skipped only without a pooled ranking
        return
    split, removed = art.QUESTION_SPLIT.read(smoke_run), art.CAUSAL_ANSWERS.read(smoke_run)
    for name, part in removed.groupby("dataset"):
        assert set(part["id"].astype(str)) <= set(side_ids(split, name, EVALUATION))
    table = art.CAUSAL_CHECK.read(smoke_run).set_index("set")
    assert {"untouched", "top-k EAVSS", "bottom-k EAVSS", "k random"} == set(table.index)
    pooled = art.EAVSS_LAYERS.read(smoke_run)["pooled"]
    assert set(removed.loc[removed["set"] == "top-k EAVSS", "layers"].iloc[0]) == set(pooled)
