r"""DPO of Gemma 2B (from its SFT checkpoint), TPU.

β = 0.03, lr 1e-6, 2 epochs, cosine (Lin et al. 2024's
DPO-vs-RM generalisation study used β = 0.1: set --config.loss.beta=0.1 to reproduce it).
Reference log-probs are precomputed once and cached, so only the policy is in memory.

TPU target: v5e-8 (`v5e:2x4`), with at least 10% HBM headroom per chip at this batch and
length (compiled ahead of time, no TPU needed; docs/tpu.md has the figures):

  python -m prefjax.aot --config=configs/dpo_gemma2b.py --topology=v5e:2x4

On fewer, larger chips it fits v4-8 (`v4:2x2x1`) with `--config.optim.grad_accum_steps=2`.

  python -m prefjax.main --config=configs/dpo_gemma2b.py --workdir=gs://YOUR_BUCKET/dpo_gemma2b \
      --config.data.train=gs://YOUR_BUCKET/data/train.jsonl --config.model.init=gs://YOUR_BUCKET/gemma-2b-sft (HF dir)
  python -m prefjax.main --config=configs/dpo_gemma2b.py:runlocal --workdir=/tmp/dpo_gemma2b_local
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
  """DPO of Gemma 2B (from its SFT checkpoint), TPU; `runlocal`: a tiny model, 2 steps on CPU."""
  a = common.parse_arg(arg, runlocal=False)
  c = common.base_config()
  common.gemma_tpu(c, "gemma_2b")
  c.task = "preference"
  c.loss.name = "dpo"
  c.loss.beta = 0.03
  c.loss.label_smoothing = 0.0  # conservative DPO when > 0
  c.reference.mode = "precomputed"
  c.num_epochs = 2.0
  c.optim.learning_rate = 1e-6
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 100
  c.data.batch_size = 64
  if a.runlocal:
    common.runlocal(c)
  return c
