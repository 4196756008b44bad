"""Compile a recipe's programs for a TPU topology on any machine, and measure them.

`compile_recipe(config, topology)` builds what `prefjax.main` would build for `config`
(mesh from `mesh.*` / `dcn_mesh.*`, model, train state and its shardings, the jitted train
step with donation, and the eval step, diagnostics and reference pass where the run has
them) over the compile-only devices of a TPU slice (`jax.experimental.topologies`), lowers
them on abstract inputs and compiles them with libtpu. Nothing is allocated; no TPU is
needed. The report holds per-chip HBM, compile times, model and compiler FLOPs, a roofline
step time and the collectives of each program.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np

from prefjax import data as data_lib
from prefjax import sharding as sharding_lib
from prefjax.aot import flops as flops_lib
from prefjax.aot import hlo as hlo_lib
from prefjax.aot.chips import GiB, Topology
from prefjax.train import builders
from prefjax.train import data_io
from prefjax.train import program as program_lib
from prefjax.train import step as step_lib
from prefjax.train import validation

PROGRAMS = ("train", "eval", "diagnostics", "reference")
# Headroom the recipes keep below a chip's HBM (XLA's estimate is not the allocator's peak).
HEADROOM = 0.10
# Schedule length used when the config derives its steps from data (the program's shapes do
# not depend on it).
_NOMINAL_STEPS = 1000


def topology_devices(topo: Topology) -> list[Any]:
  """The compile-only devices of `topo` (one per chip; megacore on v4 / v5p)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kw = {"chip_config_name": "megacore"} if topo.chip.megacore else {}
  if topo.num_slices > 1:
    kw["num_slices"] = topo.num_slices
  desc = topologies.get_topology_desc(topology_name=topo.name, platform="tpu", **kw)
  devices = list(desc.devices)
  if len(devices) != topo.chips:
    raise RuntimeError(f"topology {topo.name} x{topo.num_slices} gave {len(devices)} devices, "
                       f"expected {topo.chips} chips")
  return devices


def _model_config(config: Any) -> tuple[Any, Optional[str]]:
  """The model `prefjax.main` would train, read without loading weights; and a note when
  `model.init` could not be read here (then the recipe's preset is compiled)."""
  task = config.task
  path = config.model.get("init")
  kind = builders.init_kind(path)
  if kind == "workdir":
    return builders.saved_model_config(path, config.model, task=builders.source_task(
        path, task)), None
  if kind == "hf":
    from prefjax import models  # pylint: disable=g-import-not-at-top
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
      base = models.config_from_hf(json.load(f))
    return builders.model_config(config.model, task=task, base=base), None
  note = None
  if kind != "none":
    note = (f"model.init={path!r} is not a local HF dir or workdir: compiled the "
            f"architecture of model.preset={config.model.preset!r}")
  return builders.model_config(config.model, task=task), note


def _shard_bytes(tree: Any) -> int:
  """Bytes of one device's shards of a pytree of sharded `ShapeDtypeStruct`s."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = list(x.shape)
    sh = getattr(x, "sharding", None)
    if sh is not None:  # ceil division: XLA pads an uneven split
      for dim, axes in enumerate(sh.spec):
        axes = () if axes is None else axes if isinstance(axes, tuple) else (axes,)
        shape[dim] = -(-shape[dim] // math.prod(sh.mesh.shape[a] for a in axes))
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total


def abstract_batch(config: Any, mesh: Any, num_processes: int, split: str
                   ) -> dict[str, jax.ShapeDtypeStruct]:
  """The global model-input batch of `split` as sharded `ShapeDtypeStruct`s."""
  use_margin = bool(config.loss.get("use_margin", False))
  shapes = data_lib.batch_shapes(data_io.data_config(config), split=split,
                                 process_count=num_processes, has_margin=use_margin)
  shapes = {k: v for k, v in shapes.items() if k in data_io.MODEL_KEYS}
  return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding_lib.batch_sharding(mesh, len(s)))
          for k, (s, d) in shapes.items()}


def rows_per_process(batch: dict[str, jax.ShapeDtypeStruct]) -> dict[int, int]:
  """Rows of the batch's leading axis each process holds under its sharding: what that
  process's grain pipeline must feed (`make_array_from_process_local_data`)."""
  x = batch["tokens"]
  rows: dict[int, set] = {}
  for dev, idx in x.sharding.devices_indices_map(x.shape).items():
    rows.setdefault(dev.process_index, set()).update(range(*idx[0].indices(x.shape[0])))
  return {p: len(r) for p, r in sorted(rows.items())}


