"""Benchmark loaders: every source format on tiny made-up fixtures, errors, subsampling, and the real mirror."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from avss_lib.core.benchmarks import BENCHMARKS, load_benchmark, load_wikitext2_text, subsample
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.io import sha256_file

FIXTURES = Path(__file__).parent / "fixtures" / "data"
REAL = Path(__file__).parents[2] / "shared" / "data"


def test_nq_open_fixture() -> None:
    bench = load_benchmark("nq_open", data_root=FIXTURES)
    assert bench.name == "nq_open" and len(bench) == 4
    first, second = bench.examples[:2]
    assert first.id == "nq_open-0" and first.question == "who painted the blue fence in the village"
    assert first.answers == ("Anna Berg",)
    assert second.answers == ("six", "6") and second.choices is None and second.label is None


def test_triviaqa_fixture_undoes_both_levels_of_csv_quoting() -> None:
    bench = load_benchmark("triviaqa", data_root=FIXTURES)
    assert [e.id for e in bench.examples] == ["triviaqa-0", "triviaqa-1", "triviaqa-2"]
    assert bench.examples[0].answers == ("Lumo Isle", "Lumo")
    assert bench.examples[1].question == 'Who wrote the pretend song "Blue Tuesday"?'
    assert bench.examples[1].answers == ('"Blue" Band', "Blue Band")


@pytest.mark.parametrize(("split", "count"), [("validation", 3), ("test", 2)])
def test_sciq_fixture_uses_harness_choice_order(split: str, count: int) -> None:
    bench = load_benchmark("sciq", data_root=FIXTURES, split=split)
    assert len(bench) == count
    ex = bench.examples[0]
    assert ex.id == f"sciq-{split}-0"
    if split == "validation":
        assert ex.choices == ("sand", "salt", "smoke", "light") and ex.label == 3 and ex.answers == ("light",)
        assert ex.context == "Glimmer-ferns grow only where there is light."
        assert bench.examples[2].choices == ("2", "4", "5", "3")  # numeric answers become strings
    else:
        assert ex.context == " Moss-stones release oxygen."  # kept verbatim; the prompt strips it


def test_sciq_default_split_is_validation() -> None:
    assert load_benchmark("sciq", data_root=FIXTURES).provenance["split"] == "validation"


def test_truthfulqa_mc_fixture() -> None:
    bench = load_benchmark("truthfulqa_mc", data_root=FIXTURES)
    first, second = bench.examples
    assert first.choices == ("Nothing happens.", "A tree grows in you.", "You die.") and first.label == 0
    assert first.mc2_choices == ("Nothing happens.", "It passes through you.", "A tree grows in you.", "You die.")
    assert first.mc2_labels == (1, 1, 0, 0)
    assert second.mc2_labels == (0, 1, 0, 1)  # true answers need not come first


def test_truthfulqa_gen_fixture_and_shared_ids() -> None:
    gen = load_benchmark("truthfulqa_gen", data_root=FIXTURES)
    mc = load_benchmark("truthfulqa_mc", data_root=FIXTURES)
    first = gen.examples[0]
    assert first.answers == ("Nothing happens", "It passes through you")  # best first, duplicates dropped
    assert first.incorrect_answers == ("A tree grows in you", "You die")
    assert gen.examples[1].incorrect_answers == ("In the sky", "In the sea, near the coast")
    assert [e.id for e in gen.examples[:2]] == [e.id for e in mc.examples]


def test_wikiqa_fixture_groups_sentences_by_question() -> None:
    bench = load_benchmark("wikiqa", data_root=FIXTURES, split="validation")
    assert bench.provenance["rows"] == 6 and len(bench) == 3
    q1, q2, q3 = bench.examples
    assert q1.id == "Q1" and q1.context == "Glorp" and len(q1.choices or ()) == 3
    assert q1.choices[1] == 'Glorps are fed "sweet" moss by keepers .'  # QUOTE_NONE keeps quotes
    assert q1.correct_choices == (1, 2) and q1.label == 1
    assert q2.correct_choices == (0,)
    assert q3.correct_choices == () and q3.label is None
    assert load_benchmark("wikiqa", data_root=FIXTURES).provenance["split"] == "test"


def test_sst2_fixture() -> None:
    bench = load_benchmark("sst2", data_root=FIXTURES)
    assert [e.label for e in bench.examples] == [1, 0, 1, 0]
    assert bench.examples[0].text == 'a warm and "funny" made-up film . '
    assert bench.examples[0].choices == ("negative", "positive")


def test_wikitext2_text_is_the_file() -> None:
    text, prov = load_wikitext2_text("validation", FIXTURES)
    assert text == (FIXTURES / "wikitext2" / "valid.txt").read_text()
    assert prov["rows"] == 5 and prov["split"] == "validation"
    bench = load_benchmark("wikitext2", data_root=FIXTURES)
    assert bench.provenance["split"] == "test" and len(bench) == 1 and bench.examples[0].id == "wikitext2-test"


def test_provenance_records_file_hash_and_sampling() -> None:
    bench = load_benchmark("nq_open", data_root=FIXTURES, n=2, seed=3)
    prov = bench.provenance
    rel = "nq_open/NQ-open.dev.jsonl"
    assert prov["source"] == "local" and prov["files"] == [rel]
    assert prov["sha256"] == {rel: sha256_file(FIXTURES / rel)}
    assert (prov["rows"], prov["examples_total"], prov["n"], prov["seed"]) == (4, 4, 2, 3)


def test_subsample_is_seeded_and_keeps_original_order() -> None:
    # numpy.random.default_rng(0).permutation(4) = [2, 0, 1, 3] -> keep {2, 0}, listed in file order;
    # default_rng(1).permutation(4) = [0, 1, 2, 3] -> {0, 1}
    ids0 = [e.id for e in load_benchmark("nq_open", data_root=FIXTURES, n=2, seed=0).examples]
    ids1 = [e.id for e in load_benchmark("nq_open", data_root=FIXTURES, n=2, seed=1).examples]
    assert ids0 == ["nq_open-0", "nq_open-2"]
    assert ids1 == ["nq_open-0", "nq_open-1"]
    everything = load_benchmark("nq_open", data_root=FIXTURES, n=4).examples
    assert [e.id for e in everything] == [f"nq_open-{i}" for i in range(4)]


@pytest.mark.parametrize("n", [0, 5])
def test_n_out_of_range_names_the_maximum(n: int) -> None:
    with pytest.raises(ConfigError, match="1 <= n <= 4"):
        load_benchmark("nq_open", data_root=FIXTURES, n=n)


def test_subsample_works_on_any_sequence() -> None:
    assert subsample(["a", "b", "c", "d"], 2, 0) == ["a", "c"]  # permutation [2, 0, 1, 3]


def test_subsample_none_returns_everything() -> None:
    examples = load_benchmark("sst2", data_root=FIXTURES).examples
    assert subsample(examples, None, 0) == examples


def test_unknown_benchmark_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="choose one of nq_open, triviaqa, sciq"):
        load_benchmark("squad", data_root=FIXTURES)
    assert len(BENCHMARKS) == 8


def test_unknown_split() -> None:
    with pytest.raises(ConfigError, match="no split 'train'"):
        load_benchmark("sciq", data_root=FIXTURES, split="train")


def test_missing_data_root_and_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AVSS_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="no data root configured"):
        load_benchmark("nq_open")
    with pytest.raises(DataError, match="NQ-open.dev.jsonl is missing"):
        load_benchmark("nq_open", data_root=tmp_path)


def test_data_root_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVSS_DATA_DIR", str(FIXTURES))
    assert len(load_benchmark("sst2")) == 4


def _corrupt(tmp_path: Path, relative: str, line_no: int, new_line: str) -> Path:
    """Copy the fixture tree and replace one line (1-based) of one file."""
    root = tmp_path / "data"
    shutil.copytree(FIXTURES, root)
    path = root / relative
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[line_no - 1] = new_line
    path.write_text("\n".join(lines), encoding="utf-8")
    return root


@pytest.mark.parametrize(
    ("name", "relative", "line_no", "bad_line", "split"),
    [
        ("nq_open", "nq_open/NQ-open.dev.jsonl", 3, '{"question": "x", "answer": ', None),
        ("nq_open", "nq_open/NQ-open.dev.jsonl", 2, '{"question": "x", "answers": ["y"]}', None),
        ("triviaqa", "triviaqa/topics.dpr.trivia.test.txt", 3, "What?\t['unclosed", None),
        ("triviaqa", "triviaqa/topics.dpr.trivia.test.txt", 1, "only a question", None),
        ("sst2", "sst2/dev.tsv", 4, "the pretend cast shines . \t7", None),
        ("sst2", "sst2/dev.tsv", 2, "no label column", None),
        ("wikiqa", "wikiqa/WikiQA-test.tsv", 3, "Q7\twhere\tD7\tToy city\tD7-1\tIt has 3 parks .\tmaybe", None),
        ("truthfulqa_gen", "truthfulqa/TruthfulQA.csv", 3, "Adversarial,Fiction", None),
    ],
)
def test_malformed_row_names_file_and_line(
    tmp_path: Path, name: str, relative: str, line_no: int, bad_line: str, split: str | None
) -> None:
    root = _corrupt(tmp_path, relative, line_no, bad_line)
    with pytest.raises(DataError, match=rf"{Path(relative).name}:{line_no}: "):
        load_benchmark(name, data_root=root, split=split)


def test_malformed_json_array_element_names_its_line(tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(FIXTURES, root)
    path = root / "truthfulqa" / "mc_task.json"
    # the first occurrence is in the first element's mc1 targets: two true answers
    path.write_text(path.read_text().replace('"A tree grows in you.": 0', '"A tree grows in you.": 1', 1))
    with pytest.raises(DataError, match=r"mc_task.json:2: .*exactly one true answer"):
        load_benchmark("truthfulqa_mc", data_root=root)
    sciq = root / "sciq" / "valid.json"
    sciq.write_text(sciq.read_text().replace('"support": ""', '"supp": ""'))
    with pytest.raises(DataError, match=r"valid.json:\d+: malformed row \(KeyError"):
        load_benchmark("sciq", data_root=root)


def test_sciq_line_number_points_at_the_element(tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(FIXTURES, root)
    sciq = root / "sciq" / "test.json"
    text = sciq.read_text().replace('"support": ""', '"supp": ""')
    sciq.write_text(text)
    element_line = text[: text.index('"question": "What is the boiling')].count("\n")  # the '{' line
    with pytest.raises(DataError, match=rf"test.json:{element_line}: "):
        load_benchmark("sciq", data_root=root, split="test")


def test_invalid_json_array(tmp_path: Path) -> None:
    root = _corrupt(tmp_path, "sciq/valid.json", 1, "{")
    with pytest.raises(DataError, match="valid.json:1: expected a JSON list"):
        load_benchmark("sciq", data_root=root)


# ------------------------------------------------------------------------------------ the real mirror

real = pytest.mark.skipif(not REAL.is_dir(), reason=f"benchmark mirror {REAL} is absent")

README_ROWS = [  # (name, split, file rows, examples) from the data README's table
    ("nq_open", "validation", 3610, 3610),
    ("triviaqa", "validation", 11313, 11313),
    ("sciq", "validation", 1000, 1000),
    ("sciq", "test", 1000, 1000),
    ("truthfulqa_mc", "validation", 817, 817),
    ("truthfulqa_gen", "validation", 817, 817),
    ("wikiqa", "validation", 2733, 296),
    ("wikiqa", "test", 6165, 633),
    ("sst2", "validation", 872, 872),
    ("wikitext2", "validation", 3760, 1),
    ("wikitext2", "test", 4358, 1),
]

README_SHA = {
    "nq_open/NQ-open.dev.jsonl": "f15567f38099f3615f5b8a685c0aef449c11ad90d3da3735e8d1b98115b40616",
    "sciq/valid.json": "b201bc1c002b31cabc8581d05f8a5ce9d115b9ad4f7b4a428c00c3935d67a6ec",
    "wikiqa/WikiQA-test.tsv": "c035f0db5685dcfe1b2f256ff204528752a1e06f6d1bcae9a1aefac05079b24c",
}


@real
@pytest.mark.parametrize(("name", "split", "rows", "examples"), README_ROWS)
def test_real_row_counts_match_readme(name: str, split: str, rows: int, examples: int) -> None:
    bench = load_benchmark(name, data_root=REAL, split=split)
    assert bench.provenance["rows"] == rows
    assert bench.provenance["examples_total"] == examples == len(bench)
    for rel, digest in bench.provenance["sha256"].items():
        assert README_SHA.get(rel, digest) == digest


@real
def test_real_triviaqa_quoted_row_and_wikiqa_answerable_questions() -> None:
    trivia = load_benchmark("triviaqa", data_root=REAL).examples
    assert trivia[4143].question.startswith("What was unusual about the speech by IOC President")
    assert '"Well done Atlanta"' in trivia[4143].question and '""' not in trivia[4143].question
    wikiqa = load_benchmark("wikiqa", data_root=REAL, split="test").examples
    assert sum(bool(e.correct_choices) for e in wikiqa) == 243  # the standard filtered WikiQA test set
