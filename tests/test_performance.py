"""The performance appendix (chapter 06) against hand-computed values: the naive collector against the streaming
one, the overhead and speed-up arithmetic on fake timings, the memory child's protocol, the flatness rule and the
naive comparison on hand-made tables, the wall-time table on hand-made records, the phrases, the figures' data,
and one run of the whole stage on a tiny model whose artifacts and glue keys the notebook relies on."""

from __future__ import annotations

import json
import math
import re
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from avss_lib.core import activation_stats as activations
from avss_lib.core.artifacts import (CALIBRATION, LOAD, MEMORY, NOTEBOOK_TIMES, OVERHEAD, PROVENANCE_06, SPEEDUP,
                                     VARIANCE_AGREEMENT, done_record)
from avss_lib.core.calibration_text import load_calibration_texts, make_batches
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.layers import find_layers
from avss_lib.performance import (calibration_set, figures, load_time, memory, overhead, parameter_checks, prose,
                                  pruning_speed, stage, tables, wall_times)
from avss_lib.testing.tiny_models import tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TEXTS = ["The cat sat on the mat.", "A", "Pack my box with five dozen liquor jugs, then go home.", "Short one",
         "Sphinx of black quartz, judge my vow", "x y z"]
N_LAYERS = 4
HIDDEN = 16  # the tiny models' width


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def batches(tok):
    return make_batches(tok, TEXTS, max_length=24, batch_size=4, padding="max_length")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok) -> Path:
    """A tiny llama saved as a checkpoint folder, so that a subprocess can load it by path."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama", N_LAYERS, seed=3).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------- the base set


def test_token_counts_and_repeat_batches(batches):
    # the tiny tokenizer has one token per character and adds none: each text keeps min(len, 24) tokens
    tokens, positions = calibration_set.token_counts(batches)
    assert tokens == sum(min(len(t), 24) for t in TEXTS) == 23 + 1 + 24 + 9 + 24 + 5
    assert positions == 6 * 24
    repeated = list(calibration_set.repeat_batches(batches, 3))
    assert len(repeated) == 6 and all(a is b for a, b in zip(repeated, batches * 3))  # the same tensors
    with pytest.raises(ConfigError, match="token multiple"):
        list(calibration_set.repeat_batches(batches, 0))


def test_calibration_settings_read_the_calibration_record():
    default = calibration_set.calibration_settings(None)
    assert default == {"dataset": "wikitext2", "split": "validation", "padding": "max_length",
                       "spec": activations.StatsSpec(), "source": "defaults"}
    record = {"benchmark": "wikitext2", "split": "validation", "n_samples": 8, "seed": 42, "padding": "longest",
              "statistics": {"sites": ["mlp_activation"], "abs_thresholds": [1e-4], "rel_taus": [0.2]}}
    got = calibration_set.calibration_settings(record)
    assert got == {"dataset": "wikitext2", "split": "validation", "padding": "longest",
                   "spec": activations.StatsSpec(("mlp_activation",), (1e-4,), (0.2,)),
                   "source": "01_activations/calibration.json"}
    partial = calibration_set.calibration_settings({"benchmark": "wikitext2", "statistics": {"sites": ["attn_output"]}})
    assert partial["spec"] == activations.StatsSpec(("attn_output",)) and partial["padding"] == "max_length"
    with pytest.raises(ConfigError, match="site"):
        calibration_set.calibration_settings({"statistics": {"sites": ["nowhere"]}})


# ----------------------------------------------------------------------------------------- naive vs streaming


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("padding", ["max_length", "longest"])
def test_naive_variances_equal_streaming(tok, model_type, padding):
    model = tiny_model(model_type, N_LAYERS, seed=1)
    batches = make_batches(tok, TEXTS, max_length=24, batch_size=4, padding=padding)
    streaming = activations.collect_activation_stats(model, batches, activations.StatsSpec(("block_output",)),
                                                     progress=False)
    naive = overhead.naive_hidden_state_stats(model, batches)
    assert list(naive["layer"]) == list(range(N_LAYERS))
    block = streaming[streaming["site"] == "block_output"].set_index("layer")
    for column in overhead.VARIANCES:
        np.testing.assert_allclose(naive.set_index("layer")[column], block[column], rtol=1e-5)
    assert (naive["n_tokens"] == sum(min(len(t), 24) for t in TEXTS)).all()
    assert (naive["n_samples"] == len(TEXTS)).all()
    summary = overhead.agreement_summary(overhead.variance_agreement(streaming, naive))
    assert summary["agree"] and summary["max_relative_gap"] < 1e-5
    assert (summary["n_layers"], summary["n_statistics"]) == (N_LAYERS, 3)


def test_naive_last_layer_is_the_raw_block_output_not_the_final_norm(batches):
    """transformers' last hidden state is normed; the naive collector must use the last block's raw output."""
    model = tiny_model("llama", N_LAYERS, seed=1)
    naive = overhead.naive_hidden_state_stats(model, batches)
    with torch.inference_mode():
        out = model(**batches[0], output_hidden_states=True, use_cache=False)
    normed = out.hidden_states[-1].double().mean(dim=1).var(dim=-1)
    streaming = activations.collect_activation_stats(model, batches, activations.StatsSpec(("block_output",)),
                                                     progress=False)
    last = streaming[(streaming["site"] == "block_output") & (streaming["layer"] == N_LAYERS - 1)]
    assert naive["pooled_var_padded"].iloc[-1] == pytest.approx(float(last["pooled_var_padded"].iloc[0]), rel=1e-5)
    assert naive["pooled_var_padded"].iloc[-1] != pytest.approx(float(normed.mean()), rel=1e-3)


def test_naive_rejects_no_batches():
    with pytest.raises(ConfigError, match="empty"):
        overhead.naive_hidden_state_stats(tiny_model("llama", N_LAYERS), [])


def test_variance_agreement_and_its_summary_on_a_hand_made_table():
    streaming = pd.DataFrame({"site": ["block_output", "block_output", "mlp_activation"], "layer": [0, 1, 0],
                              "pooled_var_padded": [2.0, 3.0, 99.0], "pooled_var_masked": [1.0, 1.0, 99.0],
                              "elem_var": [4.0, 5.0, 99.0]})
    naive = pd.DataFrame({"layer": [1, 0], "pooled_var_padded": [3.0, 1.0], "pooled_var_masked": [1.0, 1.0],
                          "elem_var": [4.0, 4.0]})
    agreement = overhead.variance_agreement(streaming, naive)
    assert len(agreement) == 6  # 2 block-output layers × 3 variances; the mlp row is ignored
    gaps = agreement.set_index(["statistic", "layer"])["relative_gap"]
    assert gaps[("pooled_var_padded", 0)] == 1.0  # |2 − 1| / 1, naive matched by layer, not by row order
    assert gaps[("pooled_var_padded", 1)] == 0.0
    assert gaps[("elem_var", 1)] == 0.25  # |5 − 4| / 4
    summary = overhead.agreement_summary(agreement)
    assert summary == {"n_layers": 2, "n_statistics": 3, "max_relative_gap": 1.0, "worst_statistic": "pooled_var_padded",
                       "worst_layer": 0, "tolerance": overhead.AGREEMENT_TOLERANCE, "agree": False}
    assert overhead.agreement_summary(agreement, tolerance=1.0)["agree"]
    missing = overhead.variance_agreement(streaming, naive[naive["layer"] == 0])  # layer 1 missing: NaN gap
    assert overhead.agreement_summary(missing)["worst_layer"] == 1
    assert not overhead.agreement_summary(missing, tolerance=10.0)["agree"]
    with pytest.raises(ConfigError, match="block_output"):
        overhead.variance_agreement(streaming[streaming["site"] == "mlp_activation"], naive)


# ----------------------------------------------------------------------------------------- overhead


def test_overhead_record_on_hand_made_runs():
    record = overhead.overhead_record([1.0, 0.9], [1.2, 1.4], n_batches=2, tokens=100, positions=128,
                                      sites=("block_output",))
    assert record["plain_forward_s"] == 0.9 and record["stats_pass_s"] == 1.2  # the best (shortest) runs
    assert record["overhead_ratio"] == pytest.approx(4 / 3)
    assert not record["meets_target"] and record["repeats"] == 2 and record["target"] == 1.15
    assert overhead.overhead_record([2.0], [2.2], n_batches=1, tokens=1, positions=1, sites=())["meets_target"]
    assert overhead.overhead_record([1.0], [1.15], n_batches=1, tokens=1, positions=1, sites=())["meets_target"]
    with pytest.raises(ConfigError, match="as many"):
        overhead.overhead_record([1.0], [], n_batches=1, tokens=1, positions=1, sites=())


def test_measure_overhead_times_alternate_runs_with_a_fake_clock(monkeypatch, batches):
    """Each repeat times one plain forward, then one statistics pass: [plain, stats, plain, stats]."""
    ticks = iter([0.0, 1.0, 1.0, 2.5, 2.5, 3.3, 3.3, 5.3])  # plain 1.0, stats 1.5, plain 0.8, stats 2.0
    monkeypatch.setattr(overhead, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    model = tiny_model("llama", N_LAYERS)
    spec = activations.StatsSpec(("block_output", "mlp_activation"))
    result, stats = overhead.measure_overhead(model, batches, spec, repeats=2)
    assert result["plain_forward_runs_s"] == pytest.approx([1.0, 0.8])
    assert result["stats_pass_runs_s"] == pytest.approx([1.5, 2.0])
    assert result["overhead_ratio"] == pytest.approx(1.5 / 0.8)
    assert (result["n_batches"], result["tokens"], result["positions"]) == (2, 86, 144)
    assert result["sites"] == ["block_output", "mlp_activation"]
    pd.testing.assert_frame_equal(stats, activations.collect_activation_stats(model, batches, spec, progress=False))
    with pytest.raises(ConfigError, match="repeats"):
        overhead.measure_overhead(model, batches, spec, repeats=0)
    with pytest.raises(ConfigError, match="empty"):
        overhead.measure_overhead(model, [], spec)


# ----------------------------------------------------------------------------------------- pruning speed


@pytest.mark.parametrize("ratio, expected", [(0.25, 4 / 3), (0.5, 2.0), (0.125, 8 / 7), (0.75, 4.0)])
def test_theoretical_speedup(ratio, expected):
    assert pruning_speed.theoretical_speedup(ratio) == pytest.approx(expected)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, True, "0.25"])
def test_theoretical_speedup_rejects_ratios_outside_unit_interval(ratio):
    with pytest.raises(ConfigError, match="outside"):
        pruning_speed.theoretical_speedup(ratio)


def test_speed_layers():
    assert pruning_speed.speed_layers(30, 4) == [25, 26, 27, 28]
    assert pruning_speed.speed_layers(8, 7) == [0, 1, 2, 3, 4, 5, 6]
    for k in (0, 8):
        with pytest.raises(ConfigError):
            pruning_speed.speed_layers(8, k)


def test_measure_pruning_speedups_with_fake_timings(monkeypatch, batches):
    """k = round(r·n) of an 8-layer model, the last-k layers, the best-run speed-up the timing reports."""
    asked = []

    def fake_measure(model, layers, batch, *, repeats):
        asked.append((list(layers), repeats))
        unpruned, pruned = 1.0, 1.0 - 0.1 * len(layers)  # 2 layers: 0.8 s, 4 layers: 0.6 s
        return {"n_layers": 8, "n_removed": len(layers), "layers_removed": list(layers), "batch_shape": [4, 24],
                "repeats": repeats, "seconds_unpruned": unpruned, "seconds_pruned": pruned,
                "measured_speedup": unpruned / pruned, "estimated_speedup_params": 1.1}

    monkeypatch.setattr(pruning_speed, "measure_speedup", fake_measure)
    model = tiny_model("llama", 8)
    speed = pruning_speed.measure_pruning_speedups(model, batches[0], [0.5, 0.3], repeats=2)
    assert asked == [([5, 6], 2), ([3, 4, 5, 6], 2)]  # ratios sorted; 0.3·8 = 2.4 rounds to 2
    assert list(speed["ratio"]) == [0.3, 0.5] and list(speed["n_removed"]) == [2, 4]
    assert speed["removed_fraction"].tolist() == [0.25, 0.5]
    assert speed["theoretical_speedup"].tolist() == pytest.approx([4 / 3, 2.0])  # of the k removed, not of r
    assert speed["nominal_theoretical_speedup"].tolist() == pytest.approx([1 / 0.7, 2.0])
    assert speed["measured_speedup"].tolist() == pytest.approx([1.25, 1 / 0.6])
    assert speed["measured_over_theoretical"].tolist() == pytest.approx([1.25 * 0.75, (1 / 0.6) / 2])
    assert speed["batch_shape"].tolist() == ["4×24", "4×24"]
    with pytest.raises(ConfigError, match="outside"):
        pruning_speed.measure_pruning_speedups(model, batches[0], [0.25, 1.0])


def test_measure_pruning_speedups_really_times_and_leaves_the_model_whole(batches):
    model = tiny_model("llama", 8)
    speed = pruning_speed.measure_pruning_speedups(model, batches[0], [0.25], repeats=1)
    assert speed["layers_removed"].iloc[0] == [5, 6] and speed["batch_shape"].iloc[0] == "4×24"
    assert speed["estimated_speedup_params"].iloc[0] < speed["theoretical_speedup"].iloc[0]  # the head is kept
    assert len(find_layers(model)) == 8


def test_speedup_artifact_round_trips_the_removed_layers(tmp_path):
    row = pruning_speed.speedup_row(0.25, {"n_layers": 8, "n_removed": 2, "layers_removed": [5, 6],
                                           "batch_shape": [4, 24], "repeats": 1, "seconds_unpruned": 1.0,
                                           "seconds_pruned": 0.8, "measured_speedup": 1.25,
                                           "estimated_speedup_params": 1.2})
    SPEEDUP.write(pd.DataFrame([row]), tmp_path)
    assert SPEEDUP.path(tmp_path).read_text().splitlines()[1].split(",")[4] == "5 6"
    back = SPEEDUP.read(tmp_path)
    assert back["layers_removed"].tolist() == [[5, 6]] and back["measured_over_theoretical"].iloc[0] == 0.9375


# ----------------------------------------------------------------------------------------- input checks


def test_check_token_multiples():
    assert parameter_checks.check_token_multiples([10, 1, 4]) == [1, 4, 10]
    assert parameter_checks.check_token_multiples((np.int64(2),)) == [2]
    for bad in ([0], [1, -2], [1.5], [True], [], "14", [2, 2], None, [[1]]):
        with pytest.raises(ConfigError):
            parameter_checks.check_token_multiples(bad)


def test_check_ratios_and_positive_int():
    assert parameter_checks.check_ratios([0.5, 0.125]) == [0.125, 0.5]
    for bad in ([], [0.25, 0.25], [0], [1], "0.5", [None], [[0.5]]):
        with pytest.raises(ConfigError):
            parameter_checks.check_ratios(bad)
    assert parameter_checks.check_positive_int("repeats", 3) == 3
    assert parameter_checks.check_positive_int("n", 0, minimum=0) == 0
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(ConfigError, match="repeats"):
            parameter_checks.check_positive_int("repeats", bad)


# ----------------------------------------------------------------------------------------- memory children


def test_parse_child_output_takes_the_last_protocol_line():
    right = json.dumps({"protocol": memory.CHILD_PROTOCOL, "peak_rss_mib": 1.0})
    earlier = json.dumps({"protocol": memory.CHILD_PROTOCOL, "peak_rss_mib": 0.5})
    stdout = f"progress...\n{earlier}\n{{not json\n  {right}  \n{json.dumps({'protocol': 'other/1'})}\nbye\n"
    assert memory.parse_child_output(stdout) == {"protocol": memory.CHILD_PROTOCOL, "peak_rss_mib": 1.0}
    for bad in ("", "noise\n{\"protocol\": \"other\"}\n", "[1, 2]\n", "{\"protocol\": \"avss-performance-memory/1\""):
        with pytest.raises(memory.MemoryChildFailed, match="no avss-performance-memory/1 JSON line"):
            memory.parse_child_output(bad)


def test_child_command_round_trips_through_main(monkeypatch, capsys):
    """What the parent puts on the command line is what the child's entry point passes on, exactly."""
    spec = activations.StatsSpec(("mlp_activation", "block_output"), (1e-5, 0.1 + 0.2), (0.05,))
    cmd = memory.child_command(model_spec="some/model", batches_file=Path("/tmp/b.pt"), multiple=4,
                               collector="naive", spec=spec, device="cpu", dtype="bfloat16")
    assert cmd[1:4] == ["-m", "avss_lib.performance.memory", "memory-child"]
    seen = {}

    def fake_child(**kwargs):
        seen.update(kwargs)
        return {"protocol": memory.CHILD_PROTOCOL, "multiple": kwargs["multiple"]}

    monkeypatch.setattr(memory, "memory_child", fake_child)
    memory.main(cmd[3:])
    assert seen == {"model_spec": "some/model", "batches_file": "/tmp/b.pt", "multiple": 4, "collector": "naive",
                    "spec": spec, "device": "cpu", "dtype": "bfloat16"}
    assert memory.parse_child_output(capsys.readouterr().out) == {"protocol": memory.CHILD_PROTOCOL, "multiple": 4}


