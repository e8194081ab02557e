"""Atomic artifact writing, file hashing and artifact reading with clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from avss_lib.core.errors import DataError


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds.

    An interrupted or failing writer therefore never leaves a half-written artifact behind.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON artifact, naming the file and the fix if it is missing or corrupt."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"artifact {p} does not exist: run the notebook that writes it first")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"artifact {p} is corrupt ({exc}): delete it and re-run the notebook that writes it") from exc


def write_table(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write a DataFrame atomically as Parquet (``.parquet``) or CSV (``.csv``)."""
    p = Path(path)
    with atomic_path(p) as tmp:
        if p.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        elif p.suffix == ".csv":
            df.to_csv(tmp, index=False)
        else:
            raise ValueError(f"unsupported table format {p.suffix!r}: use .parquet or .csv")
    return p


def read_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a Parquet or CSV artifact, naming the file and the fix if it is missing or corrupt."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"artifact {p} does not exist: run the notebook that writes it first")
    try:
        return pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)
    except Exception as exc:  # pyarrow and pandas raise many types for a damaged file
        raise DataError(f"artifact {p} is corrupt ({exc}): delete it and re-run the notebook that writes it") from exc


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")
