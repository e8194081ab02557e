"""Chapter 04 chooses layers from the selection half of its question split only: no evaluation label reaches it."""

from __future__ import annotations

import pandas as pd
import pytest

from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.splits import EVALUATION, SELECTION, side_ids, split_datasets
from avss_lib.hallucination.answers import hallucination_labels
from avss_lib.hallucination.stage import selection_rows

DATASETS = ("nq_open", "sciq")


def _answers(n: int = 20) -> pd.DataFrame:
    return pd.DataFrame([{"dataset": name, "id": f"{name}-{i}", "question": f"question {i} of {name}?",
                          "prediction": f"p{i}", "correct": i % 3 == 0} for name in DATASETS for i in range(n)])


def test_selection_rows_hold_the_selection_half_and_ignore_evaluation_labels() -> None:
    answers = _answers()
    split = split_datasets(answers, DATASETS, evaluation_fraction=0.5, seed=0)
    for name in DATASETS:
        chosen, held = side_ids(split, name, SELECTION), side_ids(split, name, EVALUATION)
        assert len(chosen) == len(held) == 10 and not set(chosen) & set(held)
        rows = selection_rows(answers, split, name)
        assert sorted(rows["id"]) == sorted(chosen)
        flipped = answers.copy()
        mask = flipped["id"].isin(held)
        flipped.loc[mask, "correct"] = ~flipped.loc[mask, "correct"]
        flipped.loc[mask, "prediction"] = "changed"
        pd.testing.assert_frame_equal(selection_rows(flipped, split, name), rows)
        pd.testing.assert_series_equal(hallucination_labels(selection_rows(flipped, split, name), name),
                                       hallucination_labels(rows, name))


def test_the_split_is_made_per_data_set_and_checked() -> None:
    answers = _answers()
    split = split_datasets(answers, DATASETS, evaluation_fraction=0.3, seed=1)
    assert split.groupby("dataset")["split"].apply(lambda s: int((s == EVALUATION).sum())).to_dict() == \
        {"nq_open": 6, "sciq": 6}  # round(0.3 * 20) each
    with pytest.raises(DataError, match="no triviaqa examples"):
        split_datasets(answers, ["triviaqa"])
    with pytest.raises(DataError, match="lack column"):
        split_datasets(answers.drop(columns="question"), DATASETS)
    with pytest.raises(ConfigError, match="side="):
        side_ids(split, "sciq", "train")
    with pytest.raises(DataError, match="no wikiqa rows"):
        side_ids(split, "wikiqa", SELECTION)
