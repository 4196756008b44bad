r"""The `generate` task, and the sampling / scoring helpers iterative DPO shares with it.

  prompts    `load_prompts`: the prompts of a preference (or SFT) file through `prefjax.data`
             (format, the train/eval hash split), rendered with the chat template and
             tokenized like training (`encode_prompts`: BOS, left truncation)
  sampling   `sample_responses`: K samples per prompt from one policy with the KV-cache
             sampler (`prefjax.models.sample`), fixed shapes (one compile), run under the
             run's mesh so the params keep their sharding
  scoring    `score_responses`: any pair `score_pairs_fn` (explicit RM head at the last
             token, or an implicit reward, `prefjax.eval.scoring`) applied to single
             responses, two per padded pair slot

`run_generate(config, workdir)` samples from each policy of `config.generate.policies`,
optionally scores every response with `config.generate.reward_model`, and writes
`<workdir>/generations/<policy>.jsonl` (`{"prompt", "response", "score", "sample",
"length"}`) and, when scored, `generation_eval.{json,md}` + `generation_eval_scores.png`
(`prefjax.eval.write_generation_report`: score distributions and a case-study table of the
first policy against each other). Iterative DPO (Lin et al. 2024, Alg. 1) reuses these
pieces in `prefjax.train.iterative`.

  python -m prefjax.main --config=configs/generate.py --workdir=/tmp/gen \
      --config.generate.policies=sft=/tmp/sft,dpo=/tmp/dpo --config.generate.reward_model=/tmp/rm
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from prefjax import data as data_lib
from prefjax.data import config as data_config_lib
from prefjax.data import index as index_lib
from prefjax.data import templates as templates_lib
from prefjax.data import tokenize as tokenize_lib
from prefjax.train.validation import ConfigError

# Template pieces that end an assistant turn (sampling stops there like at EOS).
END_PIECES = ("<end_of_turn>", "<|eot_id|>")


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt: `text` is the rendered prompt (the key of the JSONL records), `record` what
  an explicit-format preference file stores (HH transcript string or a message list)."""
  text: str
  record: Any
  ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """Decoding settings (`config.sample.*`)."""
  num_samples: int = 1
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  batch_size: int = 16
  seed: int = 0

  @classmethod
  def from_config(cls, c: Any, **overrides: Any) -> "SampleSettings":
    kw = {f.name: c.get(f.name) for f in dataclasses.fields(cls) if c.get(f.name) is not None}
    kw.update(overrides)
    return cls(**kw)


# --------------------------------------------------------------------------- prompts


def _prompt_record(ex: data_lib.Example) -> Any:
  if ex.prompt_text is not None:
    return ex.prompt_text
  return [{"role": r, "content": c} for r, c in ex.prompt]


def load_prompts(spec: Any, data_config: Any, tokenizer: data_lib.Tokenizer, *,
                 split: Optional[str] = None, limit: int = 0) -> list[Prompt]:
  """Unique prompts of `spec` (path / glob / list) parsed with `data_config.format`.

  Args:
    spec: data files.
    data_config: the run's `config.data` (format, chat template, lengths, split fraction).
    tokenizer: for the prompt ids.
    split: "train" / "eval": that side of the `data.split_fraction` hash split (by first
      human turn, as the trainer splits); None: every record.
    limit: keep the first `limit` unique prompts (0: all).
  """
  g = lambda k: data_config_lib.get(data_config, k)  # noqa: E731
  fraction = g("split_fraction") if split else None
  index = index_lib.build_index(spec, fmt=g("format"), kind="pairs", policy="skip",
                                part=split, fraction=fraction)
  template = templates_lib.get_template(g("chat_template"))
  out, seen = [], set()
  for rec_index in dict.fromkeys(int(i) for i in index.items[:, 0]):
    ex = index_lib.parse_item(index.source, rec_index, g("format"), "pairs")
    text = templates_lib.render_prompt(template, ex.prompt, ex.prompt_text)
    if text in seen:
      continue
    seen.add(text)
    ids = encode_prompt(text, tokenizer, template, int(g("max_prompt_len")))
    out.append(Prompt(text, _prompt_record(ex), tuple(ids)))
    if limit and len(out) >= limit:
      break
  return out


def encode_prompt(text: str, tokenizer: data_lib.Tokenizer, template: Any,
                  max_prompt_len: int) -> list[int]:
  """Prompt ids as the data pipeline builds them: BOS + text, truncated from the left."""
  ids = tokenizer.encode_prompt(text, template.specials)
  t = tokenize_lib.truncate(tokenize_lib.Tokenized(ids, [[0]]),
                            tokenize_lib.Limits(max_prompt_len + 1, max_prompt_len, 1),
                            keep_bos=tokenizer.add_bos)
  return t.prompt


