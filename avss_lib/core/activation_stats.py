"""Streamed per-layer activation statistics, collected with plain PyTorch forward hooks.

For every decoder layer and every activation *site* the collector keeps float64 running statistics whose
memory does not depend on the number of tokens:

* ``block_output`` — the output of the whole decoder block (the residual stream; what the AVSS authors hooked);
* ``mlp_activation`` — the input of the MLP down-projection, i.e. ``act(gate) * up`` (or ``act(fc1)``);
* ``attn_output`` — the output of the self-attention module, before it is added to the residual stream.

Per (site, layer) it records the authors' pooled variance (mean over tokens, then the unbiased variance over
hidden units, averaged over samples) with padding included and with padding masked; the variance of all valid
activation entries (Chan/Welford combination of per-batch moments); exact sparsity counts at absolute
thresholds (over valid entries and over all padded positions, as the authors' code counts them); mean |a|;
a log-spaced histogram of |a| from which sparsity at relative thresholds ``|a| < tau * std`` is read after
the pass (the std is only known at the end, so a one-pass exact count is impossible; the histogram's
resolution is stated in :data:`HIST_BINS_PER_DECADE`); and, for ``block_output``, the cosine between the
layer's input and output hidden states (mean over valid tokens, and at the last valid token), which Block
Influence and the angular distance need.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from avss_lib.core.errors import ConfigError
from avss_lib.core.layers import find_layers

SITES: tuple[str, ...] = ("block_output", "mlp_activation", "attn_output")
HIST_LOG10_MIN = -12.0
HIST_LOG10_MAX = 4.0
HIST_BINS_PER_DECADE = 100


@dataclass(frozen=True)
class StatsSpec:
    """What to collect: sites, absolute sparsity thresholds and relative thresholds (fractions of the std)."""

    sites: tuple[str, ...] = SITES
    abs_thresholds: tuple[float, ...] = (1e-5, 1e-3, 1e-2)
    rel_taus: tuple[float, ...] = (0.01, 0.05, 0.1)

    def __post_init__(self) -> None:
        unknown = [s for s in self.sites if s not in SITES]
        if unknown or not self.sites:
            raise ConfigError(f"unknown activation site(s) {unknown or '(none given)'}: choose from {', '.join(SITES)}")
        for name, values in (("abs_thresholds", self.abs_thresholds), ("rel_taus", self.rel_taus)):
            bad = [v for v in values if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v))]
            if bad:
                raise ConfigError(f"{name} must be positive finite numbers, got {bad}: use values like 1e-5")


def abs_column(eps: float, padded: bool = False) -> str:
    """Column name of the sparsity at absolute threshold ``eps`` (valid entries, or all padded positions)."""
    return f"sparsity_abs_{eps:g}" + ("_padded" if padded else "")


def rel_column(tau: float) -> str:
    """Column name of the sparsity at relative threshold ``tau`` (|a| < tau * std of the layer)."""
    return f"sparsity_rel_{tau:g}"


@dataclass
class _Moments:
    """Count, mean and sum of squared deviations, combined across batches (Chan et al.) in float64."""

    n: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, n_b: float, mean_b: float, m2_b: float) -> None:
        if n_b == 0:
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.n * n_b / n
        self.n = n

    @property
    def var(self) -> float:
        return self.m2 / self.n if self.n else float("nan")


@dataclass
class _SiteLayerStats:
    """Running statistics of one (site, layer)."""

    spec: StatsSpec
    hidden: int = 0
    n_samples: int = 0
    n_positions: int = 0  # all token positions, padding included
    n_tokens: int = 0  # valid token positions
    pooled_var_padded_sum: float = 0.0
    pooled_var_masked_sum: float = 0.0
    moments: _Moments = field(default_factory=_Moments)
    abs_sum: float = 0.0
    below_valid: np.ndarray = field(default_factory=lambda: np.zeros(0))
    below_padded: np.ndarray = field(default_factory=lambda: np.zeros(0))
    hist: Tensor | None = None
    has_cosine: bool = False
    cos_sum: float = 0.0
    cos_last_sum: float = 0.0

    def update(self, x: Tensor, valid: Tensor) -> None:
        """Add one batch of activations ``x`` (B, T, d) with boolean ``valid`` (B, T)."""
        x = x.detach().float()
        if self.hist is None:
            self.hidden = x.shape[-1]
            self.below_valid = np.zeros(len(self.spec.abs_thresholds))
            self.below_padded = np.zeros(len(self.spec.abs_thresholds))
            n_bins = int((HIST_LOG10_MAX - HIST_LOG10_MIN) * HIST_BINS_PER_DECADE)
            self.hist = torch.zeros(n_bins, dtype=torch.float64, device=x.device)
        counts = valid.sum(dim=1)
        has_tokens = counts > 0
        self.n_samples += int(has_tokens.sum())
        self.n_positions += valid.numel()
        self.n_tokens += int(counts.sum())
        # Authors' pooling: mean over every position (padding included), unbiased variance over hidden units.
        self.pooled_var_padded_sum += float(x.mean(dim=1)[has_tokens].var(dim=-1).sum(dtype=torch.float64))
        summed = torch.bmm(valid.to(x.dtype).unsqueeze(1), x).squeeze(1)  # (B, d) sums over valid tokens
        masked_mean = summed[has_tokens] / counts[has_tokens].unsqueeze(-1)
        self.pooled_var_masked_sum += float(masked_mean.var(dim=-1).sum(dtype=torch.float64))
        xv = x[valid]
        if xv.numel():  # two passes (mean, then squared deviations summed in float64): a third of var_mean's time
            mean_b = xv.mean()
            m2_b = float((xv - mean_b).square_().sum(dtype=torch.float64))
            self.moments.add(float(xv.numel()), float(mean_b), m2_b)
        a = xv.abs()
        self.abs_sum += float(a.sum())
        self._count_below(a, self.below_valid, self.below_padded)
        if not bool(valid.all()):
            self._count_below(x[~valid].abs(), self.below_padded)
        logs = a.log10_().clamp_(HIST_LOG10_MIN, HIST_LOG10_MAX - 1e-9)  # in place: |a| is not needed again
        self.hist += torch.histc(logs, bins=len(self.hist), min=HIST_LOG10_MIN, max=HIST_LOG10_MAX).double()

    def _count_below(self, a: Tensor, *accumulators: np.ndarray) -> None:
        """Add exact counts of ``a < eps`` for every absolute threshold (one full pass over ``a``)."""
        small = a[a < max(self.spec.abs_thresholds)]  # usually a tiny fraction of the entries
        for k, eps in enumerate(self.spec.abs_thresholds):
            below = float((small < eps).sum())
            for acc in accumulators:
                acc[k] += below

    def update_cosine(self, h_in: Tensor, h_out: Tensor, valid: Tensor) -> None:
        """Add the cosine between layer input and output at valid tokens and at each sample's last valid token."""
        cos = F.cosine_similarity(h_in.detach().float(), h_out.detach().float(), dim=-1)  # (B, T)
        self.has_cosine = True
        self.cos_sum += float(cos[valid].sum(dtype=torch.float64))
        counts = valid.sum(dim=1)
        last = (valid.cumsum(dim=1) == counts.unsqueeze(1)) & valid  # one-hot at the last valid position
        self.cos_last_sum += float(cos[last].sum(dtype=torch.float64))

    def fraction_below(self, threshold: float) -> float:
        """Fraction of valid entries with |a| < threshold, read from the log histogram (linear within a bin)."""
        assert self.hist is not None
        total = float(self.hist.sum())
        pos = (math.log10(threshold) - HIST_LOG10_MIN) * HIST_BINS_PER_DECADE if threshold > 0 else -1.0
        if pos <= 0:
            return 0.0
        if pos >= len(self.hist):
            return 1.0
        full = int(pos)
        below = float(self.hist[:full].sum()) + (pos - full) * float(self.hist[full])
        return below / total

    def row(self) -> dict[str, Any]:
        """The statistics as one table row."""
        std = math.sqrt(self.moments.var) if self.moments.n else float("nan")
        n_entries = self.n_tokens * self.hidden
        n_padded_entries = self.n_positions * self.hidden
        row: dict[str, Any] = {
            "hidden": self.hidden,
            "n_samples": self.n_samples,
            "n_tokens": self.n_tokens,
            "n_positions": self.n_positions,
            "pooled_var_padded": self.pooled_var_padded_sum / self.n_samples if self.n_samples else float("nan"),
            "pooled_var_masked": self.pooled_var_masked_sum / self.n_samples if self.n_samples else float("nan"),
            "elem_mean": self.moments.mean,
            "elem_var": self.moments.var,
            "mean_abs": self.abs_sum / n_entries if n_entries else float("nan"),
        }
        for k, eps in enumerate(self.spec.abs_thresholds):
            row[abs_column(eps)] = self.below_valid[k] / n_entries if n_entries else float("nan")
            row[abs_column(eps, padded=True)] = self.below_padded[k] / n_padded_entries if n_padded_entries else float("nan")
        for tau in self.spec.rel_taus:
            row[rel_column(tau)] = self.fraction_below(tau * std) if n_entries else float("nan")
        if self.has_cosine:
            row["cos_mean"] = self.cos_sum / self.n_tokens
            row["cos_last"] = self.cos_last_sum / self.n_samples
        return row


