"""Load the study's evaluation sets into one record type, from a local data root or the Hugging Face Hub.

:func:`load_benchmark` returns a :class:`Benchmark`: a list of :class:`Example` records plus a
``provenance`` dict (source, files and their sha256, split, row count, ``n``, ``seed``) that callers copy
into every artifact.

Record conventions (identical for both sources; the local files are described in the data README):

- ``nq_open``: ``question``, ``answers`` = gold answers. Id ``nq_open-{row}``.
- ``triviaqa``: ``question``, ``answers`` = aliases (the DPR file's list; on the Hub ``answer.aliases``,
  as lm-evaluation-harness uses). Id ``triviaqa-{row}`` (the DPR file has no ids; same order as the Hub).
  The DPR file is CSV-quoted twice (fields with quotes or commas read ``"a ""b"" c"`` after the first
  CSV pass); the loader undoes both levels so the text matches the Hub's.
- ``sciq``: ``choices`` = (distractor1, distractor2, distractor3, correct_answer), ``label`` = 3 (the
  harness's order), ``answers`` = (correct_answer,), ``context`` = support (may be empty).
  Id ``sciq-{split}-{row}``.
- ``truthfulqa_mc``: ``choices``/``label`` = the MC1 targets and the index of the true one; ``mc2_choices``
  / ``mc2_labels`` = the MC2 targets with 0/1 labels, in file order. ``truthfulqa_gen``: ``answers`` = the
  best answer followed by the other correct answers (duplicates dropped), ``incorrect_answers``. Both use
  the id ``truthfulqa-{sha1(question)[:12]}`` so the two views of a question share an id.
- ``wikiqa``: one example per question; ``choices`` = candidate sentences in file order,
  ``correct_choices`` = indices of the sentences labelled 1 (possibly empty), ``label`` = the first of them
  or ``None``, ``context`` = the Wikipedia page title. Id = the WikiQA ``QuestionID``.
- ``sst2``: ``text`` = sentence, ``choices`` = ("negative", "positive"), ``label`` = 0/1. Id ``sst2-{row}``.
- ``wikitext2``: a single example whose ``text`` is the whole split; ``provenance['rows']`` counts lines.

Default splits: ``test`` for wikiqa and wikitext2, ``validation`` for everything else (for triviaqa the
local DPR "test" file is the Hub's unfiltered validation split; for truthfulqa the only split).
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from avss_lib.core.data_root import data_file, resolve_data_root
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.io import sha256_file


@dataclass(frozen=True)
class Example:
    """One evaluation item; fields a task does not use keep their defaults."""

    id: str
    question: str = ""
    answers: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    label: int | None = None
    correct_choices: tuple[int, ...] | None = None
    mc2_choices: tuple[str, ...] | None = None
    mc2_labels: tuple[int, ...] | None = None
    context: str | None = None
    incorrect_answers: tuple[str, ...] = ()
    text: str | None = None


@dataclass(frozen=True)
class Benchmark:
    """A named list of examples and where they came from."""

    name: str
    examples: list[Example]
    provenance: dict[str, Any]

    def __len__(self) -> int:
        return len(self.examples)


class _RowError(Exception):
    """A row that cannot be turned into an :class:`Example`; re-raised as :class:`DataError` with file:line."""


T = TypeVar("T")
Rows = Iterator[tuple[int, Any]]  # (1-based line number, raw row)


@dataclass(frozen=True)
class _Spec:
    """Where one benchmark lives locally and on the Hub."""

    files: dict[str, str]  # split -> file relative to the data root
    default_split: str
    read_rows: Callable[[Path], Rows]
    hub: tuple[str, str | None]  # (dataset id, config)


# --------------------------------------------------------------------------------------- file readers


def _jsonl_rows(path: Path) -> Rows:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                yield line_no, _parse(path, line_no, json.loads, line)


def _json_array_rows(path: Path) -> Rows:
    """Elements of a JSON array with the line on which each starts."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    pos = _skip_space(text, 0)
    if not text.startswith("[", pos):
        raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: expected a JSON list: restore the file")
    pos = _skip_space(text, pos + 1)
    while not text.startswith("]", pos):
        line_no = text.count("\n", 0, pos) + 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}): restore the file") from exc
        yield line_no, obj
        pos = _skip_space(text, pos)
        if text.startswith(",", pos):
            pos = _skip_space(text, pos + 1)
        elif not text.startswith("]", pos):
            raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: expected ',' or ']': restore the file")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _tab_rows(path: Path) -> Rows:
    """Rows of the header-less, tab-separated, CSV-quoted TriviaQA DPR topics file."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        for fields in reader:
            if fields:
                yield reader.line_num, fields


def _undo_csv_quoting(s: str) -> str:
    """Remove the second level of CSV quoting that DPR's TriviaQA file carries (``"a ""b"" c"`` -> ``a "b" c``)."""
    if len(s) > 1 and s[0] == s[-1] == '"':
        return next(csv.reader([s]))[0]
    return s


