"""Scores eval sets batch by batch and turns the scores into metrics, reports and plots.

`score_pairs_fn(batch) -> (chosen_scores, rejected_scores)` is whatever model scores a
pair: an explicit reward model's head at the last response token, or a policy's
implicit reward (`prefjax.eval.implicit.score_fn_from_logps`). The runner only sees
numpy batch dicts in `prefjax.data`'s pair layouts (docs/internals.md):

  padded         `loss_mask` [B, 2, L]; scores [B]; validity `pair_mask` / `example_mask` [B]
  packed         `loss_mask`, `segment_ids` [R, L]; `pair_mask` [R, S]; scores [R, S]
                 (pair p of a row: chosen = segment 2p+1, rejected = segment 2p+2)
  prompt_shared  as packed plus `branch_ids` [R, L] (1 chosen, 2 rejected; segment p+1)

Validity masks mark the real pairs (0 = padding of the last batch, or a pair the data
pipeline labelled a tie); response lengths are the `loss_mask` counts per sequence, or
`chosen_lengths` / `rejected_lengths` when the batch has them. A batch without any
validity key counts every pair.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import pathlib
import tempfile
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import numpy as np
import tqdm

from prefjax.eval import metrics as metrics_lib
from prefjax.eval import registry

ScorePairsFn = Callable[[dict], tuple[Any, Any]]
BatchSource = Union[Iterable[dict], Callable[[int], Iterable[dict]]]

# Re-exported: the registry of named sets lives in prefjax/eval/registry.py.
EVAL_SETS = registry.EVAL_SETS
EvalSetSpec = registry.EvalSetSpec
default_shared_data_dir = registry.default_shared_data_dir
resolve_path = registry.resolve_path


@dataclasses.dataclass
class ScoredPairs:
  """Scores and lengths of the valid pairs of one set, in data order.

  Attributes:
    chosen: [N] scores of the chosen responses.
    rejected: [N] scores of the rejected responses.
    chosen_lengths: [N] response token counts (NaN where unknown).
    rejected_lengths: [N] response token counts (NaN where unknown).
  """
  chosen: np.ndarray
  rejected: np.ndarray
  chosen_lengths: np.ndarray
  rejected_lengths: np.ndarray

  @property
  def has_lengths(self) -> bool:
    return bool(self.chosen.size) and not (np.isnan(self.chosen_lengths).any()
                                           or np.isnan(self.rejected_lengths).any())


@dataclasses.dataclass
class SetResult:
  """What `evaluate_sets` returns per set: the metrics dict and the raw scores."""
  name: str
  tag: Optional[str]
  metrics: dict[str, Any]
  scores: ScoredPairs


def _segment_counts(loss_mask: np.ndarray, index: np.ndarray, num: int) -> np.ndarray:
  """[R, num] sums of loss_mask per sequence index (index < 0 is ignored)."""
  rows = np.broadcast_to(np.arange(loss_mask.shape[0])[:, None], index.shape)
  counts = np.zeros((loss_mask.shape[0], num + 1), np.float64)
  idx = np.where((index >= 0) & (index < num), index, num)
  np.add.at(counts, (rows, idx), loss_mask.astype(np.float64))
  return counts[:, :num]


def batch_pair_lengths(batch: Mapping[str, Any], num_pairs_shape: tuple[int, ...]
                       ) -> tuple[np.ndarray, np.ndarray]:
  """(chosen, rejected) response lengths of each pair slot of a batch.

  Args:
    batch: a numpy batch in one of the pair layouts (module docstring).
    num_pairs_shape: shape of the pair slots: (B,) padded, (R, S) packed/prompt-shared.

  Returns:
    two float arrays of `num_pairs_shape` (NaN when the batch has no `loss_mask`).
  """
  if "chosen_lengths" in batch and "rejected_lengths" in batch:
    return (np.asarray(batch["chosen_lengths"], np.float64).reshape(num_pairs_shape),
            np.asarray(batch["rejected_lengths"], np.float64).reshape(num_pairs_shape))
  if "loss_mask" not in batch:
    nan = np.full(num_pairs_shape, np.nan)
    return nan, nan.copy()
  lm = np.asarray(batch["loss_mask"])
  if lm.ndim == 3:  # padded [B, 2, L]
    counts = lm.astype(np.float64).sum(-1)
    return counts[:, 0].reshape(num_pairs_shape), counts[:, 1].reshape(num_pairs_shape)
  if len(num_pairs_shape) != 2 or "segment_ids" not in batch:
    raise ValueError("a packed / prompt-shared batch (loss_mask [R, L]) needs `segment_ids` "
                     f"and a `pair_mask` [R, S]; got pair slots of shape {num_pairs_shape}")
  rows, slots = num_pairs_shape
  seg = np.asarray(batch["segment_ids"]).astype(np.int64)
  if "branch_ids" in batch:  # prompt-shared: sequence 2·(seg−1) + (branch−1)
    br = np.asarray(batch["branch_ids"]).astype(np.int64)
    index = np.where((seg > 0) & (br > 0), 2 * (seg - 1) + (br - 1), -1)
  else:  # packed: chosen of pair p = segment 2p+1, rejected = 2p+2
    index = np.where(seg > 0, seg - 1, -1)
  counts = _segment_counts(lm, index, 2 * slots).reshape(rows, slots, 2)
  return counts[..., 0].reshape(num_pairs_shape), counts[..., 1].reshape(num_pairs_shape)


def batch_pair_mask(batch: Mapping[str, Any], shape: tuple[int, ...]) -> np.ndarray:
  """Validity of each pair slot: `pair_mask`, else `example_mask`, else all ones."""
  for key in ("pair_mask", "example_mask"):
    if key in batch:
      m = np.asarray(batch[key])
      if m.size != int(np.prod(shape)):
        raise ValueError(f"batch[{key!r}] has shape {m.shape}, scores have shape {shape}")
      return m.reshape(shape).astype(bool)
  return np.ones(shape, bool)


def _pair_slot_shape(batch: Mapping[str, Any], scores: np.ndarray) -> tuple[int, ...]:
  for key in ("pair_mask", "example_mask"):
    if key in batch:
      return tuple(np.shape(batch[key]))
  return scores.shape


def score_batches_multi(score_fns: Mapping[str, ScorePairsFn], batches: Iterable[dict], *,
                        desc: Optional[str] = None, total: Optional[int] = None,
                        progress: bool = True) -> dict[str, ScoredPairs]:
  """`score_batches` for several scorers in ONE pass over the batches (data read once).

  Returns:
    {kind: ScoredPairs}.
  """
  if total is None and hasattr(batches, "__len__"):
    total = len(batches)  # type: ignore[arg-type]
  parts: dict[str, list[tuple[np.ndarray, ...]]] = {k: [] for k in score_fns}
  for batch in tqdm.tqdm(batches, desc=desc, total=total, disable=not progress,
                         unit="batch", leave=False):
    lengths = None
    for kind, fn in score_fns.items():
      chosen, rejected = fn(batch)
      chosen = np.asarray(chosen, np.float64)
      rejected = np.asarray(rejected, np.float64)
      shape = _pair_slot_shape(batch, chosen)
      keep = batch_pair_mask(batch, shape)
      if lengths is None:
        lengths = tuple(a[keep] for a in batch_pair_lengths(batch, shape))
      parts[kind].append((chosen.reshape(shape)[keep], rejected.reshape(shape)[keep]) + lengths)
  out = {}
  for kind, ps in parts.items():
    if not ps:
      empty = np.zeros((0,), np.float64)
      out[kind] = ScoredPairs(empty, empty.copy(), empty.copy(), empty.copy())
    else:
      out[kind] = ScoredPairs(*(np.concatenate([p[i] for p in ps]) for i in range(4)))
  return out


def score_batches(score_pairs_fn: ScorePairsFn, batches: Iterable[dict], *,
                  desc: Optional[str] = None, total: Optional[int] = None,
                  progress: bool = True) -> ScoredPairs:
  """Runs `score_pairs_fn` over the batches and keeps the scores of the valid pairs.

  Args:
    score_pairs_fn: `batch -> (chosen [B] or [R, S], rejected [same])`.
    batches: iterable of numpy batch dicts (module docstring), in data order.
    desc: progress-bar label; total: number of batches, if known (else `len(batches)`).
    progress: show a tqdm progress bar.

  Returns:
    `ScoredPairs` of the valid pairs, concatenated in order.
  """
  return score_batches_multi({"_": score_pairs_fn}, batches, desc=desc, total=total,
                             progress=progress)["_"]


def scored_metrics(scores: ScoredPairs, *, ties: str = "half", bootstrap: int = 1000,
                   seed: int = 0) -> dict[str, Any]:
  """`metrics.pair_metrics` of a `ScoredPairs` (length buckets when lengths are known)."""
  lengths = (scores.chosen_lengths, scores.rejected_lengths) if scores.has_lengths else (None, None)
  return metrics_lib.pair_metrics(scores.chosen, scores.rejected, chosen_lengths=lengths[0],
                                  rejected_lengths=lengths[1], ties=ties,
                                  bootstrap=bootstrap, seed=seed)


def evaluate_kinds(score_fns: Mapping[str, ScorePairsFn], eval_sets: Mapping[str, BatchSource],
                   *, batch_size: int, tags: Optional[Mapping[str, str]] = None,
                   ties: str = "half", bootstrap: int = 1000, seed: int = 0,
                   progress: bool = True, max_batches: Optional[int] = None
                   ) -> dict[str, dict[str, SetResult]]:
  """Evaluates several scorers (e.g. explicit and implicit RM) on several sets, reading
  each set once.

  Args:
    score_fns: kind -> `score_pairs_fn`.
    eval_sets, batch_size, tags, ties, bootstrap, seed, progress: as in `evaluate_sets`.
    max_batches: score only the first this many batches of each set (`config.eval.
      num_batches`; None or 0: all); the metrics then record `num_batches_cap`.

  Returns:
    {kind: {name: SetResult}}.
  """
  tags = dict(registry.tags_for(eval_sets)) if tags is None else dict(tags)
  out: dict[str, dict[str, SetResult]] = {kind: {} for kind in score_fns}
  if max_batches is not None and int(max_batches) < 0:
    raise ValueError(f"max_batches={max_batches}: expected None, 0 (all) or a positive count")
  cap = int(max_batches or 0) or None
  for name, source in eval_sets.items():
    batches = source(batch_size) if callable(source) else source
    try:
      total = len(batches) if hasattr(batches, "__len__") else None
    except TypeError:  # packed layouts: the number of rows is not known ahead
      total = None
    if cap is not None:
      total = cap if total is None else min(cap, total)
    scored = score_batches_multi(score_fns, itertools.islice(batches, cap), total=total,
                                 desc=f"eval {name}", progress=progress)
    for kind, scores in scored.items():
      m = scored_metrics(scores, ties=ties, bootstrap=bootstrap, seed=seed)
      if cap is not None:
        m["num_batches_cap"] = cap
      if hasattr(batches, "dropped"):  # prefjax.data pipelines count what they skipped
        m["data_dropped"] = dict(batches.dropped)
      if getattr(batches, "dropped_before", None):  # a split copy's own drops (in the above)
        m["data_dropped_before_copy"] = dict(batches.dropped_before)
      out[kind][name] = SetResult(name, tags.get(name), m, scores)
  return out


def evaluate_sets(score_pairs_fn: ScorePairsFn, eval_sets: Mapping[str, BatchSource], *,
                  batch_size: int, tags: Optional[Mapping[str, str]] = None,
                  ties: str = "half", bootstrap: int = 1000, seed: int = 0,
                  progress: bool = True) -> dict[str, SetResult]:
  """Evaluates one scorer on several sets.

  Args:
    score_pairs_fn: `batch -> (chosen_scores, rejected_scores)` (module docstring).
    eval_sets: set name -> an iterable of batches, or a callable `batch_size ->
      iterable` (e.g. from `registry_sources`), called once here.
    batch_size: passed to callable sources.
    tags: set name -> "id" / "ood"; default: the registry's tags for registered names.
    ties, bootstrap, seed: see `metrics.pair_metrics`.
    progress: tqdm progress bar per set.

  Returns:
    {name: SetResult}, in the order of `eval_sets`.
  """
  return evaluate_kinds({"_": score_pairs_fn}, eval_sets, batch_size=batch_size, tags=tags,
                        ties=ties, bootstrap=bootstrap, seed=seed, progress=progress)["_"]


def registry_sources(names: Iterable[str],
                     make_batches: Callable[[registry.EvalSetSpec, pathlib.Path, int], Iterable[dict]],
                     *, shared_data_dir: Optional[Union[str, os.PathLike]] = None,
                     ) -> dict[str, Callable[[int], Iterable[dict]]]:
  """Lazy batch sources for registered sets.

  Args:
    names: registered set names (`EVAL_SETS`), e.g. `registry.OOD_SETS`.
    make_batches: `(spec, absolute_path, batch_size) -> iterable of batches`; typically
      a closure over the tokenizer and data config that calls prefjax.data's eval
      iterator for `spec.format` (in order, padded last batch with a mask).
    shared_data_dir: base dir of the files (default `default_shared_data_dir()`).

  Returns:
    {name: batch_size -> iterable}, for `evaluate_sets`. Paths are checked now, so a
    missing file fails before any model work, naming the set and path.
  """
  out = {}
  for name in names:
    spec = registry.get_spec(name)
    path = registry.resolve_path(name, shared_data_dir)
    out[name] = (lambda bs, spec=spec, path=path: make_batches(spec, path, bs))
  return out


class _PipelineBatches:
  """In-order passes over a `prefjax.data` eval pipeline; `len` = batches (padded layout);
  `dropped` = the last pipeline's drop counts (empty responses, ties, identical pairs, ...)."""

  def __init__(self, make: Callable[[], Any], padded: bool):
    self._make = make
    self._pipe = make()  # validates the file now; reused by the first pass
    self._fresh = True
    info = self._pipe.info
    self._len = math.ceil(info.local_items / max(1, info.local_batch_size)) if padded else None

  def __iter__(self):
    if not self._fresh:
      self._pipe = self._make()
    self._fresh = False
    return iter(self._pipe)

  def __len__(self) -> int:
    if self._len is None:
      raise TypeError("number of batches unknown for packed layouts")
    return self._len

  @property
  def dropped(self) -> dict[str, int]:
    return dict(self._pipe.dropped.counts)


