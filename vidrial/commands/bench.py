"""`vidrial bench`: vidrial vs retention (Triton), PyTorch SDPA and fla's GLA, on the current GPU.

    vidrial bench                          # --preset standard (< 8 min on an H200)
    vidrial bench --preset quick           # < 2 min
    vidrial bench --only fwd --only decode --out results/
    vidrial bench --from-json results/bench.json --out docs/bench --readme README.md
                                           # redraw tables and plots from a saved run (no GPU) and
                                           # write README's results block

Forward, forward+backward (context sweep t = 1k..64k at 65536 tokens per batch, shapes A and B of
docs/BENCHMARKS.md) and decode (b = 1, 8, 64). Correctness check of vidrial before timing; CUDA events,
L2 flush, warm-up, medians over several input sets; device ceilings measured in the same run.
Writes bench.json, bench.md and PNG plots under --out; prints the table.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

KIND_CHOICES = ("fwd", "fwd_bwd", "decode")
PRESET_CHOICES = ("standard", "quick")
PEER_CHOICES = ("retention", "sdpa", "gla")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bench", help="benchmark vidrial against its peers on this GPU",
                                   description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--preset", choices=PRESET_CHOICES, default="standard",
                        help="standard (full sweep, 3 input sets) or quick (3 context lengths, 2 sets)")
    parser.add_argument("--out", metavar="DIR", default="bench-results",
                        help="output folder for bench.json, bench.md and the plots (default: bench-results)")
    parser.add_argument("--only", choices=KIND_CHOICES, action="append", default=None, metavar="KIND",
                        help="run only this kind (fwd, fwd_bwd, decode); repeatable")
    parser.add_argument("--skip-peer", choices=PEER_CHOICES, action="append", default=None, metavar="PEER",
                        help="leave out a peer (retention, sdpa, gla); repeatable")
    parser.add_argument("--autotune-configs", type=int, default=None, metavar="N",
                        help="Triton autotune configs kept per peer kernel (default: the preset's; "
                             "0 keeps all, which for retention takes minutes)")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="soft time budget; cases started after it are reported as skipped "
                             "(default: the preset's; 0 = none)")
    parser.add_argument("--from-json", metavar="FILE", default=None,
                        help="do not run: redraw the table, markdown and plots from a saved bench.json")
    parser.add_argument("--readme", metavar="FILE", default=None,
                        help="also write the results block (tables, plots, GPU, date) into FILE between "
                             "the bench markers (e.g. README.md)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: when stderr is a terminal)")
    parser.set_defaults(func=run)
    return parser


def kinds_of(only: list[str] | None) -> tuple[str, ...]:
    if not only:
        return KIND_CHOICES
    return tuple(k for k in KIND_CHOICES if k in only)


def run(args: argparse.Namespace) -> int:
    from vidrial.bench import report
    from vidrial.core.paths import check_folder_argument

    check_folder_argument("out", args.out)  # before a run: its results would have nowhere to go
    if args.from_json:
        doc = report.load_json(args.from_json, argument="from_json")
        out = report.write_all(doc, args.out)
        print(report.text_report(doc))
        _print_outputs(out, args.readme and report.update_readme(args.readme, doc, out["plots"]))
        return 0

    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception as exc:
        print(f"vidrial bench: torch is not importable ({exc})", file=sys.stderr)
        return 2
    if not has_gpu:
        print("vidrial bench: no CUDA device (torch.cuda.is_available() is False); run it on the GPU machine, "
              "or use --from-json to redraw a saved run", file=sys.stderr)
        return 2

    from vidrial.bench.cases import PRESETS
    from vidrial.bench.runner import run as run_bench

    preset = PRESETS[args.preset]
    doc = run_bench(preset, kinds_of(args.only), autotune_configs=args.autotune_configs,
                    skip_peers=tuple(args.skip_peer or ()), budget_s=args.budget,
                    on_progress=lambda d: report.write_json(d, args.out), progress=args.progress)
    out = report.write_all(doc, args.out)
    print()
    print(report.text_report(doc))
    _print_outputs(out, args.readme and report.update_readme(args.readme, doc, out["plots"]))
    bad = [r for r in doc["results"] if r.get("impl") == "vidrial" and r.get("status") == "check failed"]
    return 1 if bad else 0


def _print_outputs(out: dict[str, Any], readme: Any = None) -> None:
    print(f"\nwrote {out['json']} and {out['markdown']}"
          + "".join(f", {p}" for p in out["plots"]) + (f"; updated {readme}" if readme else ""))
    if out.get("plot_note"):
        print(out["plot_note"])
