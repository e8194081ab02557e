"""How much of the unpruned score each ranking keeps, and AVSS against each baseline, with paired bootstraps.

:func:`retention_table` gives absolute scores with their bootstrap CIs and % of the unpruned score with a
paired bootstrap CI; :func:`comparison_table` gives AVSS minus each baseline with a paired bootstrap CI (the
rule that decides "beyond the CIs"); :func:`curve_table` the primary metric against the fraction of layers
removed; :func:`agreement` how the rankings and their pruned sets agree. The one paired bootstrap of the
study is :mod:`avss_lib.core.resampling`; :func:`paired_bootstrap` applies it to the per-example
``(num, den)`` of the primary metric (:data:`avss_lib.core.artifacts.PER_EXAMPLE`).

For perplexity, "% retained" is ``ppl(unpruned) / ppl(pruned) × 100`` and differences are in log-perplexity
(positive = better), so "higher is better" holds for every compared quantity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from avss_lib.core.benchmarks import Benchmark
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.answer_matching import normalize_answer
from avss_lib.core.metrics import average_precision
from avss_lib.core.artifacts import COMPARISON
from avss_lib.core.resampling import CI, bootstrap_p_value, holm, paired_resamples, percentile_interval
from avss_lib.core.tasks import truthfulqa_constant_answer_score
from avss_lib.pruning.plan import BASE_SET, method_family
from avss_lib.pruning.tasks import PRIMARY_METRIC
from avss_lib.ranking.agreement import jaccard_matrix, spearman_matrix

#: Fewer paired examples than this give no verdict: a bootstrap of a handful of values has no coverage.
MIN_EXAMPLES_FOR_VERDICT = 10
#: Family-wise error rate of the comparison table (Holm).
FAMILY_ALPHA = 0.05


def _arrays(per_example: pd.DataFrame, set_ids: Sequence[str], task_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(num, den) arrays of shape (len(set_ids), n_examples), rows aligned on example id."""
    rows = per_example[per_example["task_key"] == task_key]
    nums, dens, ids = [], [], None
    for sid in set_ids:
        r = rows[rows["set_id"] == sid]
        if r.empty:
            raise DataError(f"no results for set {sid} on {task_key}: evaluate it first")
        if ids is None:
            ids = r["id"].to_numpy()
        elif not np.array_equal(ids, r["id"].to_numpy()):
            raise DataError(f"set {sid} was evaluated on different {task_key} examples: results are not paired")
        nums.append(r["num"].to_numpy(dtype=float))
        dens.append(r["den"].to_numpy(dtype=float))
    return np.array(nums), np.array(dens)