def drop_score_ties(path: pathlib.Path, cache_dir: Optional[Union[str, os.PathLike]] = None
                    ) -> pathlib.Path:
  """A JSONL copy of `path` without records whose `metadata.score_chosen == score_rejected`
  (UltraFeedback binarisation ties; README of shared/data), in `cache_dir` (default: a new
  temporary directory). Records without scores are kept."""
  out_dir = pathlib.Path(cache_dir) if cache_dir is not None else pathlib.Path(tempfile.mkdtemp())
  out_dir.mkdir(parents=True, exist_ok=True)
  out = out_dir / f"{path.stem}.no_score_ties.jsonl"
  kept = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      if not line.strip():
        continue
      meta = json.loads(line).get("metadata") or {}
      if "score_chosen" in meta and meta["score_chosen"] == meta.get("score_rejected"):
        continue
      kept.append(line if line.endswith("\n") else line + "\n")
  out.write_text("".join(kept), encoding="utf-8")
  return out


def pipeline_batches(data_config: Any, tokenizer: Any = None, *, process_index: int = 0,
                     process_count: int = 1, cache_dir: Optional[Union[str, os.PathLike]] = None
                     ) -> Callable[[registry.EvalSetSpec, pathlib.Path, int], Iterable[dict]]:
  """`make_batches` for `registry_sources`, backed by `prefjax.data.make_pipeline`.

  Each set is read with the trainer's data settings (chat template, tokenizer, lengths,
  layout) and overrides: `eval={spec.name: path}`, `format=spec.format`, `kind="pairs"`,
  `eval_batch_size=batch_size`, `on_bad_record="skip"` (label ties, empty and identical
  responses are dropped and counted, reported as `data_dropped` in the metrics). The
  eval iterator is one in-order pass with the last batch padded and masked. Response
  lengths in the length buckets are after `max_response_len` truncation.

  Args:
    data_config: the run's `config.data` (ConfigDict or mapping).
    tokenizer: a `prefjax.data.Tokenizer`, a tokenizer name/path, or None (`data.tokenizer`).
    process_index, process_count: this host's shard (multi-host eval).
    cache_dir: where tie-filtered copies (`drop_score_ties`) are written.
  """
  from prefjax import data as data_lib  # pylint: disable=import-outside-toplevel
  base = {k: data_config[k] for k in data_config.keys()}
  if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
    tokenizer = data_lib.load_tokenizer(str(tokenizer or base.get("tokenizer") or "mistral_v1"))

  def make_batches(spec: registry.EvalSetSpec, path: pathlib.Path, batch_size: int):
    if spec.drop_score_ties:
      path = drop_score_ties(path, cache_dir)
    cfg = dict(base, eval={spec.name: str(path)}, format=spec.format, kind="pairs",
               eval_batch_size=int(batch_size), batch_size=int(batch_size),
               on_bad_record="skip", shuffle=False)
    make = lambda: data_lib.make_pipeline(cfg, tokenizer, split=spec.name,  # noqa: E731
                                          process_index=process_index,
                                          process_count=process_count)
    layout = cfg.get("layout") or cfg.get("task_layout") or "padded"
    return _PipelineBatches(make, padded=layout == "padded")
  return make_batches


