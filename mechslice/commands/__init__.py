"""CLI subcommands: each module defines `register(subparsers)`, which adds its parser with `func=run`."""
