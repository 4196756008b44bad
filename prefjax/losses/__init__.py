"""prefjax.losses: pure, jit-able preference and reward losses.

Paired losses take a `PairedLogps` of SUMMED response log-probs [B] and return
a `LossOutput` (loss [B], chosen_rewards [B], rejected_rewards [B]):

  out = prefjax.losses.get("dpo")(logps, beta=0.1)
  loss = out.loss.mean()

Registries are literal dicts: `LOSSES` (paired, `names()` / `get(name)`),
`TOKEN_LEVEL_LOSSES` (`TokenLogps`; `token_level_names()` /
`get_token_level(name)`) and `UNPAIRED_LOSSES` (`UnpairedLogps`;
`unpaired_names()` / `get_unpaired(name)`). `bco` is unpaired but stateful
(explicit `BCOState`) and so has its own entry point.

Hyperparameters are keyword-only and use TRL's names and defaults.
Batch-level losses (whose loss[i] is not a function of pair i alone): `aot`,
`aot_unpaired` (sort over the batch), `sft`, and `cpo`/`orpo`/`rrhf`/`slic` with
nll_normalization="batch". Under data parallelism they need the whole batch
(jit over a sharded global array does that).
"""
import inspect
import math
from typing import Callable, Sequence

from prefjax.losses.metrics import paired_metrics, unpaired_metrics
from prefjax.losses.paired import (
    F_DIVERGENCES, aot, aot_unpaired, apo_down, apo_zero, bco_pair, discopop, dpop,
    exo_pair, f_divergence_scores, hinge, ipo, nca_pair, rdpo, robust, sft, sigmoid,
    sigmoid_norm, sppo_hard)
from prefjax.losses.reference_free import cpo, orpo, rrhf, simpo, slic
from prefjax.losses.reward import (
    bradley_terry, combine_heads, combine_transformed_rewards, kwise_ranking,
    log_sigmoid_transform, multi_head_bradley_terry, reward_centering, reward_model_loss)
from prefjax.losses.token_level import ld_dpo, ld_paired, tdpo1, tdpo2, to_paired, wpo_weights
from prefjax.losses.types import (
    LossOutput, PairedLogps, TokenLogps, UnpairedLogps, UnpairedLossOutput)
from prefjax.losses.unpaired import BCOState, apo_zero_unpaired, bco, kto, kto_reference_point

dpo = sigmoid  # DPO (Rafailov et al. 2023) is TRL's loss_type "sigmoid".

# Paired losses over `PairedLogps`. Keys of the DPO family are TRL's `loss_type`s.
LOSSES: dict[str, Callable[..., LossOutput]] = {
    "sigmoid": sigmoid,
    "dpo": sigmoid,
    "hinge": hinge,
    "ipo": ipo,
    "exo_pair": exo_pair,
    "nca_pair": nca_pair,
    "robust": robust,
    "bco_pair": bco_pair,
    "sppo_hard": sppo_hard,
    "aot": aot,
    "aot_unpaired": aot_unpaired,
    "apo_zero": apo_zero,
    "apo_down": apo_down,
    "discopop": discopop,
    "sigmoid_norm": sigmoid_norm,
    "sft": sft,
    "rdpo": rdpo,
    "dpop": dpop,
    "simpo": simpo,
    "cpo": cpo,
    "orpo": orpo,
    "rrhf": rrhf,
    "slic": slic,
}

# Token-level losses over `TokenLogps` [B, L].
TOKEN_LEVEL_LOSSES: dict[str, Callable[..., LossOutput]] = {
    "tdpo": tdpo2,
    "tdpo1": tdpo1,
    "tdpo2": tdpo2,
    "ld_dpo": ld_dpo,
}

# Unpaired, stateless losses over `UnpairedLogps`.
UNPAIRED_LOSSES: dict[str, Callable[..., UnpairedLossOutput]] = {
    "kto": kto,
    "apo_zero_unpaired": apo_zero_unpaired,
}


def _lookup(table: dict, name: str, kind: str) -> Callable:
  try:
    return table[name]
  except KeyError:
    raise ValueError(f"Unknown {kind} loss {name!r}; registered: {sorted(table)}") from None


_POSITIVE, _NON_NEGATIVE = (0.0, math.inf, True), (0.0, math.inf, False)
# Allowed values of the numeric hyperparameters, by name, for every loss that takes one:
# (low, high, low excluded). beta is a temperature (or ORPO / CPO's weight): at 0 DPO's
# loss is log 2 with zero gradient, below 0 it trains the inverted preference. Label
# smoothing is the assumed label-flip rate of conservative DPO (Mitchell 2023): [0, 0.5].
HYPERPARAMETER_RANGES: dict[str, tuple[float, float, bool]] = {
    "beta": _POSITIVE,
    "label_smoothing": (0.0, 0.5, False),
    "simpo_gamma": _NON_NEGATIVE,
    "gamma": _NON_NEGATIVE,
    "desirable_weight": _POSITIVE,
    "undesirable_weight": _POSITIVE,
    "cpo_alpha": _NON_NEGATIVE,
    "alpha": _NON_NEGATIVE,
    "delta": _NON_NEGATIVE,
    "dpop_lambda": _NON_NEGATIVE,
    "slic_lambda": _NON_NEGATIVE,
    "nll_weight": _NON_NEGATIVE,
    "discopop_tau": _POSITIVE,
    "lam": _NON_NEGATIVE,
}


