r"""Bradley–Terry reward model from Gemma 2B (SFT checkpoint), TPU.

Pairwise BT loss, score read at the last real token, reward centring 0.01
(Eisenstein et al. 2023); eval accuracy / reward mean and std on the held-out split.

TPU target: v5e-8 (`v5e:2x4`), with at least 10% HBM headroom per chip at this batch and
length (compiled ahead of time, no TPU needed; docs/tpu.md has the figures):

  python -m prefjax.aot --config=configs/rm_gemma2b.py --topology=v5e:2x4

On fewer, larger chips it fits v4-8 (`v4:2x2x1`) with `--config.optim.grad_accum_steps=2`.

  python -m prefjax.main --config=configs/rm_gemma2b.py --workdir=gs://YOUR_BUCKET/rm_gemma2b \
      --config.data.train=gs://YOUR_BUCKET/data/train.jsonl --config.model.init=gs://YOUR_BUCKET/gemma-2b-sft (HF dir)
  python -m prefjax.main --config=configs/rm_gemma2b.py:runlocal --workdir=/tmp/rm_gemma2b_local
"""
import os
import sys

try:
  from configs import common
except ImportError:  # run from outside the repository root
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import common


TPU_TOPOLOGY = "v5e:2x4"  # the slice this recipe is sized for (see the docstring)


def get_config(arg=None):
  """Bradley–Terry reward model from Gemma 2B (SFT checkpoint), TPU; `runlocal`: a tiny model, 2 steps on CPU."""
  a = common.parse_arg(arg, runlocal=False)
  c = common.base_config()
  common.gemma_tpu(c, "gemma_2b")
  c.task = "reward"
  c.loss.name = "bradley_terry"  # or kwise (data.kind=rankings)
  c.loss.beta = None  # unused by reward models
  c.loss.use_margin = False  # subtract the record's `margin` (Llama 2) when the data has one
  c.loss.center_rewards_coefficient = 0.01  # Eisenstein et al. 2023 reward centring
  c.reference.mode = "none"
  c.model.num_reward_heads = 1
  c.num_epochs = 1.0
  c.optim.learning_rate = 1e-5
  c.optim.warmup_steps = 50
  c.data.batch_size = 64
  c.ckpt.best_metric = "eval/accuracy"
  if a.runlocal:
    common.runlocal(c)
  return c
