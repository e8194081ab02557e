"""Chapter 06, the performance appendix: every measurement, its artifacts and the numbers its prose needs.

:func:`run_performance` does what the notebook ``notebooks/06_performance.ipynb`` shows: on the base calibration
set (:mod:`avss_lib.performance.calibration_set`) it measures the statistics pass against a plain forward
(:mod:`~avss_lib.performance.overhead`), its memory against the number of tokens next to the naive collection
(:mod:`~avss_lib.performance.memory`), the agreement of both collectors' variances, the model's load time
(:mod:`~avss_lib.performance.load_time`), the pruned model's speed (:mod:`~avss_lib.performance.pruning_speed`)
and lists the wall time of the run's notebooks (:mod:`~avss_lib.performance.wall_times`). Everything is
measured on the machine that runs it, except the comparison with lm-evaluation-harness, read from its benchmark's
committed record (:mod:`~avss_lib.performance.peer_record`); it writes the artifacts of stage 06 of
:mod:`avss_lib.core.artifacts` and returns a :class:`PerformanceResult`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from avss_lib.core import models
from avss_lib.core.artifacts import (CALIBRATION, LOAD, MEMORY, NOTEBOOK_TIMES, OVERHEAD, PROVENANCE_06, SPEEDUP,
                                     VARIANCE_AGREEMENT, RunDir)
from avss_lib.core.formatting import finite_or_none
from avss_lib.core.layers import find_layers
from avss_lib.performance import prose
from avss_lib.performance.calibration_set import base_batches, calibration_settings, token_counts
from avss_lib.performance.load_time import measure_load_times
from avss_lib.performance.memory import (FLAT_TOLERANCE, FLAT_TOLERANCE_MIB, bytes_per_value, measure_memory,
                                         memory_flatness, naive_comparison)
from avss_lib.performance.overhead import (agreement_summary, measure_overhead, naive_hidden_state_stats,
                                           variance_agreement)
from avss_lib.performance.parameter_checks import check_positive_int, check_ratios, check_token_multiples
from avss_lib.performance.peer_record import peer_glue, peer_record
from avss_lib.performance.pruning_speed import measure_pruning_speedups
from avss_lib.performance.wall_times import SELF_NOTEBOOK, machine_memory_mib, notebook_wall_times, wall_time_summary


@dataclass
class PerformanceResult:
    """What chapter 06 measured: the inputs of its figures, tables and prose."""

    settings: dict[str, Any]  # calibration_settings: dataset, split, padding, spec, source
    n_samples: int
    seed: int
    max_length: int
    batch_size: int
    n_layers: int
    hidden: int
    bytes_per_value: int
    n_batches: int
    tokens: int
    positions: int
    overhead: dict[str, Any]
    memory: pd.DataFrame
    agreement: pd.DataFrame
    load: dict[str, Any]
    speed: pd.DataFrame
    times: pd.DataFrame
    machine: dict[str, Any]  # torch_threads, cpus, memory_mib
    peer: dict[str, Any] | None = None  # the peer benchmark's committed record (benchmarks/harness_peer.py)

    def flatness(self) -> dict[str, Any]:
        return memory_flatness(self.memory)

    def naive(self) -> dict[str, Any] | None:
        return naive_comparison(self.memory, n_layers=self.n_layers, hidden=self.hidden,
                                bytes_per_value=self.bytes_per_value)

    def glue(self) -> dict[str, Any]:
        """Every number and phrase the chapter's markdown pastes, by key."""
        o, f, a = self.overhead, self.flatness(), agreement_summary(self.agreement)
        speed = self.speed
        return {
            # the base set and the machine
            "n_samples": self.n_samples, "seed": self.seed, "batch_size": self.batch_size, "max_length": self.max_length,
            "dataset": self.settings["dataset"], "split": self.settings["split"], "padding": self.settings["padding"],
            "sites": ", ".join(self.settings["spec"].sites), "settings_source": self.settings["source"],
            "n_batches": prose.count(self.n_batches, "batch", "batches"), "tokens": self.tokens,
            "positions": self.positions, "n_layers": self.n_layers, "hidden": self.hidden,
            "torch_threads": self.machine["torch_threads"], "cpus": self.machine["cpus"],
            "machine_memory": prose.machine_memory(self.machine["memory_mib"]),
            # overhead
            "overhead_batches": prose.count(o["n_batches"], "padded batch", "padded batches"),
            "overhead_sites": prose.count(len(o["sites"]), "site"), "repeats": o["repeats"],
            "overhead_threads": prose.count(o["torch_threads"], "CPU thread"),
            "stats_pass_s": float(o["stats_pass_s"]), "plain_forward_s": float(o["plain_forward_s"]),
            "overhead_ratio": float(o["overhead_ratio"]), "overhead_target": float(o["target"]),
            "overhead_verdict": prose.target_verdict(o["meets_target"]),
            # memory
            "stream_multiple_low": f["multiple_low"], "stream_multiple_high": f["multiple_high"],
            "stream_tokens_low": f["tokens_low"], "stream_tokens_high": f["tokens_high"],
            "stream_peak_low_mib": f["peak_low_mib"], "stream_peak_high_mib": f["peak_high_mib"],
            "stream_growth_mib": f["growth_mib"], "stream_token_factor": f["tokens_high"] / f["tokens_low"],
            "flat_tolerance_mib": f["tolerance_mib"], "flat_tolerance_share": FLAT_TOLERANCE,
            "flat_tolerance_floor_mib": FLAT_TOLERANCE_MIB, "flatness_verdict": prose.flatness_verdict(f),
            "naive_comparison": prose.naive_comparison(self.naive()),
            # variance agreement
            "agreement_layers": a["n_layers"], "agreement_statistics": a["n_statistics"],
            "agreement_max_gap": a["max_relative_gap"], "agreement_worst_statistic": a["worst_statistic"],
            "agreement_worst_layer": a["worst_layer"], "agreement_tolerance": a["tolerance"],
            "agreement_verdict": prose.agreement_verdict(a["agree"]),
            # model load
            "first_load_s": float(self.load["first_load_s"]), "cached_load_s": float(self.load["cached_load_s"]),
            "load_ratio": float(self.load["speedup"]), **prose.load_phrases(self.load),
            # pruning speed
            "speed_batch_shape": str(speed["batch_shape"].iloc[0]), "speed_direction": prose.speed_direction(speed),
            "speedup_list": prose.speedup_list(speed),
            "speed_share": prose.span(speed["measured_over_theoretical"].min(),
                                      speed["measured_over_theoretical"].max(), "{:.0%}"),
            "speed_estimate": prose.span(speed["estimated_speedup_params"].min(),
                                         speed["estimated_speedup_params"].max(), "×{:.2f}"),
            # wall times
            "wall_times": prose.wall_times(wall_time_summary(self.times, self.machine["memory_mib"])),
            "self_notebook": SELF_NOTEBOOK,
            # this harness against lm-evaluation-harness (a committed record)
            **peer_glue(self.peer),
        }


