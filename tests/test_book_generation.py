"""Generated chapters: the claims verdict table and the reproducibility appendix, checked as data."""

from __future__ import annotations

import pytest

from avss_lib.book.claims import collect_verdicts, untested_claims, verdict_table
from avss_lib.book.reproducibility import appendix_markdown, data_files, notebook_runs
from avss_lib.core import artifacts
from avss_lib.core.errors import DataError
from avss_lib.core.io import write_json
from avss_lib.core.verdicts import Condition, Verdict, from_records, to_records

A1 = Verdict("A1", "authors' AVSS", "does not hold", "holds when ...",
             (Condition("retention_low >= 90", False, 71.0, 90.0, 65.0, 77.0, "sciq"),), summary="71% [65, 77] on sciq",
             numbers={"retention": 71.0, "low": float("nan")})


def test_verdicts_round_trip_as_data(tmp_path):
    artifacts.VERDICT_03.write(to_records([A1]), tmp_path)
    (stage, back), = collect_verdicts(tmp_path)
    assert stage == "03_pruning" and back.outcome == "does not hold"
    assert back.condition("retention_low >= 90", "sciq").value == 71.0 and back.numbers["low"] is None  # NaN -> None
    table = verdict_table([(stage, back)])
    assert table.loc[0, ["claim", "ours", "verdict", "chapter"]].tolist() == [
        "A1", "71% [65, 77] on sciq", "**does not hold**", "03_pruning"]
    assert untested_claims([(stage, back)]) == ["E1", "E2"]


def test_the_primary_verdict_comes_first_and_exploratory_ones_are_labelled():
    explore = Verdict("A1", "avss:authors_code", "undefined", "rule", analysis="exploratory")
    e1 = Verdict("E1", "pooled", "inconclusive", "rule")
    table = verdict_table([("04_hallucination_layers", e1), ("03_pruning", explore), ("03_pruning", A1)])
    assert table[["claim", "subject", "analysis", "verdict"]].values.tolist() == [
        ["A1", "authors' AVSS", "primary", "**does not hold**"],
        ["A1", "avss:authors_code", "exploratory", "undefined"],
        ["E1", "pooled", "primary", "**inconclusive**"]]
    assert from_records(to_records([explore])) == [explore]


def test_bad_verdicts_are_refused():
    with pytest.raises(DataError, match="unknown analysis 'post hoc'"):
        Verdict("A1", "x", "holds", "rule", analysis="post hoc")
    with pytest.raises(DataError, match="unknown outcome 'maybe'"):
        Verdict("A1", "x", "maybe", "rule")
    with pytest.raises(DataError, match="unknown claim 'Z9'"):
        Verdict("Z9", "x", "holds", "rule")
    with pytest.raises(DataError, match="malformed"):
        from_records([{"claim": "E1"}])
    with pytest.raises(DataError, match="no condition 'nope'"):
        A1.condition("nope")


def test_appendix_lists_runs_files_and_parameters(tmp_path):
    write_json({"fingerprint": "x", "parameters": {"seed": 42, "n_samples": 8}, "seconds": 12.34,
                "peak_rss_mib": 1500.2, "finished": "2026-11-22T23:00:00"}, artifacts.done_record(tmp_path, "01_activations"))
    artifacts.PROVENANCE_01.write({"model": {"spec": "m", "kind": "gguf", "location": "/x/m.gguf", "sha256": "abc"}},
                                  tmp_path)
    # the loaders' own shape: files relative to the data root, sha256 keyed by file
    artifacts.CALIBRATION.write({"files": ["wikitext2/test.txt"], "sha256": {"wikitext2/test.txt": "def"},
                                 "source": "local", "benchmark": "wikitext2", "split": "test", "rows": 4358}, tmp_path)
    runs = notebook_runs(tmp_path)
    assert runs.loc[0, ["notebook", "wall time (s)", "peak RSS (MiB)"]].tolist() == ["01_activations", 12.3, 1500]
    files = data_files(tmp_path)
    assert files.to_dict(orient="records") == [{"file": "test.txt", "benchmark": "wikitext2", "split": "test",
                                                "source": "local", "sha256": "`def`", "rows": 4358}]
    text = appendix_markdown(tmp_path)
    assert "`abc`" in text.split("## Model")[1].split("##")[0]  # the model's hash is in the model section


def test_appendix_tolerates_runs_without_memory_record(tmp_path):
    write_json({"fingerprint": "x", "parameters": {}, "seconds": 1.0, "finished": "t"},
               artifacts.done_record(tmp_path, "02_avss_ranking"))
    assert notebook_runs(tmp_path).loc[0, "peak RSS (MiB)"] == "not recorded"


def test_parity_section_shows_the_committed_record_or_how_to_make_it(tmp_path):
    from avss_lib.book.reproducibility import parity_section

    assert parity_section(tmp_path / "absent.json")[1].startswith("No parity record is committed")
    record = {"date": "2026-12-04T18:40:00+00:00", "commit": "0123456789abcdef", "n": 100, "all_agree": False,
              "machine": {"platform": "Linux", "cpus": 2, "device": "cpu"}, "versions": {"lm_eval": "0.4.13"},
              "table": [{"task": "sciq", "metric": "acc", "n": 100, "lm_eval": 74.0, "ours": 74.0, "abs_diff": 0.0,
                         "same_per_example": 1.0, "max_loglik_gap": 3.4e-5, "agrees": True},
                        {"task": "sst2", "metric": "acc", "n": 100, "lm_eval": 70.0, "ours": 69.0, "abs_diff": 1.0,
                         "same_per_example": 0.99, "max_loglik_gap": 2e-3, "agrees": False}]}
    path = tmp_path / "lm_eval_parity.json"
    write_json(record, path)
    heading, prose, table = parity_section(path)
    assert "first 100 examples" in prose and "**some rows disagree**" in prose and "`0123456789`" in prose
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    assert [[c.strip() for c in r][:2] for r in rows] == [["sciq", "acc"], ["sst2", "acc"]]
    assert [r[7].strip() for r in rows] == ["3.4e-05", "0.002"]  # the largest log-likelihood gaps
