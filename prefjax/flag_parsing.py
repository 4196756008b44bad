"""absl flag parsing whose errors (e.g. an unknown --config key) are one line on stderr."""
from __future__ import annotations

import sys

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
  """Flag parsing that reports errors (e.g. an unknown --config key) in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections raises these for an override of a key the (locked) config lacks.
    bad = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    detail = str(e).encode().decode("unicode_escape").replace("\n", " ")
    detail = detail.replace("'", "").strip('" ')
    print(f"error: bad config override among {bad}: {detail}", file=sys.stderr)
  sys.exit(2)
