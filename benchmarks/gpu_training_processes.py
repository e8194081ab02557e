"""Chapter 05's training step on one GPU: one run at a time against several, and where one step's time goes.

``full`` trains chapter 05's runs several at a time in worker processes (the notebooks' ``workers``,
:mod:`avss_lib.core.workers`). At a profile's training sizes (``full``'s unless ``--profile`` names another:
questions per step, tokens per pair, learning rate, negatives kept) and the EAVSS arm's layers, this benchmark
times the optimiser steps of ``--procs`` processes started together (each with its own model, as the workers
are), and profiles a few steps of one process with ``torch.profiler``: the wall time of a step against the time
its kernels keep the device busy, and the kernels it launches. A step whose kernels fill a small part of its wall
time is bound by the host's launches, which more processes at a time, CUDA graphs or fused kernels can hide and a
faster GPU cannot.

The model is the bundled model's architecture with random weights, built from a folder holding its config and
tokenizer (the time of a step does not depend on the weights' values), and the examples come from a JSON file: the
GPU machine then needs neither the model file, nor the data, nor pyarrow. ``--write-inputs RUN_DIR`` writes both
(on the build machine) from a run that ran chapter 05 (its ``train_examples.parquet`` and ``arms.csv``).

Usage::

    python benchmarks/gpu_training_processes.py --write-inputs data/runs/default --inputs INPUTS
    python benchmarks/gpu_training_processes.py --inputs INPUTS --procs 1 4 8 [--steps 20] [--record R]

and writes ``benchmarks/records/gpu_training_processes.json`` (date, commit, machine, GPU, versions, milliseconds
per step and steps per second at each number of processes, the profile).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from avss_lib.book.run_record import benchmark_machine
from avss_lib.core.artifacts import TRAIN_EXAMPLES
from avss_lib.core.io import write_json
from avss_lib.core.models import DEFAULT_MODEL, load_model, synchronize
from avss_lib.mitigation.contrastive_loss import ContrastiveExample
from avss_lib.mitigation.training import TrainConfig, train
from avss_lib.mitigation.training_data import to_examples
from training_benchmark import eavss_layers

RECORD = Path(__file__).resolve().parent / "records" / "gpu_training_processes.json"
PACKAGES = ("torch", "transformers")
EXAMPLES_FILE, MODEL_FOLDER = "examples.json", "model"


def write_inputs(run_dir: Path, inputs: Path, profile: str) -> None:
    """The bundled model's config and tokenizer, the run's training examples and EAVSS layers, and ``profile``'s
    training sizes (questions per step, tokens per pair, learning rate, negatives kept) into ``inputs``."""
    from avss_lib.book.pipeline import load_profile

    params = load_profile(profile)["notebooks"]["05_mitigation"]
    sizes = {"batch_size": params["batch_size"], "max_length": params["train_max_length"], "lr": params["lr"]}
    model, tokenizer = load_model(DEFAULT_MODEL, device="cpu", dtype="float32")
    model.config.save_pretrained(inputs / MODEL_FOLDER)
    tokenizer.save_pretrained(inputs / MODEL_FOLDER)
    keep = params["max_negatives"]
    examples = [{"id": e.id, "prompt": e.prompt, "positive": e.positive, "negatives": list(e.negatives[:keep])}
                for e in to_examples(TRAIN_EXAMPLES.read(run_dir))]
    write_json({"run_dir": str(run_dir), "profile": profile, "sizes": sizes, "layers": list(eavss_layers(run_dir)),
                "examples": examples}, inputs / EXAMPLES_FILE)


def _setup(inputs: Path, device: str, seed: int) -> tuple[Any, Any, list[ContrastiveExample], TrainConfig]:
    data = json.loads((inputs / EXAMPLES_FILE).read_text())
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(inputs / MODEL_FOLDER)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    tokenizer = AutoTokenizer.from_pretrained(inputs / MODEL_FOLDER)
    examples = [ContrastiveExample(e["id"], e["prompt"], e["positive"], tuple(e["negatives"]))
                for e in data["examples"]]
    train_config = TrainConfig(layers=tuple(data["layers"]), steps=3, seed=seed, **data["sizes"])
    return model, tokenizer, examples, train_config


def _timed_steps(inputs: Path, device: str, steps: int, seed: int, barrier: Any = None) -> dict[str, float]:
    """Three warm-up steps, then ``steps`` timed ones (after ``barrier``, so that all processes start together)."""
    torch.set_num_threads(1)
    model, tokenizer, examples, config = _setup(inputs, device, seed)
    train(model, tokenizer, examples, config, dataset="gpu_training_processes", progress=False)
    synchronize(model)
    if barrier is not None:
        barrier.wait()
    start = time.perf_counter()
    train(model, tokenizer, examples, replace(config, steps=steps), dataset="gpu_training_processes", progress=False)
    synchronize(model)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return {"seconds": seconds, "ms_per_step": 1000 * seconds / steps, "peak_gib": peak}


def _process(rank: int, inputs: Path, device: str, steps: int, barrier: Any, queue: Any) -> None:
    queue.put(_timed_steps(inputs, device, steps, seed=rank, barrier=barrier))


def concurrent_steps(inputs: Path, device: str, steps: int, procs: int) -> dict[str, Any]:
    """``procs`` spawned processes training at once: each one's milliseconds per step and the steps per second of
    all together (over the slowest one's time)."""
    if procs == 1:
        results = [_timed_steps(inputs, device, steps, seed=0)]
    else:
        context = multiprocessing.get_context("spawn")
        barrier, queue = context.Barrier(procs + 1), context.Queue()
        workers = [context.Process(target=_process, args=(r, inputs, device, steps, barrier, queue))
                   for r in range(procs)]
        for w in workers:
            w.start()
        barrier.wait()
        results = [queue.get() for _ in workers]
        for w in workers:
            w.join()
    return {"procs": procs, "ms_per_step": sorted(round(r["ms_per_step"], 1) for r in results),
            "steps_per_s": procs * steps / max(r["seconds"] for r in results),
            "peak_gib": max(r["peak_gib"] for r in results)}


def profile_steps(inputs: Path, device: str, steps: int) -> dict[str, float]:
    """One process, ``steps`` profiled steps: wall and kernel milliseconds per step, kernels launched per step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    model, tokenizer, examples, config = _setup(inputs, device, seed=0)
    train(model, tokenizer, examples, config, dataset="gpu_training_processes", progress=False)
    synchronize(model)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        train(model, tokenizer, examples, replace(config, steps=steps), dataset="gpu_training_processes",
              progress=False)
        synchronize(model)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
    launches = sum(e.count for e in events if e.key.startswith("cudaLaunchKernel"))
    return {"steps": steps, "wall_ms_per_step": 1000 * wall / steps, "kernel_ms_per_step": kernel_us / 1000 / steps,
            "device_busy_fraction": kernel_us / 1e6 / wall, "kernel_launches_per_step": launches / steps}


def main() -> None:
    """Parse the command line; write the inputs, or time and profile and write the record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=Path, required=True, help="folder of the model's config and the examples")
    parser.add_argument("--write-inputs", type=Path, metavar="RUN_DIR", help="write --inputs from this run, then stop")
    parser.add_argument("--profile", default="full", help="the profile whose training sizes --write-inputs records")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--record", type=Path, default=RECORD)
    args = parser.parse_args()
    if args.write_inputs is not None:
        write_inputs(args.write_inputs, args.inputs, args.profile)
        return
    started = dt.datetime.now(dt.timezone.utc)
    runs = []
    for procs in args.procs:
        runs.append(concurrent_steps(args.inputs, args.device, args.steps, procs))
        print(json.dumps(runs[-1]), flush=True)
    profiled = profile_steps(args.inputs, args.device, args.profile_steps)
    print(json.dumps(profiled), flush=True)
    data = json.loads((args.inputs / EXAMPLES_FILE).read_text())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    write_json({"date": started.isoformat(timespec="seconds"), **benchmark_machine(PACKAGES, args.device), "gpu": gpu,
                "run_dir": data["run_dir"], "profile_sizes": {data["profile"]: data["sizes"]}, "layers": data["layers"],
                "examples": len(data["examples"]), "steps": args.steps, "processes": runs, "profile": profiled},
               args.record)


if __name__ == "__main__":
    main()