def _memory(compiled: Any) -> dict[str, int]:
  m = compiled.memory_analysis()
  out = {"argument_bytes": int(m.argument_size_in_bytes),
         "output_bytes": int(m.output_size_in_bytes),
         "temp_bytes": int(m.temp_size_in_bytes),
         "alias_bytes": int(m.alias_size_in_bytes),
         "code_bytes": int(m.generated_code_size_in_bytes)}
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                        - out["alias_bytes"])
  return out


def _cost(compiled: Any) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  cost = cost or {}
  return {"flops": float(cost.get("flops", 0.0)),
          "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


# libtpu refuses to finish a program whose temporaries exceed the chip's HBM:
# "RESOURCE_EXHAUSTED: ... HLO temporaries (18.17G) exceeds available HBM (15.75G)".
_OOM = re.compile(r"temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")
_UNITS = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


def _out_of_memory(name: str, error: Exception, args: tuple, seconds: float) -> dict:
  """The report of a program libtpu refused for lack of HBM (its temporaries alone)."""
  m = _OOM.search(str(error))
  if not m:
    raise error
  temp = int(float(m.group(1)) * _UNITS[m.group(2)])
  arg = _shard_bytes(args)
  logging.warning("%s does not fit: %s", name, str(error).splitlines()[0])
  return {"lower_s": 0.0, "compile_s": round(seconds, 2), "argument_bytes": arg,
          "output_bytes": 0, "temp_bytes": temp, "alias_bytes": 0, "code_bytes": 0,
          "total_bytes": arg + temp, "flops": 0.0, "bytes_accessed": 0.0, "collectives": {},
          "out_of_memory": str(error).splitlines()[0]}


def _compile(name: str, fn: Any, args: tuple) -> tuple[Any, dict]:
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  t1 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return None, _out_of_memory(name, e, args, time.perf_counter() - t1)
  t2 = time.perf_counter()
  logging.info("compiled %s in %.1f s (lowering %.1f s)", name, t2 - t1, t1 - t0)
  out = {"lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2), **_memory(compiled),
         **_cost(compiled), "collectives": hlo_lib.collectives(compiled.as_text())}
  return compiled, out


def _tokens(batch: dict[str, Any]) -> tuple[int, int]:
  """(token slots the model runs over, row length) of a batch."""
  n = math.prod(batch["tokens"].shape)
  if "kl_tokens" in batch:
    n += math.prod(batch["kl_tokens"].shape)
  return n, batch["tokens"].shape[-1]


def roofline(report_train: dict, model_flops: dict, topo: Topology, remat: str,
             dense_attention: bool) -> dict:
  """Roofline step time per chip: max(FLOPs / peak, bytes / HBM bandwidth), and the MFU
  it implies (Williams et al. 2009, "Roofline").

  FLOPs are the hardware FLOPs of the analytic model (`flops.hardware_flops`: remat and
  dense attention included) or the compiler's count, whichever is larger. XLA's cost
  analysis counts the body of a loop (scanned layers, micro-batches) once, so its bytes are
  a lower bound and the memory term is optimistic; `loop_scale` (analytic / compiler FLOPs)
  says by how much the compiler's counts fall short. Collectives are not in the roofline."""
  chip = topo.chip
  per_chip_model = model_flops["total"] / topo.chips
  analytic = flops_lib.hardware_flops(model_flops, remat=remat,
                                      dense_attention=dense_attention) / topo.chips
  hw = max(report_train["flops"], analytic)
  t_compute = hw / chip.peak_flops
  t_memory = report_train["bytes_accessed"] / chip.hbm_bandwidth
  step = max(t_compute, t_memory)
  return {"hardware_flops_per_chip": hw,
          "loop_scale": analytic / report_train["flops"] if report_train["flops"] else 1.0,
          "compute_s": t_compute, "memory_s": t_memory, "step_s": step,
          "bound": "compute" if t_compute >= t_memory else "memory",
          "mfu": per_chip_model / chip.peak_flops / step if step > 0 else 0.0}


def compile_recipe(config: Any, topo: Topology, *, programs: tuple[str, ...] = PROGRAMS,
                   devices: Optional[list[Any]] = None) -> dict[str, Any]:
  """Compiles `config`'s programs for `topo`; returns the report (see module docstring)."""
  unknown = set(programs) - set(PROGRAMS)
  if unknown:
    raise ValueError(f"unknown programs {sorted(unknown)}; expected some of {PROGRAMS}")
  devices = devices if devices is not None else topology_devices(topo)
  num_processes = len({d.process_index for d in devices})
  validation.validate(config, num_devices=len(devices), num_processes=num_processes)
  jax.config.update("jax_threefry_partitionable", True)
  mesh, rules = builders.make_mesh(config, devices)
  model_cfg, note = _model_config(config)
  steps = int(config.get("total_steps") or 0) or _NOMINAL_STEPS
  report: dict[str, Any] = {
      "topology": topo.name, "num_slices": topo.num_slices, "chips": topo.chips,
      "processes": num_processes, "chip": topo.chip.name,
      "hbm_per_chip_bytes": topo.chip.hbm_bytes,
      "mesh": {k: int(v) for k, v in mesh.shape.items()}, "task": config.task,
      "model": config.model.preset, "dtype": model_cfg.dtype, "remat": model_cfg.remat,
      "scan_layers": bool(model_cfg.scan_layers),
      "reference_mode": program_lib.ref_mode(config),
      "grad_accum_steps": int(config.optim.grad_accum_steps), "notes": [note] if note else [],
      "programs": {}}
  # Built outside the mesh context: optax creates small concrete arrays while it maps the
  # optimizer state's structure, and a compile-only mesh cannot hold them.
  progs = program_lib.build(config, mesh, rules, model_cfg, steps)
  report["kernels"] = progs.kernels.to_dict()
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
    state = progs.abstract_state()
    batch = abstract_batch(config, mesh, num_processes, "train")
    report["rows_per_process"] = rows_per_process(batch)
    report["state_bytes_per_chip"] = _shard_bytes(state)
    report["params"] = int(sum(math.prod(x.shape) for x in jax.tree.leaves(
        progs.abstract_params)))
    tokens, seq_len = _tokens(batch)
    fl = flops_lib.step_flops(model_cfg, tokens, seq_len,
                              reference_forward=progs.ref_mode == "model")
    report["tokens_per_step"] = tokens
    report["model_flops"] = fl
    if progs.ref_mode == "precomputed":
      ref_out = jax.eval_shape(progs.reference_pass(), progs.abstract_params,
                               _strip_sharding(batch))
      batch["ref_logps"] = jax.ShapeDtypeStruct(
          ref_out.shape, ref_out.dtype,
          sharding=sharding_lib.batch_sharding(mesh, len(ref_out.shape)))
    report["batch"] = {k: list(v.shape) for k, v in batch.items()}
    batch_sh = step_lib.batch_shardings(batch, mesh)
    if "train" in programs:
      _, r = _compile("train", progs.train_step(batch_sh), (state, batch))
      report["programs"]["train"] = r
      if "out_of_memory" not in r:
        report["roofline"] = roofline(r, fl, topo, model_cfg.remat,
                                      dense_attention=progs.kernels.attention != "splash")
    ref_params = state.ref_params if progs.has_ref_params else None
    has_eval = data_io.has_eval(config)
    if has_eval and ("eval" in programs or "diagnostics" in programs):
      eb = abstract_batch(config, mesh, num_processes, "eval")
      if progs.ref_mode == "precomputed":
        eb["ref_logps"] = _ref_like(batch["ref_logps"], eb["tokens"].shape[0], mesh)
      ebsh = step_lib.batch_shardings(eb, mesh)
      if "eval" in programs:
        _, r = _compile("eval", progs.eval_step(ebsh), (state.params, ref_params, eb))
        report["programs"]["eval"] = _resident(r, report["state_bytes_per_chip"], state,
                                               ref_params)
      diag = progs.diagnostics(ebsh) if "diagnostics" in programs else None
      if diag is not None:
        _, r = _compile("diagnostics", diag, (state.params, ref_params, eb))
        report["programs"]["diagnostics"] = _resident(r, report["state_bytes_per_chip"], state,
                                                      ref_params)
    if "reference" in programs and progs.ref_mode == "precomputed":
      ref_batch = {k: v for k, v in batch.items() if k != "ref_logps"}
      base = state.ref_params if progs.lora is not None else state.params
      _, r = _compile("reference", progs.reference_pass(), (base, ref_batch))
      report["programs"]["reference"] = r
  report["peak_bytes_per_chip"] = max(
      (p.get("resident_total_bytes", p["total_bytes"]) for p in report["programs"].values()),
      default=0)
  oom = any("out_of_memory" in p for p in report["programs"].values())
  report["fits"] = not oom and report["peak_bytes_per_chip"] <= topo.chip.hbm_bytes
  report["headroom"] = 1.0 - report["peak_bytes_per_chip"] / topo.chip.hbm_bytes
  report["fits_with_headroom"] = report["headroom"] >= HEADROOM
  return report


def _strip_sharding(batch: dict[str, jax.ShapeDtypeStruct]) -> dict:
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}


