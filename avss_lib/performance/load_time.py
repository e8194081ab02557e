"""Model load time: the first load (a GGUF file is dequantised into the cache) against a load from the cache."""

from __future__ import annotations

import gc
import tempfile
import time
from typing import Any

from avss_lib.core import models


def measure_load_times(model_spec: str, *, device: str = "cpu", dtype: str = "float32") -> dict[str, Any]:
    """Seconds of the first load of ``model_spec`` into an empty temporary cache and of a second, cached load.

    For a GGUF model the first load dequantises the file and writes the converted weights to the cache; a
    Hugging Face folder or Hub id has no conversion step, which ``kind`` records. ``speedup`` is first / cached.
    """
    kind = models.resolve_spec(model_spec).kind
    with tempfile.TemporaryDirectory(prefix="avss_cache_") as cache:
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            lm, _ = models.load_model(model_spec, device=device, dtype=dtype, cache_dir=cache)
            seconds.append(time.perf_counter() - start)
            del lm
            gc.collect()
    first, cached = seconds
    return {"model": model_spec, "kind": kind, "first_load_s": first, "cached_load_s": cached,
            "speedup": first / cached}
