"""The peer benchmark (benchmarks/harness_peer.py) and its record in the performance appendix."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from avss_lib.performance.peer_record import peer_frame, peer_glue
from avss_lib.testing.tiny_models import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("harness_peer", ROOT / "benchmarks" / "harness_peer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_harnesses_give_the_same_results_on_a_tiny_model():
    from lm_eval.models.huggingface import HFLM

    peer = _benchmark()
    model, tok = tiny_model("llama", 2, seed=3), tiny_tokenizer()
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2)
    primer = "Q: a shared primer of some length.\nA: yes.\n\nQ: "
    requests = [(primer + q, " " + c) for q in ("one?\nA:", "two?\nA:") for c in ("yes", "no", "maybe not")]
    result = peer.run(model, tok, lm, requests, [3, 3], ["Q: hi?\nA:", "Q: ho, ho?\nA:"], batch_size=2,
                      max_new_tokens=4)
    ll, gen = result["loglikelihood"], result["generation"]
    assert (ll["requests"], ll["questions"], gen["prompts"]) == (6, 2, 2)
    assert ll["max_loglik_gap"] < 1e-4 and ll["same_greedy"] == ll["same_choice"] == gen["same_text"] == 1.0
    assert result["identical"]
    assert result["total"]["speedup"] == pytest.approx(
        (ll["lm_eval_s"] + gen["lm_eval_s"]) / (ll["ours_s"] + gen["ours_s"]))
    assert peer._chosen([0.0, -1.0, 2.0, -3.0, -0.5], [3, 2]) == [2, 1]


def test_peer_table_reads_the_record_and_says_when_there_is_none():
    record = {"date": "2026-12-07T03:00:00+00:00", "commit": "abcdef1234", "n": 40,
              "machine": {"platform": "Linux-x", "torch_threads": 2}, "versions": {"lm_eval": "0.4.13"},
              "loglikelihood": {"requests": 900, "ours_s": 10.0, "lm_eval_s": 40.0, "speedup": 4.0,
                                "max_loglik_gap": 5e-5, "same_greedy": 1.0, "same_choice": 1.0},
              "generation": {"prompts": 40, "ours_s": 20.0, "lm_eval_s": 22.0, "speedup": 1.1, "same_text": 0.95},
              "total": {"ours_s": 30.0, "lm_eval_s": 62.0, "speedup": 62 / 30}, "identical": False}
    table = peer_frame(record).set_index("requests")
    assert table["lm-eval ÷ ours"].tolist() == [4.0, 1.1, pytest.approx(62 / 30)]
    assert table["n"].tolist() == [900, 40, ""]
    assert table["agreement"].iloc[1] == "same text 95%" and table["agreement"].iloc[2] == "not identical"
    glue = peer_glue(record)
    assert (glue["peer_commit"], glue["peer_n"], glue["peer_speedup"], glue["peer_threads"]) == ("abcdef1", "40",
                                                                                                 "2.07", "2")
    assert "no record committed" in peer_frame(None)["requests"].iloc[0]
    assert set(peer_glue(None).values()) == {"n/a"} and set(peer_glue(None)) == set(glue)