def _first(output: Any) -> Tensor:
    """The hidden-state tensor of a module output that may be a tensor or a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


#: Called with (site, layer, activation, block input or None) for every hooked activation.
ActivationCallback = Callable[[str, int, Tensor, "Tensor | None"], None]


@contextmanager
def site_hooks(model: nn.Module, sites: Sequence[str], callback: ActivationCallback) -> Iterator[None]:
    """Hook every decoder layer of ``model`` at ``sites``, calling ``callback``; remove the hooks on exit.

    ``callback`` receives the raw activation tensor (``block_output`` also passes the block's input hidden
    states, for the input/output cosine). Hooks are removed even when the body raises.
    """
    layers = find_layers(model)
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def block_hook(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            callback("block_output", i, _first(output), args[0] if args else kwargs["hidden_states"])
        return hook

    def mlp_hook(i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            callback("mlp_activation", i, args[0], None)
        return hook

    def attn_hook(i: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            callback("attn_output", i, _first(output), None)
        return hook

    try:
        for i in range(len(layers)):
            if "block_output" in sites:
                handles.append(layers.layers[i].register_forward_hook(block_hook(i), with_kwargs=True))
            if "mlp_activation" in sites:
                handles.append(layers.down_proj(i).register_forward_pre_hook(mlp_hook(i)))
            if "attn_output" in sites:
                handles.append(layers.attention(i).register_forward_hook(attn_hook(i)))
        yield
    finally:
        for handle in handles:
            handle.remove()


class ActivationStatsCollector:
    """Accumulates :class:`StatsSpec` statistics for each forward pass of a hooked model.

    Use it inside :func:`site_hooks` (as :func:`collect_activation_stats` does), and call :meth:`set_mask`
    with the (B, T) boolean mask of the tokens that count before each forward pass.
    """

    def __init__(self, n_layers: int, spec: StatsSpec) -> None:
        self.spec = spec
        self.stats = {(s, i): _SiteLayerStats(spec) for s in spec.sites for i in range(n_layers)}
        self._valid: Tensor | None = None

    def set_mask(self, valid: Tensor) -> None:
        """Set the (B, T) boolean mask of the tokens that count in the next forward pass."""
        self._valid = valid.bool()

    def _as_btd(self, x: Tensor) -> Tensor:
        assert self._valid is not None, "call set_mask() before the forward pass"
        return x.reshape(*self._valid.shape, -1)  # OPT flattens (B*T, d) inside its MLP

    def __call__(self, site: str, layer: int, x: Tensor, h_in: Tensor | None) -> None:
        stats = self.stats[(site, layer)]
        stats.update(self._as_btd(x), self._valid)
        if h_in is not None:
            stats.update_cosine(self._as_btd(h_in), self._as_btd(x), self._valid)

    def to_frame(self) -> pd.DataFrame:
        """One row per (site, layer) with every statistic (see the module docstring)."""
        rows = [{"site": s, "layer": i, **st.row()} for (s, i), st in self.stats.items() if st.hist is not None]
        return pd.DataFrame(rows)


def collect_activation_stats(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    spec: StatsSpec | None = None,
    *,
    progress: bool = True,
    total: int | None = None,
) -> pd.DataFrame:
    """Run ``model`` over ``batches`` (dicts with ``input_ids`` and ``attention_mask``) and return the statistics.

    Tokens count when ``attention_mask`` is 1 (and ``stat_mask`` is true, if a batch carries one, e.g. to count
    only answer tokens). Raises :class:`ConfigError` on an empty calibration set.
    """
    spec = spec or StatsSpec()
    device = next(model.parameters()).device
    n_batches = 0
    collector = ActivationStatsCollector(len(find_layers(model)), spec)
    with site_hooks(model, spec.sites, collector), torch.inference_mode():
        for batch in tqdm(batches, desc="activation statistics", total=total, disable=not progress):
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            valid = attention_mask.bool()
            if "stat_mask" in batch:
                valid = valid & batch["stat_mask"].to(device).bool()
            collector.set_mask(valid)
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            n_batches += 1
    if n_batches == 0:
        raise ConfigError("the calibration set is empty: give at least one non-empty text (check n_samples and the data)")
    return collector.to_frame()
