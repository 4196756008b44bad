"""prefjax.data: grain input pipelines for preference, unpaired, ranking and SFT data.

  make_pipeline(data_config, tokenizer, *, split="train", process_index=0, process_count=1,
                seed=0) -> Pipeline        # checkpointable iterator of LOCAL numpy batches
  batch_shapes(data_config, *, split="train", process_count=1) -> {key: (shape, dtype)}
  load_tokenizer(path_or_name) -> Tokenizer
  default_data_config() -> ConfigDict
  DataError                                # ValueError naming file, line and field

Batch layouts are documented in docs/internals.md.
"""
from prefjax.data.config import default_data_config
from prefjax.data.errors import DataError, DropStats
from prefjax.data.formats import Example, FORMATS, parse
from prefjax.data.index import build_index
from prefjax.data.pipeline import (Pipeline, PipelineInfo, batch_shapes, eval_names,
                                   make_pipeline)
from prefjax.data.templates import TEMPLATES, get_template
from prefjax.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "DataError", "DropStats", "Example", "FORMATS", "Pipeline", "PipelineInfo", "TEMPLATES",
    "Tokenizer", "batch_shapes", "build_index", "default_data_config", "eval_names", "get_template",
    "load_tokenizer", "make_pipeline", "parse",
]