def test_memory_child_in_process(model_dir, batches, tmp_path):
    file = tmp_path / "batches.pt"
    torch.save(batches, file)
    record = memory.memory_child(model_spec=str(model_dir), batches_file=file, multiple=3, collector="streaming",
                                 spec=activations.StatsSpec())
    assert record["protocol"] == memory.CHILD_PROTOCOL and record["collector"] == "streaming"
    assert (record["tokens"], record["positions"], record["n_batches"]) == (3 * 86, 3 * 144, 6)
    assert record["peak_method"] in ("VmHWM reset before the pass", "ru_maxrss (lifetime)")
    with pytest.raises(ConfigError, match="collector"):
        memory.memory_child(model_spec=str(model_dir), batches_file=file, multiple=1, collector="eager",
                            spec=activations.StatsSpec())


def test_measure_memory_in_subprocesses_skips_the_naive_collection_over_the_limit(model_dir, batches):
    """The parent runs `python -m avss_lib.performance.memory memory-child` per (collector, multiple)."""
    limit = memory.naive_estimate_mib(144, N_LAYERS, HIDDEN) * 1.5  # room for 1×, not for 2×
    table = memory.measure_memory(str(model_dir), batches, [2, 1], activations.StatsSpec(), n_layers=N_LAYERS,
                                  hidden=HIDDEN, naive_limit_mib=limit, progress=False)
    assert list(zip(table["collector"], table["multiple"])) == [("streaming", 1), ("naive", 1), ("streaming", 2),
                                                                 ("naive", 2)]
    assert table["tokens"].tolist() == [86, 86, 172, 172] and table["positions"].tolist() == [144, 144, 288, 288]
    assert table["naive_estimate_mib"].tolist() == pytest.approx([144 * 4 * 16 * 4 / 2**20] * 2 + [288 * 4 * 16 * 4 / 2**20] * 2)
    status = table.set_index(["collector", "multiple"])["status"]
    assert status[("naive", 1)] == status[("streaming", 2)] == "measured"
    assert status[("naive", 2)] == f"skipped: kept hidden states ~0 MiB > {limit:,.0f} MiB"
    assert math.isnan(table.set_index(["collector", "multiple"]).loc[("naive", 2), "peak_rss_mib"])
    assert "protocol" not in table
    with pytest.raises(ConfigError, match="collector"):
        memory.measure_memory(str(model_dir), batches, [1], activations.StatsSpec(), n_layers=N_LAYERS,
                              hidden=HIDDEN, collectors=("eager",))


