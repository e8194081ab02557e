"""Generated chapters: the claims verdict table and the reproducibility appendix."""

from __future__ import annotations

import json

import pytest

from avss_lib.book.claims import claims_markdown, collect_verdicts, write_verdicts
from avss_lib.core.io import write_json
from avss_lib.book.reproducibility import appendix_markdown, data_files, notebook_runs


def test_claims_table_from_verdict_files(tmp_path):
    write_verdicts([{"claim": "A1", "paper": "> 90% retained", "ours": "71% [65, 77]", "verdict": "does not hold",
                     "detail": "SciQ acc 0.42 vs 0.59"}], tmp_path / "03_pruning" / "verdict.json")
    verdicts = collect_verdicts(tmp_path)
    assert verdicts.loc[0, "notebook"] == "03_pruning" and verdicts.loc[0, "verdict"] == "does not hold"
    text = claims_markdown(tmp_path)
    assert "| A1 " in text and "**does not hold**" in text and "71% [65, 77]" in text
    assert "Not tested in this build: E1" in text


def test_bad_verdict_rows_are_refused(tmp_path):
    with pytest.raises(ValueError, match="verdict in"):
        write_verdicts([{"claim": "A1", "paper": "", "ours": "", "verdict": "maybe", "detail": ""}], tmp_path / "v.json")
    with pytest.raises(ValueError, match="missing"):
        write_verdicts([{"claim": "E1", "verdict": "holds"}], tmp_path / "v.json")


def test_appendix_lists_runs_files_and_parameters(tmp_path):
    write_json({"fingerprint": "x", "parameters": {"seed": 42, "n_samples": 8}, "seconds": 12.34,
                "peak_rss_mib": 1500.2, "finished": "2026-11-22T23:00:00"}, tmp_path / "01_activations" / "_done.json")
    write_json({"model": {"spec": "m", "kind": "gguf", "location": "/x/m.gguf", "sha256": "abc"},
                "data": {"files": ["/d/wikitext2/test.txt"], "sha256": ["def"], "source": "local",
                         "benchmark": "wikitext2", "split": "test", "rows": 4358}},
               tmp_path / "01_activations" / "meta.json")
    assert notebook_runs(tmp_path).loc[0, "wall time (s)"] == 12.3
    files = data_files(tmp_path)
    assert files.loc[0, "file"] == "test.txt" and files.loc[0, "sha256"] == "`def`" and files.loc[0, "rows"] == 4358
    text = appendix_markdown(tmp_path)
    for needle in ("`abc`", "| seed ", "`42`", "1500", "torch", "## Machine"):
        assert needle in text, needle
    json.dumps(text)


def test_appendix_tolerates_runs_without_memory_record(tmp_path):
    write_json({"fingerprint": "x", "parameters": {}, "seconds": 1.0, "finished": "t"}, tmp_path / "02_x" / "_done.json")
    assert notebook_runs(tmp_path).loc[0, "peak RSS (MiB)"] == "not recorded"
