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


def config_value(holder) -> object:
  """The `--config` flag's ConfigDict (None when not given); a file that cannot be loaded
  (missing, or raising in `get_config`) is one line on stderr and exit status 2."""
  try:
    value = holder.value
    if value is not None:
      value.get("task")  # a config file that failed to load raises on first use
    return value
  except OSError as e:
    spec = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "?")
    cause = str(e.__cause__ or e).strip().splitlines()
    print(f"error: cannot load --config={spec}: {cause[-1].strip() if cause else e}",
          file=sys.stderr)
    sys.exit(2)

