"""Command-line entry point: ``avss run`` executes notebooks with papermill and builds the book; ``avss record``
writes the committed record of a run made outside the book's build (see :mod:`avss_lib.book.run_record`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from avss_lib.core.errors import AvssError
from avss_lib.book.model_runs import run_models
from avss_lib.book.pipeline import (NOTEBOOKS, REPO_ROOT, build_book, declared_parameters, load_profile, profile_names,
                                    run_pipeline)
from avss_lib.book.run_record import write_run_record


def _parse_set(values: list[str], option: str = "--set") -> dict[str, Any]:
    overrides = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AvssError(f"{option} expects key=value, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def _parse_seconds(values: list[str]) -> dict[str, float]:
    seconds = _parse_set(values, "--seconds")
    bad = [k for k, v in seconds.items() if isinstance(v, bool) or not isinstance(v, (int, float))]
    if bad:
        raise AvssError(f"--seconds expects NAME=SECONDS with a number, got {', '.join(f'{k}={seconds[k]!r}' for k in bad)}")
    return seconds


def parameters_help() -> str:
    """Every notebook's parameters with their defaults and comments, for ``--help``."""
    lines = ["notebook parameters (set them in a --params file, or common ones with --set KEY=VALUE):"]
    for notebook in NOTEBOOKS:
        lines.append(f"  {notebook}:")
        for p in declared_parameters(notebook).values():
            lines.append(f"    {p.name} = {p.default!r}" + (f"  # {p.help}" if p.help else ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avss", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run notebooks with papermill (reusing unchanged results) and build the book",
                         epilog=parameters_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    source = run.add_mutually_exclusive_group()
    source.add_argument("--profile", default="default", help=f"bundled profile: {', '.join(profile_names())} (default: default)")
    source.add_argument("--params", type=Path, help="a YAML parameters file with 'common' and 'notebooks' sections")
    run.add_argument("--only", nargs="+", metavar="NOTEBOOK", help=f"run only these notebooks: {', '.join(NOTEBOOKS)} or their numbers")
    run.add_argument("--force", action="store_true", help="recompute notebooks even if their inputs are unchanged")
    run.add_argument("--run-dir", type=Path, help="where artifacts go (default: data/runs/<profile>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a common parameter, e.g. --set model=HuggingFaceTB/SmolLM2-360M-Instruct")
    models = run.add_mutually_exclusive_group()
    models.add_argument("--model", help="shortcut for --set model=...: bundled name, Hub id, local folder or .gguf "
                                        "path (the run covers this one model, whatever the profile's 'models' list)")
    models.add_argument("--models", nargs="+", metavar="MODEL",
                        help="cover several models, one run folder each under the run folder, and one book with a "
                             "part per model and a verdict per claim per model (default: the profile's 'models')")
    run.add_argument("--data-root", help="shortcut for --set data_root=...: folder of benchmark copies, or 'hub'")
    run.add_argument("--no-book", action="store_true", help="run the notebooks but do not build the book")
    record = sub.add_parser("record", help="write the record of a run: date, commit, machine, versions, times, verdicts")
    record.add_argument("run_dir", type=Path, help="the run folder (e.g. data/runs/default)")
    record.add_argument("record", type=Path, help="the JSON file to write (e.g. benchmarks/records/default_gpu.json)")
    record.add_argument("--what", required=True, help="what ran, in words (the command, the profile, the machine)")
    record.add_argument("--seconds", action="append", default=[], metavar="NAME=SECONDS",
                        help="a further timing to record, e.g. --seconds setup=61.2")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "record":
            print(write_run_record(args.run_dir, args.record, what=args.what, seconds=_parse_seconds(args.seconds)))
            return 0
        profile = args.params or args.profile
        run_dir = args.run_dir or REPO_ROOT / "data" / "runs" / Path(str(profile)).stem
        overrides = _parse_set(args.overrides)
        overrides.update({k: v for k, v in (("model", args.model), ("data_root", args.data_root)) if v is not None})
        models = args.models or (None if args.model else load_profile(profile)["models"])
        if models:
            run_models(run_pipeline, models, run_dir, overrides, profile=profile, only=args.only, force=args.force)
        else:
            run_pipeline(profile, run_dir=run_dir, only=args.only, force=args.force, overrides=overrides)
        if not args.no_book:
            html = build_book(run_dir)
            print(f"[avss] book built: {html / 'index.html'}")
    except AvssError as exc:
        print(f"avss: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
