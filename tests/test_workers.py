"""Jobs in worker processes (core/workers.py): the shares, the spawned workers, and the stages' serial pass reading
what the workers wrote — the results of a serial run."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pandas as pd
import pytest

from avss_lib.core.errors import ConfigError
from avss_lib.core.workers import check_workers, prefill, shares
from avss_lib.pruning import evaluate
from avss_lib.pruning.plan import BASE_SET
from avss_lib.pruning.tasks import load_task, task_specs
from avss_lib.testing.tiny_models import tiny_model, tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def test_shares_deal_the_jobs_round_robin_and_workers_are_checked():
    assert shares([1, 2, 3, 4, 5], 2) == [[1, 3, 5], [2, 4]]
    assert shares([1], 3) == [[1]] and shares([], 2) == []
    assert check_workers(4) == 4
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="workers"):
            check_workers(bad)


def _write_jobs(model, tokenizer, share, *, folder):
    for job in share:
        if job == "fail":
            raise RuntimeError("this job fails")
        (Path(folder) / f"{job}.txt").write_text(f"{model.config.num_hidden_layers} {len(tokenizer)}")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", 4, seed=2).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_prefill_runs_each_share_in_its_own_process_with_the_model_and_reports_failures(model_folder, tmp_path):
    jobs = ["a", "b", "c", "fail", "d"]  # shares: a, c, d and b, fail
    failures = prefill(partial(_write_jobs, folder=tmp_path), jobs, workers=2, model=str(model_folder), device="cpu",
                       dtype="float32")
    assert sorted(p.stem for p in tmp_path.glob("*.txt")) == ["a", "b", "c", "d"]  # "fail" stopped only its share
    assert len(failures) == 1 and failures[0] == "worker 1: RuntimeError: this job fails"
    assert {p.read_text() for p in tmp_path.glob("*.txt")} == {f"4 {len(tiny_tokenizer())}"}
    assert prefill(partial(_write_jobs, folder=tmp_path / "none"), jobs, workers=1, model="unused", device="cpu",
                   dtype="float32") == []  # one worker: nothing spawned, the serial pass does it all


def test_pruned_sets_from_workers_equal_the_serial_evaluation(model_folder, tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    tasks = {s.key: (s, load_task(s, tok, str(FIXTURES), 0)) for s in task_specs({"sst2": 4, "sciq": 3})}
    sets = {BASE_SET: [], "L1": [1], "L0-2": [0, 2]}
    needs = {sid: ["sst2", "sciq"] for sid in sets}
    assert prefill(partial(evaluate.evaluate_share, needs=needs, tasks=tasks, batch_size=2, seed=0,
                           checkpoint_dir=tmp_path / "workers"),
                   list(sets.items()), workers=2, model=str(model_folder), device="cpu", dtype="float32") == []
    from avss_lib.core.models import load_model

    lm, tok = load_model(str(model_folder))
    lines = []
    read = evaluate.evaluate_sets(lm, tok, sets, needs, tasks, batch_size=2, checkpoint_dir=tmp_path / "workers",
                                  log=lines.append)
    assert len(lines) == 3 and all("loaded from" in line for line in lines)  # nothing recomputed
    serial = evaluate.evaluate_sets(lm, tok, sets, needs, tasks, batch_size=2, checkpoint_dir=tmp_path / "serial")
    for key, result in serial.results.items():
        pd.testing.assert_frame_equal(read.results[key].per_example, result.per_example)
        assert read.results[key].summary == result.summary