def _dict_rows(path: Path, *, delimiter: str, quoting: int, encoding: str = "utf-8") -> Rows:
    """Rows of a CSV/TSV file with a header, each a dict; a row with too many or too few fields is malformed."""
    with open(path, encoding=encoding, newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
        for row in reader:
            if None in row or None in row.values():
                raise DataError(
                    f"{path}:{reader.line_num}: expected {len(reader.fieldnames or [])} fields "
                    f"{reader.fieldnames}: restore the file"
                )
            yield reader.line_num, row


def _tsv_rows(path: Path) -> Rows:
    return _dict_rows(path, delimiter="\t", quoting=csv.QUOTE_NONE)


def _truthfulqa_csv_rows(path: Path) -> Rows:
    return _dict_rows(path, delimiter=",", quoting=csv.QUOTE_MINIMAL, encoding="utf-8-sig")


def _text_rows(path: Path) -> Rows:
    yield 1, path.read_text(encoding="utf-8")


def _parse(path: Path, line_no: int, fn: Callable[[Any], Any], raw: Any) -> Any:
    """Apply ``fn`` to one row, turning any parsing failure into a DataError naming ``path:line_no``."""
    try:
        return fn(raw)
    except (_RowError, KeyError, TypeError, ValueError, SyntaxError, AttributeError, IndexError) as exc:
        raise DataError(f"{path}:{line_no}: malformed row ({type(exc).__name__}: {exc}): restore the file") from exc


# --------------------------------------------------------------------------------------- row -> Example


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _RowError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _str_list(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _RowError(f"{what} must be a list of strings")
    return tuple(value)


def _dedup(items: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(s for s in items if s))


def _truthfulqa_id(question: str) -> str:
    return "truthfulqa-" + hashlib.sha1(question.encode("utf-8")).hexdigest()[:12]


def _nq(row: dict[str, Any], index: int) -> Example:
    return Example(id=f"nq_open-{index}", question=_str(row["question"], "question"),
                   answers=_str_list(row["answer"], "answer"))


def _trivia(question: str, aliases: Sequence[str], index: int) -> Example:
    return Example(id=f"triviaqa-{index}", question=_str(question, "question"),
                   answers=_str_list(list(aliases), "aliases"))


def _trivia_local(fields: list[str], index: int) -> Example:
    if len(fields) != 2:
        raise _RowError(f"expected 'question<TAB>[aliases]', got {len(fields)} tab-separated fields")
    aliases = _str_list(ast.literal_eval(fields[1]), "aliases")
    return _trivia(_undo_csv_quoting(fields[0]), [_undo_csv_quoting(a) for a in aliases], index)


def _sciq(row: dict[str, Any], split: str, index: int) -> Example:
    keys = ("distractor1", "distractor2", "distractor3", "correct_answer")
    choices = tuple(str(row[k]) for k in keys)  # SciQ has a few numeric answers
    return Example(id=f"sciq-{split}-{index}", question=_str(row["question"], "question"), answers=(choices[3],),
                   choices=choices, label=3, context=_str(row["support"], "support"))


def _truthfulqa_mc(question: str, mc1: tuple[tuple[str, ...], tuple[int, ...]],
                   mc2: tuple[tuple[str, ...], tuple[int, ...]]) -> Example:
    for name, (choices, labels) in (("mc1", mc1), ("mc2", mc2)):
        if len(choices) != len(labels) or set(labels) - {0, 1} or 1 not in labels:
            raise _RowError(f"{name} targets need 0/1 labels with at least one 1")
    if mc1[1].count(1) != 1:
        raise _RowError("mc1 targets need exactly one true answer")
    return Example(id=_truthfulqa_id(question), question=_str(question, "question"), choices=mc1[0],
                   label=mc1[1].index(1), mc2_choices=mc2[0], mc2_labels=mc2[1])


def _targets_from_dict(targets: Any, what: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if not isinstance(targets, dict):
        raise _RowError(f"{what} must be a mapping answer -> 0/1")
    return tuple(targets), tuple(int(v) for v in targets.values())


def _truthfulqa_mc_local(row: dict[str, Any]) -> Example:
    return _truthfulqa_mc(row["question"], _targets_from_dict(row["mc1_targets"], "mc1_targets"),
                          _targets_from_dict(row["mc2_targets"], "mc2_targets"))


def _truthfulqa_mc_hub(row: dict[str, Any]) -> Example:
    def targets(t: dict[str, Any]) -> tuple[tuple[str, ...], tuple[int, ...]]:
        return tuple(t["choices"]), tuple(int(v) for v in t["labels"])

    return _truthfulqa_mc(row["question"], targets(row["mc1_targets"]), targets(row["mc2_targets"]))


def _truthfulqa_gen(question: str, best: str, correct: Sequence[str], incorrect: Sequence[str]) -> Example:
    answers = _dedup([best, *correct])
    if not answers or not _dedup(incorrect):
        raise _RowError("needs at least one correct and one incorrect answer")
    return Example(id=_truthfulqa_id(question), question=_str(question, "question"), answers=answers,
                   incorrect_answers=_dedup(incorrect))


def _truthfulqa_gen_local(row: dict[str, str]) -> Example:
    return _truthfulqa_gen(row["Question"], row["Best Answer"].strip(),
                           [a.strip() for a in row["Correct Answers"].split("; ")],
                           [a.strip() for a in row["Incorrect Answers"].split("; ")])


def _sst2(text: str, label: Any, index: int) -> Example:
    if int(label) not in (0, 1):
        raise _RowError(f"label must be 0 or 1, got {label!r}")
    return Example(id=f"sst2-{index}", text=_str(text, "text"), choices=("negative", "positive"), label=int(label))


def _wikiqa(rows: list[tuple[str, str, str, str, int]]) -> list[Example]:
    """Group (question id, question, title, sentence, label) rows into one example per question."""
    grouped: dict[str, list[tuple[str, str, str, str, int]]] = {}
    for row in rows:
        grouped.setdefault(row[0], []).append(row)
    examples = []
    for qid, group in grouped.items():
        correct = tuple(i for i, r in enumerate(group) if r[4] == 1)
        examples.append(Example(id=qid, question=group[0][1], context=group[0][2],
                                choices=tuple(r[3] for r in group), correct_choices=correct,
                                label=correct[0] if correct else None))
    return examples


def _wikiqa_label(value: Any) -> int:
    if str(value) not in ("0", "1"):
        raise _RowError(f"Label must be 0 or 1, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------- per-benchmark conversions


def _with_lines(rows: list[tuple[int, Any]], path: Path, fn: Callable[[Any, int], Example]) -> list[Example]:
    return [_parse(path, line_no, lambda r, i=i: fn(r, i), raw) for i, (line_no, raw) in enumerate(rows)]


def _local_converters(path: Path) -> dict[str, Callable[[list[tuple[int, Any]], str], list[Example]]]:
    """Local row -> Example conversions; ``path`` only names the file in errors."""
    return {
        "nq_open": lambda rows, split: _with_lines(rows, path, _nq),
        "triviaqa": lambda rows, split: _with_lines(rows, path, _trivia_local),
        "sciq": lambda rows, split: _with_lines(rows, path, lambda r, i: _sciq(r, split, i)),
        "truthfulqa_mc": lambda rows, split: _with_lines(rows, path, lambda r, i: _truthfulqa_mc_local(r)),
        "truthfulqa_gen": lambda rows, split: _with_lines(rows, path, lambda r, i: _truthfulqa_gen_local(r)),
        "wikiqa": lambda rows, split: _wikiqa([
            _parse(path, ln, lambda r: (r["QuestionID"], r["Question"], r["DocumentTitle"], r["Sentence"],
                                        _wikiqa_label(r["Label"])), raw) for ln, raw in rows]),
        "sst2": lambda rows, split: _with_lines(rows, path, lambda r, i: _sst2(r["text"], r["label"], i)),
        "wikitext2": lambda rows, split: [Example(id=f"wikitext2-{split}", text=rows[0][1])],
    }


def _hub_converters() -> dict[str, Callable[[list[dict[str, Any]], str], list[Example]]]:
    """Hub row -> Example conversions (same records as the local files)."""
    return {
        "nq_open": lambda rows, split: [_nq(r, i) for i, r in enumerate(rows)],
        "triviaqa": lambda rows, split: [_trivia(r["question"], r["answer"]["aliases"], i) for i, r in enumerate(rows)],
        "sciq": lambda rows, split: [_sciq(r, split, i) for i, r in enumerate(rows)],
        "truthfulqa_mc": lambda rows, split: [_truthfulqa_mc_hub(r) for r in rows],
        "truthfulqa_gen": lambda rows, split: [
            _truthfulqa_gen(r["question"], r["best_answer"], r["correct_answers"], r["incorrect_answers"])
            for r in rows],
        "wikiqa": lambda rows, split: _wikiqa([
            (r["question_id"], r["question"], r["document_title"], r["answer"], int(r["label"])) for r in rows]),
        "sst2": lambda rows, split: [_sst2(r["sentence"], r["label"], i) for i, r in enumerate(rows)],
        "wikitext2": lambda rows, split: [Example(id=f"wikitext2-{split}", text="".join(r["text"] for r in rows))],
    }


_VALIDATION = "validation"

_SPECS: dict[str, _Spec] = {
    "nq_open": _Spec({_VALIDATION: "nq_open/NQ-open.dev.jsonl"}, _VALIDATION, _jsonl_rows,
              ("google-research-datasets/nq_open", None)),
    "triviaqa": _Spec({_VALIDATION: "triviaqa/topics.dpr.trivia.test.txt"}, _VALIDATION, _tab_rows,
              ("mandarjoshi/trivia_qa", "unfiltered.nocontext")),
    "sciq": _Spec({_VALIDATION: "sciq/valid.json", "test": "sciq/test.json"}, _VALIDATION, _json_array_rows,
              ("allenai/sciq", None)),
    "truthfulqa_mc": _Spec({_VALIDATION: "truthfulqa/mc_task.json"}, _VALIDATION, _json_array_rows,
              ("truthfulqa/truthful_qa", "multiple_choice")),
    "truthfulqa_gen": _Spec({_VALIDATION: "truthfulqa/TruthfulQA.csv"}, _VALIDATION, _truthfulqa_csv_rows,
              ("truthfulqa/truthful_qa", "generation")),
    "wikiqa": _Spec({_VALIDATION: "wikiqa/WikiQA-dev.tsv", "test": "wikiqa/WikiQA-test.tsv"}, "test", _tsv_rows,
              ("microsoft/wiki_qa", None)),
    "sst2": _Spec({_VALIDATION: "sst2/dev.tsv"}, _VALIDATION, _tsv_rows, ("nyu-mll/glue", "sst2")),
    "wikitext2": _Spec({_VALIDATION: "wikitext2/valid.txt", "test": "wikitext2/test.txt"}, "test", _text_rows,
              ("Salesforce/wikitext", "wikitext-2-v1")),
}

#: Names accepted by :func:`load_benchmark`.
BENCHMARKS: tuple[str, ...] = tuple(_SPECS)


# --------------------------------------------------------------------------------------- public API


def load_benchmark(
    name: str,
    *,
    data_root: str | os.PathLike[str] | None = None,
    split: str | None = None,
    n: int | None = None,
    seed: int = 0,
) -> Benchmark:
    """Load benchmark ``name`` (one of :data:`BENCHMARKS`) as :class:`Example` records.

    ``data_root`` follows :func:`avss_lib.core.data_root.resolve_data_root` (``'hub'`` downloads from the Hub).
    ``n`` keeps a seeded random subset of that many examples, in their original order.
    """
    if name not in _SPECS:
        raise ConfigError(f"unknown benchmark {name!r}: choose one of {', '.join(BENCHMARKS)}")
    spec = _SPECS[name]
    split = split or spec.default_split
    if split not in spec.files:
        raise ConfigError(f"benchmark {name!r} has no split {split!r}: choose one of {', '.join(spec.files)}")
    root = resolve_data_root(data_root)
    if root is None:
        examples, provenance = _load_hub(name, split)
    else:
        examples, provenance = _load_local(name, split, root)
    kept = subsample(examples, n, seed)
    provenance.update(benchmark=name, split=split, examples_total=len(examples), n=n, seed=seed)
    return Benchmark(name=name, examples=kept, provenance=provenance)


def load_wikitext2_text(
    split: str = "test", data_root: str | os.PathLike[str] | None = None
) -> tuple[str, dict[str, Any]]:
    """The whole WikiText-2 (v1, tokenized) ``split`` as one string, with its provenance."""
    bench = load_benchmark("wikitext2", data_root=data_root, split=split)
    text = bench.examples[0].text
    assert text is not None  # the wikitext2 converter always sets it
    return text, bench.provenance


def subsample(items: Sequence[T], n: int | None, seed: int) -> list[T]:
    """``n`` items chosen by a ``numpy.random.default_rng(seed)`` permutation, kept in their original order."""
    if n is None:
        return list(items)
    if n < 1 or n > len(items):
        raise ConfigError(f"n={n} is out of range: only {len(items)} examples are available, "
                          f"so use 1 <= n <= {len(items)} (or n=None for all)")
    keep = np.sort(np.random.default_rng(seed).permutation(len(items))[:n])
    return [items[i] for i in keep]


def _load_local(name: str, split: str, root: Path) -> tuple[list[Example], dict[str, Any]]:
    spec = _SPECS[name]
    relative = spec.files[split]
    path = data_file(root, relative)
    rows = list(spec.read_rows(path))
    examples = _local_converters(path)[name](rows, split)
    n_rows = len(rows[0][1].splitlines()) if name == "wikitext2" else len(rows)
    provenance = {"source": "local", "data_root": str(root), "files": [relative],
                  "sha256": {relative: sha256_file(path)}, "rows": n_rows}
    return examples, provenance


def _load_hub(name: str, split: str) -> tuple[list[Example], dict[str, Any]]:
    import datasets  # deferred: slow to import and only needed for the Hub

    hub_id, config = _SPECS[name].hub
    try:
        ds = datasets.load_dataset(hub_id, config, split=split)
    except Exception as exc:  # network, authentication and missing-split errors come in many types
        raise DataError(f"could not load {hub_id} ({config}, split {split}) from the Hugging Face Hub ({exc}): "
                        f"check the internet connection, or point data_root at a local copy") from exc
    rows = list(ds)
    try:
        examples = _hub_converters()[name](rows, split)
    except (_RowError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{hub_id} ({config}, {split}) has an unexpected row format ({exc}): "
                        f"use a local data root, or update avss_lib.core.benchmarks for the new format") from exc
    provenance = {"source": "hub", "hub_id": hub_id, "hub_config": config, "rows": len(rows),
                  "datasets_version": datasets.__version__}
    return examples, provenance