def run_performance(run_dir: RunDir, *, model: str = models.DEFAULT_MODEL, device: str = "cpu",
                    dtype: str = "float32", data_root: str | None = None, seed: int = 42, n_samples: int = 16,
                    max_length: int = 128, batch_size: int = 8, token_multiples: Sequence[int] = (1, 4, 10),
                    repeats: int = 3, prune_ratios: Sequence[float] = (0.125, 0.25, 0.375, 0.5),
                    calibration: Mapping[str, Any] | None = None, progress: bool = True) -> PerformanceResult:
    """Run every measurement of chapter 06 and write its artifacts to ``run_dir``.

    ``calibration`` is chapter 01's ``CALIBRATION`` record, whose data set, split, padding and statistics the base
    set uses; None reads it from ``run_dir`` (the defaults when the run has none). The sizes of the base set
    (``n_samples`` paragraphs drawn with ``seed``, ``max_length``, ``batch_size``) are this chapter's own.
    """
    torch.manual_seed(seed)
    started = time.perf_counter()
    multiples, ratios = check_token_multiples(token_multiples), check_ratios(prune_ratios)
    repeats = check_positive_int("repeats", repeats)
    if calibration is None and CALIBRATION.exists(run_dir):
        calibration = CALIBRATION.read(run_dir)
    settings = calibration_settings(calibration)
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = now - since
        return now

    lm, tokenizer = models.load_model(model, device=device, dtype=dtype)
    n_layers, hidden = len(find_layers(lm)), int(lm.config.hidden_size)
    batches, data_provenance = base_batches(
        tokenizer, data_root=data_root, n_samples=n_samples, seed=seed, max_length=max_length, batch_size=batch_size,
        dataset=settings["dataset"], split=settings["split"], padding=settings["padding"])
    tokens, positions = token_counts(batches)
    t = lap("setup", started)
    overhead, stats = measure_overhead(lm, batches, settings["spec"], repeats=repeats, progress=progress)
    OVERHEAD.write(overhead, run_dir)
    t = lap("overhead", t)
    width = bytes_per_value(dtype)
    memory = measure_memory(model, batches, multiples, settings["spec"], n_layers=n_layers, hidden=hidden,
                            device=device, dtype=dtype, progress=progress)
    MEMORY.write(memory, run_dir)
    t = lap("memory", t)
    agreement = variance_agreement(stats, naive_hidden_state_stats(lm, batches))
    VARIANCE_AGREEMENT.write(agreement, run_dir)
    t = lap("variance_agreement", t)
    load = measure_load_times(model, device=device, dtype=dtype)
    LOAD.write(load, run_dir)
    t = lap("load", t)
    speed = measure_pruning_speedups(lm, batches[0], ratios, repeats=repeats, progress=progress)
    SPEEDUP.write(speed, run_dir)
    t = lap("speedup", t)
    times = notebook_wall_times(run_dir)
    NOTEBOOK_TIMES.write(times, run_dir)
    lap("total", started)
    machine = {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "memory_mib": machine_memory_mib()}
    PROVENANCE_06.write({
        "model": models.model_provenance(model), "data": data_provenance,
        "calibration_settings": {**{k: v for k, v in settings.items() if k != "spec"},
                                 "sites": list(settings["spec"].sites),
                                 "abs_thresholds": list(settings["spec"].abs_thresholds),
                                 "rel_taus": list(settings["spec"].rel_taus)},
        "n_layers": n_layers, "hidden": hidden, "n_batches": len(batches), "tokens": tokens, "positions": positions,
        "torch_threads": machine["torch_threads"], "cpus": machine["cpus"],
        "memory_mib": finite_or_none(machine["memory_mib"]), "timings_s": timings}, run_dir)
    return PerformanceResult(settings=settings, n_samples=n_samples, seed=seed, max_length=max_length,
                             batch_size=batch_size, n_layers=n_layers, hidden=hidden, bytes_per_value=width,
                             n_batches=len(batches), tokens=tokens, positions=positions, overhead=overhead,
                             memory=memory, agreement=agreement, load=load, speed=speed, times=times, machine=machine,
                             peer=peer_record())
