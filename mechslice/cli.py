"""`mechslice` command line: one subcommand per module in `mechslice.commands`.

Conventions every subcommand follows: `--model` (default the embedded model), `--device`, `--json` for one JSON
object on stdout, exit 0 on success, exit 2 with one `error: ...` line on stderr for bad input.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from mechslice import commands
from mechslice.errors import MechsliceError


def build_parser() -> argparse.ArgumentParser:
    """The parser with every subcommand found in `mechslice.commands`."""
    parser = argparse.ArgumentParser(prog="mechslice", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Discovered rather than listed so that adding a command is adding one module, with no shared list to edit.
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; map bad input to `error: ...` on stderr and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MechsliceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "error: interrupted; finished results are kept (rerun with --resume where offered)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
