"""The record of a run made outside the book's build: what it holds, and its errors."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform

import torch

from avss_lib.book import cli
from avss_lib.book.run_record import benchmark_machine
from avss_lib.core.artifacts import (PROVENANCE_01, RUN_KEY, RUN_RESULT, done_record, mitigation_run_dir, started_record,
                                     verdict)
from avss_lib.core.io import write_json
from avss_lib.core.verdicts import Condition, Verdict, to_records


def _finished_run(run_dir):
    write_json({"fingerprint": "f", "parameters": {}, "seconds": 12.345, "peak_rss_mib": 1023.6,
                "finished": "2026-12-06T23:00:00+0000"}, done_record(run_dir, "01_activations"))
    write_json({"fingerprint": "g", "parameters": {}, "seconds": 300.04, "peak_rss_mib": 2048.4,
                "finished": "2026-12-06T23:05:00+0000"}, done_record(run_dir, "03_pruning"))
    PROVENANCE_01.write({"model": {"spec": "tiny", "sha256": "abc"}}, run_dir)
    a1 = Verdict(claim="A1", subject="avss:block_rel", outcome="does not hold", rule="r",
                 conditions=(Condition("retention CI at or above the threshold", False, 44.7, 90.0, 33.3, 57.3, "sciq"),))
    verdict("03_pruning").write(to_records([a1]), run_dir)
    return a1


def test_record_holds_times_model_and_verdicts_of_the_finished_notebooks(tmp_path, monkeypatch):
    monkeypatch.setenv("AVSS_COMMIT", "0123abcd")
    a1 = _finished_run(tmp_path / "run")
    out = tmp_path / "rec.json"
    assert cli.main(["record", str(tmp_path / "run"), str(out), "--what", "a test run",
                     "--seconds", "setup=61.25", "--seconds", "total=400"]) == 0
    record = json.loads(out.read_text())
    assert record["what"] == "a test run" and record["commit"] == "0123abcd" and record["run_dir"] == "run"
    assert record["notebooks"] == {
        "01_activations": {"seconds": 12.3, "peak_rss_mib": 1024, "finished": "2026-12-06T23:00:00+0000"},
        "03_pruning": {"seconds": 300.0, "peak_rss_mib": 2048, "finished": "2026-12-06T23:05:00+0000"}}
    assert record["seconds"] == {"setup": 61.2, "total": 400.0}
    assert record["model"] == {"spec": "tiny", "sha256": "abc"}
    assert list(record["verdicts"]) == ["03_pruning"]
    assert record["verdicts"]["03_pruning"] == to_records([a1])
    assert record["versions"]["torch"] not in ("", "not installed")


def test_record_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["record", str(tmp_path / "empty"), str(tmp_path / "r.json"), "--what", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no finished notebook" in err and "\n" not in err
    assert not (tmp_path / "r.json").exists()
    _finished_run(tmp_path / "run")
    assert cli.main(["record", str(tmp_path / "run"), str(tmp_path / "r.json"), "--what", "x",
                     "--seconds", "setup=fast"]) == 2
    assert "--seconds expects NAME=SECONDS with a number" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_record_of_a_run_cut_off_in_chapter_05_keeps_its_finished_training_runs(tmp_path):
    run = tmp_path / "run"
    _finished_run(run)
    write_json({"fingerprint": "h", "started": "2026-12-07T10:52:03+0000"}, started_record(run, "05_mitigation"))
    write_json({"fingerprint": "f", "started": "2026-12-06T22:59:00+0000"}, started_record(run, "01_activations"))
    write_json({"key": {}, "train_seconds": 74.96, "eval_seconds": 53.04, "steps_run": 199, "best_step": 190,
                "perplexity": {}}, mitigation_run_dir(run, "eavss-s0") / RUN_RESULT)
    write_json({"run": "random-d0-s0"}, mitigation_run_dir(run, "random-d0-s0") / RUN_KEY)  # still training
    out = tmp_path / "rec.json"
    assert cli.main(["record", str(run), str(out), "--what", "cut off"]) == 0
    record = json.loads(out.read_text())
    assert record["unfinished"] == {"05_mitigation": "2026-12-07T10:52:03+0000"}  # 01 finished: not listed
    assert record["mitigation_runs"] == {
        "eavss-s0": {"train_seconds": 75.0, "eval_seconds": 53.0, "steps_run": 199, "best_step": 190}}



def test_benchmark_machine_names_the_commit_the_machine_and_each_packages_version(monkeypatch):
    monkeypatch.setenv("AVSS_COMMIT", "feedbeef")
    got = benchmark_machine(("torch", "no-such-package-avss"), device="cuda")
    assert got["commit"] == "feedbeef"
    assert got["versions"] == {"torch": importlib.metadata.version("torch"), "no-such-package-avss": "not installed"}
    assert got["machine"] == {"platform": platform.platform(), "python": platform.python_version(),
                              "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": "cuda"}
