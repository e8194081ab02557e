"""Where benchmark files come from: a local data root, or the Hugging Face Hub.

The data root is, in order: the ``data_root`` argument, the ``AVSS_DATA_DIR`` environment variable.
The special value ``"hub"`` means "no local copy: load from the Hub with ``datasets``".
"""

from __future__ import annotations

import os
from pathlib import Path

from avss_lib.core.errors import DataError

HUB = "hub"
ENV_VAR = "AVSS_DATA_DIR"


def resolve_data_root(data_root: str | os.PathLike[str] | None = None) -> Path | None:
    """Return the local data root as an existing directory, or ``None`` for the Hub.

    Raises :class:`DataError` naming the fix when no root is configured or the folder is missing.
    """
    value = str(data_root) if data_root is not None else os.environ.get(ENV_VAR)
    if value is None or value == "":
        raise DataError(
            f"no data root configured: pass data_root=... or set {ENV_VAR} to the folder of benchmark "
            f"copies (e.g. ../shared/data), or to '{HUB}' to download from the Hugging Face Hub"
        )
    if value == HUB:
        return None
    root = Path(value).expanduser().resolve()
    if not root.is_dir():
        raise DataError(
            f"data root {root} does not exist: point data_root / {ENV_VAR} at the folder of benchmark "
            f"copies, or use '{HUB}' to download from the Hugging Face Hub"
        )
    return root


def data_file(root: Path, relative: str) -> Path:
    """Path of one benchmark file under ``root``, with an error naming it if it is absent."""
    path = root / relative
    if not path.is_file():
        raise DataError(f"benchmark file {path} is missing from the data root {root}: restore it or fix the data root")
    return path
