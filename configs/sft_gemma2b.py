r"""Supervised fine-tuning of Gemma 2B on the chosen responses, TPU.

Token-mean NLL of the response tokens (prompt masked); the usual first stage before
reward modelling or DPO.

TPU target: v5e-8 (`v5e:2x4`), with at least 10% HBM headroom per chip at this batch and
length (compiled ahead of time, no TPU needed; docs/tpu.md has the figures):

  python -m prefjax.aot --config=configs/sft_gemma2b.py --topology=v5e:2x4

On fewer, larger chips it fits v4-8 (`v4:2x2x1`) with `--config.optim.grad_accum_steps=2`.

  python -m prefjax.main --config=configs/sft_gemma2b.py --workdir=gs://YOUR_BUCKET/sft_gemma2b \
      --config.data.train=gs://YOUR_BUCKET/data/train.jsonl --config.model.init=gs://YOUR_BUCKET/gemma-2b (HF dir)
  python -m prefjax.main --config=configs/sft_gemma2b.py:runlocal --workdir=/tmp/sft_gemma2b_local
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
  """Supervised fine-tuning of Gemma 2B on the chosen responses, TPU; `runlocal`: a tiny model, 2 steps on CPU."""
  a = common.parse_arg(arg, runlocal=False)
  c = common.base_config()
  common.gemma_tpu(c, "gemma_2b")
  c.task = "sft"
  c.loss.name = "nll"  # unused by sft
  c.loss.beta = None
  c.reference.mode = "none"
  c.data.kind = "sft"
  c.num_epochs = 1.0
  c.optim.learning_rate = 2e-5
  c.optim.warmup_steps = 100
  c.data.batch_size = 64
  if a.runlocal:
    common.runlocal(c)
  return c
