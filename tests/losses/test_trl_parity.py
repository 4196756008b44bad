"""Parity with TRL 1.16's own loss code on the same random inputs.

TRL computes its losses inside trainer methods; we call those methods unbound
on small stand-in objects (no model, no dataset, no Accelerator) that carry
just the attributes the method reads, with a fake model that returns fixed
tensors. We compare the loss, its gradient with respect to the inputs (so each
example's loss is checked, not only the mean), and the logged metrics.

  DPO:    trl.trainer.dpo_trainer.DPOTrainer._compute_loss   (every loss_type,
          f-divergences, label_smoothing, ld_alpha, discopop_tau)
  CPO:    trl.experimental.cpo.CPOTrainer.get_batch_loss_metrics (sigmoid,
          hinge, ipo, simpo, AlphaPO alpha; NLL from the logits)
  ORPO:   trl.experimental.orpo.ORPOTrainer.get_batch_loss_metrics
  KTO:    trl.trainer.kto_trainer.KTOTrainer._compute_loss   (kto, apo_zero_unpaired)
  Reward: trl.trainer.reward_trainer.RewardTrainer.compute_loss (margin, centering)
TRL 1.16 has no BCOTrainer (removed before 1.0), so unpaired BCO has no parity test.
"""
import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402
from trl.trainer.reward_trainer import RewardTrainer  # noqa: E402

from prefjax import losses as L  # noqa: E402

pytestmark = pytest.mark.parity

B, T = 6, 10  # pairs, tokens (position 0 is the prompt)


class _Acc:
  device = torch.device("cpu")
  gather_for_metrics = staticmethod(lambda x: x)
  gather = staticmethod(lambda x: x)


def _stub(**attrs):
  base = dict(model=types.SimpleNamespace(training=True), accelerator=_Acc(),
              aux_loss_enabled=False, _metrics={"train": collections.defaultdict(list),
                                                "eval": collections.defaultdict(list)},
              _total_train_tokens=0, _tp_size=1)
  base.update(attrs)
  return types.SimpleNamespace(**base)


class _FakeCausalLM:
  """Returns fixed per-token log-probs (keyed by sequence width), like TRL's fused head."""

  def __init__(self, by_width, log_sum_sq=None):
    self.by_width = by_width
    self.log_sum_sq = log_sum_sq

  def __call__(self, input_ids, **unused):
    lp = self.by_width[input_ids.shape[1]]
    z = torch.zeros_like(lp)
    lss = z if self.log_sum_sq is None else torch.tensor(self.log_sum_sq)
    return types.SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z,
                                 is_top1=torch.zeros_like(lp, dtype=torch.bool),
                                 log_sum_sq_probs=lss)


def _token_inputs(seed):
  """Per-token log-probs [2B, T-1] for [chosen; rejected], zero off the completion."""
  rng = np.random.default_rng(seed)
  lens = rng.integers(1, T, 2 * B)
  cmask = np.zeros((2 * B, T), np.float32)
  for i, n in enumerate(lens):
    cmask[i, 1:1 + n] = 1  # position 0 is the prompt
  shift = cmask[:, 1:]
  tok = (rng.normal(-1.0, 0.8, (2 * B, T - 1)) * shift).astype(np.float32)
  ref_tok = (tok + rng.normal(0, 0.5, tok.shape) * shift).astype(np.float32)
  return tok, ref_tok, cmask, shift


def _token_logps(tok, ref_tok, shift):
  return L.TokenLogps(chosen=tok[:B], rejected=tok[B:], ref_chosen=ref_tok[:B],
                      ref_rejected=ref_tok[B:], chosen_mask=shift[:B], rejected_mask=shift[B:])