def test_run_memory_child_reports_a_failing_child(tmp_path):
    torch.save([], tmp_path / "b.pt")
    with pytest.raises(memory.MemoryChildFailed, match=r"memory child \(streaming, 1x\) exited with 1"):
        memory.run_memory_child(model_spec=str(tmp_path / "missing"), batches_file=tmp_path / "b.pt", multiple=1,
                                collector="streaming", spec=activations.StatsSpec())


def test_naive_estimate_and_bytes_per_value():
    assert memory.naive_estimate_mib(1024, 30, 576) == 67.5  # 1024 · 30 · 576 · 4 bytes
    assert memory.naive_estimate_mib(1024, 30, 576, bytes_per_value=2) == 33.75
    assert (memory.bytes_per_value("float32"), memory.bytes_per_value("bfloat16")) == (4, 2)


def _memory_frame(streaming_peaks, naive_peaks, multiples=(1, 4, 10)):
    rows = []
    for m, s, n in zip(multiples, streaming_peaks, naive_peaks):
        for collector, peak in (("streaming", s), ("naive", n)):
            rows.append({"collector": collector, "multiple": m, "tokens": 700 * m, "positions": 1024 * m,
                         "seconds": 2.0 * m, "peak_rss_mib": peak, "rss_before_pass_mib": 600.0,
                         "pass_increase_mib": peak - 600.0, "status": "measured"})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("peaks, growth, tolerance, flat", [
    ([900, 905, 960], 60, 64, True),  # 5% of 900 is 45: the 64 MiB floor applies
    ([900, 905, 965], 65, 64, False),
    ([2000, 1900, 2100], 100, 100, True),  # 5% of 2000 is 100, above the floor; growth at the boundary
    ([2000, 2000, 2101], 101, 100, False),
    ([1000, 1200, 900], -100, 64, True),  # a shrinking peak is flat
])
def test_memory_flatness_rule(peaks, growth, tolerance, flat):
    f = memory.memory_flatness(_memory_frame(peaks, [0, 0, 0]))
    assert (f["growth_mib"], f["tolerance_mib"], f["flat"], f["tested"]) == (growth, tolerance, flat, True)
    assert (f["multiple_low"], f["multiple_high"], f["tokens_low"], f["tokens_high"]) == (1, 10, 700, 7000)


