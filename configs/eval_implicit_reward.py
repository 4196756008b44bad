r"""Evaluate a DPO-family policy's implicit reward, optionally beside an explicit RM.

The implicit reward r(x, y) = β·log π_θ(y|x)/π_ref(y|x) (SimPO / CPO / ORPO / RRHF: their own
reference-free definitions, `prefjax.eval.implicit`) ranks each pair; with
`eval.reward_model` the explicit RM is scored on the same batches and the report compares
both, including the ID−OOD accuracy drop (Lin et al. 2024, Table 2). The reference is
`reference.init`, else what the policy's run used (its reference.init, model.init, or its
random init); method and β default to the policy run's loss.

  python -m prefjax.main --config=configs/eval_implicit_reward.py --workdir=/tmp/eval_dpo \
      --config.model.init=/tmp/prefjax_quickstart \
      --config.eval.reward_model=/tmp/prefjax_quickstart_rm
  python -m prefjax.main --config=configs/eval_implicit_reward.py:gemma \
      --workdir=gs://YOUR_BUCKET/eval_dpo --config.model.init=gs://YOUR_BUCKET/dpo_gemma2b \
      --config.reference.init=gs://YOUR_BUCKET/gemma-2b-sft --config.eval.reward_model=gs://YOUR_BUCKET/rm_gemma2b
  python -m prefjax.main --config=configs/eval_implicit_reward.py:runlocal --workdir=/tmp/eval_dpo_local \
      --config.model.init=/tmp/prefjax_quickstart
"""
import os
import sys

from ml_collections.config_dict import placeholder

try:
  from configs import common
  from configs import eval_reward
except ImportError:  # run from outside the repository root
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import common
  from configs import eval_reward


def get_config(arg=None):
  """Implicit-reward evaluation; `gemma`: TPU data settings; `runlocal`: shipped HH sample, CPU."""
  a = common.parse_arg(arg, runlocal=False, gemma=False)
  c = eval_reward.get_config(",".join(k for k in ("runlocal", "gemma") if a[k]) or None)
  c.task = "eval_implicit_reward"
  c.model.init = placeholder(str)  # the policy: prefjax workdir or HF dir (required)
  c.reference.init = placeholder(str)  # its reference (None: read from the policy's workdir config.json)
  c.eval.reward_model = placeholder(str)  # explicit RM to compare with (None: implicit only)
  c.eval.method = placeholder(str)  # dpo | ipo | simpo | orpo | ... (None: the policy run's loss.name)
  c.eval.beta = placeholder(float)  # β (None: the policy run's loss.beta, else 0.1)
  return c
