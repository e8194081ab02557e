"""Command-line entry point: ``avss run`` executes notebooks with papermill and builds the book."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from avss_lib.core.errors import AvssError
from avss_lib.book.pipeline import NOTEBOOKS, REPO_ROOT, build_book, declared_parameters, profile_names, run_pipeline


def _parse_set(values: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AvssError(f"--set expects key=value, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


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
    run.add_argument("--model", help="shortcut for --set model=...: bundled name, Hub id, local folder or .gguf path")
    run.add_argument("--data-root", help="shortcut for --set data_root=...: folder of benchmark copies, or 'hub'")
    run.add_argument("--no-book", action="store_true", help="run the notebooks but do not build the book")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        profile = args.params or args.profile
        run_dir = args.run_dir or REPO_ROOT / "data" / "runs" / Path(str(profile)).stem
        overrides = _parse_set(args.overrides)
        overrides.update({k: v for k, v in (("model", args.model), ("data_root", args.data_root)) if v is not None})
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
