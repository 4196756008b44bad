"""prefjax.eval.scoring on a tiny Gemma: layouts agree with per-sequence references."""
import numpy as np
import pytest

models = pytest.importorskip("prefjax.models")
pytest.importorskip("prefjax.ops")
import jax  # noqa: E402

from prefjax.eval import runner, scoring  # noqa: E402

# Three pairs: (prompt, chosen response, rejected response) token ids.
RNG = np.random.default_rng(0)
PAIRS = [(RNG.integers(3, 250, p), RNG.integers(3, 250, c), RNG.integers(3, 250, r))
         for p, c, r in ((3, 4, 2), (2, 1, 5), (4, 3, 3))]
L = 12


def _seq(prompt, resp):
  """tokens, targets, loss_mask of one unpadded sequence (targets = next token)."""
  toks = np.concatenate([prompt, resp])
  tgts = np.concatenate([toks[1:], [0]])
  mask = np.zeros(len(toks), np.float32)
  mask[len(prompt) - 1:len(toks) - 1] = 1  # positions whose target is a response token
  return toks, tgts, mask


def _padded_batch():
  b = {k: np.zeros((3, 2, L), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
  b["loss_mask"] = np.zeros((3, 2, L), np.float32)
  for i, (p, c, r) in enumerate(PAIRS):
    for j, resp in enumerate((c, r)):
      t, g, m = _seq(p, resp)
      n = len(t)
      b["tokens"][i, j, :n], b["targets"][i, j, :n], b["loss_mask"][i, j, :n] = t, g, m
      b["positions"][i, j, :n], b["segment_ids"][i, j, :n] = np.arange(n), 1
  b["example_mask"] = np.ones(3, np.float32)
  return b


def _packed_batch():
  rows = [[0, 1], [2]]  # pairs per row
  b = {k: np.zeros((2, 2 * L), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
  b["loss_mask"] = np.zeros((2, 2 * L), np.float32)
  b["pair_mask"] = np.array([[1, 1], [1, 0]], np.float32)
  for row, pairs in enumerate(rows):
    at = 0
    for slot, i in enumerate(pairs):
      p, c, r = PAIRS[i]
      for j, resp in enumerate((c, r)):
        t, g, m = _seq(p, resp)
        n = len(t)
        sl = slice(at, at + n)
        b["tokens"][row, sl], b["targets"][row, sl], b["loss_mask"][row, sl] = t, g, m
        b["positions"][row, sl], b["segment_ids"][row, sl] = np.arange(n), 2 * slot + 1 + j
        at += n
  return b


def _prompt_shared_batch():
  """Rows [[pair 0, pair 1], [pair 2]]: shared prompt[:-1] (branch 0), then
  [prompt[-1]] + response per branch (1 chosen, 2 rejected), branches from position |p|-1."""
  rows = [[0, 1], [2]]
  keys = ("tokens", "targets", "positions", "segment_ids", "branch_ids")
  b = {k: np.zeros((2, 2 * L), np.int32) for k in keys}
  b["loss_mask"] = np.zeros((2, 2 * L), np.float32)
  b["pair_mask"] = np.array([[1, 1], [1, 0]], np.float32)
  for row, pairs in enumerate(rows):
    at = 0
    for slot, i in enumerate(pairs):
      p, c, r = PAIRS[i]
      n = len(p) - 1
      parts = [(0, p[:-1], np.append(p[1:], 0)[:n], np.zeros(n), np.arange(n))]
      for br, resp in ((1, c), (2, r)):
        t, g, m = _seq(p[-1:], resp)
        parts.append((br, t, g, m, n + np.arange(len(t))))
      for br, t, g, m, pos in parts:
        sl = slice(at, at + len(t))
        b["tokens"][row, sl], b["targets"][row, sl], b["loss_mask"][row, sl] = t, g, m
        b["positions"][row, sl], b["branch_ids"][row, sl] = pos, br
        b["segment_ids"][row, sl] = slot + 1
        at += len(t)
  return b


def _first3(c, r):
  return np.stack([np.asarray(c).reshape(-1)[:3], np.asarray(r).reshape(-1)[:3]], -1)


def _random_params(cfg, seed):
  """Random params of cfg's shapes, built on the host (no init compile: keeps the test fast)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (0.3 * rng.normal(size=a.shape)).astype(a.dtype),
                      models.abstract_params(cfg))


@pytest.fixture(scope="module")
def model():
  """(reward-model cfg, params + reward head, reference params + reward head)."""
  cfg = models.get_config("tiny_gemma", num_layers=1)
  out = [cfg.replace(num_reward_heads=1)]
  for seed in (0, 1):
    params = dict(_random_params(cfg, seed))
    params["reward_head"] = {"w": np.random.default_rng(seed).normal(size=(cfg.embed_dim, 1))
                                  .astype(np.float32), "b": np.full((1,), 0.25, np.float32)}
    out.append(params)
  return tuple(out)


_FORWARD = {}


def _forward(cfg):
  """One jitted (logits, hidden) forward per config, shared by all references."""
  if cfg not in _FORWARD:
    def fwd(params, toks):
      hidden = models.forward_hidden(cfg, params, toks)
      return models.logits_from_hidden(cfg, params, hidden), hidden
    _FORWARD[cfg] = jax.jit(fwd)
  return _FORWARD[cfg]


def _reference(cfg, params):
  """Per-sequence references from ONE unmasked forward over the 6 sequences, right-padded
  (causal attention: padding after a sequence cannot change it); no segments or packing.

  Returns (summed response log-probs [3, 2], reward at the last token [3, 2] or None).
  """
  seqs = [_seq(p, resp) for p, c, r in PAIRS for resp in (c, r)]
  toks = np.zeros((6, L), np.int32)
  for i, (t, _, _) in enumerate(seqs):
    toks[i, :len(t)] = t
  logits, hidden = (np.asarray(x, np.float64) for x in _forward(cfg)(params, toks))
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  logp, last = np.zeros(6), np.zeros((6, hidden.shape[-1]))
  for i, (t, g, m) in enumerate(seqs):
    n = len(t)
    logp[i] = ((logits[i, np.arange(n), g] - logz[i, :n]) * m).sum()
    last[i] = hidden[i, n - 1]
  reward = None
  if "reward_head" in params:
    head = params["reward_head"]
    reward = last @ np.asarray(head["w"], np.float64)[:, 0] + float(np.asarray(head["b"])[0])
    reward = reward.reshape(3, 2)
  return logp.reshape(3, 2), reward


def test_reward_scores_padded_and_packed(model):
  cfg, params, _ = model
  _, want = _reference(cfg, params)
  fn = scoring.reward_score_fn(cfg, params)
  c, r = fn(_padded_batch())
  np.testing.assert_allclose(np.stack([c, r], -1), want, rtol=1e-4, atol=1e-4)
  for batch in (_packed_batch(), _prompt_shared_batch()):
    np.testing.assert_allclose(_first3(*fn(batch)), want, rtol=1e-4, atol=1e-4)


def test_implicit_dpo_and_simpo(model):
  cfg, params, ref = model
  pol, _ = _reference(cfg, params)
  rfp, _ = _reference(cfg, ref)
  lens = np.array([[len(c), len(r)] for _, c, r in PAIRS], np.float64)
  dpo = scoring.implicit_score_fn(cfg, params, ref, method="dpo", beta=0.5, chunk_size=4)
  scored = runner.score_batches(dpo, [_padded_batch()], progress=False)
  np.testing.assert_allclose(np.stack([scored.chosen, scored.rejected], -1), 0.5 * (pol - rfp),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.stack([scored.chosen_lengths, scored.rejected_lengths], -1),
                                lens)
  np.testing.assert_allclose(_first3(*dpo(_prompt_shared_batch())), 0.5 * (pol - rfp),
                             rtol=1e-4, atol=1e-4)
  simpo = scoring.implicit_score_fn(cfg, params, method="simpo", beta=2.0)
  np.testing.assert_allclose(_first3(*simpo(_packed_batch())), 2.0 * pol / lens,
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="ref_params"):
    scoring.implicit_score_fn(cfg, params, method="ipo")
