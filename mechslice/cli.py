"""`mechslice` command line: one subcommand per module in `mechslice.commands`.

Conventions every subcommand follows: `--model` (default the embedded model), `--device`, `--json` for one JSON
object on stdout, exit 0 on success, exit 2 with one `error: ...` line on stderr for bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import sys
import warnings
from collections.abc import Iterator
from typing import NoReturn

from mechslice import commands, distributed
from mechslice.errors import MechsliceError


class _Parser(argparse.ArgumentParser):
    """argparse whose own errors (a bad number, an unknown choice) are ours: one `error:` line, exit 2, no usage."""

    def error(self, message: str) -> NoReturn:
        raise MechsliceError(f"{message}; see `{self.prog} --help`")


def _show_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
    """A Python warning as one `warning: ...` line on stderr, without its source line."""
    print(f"warning: {message}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """The parser with every subcommand found in `mechslice.commands` (each built as a `_Parser` too)."""
    parser = _Parser(prog="mechslice", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Discovered rather than listed so that adding a command is adding one module, with no shared list to edit.
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; map bad input to `error: ...` on stderr and exit code 2.

    Under torchrun (WORLD_SIZE > 1) it joins the process group first and leaves it at the end; only rank 0
    prints results on stdout (errors still go to every rank's stderr).
    """
    previous, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        args = build_parser().parse_args(argv)
        with _one_process_group(), _stdout_on_rank0():
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
    finally:
        warnings.showwarning = previous  # an in-process caller (a notebook, a test) keeps its own handler


@contextlib.contextmanager
def _one_process_group() -> Iterator[None]:
    """The torchrun process group around a command, destroyed when this call created it."""
    created = distributed.launched() and not distributed.active()
    distributed.init_from_env()
    try:
        yield
    except BaseException:
        if created:  # no final barrier: the other ranks may be waiting at a collective this one never reaches
            distributed.shutdown(wait=False)
        raise
    if created:
        distributed.shutdown()


@contextlib.contextmanager
def _stdout_on_rank0() -> Iterator[None]:
    """stdout as is on rank 0; discarded on the other ranks, which compute the same results."""
    if distributed.is_main():
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


if __name__ == "__main__":
    sys.exit(main())