_FIELDS = ("chosen", "rejected", "chosen_lengths", "rejected_lengths")


def save_scores(path: Union[str, os.PathLike], results: Mapping[str, Mapping[str, SetResult]]
                ) -> pathlib.Path:
  """Per-pair scores of every kind and set as `<kind>__<set>__<field>` arrays in an .npz,
  to recompute metrics or redraw plots later (`load_scores`)."""
  arrays = {f"{kind}__{name}__{f}": getattr(r.scores, f)
            for kind, sets in results.items() for name, r in sets.items() for f in _FIELDS}
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(path, **arrays)
  return path


def load_scores(path: Union[str, os.PathLike]) -> dict[str, dict[str, ScoredPairs]]:
  """Inverse of `save_scores`: {kind: {set: ScoredPairs}}."""
  out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
  with np.load(path) as z:
    for key in z.files:
      kind, rest = key.split("__", 1)
      name, field = rest.rsplit("__", 1)
      out.setdefault(kind, {}).setdefault(name, {})[field] = z[key]
  return {k: {n: ScoredPairs(**v) for n, v in sets.items()} for k, sets in out.items()}


def rerender(scores_path: Union[str, os.PathLike], workdir: Union[str, os.PathLike], *,
             tags: Optional[Mapping[str, str]] = None, ties: str = "half",
             bootstrap: int = 1000, seed: int = 0, plots: bool = True,
             meta: Optional[Mapping[str, Any]] = None) -> dict[str, pathlib.Path]:
  """Recomputes metrics, report and plots from a saved `eval_scores.npz` (no model needed),
  e.g. with another tie policy or other ID/OOD tags.

  Returns:
    {label: path} of the written files.
  """
  from prefjax.eval import report  # pylint: disable=import-outside-toplevel
  loaded = load_scores(scores_path)
  names = {n for sets in loaded.values() for n in sets}
  tags = dict(registry.tags_for(names)) if tags is None else dict(tags)
  results = {kind: {n: SetResult(n, tags.get(n), scored_metrics(sc, ties=ties,
                                                                bootstrap=bootstrap, seed=seed), sc)
                    for n, sc in sets.items()} for kind, sets in loaded.items()}
  files = report.write_report(workdir, {k: {n: r.metrics for n, r in v.items()}
                                        for k, v in results.items()}, tags=tags, meta=meta)
  if plots:
    from prefjax.eval import plots as plots_lib  # pylint: disable=import-outside-toplevel
    files.update(plots_lib.write_eval_plots(workdir, results))
  return files