def hyperparameter_errors(hyperparams: dict) -> list[str]:
  """One message per numeric hyperparameter that is not finite or outside
  `HYPERPARAMETER_RANGES` (e.g. "beta=0.0 must be > 0"); [] when all are fine."""
  errors = []
  for name, value in hyperparams.items():
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      continue
    if not math.isfinite(value):
      errors.append(f"{name}={value} must be a finite number")
      continue
    if name not in HYPERPARAMETER_RANGES:
      continue
    low, high, low_excluded = HYPERPARAMETER_RANGES[name]
    if value < low or (low_excluded and value == low) or value > high:
      bound = f"> {low:g}" if low_excluded else f">= {low:g}"
      bound += f" and <= {high:g}" if math.isfinite(high) else ""
      errors.append(f"{name}={value} must be {bound}")
  return errors


def names() -> list[str]:
  """Sorted names of every registered paired loss (aliases included)."""
  return sorted(LOSSES)


def get(name: str) -> Callable[..., LossOutput]:
  """The paired loss registered as `name`; ValueError listing the names if unknown."""
  return _lookup(LOSSES, name, "paired")


def combine(logps: PairedLogps, loss_types: Sequence[str],
            loss_weights: Sequence[float] | None = None, **hyperparams) -> LossOutput:
  """Weighted sum of paired losses: TRL's `loss_type=[...]` with `loss_weights`.

  E.g. MPO (Wang et al. 2024, "Mixed Preference Optimization"):
  `combine(logps, ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], beta=0.1)`.
  Each loss gets the hyperparameters its signature accepts (as TRL shares one
  config across loss types). loss = Σ_k w_k·loss_k [B]; rewards are the first
  loss's; aux holds each term under its name.
  """
  weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
  if len(weights) != len(loss_types) or not loss_types:
    raise ValueError(f"need one weight per loss type, got {loss_types} and {weights}")
  outs = []
  for name in loss_types:
    fn = get(name)
    accepted = inspect.signature(fn).parameters
    outs.append(fn(logps, **{k: v for k, v in hyperparams.items() if k in accepted}))
  loss = sum(w * o.loss for w, o in zip(weights, outs))
  aux = {name: o.loss for name, o in zip(loss_types, outs)}
  return LossOutput(loss, outs[0].chosen_rewards, outs[0].rejected_rewards, aux=aux)


def token_level_names() -> list[str]:
  """Sorted names of the token-level losses (inputs: `TokenLogps`)."""
  return sorted(TOKEN_LEVEL_LOSSES)


def get_token_level(name: str) -> Callable[..., LossOutput]:
  """The token-level loss registered as `name`; ValueError if unknown."""
  return _lookup(TOKEN_LEVEL_LOSSES, name, "token-level")


def unpaired_names() -> list[str]:
  """Sorted names of the stateless unpaired losses (inputs: `UnpairedLogps`)."""
  return sorted(UNPAIRED_LOSSES)


def get_unpaired(name: str) -> Callable[..., UnpairedLossOutput]:
  """The unpaired loss registered as `name`; ValueError if unknown."""
  return _lookup(UNPAIRED_LOSSES, name, "unpaired")


__all__ = [
    "HYPERPARAMETER_RANGES", "hyperparameter_errors",
    "dpo", "combine", "LOSSES", "TOKEN_LEVEL_LOSSES", "UNPAIRED_LOSSES", "names", "get",
    "token_level_names", "get_token_level", "unpaired_names", "get_unpaired",
    "PairedLogps", "LossOutput", "TokenLogps", "UnpairedLogps", "UnpairedLossOutput",
    "BCOState", "F_DIVERGENCES", "f_divergence_scores", "paired_metrics", "unpaired_metrics",
    "to_paired", "ld_paired", "wpo_weights", "kto_reference_point",
    "bradley_terry", "reward_centering", "reward_model_loss", "kwise_ranking",
    "log_sigmoid_transform", "combine_transformed_rewards", "combine_heads",
    "multi_head_bradley_terry",
] + sorted(set(f.__name__ for f in LOSSES.values()) | {"tdpo1", "tdpo2", "ld_dpo", "kto",
                                                      "apo_zero_unpaired", "bco"})
