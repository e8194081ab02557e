"""Parity with lm-evaluation-harness: the conversions of the local files, the comparison on hand-made records, and
both harnesses run on the same 20 examples per task with the bundled model."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from avss_lib.core.errors import ConfigError
from avss_lib.core.lm_eval_parity import (
    MAX_LOGLIK_GAP,
    PARITY_TASKS,
    compare_task,
    parity_table,
    run_parity,
    write_local_tasks,
)
from tests.conftest import SHARED_DATA, needs_data

FIXTURES = Path(__file__).parent / "fixtures" / "data"
TASKS = {t.name: t for t in PARITY_TASKS}


def test_local_files_become_the_harness_schema_and_tasks_that_include_its_definitions(tmp_path):
    names = write_local_tasks(tmp_path, str(FIXTURES))
    assert names == ["sciq_local", "truthfulqa_mc1_local", "truthfulqa_mc2_local", "sst2_local"]
    mc = [json.loads(line) for line in (tmp_path / "truthfulqa_mc1.jsonl").read_text().splitlines()]
    raw = json.loads((FIXTURES / "truthfulqa" / "mc_task.json").read_text())
    assert mc[0]["mc1_targets"] == {"choices": list(raw[0]["mc1_targets"]), "labels": list(raw[0]["mc1_targets"].values())}
    sst2 = [json.loads(line) for line in (tmp_path / "sst2.jsonl").read_text().splitlines()]
    first = (FIXTURES / "sst2" / "dev.tsv").read_text().splitlines()[1].split("\t")[0]
    assert [r["label"] for r in sst2] == [1, 0, 1, 0] and sst2[0]["sentence"] == first  # quotes kept as written
    assert '"' in first
    config = json.loads((tmp_path / "sciq_local.yaml").read_text())
    assert config["include"].endswith("lm_eval/tasks/sciq/sciq.yaml") and Path(config["include"]).is_file()
    assert config["test_split"] == "test" and config["dataset_kwargs"]["data_files"]["test"].endswith("sciq.jsonl")
    with pytest.raises(ConfigError, match="local benchmark files"):
        write_local_tasks(tmp_path, "hub")


def _sst2_sample(doc_id: int, sentence: str, logliks: tuple[float, float], acc: float) -> dict:
    return {"doc_id": doc_id, "doc": {"sentence": sentence, "label": 1}, "filtered_resps": [[ll, False] for ll in logliks],
            "acc": acc}


def test_compare_task_matches_choices_by_text_and_finds_disagreements():
    ours = pd.DataFrame({"question": ["good film", "bad film"], "choices": [["positive", "negative"]] * 2,
                         "logliks": [[-1.0, -2.0], [-3.0, -0.5]], "correct": [True, False],
                         "correct_norm": [True, False], "mc2_choices": [[], []]})
    # the harness orders the choices negative, positive: its log-likelihoods are ours reversed
    samples = [_sst2_sample(0, "good film", (-2.0, -1.0 + 2e-4), 1.0), _sst2_sample(1, "bad film", (-0.5, -3.0), 1.0)]
    per_example = compare_task(TASKS["sst2"], samples, ours)
    assert per_example["max_loglik_gap"].tolist() == pytest.approx([2e-4, 0.0])
    assert per_example[["lm_eval", "ours"]].values.tolist() == [[1.0, 1.0], [1.0, 0.0]]
    table = parity_table(per_example)
    row = table.iloc[0]
    assert (row["lm_eval"], row["ours"], row["abs_diff"], row["same_per_example"]) == (100.0, 50.0, 50.0, 0.5)
    assert not row["agrees"] and row["max_loglik_gap"] <= MAX_LOGLIK_GAP
    with pytest.raises(ConfigError, match="different examples"):
        compare_task(TASKS["sst2"], [_sst2_sample(0, "another film", (-2.0, -1.0), 1.0)], ours)
    wrong_choices = ours.assign(choices=[["yes", "no"]] * 2)
    with pytest.raises(ConfigError, match="different choices"):
        compare_task(TASKS["sst2"], samples, wrong_choices)


@pytest.mark.slow
@needs_data
def test_both_harnesses_agree_example_by_example_on_20_items_per_task(tmp_path):
    from avss_lib.core.models import load_model

    model, tokenizer = load_model("smollm2-135m-instruct")
    per_example, table = run_parity(model, tokenizer, data_root=str(SHARED_DATA), n=20, folder=tmp_path,
                                    batch_size=16)
    assert table[["task", "metric"]].values.tolist() == [["sciq", "acc"], ["sciq", "acc_norm"], ["truthfulqa_mc1", "acc"],
                                                         ["truthfulqa_mc2", "mc2"], ["sst2", "acc"]]
    assert (table["n"] == 20).all()
    assert (table["same_per_example"] == 1.0).all(), table
    assert (per_example["max_loglik_gap"] <= MAX_LOGLIK_GAP).all()
    assert table["agrees"].all()
