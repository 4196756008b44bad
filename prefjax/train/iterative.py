r"""`task="iterative_dpo"`: iterative DPO with an explicit or an implicit annotator.

Algorithm 1 of Lin et al. 2024 ("On the Limited Generalization Capability of the Implicit
Reward Model Induced by Direct Preference Optimization"): starting from π_0 =
`config.model.init` (an SFT policy), for t = 1..T

  1. sample K responses per prompt from π_{t-1}        (`config.sample.*`, KV-cache sampler)
  2. score them with the annotator                      (`config.annotator.kind`:
       "explicit": a Bradley–Terry RM; "implicit": β·log π/π_ref of a DPO policy)
  3. best and worst response -> a preference pair; prompts whose best and worst tie (or
     with fewer than two non-empty responses) are skipped
  4. train π_t from π_{t-1} on those pairs with `config.loss` (the existing trainer,
     `prefjax.train.loop.run`, on a derived `task="preference"` config)

Layout of the workdir (everything is kept; a re-run resumes):

  iter_{t}/samples.jsonl         every sample: {"prompt", "prompt_text", "responses", "scores"}
  iter_{t}/generation_stats.json annotator reward / KL / length of π_{t-1}'s samples
  iter_{t}/data.jsonl            the pairs {"prompt", "chosen", "rejected"} (explicit format)
  iter_{t}/checkpoints, metrics.jsonl, config.json   the DPO run of iteration t
  final/samples.jsonl            π_T's samples (`iterative.final_eval`)
  iterative_metrics.jsonl        one row per iteration (and "final"): reward_mean/std of the
                                 samples under the annotator, kl_to_initial (mean over samples
                                 of log π_i(y|x) − log π_0(y|x), a Monte-Carlo KL estimate),
                                 response_length, pairs kept / skipped, the DPO run's last loss

An iteration is complete when its data file and its final checkpoint
(`checkpoints/<total_steps>`) exist; complete iterations are skipped. Data files are written
to a temporary name and renamed, so a kill never leaves a half-written `data.jsonl`; a kill
during training resumes the DPO run from its last checkpoint.

  python -m prefjax.main --config=configs/iterative_dpo.py --workdir=/tmp/iter_explicit \
      --config.model.init=/tmp/sft --config.annotator.kind=explicit \
      --config.annotator.path=/tmp/rm
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import pathlib
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from prefjax import data as data_lib
from prefjax.data import config as data_config_lib
from prefjax.data import templates as templates_lib
from prefjax.eval import generate as gen
from prefjax.eval import scoring
from prefjax.eval import tasks as eval_tasks
from prefjax.train import builders
from prefjax.train.validation import ConfigError

METRICS_FILE = "iterative_metrics.jsonl"
REFERENCES = ("initial", "previous")


# --------------------------------------------------------------------------- selection


@dataclasses.dataclass
class Selection:
  """Pairs built from one round of samples, and what was skipped."""
  pairs: list[dict[str, Any]]
  ties: int = 0
  too_few: int = 0


def best_and_worst(scores: Sequence[float], texts: Sequence[str]
                   ) -> tuple[Optional[tuple[int, int]], str]:
  """(best index, worst index) among the non-empty responses, or (None, why skipped).

  Best = highest score (first one on equal scores), worst = lowest (last one); a prompt is
  skipped when fewer than two responses are non-empty ("too_few") or best and worst have
  the same score or text ("tie"), Lin et al. 2024, Alg. 1.
  """
  valid = [k for k, t in enumerate(texts) if t.strip()]
  if len(valid) < 2:
    return None, "too_few"
  best = max(valid, key=lambda k: (scores[k], -k))
  worst = min(valid, key=lambda k: (scores[k], -k))
  if scores[best] == scores[worst] or texts[best] == texts[worst]:
    return None, "tie"
  return (best, worst), ""


def select_pairs(prompts: Sequence[gen.Prompt], texts: Sequence[Sequence[str]],
                 scores: Sequence[Sequence[float]]) -> Selection:
  """Explicit-format records {"prompt", "chosen", "rejected"}, one per kept prompt."""
  sel = Selection([])
  for p, ts, ss in zip(prompts, texts, scores):
    pick, why = best_and_worst(list(ss), list(ts))
    if pick is None:
      setattr(sel, why, getattr(sel, why) + 1)
      continue
    sel.pairs.append({"prompt": p.record, "chosen": ts[pick[0]], "rejected": ts[pick[1]]})
  return sel


# --------------------------------------------------------------------------- config


def _policy_path(workdir: pathlib.Path, initial: str, t: int) -> str:
  """π_{t-1}: the initial policy for t = 1, else iteration t-1's run."""
  return initial if t == 1 else str(workdir / f"iter_{t - 1}")