def _score(task: str, num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Performance on a 'higher is better' scale: the metric, or minus the mean NLL for perplexity."""
    ratio = num.sum(-1) / den.sum(-1)
    return -ratio if PRIMARY_METRIC[task] == "perplexity" else ratio


def _retention(task: str, score: np.ndarray, base: np.ndarray, chance: float = 0.0) -> np.ndarray:
    """% of the unpruned score above ``chance``, ``(score − chance) / (base − chance) × 100`` (``chance=0``: the
    paper's raw %); for perplexity ppl_base / ppl_pruned × 100 (``score`` is minus the mean NLL)."""
    if PRIMARY_METRIC[task] == "perplexity":
        return 100.0 * np.exp(score - base)
    with np.errstate(divide="ignore", invalid="ignore"):
        return 100.0 * (score - chance) / (base - chance)


def paired_bootstrap(task: str, a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
                     statistic: str, *, chance: float = 0.0, n_resamples: int = 2000, seed: int = 0,
                     confidence_level: float = 0.95) -> CI:
    """Paired bootstrap of ``a`` against ``b`` on the same examples, as (value, low, high).

    ``a`` and ``b`` are (num, den) arrays of shape (n_sets, n_examples); several rows are model replicates
    (random seeds): the statistic uses their mean score, and the bootstrap resamples the replicates too (a
    two-level bootstrap: examples, jointly for a and b, and seeds with replacement; see
    :func:`avss_lib.core.resampling.paired_resamples`). ``statistic``: ``"difference"`` (score(a) − score(b);
    log-perplexity for perplexity, positive = a better) or ``"retention"`` (% of b's score above ``chance``,
    see :func:`_retention`). Percentile interval (:func:`avss_lib.core.resampling.percentile_interval`).
    """
    return percentile_interval(*_paired_draws(task, a, b, statistic, chance, n_resamples, seed), confidence_level)


def _paired_draws(task: str, a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], statistic: str,
                  chance: float, n_resamples: int, seed: int) -> tuple[float, np.ndarray]:
    """The statistic of :func:`paired_bootstrap` on the full sample and over its resamples."""
    if statistic not in ("difference", "retention"):
        raise ConfigError(f"unknown statistic {statistic!r}: use 'difference' or 'retention'")
    (an, ad), (bn, bd) = a, b
    if an.shape[1] != bn.shape[1]:
        raise DataError(f"paired samples differ in size ({an.shape[1]} vs {bn.shape[1]} examples)")

    def stat(sa: np.ndarray, sb: np.ndarray) -> np.ndarray:
        sa, sb = sa.mean(0), sb.mean(0)
        return sa - sb if statistic == "difference" else _retention(task, sa, sb, chance)

    value = float(stat(_score(task, an, ad)[:, None], _score(task, bn, bd)[:, None])[0])
    resamples = paired_resamples(an.shape[1], [len(an), len(bn)], n_resamples=n_resamples, seed=seed)
    counts = resamples.counts.astype(float)  # (R, n)

    def resampled(num: np.ndarray, den: np.ndarray, picks: np.ndarray) -> np.ndarray:  # (n_sets, R) scores
        s = (num @ counts.T) / (den @ counts.T)
        s = -s if PRIMARY_METRIC[task] == "perplexity" else s
        return np.take_along_axis(s.T, picks, axis=1).T  # each resample's replicates, (R, n_sets) picks

    return value, stat(resampled(an, ad, resamples.picks[0]), resampled(bn, bd, resamples.picks[1]))


def chance_level(task: str, bench: Benchmark, *, n_permutations: int = 200, seed: int = 0) -> float | None:
    """The primary score a model with no knowledge of the inputs reaches on ``bench``, computed from the data
    (``None`` for perplexity, whose retention is already a ratio of perplexities):

    - SciQ: the mean of 1 / (number of choices) (a uniform guess); SST-2: the share of the majority label
      (always answering it);
    - TruthfulQA MC2: the mean share of true answers (uniform probabilities); WikiQA: the mean average
      precision of random candidate orders (Monte Carlo, seeded);
    - NQ-Open and TriviaQA: the exact match of the best constant answer (the share of questions whose gold
      answers include the most frequent normalised gold answer);
    - TruthfulQA generation: the score of always answering "I have no comment."
      (:func:`avss_lib.core.tasks.truthfulqa_constant_answer_score`).
    """
    metric = PRIMARY_METRIC.get(task)
    examples = bench.examples
    if metric == "perplexity":
        return None
    if task == "sciq":
        return float(np.mean([1 / len(e.choices) for e in examples if e.choices]))
    if task == "sst2":
        labels = pd.Series([e.label for e in examples if e.label is not None])
        return float(labels.value_counts(normalize=True).max()) if len(labels) else 0.0
    if task == "truthfulqa_mc":
        return float(np.mean([np.mean(e.mc2_labels) for e in examples if e.mc2_labels]))
    if task == "wikiqa":
        rng = np.random.default_rng(seed)
        values = []
        for e in examples:
            if not e.correct_choices or not e.choices:
                continue  # the evaluator drops questions without a correct sentence
            labels = np.zeros(len(e.choices), dtype=int)
            labels[list(e.correct_choices)] = 1
            values.append(np.mean([average_precision(rng.random(len(labels)), labels) for _ in range(n_permutations)]))
        return float(np.mean(values)) if values else 0.0
    if task in ("nq_open", "triviaqa"):
        golds = [{g for g in map(normalize_answer, e.answers) if g} for e in examples]
        counts = pd.Series([g for gs in golds for g in gs]).value_counts()
        return float(counts.iloc[0] / len(examples)) if len(counts) else 0.0
    if task == "truthfulqa_gen":
        return truthfulqa_constant_answer_score(bench)
    raise ConfigError(f"no chance level is defined for task {task!r}")


def informative(task: str, base_low: float, chance: float | None) -> bool:
    """Whether a % of the unpruned score means anything: the unpruned CI's lower end is above ``chance``
    (:func:`chance_level`); always true for perplexity."""
    if PRIMARY_METRIC[task] == "perplexity":
        return True
    return chance is not None and base_low > chance


def _pool(values: pd.Series, metric: str) -> dict[str, float]:
    """Mean (geometric for perplexity), sd, min and max of one score per random seed."""
    v = values.to_numpy(dtype=float)
    mean = float(np.exp(np.log(v).mean())) if metric == "perplexity" else float(v.mean())
    return {"value": mean, "sd": float(v.std(ddof=1)) if len(v) > 1 else np.nan, "min": float(v.min()),
            "max": float(v.max())}


def _methods_by_set(plan: pd.DataFrame, ratio: float) -> pd.DataFrame:
    return plan[np.isclose(plan["ratio"], ratio)]


def retention_table(plan: pd.DataFrame, summary: pd.DataFrame, per_example: pd.DataFrame, ratio: float,
                    task_keys: Sequence[str], *, n_resamples: int = 2000, seed: int = 0,
                    chance: Mapping[str, float | None]) -> pd.DataFrame:
    """Per method (random seeds pooled into ``random``) and task at ``ratio``: the primary metric with its CI
    (random: mean over seeds — geometric for perplexity — with sd, min and max), and with paired bootstrap CIs
    the % of the unpruned score as the paper reads it (``retention``) and chance-corrected,
    ``(score − chance) / (unpruned − chance) × 100`` (``chance_corrected``; for perplexity, which has no chance
    level, the perplexity ratio itself). ``chance``
    (task key -> :func:`chance_level`) also decides ``informative``."""
    missing = [key for key in task_keys if key not in chance]
    if missing:
        raise ConfigError(f"no chance level for task(s) {missing}: compute them with chance_level")
    rows = []
    at = _methods_by_set(plan, ratio)
    groups = {m: [sid] for m, sid in zip(at["method"], at["set_id"]) if method_family(m) != "random"}
    random_sets = at.loc[at["family"] == "random", "set_id"].tolist()
    if random_sets:
        groups["random"] = random_sets
    for key in task_keys:
        task = summary.loc[summary["task_key"] == key, "task"].iloc[0]
        metric = PRIMARY_METRIC[task]
        base_row = summary[(summary["set_id"] == BASE_SET) & (summary["task_key"] == key) & (summary["metric"] == metric)].iloc[0]
        base = _arrays(per_example, [BASE_SET], key)
        level = chance[key]
        counted = informative(task, base_row["low"], level)
        rows.append({"method": "unpruned", "task_key": key, "task": task, "metric": metric, "value": base_row["value"],
                     "low": base_row["low"], "high": base_row["high"], "sd": np.nan, "n_seeds": np.nan,
                     "min": np.nan, "max": np.nan, "retention": 100.0, "retention_low": 100.0, "retention_high": 100.0,
                     "chance_corrected": 100.0, "chance_corrected_low": 100.0,
                     "chance_corrected_high": 100.0, "informative": counted, "set_ids": BASE_SET,
                     "chance": level})
        for method, sids in groups.items():
            vals = summary[(summary["task_key"] == key) & (summary["metric"] == metric) & summary["set_id"].isin(sids)]
            per_set = vals.set_index("set_id").loc[sids]
            arrays = _arrays(per_example, sids, key)
            ret = paired_bootstrap(task, arrays, base, "retention", n_resamples=n_resamples, seed=seed)
            corrected = ret if level is None else paired_bootstrap(task, arrays, base, "retention", chance=level,
                                                                   n_resamples=n_resamples, seed=seed)
            many = len(sids) > 1
            pooled = _pool(per_set["value"], metric) if many else {"sd": np.nan, "min": np.nan, "max": np.nan}
            rows.append({
                "method": method, "task_key": key, "task": task, "metric": metric,
                "value": pooled["value"] if many else float(per_set["value"].iloc[0]),
                "low": np.nan if many else float(per_set["low"].iloc[0]),
                "high": np.nan if many else float(per_set["high"].iloc[0]),
                "sd": pooled["sd"], "min": pooled["min"], "max": pooled["max"], "n_seeds": len(sids) if many else np.nan,
                "retention": ret[0], "retention_low": ret[1], "retention_high": ret[2],
                "chance_corrected": corrected[0], "chance_corrected_low": corrected[1],
                "chance_corrected_high": corrected[2], "informative": counted, "set_ids": " ".join(sids),
                "chance": level,
            })
    return pd.DataFrame(rows)


def held_out_best(plan: pd.DataFrame, summary: pd.DataFrame, per_example: pd.DataFrame, ratio: float,
                  task_keys: Sequence[str], *, chance: Mapping[str, float | None], column: str,
                  n_resamples: int = 2000, seed: int = 0) -> tuple[str, pd.DataFrame]:
    """The AVSS variant with the best worst-case ``column`` (``retention`` or ``chance_corrected``) over the
    counted tasks, chosen on a seeded half of each task's examples, and its :func:`retention_table` on the other
    half: a "best variant" whose score never saw the examples that chose it. Tasks with fewer than two examples
    are left out of both halves."""
    rng = np.random.default_rng(seed)
    selection, splittable = [], []
    for key in task_keys:
        ids = per_example.loc[(per_example["task_key"] == key) & (per_example["set_id"] == BASE_SET), "id"].unique()
        if len(ids) >= 2:  # a task with a single example cannot be in both halves
            splittable.append(key)
            selection += [(key, i) for i in rng.permutation(ids)[: len(ids) // 2]]
    if not splittable:
        raise DataError("no task has two examples: there are no disjoint halves to choose and score on")
    keys = pd.MultiIndex.from_frame(per_example[["task_key", "id"]])
    chosen = keys.isin(pd.MultiIndex.from_tuples(selection, names=["task_key", "id"]))
    avss = plan[plan["family"] == "avss"]
    choosing = retention_table(avss, summary, per_example[chosen], ratio, splittable, n_resamples=n_resamples,
                               seed=seed, chance=chance)
    counted = choosing[choosing["informative"] & (choosing["method"] != "unpruned")]
    if counted.empty:
        raise DataError("no AVSS variant has a counted task: there is no best variant to choose")
    best = str(counted.groupby("method")[column].min().sort_values(ascending=False, kind="stable").index[0])
    scored = retention_table(avss[avss["method"] == best], summary, per_example[~chosen], ratio, splittable,
                             n_resamples=n_resamples, seed=seed, chance=chance)
    return best, scored


def comparison_table(plan: pd.DataFrame, per_example: pd.DataFrame, summary: pd.DataFrame, ratio: float,
                     task_keys: Sequence[str], *, n_resamples: int = 2000, seed: int = 0,
                     min_examples: int = MIN_EXAMPLES_FOR_VERDICT) -> pd.DataFrame:
    """Every AVSS variant against every baseline family at ``ratio``, per task: score(AVSS) − score(baseline)
    (log-perplexity for perplexity; positive = AVSS better) with a paired bootstrap 95% CI, its bootstrap
    p-value (:func:`avss_lib.core.resampling.bootstrap_p_value`) and ``p_holm``, Holm's adjustment over the
    whole table (every variant × baseline × task comparison that is made: the family-wise error rate is 5%).
    ``verdict``: ``better`` / ``worse`` when ``p_holm`` < 0.05, else ``indistinguishable``; identical pruned
    sets are ``same set``; fewer than ``min_examples`` paired examples (windows for perplexity) give
    ``too few examples`` (neither is in the family). Random seeds are one baseline (two-level bootstrap, see
    :func:`paired_bootstrap`)."""
    at = _methods_by_set(plan, ratio)
    avss_rows = at[at["family"] == "avss"]
    baseline_groups: dict[str, list[str]] = {}
    for row in at[at["family"] != "avss"].itertuples():
        baseline_groups.setdefault(row.family if row.family == "random" else row.method, []).append(row.set_id)
    rows = []
    for key in task_keys:
        task = summary.loc[summary["task_key"] == key, "task"].iloc[0]
        for a in avss_rows.itertuples():
            for baseline, sids in baseline_groups.items():
                row = {"avss": a.method, "baseline": baseline, "task_key": key, "task": task}
                if sids == [a.set_id]:
                    rows.append({**row, "difference": 0.0, "low": 0.0, "high": 0.0, "p_value": np.nan,
                                 "verdict": "same set"})
                    continue
                arrays = _arrays(per_example, [a.set_id], key)
                value, draws = _paired_draws(task, arrays, _arrays(per_example, sids, key), "difference", 0.0,
                                             n_resamples, seed)
                d = percentile_interval(value, draws)
                few = arrays[0].shape[1] < min_examples
                rows.append({**row, "difference": d[0], "low": d[1], "high": d[2],
                             "p_value": np.nan if few else bootstrap_p_value(draws),
                             "verdict": "too few examples" if few else ""})
    table = pd.DataFrame(rows, columns=[*COMPARISON.columns])
    table["p_holm"] = holm(table["p_value"].to_numpy(dtype=float))
    tested = table["verdict"] == ""
    significant = table["p_holm"] < FAMILY_ALPHA
    table.loc[tested, "verdict"] = np.where(significant[tested], np.where(table.loc[tested, "difference"] > 0,
                                                                           "better", "worse"), "indistinguishable")
    return table


def curve_table(plan: pd.DataFrame, summary: pd.DataFrame, methods: Sequence[str], task_keys: Sequence[str]
                ) -> pd.DataFrame:
    """Primary metric against the fraction of layers removed for ``methods`` (``random`` = mean — geometric for
    perplexity — sd, min and max over the random seeds in the plan) on ``task_keys``; the unpruned model is
    fraction 0 for every method."""
    rows = []
    for key in task_keys:
        sub = summary[summary["task_key"] == key]
        if sub.empty:
            raise DataError(f"no results for curve task {key}")
        task = sub["task"].iloc[0]
        metric = PRIMARY_METRIC[task]
        values = sub[sub["metric"] == metric].set_index("set_id")
        base = values.loc[BASE_SET]
        for method in methods:
            chosen = plan[plan["family"] == "random"] if method == "random" else plan[plan["method"] == method]
            if chosen.empty:
                raise ConfigError(f"curve method {method!r} is not in the plan: choose from "
                                  f"{sorted(set(plan['method']) | {'random'})}")
            rows.append({"method": method, "task_key": key, "task": task, "metric": metric, "ratio": 0.0,
                         "fraction_removed": 0.0, "value": base["value"], "low": base["low"], "high": base["high"],
                         "sd": np.nan, "min": np.nan, "max": np.nan})
            for ratio, group in chosen.groupby("ratio"):
                v = values.loc[group["set_id"]]
                many = len(group) > 1
                pooled = _pool(v["value"], metric) if many else {"sd": np.nan, "min": np.nan, "max": np.nan}
                rows.append({"method": method, "task_key": key, "task": task, "metric": metric, "ratio": ratio,
                             "fraction_removed": float(group["fraction_removed"].iloc[0]),
                             "value": pooled["value"] if many else float(v["value"].iloc[0]),
                             "low": np.nan if many else float(v["low"].iloc[0]),
                             "high": np.nan if many else float(v["high"].iloc[0]),
                             "sd": pooled["sd"], "min": pooled["min"], "max": pooled["max"]})
    return pd.DataFrame(rows)


def agreement(scores: Mapping[str, pd.Series], plan: pd.DataFrame, ratio: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Spearman's rho between the methods' scores and Jaccard overlap of their pruned sets at ``ratio``."""
    at = _methods_by_set(plan, ratio).set_index("method")
    names = [m for m in scores if m in at.index]
    return (spearman_matrix({m: scores[m] for m in names}),
            jaccard_matrix({m: set(at.loc[m, "layers"]) for m in names}))