def evaluate_and_report(score_fns: Mapping[str, ScorePairsFn],
                        eval_sets: Mapping[str, BatchSource], *, workdir: Union[str, os.PathLike],
                        batch_size: int, tags: Optional[Mapping[str, str]] = None,
                        ties: str = "half", bootstrap: int = 1000, seed: int = 0,
                        plots: bool = True, progress: bool = True,
                        meta: Optional[Mapping[str, Any]] = None,
                        max_batches: Optional[int] = None) -> dict[str, Any]:
  """Evaluates one or more scorers (e.g. {"explicit": rm_fn, "implicit": dpo_fn}) and
  writes `eval_results.json`, `eval_results.md`, `eval_results.html` and PNG plots.

  Args:
    score_fns: reward kind -> `score_pairs_fn`. With two kinds the report adds a
      side-by-side comparison.
    eval_sets: as in `evaluate_sets`; each set is read once for all kinds.
    workdir: output directory (created).
    batch_size, tags, ties, bootstrap, seed, progress: as in `evaluate_sets`.
    plots: also write the PNG figures (`prefjax.eval.plots`).
    meta: extra JSON-able info stored under "meta" (checkpoint, β, step, ...).
    max_batches: as in `evaluate_kinds` (`config.eval.num_batches`).

  Returns:
    {"results": {kind: {name: SetResult}}, "files": {label: path}}; files: json, markdown,
    html, scores (eval_scores.npz, `load_scores`) and the PNGs.
  """
  from prefjax.eval import report  # pylint: disable=import-outside-toplevel
  tags = dict(registry.tags_for(eval_sets)) if tags is None else dict(tags)
  results = evaluate_kinds(score_fns, eval_sets, batch_size=batch_size, tags=tags, ties=ties,
                           bootstrap=bootstrap, seed=seed, progress=progress,
                           max_batches=max_batches)
  by_kind = {kind: {n: r.metrics for n, r in res.items()} for kind, res in results.items()}
  files = report.write_report(workdir, by_kind, tags=tags, meta=meta)
  files["scores"] = save_scores(pathlib.Path(workdir) / "eval_scores.npz", results)
  if plots:
    from prefjax.eval import plots as plots_lib  # pylint: disable=import-outside-toplevel
    files.update(plots_lib.write_eval_plots(workdir, results))
  return {"results": results, "files": files}