def train_config(config: Any, data_path: str, init: str, initial: str) -> Any:
  """The `task="preference"` config of one iteration: `config` with data.train = the
  iteration's pairs (explicit format, no held-out split), model.init = π_{t-1}, and the
  reference π_0 (`iterative.reference="initial"`) or π_{t-1} ("previous")."""
  ref = config.iterative.get("reference", "initial")
  if ref not in REFERENCES:
    raise ConfigError(f"config.iterative.reference={ref!r}; expected one of {REFERENCES}")
  d = copy.deepcopy(config)
  with d.unlocked():
    d.task = "preference"
    saved = eval_tasks.saved_config(initial)
    if saved and (saved.get("model") or {}).get("preset"):
      d.model.preset = saved["model"]["preset"]
    with d.model.ignore_type():
      d.model.update(eval_tasks.arch_keys(initial))  # π_0's architecture, whatever the recipe says
    d.model.init = init
    d.reference.init = initial if ref == "initial" else None
    d.data.train = data_path
    d.data.format = "explicit"
    d.data.eval = None
    d.data.split_fraction = 1.0
    if "holdout" in d.data:
      d.data.holdout = None
    d.data.on_bad_record = "skip"
    d.eval.every_steps = 0
    d.ckpt.best_metric = ""
  return d


def _final_step(run_dir: pathlib.Path) -> Optional[int]:
  """Latest finalised checkpoint step (Orbax temp folders are not digits)."""
  ck = run_dir / "checkpoints"
  steps = [int(n) for n in os.listdir(ck) if n.isdigit()] if ck.is_dir() else []
  return max(steps) if steps else None


def expected_steps(cfg: Any) -> int:
  """Optimizer steps of one iteration's run (`total_steps`, or from `num_epochs`)."""
  from prefjax.train import data_io  # pylint: disable=import-outside-toplevel
  return data_io.total_steps(cfg, data_io.load_tokenizer(cfg))


def iteration_complete(run_dir: pathlib.Path, cfg: Any) -> bool:
  """Data file and final checkpoint exist."""
  if not (run_dir / "data.jsonl").is_file():
    return False
  step = _final_step(run_dir)
  return step is not None and step >= expected_steps(cfg)


# --------------------------------------------------------------------------- metrics


def read_rows(workdir: pathlib.Path) -> list[dict[str, Any]]:
  path = workdir / METRICS_FILE
  if not path.is_file():
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def append_row(workdir: pathlib.Path, row: dict[str, Any]) -> None:
  """Appends one row unless a row of the same stage and iteration is already there."""
  if any(r.get("stage") == row["stage"] and r.get("iteration") == row["iteration"]
         for r in read_rows(workdir)):
    return
  with open(workdir / METRICS_FILE, "a", encoding="utf-8") as f:
    f.write(json.dumps(row) + "\n")


def last_train_metrics(run_dir: pathlib.Path) -> dict[str, Any]:
  """The last training row (with `loss`) of a run's metrics.jsonl."""
  path = run_dir / "metrics.jsonl"
  last: dict[str, Any] = {}
  if path.is_file():
    with open(path, encoding="utf-8") as f:
      for line in f:
        row = json.loads(line)
        if "loss" in row:
          last = row
  keys = ("step", "loss", "rewards/accuracies", "rewards/margins")
  return {f"train/{k}": last[k] for k in keys if k in last}


# --------------------------------------------------------------------------- one round


