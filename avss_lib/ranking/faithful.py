"""What the authors' own AVSS does on a run, as numbers, and the phrases of chapter 02 that depend on them.

:func:`faithful_facts` reads the block-output statistics and the ``authors_code`` scores and returns the facts
chapter 02 states about them (how many near-zero entries the sparsity rests on, how many scores are infinite,
how the pooled variance changes with depth, the largest step). The chapter's sentences are in its markdown;
the phrase functions below choose the words where the *kind* of statement depends on the data, so that no
sentence asserts something the numbers do not show.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from avss_lib.core.activation_stats import abs_column
from avss_lib.core.formatting import layer_list

#: Spearman's rho between layer index and pooled variance above which the variance "grows with depth".
GROWS_WITH_DEPTH_RHO = 0.8
#: A step in the element variance between adjacent layers at least this large is called a jump.
JUMP_FACTOR = 10.0
#: Spearman's rho between AVSS and variance alone above which AVSS "is a ranking by activation scale".
SCALE_RANKING_RHO = 0.9


@dataclass(frozen=True)
class FaithfulFacts:
    """The numbers behind chapter 02's paragraph on the authors' score."""

    n_layers: int
    entries_per_layer: int  # activation entries per layer, padding included
    below_min: int  # entries with |a| < eps, fewest over layers
    below_max: int
    below_median: int
    zero_layers: list[int]  # layers where no entry fell below eps
    n_infinite: int  # layers whose faithful AVSS is +inf
    poisson_se_min: float  # relative standard error 1/sqrt(k), in %, over layers with k > 0 (NaN if none)
    poisson_se_max: float
    rho_with_variance: float  # Spearman rho of AVSS with variance alone, finite layers (NaN if < 3)
    depth_rho: float  # Spearman rho of the pooled variance with the layer index
    jump_layer: int  # the step from jump_layer to jump_layer + 1 has the largest pooled-variance ratio
    jump_pooled: float  # that ratio
    elem_before: float  # element variance at jump_layer and jump_layer + 1
    elem_after: float
    eps: float

    @property
    def elem_jump(self) -> float:
        return self.elem_after / self.elem_before

    def glue(self) -> dict[str, object]:
        """The values chapter 02 glues into its prose (numbers, and the phrases of this module)."""
        return {
            "faithful_n_layers": self.n_layers, "faithful_entries": f"{self.entries_per_layer:,}",
            "faithful_below_min": self.below_min, "faithful_below_max": self.below_max,
            "faithful_below_median": self.below_median, "faithful_n_zero": len(self.zero_layers),
            "faithful_zero_layers": layer_list(self.zero_layers, "none"), "faithful_n_infinite": self.n_infinite,
            "faithful_threshold": f"$|a| < {self.eps:g}$", "faithful_se_min": self.poisson_se_min,
            "faithful_se_max": self.poisson_se_max, "faithful_rho": self.rho_with_variance,
            "faithful_depth_rho": self.depth_rho, "faithful_jump_layer": self.jump_layer,
            "faithful_jump_next": self.jump_layer + 1, "faithful_jump_pooled": self.jump_pooled,
            "faithful_elem_before": f"{self.elem_before:.3g}", "faithful_elem_after": f"{self.elem_after:.3g}",
            "faithful_elem_jump": self.elem_jump,
            "faithful_infinite_phrase": infinite_phrase(self.n_infinite),
            "faithful_depth_phrase": depth_phrase(self.depth_rho),
            "faithful_jump_phrase": jump_phrase(self.elem_jump),
            "faithful_reading": scale_reading(self.rho_with_variance),
            "faithful_poisson_phrase": poisson_phrase(self.poisson_se_min, self.poisson_se_max),
            "faithful_rho_phrase": rho_phrase(self.rho_with_variance),
        }


def faithful_facts(stats: pd.DataFrame, scores: pd.DataFrame, eps: float = 1e-5) -> FaithfulFacts:
    """The facts of :class:`FaithfulFacts` from chapter 01's statistics and chapter 02's scores."""
    block = stats[stats["site"] == "block_output"].sort_values("layer")
    entries = block["n_positions"].to_numpy() * block["hidden"].to_numpy()
    below = np.rint(block[abs_column(eps, padded=True)].to_numpy() * entries).astype(int)
    pooled = block["pooled_var_padded"].to_numpy(dtype=float)
    elem = block["elem_var"].to_numpy(dtype=float)
    jumps = pooled[1:] / pooled[:-1]
    j = int(np.argmax(jumps))
    faithful = scores[scores["variant"] == "authors_code"]
    finite = faithful[np.isfinite(faithful["avss"].to_numpy())]
    rho = float(spearmanr(finite["avss"], finite["variance"]).statistic) if len(finite) >= 3 else float("nan")
    counted = below[below > 0]
    return FaithfulFacts(
        n_layers=len(block), entries_per_layer=int(entries[0]), below_min=int(below.min()),
        below_max=int(below.max()), below_median=int(np.median(below)),
        zero_layers=[int(v) for v in block.loc[below == 0, "layer"]], n_infinite=int(faithful["undefined"].sum()),
        poisson_se_min=100 / np.sqrt(counted.max()) if counted.size else float("nan"),
        poisson_se_max=100 / np.sqrt(counted.min()) if counted.size else float("nan"),
        rho_with_variance=rho, depth_rho=float(spearmanr(block["layer"], pooled).statistic),
        jump_layer=int(block["layer"].iloc[j]), jump_pooled=float(jumps[j]), elem_before=float(elem[j]),
        elem_after=float(elem[j + 1]), eps=eps)


def infinite_phrase(n_infinite: int) -> str:
    """What the infinite scores do to the method (empty when no score is infinite)."""
    if not n_infinite:
        return "No layer has $S = 0$, so every faithful score is finite."
    return (f"For those {n_infinite} layer(s) $\\mathrm{{AVSS}} = \\sigma^2 / 0 = \\infty$: the normalised scores and "
            "the cumulative-mass selection are undefined, and any order among the infinite layers is arbitrary.")


def poisson_phrase(se_min: float, se_max: float) -> str:
    """The counting error of the sparsity (empty when no layer has a near-zero entry)."""
    if se_min != se_min:
        return ""
    return (f"$S$ is a count of rare events: its Poisson relative standard error $1/\\sqrt{{k}}$ is {se_min:.0f}% to "
            f"{se_max:.0f}% across the layers with $k > 0$ entries, so a layer's score moves by that much between "
            "calibration samples.")


def rho_phrase(rho: float) -> str:
    """The agreement of the faithful ranking with variance alone (empty with fewer than three finite scores)."""
    if rho != rho:
        return ""
    return (f"Across the layers with a finite score, the faithful AVSS ranking has Spearman $\\rho = {rho:.2f}$ "
            "with the ranking by variance alone.")


def depth_phrase(depth_rho: float) -> str:
    """How the pooled variance changes with depth, by its Spearman correlation with the layer index."""
    if depth_rho >= GROWS_WITH_DEPTH_RHO:
        return "grows with depth"
    if depth_rho <= -GROWS_WITH_DEPTH_RHO:
        return "shrinks with depth"
    return "does not change monotonically with depth"


def jump_phrase(elem_jump: float) -> str:
    """Whether the largest step looks like a massive-activation dimension appearing (a jump of 10× or more)."""
    if elem_jump >= JUMP_FACTOR or elem_jump <= 1 / JUMP_FACTOR:
        return ("a jump of this size in the residual stream is the signature of a massive-activation dimension "
                "{cite:p}`sun2024massive`")
    return "a step too small to single out one layer"


def norm_phrase(placement: str) -> str:
    """The model's norm placement as the opening of a sentence about its residual stream."""
    return {"pre": "On this pre-norm model (the block output is the un-normalised residual stream)",
            "pre+post": "On this model with pre- and post-norms around each sub-layer",
            "post": "On this post-norm model (each block output is normalised)"}[placement]