def evaluate_registered(score_fns: Mapping[str, ScorePairsFn], *, data_config: Any,
                        workdir: Union[str, os.PathLike], batch_size: int,
                        sets: Optional[Iterable[str]] = None, tokenizer: Any = None,
                        shared_data_dir: Optional[Union[str, os.PathLike]] = None,
                        process_index: int = 0, process_count: int = 1, **kwargs: Any
                        ) -> dict[str, Any]:
  """The `eval_reward` / `eval_implicit_reward` tasks after the model is loaded.

  Reads the registered sets through `prefjax.data` with the run's data settings, scores
  them with every scorer, and writes the report and plots into `workdir`.

  Args:
    score_fns: kind -> `score_pairs_fn` (`scoring.reward_score_fn`,
      `scoring.implicit_score_fn`); two kinds give the side-by-side comparison.
    data_config: the run's `config.data` (template, tokenizer, lengths, layout).
    workdir: output directory.
    batch_size: global eval batch (pairs for padded layouts, rows for packed ones).
    sets: registered names (default: all of `EVAL_SETS`, ID then OOD).
    tokenizer: `prefjax.data.Tokenizer` or name/path (default: `data_config.tokenizer`).
    shared_data_dir: base dir of the files (default `default_shared_data_dir()`).
    process_index, process_count: this host's shard. With several hosts each one scores
      only its shard and the metrics here are per host; gather the scores first (e.g.
      `jax.experimental.multihost_utils.process_allgather`) for global numbers.
    **kwargs: `evaluate_and_report` options (ties, bootstrap, seed, plots, progress, meta).

  Returns:
    `evaluate_and_report`'s result.
  """
  names = list(sets) if sets is not None else list(registry.ID_SETS + registry.OOD_SETS)
  make = pipeline_batches(data_config, tokenizer, process_index=process_index,
                          process_count=process_count,
                          cache_dir=pathlib.Path(workdir) / "eval_cache")
  sources = registry_sources(names, make, shared_data_dir=shared_data_dir)
  return evaluate_and_report(score_fns, sources, workdir=workdir, batch_size=batch_size,
                             tags=registry.tags_for(names), **kwargs)
