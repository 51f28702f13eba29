"""`vidrial` command line. Each subcommand lives in vidrial/commands/<name>.py and
provides `add_parser(subparsers)` (which sets `func` on its parser)."""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("compile", "tune", "show", "bench", "ship", "cache")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidrial", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"vidrial.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"vidrial.commands.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
