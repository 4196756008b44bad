"""Ahead-of-time TPU compilation of prefjax runs, on any machine (no TPU needed).

  python -m prefjax.aot --config=configs/dpo_gemma7b.py --topology=v5e:4x4 [--config.a.b=v]

`compile_recipe(config, parse_topology("v5e:4x4"))` returns the report: per-chip HBM of each
program and whether it fits, compile times, model / compiler FLOPs, a roofline step time and
MFU bound, and the collectives per step.
"""
from prefjax.aot.chips import CHIPS, Chip, Topology, parse_topology
from prefjax.aot.compile import HEADROOM, PROGRAMS, compile_recipe, format_table

__all__ = ["CHIPS", "Chip", "HEADROOM", "PROGRAMS", "Topology", "compile_recipe",
           "format_table", "parse_topology"]
