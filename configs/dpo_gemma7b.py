r"""DPO of Gemma 7B, TPU pod slice (FSDP, live reference model).

β = 0.03, lr 1e-6, 2 epochs, cosine (Lin et al. 2024 used β = 0.1).

TPU target: v5e-32 (`v5e:4x8`), with at least 10% HBM headroom per chip at this batch and
length (compiled ahead of time, no TPU needed; docs/tpu.md has the figures):

  python -m prefjax.aot --config=configs/dpo_gemma7b.py --topology=v5e:4x8

On fewer, larger chips it fits v5p-8 (`v5p:2x2x1`) with `--config.optim.grad_accum_steps=8`.

  python -m prefjax.main --config=configs/dpo_gemma7b.py --workdir=gs://YOUR_BUCKET/dpo_gemma7b \
      --config.data.train=gs://YOUR_BUCKET/data/train.jsonl --config.model.init=gs://YOUR_BUCKET/gemma-7b-sft (HF dir)
  python -m prefjax.main --config=configs/dpo_gemma7b.py:runlocal --workdir=/tmp/dpo_gemma7b_local
"""
import os
import sys

try:
  from configs import common
  from configs import dpo_gemma2b
except ImportError:  # run from outside the repository root
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import common
  from configs import dpo_gemma2b


TPU_TOPOLOGY = "v5e:4x8"  # the slice this recipe is sized for (see the docstring)


def get_config(arg=None):
  """DPO of Gemma 7B, TPU pod slice (FSDP, live reference model); `runlocal`: a tiny model, 2 steps on CPU."""
  a = common.parse_arg(arg, runlocal=False)
  # Everything as dpo_gemma2b.py except the model, its memory plan and the settings below.
  c = dpo_gemma2b.get_config()
  common.gemma_tpu(c, "gemma_7b", remat="full")
  c.reference.mode = "model"  # or precomputed: one pass, then the reference leaves memory
  c.data.batch_size = 128
  if a.runlocal:
    common.runlocal(c)
  return c