def test_memory_flatness_ignores_skipped_rows_and_row_order():
    table = _memory_frame([900, 1000, 5000], [1, 2, 3]).iloc[::-1].reset_index(drop=True)
    table.loc[(table["collector"] == "streaming") & (table["multiple"] == 10), "status"] = "skipped: test"
    f = memory.memory_flatness(table)
    assert (f["multiple_low"], f["multiple_high"], f["growth_mib"], f["flat"]) == (1, 4, 100, False)
    single = memory.memory_flatness(_memory_frame([900], [1000], multiples=(2,)))
    assert not single["tested"] and single["growth_mib"] == 0
    with pytest.raises(DataError, match="streaming"):
        memory.memory_flatness(table[table["collector"] == "naive"])


def test_naive_comparison_on_hand_made_tables():
    table = _memory_frame([900, 905, 910], [1000, 1300, 1700])
    c = memory.naive_comparison(table, n_layers=30, hidden=576)
    assert (c["multiple"], c["multiple_low"], c["tokens"]) == (10, 1, 7000)
    assert (c["naive_peak_mib"], c["streaming_peak_mib"], c["naive_seconds"]) == (1700, 910, 20.0)
    assert c["memory_ratio"] == pytest.approx(1700 / 910)
    assert c["growth_per_1000_mib"] == pytest.approx(700 / 9216 * 1000)  # 700 MiB over 10,240 − 1,024 positions
    assert c["expected_per_1000_mib"] == pytest.approx(1000 * 30 * 576 * 4 / 2**20)
    table.loc[(table["collector"] == "naive") & (table["multiple"] > 1), "status"] = "skipped: too big"
    one = memory.naive_comparison(table, n_layers=30, hidden=576)
    assert one["multiple"] == 1 and one["growth_per_1000_mib"] is None and one["expected_per_1000_mib"] is None
    table.loc[table["collector"] == "naive", "status"] = "skipped: too big"
    assert memory.naive_comparison(table, n_layers=30, hidden=576) is None


