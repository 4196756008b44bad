r"""Train-step benchmark: steady-state step time, real tokens/s, MFU, peak RSS, compile time.

For a model preset and a set of task variants (dpo with a live reference model, dpo with
precomputed reference log-probs, simpo, reward) and layouts (padded, packed, prompt_shared),
builds the same jitted step the trainer uses (`prefjax.train.step.jit_train_step`) on synthetic
batches shaped like real preference data (prompt P tokens, responses of random length in
[Rmin, Rmax]) or, with `--data hh`, on the shipped HH-RLHF pairs (tokenised as compare_trl.py
does), and prints one JSON object per configuration. The `prompt_shared` layout and `--data hh`
build their pairs with compare_trl.py's `make_examples` and pack them into the row length
`auto_row_len` picks (the fewest token slots, multiples of the causal block). Times are medians of `--steps` timed steps
after `--warmup` steps. MFU = model FLOPs / step time / float32 peak, the peak measured by
benchmarks/peak.py in this process before the model is built unless `--peak-flops` is given;
with `--peak-between-steps`, `mfu_adjacent` is each step's MFU against the mean of the peaks
measured right before and after it (median over steps), the steadier figure on a shared VM.
Model FLOPs count the matmuls of a causal decoder (PaLM's MFU, Chowdhery et al. 2022, App. B,
with the causal half of the attention): 6·N per token for a trained forward+backward (N =
non-embedding parameters plus the tied LM head, the head counted only at the positions whose
log-prob the loss needs, never for a reward model) and 3 · 2·L·(N_heads·head_dim)·Σ len² for
the attention scores and values of every sequence of `len` tokens; a live reference forward
adds a third of each. `mfu_dense` is the older 6·N·T over every token, attention left out.
(compare_trl.py counts the head at every real token, as TRL computes it there.)

  python benchmarks/train_step.py --preset bench_46m --tasks dpo,dpo_precomputed,simpo,reward \
      --layouts padded,packed --batch 8 --prompt-len 64 --min-response 64 --max-response 192
  python benchmarks/train_step.py --tasks reward,dpo_precomputed --layouts prompt_shared --data hh
  python benchmarks/train_step.py --tiny        # seconds: tiny model, for smoke tests
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))

TASKS = {  # name -> (task, loss, reference mode)
    "dpo": ("preference", "dpo", "model"),
    "dpo_precomputed": ("preference", "dpo", "precomputed"),
    "simpo": ("preference", "simpo", "none"),
    "reward": ("reward", "bradley_terry", "none"),
}


def _seq(rng, prompt_len, lo, hi, vocab):
  n = prompt_len + int(rng.integers(lo, hi + 1))
  toks = rng.integers(3, vocab, n).astype(np.int32)
  mask = np.zeros(n, np.float32)
  mask[prompt_len - 1:n - 1] = 1.0
  return toks, mask


def padded_batch(args, vocab, seed=0) -> dict[str, np.ndarray]:
  """[B, 2, L] pairs, L = prompt + max response."""
  rng = np.random.default_rng(seed)
  b, length = args.batch, args.prompt_len + args.max_response
  out = {k: np.zeros((b, 2, length), np.float32 if k == "loss_mask" else np.int32)
         for k in ("tokens", "targets", "loss_mask", "positions", "segment_ids")}
  for i in range(b):
    for j in range(2):
      t, m = _seq(rng, args.prompt_len, args.min_response, args.max_response, vocab)
      n = len(t)
      out["tokens"][i, j, :n] = t
      out["targets"][i, j, :n - 1] = t[1:]
      out["loss_mask"][i, j, :n] = m
      out["positions"][i, j, :n] = np.arange(n)
      out["segment_ids"][i, j, :n] = 1
  return out


def packed_batch(args, vocab, seed=0) -> dict[str, np.ndarray]:
  """The same pairs packed first-fit into rows of L = 2 (prompt + max response) tokens."""
  rng = np.random.default_rng(seed)
  length, s_max = 2 * (args.prompt_len + args.max_response), 4
  rows: list[list] = []
  for _ in range(args.batch):
    pair = [_seq(rng, args.prompt_len, args.min_response, args.max_response, vocab)
            for _ in range(2)]
    size = sum(len(t) for t, _ in pair)
    for r in rows:
      if r[0] + size <= length and len(r[1]) < s_max:
        r[0] += size
        r[1].append(pair)
        break
    else:
      rows.append([size, [pair]])
  n_rows = len(rows)
  out = {k: np.zeros((n_rows, length), np.float32 if k == "loss_mask" else np.int32)
         for k in ("tokens", "targets", "loss_mask", "positions", "segment_ids")}
  out["pair_mask"] = np.zeros((n_rows, s_max), np.float32)
  for r, (_, pairs) in enumerate(rows):
    at = 0
    for p, pair in enumerate(pairs):
      out["pair_mask"][r, p] = 1
      for k, (t, m) in enumerate(pair):
        n = len(t)
        out["tokens"][r, at:at + n] = t
        out["targets"][r, at:at + n - 1] = t[1:]
        out["loss_mask"][r, at:at + n] = m
        out["positions"][r, at:at + n] = np.arange(n)
        out["segment_ids"][r, at:at + n] = 2 * p + k + 1
        at += n
  return out


LAYOUTS = ("padded", "packed", "prompt_shared")


def example_batch(args, vocab: int, layout: str, causal_block: int) -> dict[str, np.ndarray]:
  """One step's batch from compare_trl.py's pairs (`--data synthetic|hh`, `args.batch` pairs):
  padded [B, 2, L] (L = prompt + max response), or packed / prompt-shared rows [R, L'] with
  L' from `auto_row_len` (the fewest slots for this batch, a multiple of `causal_block`)."""
  import compare_trl as ct  # pylint: disable=g-import-not-at-top  (benchmarks/compare_trl.py)
  spec = ct.Spec(vocab_size=vocab, batch_pairs=args.batch, prompt_len=args.prompt_len,
                 min_response=args.min_response, max_response=args.max_response,
                 data=args.data, seed=0, steps=1, warmup=0)
  if args.data == "hh":
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    need = spm.SentencePieceProcessor(model_file=ct._TOKENIZER).get_piece_size()  # pylint: disable=protected-access
    if vocab < need:
      raise SystemExit(f"--data hh: the model's vocabulary ({vocab}) is smaller than the "
                       f"shipped tokenizer's ({need}); use a preset such as bench_46m")
  pairs = ct.make_examples(spec)[:args.batch]
  if layout == "padded":
    return ct._pad_pairs(spec, pairs, args.prompt_len + args.max_response)  # pylint: disable=protected-access
  feats = ct._pair_features(pairs, layout == "prompt_shared")  # pylint: disable=protected-access
  lengths = [len(f["tokens"]) for f in feats]
  row_len = ct.auto_row_len([lengths], block=causal_block or 256,
                            max_len=4 * (args.prompt_len + args.max_response))
  rows = [[feats[i] for i in row] for row in ct._first_fit(lengths, row_len)]  # pylint: disable=protected-access
  return ct._collate_packed(rows, row_len, len(rows), max(len(r) for r in rows),  # pylint: disable=protected-access
                            layout == "prompt_shared")


def sum_sq_segment_lengths(segment_ids: np.ndarray) -> int:
  """Σ len² over the sequences of a batch: segment_ids [..., T] (0 = padding; a packed row
  holds several segments)."""
  rows = segment_ids.reshape(-1, segment_ids.shape[-1])
  total = 0
  for row in rows:
    _, counts = np.unique(row[row > 0], return_counts=True)
    total += int((counts.astype(np.int64) ** 2).sum())
  return total


def attention_flops(cfg: Any, sum_sq_len: int) -> float:
  """Forward FLOPs of causal attention (scores and values): 2 matmuls × 2·len²/2 per head dim."""
  return 2.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * sum_sq_len


def model_flops(n_params: int, tokens: int, task_ref: str, attn_fwd: float = 0.0,
                head_params: int = 0, head_tokens: int | None = None) -> float:
  """Forward+backward (3×) of the policy plus a live reference forward (1×) of 2·N·T + the
  causal attention's forward FLOPs `attn_fwd`; N = non-embedding parameters plus the tied LM
  head (the embedding lookup is free, the LM head a [D, V] matmul per token). With
  `head_params` (V·D) and `head_tokens`, the LM head is counted only at `head_tokens`
  positions (those whose log-prob the loss needs) instead of at every token."""
  head_tokens = tokens if head_tokens is None else head_tokens
  fwd = 2.0 * (n_params - head_params) * tokens + 2.0 * head_params * head_tokens + attn_fwd
  return (4.0 if task_ref == "model" else 3.0) * fwd


def _sig(x: float, digits: int = 6) -> float:
  """x to `digits` significant digits (a fixed number of decimals would erase the small
  step times and MFUs of --tiny runs)."""
  return float(f"{x:.{digits}g}")


def bench_one(args, name: str, layout: str) -> dict[str, Any]:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from prefjax import models, sharding  # pylint: disable=g-import-not-at-top
  from prefjax.train import optimizer, state as state_lib, step as step_lib, tasks  # pylint: disable=g-import-not-at-top
  task, loss, ref_mode = TASKS[name]
  extra = {"num_layers": args.layers} if args.layers else {}
  if args.scan_layers:
    extra["scan_layers"] = True
  cfg = models.get_config(args.preset, dtype=args.dtype, remat=args.remat,
                          num_reward_heads=1 if task == "reward" else 0, **extra)
  mesh = sharding.make_mesh({"fsdp": -1})
  # The mesh platform's kernels with the flags set (`--config.kernels.*` of prefjax.main).
  kernel_flags = {"cpu_scheduler": args.cpu_scheduler,
                  "attention_causal_block": args.attention_causal_block,
                  "attention_query_block": args.attention_query_block,
                  "attention_key_tile": args.attention_key_tile,
                  "logps_implementation": args.logps_implementation}
  kernels = models.Kernels.for_platform(step_lib.mesh_platform(mesh), **{
      k: v for k, v in kernel_flags.items() if v is not None})
  rules = sharding.LOGICAL_AXIS_RULES
  loss_cfg = ml_collections.ConfigDict({"name": loss, "beta": 0.1} if task != "reward"
                                       else {"name": loss})
  optim = ml_collections.ConfigDict(dict(learning_rate=1e-5, schedule="constant",
                                         warmup_steps=0, weight_decay=0.0, grad_clip=1.0))
  if layout == "prompt_shared" or args.data != "synthetic":
    batch = example_batch(args, cfg.vocab_size, layout, kernels.attention_causal_block)
  else:  # the synthetic pairs of the earlier rounds' figures
    batch = (packed_batch if layout == "packed" else padded_batch)(args, cfg.vocab_size)
  if ref_mode == "precomputed":
    lead = batch["tokens"].shape[0]
    shape = (lead, 2) if layout == "padded" else batch["pair_mask"].shape + (2,)
    batch["ref_logps"] = np.full(shape, -50.0, np.float32)
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
    head = tasks.HeadOptions(args.chunk, kernels.logps_implementation)
    t_obj = tasks.make_task(task, model_cfg=cfg, layout=layout, loss_config=loss_cfg,
                            ref_mode=ref_mode, chunk_size=head, kernels=kernels)
    tx, sched = optimizer.make_optimizer(optim, 1000)
    psh = models.param_shardings(cfg, mesh, rules)
    params = models.init_params(cfg, jax.random.PRNGKey(0), mesh=mesh, rules=rules)
    ref = params if ref_mode == "model" else None
    ssh = state_lib.state_shardings(tx, models.abstract_params(cfg), psh, mesh, ref is not None)
    st = state_lib.create_state(params, tx, ssh, ref, 0)
    gb = sharding.make_global_batch(batch, mesh)
    fn = step_lib.jit_train_step(t_obj, tx, sched, ssh, step_lib.batch_shardings(gb, mesh),
                                 mesh, kernels=kernels)
    t0 = time.perf_counter()
    compiled = fn.lower(st, gb).compile()
    compile_s = time.perf_counter() - t0
    times, peaks = [], []
    for i in range(0 if args.compile_only else args.warmup + args.steps):
      if args.peak_between_steps and i == args.warmup:
        peaks.append(_quick_peak())
      t0 = time.perf_counter()
      st, m = compiled(st, gb)
      jax.block_until_ready(m["loss"])
      if i >= args.warmup:
        times.append(time.perf_counter() - t0)
        if args.peak_between_steps:
          peaks.append(_quick_peak())
    if args.profile_dir and not args.compile_only:
      # One more step, traced (jax.profiler, Perfetto JSON) and not among the timed ones.
      jax.profiler.start_trace(args.profile_dir, create_perfetto_trace=True)
      st, m = compiled(st, gb)
      jax.block_until_ready(m["loss"])
      jax.profiler.stop_trace()
  if args.compile_only:
    return {"preset": args.preset, "task": name, "layout": layout, "layers": cfg.num_layers,
            "scan_layers": cfg.scan_layers, "cpu_scheduler": kernels.cpu_scheduler,
            "kernels": kernels.to_dict(), "compile_s": round(compile_s, 3),
            "devices": jax.device_count()}
  step_s = statistics.median(times)
  real = int((batch["segment_ids"] > 0).sum())
  # Tokens of the pairs as padded rows hold them (both sequences in full, TRL's count): a
  # prompt-shared row holds each prompt but its last token once.
  pair_tokens = real + (int(((batch["segment_ids"] > 0) & (batch["branch_ids"] == 0)).sum())
                        if "branch_ids" in batch else 0)
  n_params = models.count_params(params)
  attn_fwd = attention_flops(cfg, sum_sq_segment_lengths(batch["segment_ids"]))
  # The vocabulary head counts only where a log-prob is needed (no LM head for a reward model).
  head_tokens = 0 if task == "reward" else int((batch["loss_mask"] > 0).sum())
  head = dict(head_params=cfg.vocab_size * cfg.embed_dim, head_tokens=head_tokens)
  flops = model_flops(n_params, real, ref_mode, attn_fwd, **head)
  dense = model_flops(n_params, real, ref_mode)
  adjacent = {}
  if peaks:  # each step against the mean of the peaks measured just before and after it
    per_step = [flops / t / ((peaks[j] + peaks[j + 1]) / 2) for j, t in enumerate(times)]
    adjacent = {"mfu_adjacent": _sig(statistics.median(per_step)),
                "mfu_adjacent_range": [_sig(min(per_step)), _sig(max(per_step))],
                "peak_flops_adjacent": [round(x) for x in peaks]}
  return {"preset": args.preset, "task": name, "layout": layout, "dtype": args.dtype,
          "data": args.data, "batch_shape": list(batch["tokens"].shape),
          "batch_pairs": args.batch, "rows": int(batch["tokens"].shape[0]),
          "padded_tokens": int(batch["tokens"].size), "real_tokens": real,
          "params": n_params, "compile_s": round(compile_s, 3), "step_s": round(step_s, 4),
          "step_s_min": round(min(times), 4), "step_times_s": [_sig(t) for t in times],
          "real_tokens_per_s": round(real / step_s, 1), "pair_tokens": pair_tokens,
          "pair_tokens_per_s": round(pair_tokens / step_s, 1),
          "model_tflops_per_step": round(flops / 1e12, 4), "model_flops_per_step": flops,
          "mfu": _sig(flops / step_s / args.peak_flops),
          "mfu_dense": round(dense / step_s / args.peak_flops, 4),
          "head_tokens": head_tokens,
          "peak_flops": args.peak_flops, "peak_measured_here": args.peak_measured_here,
          "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
          "devices": jax.device_count(), "loss": float(m["loss"]),
          "scan_layers": cfg.scan_layers, "remat": cfg.remat,
          "cpu_scheduler": kernels.cpu_scheduler,
          "logps_implementation": kernels.logps_implementation or "custom_vjp",
          "attention_causal_block": kernels.attention_causal_block,
          "attention_query_block": kernels.attention_query_block,
          "attention_key_tile": kernels.attention_key_tile, "kernels": kernels.to_dict(),
          "xla_temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), **adjacent}


def _quick_peak() -> float:
  """float32 peak FLOP/s right now (best of 5 [2048, 2048] matmuls, under a second)."""
  import peak  # pylint: disable=g-import-not-at-top  (benchmarks/peak.py)
  return peak.measure_matmul(2048, "float32", repeats=5)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description="prefjax train-step benchmark (JSON lines)")
  p.add_argument("--preset", default="bench_46m")
  p.add_argument("--tasks", default="dpo,dpo_precomputed,simpo,reward")
  p.add_argument("--layouts", default="padded,packed",
                 help="comma-separated, of " + ", ".join(LAYOUTS))
  p.add_argument("--data", default="synthetic", choices=["synthetic", "hh"],
                 help="synthetic pairs, or the shipped HH-RLHF pairs (helpful-base test split)")
  p.add_argument("--batch", type=int, default=8, help="pairs per step")
  p.add_argument("--prompt-len", type=int, default=64)
  p.add_argument("--min-response", type=int, default=64)
  p.add_argument("--max-response", type=int, default=192)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--remat", default="none")
  p.add_argument("--chunk", type=int, default=128, help="log-prob chunk size")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--peak-flops", type=float, default=None,
                 help="float32 peak FLOP/s for MFU (default: measured by peak.py here first)")
  p.add_argument("--tiny", action="store_true", help="tiny_gemma, short sequences")
  p.add_argument("--layers", type=int, default=None, help="override the preset's num_layers")
  p.add_argument("--scan-layers", action="store_true", help="nn.scan over the layers")
  p.add_argument("--compile-only", action="store_true", help="only lower + compile the step")
  p.add_argument("--cpu-scheduler", default="memory_optimized",
                 choices=["memory_optimized", "concurrency_optimized", "xla_default"],
                 help="kernels.cpu_scheduler (XLA:CPU instruction scheduler)")
  p.add_argument("--attention-causal-block", type=int, default=None,
                 help="kernels.attention_causal_block (0: every query sees all keys; default: "
                      "the platform's, 256 on CPU)")
  p.add_argument("--attention-query-block", type=int, default=None,
                 help="kernels.attention_query_block (rematerialised query groups; 0: none; "
                      "default: the platform's, 256 on CPU)")
  p.add_argument("--attention-key-tile", type=int, default=None,
                 help="kernels.attention_key_tile (per-row key windows of packed rows; 0: "
                      "off, the default)")
  p.add_argument("--logps-implementation", default=None,
                 choices=["custom_vjp", "saved_logits", "checkpoint"],
                 help="kernels.logps_implementation (default: the ops default, custom_vjp)")
  p.add_argument("--peak-between-steps", action="store_true",
                 help="also measure the matmul peak before and after every timed step and "
                      "report `mfu_adjacent`, each step against the peaks around it (for a "
                      "shared machine whose peak drifts within minutes)")
  p.add_argument("--profile-dir", default=None,
                 help="trace the last timed step with jax.profiler into this directory "
                      "(summarise with benchmarks/profile_summary.py)")
  args = p.parse_args(argv)
  bad = [x for x in args.layouts.split(",") if x not in LAYOUTS]
  if bad:
    p.error(f"--layouts: {', '.join(bad)} not among {', '.join(LAYOUTS)}")
  bad = [x for x in args.tasks.split(",") if x not in TASKS]
  if bad:
    p.error(f"--tasks: {', '.join(bad)} not among {', '.join(TASKS)}")
  if args.profile_dir:  # the optimised HLO beside the trace, for benchmarks/profile_summary.py
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_dump_to="
                                        + os.path.join(args.profile_dir, "hlo"),
                                        "--xla_dump_hlo_as_text"]).strip()
  if args.tiny:
    args.preset, args.prompt_len, args.min_response, args.max_response = "tiny_gemma", 8, 4, 8
    args.steps, args.batch = 2, 4
  args.peak_measured_here = args.peak_flops is None and not args.compile_only
  if args.peak_measured_here:
    import peak  # pylint: disable=g-import-not-at-top  (benchmarks/peak.py)
    sizes, repeats = ([128, 256], 2) if args.tiny else ([1024, 2048], 5)
    args.peak_flops = peak.measure(sizes, ["float32"], repeats)["peak_flops_float32"]
  for name in args.tasks.split(","):
    for layout in args.layouts.split(","):
      # A fresh process per config would isolate peak RSS; here it is cumulative (max so far).
      print(json.dumps(bench_one(args, name, layout)), flush=True)
  return 0


if __name__ == "__main__":
  from prefjax import host_env  # same process settings as the prefjax command line
  host_env.reexec_with_tuned_malloc()
  sys.exit(main())
