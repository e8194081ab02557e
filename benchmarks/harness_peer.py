"""Speed benchmark: this book's harness against lm-evaluation-harness's Hugging Face backend on the same requests.

Both run in one process on the same model object, one after the other and then in the reverse order (A B B A), so
drift in the machine's load falls on both alike:

- **log-likelihood** — the multiple-choice requests ``(prompt, " " + choice)`` of the first ``--n`` SciQ test
  questions (open-book, the harness's prompt) and TruthfulQA MC1 and MC2 validation questions (the six-shot primer),
  through :func:`avss_lib.core.harness.loglikelihood` and ``HFLM.loglikelihood``;
- **generation** — greedy answers to the first ``--n`` NQ-open questions after five shots (the file's last
  answered questions, never asked), cut at the stop strings ``"\\n"``, ``"."`` and ``","``, through :func:`avss_lib.core.harness.generate_until`
  and ``HFLM.generate_until``.

It checks that both give the same results — every log-likelihood within 1e-3 with the same greedy flag, the same
chosen answer of every question, the same generated text — and writes ``benchmarks/records/harness_peer.json``:
date, commit, machine, versions, the seconds of each side (mean of its two passes), the ratio lm-eval ÷ ours and
the agreement. The record is committed and shown in the performance appendix.

Usage: ``python benchmarks/harness_peer.py [--n 100] [--threads 2] [--data-root ../shared/data] [--batch-size 8]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avss_lib.book.run_record import benchmark_machine
from avss_lib.core import harness
from avss_lib.core.benchmarks import load_benchmark
from avss_lib.core.io import write_json
from avss_lib.core.models import DEFAULT_MODEL, load_model, model_provenance
from avss_lib.core.tasks import PROMPTS, open_qa_prompt

RECORD = Path(__file__).resolve().parent / "records" / "harness_peer.json"
PACKAGES = ("lm_eval", "torch", "transformers", "avss_lib")
MAX_LOGLIK_GAP = 1e-3


def multiple_choice_requests(data_root: str, n: int) -> tuple[list[tuple[str, str]], list[int]]:
    """The (context, continuation) requests of the first ``n`` SciQ and TruthfulQA MC1/MC2 questions, and how many
    choices each question has (in request order)."""
    requests: list[tuple[str, str]] = []
    sizes: list[int] = []
    for e in load_benchmark("sciq", data_root=data_root, split="test").examples[:n]:
        prompt = PROMPTS["sciq"].format(support=(e.context or "").lstrip(), question=e.question)
        requests += [(prompt, " " + c) for c in e.choices or ()]
        sizes.append(len(e.choices or ()))
    for e in load_benchmark("truthfulqa_mc", data_root=data_root, split="validation").examples[:n]:
        prompt = PROMPTS["truthfulqa"].format(question=e.question)
        for choices in (e.choices or (), e.mc2_choices or ()):
            requests += [(prompt, " " + c) for c in choices]
            sizes.append(len(choices))
    return requests, sizes


def generation_prompts(data_root: str, n: int, shots: int = 5) -> list[str]:
    """Five-shot NQ-open prompts of the first ``n`` questions, the shots the file's last answered questions."""
    examples = load_benchmark("nq_open", data_root=data_root).examples
    solved = [e for e in examples[n:] if e.answers][-shots:]
    return [open_qa_prompt("nq_open", e.question, solved) for e in examples[:n]]


def _abba(first: Callable[[], Any], second: Callable[[], Any]) -> tuple[Any, Any, float, float]:
    """Run ``first, second, second, first``: each one's result and its mean seconds over its two passes."""
    times: dict[int, list[float]] = {0: [], 1: []}
    results: dict[int, Any] = {}
    for k in (0, 1, 1, 0):
        start = time.perf_counter()
        results[k] = (first, second)[k]()
        times[k].append(time.perf_counter() - start)
    return results[0], results[1], float(np.mean(times[0])), float(np.mean(times[1]))


def _chosen(logprobs: Sequence[float], sizes: Sequence[int]) -> list[int]:
    out, pos = [], 0
    for size in sizes:
        out.append(int(np.argmax(logprobs[pos:pos + size])))
        pos += size
    return out


