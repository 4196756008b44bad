r"""Evaluate an explicit reward model on named eval sets (ID HH-RLHF and OOD sets).

Accuracy (score ties excluded), reward mean/std, margin, accuracy by response-length
bucket, ID/OOD means and the ID−OOD drop (Lin et al. 2024, Table 2) in
`<workdir>/eval_results.{json,md,html}` + PNG plots. `model.init` is a prefjax reward-model
workdir (its architecture is read from its config.json) or an HF
`*ForSequenceClassification` dir. The data keys (tokenizer, chat template, lengths) must
match the RM's training run.

  python -m prefjax.main --config=configs/eval_reward.py --workdir=/tmp/eval_rm \
      --config.model.init=/tmp/prefjax_quickstart_rm
  python -m prefjax.main --config=configs/eval_reward.py:gemma --workdir=gs://YOUR_BUCKET/eval_rm \
      --config.model.init=gs://YOUR_BUCKET/rm_gemma2b --config.eval.sets=all
  python -m prefjax.main --config=configs/eval_reward.py:runlocal --workdir=/tmp/eval_rm_local \
      --config.model.init=/tmp/prefjax_quickstart_rm
"""
import os
import sys

import ml_collections
from ml_collections.config_dict import placeholder

try:
  from configs import common
except ImportError:  # run from outside the repository root
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import common

def any_type(value):
  """A config field that accepts a string, a list or a dict (e.g. eval.sets)."""
  return ml_collections.FieldReference(value, field_type=object)


# The set the `runlocal` variants read: the HH-RLHF helpful-base sample shipped in the package
# (prefjax/assets/data), so they run from a fresh clone; the OOD sets are not shipped.
LOCAL_SETS = "hh_helpful_base=" + os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "prefjax", "assets", "data", "hh_rlhf_helpful_base", "test.jsonl.gz") + "|id"


def add_eval_keys(c):
  """The `eval.*` keys of the eval_reward / eval_implicit_reward tasks (prefjax/eval/tasks.py)."""
  c.eval.sets = any_type("all")  # registered names, groups id|ood|all, name=path entries (comma list), or dict
  c.eval.shared_data_dir = placeholder(str)  # base dir of the registered files (None: $PREFJAX_SHARED_DATA or ../shared/data)
  c.eval.batch_size = 0  # pairs per eval batch (0: data.eval_batch_size, else data.batch_size)
  c.eval.ties = "exclude"  # exact score ties: exclude | half | zero (accuracy credit)
  c.eval.bootstrap = 1000  # bootstrap resamples of the accuracy CI (0: none)
  c.eval.plots = True  # write the PNG figures
  c.eval.reward_head = 0  # which reward head to read (multi-head RMs)
  c.eval.reward_model = placeholder(str)  # eval_implicit_reward: explicit RM evaluated side by side (None: off)
  c.eval.method = placeholder(str)  # eval_implicit_reward: implicit-reward definition (None: the policy run's loss.name)
  c.eval.beta = placeholder(float)  # eval_implicit_reward: β of the implicit reward (None: the policy run's loss.beta)
  return c


def local_data(c):
  """Quick-start data settings (shipped 32k tokenizer, HH template, short sequences)."""
  c.data.tokenizer = "mistral_v1"  # must match the evaluated model's training run
  c.data.chat_template = "hh"  # must match the evaluated model's training run
  c.data.max_len = 128  # tokens per sequence (as quickstart)
  c.data.max_prompt_len = 64  # prompt truncated from the left
  c.data.max_response_len = 64  # responses truncated from the right
  c.data.batch_size = 32  # eval pairs per batch
  c.model.dtype = "float32"  # compute dtype on CPU
  return c


def get_config(arg=None):
  """Explicit-RM evaluation; `gemma`: TPU data settings; `runlocal`: shipped HH sample, CPU."""
  a = common.parse_arg(arg, runlocal=False, gemma=False)
  c = common.base_config()
  c.task = "eval_reward"
  c.model.init = placeholder(str)  # the reward model: prefjax workdir or HF dir (required)
  c.reference.mode = "none"  # unused by eval
  c.total_steps = 1  # unused by eval (kept > 0 for validation)
  add_eval_keys(c)
  local_data(c)
  if a.gemma:
    common.gemma_tpu(c, "gemma_2b", remat="none")  # no backward pass in eval
    c.data.batch_size = 64
  if a.runlocal:
    common.runlocal(c)
    local_data(c)
    c.eval.sets = LOCAL_SETS
    c.eval.bootstrap = 200
    c.eval.num_batches = 0  # whole sets (runlocal's 1 is for a training run's periodic eval)
  return c