def test_memory_display_puts_the_collectors_side_by_side():
    table = _memory_frame([900, 905], [1000, 1300], multiples=(1, 4))
    display = memory.memory_display(table)
    assert list(display.columns) == ["multiple", "tokens", "positions", "streaming: peak RSS (MiB)",
                                     "naive: peak RSS (MiB)", "streaming: increase in the pass (MiB)",
                                     "naive: increase in the pass (MiB)", "streaming: seconds", "naive: seconds"]
    assert display["naive: peak RSS (MiB)"].tolist() == [1000, 1300]
    assert display["streaming: increase in the pass (MiB)"].tolist() == [300, 305]


# ----------------------------------------------------------------------------------------- load and wall times


def test_measure_load_times_on_a_folder(model_dir):
    load = load_time.measure_load_times(str(model_dir))
    assert load["kind"] == "folder" and load["model"] == str(model_dir)
    assert load["speedup"] == load["first_load_s"] / load["cached_load_s"]


def _done(run_dir: Path, stage_name: str, **record) -> None:
    done_record(run_dir, stage_name).parent.mkdir(parents=True, exist_ok=True)
    done_record(run_dir, stage_name).write_text(json.dumps(record))


def test_notebook_wall_times_and_summary(tmp_path):
    _done(tmp_path, "02_avss_ranking", seconds=30.0, finished="t2", parameters={})  # an older run: no memory record
    _done(tmp_path, "01_activations", seconds=120.0, peak_rss_mib=1400.0, finished="t1",
          parameters={"n_samples": 512, "seed": 42, "sites": ["block_output"], "flag": True, "max_length": 128})
    _done(tmp_path, "06_performance", seconds=200.0, peak_rss_mib=9000.0, finished="t3", parameters={})
    (tmp_path / "executed").mkdir()
    times = wall_times.notebook_wall_times(tmp_path)
    assert list(times.columns) == ["notebook", "seconds", "share", "peak_rss_mib", "finished", "sizes"]
    assert list(times["notebook"]) == ["01_activations", "02_avss_ranking"]
    assert times["share"].tolist() == pytest.approx([0.8, 0.2])
    assert math.isnan(times["peak_rss_mib"].iloc[1])
    assert times["sizes"].tolist() == ["n_samples=512, max_length=128", ""]
    summary = wall_times.wall_time_summary(times, 14000.0)
    assert summary == {"n_notebooks": 2, "total_minutes": 2.5, "slowest": "01_activations", "slowest_seconds": 120.0,
                       "slowest_share": 0.8, "largest_rss_notebook": "01_activations", "largest_rss_mib": 1400.0,
                       "largest_rss_share": 0.1, "machine_gib": 14000.0 / 1024}
    unknown = wall_times.wall_time_summary(times, math.nan)
    assert unknown["largest_rss_mib"] == 1400.0 and unknown["largest_rss_share"] is None
    no_rss = wall_times.wall_time_summary(times.iloc[1:].assign(share=1.0), 14000.0)
    assert no_rss["largest_rss_mib"] is None and no_rss["slowest"] == "02_avss_ranking"
    empty = wall_times.notebook_wall_times(tmp_path / "nothing")
    assert empty.empty and wall_times.wall_time_summary(empty, 1.0) is None
    done_record(tmp_path, "03_pruning").parent.mkdir()
    done_record(tmp_path, "03_pruning").write_text("{broken")
    with pytest.raises(DataError, match="03_pruning"):
        wall_times.notebook_wall_times(tmp_path)


