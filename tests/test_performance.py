"""The performance appendix's machinery on tiny random models: the naive collector against the streaming one,
the memory child's JSON protocol, the speed-up formula, the wall-time table and input validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from avss_lib.core import activation_stats as activations
from avss_lib.performance import measurements as performance
from avss_lib.core.calibration_text import make_batches
from avss_lib.core.errors import ConfigError, DataError
from avss_lib.core.layers import find_layers
from avss_lib.testing.tiny_models import tiny_model, tiny_tokenizer

TEXTS = ["The cat sat on the mat.", "A", "Pack my box with five dozen liquor jugs, then go home.", "Short one",
         "Sphinx of black quartz, judge my vow", "x y z"]
N_LAYERS = 4


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


# ----------------------------------------------------------------------------------------- naive vs streaming


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("padding", ["max_length", "longest"])
def test_naive_variances_equal_streaming(tok, model_type, padding):
    model = tiny_model(model_type, N_LAYERS, seed=1)
    batches = make_batches(tok, TEXTS, max_length=24, batch_size=4, padding=padding)
    streaming = activations.collect_activation_stats(model, batches, activations.StatsSpec(("block_output",)),
                                                     progress=False)
    naive = performance.naive_hidden_state_stats(model, batches)
    assert list(naive["layer"]) == list(range(N_LAYERS))
    block = streaming[streaming["site"] == "block_output"].set_index("layer")
    for column in ("pooled_var_padded", "pooled_var_masked", "elem_var"):
        np.testing.assert_allclose(naive.set_index("layer")[column], block[column], rtol=1e-5)
    assert (naive["n_tokens"] == block["n_tokens"].to_numpy()).all()
    agreement = performance.variance_agreement(streaming, naive)
    assert agreement["relative_gap"].max() < 1e-5
    assert set(agreement["statistic"]) == {"pooled_var_padded", "pooled_var_masked", "elem_var"}
    assert f"over {N_LAYERS} layers" in performance.agreement_sentence(agreement)


def test_naive_last_layer_is_the_raw_block_output_not_the_final_norm(tok, batches):
    """transformers' last hidden state is normed; the naive collector must use the last block's raw output."""
    model = tiny_model("llama", N_LAYERS, seed=1)
    naive = performance.naive_hidden_state_stats(model, batches)
    with torch.inference_mode():
        out = model(**batches[0], output_hidden_states=True, use_cache=False)
    normed = out.hidden_states[-1].double().mean(dim=1).var(dim=-1)
    streaming = activations.collect_activation_stats(model, batches, activations.StatsSpec(("block_output",)),
                                                     progress=False)
    last = streaming[(streaming["site"] == "block_output") & (streaming["layer"] == N_LAYERS - 1)]
    assert naive["pooled_var_padded"].iloc[-1] == pytest.approx(float(last["pooled_var_padded"].iloc[0]), rel=1e-5)
    assert naive["pooled_var_padded"].iloc[-1] != pytest.approx(float(normed.mean()), rel=1e-3)


def test_naive_empty_and_repeat_batches(batches):
    model = tiny_model("llama", N_LAYERS)
    with pytest.raises(ConfigError, match="empty"):
        performance.naive_hidden_state_stats(model, [])
    assert len(list(performance.repeat_batches(batches, 3))) == 3 * len(batches)
    with pytest.raises(ConfigError):
        list(performance.repeat_batches(batches, 0))
    tokens, positions = performance.token_counts(batches)
    assert positions == len(TEXTS) * 24 and 0 < tokens < positions


# ----------------------------------------------------------------------------------------- overhead and speed


def test_measure_overhead_on_tiny_model(batches):
    model = tiny_model("llama", N_LAYERS)
    result, stats = performance.measure_overhead(model, batches, activations.StatsSpec(), repeats=2)
    assert result["overhead_ratio"] == pytest.approx(result["stats_pass_s"] / result["plain_forward_s"])
    assert result["stats_pass_s"] == min(result["stats_pass_runs_s"]) and len(result["plain_forward_runs_s"]) == 2
    assert result["meets_target"] == (result["overhead_ratio"] <= performance.OVERHEAD_TARGET)
    assert set(stats["site"]) == set(activations.SITES)
    sentence = performance.overhead_sentence(result)
    assert f"{result['overhead_ratio']:.2f}×" in sentence and f"{result['tokens']:,} tokens" in sentence
    with pytest.raises(ConfigError, match="repeats"):
        performance.measure_overhead(model, batches, activations.StatsSpec(), repeats=0)


def test_overhead_sentence_verdicts():
    base = {"n_batches": 2, "tokens": 100, "positions": 128, "sites": ["block_output"], "plain_forward_s": 1.0,
            "repeats": 3, "torch_threads": 2, "target": 1.15}
    within = performance.overhead_sentence({**base, "stats_pass_s": 1.1, "overhead_ratio": 1.1, "meets_target": True})
    assert "within" in within and "2 padded batches" in within and "on 1 site took" in within
    assert "above" in performance.overhead_sentence({**base, "stats_pass_s": 1.5, "overhead_ratio": 1.5, "meets_target": False})


@pytest.mark.parametrize("ratio, expected", [(0.25, 4 / 3), (0.5, 2.0), (0.125, 8 / 7), (0.75, 4.0)])
def test_theoretical_speedup(ratio, expected):
    assert performance.theoretical_speedup(ratio) == pytest.approx(expected)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, True, "0.25"])
def test_theoretical_speedup_rejects_ratios_outside_unit_interval(ratio):
    with pytest.raises(ConfigError, match="outside"):
        performance.theoretical_speedup(ratio)


def test_measure_pruning_speedups_on_tiny_model(batches):
    model = tiny_model("llama", 8)
    speed = performance.measure_pruning_speedups(model, batches[0], [0.5, 0.25], repeats=2)
    assert list(speed["ratio"]) == [0.25, 0.5] and list(speed["n_removed"]) == [2, 4]
    assert speed["theoretical_speedup"].tolist() == pytest.approx([8 / 6, 2.0])
    assert (speed["measured_speedup"] == speed["seconds_unpruned"] / speed["seconds_pruned"]).all()
    assert speed["layers_removed"].iloc[0] == "5 6"  # last-k: the deepest layers except the final one
    assert "×" in performance.speedup_sentence(speed)
    single = performance.speedup_sentence(speed.iloc[:1])
    assert f"×{speed['theoretical_speedup'].iloc[0]:.2f}" in single and "–" not in single
    assert len(find_layers(model)) == 8  # the original model is untouched
    with pytest.raises(ConfigError, match="outside"):
        performance.measure_pruning_speedups(model, batches[0], [0.25, 1.0])


def test_speed_layers():
    assert performance.speed_layers(30, 4) == [25, 26, 27, 28]
    with pytest.raises(ConfigError):
        performance.speed_layers(4, 4)


# ----------------------------------------------------------------------------------------- input checks


def test_check_token_multiples():
    assert performance.check_token_multiples([10, 1, 4]) == [1, 4, 10]
    assert performance.check_token_multiples((np.int64(2),)) == [2]
    for bad in ([0], [1, -2], [1.5], [True], [], "14", [2, 2], None, [[1]]):
        with pytest.raises(ConfigError):
            performance.check_token_multiples(bad)


def test_check_ratios_and_positive_int():
    assert performance.check_ratios([0.5, 0.125]) == [0.125, 0.5]
    for bad in ([], [0.25, 0.25], [0], [1], "0.5", [None], [[0.5]]):
        with pytest.raises(ConfigError):
            performance.check_ratios(bad)
    assert performance.check_positive_int("repeats", 3) == 3
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(ConfigError, match="repeats"):
            performance.check_positive_int("repeats", bad)


def test_calibration_settings_from_meta():
    default = performance.calibration_settings(None)
    assert default["source"] == "defaults" and default["spec"] == activations.StatsSpec()
    meta = {"data": {"benchmark": "wikitext2", "split": "validation"},
            "parameters": {"sites": ["mlp_activation"], "abs_thresholds": [1e-4], "rel_taus": [0.2], "padding": "longest"}}
    got = performance.calibration_settings(meta)
    assert got["split"] == "validation" and got["padding"] == "longest"
    assert got["spec"] == activations.StatsSpec(("mlp_activation",), (1e-4,), (0.2,))
    with pytest.raises(ConfigError, match="site"):
        performance.calibration_settings({"parameters": {"sites": ["nowhere"]}})


# ----------------------------------------------------------------------------------------- memory children


def test_memory_child_in_process(model_dir, batches, tmp_path):
    file = tmp_path / "batches.pt"
    torch.save(batches, file)
    tokens, positions = performance.token_counts(batches)
    for collector in performance.COLLECTORS:
        record = performance.memory_child(model_spec=str(model_dir), batches_file=file, multiple=3,
                                          collector=collector, spec=activations.StatsSpec())
        assert record["protocol"] == performance.CHILD_PROTOCOL and record["collector"] == collector
        assert record["tokens"] == 3 * tokens and record["positions"] == 3 * positions
        assert record["n_batches"] == 3 * len(batches)
        assert record["peak_rss_mib"] >= record["rss_before_pass_mib"] > 0
        assert record["seconds"] > 0
    with pytest.raises(ConfigError, match="collector"):
        performance.memory_child(model_spec=str(model_dir), batches_file=file, multiple=1, collector="eager",
                                 spec=activations.StatsSpec())


def test_memory_child_json_protocol_in_subprocess(model_dir, batches):
    """The parent runs the child as `python -m avss_lib.performance.measurements memory-child` and reads its last JSON line."""
    memory = performance.measure_memory(str(model_dir), batches, [2, 1], activations.StatsSpec(), n_layers=N_LAYERS,
                                        hidden=16, naive_limit_mib=performance.naive_estimate_mib(
                                            performance.token_counts(batches)[1], N_LAYERS, 16) * 1.5,
                                        progress=False)
    assert list(zip(memory["collector"], memory["multiple"])) == [("streaming", 1), ("naive", 1), ("streaming", 2),
                                                                   ("naive", 2)]
    status = memory.set_index(["collector", "multiple"])["status"]
    assert status[("naive", 2)].startswith("skipped") and status[("naive", 1)] == "measured"
    measured = memory[memory["status"] == "measured"]
    assert (measured["peak_rss_mib"] > 0).all() and (measured["peak_method"] != "").all()
    assert (measured["pass_increase_mib"] >= 0).all()
    assert "protocol" not in memory
    display = performance.memory_display(memory)
    assert list(display["multiple"]) == [1, 2] and "naive: peak RSS (MiB)" in display
    assert list(display.columns[3:5]) == ["streaming: peak RSS (MiB)", "naive: peak RSS (MiB)"]


def test_parse_child_output_and_failures(tmp_path):
    line = json.dumps({"protocol": performance.CHILD_PROTOCOL, "peak_rss_mib": 1.0})
    assert performance.parse_child_output(f"progress...\n{{not json\n{line}\n")["peak_rss_mib"] == 1.0
    with pytest.raises(performance.MemoryChildFailed, match="no"):
        performance.parse_child_output('noise\n{"protocol": "other"}\n')
    torch.save([], tmp_path / "b.pt")
    with pytest.raises(performance.MemoryChildFailed, match="exited"):
        performance.run_memory_child(model_spec=str(tmp_path / "missing"), batches_file=tmp_path / "b.pt", multiple=1,
                                     collector="streaming", spec=activations.StatsSpec())


def _memory_frame(streaming_peaks, naive_peaks, multiples=(1, 4, 10)):
    rows = []
    for m, s, n in zip(multiples, streaming_peaks, naive_peaks):
        for collector, peak in (("streaming", s), ("naive", n)):
            rows.append({"collector": collector, "multiple": m, "tokens": 700 * m, "positions": 1024 * m,
                         "seconds": 2.0 * m, "peak_rss_mib": peak, "rss_before_pass_mib": 600.0, "status": "measured"})
    return pd.DataFrame(rows)


def test_memory_flatness_and_sentences():
    flat = _memory_frame([900, 905, 910], [1000, 1300, 1700])
    f = performance.memory_flatness(flat)
    assert f["flat"] and f["growth_mib"] == 10 and f["tokens_high"] == 7000
    assert "flat, as targeted" in performance.memory_sentence(flat)
    growing = _memory_frame([900, 1200, 1500], [1000, 1300, 1700])
    assert not performance.memory_flatness(growing)["flat"]
    assert "not flat" in performance.memory_sentence(growing)
    text = performance.naive_sentence(flat, n_layers=30, hidden=576)
    assert "1,700 MiB" in text and "910 MiB" in text
    expected = 30 * 576 * 4 * 1000 / 2**20
    assert f"{expected:,.1f} MiB" in text
    with pytest.raises(DataError):
        performance.memory_flatness(flat[flat["collector"] == "naive"])


def test_naive_estimate():
    assert performance.naive_estimate_mib(1024, 30, 576) == pytest.approx(1024 * 30 * 576 * 4 / 2**20)


# ----------------------------------------------------------------------------------------- load and wall times


def test_measure_load_times_on_a_folder(model_dir):
    load = performance.measure_load_times(str(model_dir))
    assert load["kind"] == "folder" and load["first_load_s"] > 0 and load["cached_load_s"] > 0
    assert "no GGUF conversion" in performance.load_sentence(load)
    gguf = {"model": "m", "kind": "gguf", "first_load_s": 20.0, "cached_load_s": 2.0, "speedup": 10.0}
    assert "10.0× faster" in performance.load_sentence(gguf) and "as targeted" in performance.load_sentence(gguf)


def _done(folder: Path, **record) -> None:
    folder.mkdir(parents=True)
    (folder / "_done.json").write_text(json.dumps(record))


def test_notebook_wall_times(tmp_path):
    _done(tmp_path / "01_activations", seconds=120.0, peak_rss_mib=1400.0, finished="t1",
          parameters={"n_samples": 512, "seed": 42, "sites": ["block_output"], "flag": True, "max_length": 128})
    _done(tmp_path / "02_avss_ranking", seconds=30.0, finished="t2", parameters={})  # an older run: no memory record
    _done(tmp_path / "06_performance", seconds=200.0, peak_rss_mib=9000.0, finished="t3", parameters={})
    (tmp_path / "executed").mkdir()
    times = performance.notebook_wall_times(tmp_path)
    assert list(times["notebook"]) == ["01_activations", "02_avss_ranking"]
    assert times["share"].tolist() == pytest.approx([0.8, 0.2])
    assert math.isnan(times["peak_rss_mib"].iloc[1])
    assert times["sizes"].iloc[0] == "n_samples=512, max_length=128"
    sentence = performance.wall_time_sentence(times, machine_mib=14000.0)
    assert "2.5 min" in sentence and "01_activations" in sentence and "1,400 MiB" in sentence and "10%" in sentence
    assert "reproducibility appendix" in sentence
    empty = performance.notebook_wall_times(tmp_path / "nothing")
    assert empty.empty and "No notebook" in performance.wall_time_sentence(empty)
    (tmp_path / "03_pruning").mkdir()
    (tmp_path / "03_pruning" / "_done.json").write_text("{broken")
    with pytest.raises(DataError, match="03_pruning"):
        performance.notebook_wall_times(tmp_path)


def test_figures_have_labelled_axes(batches):
    import matplotlib.pyplot as plt

    speed = pd.DataFrame({"removed_fraction": [0.25, 0.5], "measured_speedup": [1.2, 1.6],
                          "estimated_speedup_params": [1.25, 1.7]})
    overhead = {"plain_forward_s": 1.0, "stats_pass_s": 1.3, "plain_forward_runs_s": [1.0, 1.1],
                "stats_pass_runs_s": [1.3, 1.4], "target": 1.15, "tokens": 10, "n_batches": 1}
    for fig in (performance.speedup_figure(speed), performance.memory_figure(_memory_frame([1, 2, 3], [4, 5, 6])),
                performance.overhead_figure(overhead)):
        for ax in fig.axes:
            assert ax.get_ylabel()
        plt.close(fig)
