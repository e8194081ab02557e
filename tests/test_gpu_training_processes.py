"""The GPU training benchmark (benchmarks/gpu_training_processes.py), run on the CPU with a tiny model."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from avss_lib.testing.tiny_models import tiny_config, tiny_tokenizer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    yield importlib.import_module("gpu_training_processes")
    sys.modules.pop("gpu_training_processes", None)


@pytest.fixture()
def inputs(tmp_path: Path, bench) -> Path:
    tiny_config("llama", 2).save_pretrained(tmp_path / bench.MODEL_FOLDER)
    tiny_tokenizer().save_pretrained(tmp_path / bench.MODEL_FOLDER)
    examples = [{"id": f"q{i}", "prompt": f"Question {i}?\nA:", "positive": " yes", "negatives": [" no", " maybe"]}
                for i in range(3)]
    sizes = {"batch_size": 2, "max_length": 16, "lr": 1e-4}
    inputs = {"run_dir": "r", "profile": "p", "sizes": sizes, "layers": [1], "examples": examples}
    (tmp_path / bench.EXAMPLES_FILE).write_text(json.dumps(inputs))
    return tmp_path


def test_one_process_reports_its_step_time_and_the_rate_it_implies(bench, inputs: Path) -> None:
    result = bench.concurrent_steps(inputs, "cpu", steps=2, procs=1)
    assert result["procs"] == 1 and len(result["ms_per_step"]) == 1
    assert result["steps_per_s"] == pytest.approx(1000 / result["ms_per_step"][0], rel=1e-2)


def test_the_profile_of_a_cpu_run_counts_no_kernels(bench, inputs: Path) -> None:
    profiled = bench.profile_steps(inputs, "cpu", steps=1)
    assert profiled["wall_ms_per_step"] > 0
    assert profiled["kernel_ms_per_step"] == 0 and profiled["kernel_launches_per_step"] == 0
    assert profiled["device_busy_fraction"] == 0


def test_both_training_benchmarks_train_the_first_seed_of_the_eavss_arm(bench, tmp_path: Path) -> None:
    import pandas as pd

    from avss_lib.core.artifacts import ARMS

    arms = pd.DataFrame({"run_id": ["base", "eavss-s42", "eavss-s7", "random-d0-s7"],
                         "arm": ["base", "eavss", "eavss", "random"], "seed": [None, 42, 7, 7],
                         "draw": [None, None, None, 0], "n_layers_trained": [0, 2, 2, 2],
                         "trainable_params": [0, 10, 10, 10], "layers": [[], [3, 1], [4, 2], [0, 5]]})
    ARMS.write(arms, tmp_path)
    assert bench.eavss_layers(tmp_path) == (4, 2)