# ----------------------------------------------------------------------------------------- phrases


def test_count_span_and_verdict_phrases():
    assert (prose.count(1, "batch", "batches"), prose.count(3, "batch", "batches")) == ("1 batch", "3 batches")
    assert (prose.count(1, "site"), prose.count(1200, "site")) == ("1 site", "1,200 sites")
    assert prose.span(0.5, 0.75, "{:.0%}") == "50%–75%" and prose.span(0.501, 0.504, "{:.0%}") == "50%"
    assert (prose.target_verdict(True), prose.target_verdict(False)) == ("within", "above")
    assert (prose.agreement_verdict(True), prose.agreement_verdict(False)) == ("agree within", "differ by more than")
    assert prose.flatness_verdict({"tested": True, "flat": True}) == "flat, as targeted"
    assert prose.flatness_verdict({"tested": True, "flat": False}) == "not flat, against the flat target"
    assert prose.flatness_verdict({"tested": False, "flat": True}).startswith("with a single token multiple")
    assert prose.machine_memory(24 * 1024.0) == "24 GiB of memory"
    assert prose.machine_memory(math.nan) == "memory of a size the OS does not report"


def test_naive_comparison_phrase():
    table = _memory_frame([900, 910], [1000, 1700], multiples=(1, 10))
    two = prose.naive_comparison(memory.naive_comparison(table, n_layers=30, hidden=576))
    assert two == ("At 10× (7,000 tokens) keeping every layer's hidden states peaked at 1,700 MiB against 910 MiB "
                   "for the streaming collector, 1.87× the memory, and took 20.0 s against 20.0 s; from 1× to 10× the "
                   "naive peak grew by 76.0 MiB per 1,000 positions, against 65.9 MiB for the kept hidden states "
                   "alone (30 layers × 576 values × 4 bytes), while the target for the streaming pass is no growth.")
    one = prose.naive_comparison(memory.naive_comparison(table[table["multiple"] == 1], n_layers=30, hidden=576))
    assert one == ("At 1× (700 tokens) keeping every layer's hidden states peaked at 1,000 MiB against 900 MiB for "
                   "the streaming collector, 1.11× the memory, and took 2.0 s against 2.0 s.")
    less = prose.naive_comparison(memory.naive_comparison(_memory_frame([1000], [800], (1,)), n_layers=30, hidden=576))
    assert "only 0.80× the memory" in less
    assert prose.naive_comparison(None).startswith("The naive collection was not measured")


