r"""Bradley–Terry reward model from Gemma 7B, TPU pod slice (FSDP).

As rm_gemma2b with the 7B model: full rematerialisation, bf16 compute, FSDP over all chips.

TPU target: v5e-32 (`v5e:4x8`), with at least 10% HBM headroom per chip at this batch and
length (compiled ahead of time, no TPU needed; docs/tpu.md has the figures):

  python -m prefjax.aot --config=configs/rm_gemma7b.py --topology=v5e:4x8

On fewer, larger chips it fits v5p-8 (`v5p:2x2x1`) with `--config.optim.grad_accum_steps=8`.

  python -m prefjax.main --config=configs/rm_gemma7b.py --workdir=gs://YOUR_BUCKET/rm_gemma7b \
      --config.data.train=gs://YOUR_BUCKET/data/train.jsonl --config.model.init=gs://YOUR_BUCKET/gemma-7b-sft (HF dir)
  python -m prefjax.main --config=configs/rm_gemma7b.py:runlocal --workdir=/tmp/rm_gemma7b_local
"""
import os
import sys

try:
  from configs import common
  from configs import rm_gemma2b
except ImportError:  # run from outside the repository root
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import common
  from configs import rm_gemma2b


TPU_TOPOLOGY = "v5e:4x8"  # the slice this recipe is sized for (see the docstring)


def get_config(arg=None):
  """Bradley–Terry reward model from Gemma 7B, TPU pod slice (FSDP); `runlocal`: a tiny model, 2 steps on CPU."""
  a = common.parse_arg(arg, runlocal=False)
  # Everything as rm_gemma2b.py except the model, its memory plan and the settings below.
  c = rm_gemma2b.get_config()
  common.gemma_tpu(c, "gemma_7b", remat="full")
  c.optim.learning_rate = 5e-6
  if a.runlocal:
    common.runlocal(c)
  return c
