"""Calibration text is disjoint from every evaluated text: the check, the bundled profiles, and the data itself."""

from __future__ import annotations

import pytest

from avss_lib.book.pipeline import load_profile, profile_names
from avss_lib.core.benchmarks import load_benchmark, load_wikitext2_text
from avss_lib.core.calibration_text import check_disjoint, load_calibration_texts, wikitext_paragraphs
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.pruning.tasks import task_specs
from tests.conftest import SHARED_DATA, needs_data

CALIBRATION = {"benchmark": "wikitext2", "split": "validation", "n_samples": 4, "seed": 0}


def test_check_disjoint_refuses_a_calibration_split_that_is_evaluated():
    evaluated = {"wikitext2": {"benchmark": "wikitext2", "split": "validation"},
                 "sciq": {"benchmark": "sciq", "split": "validation"}}
    with pytest.raises(ConfigError, match=r"wikitext2/validation.*\(wikitext2\).*calibration_split"):
        check_disjoint(CALIBRATION, evaluated)


def test_check_disjoint_returns_the_evaluated_sources_when_they_differ():
    evaluated = {"wikitext2": {"benchmark": "wikitext2", "split": "test"},
                 "wikitext2@curve": {"benchmark": "wikitext2", "split": "test"},
                 "sciq": {"benchmark": "sciq", "split": "validation"}}
    assert check_disjoint(CALIBRATION, evaluated) == ["sciq/validation", "wikitext2/test"]


def test_check_disjoint_names_the_fix_for_a_record_without_its_source():
    with pytest.raises(DataError, match="re-run"):
        check_disjoint({"n_samples": 4}, {"sciq": {"benchmark": "sciq", "split": "validation"}})


@needs_data
@pytest.mark.parametrize("profile", profile_names())
def test_every_bundled_profile_calibrates_on_text_chapter_03_does_not_score(profile):
    notebooks = load_profile(profile)["notebooks"]
    collect, prune = notebooks["01_activations"], notebooks["03_pruning"]
    specs = task_specs(prune["tasks"], prune.get("task_options"))
    evaluated = {s.key: load_benchmark(s.name, data_root=str(SHARED_DATA), split=s.split, n=1).provenance
                 for s in specs}
    calibration = {"benchmark": collect["calibration_dataset"], "split": collect["calibration_split"]}
    assert "wikitext2/test" in check_disjoint(calibration, evaluated)


@needs_data
def test_the_calibration_paragraphs_do_not_occur_in_the_scored_wikitext2_test_text():
    samples, provenance = load_calibration_texts("wikitext2", "validation", 512, 42, str(SHARED_DATA))
    test_text, _ = load_wikitext2_text("test", str(SHARED_DATA))
    test_paragraphs = set(wikitext_paragraphs(test_text))
    assert provenance["split"] == "validation" and len(samples) == 512
    assert not test_paragraphs & set(samples)
    # the check is able to fail: the same paragraphs drawn from the test split are all in the test text
    from_test, _ = load_calibration_texts("wikitext2", "test", 32, 42, str(SHARED_DATA))
    assert set(from_test) <= test_paragraphs
