r"""Sample from one or several policies on a prompt set; optionally score with a reward model.

Writes `<workdir>/generations/<policy>.jsonl` ({"prompt", "response", "score", "sample",
"length"}); with `generate.reward_model` also `generation_eval.{json,md}` (score summary,
win rates, case-study table of the first policy against each other) and
`generation_eval_scores.png` (score distributions). Prompts: the unique prompts of
`generate.prompts` (default: data.train), optionally one side of the train/eval split.

  python -m prefjax.main --config=configs/generate.py --workdir=/tmp/gen \
      --config.generate.policies=sft=/tmp/sft,dpo=/tmp/prefjax_quickstart \
      --config.generate.reward_model=/tmp/prefjax_quickstart_rm
  python -m prefjax.main --config=configs/generate.py:runlocal --workdir=/tmp/gen_local \
      --config.generate.policies=dpo=/tmp/prefjax_quickstart
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


def add_sample_keys(c, *, num_samples=1, max_new_tokens=64, batch_size=16):
  """The `sample.*` decoding keys (prefjax/eval/generate.py, SampleSettings)."""
  c.sample = c.get("sample") or type(c)()
  c.sample.num_samples = num_samples  # responses per prompt (K)
  c.sample.max_new_tokens = max_new_tokens  # generated tokens at most (a stop token ends earlier)
  c.sample.temperature = 1.0  # 0: greedy
  c.sample.top_k = 0  # top-k filtering (0: off)
  c.sample.top_p = 1.0  # nucleus filtering (1: off)
  c.sample.batch_size = batch_size  # rows per sampler call (fixed shape: compiles once)
  c.sample.seed = 0  # sampling PRNG seed
  return c


def get_config(arg=None):
  """Generation + optional RM scoring; `runlocal`: 8 held-out prompts, 16 new tokens on CPU."""
  a = common.parse_arg(arg, runlocal=False)
  c = common.base_config()
  c.task = "generate"
  c.model.init = placeholder(str)  # default single policy when generate.policies is empty
  c.reference.mode = "none"  # unused by generate
  c.total_steps = 1  # unused by generate (kept > 0 for validation)
  eval_reward.local_data(c)
  c.generate = type(c)()
  c.generate.policies = eval_reward.any_type("")  # "name=path,name=path" or dict name -> path (prefjax workdir / HF dir)
  c.generate.prompts = placeholder(str)  # prompt file(s) (None: data.train)
  c.generate.split = "eval"  # eval | train: that side of data.split_fraction; "": all prompts
  c.generate.num_prompts = 64  # first N unique prompts (0: all)
  c.generate.reward_model = placeholder(str)  # RM scoring every response (None: unscored, no report)
  c.generate.plot = True  # write the score-distribution PNG
  add_sample_keys(c, num_samples=1, max_new_tokens=64, batch_size=16)
  if a.runlocal:
    common.runlocal(c)
    eval_reward.local_data(c)
    c.generate.num_prompts = 8
    c.sample.max_new_tokens = 16
    c.sample.batch_size = 8
  return c