def test_load_phrases():
    gguf = {"model": "m", "kind": "gguf", "first_load_s": 20.0, "cached_load_s": 2.0, "speedup": 10.0}
    assert prose.load_phrases(gguf)["load_verdict"] == "only the first load pays for the dequantisation, as targeted"
    slow = prose.load_phrases({**gguf, "cached_load_s": 20.0})["load_verdict"]
    assert slow.startswith("the cache saved nothing")
    folder = prose.load_phrases({**gguf, "model": "/m", "kind": "folder"})
    assert folder == {"load_first": "of '/m', a folder checkpoint with no GGUF conversion,",
                      "load_second": "the second load", "load_verdict": "with no conversion step the cache target does not apply"}


def test_speed_phrases():
    speed = pd.DataFrame({"n_removed": [8, 15], "n_layers": [30, 30], "measured_speedup": [1.3, 0.9],
                          "theoretical_speedup": [30 / 22, 2.0]})
    assert prose.speedup_list(speed) == "×1.30 for 8/30 layers (theory ×1.36); ×0.90 for 15/30 layers (theory ×2.00)"
    assert prose.speed_direction(speed) == "faster at some ratios only"
    assert prose.speed_direction(speed.assign(measured_speedup=[1.1, 1.5])) == "faster at every ratio"
    assert prose.speed_direction(speed.assign(measured_speedup=[1.0, 0.5])) == "no faster at any ratio"


def test_wall_time_phrase():
    summary = {"n_notebooks": 2, "total_minutes": 2.5, "slowest": "01_activations", "slowest_seconds": 120.0,
               "slowest_share": 0.8, "largest_rss_notebook": "01_activations", "largest_rss_mib": 1400.0,
               "largest_rss_share": 0.1, "machine_gib": 13.67}
    assert prose.wall_times(summary) == ("The 2 notebooks listed took 2.5 min in total; the slowest, 01_activations, "
                                         "took 120 s (80%); the largest peak RSS was 1,400 MiB (01_activations), 10% "
                                         "of this machine's 14 GiB.")
    assert prose.wall_times({**summary, "largest_rss_share": None}).endswith("(01_activations).")
    assert prose.wall_times({**summary, "n_notebooks": 1, "largest_rss_mib": None}).endswith("took 120 s (80%).")
    assert prose.wall_times(None) == "No notebook of this run has a finished-run record yet."


# ----------------------------------------------------------------------------------------- figures and tables


def test_figures_draw_the_numbers_they_are_given():
    import matplotlib.pyplot as plt

    speed = pd.DataFrame({"removed_fraction": [0.25, 0.5], "measured_speedup": [1.2, 1.6],
                          "estimated_speedup_params": [1.25, 1.7]})
    fig = figures.speedup_figure(speed)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert lines["measured (best run)"].get_ydata().tolist() == [1.2, 1.6]
    assert lines["estimate counting the LM head"].get_ydata().tolist() == [1.25, 1.7]
    theory = lines["theoretical 1/(1 − k/n) (decoder layers)"]
    np.testing.assert_allclose(theory.get_ydata(), 1 / (1 - theory.get_xdata()))
    plt.close(fig)

    result = {"plain_forward_s": 1.0, "stats_pass_s": 1.3, "plain_forward_runs_s": [1.0, 1.1],
              "stats_pass_runs_s": [1.3, 1.4], "target": 1.15, "tokens": 10, "n_batches": 1}
    fig = figures.overhead_figure(result)
    ax = fig.axes[0]
    assert [p.get_height() for p in ax.patches] == [1.0, 1.3]
    assert [line.get_ydata()[0] for line in ax.get_lines()] == [1.15]  # the target line: 1.15 × the plain forward
    assert ax.get_title() == "10 tokens in 1 batch"
    plt.close(fig)

    table = _memory_frame([900, 905, 910], [1000, 1300, 1700])
    table.loc[(table["collector"] == "naive") & (table["multiple"] == 10), "status"] = "skipped: too big"
    fig = figures.memory_figure(table)
    peaks = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert peaks["streaming statistics (this library)"].get_ydata().tolist() == [900, 905, 910]
    assert peaks["naive: output_hidden_states kept"].get_xdata().tolist() == [700, 2800]  # the skipped row is left out
    assert fig.axes[1].get_lines()[0].get_ydata().tolist() == [2.0, 8.0, 20.0]
    plt.close(fig)


