"""Evaluation of pruned sets: the planned layers are really removed, finished sets resume from checkpoints, and
the float32 precision check; plus the best-of timing the chapter reports."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from avss_lib.core.errors import ConfigError
from avss_lib.core.layer_removal import skip_layers
from avss_lib.core.tasks import evaluate_task
from avss_lib.core.timing import measure_speedup
from avss_lib.pruning import evaluate
from avss_lib.pruning.plan import BASE_SET
from avss_lib.pruning.tasks import load_task, task_specs
from avss_lib.testing.tiny_models import tiny_model, tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "data"
N_LAYERS = 6


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", N_LAYERS, seed=2)


def _tasks(tok, sizes):
    return {s.key: (s, load_task(s, tok, str(FIXTURES), 0)) for s in task_specs(sizes)}


def test_evaluate_sets_removes_the_planned_layers(tok, llama):
    tasks = _tasks(tok, {"sst2": 4, "wikitext2": None})
    sets = {BASE_SET: [], "L1-4": [1, 4]}
    needs = {BASE_SET: ["sst2", "wikitext2"], "L1-4": ["sst2"]}
    ev = evaluate.evaluate_sets(llama, tok, sets, needs, tasks, batch_size=2)
    assert set(ev.results) == {(BASE_SET, "sst2"), (BASE_SET, "wikitext2"), ("L1-4", "sst2")}
    with skip_layers(llama, [1, 4]):
        expected = evaluate_task(llama, tok, tasks["sst2"][1], batch_size=2)
    got = ev.results[("L1-4", "sst2")]
    assert np.allclose(np.stack(got.per_example["logliks"]), np.stack(expected.per_example["logliks"]), atol=1e-4)
    assert len(llama.model.layers) == N_LAYERS  # the original model is untouched
    per_example = ev.per_example_table()
    sst2 = per_example[(per_example["set_id"] == "L1-4") & (per_example["task_key"] == "sst2")]
    assert sst2["num"].tolist() == got.per_example["correct"].astype(float).tolist() and (sst2["den"] == 1).all()
    assert sst2["id"].tolist() == got.per_example["id"].astype(str).tolist()
    ppl = per_example[per_example["task_key"] == "wikitext2"]
    value = ev.results[(BASE_SET, "wikitext2")].summary["perplexity"][0]
    assert math.isclose(math.exp(ppl["num"].sum() / ppl["den"].sum()), value, rel_tol=1e-9)
    summary = ev.summary_table().set_index(["set_id", "task_key", "metric"])
    assert summary.loc[("L1-4", "sst2", "acc"), "value"] == got.summary["acc"][0]


def test_evaluate_sets_resumes_from_checkpoints(tok, llama, tmp_path, monkeypatch):
    tasks = _tasks(tok, {"sst2": 4})
    sets = {BASE_SET: [], "L1-4": [1, 4]}
    needs = {sid: ["sst2"] for sid in sets}
    first = evaluate.evaluate_sets(llama, tok, sets, needs, tasks, batch_size=2, checkpoint_dir=tmp_path)
    files = sorted(tmp_path.glob("*.pkl"))
    assert [f.name.split("-")[0] for f in files] == ["L1", BASE_SET]
    files[0].write_bytes(b"truncated")  # an interrupted or corrupt checkpoint is recomputed, not trusted
    calls = []
    real = evaluate.evaluate_task
    monkeypatch.setattr(evaluate, "evaluate_task", lambda *a, **k: calls.append(1) or real(*a, **k))
    lines = []
    again = evaluate.evaluate_sets(llama, tok, sets, needs, tasks, batch_size=2, checkpoint_dir=tmp_path,
                                   log=lines.append)
    assert len(calls) == 1 and any("unreadable" in line for line in lines)
    for key in first.results:
        assert first.results[key].summary == again.results[key].summary
    assert again.seconds[BASE_SET] == first.seconds[BASE_SET]  # loaded, with the time it took
    evaluate.evaluate_sets(llama, tok, sets, needs, tasks, batch_size=3, checkpoint_dir=tmp_path)
    assert len(calls) == 3  # another batch size is another computation: nothing reused
    monkeypatch.setattr(evaluate, "scoring_code_digest", lambda: "other scoring code")
    evaluate.evaluate_sets(llama, tok, sets, needs, tasks, batch_size=2, checkpoint_dir=tmp_path)
    assert len(calls) == 5  # scored by other code: nothing reused


def test_the_scoring_code_digest_covers_existing_modules() -> None:
    root = Path(evaluate.__file__).resolve().parents[1]
    assert all((root / name).is_file() for name in evaluate.SCORING_MODULES)
    assert evaluate.scoring_code_digest() == evaluate.scoring_code_digest() and len(evaluate.scoring_code_digest()) == 64


def test_precision_check_compares_with_float32(tok, llama):
    tasks = _tasks(tok, {"sst2": 4, "wikitext2": None})
    half = copy.deepcopy(llama).to(torch.bfloat16)
    needs = {BASE_SET: list(tasks)}
    ev = evaluate.evaluate_sets(half, tok, {BASE_SET: []}, needs, tasks, batch_size=2)
    table = evaluate.precision_check(llama, tok, ev, tasks, batch_size=2).set_index("task_key")
    assert set(table["dtype"]) == {"bfloat16"}
    exact = {key: evaluate_task(llama, tok, tasks[key][1], batch_size=2) for key in tasks}
    assert table.loc["wikitext2", "value_float32"] == pytest.approx(exact["wikitext2"].summary["perplexity"][0], rel=1e-6)
    assert table.loc["wikitext2", "value"] == ev.results[(BASE_SET, "wikitext2")].summary["perplexity"][0]
    assert table.loc["wikitext2", "difference"] == pytest.approx(table.loc["wikitext2", "value"]
                                                                 - table.loc["wikitext2", "value_float32"])
    assert math.isnan(table.loc["wikitext2", "same_per_example"])  # per-window losses always differ a little
    ours = ev.results[(BASE_SET, "sst2")].per_example["correct"].to_numpy()
    theirs = exact["sst2"].per_example["correct"].to_numpy()
    assert table.loc["sst2", "same_per_example"] == pytest.approx(np.mean(ours == theirs))
    assert table.loc["sst2", "n"] == 4 and table.loc["sst2", "metric"] == "acc"
    same = evaluate.precision_check(llama, tok, evaluate.evaluate_sets(llama, tok, {BASE_SET: []}, needs, tasks,
                                                                       batch_size=2), tasks, batch_size=2)
    assert (same["difference"].abs() < 1e-9).all() and same["same_per_example"].dropna().tolist() == [1.0]
    with pytest.raises(ConfigError, match="no unpruned results"):
        evaluate.precision_check(llama, tok, evaluate.Evaluations(), tasks)


def test_speedup_reports_the_best_run_and_the_theory(llama):
    batch = {"input_ids": torch.randint(4, 90, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    speed = measure_speedup(llama, [0, 2, 4], batch, repeats=3)
    assert len(speed["times_pruned"]) == len(speed["times_unpruned"]) == 3
    assert speed["seconds_pruned"] == min(speed["times_pruned"])  # best of the runs, not the median
    assert speed["seconds_unpruned"] == min(speed["times_unpruned"])
    assert speed["measured_speedup"] == speed["seconds_unpruned"] / speed["seconds_pruned"]
    assert speed["theoretical_speedup_layers"] == pytest.approx(2.0)  # 3 of 6 layers removed
    per_layer = sum(p.numel() for p in llama.model.layers[0].parameters())
    head = llama.lm_head.weight.numel()
    full = N_LAYERS * per_layer + head
    assert speed["estimated_speedup_params"] == pytest.approx(full / (full - 3 * per_layer))
    assert (speed["n_layers"], speed["n_removed"], speed["batch_shape"]) == (N_LAYERS, 3, [2, 12])
    with pytest.raises(ConfigError):
        measure_speedup(llama, [0], batch, repeats=0)
