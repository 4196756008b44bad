r"""SimPO of Gemma 2 9B (instruction-tuned), TPU pod slice.

Reference-free; the SimPO paper's Gemma-2-9B-it setting: β = 10, γ/β = 0.5 (γ = 5),
lr 8e-7, 1 epoch, batch 128.

TPU target: v5e-32 (`v5e:4x8`), with at least 10% HBM headroom per chip at this batch and
length (compiled ahead of time, no TPU needed; docs/tpu.md has the figures):

  python -m prefjax.aot --config=configs/simpo_gemma2_9b.py --topology=v5e:4x8

On fewer, larger chips it fits v5p-8 (`v5p:2x2x1`) with `--config.optim.grad_accum_steps=8`.

  python -m prefjax.main --config=configs/simpo_gemma2_9b.py --workdir=gs://YOUR_BUCKET/simpo_gemma2_9b \
      --config.data.train=gs://YOUR_BUCKET/data/train.jsonl --config.model.init=gs://YOUR_BUCKET/gemma-2-9b-it (HF dir)
  python -m prefjax.main --config=configs/simpo_gemma2_9b.py:runlocal --workdir=/tmp/simpo_gemma2_9b_local
"""
import os
import sys

try:
  from configs import common
except ImportError:  # run from outside the repository root
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import common


TPU_TOPOLOGY = "v5e:4x8"  # the slice this recipe is sized for (see the docstring)


def get_config(arg=None):
  """SimPO of Gemma 2 9B (instruction-tuned), TPU pod slice; `runlocal`: a tiny model, 2 steps on CPU."""
  a = common.parse_arg(arg, runlocal=False)
  c = common.base_config()
  common.gemma_tpu(c, "gemma2_9b", remat="full")
  c.task = "preference"
  c.loss.name = "simpo"
  c.loss.beta = 10.0
  c.loss.simpo_gamma = 5.0  # target reward margin γ
  c.reference.mode = "none"
  c.num_epochs = 1.0
  c.optim.learning_rate = 8e-7
  c.optim.warmup_steps = 50
  c.data.batch_size = 128
  c.data.chat_template = "gemma"
  if a.runlocal:
    common.runlocal(c)
    c.data.chat_template = "hh"
  return c