def _ref_like(train_ref: jax.ShapeDtypeStruct, rows: int, mesh: Any) -> jax.ShapeDtypeStruct:
  shape = (rows,) + tuple(train_ref.shape[1:])
  return jax.ShapeDtypeStruct(shape, train_ref.dtype,
                              sharding=sharding_lib.batch_sharding(mesh, len(shape)))


def _resident(r: dict, state_bytes: int, state: Any, ref_params: Any) -> dict:
  """Adds the HBM the whole train state holds while an eval program runs (it is resident,
  but only the parameters are the program's arguments)."""
  args_state = _shard_bytes(state.params) + (_shard_bytes(ref_params) if ref_params is not None
                                             else 0)
  r["resident_total_bytes"] = r["total_bytes"] + state_bytes - args_state
  return r


def format_table(report: dict[str, Any]) -> str:
  """A human-readable summary of a report (one block of text)."""
  cap = report["hbm_per_chip_bytes"]
  lines = [f"{report['model']} {report['task']} on {report['topology']}"
           + (f" x{report['num_slices']} slices" if report["num_slices"] > 1 else "")
           + f" ({report['chips']} chips, {report['processes']} hosts), mesh {report['mesh']}",
           f"{'program':<12}{'args GiB':>10}{'out GiB':>9}{'temp GiB':>10}{'alias GiB':>11}"
           f"{'total GiB':>11}{'compile s':>11}"]
  for name, p in report["programs"].items():
    total = p.get("resident_total_bytes", p["total_bytes"])
    lines.append(f"{name:<12}{p['argument_bytes'] / GiB:>10.2f}{p['output_bytes'] / GiB:>9.2f}"
                 f"{p['temp_bytes'] / GiB:>10.2f}{p['alias_bytes'] / GiB:>11.2f}"
                 f"{total / GiB:>11.2f}{p['compile_s']:>11.1f}")
  verdict = "fits" if report["fits"] else "DOES NOT FIT"
  for name, p in report["programs"].items():
    if "out_of_memory" in p:
      lines.append(f"{name}: libtpu: {p['out_of_memory']}")
  lines.append(f"peak {report['peak_bytes_per_chip'] / GiB:.2f} GiB of {cap / GiB:.0f} GiB per "
               f"chip: {verdict} (headroom {100 * report['headroom']:.0f}%)")
  if "roofline" in report:
    rf, fl = report["roofline"], report["model_flops"]
    under = (f" (it counts each loop body once: {rf['loop_scale']:.0f}x below the analytic "
             "hardware FLOPs)" if rf["loop_scale"] > 1.5 else "")
    lines.append(f"model FLOPs/step {fl['total']:.3e} (policy {fl['policy']:.3e}, reference "
                 f"{fl['reference']:.3e}); compiler FLOPs/chip "
                 f"{report['programs']['train']['flops']:.3e}{under}")
    lines.append(f"roofline step {rf['step_s'] * 1e3:.1f} ms ({rf['bound']}-bound: compute "
                 f"{rf['compute_s'] * 1e3:.1f} ms, HBM {rf['memory_s'] * 1e3:.1f} ms), "
                 f"MFU bound {100 * rf['mfu']:.1f}%")
    coll = report["programs"]["train"]["collectives"]
    lines.append("train collectives/step: " + ", ".join(
        f"{k} {v['count']}x {v['bytes'] / GiB:.2f} GiB" for k, v in coll.items() if v["count"]))
  for n in report["notes"]:
    lines.append(f"note: {n}")
  return "\n".join(lines)
