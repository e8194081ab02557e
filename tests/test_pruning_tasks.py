"""The pruning chapter's task specs and task loading, on the fixture data."""

from __future__ import annotations

from pathlib import Path

import pytest

from avss_lib.core.benchmarks import load_benchmark
from avss_lib.core.errors import ConfigError
from avss_lib.pruning.tasks import TaskSpec, curve_task_specs, load_task, task_name, task_specs
from avss_lib.testing.tiny_models import tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_task_specs_validate_names_and_sizes():
    specs = task_specs({"sst2": 3, "wikitext2": None}, {"sst2": {"split": "validation", "batch_size": 2}})
    assert specs == [TaskSpec("sst2", "sst2", 3, {"batch_size": 2}, "validation"), TaskSpec("wikitext2", "wikitext2", None)]
    with pytest.raises(ConfigError, match="unknown task"):
        task_specs({"sst3": 3})
    with pytest.raises(ConfigError, match="unknown task"):
        task_specs({"sst2": 3}, {"imdb": {}})
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ConfigError, match="positive integer"):
            task_specs({"sst2": bad})
    with pytest.raises(ConfigError, match="no tasks"):
        task_specs({})


def test_curve_specs_reuse_identical_table_specs():
    table = task_specs({"sst2": 3, "wikitext2": 50})
    curve = curve_task_specs(table, {"sst2": 3, "wikitext2": 20})
    assert curve[0] is table[0]  # the same evaluation: its results are reused
    assert curve[1] == TaskSpec("wikitext2@curve", "wikitext2", 20)
    assert [task_name(s.key) for s in curve] == ["sst2", "wikitext2"]


def test_load_task_takes_a_seeded_subset(tok):
    spec = task_specs({"sst2": 2})[0]
    first, again = load_task(spec, tok, str(FIXTURES), 0), load_task(spec, tok, str(FIXTURES), 0)
    assert len(first) == 2 and [e.id for e in first.examples] == [e.id for e in again.examples]
    every = {e.id for e in load_benchmark("sst2", data_root=FIXTURES).examples}
    assert {e.id for e in first.examples} <= every


def test_load_task_rejects_n_above_the_split(tok):
    spec = task_specs({"sst2": 5})[0]  # the fixture has 4 rows
    with pytest.raises(ConfigError, match="out of range"):
        load_task(spec, tok, str(FIXTURES), 0)


def test_wikitext_is_cut_at_the_first_whole_line_reaching_n_tokens(tok):
    full = load_benchmark("wikitext2", data_root=FIXTURES).examples[0].text
    lines = full.splitlines(keepends=True)
    n = len(lines[0]) + 1  # the tiny tokenizer has one token per character: the first line is one token short
    bench = load_task(task_specs({"wikitext2": n})[0], tok, str(FIXTURES), 0)
    assert bench.examples[0].text == lines[0] + lines[1]
    assert bench.provenance["n_tokens_requested"] == n and bench.provenance["lines_kept"] == 2
    exact = load_task(task_specs({"wikitext2": len(lines[0])})[0], tok, str(FIXTURES), 0)
    assert exact.examples[0].text == lines[0]
    with pytest.raises(ConfigError, match="fewer than"):
        load_task(task_specs({"wikitext2": 10**6})[0], tok, str(FIXTURES), 0)