def trl_dpo(loss_type, tok, ref_tok, cmask, shift, *, beta=0.1, label_smoothing=0.0,
            f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, discopop_tau=0.05,
            ld_alpha=None, use_weighting=False, log_sum_sq=None, loss_weights=None):
  """TRL's DPO loss, its gradient wrt the per-token log-probs, and logged metrics."""
  lp = torch.tensor(tok, requires_grad=True)
  # TRL's ld_alpha path sums the reference tokens itself; give it precomputed
  # sequence sums only when ld_alpha is None (precompute_ref_log_probs=True).
  ref_seq = ref_tok.sum(1)
  if ld_alpha is not None:
    ref_seq = np.asarray(L.ld_paired(_token_logps(tok, ref_tok, shift), ld_alpha=ld_alpha).ref_chosen)
    ref_seq = np.concatenate([ref_seq, np.asarray(
        L.ld_paired(_token_logps(tok, ref_tok, shift), ld_alpha=ld_alpha).ref_rejected)])
  types_ = [loss_type] if isinstance(loss_type, str) else list(loss_type)
  stub = _stub(beta=beta, label_smoothing=label_smoothing, loss_types=types_,
               loss_weights=loss_weights or [1.0] * len(types_), f_divergence_type=f_divergence_type,
               f_alpha_divergence_coef=f_alpha_divergence_coef, ld_alpha=ld_alpha,
               use_weighting=use_weighting, precompute_ref_logps=True,
               args=types.SimpleNamespace(discopop_tau=discopop_tau))
  inputs = {"input_ids": torch.zeros((2 * B, T), dtype=torch.long),
            "attention_mask": torch.ones((2 * B, T), dtype=torch.long),
            "completion_mask": torch.tensor(cmask, dtype=torch.long),
            "ref_chosen_logps": torch.tensor(ref_seq[:B]),
            "ref_rejected_logps": torch.tensor(ref_seq[B:])}
  loss = DPOTrainer._compute_loss(stub, _FakeCausalLM({T: lp}, log_sum_sq), inputs, False)
  loss.backward()
  metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
  return float(loss.detach()), lp.grad.numpy(), metrics


DPO_CASES = [
    ("sigmoid", {}), ("sigmoid", dict(beta=0.5)),
    ("sigmoid", dict(f_divergence_type="forward_kl")),
    ("sigmoid", dict(f_divergence_type="js_divergence")),
    ("sigmoid", dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)),
    ("sigmoid", dict(ld_alpha=0.5)), ("sigmoid", dict(ld_alpha=0.0)),
    ("hinge", {}), ("hinge", dict(f_divergence_type="js_divergence")),
    ("ipo", {}), ("ipo", dict(f_divergence_type="forward_kl", beta=0.3)),
    ("exo_pair", dict(label_smoothing=1e-3)), ("exo_pair", dict(label_smoothing=0.2, beta=0.5)),
    ("nca_pair", {}), ("robust", {}), ("robust", dict(label_smoothing=0.2)),
    ("robust", dict(label_smoothing=0.1, f_divergence_type="alpha_divergence")),
    ("bco_pair", {}), ("sppo_hard", {}), ("aot", {}), ("aot", dict(label_smoothing=0.2)),
    ("aot_unpaired", {}), ("aot_unpaired", dict(label_smoothing=0.1)),
    ("apo_zero", {}), ("apo_down", {}), ("discopop", {}), ("discopop", dict(discopop_tau=0.3, beta=0.5)),
    ("discopop", dict(f_divergence_type="forward_kl")),
    ("sft", {}), ("sigmoid_norm", {}), ("sigmoid_norm", dict(f_divergence_type="js_divergence")),
]


def test_every_trl_dpo_loss_type_is_covered():
  import re
  import inspect
  src = inspect.getsource(DPOTrainer._compute_loss)
  trl_types = set(re.findall(r'loss_type == "(\w+)"', src))
  assert trl_types == {n for n, _ in DPO_CASES}, trl_types ^ {n for n, _ in DPO_CASES}
  assert trl_types <= set(L.names())


@pytest.mark.parametrize("i", range(len(DPO_CASES)),
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(DPO_CASES)])
def test_dpo_matches_trl(i):
  name, kw = DPO_CASES[i]
  tok, ref_tok, cmask, shift = _token_inputs(seed=i)
  want_loss, want_grad, metrics = trl_dpo(name, tok, ref_tok, cmask, shift, **kw)
  ld_alpha = kw.pop("ld_alpha", None)
  if name == "exo_pair" or name == "robust" or name == "aot" or name == "aot_unpaired":
    pass  # these take label_smoothing
  elif "label_smoothing" in kw and kw["label_smoothing"] == 0.0:
    kw.pop("label_smoothing")

  def ours(t):
    tl = _token_logps(t, ref_tok, shift)
    lp = L.to_paired(tl) if ld_alpha is None else L.ld_paired(tl, ld_alpha=ld_alpha)
    out = L.get(name)(lp, **kw)
    return jnp.mean(out.loss), (lp, out)

  (loss, (lp, out)), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(tok))
  np.testing.assert_allclose(loss, want_loss, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(grad * shift, want_grad * shift, rtol=1e-4, atol=1e-6)
  m = L.paired_metrics(lp, out)
  for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected"):
    np.testing.assert_allclose(m[k], metrics[k], rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "bco_pair"])