def test_tables_label_and_select_what_the_chapter_shows():
    load = {"model": "m", "kind": "gguf", "first_load_s": 20.0, "cached_load_s": 2.0, "speedup": 10.0}
    assert tables.load_table(load).data["load"].tolist() == ["first (GGUF dequantisation)", "from the cache"]
    assert tables.load_table({**load, "kind": "folder"}).data["load"].tolist() == ["first", "second"]
    speed = pd.DataFrame([{c: 1 for c in [*tables.SPEED_COLUMNS, "layers_removed", "batch_shape"]}])
    assert list(tables.speed_table(speed).data.columns) == list(tables.SPEED_COLUMNS)


# ----------------------------------------------------------------------------------------- the stage


GLUE_ROLE = re.compile(r"\{glue:(text|md)\}`([^`:]+)(?::([^`]*))?`")


def _notebook_glue_roles() -> list[tuple[str, str, str]]:
    cells = json.loads((REPO / "notebooks" / "06_performance.ipynb").read_text())["cells"]
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return GLUE_ROLE.findall(text)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")
def test_run_performance_on_a_tiny_model(model_dir, tmp_path, tok):
    """The whole stage: chapter 01's calibration record is used, every artifact is written, and every key the
    notebook's markdown pastes is glued with a value its format applies to."""
    from myst_nb.core.variables import format_plain_text

    run = tmp_path / "run"
    CALIBRATION.write({"benchmark": "wikitext2", "split": "test", "n_samples": 8, "seed": 42, "padding": "longest",
                       "statistics": {"sites": ["block_output"], "abs_thresholds": [1e-3], "rel_taus": [0.1]}}, run)
    _done(run, "01_activations", seconds=10.0, peak_rss_mib=500.0, finished="t", parameters={"n_samples": 8})
    result = stage.run_performance(run, model=str(model_dir), data_root=str(SHARED_DATA), seed=42, n_samples=3,
                                   max_length=16, batch_size=2, token_multiples=[1], repeats=1, prune_ratios=[0.5],
                                   progress=False)
    texts, _ = load_calibration_texts("wikitext2", "test", 3, 42, str(SHARED_DATA))
    expected = make_batches(tok, texts, max_length=16, batch_size=2, padding="longest")  # chapter 01's padding
    assert (result.n_batches, result.positions) == (2, sum(b["attention_mask"].numel() for b in expected))
    assert OVERHEAD.read(run)["sites"] == ["block_output"]
    assert MEMORY.read(run)[["collector", "multiple", "status"]].values.tolist() == [["streaming", 1, "measured"],
                                                                                     ["naive", 1, "measured"]]
    assert VARIANCE_AGREEMENT.read(run)["relative_gap"].max() < overhead.AGREEMENT_TOLERANCE
    assert LOAD.read(run)["kind"] == "folder"
    assert SPEEDUP.read(run)["layers_removed"].tolist() == [[1, 2]]  # round(0.5 · 4) = 2 of 4, the last kept
    assert NOTEBOOK_TIMES.read(run)["notebook"].tolist() == ["01_activations"]
    provenance = PROVENANCE_06.read(run)
    assert provenance["calibration_settings"]["source"] == "01_activations/calibration.json"
    assert provenance["calibration_settings"]["padding"] == "longest"
    assert provenance["data"]["files"] and provenance["data"]["sha256"]  # collected by the reproducibility appendix
    assert set(provenance["timings_s"]) == {"setup", "overhead", "memory", "variance_agreement", "load", "speedup",
                                            "total"}
    glued = result.glue()
    roles = _notebook_glue_roles()
    assert {key for _, key, _ in roles} == set(glued)  # every pasted key is glued, and every glued key is pasted
    for kind, key, fmt in roles:
        value = glued[key]
        assert not isinstance(value, (bool, np.generic)), key
        if kind == "text":
            format_plain_text(repr(value), fmt or "s")  # what the book build does with the glued text/plain
        else:
            assert isinstance(value, str), key
    assert glued["flatness_verdict"] == prose.flatness_verdict({"tested": False, "flat": True})
    assert glued["settings_source"] == "01_activations/calibration.json" and glued["sites"] == "block_output"
