"""Pairwise reward-model metrics from per-pair scores (host-side numpy).

A reward model (explicit Bradley–Terry head, or the implicit reward of a DPO-family
policy, see `prefjax.eval.implicit`) is evaluated on preference pairs by the
scores it gives the chosen and the rejected response of each pair:

  accuracy      P(score(chosen) > score(rejected))   (Ouyang et al. 2022; Lin et al. 2024)
  mean / std    of the scores over all 2N responses, and per side
  margin        mean of score(chosen) − score(rejected)
  length bias   accuracy by bucket of the chosen−rejected length difference and of the
                total length (Singhal et al. 2023, "A Long Way to Go"; LLMBar, Zeng et al. 2024)

Conventions (fixed here, documented in every result):
  * Pairs whose *data label* is a tie (e.g. PandaLM label 0, UltraFeedback equal
    scores) carry no preference: the caller excludes them with `mask` = 0, exactly like
    the padding of a last batch. They are never counted in `n_pairs`.
  * An *exact score tie* (score(chosen) == score(rejected), e.g. a constant model)
    counts 0.5 by default (`ties="half"`: the expected accuracy of a random tie-break);
    `ties="exclude"` drops such pairs from the accuracy only, `ties="zero"` counts them
    wrong. `n_score_ties` always reports how many there were.
  * Standard deviations are population std (ddof=0).

Shape letters: N pairs.

All functions are pure, take numpy-convertible arrays (jax arrays are fine) and return
Python floats / ints / lists, so results go straight into JSON.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

TIES = ("half", "exclude", "zero")

# Bucket edges (tokens) of length(chosen) − length(rejected); bucket i is
# [edges[i], edges[i+1]). Symmetric for integer lengths: <−64, −64..−17, −16..−1, 0,
# 1..16, 17..64, >64.
DIFF_EDGES = (-math.inf, -64.0, -16.0, 0.0, 1.0, 17.0, 65.0, math.inf)


def _as_1d(x: Any, name: str) -> np.ndarray:
  a = np.asarray(x, dtype=np.float64)
  if a.ndim != 1:
    raise ValueError(f"{name} must be 1-D [N], got shape {a.shape}")
  return a


def _select(chosen: Any, rejected: Any, mask: Optional[Any],
            *extra: Any) -> tuple[np.ndarray, ...]:
  """Returns (chosen[m], rejected[m], *extra[m]) for the pairs with mask != 0."""
  c, r = _as_1d(chosen, "chosen"), _as_1d(rejected, "rejected")
  if c.shape != r.shape:
    raise ValueError(f"chosen {c.shape} and rejected {r.shape} differ")
  arrays = [c, r] + [_as_1d(e, "lengths") for e in extra]
  for a in arrays[2:]:
    if a.shape != c.shape:
      raise ValueError(f"per-pair array of shape {a.shape} does not match scores {c.shape}")
  if mask is None:
    return tuple(arrays)
  m = np.asarray(mask)
  if m.shape != c.shape:
    raise ValueError(f"mask {m.shape} does not match scores {c.shape}")
  keep = m.astype(bool)
  return tuple(a[keep] for a in arrays)


def pair_correctness(chosen: Any, rejected: Any, *, ties: str = "half") -> np.ndarray:
  """Per-pair credit: 1 if chosen > rejected, 0 if lower, and for exact ties 0.5/NaN/0.

  Args:
    chosen: [N] scores of the chosen responses.
    rejected: [N] scores of the rejected responses.
    ties: "half" (tie = 0.5), "exclude" (tie = NaN, dropped by `nanmean`) or "zero".

  Returns:
    [N] float64.
  """
  if ties not in TIES:
    raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
  c, r = _as_1d(chosen, "chosen"), _as_1d(rejected, "rejected")
  tie_value = {"half": 0.5, "exclude": np.nan, "zero": 0.0}[ties]
  return np.where(c > r, 1.0, np.where(c < r, 0.0, tie_value))


def _mean_or_nan(x: np.ndarray) -> float:
  x = x[~np.isnan(x)]
  return float(x.mean()) if x.size else float("nan")


def accuracy(chosen: Any, rejected: Any, *, mask: Optional[Any] = None,
             ties: str = "half") -> float:
  """Pairwise accuracy: fraction of valid pairs where score(chosen) > score(rejected).

  Args:
    chosen: [N] scores of the chosen responses.
    rejected: [N] scores of the rejected responses.
    mask: optional [N] bool/0-1; 0 = padding or a data-labelled tie (excluded).
    ties: treatment of exact score ties (module docstring).

  Returns:
    accuracy in [0, 1]; NaN when no pair is left.
  """
  c, r = _select(chosen, rejected, mask)
  return _mean_or_nan(pair_correctness(c, r, ties=ties))


def reward_stats(chosen: Any, rejected: Any, *, mask: Optional[Any] = None) -> dict[str, float]:
  """Mean and (population) std of the scores, over all responses and per side, and margins.

  Args:
    chosen: [N] scores; rejected: [N] scores; mask: optional [N] validity.

  Returns:
    dict with `mean`, `std` (over the 2N scores), `chosen_mean`, `chosen_std`,
    `rejected_mean`, `rejected_std`, `margin_mean`, `margin_std` (margin = chosen − rejected).
    NaN when no pair is left.
  """
  c, r = _select(chosen, rejected, mask)
  if c.size == 0:
    keys = ("mean", "std", "chosen_mean", "chosen_std", "rejected_mean", "rejected_std",
            "margin_mean", "margin_std")
    return {k: float("nan") for k in keys}
  both = np.concatenate([c, r])
  margin = c - r
  return {
      "mean": float(both.mean()), "std": float(both.std()),
      "chosen_mean": float(c.mean()), "chosen_std": float(c.std()),
      "rejected_mean": float(r.mean()), "rejected_std": float(r.std()),
      "margin_mean": float(margin.mean()), "margin_std": float(margin.std()),
  }


def _bucket_label(lo: float, hi: float) -> str:
  """Human label of [lo, hi) for integer-valued lengths."""
  if math.isinf(lo) and math.isinf(hi):
    return "all"
  if math.isinf(lo):
    return f"<{_fmt(hi)}"
  if math.isinf(hi):
    return f">={_fmt(lo)}"
  if hi - lo == 1 and float(lo).is_integer():
    return _fmt(lo)
  return f"[{_fmt(lo)},{_fmt(hi)})"


def _fmt(x: float) -> str:
  return str(int(x)) if float(x).is_integer() else f"{x:g}"


def bucket_accuracy(chosen: Any, rejected: Any, values: Any, edges: Sequence[float], *,
                    mask: Optional[Any] = None, ties: str = "half") -> list[dict[str, Any]]:
  """Accuracy within buckets [edges[i], edges[i+1]) of a per-pair value.

  Args:
    chosen: [N] scores; rejected: [N] scores.
    values: [N] the per-pair value to bucket (e.g. a length difference).
    edges: increasing bucket edges (use ±inf for open ends); K+1 edges -> K buckets.
    mask: optional [N] validity.
    ties: treatment of exact score ties.

  Returns:
    one dict per bucket: `label`, `lo`, `hi`, `n` (pairs in it), `accuracy` (NaN if empty).
  """
  edges = [float(e) for e in edges]
  if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
    raise ValueError(f"edges must be >= 2 strictly increasing numbers, got {edges}")
  c, r, v = _select(chosen, rejected, mask, values)
  credit = pair_correctness(c, r, ties=ties)
  out = []
  for lo, hi in zip(edges, edges[1:]):
    inside = (v >= lo) & (v < hi)
    out.append({"label": _bucket_label(lo, hi), "lo": lo, "hi": hi,
                "n": int(inside.sum()), "accuracy": _mean_or_nan(credit[inside])})
  return out


def quantile_edges(values: Any, num_buckets: int = 4) -> list[float]:
  """Bucket edges at the quantiles of `values` (open ends ±inf, duplicates merged).

  Args:
    values: [N] e.g. total lengths of the valid pairs.
    num_buckets: K, the number of buckets wanted (fewer if quantiles coincide).

  Returns:
    increasing edges [-inf, q_1/K, ..., q_(K-1)/K, inf], rounded up to integers so that
    bucket i holds lengths in [edge_i, edge_{i+1}).
  """
  v = np.asarray(values, dtype=np.float64)
  if v.size == 0 or num_buckets < 2:
    return [-math.inf, math.inf]
  inner = np.quantile(v, np.arange(1, num_buckets) / num_buckets)
  inner = sorted({float(math.ceil(q)) for q in inner})
  return [-math.inf] + inner + [math.inf]


def length_bias(chosen: Any, rejected: Any, chosen_lengths: Any, rejected_lengths: Any, *,
                mask: Optional[Any] = None, ties: str = "half",
                diff_edges: Sequence[float] = DIFF_EDGES,
                total_edges: Optional[Sequence[float]] = None,
                num_total_buckets: int = 4) -> dict[str, Any]:
  """Length-bias diagnosis: accuracy by length-difference and total-length bucket.

  Args:
    chosen, rejected: [N] scores.
    chosen_lengths, rejected_lengths: [N] response lengths (tokens).
    mask: optional [N] validity.
    ties: treatment of exact score ties.
    diff_edges: edges of length(chosen) − length(rejected) buckets.
    total_edges: edges of length(chosen) + length(rejected) buckets; default: quantiles
      of the valid pairs' totals (`num_total_buckets`).

  Returns:
    dict with `by_length_diff` and `by_total_length` (lists from `bucket_accuracy`),
    `frac_chosen_longer` (a property of the data), and `frac_longer_preferred`: among
    pairs of unequal length, how often the model scores the longer response strictly
    higher (0.5 = no length preference; Singhal et al. 2023).
  """
  c, r, lc, lr = _select(chosen, rejected, mask, chosen_lengths, rejected_lengths)
  diff, total = lc - lr, lc + lr
  if total_edges is None:
    total_edges = quantile_edges(total, num_total_buckets)
  unequal = diff != 0
  longer_higher = np.where(diff > 0, c > r, r > c)[unequal]
  return {
      "by_length_diff": bucket_accuracy(c, r, diff, diff_edges, ties=ties),
      "by_total_length": bucket_accuracy(c, r, total, total_edges, ties=ties),
      "frac_chosen_longer": _mean_or_nan((diff > 0).astype(np.float64)),
      "frac_longer_preferred": _mean_or_nan(longer_higher.astype(np.float64)),
  }


def bootstrap_accuracy_ci(chosen: Any, rejected: Any, *, mask: Optional[Any] = None,
                          ties: str = "half", num_resamples: int = 1000,
                          confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
  """Percentile bootstrap confidence interval of the accuracy (Efron & Tibshirani 1993).

  Resamples the valid pairs with replacement `num_resamples` times (numpy
  `default_rng(seed)`, so the interval is reproducible) and takes the (1−c)/2 and
  (1+c)/2 quantiles of the resampled accuracies.

  Args:
    chosen, rejected: [N] scores; mask: optional [N] validity.
    ties: treatment of exact score ties ("exclude" drops tied pairs before resampling).
    num_resamples: bootstrap replicates.
    confidence: e.g. 0.95.
    seed: RNG seed.

  Returns:
    (lo, hi); (NaN, NaN) when no pair is left.
  """
  c, r = _select(chosen, rejected, mask)
  credit = pair_correctness(c, r, ties=ties)
  credit = credit[~np.isnan(credit)]
  if credit.size == 0:
    return float("nan"), float("nan")
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, credit.size, size=(num_resamples, credit.size))
  accs = credit[idx].mean(axis=1)
  alpha = (1.0 - confidence) / 2.0
  lo, hi = np.quantile(accs, [alpha, 1.0 - alpha])
  return float(lo), float(hi)


def pair_metrics(chosen: Any, rejected: Any, *, chosen_lengths: Optional[Any] = None,
                 rejected_lengths: Optional[Any] = None, mask: Optional[Any] = None,
                 ties: str = "half", bootstrap: int = 1000, seed: int = 0,
                 confidence: float = 0.95) -> dict[str, Any]:
  """All metrics of one eval set, JSON-ready.

  Args:
    chosen, rejected: [N] scores.
    chosen_lengths, rejected_lengths: optional [N] response lengths (tokens); when both
      are given the result has a `length_bias` entry (`length_bias`).
    mask: optional [N] bool/0-1; 0 = padding or data-labelled tie (excluded everywhere).
    ties: treatment of exact score ties in the accuracy.
    bootstrap: number of bootstrap resamples for `accuracy_ci` (0 = no interval).
    seed, confidence: of the bootstrap.

  Returns:
    dict: `n_pairs`, `n_score_ties`, `accuracy`, `accuracy_ci` ([lo, hi] or None),
    `ties`, the `reward_stats` keys, and optionally `length_bias`.
  """
  c, r = _select(chosen, rejected, mask)
  out: dict[str, Any] = {
      "n_pairs": int(c.size),
      "n_score_ties": int(np.sum(c == r)),
      "accuracy": accuracy(c, r, ties=ties),
      "accuracy_ci": None,
      "ties": ties,
  }
  if bootstrap:
    out["accuracy_ci"] = list(bootstrap_accuracy_ci(
        c, r, ties=ties, num_resamples=bootstrap, confidence=confidence, seed=seed))
  out.update(reward_stats(c, r))
  if chosen_lengths is not None and rejected_lengths is not None:
    out["length_bias"] = length_bias(chosen, rejected, chosen_lengths, rejected_lengths,
                                     mask=mask, ties=ties)
  return out


def id_ood_summary(results: Mapping[str, Mapping[str, Any]], tags: Mapping[str, str], *,
                   key: str = "accuracy") -> dict[str, Any]:
  """Unweighted means of a metric over the ID sets and over the OOD sets, and the drop.

  Each set counts once, whatever its size (as in Lin et al. 2024, Tables 2–3).

  Args:
    results: set name -> metrics dict (from `pair_metrics`).
    tags: set name -> "id" or "ood"; sets without a tag are ignored.
    key: the metric to average.

  Returns:
    dict `id_mean`, `ood_mean`, `drop` (= id_mean − ood_mean; positive = worse OOD),
    `id_sets`, `ood_sets` (names). Means are NaN when a group is empty.
  """
  groups: dict[str, list[str]] = {"id": [], "ood": []}
  for name in results:
    tag = tags.get(name)
    if tag is not None:
      if tag not in groups:
        raise ValueError(f"tag of {name!r} must be 'id' or 'ood', got {tag!r}")
      groups[tag].append(name)
  id_vals = [float(results[n][key]) for n in groups["id"]]
  ood_vals = [float(results[n][key]) for n in groups["ood"]]
  id_mean, ood_mean = mean_of(id_vals), mean_of(ood_vals)
  return {"id_mean": id_mean, "ood_mean": ood_mean,
          "drop": accuracy_drop(id_vals, ood_vals),
          "id_sets": groups["id"], "ood_sets": groups["ood"]}


def mean_of(values: Sequence[float]) -> float:
  """Mean of a list, NaN for an empty one (no warning)."""
  return float(np.mean(values)) if len(values) else float("nan")


def accuracy_drop(id_accuracies: Sequence[float], ood_accuracies: Sequence[float]) -> float:
  """mean(ID accuracies) − mean(OOD accuracies); NaN if either list is empty."""
  return mean_of(id_accuracies) - mean_of(ood_accuracies)