class Round:
  """Sampling + annotation of one policy (steps 1–2 of Alg. 1), with the shared pieces."""

  def __init__(self, config: Any, mesh: Any, rules: Any):
    self.config, self.mesh, self.rules = config, mesh, rules
    self.kernels = builders.kernels_for_mesh(config, mesh)  # sampling and scoring
    self.tokenizer = data_lib.load_tokenizer(data_config_lib.get(config.data, "tokenizer"))
    self.template = templates_lib.get_template(
        data_config_lib.get(config.data, "chat_template"))
    self.max_prompt = int(config.data.max_prompt_len)
    self.max_resp = int(config.data.max_response_len)
    self.stop = gen.stop_tokens(self.tokenizer)
    self.settings = gen.SampleSettings.from_config(config.sample)
    it = config.iterative
    self.prompts = gen.load_prompts(it.get("prompts") or config.data.train, config.data,
                                    self.tokenizer, split=it.get("prompt_split") or None,
                                    limit=int(it.get("num_prompts") or 0))
    if not self.prompts:
      raise ConfigError("no prompts for iterative DPO (config.iterative.prompts)")
    self.annotate = self._annotator()
    self.initial = None  # (cfg, params) of π_0, loaded on first use

  def _annotator(self) -> Callable[[dict], Any]:
    a, c = self.config.annotator, self.config
    if not a.get("path"):
      raise ConfigError("set config.annotator.path (the reward model or the DPO policy)")
    if a.kind == "explicit":
      cfg, params = eval_tasks.load_reward_model(a.path, c.model, mesh=self.mesh,
                                                 rules=self.rules)
      return scoring.reward_score_fn(cfg, params, kernels=self.kernels)
    if a.kind == "implicit":
      fn, info, _, _ = eval_tasks.implicit_scorer(
          a.path, a.get("reference"), c.model, method=a.get("method"), beta=a.get("beta"),
          mesh=self.mesh, rules=self.rules, chunk_size=int(c.train.get("logps_chunk_size", 128)),
          kernels=self.kernels)
      logging.info("implicit annotator: %s", info)
      return fn
    raise ConfigError(f"config.annotator.kind={a.kind!r}; expected 'explicit' or 'implicit'")

  def prompts_for(self, t: int) -> list[gen.Prompt]:
    """All prompts, or the t-th of T disjoint parts (`iterative.split_prompts`)."""
    if not self.config.iterative.get("split_prompts", False):
      return self.prompts
    parts = np.array_split(np.arange(len(self.prompts)), int(self.config.iterative.num_iterations))
    return [self.prompts[i] for i in parts[(t - 1) % len(parts)]]

  def _seqs(self, prompts: Sequence[gen.Prompt], texts: Sequence[Sequence[str]]) -> list:
    return [(p.ids, gen.response_ids(x, self.tokenizer, self.template, self.max_resp))
            for p, xs in zip(prompts, texts) for x in xs]

  def _score(self, fn: Callable[[dict], Any], seqs: list) -> np.ndarray:
    return gen.score_responses(fn, seqs, batch_pairs=max(1, self.settings.batch_size // 2),
                               length=self.max_prompt + self.max_resp)

  def run(self, policy_path: str, prompts: Sequence[gen.Prompt], *, seed: int,
          index: int) -> tuple[list[list[str]], np.ndarray, dict[str, Any]]:
    """Samples K responses per prompt from `policy_path` and scores them.

    Returns:
      (texts [P][K], scores [P, K], stats: reward_mean/std, kl_to_initial,
      response_length).
    """
    c = self.config
    k = self.settings.num_samples
    cfg, params = eval_tasks.load_model(policy_path, c.model, task="preference",
                                        mesh=self.mesh, rules=self.rules)
    settings = dataclasses.replace(self.settings, seed=seed)
    ids = gen.sample_responses(cfg, params, prompts, settings, stop=self.stop,
                               pad_id=self.tokenizer.pad_id, prompt_width=self.max_prompt,
                               kernels=self.kernels)
    texts = [[self.tokenizer.decode(x) for x in row] for row in ids]
    seqs = self._seqs(prompts, texts)
    scores = self._score(self.annotate, seqs).reshape(len(prompts), k)
    kl = 0.0
    if index > 0:
      if self.initial is None:
        self.initial = eval_tasks.load_model(c.model.init, c.model, task="preference",
                                             mesh=self.mesh, rules=self.rules)
      ratio = scoring.implicit_score_fn(cfg, params, self.initial[1], method="dpo", beta=1.0,
                                        chunk_size=int(c.train.get("logps_chunk_size", 128)),
                                        kernels=self.kernels)
      kl = float(np.mean(self._score(ratio, seqs)))
    lengths = [len(x) for row in ids for x in row]
    stats = {"policy_index": index, "policy": policy_path, "num_prompts": len(prompts),
             "num_samples": k, "reward_mean": float(np.mean(scores)),
             "reward_std": float(np.std(scores)), "kl_to_initial": kl,
             "response_length": float(np.mean(lengths))}
    return texts, scores, stats


def _sample_records(prompts: Sequence[gen.Prompt], texts: Sequence[Sequence[str]],
                    scores: np.ndarray) -> list[dict[str, Any]]:
  return [{"prompt": p.record, "prompt_text": p.text, "responses": list(ts),
           "scores": [float(s) for s in ss]} for p, ts, ss in zip(prompts, texts, scores)]


def _write_json(path: pathlib.Path, obj: Any) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
  os.replace(tmp, path)


def build_iteration_data(rnd: Round, run_dir: pathlib.Path, policy_path: str, t: int
                         ) -> dict[str, Any]:
  """Steps 1–3 of Alg. 1 for iteration t: samples.jsonl, generation_stats.json, then
  data.jsonl (last, atomically: its presence marks the data as complete)."""
  prompts = rnd.prompts_for(t)
  seed = int(rnd.config.sample.get("seed", 0) or 0) + t
  texts, scores, stats = rnd.run(policy_path, prompts, seed=seed, index=t - 1)
  sel = select_pairs(prompts, texts, scores)
  if not sel.pairs:
    raise ConfigError(f"iteration {t}: every prompt's best and worst sample tie (or are empty); "
                     "raise config.sample.num_samples or the temperature")
  stats.update(num_pairs=len(sel.pairs), skipped_ties=sel.ties, skipped_too_few=sel.too_few)
  run_dir.mkdir(parents=True, exist_ok=True)
  gen.write_jsonl(run_dir / "samples.jsonl", _sample_records(prompts, texts, scores))
  _write_json(run_dir / "generation_stats.json", stats)
  gen.write_jsonl(run_dir / "data.jsonl", sel.pairs)
  logging.info("iteration %d: %d pairs (%d ties, %d too few), reward %.4f", t, len(sel.pairs),
               sel.ties, sel.too_few, stats["reward_mean"])
  return stats


# --------------------------------------------------------------------------- the task


def _check(config: Any) -> None:
  from prefjax.train import validation  # pylint: disable=import-outside-toplevel
  if not config.model.get("init"):
    raise ConfigError("iterative DPO starts from a policy: set config.model.init (SFT run)")
  if int(config.sample.num_samples) < 2:
    raise ConfigError("config.sample.num_samples must be >= 2 (best and worst of K)")
  validation.validate(train_config(config, "placeholder.jsonl", config.model.init,
                                   config.model.init))


def run_iterative_dpo(config: Any, workdir: str) -> list[dict[str, Any]]:
  """Runs (or resumes) T iterations of Lin et al. 2024, Alg. 1; returns the metric rows.

  `config.iterative.stop_after` (> 0) stops after that many iterations (a later run with
  it unset continues); `config.iterative.final_eval` adds a row for π_T's samples.
  """
  from prefjax.train import loop  # pylint: disable=import-outside-toplevel
  _check(config)
  wd = pathlib.Path(workdir)
  wd.mkdir(parents=True, exist_ok=True)
  it = config.iterative
  num = int(it.num_iterations)
  stop_after = int(it.get("stop_after", 0) or 0)
  initial = str(config.model.init)
  builders.maybe_initialize_distributed(config.get("distributed"))
  mesh, rules = builders.make_mesh(config)
  rnd = None

  def get_round() -> Round:
    nonlocal rnd
    if rnd is None:
      with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        rnd = Round(config, mesh, rules)
    return rnd

  for t in range(1, num + 1):
    if stop_after and t > stop_after:
      logging.info("stopping after iteration %d (iterative.stop_after)", stop_after)
      return read_rows(wd)
    run_dir = wd / f"iter_{t}"
    policy = _policy_path(wd, initial, t)
    cfg_t = train_config(config, str(run_dir / "data.jsonl"), policy, initial)
    if not (run_dir / "data.jsonl").is_file():
      with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        build_iteration_data(get_round(), run_dir, policy, t)
    if not iteration_complete(run_dir, cfg_t):
      loop.run(cfg_t, str(run_dir))  # a signal raises loop.StoppedBySignal: rerun resumes
    stats_path = run_dir / "generation_stats.json"
    stats = json.loads(stats_path.read_text(encoding="utf-8")) if stats_path.is_file() else {}
    append_row(wd, {"stage": "iteration", "iteration": t, **stats,
                    **last_train_metrics(run_dir)})
  if it.get("final_eval", True) and not any(r.get("stage") == "final" for r in read_rows(wd)):
    final_dir = wd / "final"
    policy = _policy_path(wd, initial, num + 1)
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
      r = get_round()
      prompts = r.prompts
      texts, scores, stats = r.run(policy, prompts,
                                   seed=int(config.sample.get("seed", 0) or 0) + num + 1,
                                   index=num)
    gen.write_jsonl(final_dir / "samples.jsonl", _sample_records(prompts, texts, scores))
    append_row(wd, {"stage": "final", "iteration": num, **stats})
  return read_rows(wd)