def run(model: Any, tokenizer: Any, lm: Any, requests: list[tuple[str, str]], sizes: list[int], prompts: list[str],
        batch_size: int, max_new_tokens: int = harness.DEFAULT_MAX_NEW_TOKENS) -> dict[str, Any]:
    """Both harnesses on the same requests (A B B A): times, ratios and agreement."""
    from lm_eval.api.instance import Instance

    stop = list(harness.QA_STOP)
    ll_instances = [Instance("loglikelihood", {}, request, i) for i, request in enumerate(requests)]
    gen_instances = [Instance("generate_until", {}, (p, {"until": stop, "max_gen_toks": max_new_tokens,
                                                          "do_sample": False}), i) for i, p in enumerate(prompts)]
    ours_ll, theirs_ll, ours_ll_s, theirs_ll_s = _abba(
        lambda: harness.loglikelihood(model, tokenizer, requests, batch_size=batch_size),
        lambda: lm.loglikelihood(ll_instances, disable_tqdm=True))
    ours_gen, theirs_gen, ours_gen_s, theirs_gen_s = _abba(
        lambda: harness.generate_until(model, tokenizer, prompts, stop=stop, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size),
        lambda: lm.generate_until(gen_instances, disable_tqdm=True))
    gaps = [abs(a.logprob - float(b[0])) for a, b in zip(ours_ll, theirs_ll)]
    same_greedy = float(np.mean([a.is_greedy == bool(b[1]) for a, b in zip(ours_ll, theirs_ll)]))
    same_choice = float(np.mean(np.equal(_chosen([a.logprob for a in ours_ll], sizes),
                                         _chosen([float(b[0]) for b in theirs_ll], sizes))))
    same_text = float(np.mean([a.text == b.strip() for a, b in zip(ours_gen, theirs_gen)]))
    return {
        "loglikelihood": {"requests": len(requests), "questions": len(sizes), "ours_s": ours_ll_s,
                          "lm_eval_s": theirs_ll_s, "speedup": theirs_ll_s / ours_ll_s,
                          "max_loglik_gap": max(gaps), "same_greedy": same_greedy, "same_choice": same_choice},
        "generation": {"prompts": len(prompts), "ours_s": ours_gen_s, "lm_eval_s": theirs_gen_s,
                       "speedup": theirs_gen_s / ours_gen_s, "same_text": same_text},
        "total": {"ours_s": ours_ll_s + ours_gen_s, "lm_eval_s": theirs_ll_s + theirs_gen_s,
                  "speedup": (theirs_ll_s + theirs_gen_s) / (ours_ll_s + ours_gen_s)},
        "identical": bool(max(gaps) <= MAX_LOGLIK_GAP and same_greedy == 1.0 and same_choice == 1.0
                          and same_text == 1.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="questions per data set")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (both harnesses)")
    parser.add_argument("--data-root", default=os.environ.get("AVSS_DATA_DIR", "../shared/data"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--record", type=Path, default=RECORD)
    args = parser.parse_args()
    from lm_eval.models.huggingface import HFLM

    torch.set_num_threads(args.threads)
    started = dt.datetime.now(dt.timezone.utc)
    model, tokenizer = load_model(DEFAULT_MODEL, device="cpu", dtype="float32")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    requests, sizes = multiple_choice_requests(args.data_root, args.n)
    prompts = generation_prompts(args.data_root, args.n)
    run(model, tokenizer, lm, requests[:16], sizes[:4], prompts[:4], args.batch_size)  # warm-up, not timed
    result = run(model, tokenizer, lm, requests, sizes, prompts, args.batch_size)
    record = {"date": started.isoformat(timespec="seconds"), **benchmark_machine(PACKAGES), "n": args.n,
              "model": model_provenance(DEFAULT_MODEL), "batch_size": args.batch_size, **result}
    write_json(record, args.record)
    for kind in ("loglikelihood", "generation", "total"):
        r = result[kind]
        print(f"{kind}: ours {r['ours_s']:.1f} s, lm-eval {r['lm_eval_s']:.1f} s, ratio {r['speedup']:.2f}x")
    print(f"identical results: {result['identical']}; record: {args.record}")


if __name__ == "__main__":
    main()
