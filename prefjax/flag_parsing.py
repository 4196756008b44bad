"""absl flag parsing whose errors (e.g. an unknown --config key) are one line on stderr."""
from __future__ import annotations

import sys

from absl import flags


_HELP = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def parse_flags(argv: list[str]) -> list[str]:
  """Flag parsing that reports errors (e.g. an unknown --config key) in one line; `--help`
  prints the program's doc and flags and exits 0."""
  if any(a in _HELP for a in argv[1:]):
    main = sys.modules.get("__main__")
    print((getattr(main, "__doc__", None) or "").strip() + "\n")
    print(flags.FLAGS.get_help() if "--helpfull" in argv else flags.FLAGS.main_module_help())
    sys.exit(0)
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
