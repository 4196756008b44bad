"""Evaluation at intervals on `config.data.eval`, plus over-optimisation indicators.

Eval statistics are `(sum, count)` pairs summed over batches on the host, then turned
into `eval/`-prefixed metrics: loss; for reward models accuracy (chosen > rejected),
reward mean and std; for policies implicit-reward accuracy and margins, and (once per
eval) policy–reference KL and top-k entropy / mass of the policy.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prefjax import models
from prefjax import ops
from prefjax.train import tasks as tasks_lib


def summarize(sums: dict[str, tuple[float, float]]) -> dict[str, float]:
  """`{name: (sum, count)}` -> eval metrics with the `eval/` prefix and derived values."""
  out = {}
  for k, (s, n) in sums.items():
    out[k] = float(s) / n if n > 0 else float("nan")
  if "rewards/accuracies" in out:
    out["accuracy"] = out["rewards/accuracies"]
  if "rewards/sq" in out and "rewards/mean" in out:
    var = max(out.pop("rewards/sq") - out["rewards/mean"] ** 2, 0.0)
    out["rewards/std"] = math.sqrt(var)
  out["examples"] = float(sums["loss"][1]) if "loss" in sums else 0.0
  return {f"eval/{k}": v for k, v in out.items()}


def run_eval(eval_fn: Callable, params: Any, ref_params: Any,
             batches: Iterable[dict[str, jax.Array]]) -> dict[str, float]:
  """Sums the jitted `eval_fn` statistics over the global eval batches."""
  totals: dict[str, list[float]] = {}
  for batch in batches:
    stats = jax.device_get(eval_fn(params, ref_params, batch))
    for k, (s, n) in stats.items():
      acc = totals.setdefault(k, [0.0, 0.0])
      acc[0] += float(s)
      acc[1] += float(n)
  return summarize({k: tuple(v) for k, v in totals.items()})


def diagnostics(params: Any, ref_params: Optional[Any], batch: dict[str, jax.Array], *,
                model_cfg: Any, layout: str, k: int = 10, chunk_size: int = 128,
                kernels: Any = None) -> dict:
  """Mean per-response-token policy–reference KL and top-k entropy / mass of the policy."""
  rows, _, _ = tasks_lib.flatten_rows(batch, layout)
  mask = rows["loss_mask"].astype(jnp.float32)
  denom = jnp.maximum(mask.sum(), 1.0)
  h = tasks_lib.forward(model_cfg, params, rows, kernels=kernels)
  w = models.unembedding(model_cfg, params)
  ent, mass = ops.topk_entropy_and_mass(h, w, k=k, chunk_size=chunk_size,
                                        logit_softcap=model_cfg.final_logit_softcap)
  out = {"topk_entropy": (ent * mask).sum() / denom, "topk_mass": (mass * mask).sum() / denom}
  if ref_params is not None:
    hr = tasks_lib.forward(model_cfg, ref_params, rows, kernels=kernels)
    kl = ops.token_kl_from_hidden(h, w, hr, models.unembedding(model_cfg, ref_params),
                                  chunk_size=chunk_size,
                                  logit_softcap=model_cfg.final_logit_softcap)
    out["kl_per_token"] = (kl * mask).sum() / denom
  return out


def jit_diagnostics(model_cfg: Any, layout: str, param_sh: Any, ref_sh: Any, batch_sh: Any,
                    mesh: Mesh, k: int, chunk_size: int, kernels: Any = None,
                    policy_params: Callable | None = None) -> Callable:
  """Jitted `(params, ref_params, batch) -> diagnostics`; `policy_params(ref_params, params)`
  gives the policy's params when `params` are not them (LoRA adapters)."""
  def fn(params, ref_params, batch):
    if policy_params is not None:
      params = policy_params(ref_params, params)
    return diagnostics(params, ref_params, batch, model_cfg=model_cfg, layout=layout, k=k,
                       chunk_size=chunk_size, kernels=kernels)
  return jax.jit(fn, in_shardings=(param_sh, ref_sh, batch_sh),
                 out_shardings=NamedSharding(mesh, P()))


def diag_metrics(values: dict[str, Any]) -> dict[str, float]:
  return {f"eval/diag/{k}": float(np.asarray(v)) for k, v in values.items()}
