"""`vidrial cache`: where the compiled-cubin cache is, how big, and emptying it.

    vidrial cache          # = vidrial cache info: folder, entry count, size and its bound
    vidrial cache clear    # remove every cached cubin (nothing else in the folder)

The cache is bounded by VIDRIAL_CACHE_MAX_MB (default 2048): the least recently used entries go first.
"""
from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("cache", help="show or clear the compiled-cubin cache",
                                   description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("action", nargs="?", choices=("info", "clear"), default="info",
                        help="info (default): folder, entries and size; clear: remove the cached cubins")
    parser.set_defaults(func=run)
    return parser


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def run(args: argparse.Namespace) -> int:
    from vidrial.core import compile as compiling

    where = compiling.cubin_cache_dir()
    if args.action == "clear":
        removed = compiling.clear_cache()
        print(f"removed {removed['entries']} entries ({_mib(removed['bytes'])}) from {where}")
        return 0
    stats = compiling.cache_stats()
    print(f"cubin cache: {where}\n{stats['entries']} entries, {_mib(stats['bytes'])} "
          f"(limit {_mib(compiling.cache_limit_bytes())}, VIDRIAL_CACHE_MAX_MB; VIDRIAL_CACHE_DIR moves it)")
    return 0