def response_ids(text: str, tokenizer: data_lib.Tokenizer, template: Any,
                 max_response_len: int) -> list[int]:
  """Response ids as the data pipeline builds them (template suffix, EOS), truncated."""
  ids = tokenizer.encode_response(template.render_response(text), template.specials)
  return ids[:max_response_len]


def stop_tokens(tokenizer: data_lib.Tokenizer) -> tuple[int, ...]:
  """EOS and the end-of-turn pieces the vocabulary has."""
  ids = [tokenizer.eos_id] if tokenizer.eos_id >= 0 else []
  ids += [i for i in (tokenizer.piece_id(p) for p in END_PIECES) if i is not None]
  return tuple(dict.fromkeys(ids))


# --------------------------------------------------------------------------- sampling


def _prompt_array(prompts: Sequence[Sequence[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
  toks = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    toks[i, :len(p)] = p
  return toks, np.asarray([len(p) for p in prompts], np.int32)


def sample_responses(model_cfg: Any, params: Any, prompts: Sequence[Prompt],
                     settings: SampleSettings, *, stop: Sequence[int], pad_id: int = 0,
                     prompt_width: Optional[int] = None,
                     kernels: Any = None) -> list[list[list[int]]]:
  """Generated token ids [prompt][sample] (stop token removed), `settings.num_samples` each.

  Rows are prompt-major (prompt i, sample k -> row i·K + k); batches have a fixed shape
  (`batch_size` rows, prompts right-padded to `prompt_width`), the last one padded, so the
  sampler compiles once. Batch j uses key fold_in(seed, j). `kernels`: `models.Kernels`
  (None: the default backend's).
  """
  from prefjax import models  # pylint: disable=import-outside-toplevel
  k = int(settings.num_samples)
  rows = [p.ids for p in prompts for _ in range(k)]
  width = prompt_width or max(len(r) for r in rows)
  bs = int(settings.batch_size)
  key = jax.random.key(int(settings.seed))
  flat: list[list[int]] = []
  for j, start in enumerate(range(0, len(rows), bs)):
    chunk = list(rows[start:start + bs])
    n = len(chunk)
    chunk += [chunk[0]] * (bs - n)
    toks, lens = _prompt_array(chunk, width)
    out = models.sample(model_cfg, params, toks, lens, jax.random.fold_in(key, j),
                        max_new_tokens=int(settings.max_new_tokens),
                        temperature=float(settings.temperature), top_k=int(settings.top_k),
                        top_p=float(settings.top_p), stop_tokens=tuple(stop), pad_id=pad_id,
                        kernels=kernels)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for r in range(n):
      ids = tokens[r, :lengths[r]].tolist()
      if ids and ids[-1] in stop:
        ids = ids[:-1]
      flat.append(ids)
  return [flat[i * k:(i + 1) * k] for i in range(len(prompts))]


# --------------------------------------------------------------------------- scoring


def pair_batch(seqs: Sequence[tuple[Sequence[int], Sequence[int]]], num_pairs: int,
               length: int) -> dict[str, np.ndarray]:
  """Padded pair batch [num_pairs, 2, length] of (prompt ids, response ids) sequences:
  sequence 2i is pair i's "chosen", 2i+1 its "rejected"; missing slots repeat sequence 0."""
  keys = ("tokens", "targets", "positions", "segment_ids")
  b = {k: np.zeros((num_pairs * 2, length), np.int32) for k in keys}
  b["loss_mask"] = np.zeros((num_pairs * 2, length), np.float32)
  for i in range(num_pairs * 2):
    prompt, resp = seqs[i] if i < len(seqs) else seqs[0]
    s = tokenize_lib.sequence(prompt, resp)
    n = min(len(s["tokens"]), length)
    for k in ("tokens", "targets", "positions", "loss_mask"):
      b[k][i, :n] = s[k][:n]
    b["segment_ids"][i, :n] = 1
  return {k: v.reshape(num_pairs, 2, length) for k, v in b.items()}


def score_responses(score_pairs_fn: Callable[[dict], Any],
                    seqs: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_pairs: int,
                    length: int) -> np.ndarray:
  """[N] scores of single (prompt ids, response ids) sequences with a pair scorer.

  Two sequences fill one pair slot, in fixed-shape batches of `batch_pairs` pairs (one
  compile); `length` is the padded sequence length (longer sequences are cut).
  """
  out: list[np.ndarray] = []
  per_batch = 2 * int(batch_pairs)
  for start in range(0, len(seqs), per_batch):
    chunk = seqs[start:start + per_batch]
    chosen, rejected = score_pairs_fn(pair_batch(chunk, int(batch_pairs), length))
    both = np.stack([np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)], -1)
    out.append(both.reshape(-1)[:len(chunk)])
  return np.concatenate(out) if out else np.zeros((0,), np.float64)


# --------------------------------------------------------------------------- task


def parse_policies(policies: Any, default: Optional[str]) -> dict[str, str]:
  """`config.generate.policies`: dict name -> path, or "name=path,..." -> {name: path}."""
  if policies is None or policies == "" or policies == {}:
    if not default:
      raise ConfigError("set config.generate.policies (name=path,...) or config.model.init")
    return {"policy": default}
  if isinstance(policies, Mapping) or hasattr(policies, "items"):
    return {str(k): str(v) for k, v in dict(policies).items()}
  out = {}
  for i, entry in enumerate(p.strip() for p in str(policies).split(",") if p.strip()):
    name, sep, path = entry.partition("=")
    out[name if sep else f"policy{i}"] = path if sep else name
  return out


def write_jsonl(path: pathlib.Path, records: Sequence[Mapping[str, Any]]) -> pathlib.Path:
  """Writes JSONL atomically (temp file in the same folder, then rename)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return path


def generation_records(prompts: Sequence[Prompt], samples: Sequence[Sequence[Sequence[int]]],
                       tokenizer: data_lib.Tokenizer,
                       scores: Optional[np.ndarray] = None) -> list[dict[str, Any]]:
  """JSONL records `{"prompt", "response", "score", "sample", "length"}` (score None when
  unscored), prompt-major."""
  out, j = [], 0
  for p, resps in zip(prompts, samples):
    for k, ids in enumerate(resps):
      score = None if scores is None else float(scores[j])
      out.append({"prompt": p.text, "response": tokenizer.decode(ids), "score": score,
                  "sample": k, "length": len(ids)})
      j += 1
  return out


def run_generate(config: Any, workdir: str) -> dict[str, Any]:
  """`task="generate"`: sample from each policy, optionally score, write JSONL + report.

  Returns:
    {"files": {policy: jsonl path, "json"/"markdown"/"plot": report paths},
     "summary": {policy: {"mean_score", "mean_length", "n"}}}.
  """
  from prefjax.eval import cases  # pylint: disable=import-outside-toplevel
  from prefjax.eval import scoring  # pylint: disable=import-outside-toplevel
  from prefjax.eval import tasks  # pylint: disable=import-outside-toplevel
  from prefjax.train import builders  # pylint: disable=import-outside-toplevel
  g = config.generate
  out_dir = pathlib.Path(workdir)
  out_dir.mkdir(parents=True, exist_ok=True)
  tokenizer = data_lib.load_tokenizer(data_config_lib.get(config.data, "tokenizer"))
  template = templates_lib.get_template(data_config_lib.get(config.data, "chat_template"))
  prompts = load_prompts(g.get("prompts") or config.data.train, config.data, tokenizer,
                         split=g.get("split") or None, limit=int(g.get("num_prompts") or 0))
  settings = SampleSettings.from_config(config.sample)
  max_prompt = int(config.data.max_prompt_len)
  max_resp = int(config.data.max_response_len)
  stop = stop_tokens(tokenizer)
  policies = parse_policies(g.get("policies"), config.model.get("init"))
  mesh, rules = builders.make_mesh(config)
  kernels = builders.kernels_for_mesh(config, mesh)
  files: dict[str, Any] = {}
  records: dict[str, list[dict[str, Any]]] = {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
    for name, path in policies.items():
      cfg, params = tasks.load_model(path, config.model, task="preference", mesh=mesh,
                                     rules=rules)
      samples = sample_responses(cfg, params, prompts, settings, stop=stop,
                                 pad_id=tokenizer.pad_id, prompt_width=max_prompt,
                                 kernels=kernels)
      records[name] = generation_records(prompts, samples, tokenizer)
      del params
    rm = g.get("reward_model")
    if rm:
      rcfg, rparams = tasks.load_reward_model(rm, config.model, mesh=mesh, rules=rules)
      fn = scoring.reward_score_fn(rcfg, rparams, kernels=kernels)
      ids_of = {p.text: p.ids for p in prompts}
      for name, recs in records.items():
        seqs = [(ids_of[r["prompt"]], response_ids(r["response"], tokenizer, template, max_resp))
                for r in recs]
        scores = score_responses(fn, seqs, batch_pairs=max(1, settings.batch_size // 2),
                                 length=max_prompt + max_resp)
        for r, s in zip(recs, scores):
          r["score"] = float(s)
  for name, recs in records.items():
    files[name] = write_jsonl(out_dir / "generations" / f"{name}.jsonl", recs)
  summary = {name: {"n": len(recs), "mean_length": float(np.mean([r["length"] for r in recs])),
                    "mean_score": (float(np.mean([r["score"] for r in recs])) if rm else None)}
             for name, recs in records.items()}
  if rm:
    files.update(cases.write_generation_report(out_dir, records,
                                               plot=bool(g.get("plot", True))))
  (out_dir / "generate_summary.json").write_text(json.dumps(
      {"policies": policies, "reward_model": rm or None, "summary": summary}, indent=2) + "\n",
      encoding="utf-8")
  logging.info("generate: %s", summary)
  return {"files": files, "summary": summary}
