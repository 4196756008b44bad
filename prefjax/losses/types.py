"""Input and output pytrees shared by the preference losses, plus input checks.

Every container is a `flax.struct.dataclass`, so it is a pytree: it passes
through `jax.jit`, `jax.grad` and `jax.tree.map`. Optional fields that are
`None` are part of the tree *structure* (static under jit), which lets each
loss check at trace time that the fields it needs are present.

Shape letters: B batch (pairs or examples), L tokens per response.
"""
from typing import Any, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class PairedLogps:
  """Per-sequence log-probs of a batch of (chosen, rejected) pairs.

  All log-probs are SUMMED over the response tokens (prompt and padding
  excluded); lengths are the number of response tokens.

  Attributes:
    chosen: [B] policy log π_θ(y_w | x).
    rejected: [B] policy log π_θ(y_l | x).
    ref_chosen: [B] reference log π_ref(y_w | x), or None.
    ref_rejected: [B] reference log π_ref(y_l | x), or None.
    chosen_lengths: [B] |y_w| in tokens, or None.
    rejected_lengths: [B] |y_l| in tokens, or None.
  """
  chosen: Array
  rejected: Array
  ref_chosen: Optional[Array] = None
  ref_rejected: Optional[Array] = None
  chosen_lengths: Optional[Array] = None
  rejected_lengths: Optional[Array] = None


@flax.struct.dataclass
class LossOutput:
  """What every paired loss returns.

  Attributes:
    loss: [B] per-example loss; reduce it yourself (usually the mean).
    chosen_rewards: [B] implicit reward of the chosen response, as the method
      defines it (already under `stop_gradient`).
    rejected_rewards: [B] implicit reward of the rejected response.
    aux: dict of extra [B] or scalar terms (e.g. `nll`, `log_odds`), for logging.
  """
  loss: Array
  chosen_rewards: Array
  rejected_rewards: Array
  aux: dict = flax.struct.field(default_factory=dict)


@flax.struct.dataclass
class TokenLogps:
  """Per-token log-probs of a batch of pairs, for token-level losses.

  Attributes:
    chosen: [B, L] policy per-token log-probs of the chosen response.
    rejected: [B, L] policy per-token log-probs of the rejected response.
    ref_chosen: [B, L] reference per-token log-probs, or None.
    ref_rejected: [B, L] reference per-token log-probs, or None.
    chosen_mask: [B, L] 1 on response tokens, 0 on prompt/padding.
    rejected_mask: [B, L] same for the rejected response.
    chosen_kl: [B, L] per-token KL(π_ref(·|x, y_<t) || π_θ(·|x, y_<t)) along the
      chosen response (TDPO's sequential KL terms), or None.
    rejected_kl: [B, L] same along the rejected response, or None.
  """
  chosen: Array
  rejected: Array
  ref_chosen: Optional[Array] = None
  ref_rejected: Optional[Array] = None
  chosen_mask: Optional[Array] = None
  rejected_mask: Optional[Array] = None
  chosen_kl: Optional[Array] = None
  rejected_kl: Optional[Array] = None


@flax.struct.dataclass
class UnpairedLogps:
  """Per-sequence log-probs of unpaired (binary-feedback) examples (KTO, BCO).

  Attributes:
    logps: [B] summed policy log-probs of each completion.
    ref_logps: [B] summed reference log-probs of each completion.
    label: [B] bool/0-1; True = desirable, False = undesirable.
    kl_logps: [B'] policy log-probs of mismatched (prompt, completion) pairs,
      used by KTO to estimate the reference point z0, or None.
    kl_ref_logps: [B'] reference log-probs of the same mismatched pairs, or None.
  """
  logps: Array
  ref_logps: Array
  label: Array
  kl_logps: Optional[Array] = None
  kl_ref_logps: Optional[Array] = None


@flax.struct.dataclass
class UnpairedLossOutput:
  """What the unpaired losses return.

  Attributes:
    loss: [B] per-example loss (mean it yourself).
    rewards: [B] implicit reward β·(log π_θ − log π_ref) of each completion.
    aux: dict of extra terms, e.g. `kl` (KTO's z0) or `delta` (BCO's δ).
  """
  loss: Array
  rewards: Array
  aux: dict = flax.struct.field(default_factory=dict)


def to_f32(tree: Any) -> Any:
  """Casts every array leaf to float32 (inputs may be bf16; math is f32)."""
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def is_concrete(x: Any) -> bool:
  """False for a value traced by jit/grad: hyperparameters may be traced
  (e.g. a β schedule), so value checks and Python branches on them are
  only done when they are concrete."""
  return not isinstance(x, jax.core.Tracer)


def require(obj: Any, fields: Sequence[str], loss_name: str) -> None:
  """Raises ValueError naming `loss_name` and the missing (None) fields."""
  missing = [f for f in fields if getattr(obj, f) is None]
  if missing:
    raise ValueError(
        f"loss {loss_name!r} needs {type(obj).__name__} fields {missing}, "
        "which are None. Pass them (e.g. reference log-probs from the "
        "reference model, or response token counts for length-normalised losses)."
    )
