"""`vidrial` command line. Each subcommand lives in vidrial/commands/<name>.py and
provides `add_parser(subparsers)` (which sets `func` on its parser)."""
from __future__ import annotations

import argparse
import importlib
import sys

from vidrial.core.errors import InputError, MissingExtraError, VidrialError

SUBCOMMANDS = ("compile", "tune", "show", "bench", "ship", "cache")
# what `vidrial --help` says (the module docstring is for readers of this file)
DESCRIPTION = ("vidrial: generates, compiles, autotunes and dispatches GPU kernels (power retention). "
               "Compiling needs no GPU; tuning and benchmarks need a CUDA GPU, and tuning the [tune] extra.")
EPILOG = "Run `vidrial <command> --help` for a command's options. Docs: README.md and docs/ in the repository."


def version() -> str:
    """The installed distribution's version, else the package's (a source checkout)."""
    from importlib import metadata

    try:
        return metadata.version("vidrial")
    except metadata.PackageNotFoundError:
        import vidrial

        return getattr(vidrial, "__version__", "unknown")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidrial", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"vidrial {version()}")
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


def _flag(parser: argparse.ArgumentParser, command: str, argument: str) -> str:
    """The command-line spelling of the argument an InputError names: the API's `tuned_dir` is the
    CLI's `--tuned-dir` (the option whose dest it is); names of no option stay as they are."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            for option in action.choices[command]._actions:
                if option.dest == argument and option.option_strings:
                    return max(option.option_strings, key=len)
    return argument


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MissingExtraError as exc:  # a light install asked for the tuner (or another extra): what to install
        print(f"vidrial {args.command}: {exc}", file=sys.stderr)
        return 2
    except InputError as exc:  # a person's mistake: one line naming the argument, no traceback
        flag = _flag(parser, args.command, exc.argument)
        print(f"vidrial {args.command}: {flag}: got {exc.given}; expected {exc.allowed}", file=sys.stderr)
        return 2
    except VidrialError as exc:  # toolchain / compile / launch problems: their message is the report
        print(f"vidrial {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