def test_wpo_weighting_matches_trl(name):
  tok, ref_tok, cmask, shift = _token_inputs(seed=42)
  lss = (np.random.default_rng(0).uniform(-2.0, -0.1, tok.shape) * shift).astype(np.float32)
  want_loss, want_grad, _ = trl_dpo(name, tok, ref_tok, cmask, shift, use_weighting=True,
                                    log_sum_sq=lss)

  def ours(t):
    tl = _token_logps(t, ref_tok, shift)
    w = L.wpo_weights(tl, lss[:B], lss[B:])
    return jnp.mean(L.get(name)(L.to_paired(tl)).loss * w)

  loss, grad = jax.value_and_grad(ours)(jnp.asarray(tok))
  np.testing.assert_allclose(loss, want_loss, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(grad * shift, want_grad * shift, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("types_,weights,kw", [
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], {}),  # MPO
    (["robust", "apo_zero"], None, dict(label_smoothing=0.1, beta=0.3)),
])
def test_multi_loss_matches_trl(types_, weights, kw):
  tok, ref_tok, cmask, shift = _token_inputs(seed=9)
  want_loss, want_grad, _ = trl_dpo(types_, tok, ref_tok, cmask, shift, loss_weights=weights, **kw)

  def ours(t):
    lp = L.to_paired(_token_logps(t, ref_tok, shift))
    return jnp.mean(L.combine(lp, types_, weights, **kw).loss)

  loss, grad = jax.value_and_grad(ours)(jnp.asarray(tok))
  np.testing.assert_allclose(loss, want_loss, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(grad * shift, want_grad * shift, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------ CPO / ORPO
V = 7  # vocabulary


def _lm_batch(seed, prompt_len):
  """Tokens, labels (-100 on prompt/padding) and logits for B chosen + B rejected."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, V, (2 * B, T))
  att = np.zeros((2 * B, T), np.int64)
  labels = np.full((2 * B, T), -100)
  for i in range(2 * B):
    n = rng.integers(prompt_len + 1, T + 1)
    att[i, :n] = 1
    labels[i, prompt_len:n] = ids[i, prompt_len:n]
  logits = rng.normal(0, 1.5, (2 * B, T, V)).astype(np.float32)
  return ids, att, labels, logits


def _our_logps_from_logits(logits, labels):
  """Summed response log-probs and lengths from [2B, T, V] logits (shifted, as causal LMs)."""
  lab = labels[:, 1:]
  mask = (lab != -100).astype(np.float32)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  tok = jnp.take_along_axis(logp, np.maximum(lab, 0)[..., None], axis=-1)[..., 0] * mask
  s, n = tok.sum(-1), mask.sum(-1)
  return L.PairedLogps(chosen=s[:B], rejected=s[B:], chosen_lengths=n[:B], rejected_lengths=n[B:])


def _trl_lm_loss(trainer_cls, seed, prompt_len, **attrs):
  ids, att, labels, logits = _lm_batch(seed, prompt_len)
  lg = torch.tensor(logits, requires_grad=True)
  trainer = object.__new__(trainer_cls)
  base = dict(accelerator=_Acc(), aux_loss_enabled=False, is_encoder_decoder=False, pad_token_id=0,
              padding_value=0)
  base.update(attrs)
  for k, v in base.items():
    object.__setattr__(trainer, k, v)
  batch = {}
  for part, sl in (("chosen", slice(0, B)), ("rejected", slice(B, 2 * B))):
    batch[f"{part}_input_ids"] = torch.tensor(ids[sl])
    batch[f"{part}_attention_mask"] = torch.tensor(att[sl])
    batch[f"{part}_labels"] = torch.tensor(labels[sl])
  model = lambda input_ids, **unused: types.SimpleNamespace(logits=lg)
  loss, metrics = trainer.get_batch_loss_metrics(model, batch)
  loss.backward()
  return float(loss.detach()), lg.grad.numpy(), metrics, logits, labels


CPO_CASES = [
    dict(loss_type="sigmoid"), dict(loss_type="sigmoid", label_smoothing=0.1, beta=0.5),
    dict(loss_type="hinge", cpo_alpha=0.5), dict(loss_type="ipo"),
    dict(loss_type="simpo", simpo_gamma=0.5, cpo_alpha=0.0), dict(loss_type="simpo", simpo_gamma=0.3),
    dict(loss_type="sigmoid", alpha=0.3), dict(loss_type="ipo", alpha=-0.2, cpo_alpha=0.0),
]


@pytest.mark.parametrize("i", range(len(CPO_CASES)))
def test_cpo_matches_trl(i):
  from trl.experimental.cpo import CPOTrainer
  kw = dict(beta=0.1, label_smoothing=0.0, cpo_alpha=1.0, simpo_gamma=0.5, alpha=0.0)
  kw.update(CPO_CASES[i])
  want, want_grad, metrics, logits, labels = _trl_lm_loss(CPOTrainer, 100 + i, prompt_len=2, **kw)

  def ours(lg):
    lp = _our_logps_from_logits(lg, labels)
    out = L.cpo(lp, **kw)
    return jnp.mean(out.loss), (lp, out)

  (loss, (lp, out)), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(logits))
  np.testing.assert_allclose(loss, want, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
  m = L.paired_metrics(lp, out)
  if kw["loss_type"] in ("ipo", "simpo"):  # TRL logs the per-token average log-probs
    m["logps/chosen"] = jnp.mean(lp.chosen / lp.chosen_lengths)
    m["logps/rejected"] = jnp.mean(lp.rejected / lp.rejected_lengths)
  for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected"):
    np.testing.assert_allclose(m[k], metrics[k], rtol=1e-4, atol=1e-5, err_msg=k)
  np.testing.assert_allclose(jnp.mean(out.aux["nll"]), metrics["nll_loss"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_matches_trl(beta):
  from trl.experimental.orpo import ORPOTrainer
  # TRL's ORPO NLL covers prompt AND response tokens; with a 1-token prompt (never
  # a target after the shift) that is the response-token mean over the batch.
  want, want_grad, metrics, logits, labels = _trl_lm_loss(ORPOTrainer, 7, prompt_len=1, beta=beta)

  def ours(lg):
    lp = _our_logps_from_logits(lg, labels)
    out = L.orpo(lp, beta=beta, nll_normalization="batch")
    return jnp.mean(out.loss), (lp, out)

  (loss, (lp, out)), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(logits))
  np.testing.assert_allclose(loss, want, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(jnp.mean(out.aux["log_odds"]), metrics["log_odds_chosen"], rtol=1e-4)
  np.testing.assert_allclose(jnp.mean(out.aux["nll"]), metrics["nll_loss"], rtol=1e-4)
  for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
    np.testing.assert_allclose(L.paired_metrics(lp, out)[k], metrics[k], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ KTO
@pytest.mark.parametrize("loss_type,kw", [
    ("kto", dict(beta=0.1)), ("kto", dict(beta=0.3, desirable_weight=1.5, undesirable_weight=0.6)),
    ("kto", dict(beta=0.1, kl_shift=-30.0)), ("apo_zero_unpaired", dict(beta=0.2))])
def test_kto_matches_trl(loss_type, kw):
  kw = dict(kw)
  kl_shift = kw.pop("kl_shift", 5.0)
  rng = np.random.default_rng(3)
  nb, t_kl = 8, T + 2
  label = np.array([1, 0, 1, 1, 0, 0, 1, 0], bool)
  cm = np.zeros((nb, T), np.int64)
  kcm = np.zeros((nb, t_kl), np.int64)
  for i in range(nb):
    cm[i, 1:1 + rng.integers(1, T)] = 1
    kcm[i, 1:1 + rng.integers(1, t_kl)] = 1
  tok = (rng.normal(-1, 0.8, (nb, T - 1)) * cm[:, 1:]).astype(np.float32)
  ktok = ((rng.normal(-1, 0.8, (nb, t_kl - 1)) + kl_shift / 5) * kcm[:, 1:]).astype(np.float32)
  ref = (tok.sum(1) + rng.normal(0, 2, nb)).astype(np.float32)
  kref = (ktok.sum(1) + rng.normal(0, 2, nb)).astype(np.float32)
  lp = torch.tensor(tok, requires_grad=True)
  attrs = dict(beta=kw.get("beta", 0.1), desirable_weight=kw.get("desirable_weight", 1.0),
               undesirable_weight=kw.get("undesirable_weight", 1.0), loss_type=loss_type,
               calculate_KL=loss_type == "kto", precompute_ref_logps=True)
  stub = _stub(**attrs)
  stub._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(stub, model, batch)
  batch = {"input_ids": torch.zeros((nb, T), dtype=torch.long),
           "attention_mask": torch.ones((nb, T), dtype=torch.long),
           "completion_mask": torch.tensor(cm), "label": torch.tensor(label),
           "ref_logps": torch.tensor(ref), "ref_KL_logps": torch.tensor(kref),
           "KL_input_ids": torch.zeros((nb, t_kl), dtype=torch.long),
           "KL_attention_mask": torch.ones((nb, t_kl), dtype=torch.long),
           "KL_completion_mask": torch.tensor(kcm)}
  model = _FakeCausalLM({T: lp, t_kl: torch.tensor(ktok)})
  want = KTOTrainer._compute_loss(stub, model, batch, False)
  want.backward()
  metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}

  def ours(s):
    u = L.UnpairedLogps(logps=s, ref_logps=jnp.asarray(ref), label=jnp.asarray(label),
                        kl_logps=jnp.asarray(ktok.sum(1)), kl_ref_logps=jnp.asarray(kref))
    out = L.get_unpaired(loss_type)(u, **kw)
    return jnp.mean(out.loss), (u, out)

  (loss, (u, out)), g = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(tok.sum(1)))
  np.testing.assert_allclose(loss, float(want.detach()), rtol=2e-5, atol=1e-6)
  # (TRL sums every position; the fake head's log-probs are 0 off the completion.)
  np.testing.assert_allclose(g[:, None] * cm[:, 1:], lp.grad.numpy() * cm[:, 1:], rtol=1e-4, atol=1e-7)
  m = L.unpaired_metrics(u, out)
  for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
    np.testing.assert_allclose(m[k], metrics[k], rtol=1e-4, atol=1e-5, err_msg=k)
  if loss_type == "kto":
    np.testing.assert_allclose(out.aux["kl"], metrics["kl"], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ reward model
@pytest.mark.parametrize("margin,center", [(False, None), (True, None), (True, 0.01), (False, 0.1)])
def test_reward_trainer_matches_trl(margin, center):
  rng = np.random.default_rng(5)
  scores = rng.normal(0, 2, (2 * B, 1)).astype(np.float32)
  m = rng.uniform(0, 2, B).astype(np.float32)
  s = torch.tensor(scores, requires_grad=True)
  stub = _stub(args=types.SimpleNamespace(center_rewards_coefficient=center))
  inputs = {"input_ids": torch.zeros((2 * B, 4), dtype=torch.long),
            "attention_mask": torch.ones((2 * B, 4), dtype=torch.long)}
  if margin:
    inputs["margin"] = torch.tensor(m)
  model = lambda **unused: types.SimpleNamespace(logits=s)
  want = RewardTrainer.compute_loss(stub, model, inputs)
  want.backward()

  def ours(x):
    return jnp.mean(L.reward_model_loss(x[:B, 0], x[B:, 0], margin=m if margin else None,
                                        center_rewards_coefficient=center))

  loss, g = jax.value_and_grad(ours)(jnp.asarray(scores))
  np.testing.assert_allclose(loss, float(want.detach()), rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(g, s.grad.numpy(), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(stub._metrics["train"]["accuracy"][-1],
                             np.mean(scores[:B] > scores[B:]), rtol=1e-6)
