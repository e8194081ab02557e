"""Each chapter notebook's parameters cell and its stage's signature are one list of knobs."""

from __future__ import annotations

import inspect

import pytest

from avss_lib.book.parameters import stage_arguments
from avss_lib.book.pipeline import NOTEBOOKS, declared_parameters
from avss_lib.core.errors import ConfigError
from avss_lib.hallucination.stage import run_hallucination
from avss_lib.mitigation.stage import run_mitigation
from avss_lib.performance.stage import run_performance
from avss_lib.pruning.stage import run_pruning
from avss_lib.ranking.stage import run_activations, run_ranking

STAGE_OF = {"01_activations": run_activations, "02_avss_ranking": run_ranking, "03_pruning": run_pruning,
            "04_hallucination_layers": run_hallucination, "05_mitigation": run_mitigation,
            "06_performance": run_performance}
#: Stage keywords that are no chapter knobs: progress bars (off in tests), chapter 01's record handed in directly
#: (tests), and the power of the minimum detectable effect (the study's fixed 80 %).
NOT_KNOBS = {"05_mitigation": {"progress", "power"}, "06_performance": {"progress", "calibration"}}


def test_every_notebook_has_a_stage():
    assert set(STAGE_OF) == set(NOTEBOOKS)


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_parameters_cell_declares_exactly_the_stage_parameters(notebook):
    declared = set(declared_parameters(notebook))
    accepted = set(inspect.signature(STAGE_OF[notebook]).parameters)
    assert declared - accepted == set(), "declared but never passed to the stage"
    assert accepted - declared == NOT_KNOBS.get(notebook, set()), "the stage's own default would be used silently"


def test_stage_arguments_takes_the_signature_from_the_namespace():
    def stage(run_dir, *, k=5, seeds=(0,)):
        return run_dir, k, seeds

    namespace = {"run_dir": "r", "k": 3, "seeds": [1, 2], "os": object(), "unrelated": 7}
    assert stage_arguments(stage, namespace) == {"run_dir": "r", "k": 3, "seeds": [1, 2]}
    assert stage(**stage_arguments(stage, namespace)) == ("r", 3, [1, 2])


def test_stage_arguments_names_what_the_notebook_lacks():
    def stage(run_dir, *, k, seeds, progress=True):
        return run_dir

    with pytest.raises(ConfigError, match=r"k, seeds.*parameters cell"):
        stage_arguments(stage, {"run_dir": "r"})
    assert stage_arguments(stage, {"run_dir": "r", "k": 1, "seeds": []}) == {"run_dir": "r", "k": 1, "seeds": []}