def scale_reading(rho_with_variance: float) -> str:
    """What the faithful AVSS amounts to, by how closely it follows the variance alone."""
    if rho_with_variance != rho_with_variance:
        return "with fewer than three finite scores the faithful AVSS ranks nothing."
    if rho_with_variance > SCALE_RANKING_RHO:
        return ("the faithful AVSS is therefore a ranking by activation scale; the sparsity term, a handful of "
                "near-zero counts, does not change the order.")
    return "the faithful AVSS therefore mixes activation scale with the noise of a handful of near-zero counts."


@dataclass(frozen=True)
class SelectionFacts:
    """How much the rules and variants agree on the layers to prune."""

    n_variants: int
    common: list[int]  # layers every variant's fixed-fraction rule prunes
    prefix_variants: list[str]  # variants for which the authors' rule selects a prefix 0..m-1
    empty_variants: list[str]  # variants for which the authors' rule selects nothing

    def glue(self) -> dict[str, object]:
        return {"selection_n_variants": self.n_variants, "selection_n_common": len(self.common),
                "selection_common": layer_list(self.common, "none"),
                "selection_authors_rule": authors_rule_phrase(self.prefix_variants, self.empty_variants)}


def selection_facts(selections: pd.DataFrame) -> SelectionFacts:
    """:class:`SelectionFacts` from chapter 02's ``SELECTIONS`` table (layers as lists)."""
    fixed = selections[selections["rule"] == "fixed_fraction"]
    sets = [set(v) for v in fixed["layers"]]
    common = sorted(set.intersection(*sets)) if sets else []
    bugged = selections[selections["rule"] == "authors_code"]
    prefix = [r.variant for r in bugged.itertuples() if r.layers and list(r.layers) == list(range(len(r.layers)))]
    empty = [r.variant for r in bugged.itertuples() if not r.layers]
    return SelectionFacts(len(sets), common, prefix, empty)


def authors_rule_phrase(prefix_variants: list[str], empty_variants: list[str]) -> str:
    """What the authors' published rule selected, variant by variant (the prefix pattern, or nothing)."""
    parts = []
    if prefix_variants:
        parts.append(f"The authors' published rule selects a prefix of the shallowest layers for "
                     f"{len(prefix_variants)} variant(s) ({', '.join(prefix_variants)}): its cumulative sum runs in "
                     "layer order, so it prunes from layer 0 until the mass reaches the threshold, whatever the "
                     "ranking says.")
    if empty_variants:
        parts.append(f"It selects nothing for {', '.join(empty_variants)}, where an infinite score makes every "
                     "normalised score NaN.")
    return " ".join(parts) or "The authors' published rule selects neither a prefix of layers nor an empty set here."
