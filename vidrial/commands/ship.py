"""`vidrial ship`: copy a tuning run's winners into the shipped tuned configs.

    vidrial ship OUT/tuned                         # into the repository's tuned_configs/
    vidrial ship OUT/tuned --into ~/my_configs     # or any tuned-config folder

Every `<gpu>/<family>.json` entry under the source replaces the destination's entry for the same
key (the run being shipped is the newer measurement); other keys are kept. Locked, atomic writes.
A file whose content names another family or GPU than its path is refused, before anything is
written (the path decides where dispatch looks an entry up).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("ship", help="merge a tuning run's winners into the shipped tuned configs",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="tuned-config folder of a tuning run (vidrial tune --tuned-dir)")
    # dest: store.merge's argument, so that its errors name --into
    parser.add_argument("--into", dest="destination", metavar="DIR", type=Path, default=None,
                        help="destination tuned-config folder (default: the shipped tuned_configs/)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from vidrial.core.errors import InputError
    from vidrial.dispatch import store

    if not args.source.is_dir() or not store.tuned_files(args.source):
        raise InputError("source", str(args.source), "a folder holding <gpu>/<family>.json tuned files")
    into = args.destination if args.destination is not None else store.shipped_tuned_dir()
    if into is None:
        raise InputError("destination", None, "a destination folder (this install has no shipped tuned_configs/)")
    counts = store.merge(args.source, into)
    print(f"{counts['files']} files into {into}: {counts['added']} entries added, {counts['replaced']} replaced")
    return 0
