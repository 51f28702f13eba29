"""`vidrial tune`: tune kernel families on this machine's GPU(s) and store the winners.

    vidrial tune --kernel update_state --preset quick --trials 30
    vidrial tune --kernel all --preset standard --timeout 600 --gpus 0,1 --resume
    vidrial tune --kernel update_state --key '{"head_dim": 64}' --sampler grid --compare 10,20,40
    vidrial tune --keys keys.json --trials 20     # what `with vidrial.tuning.record("keys.json"):` recorded
"""
from __future__ import annotations

import argparse
import json
import sys


def _gpus(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gpus: got {text!r}; expected device indices such as 0 or 0,1,2") from None
    if not out:
        raise argparse.ArgumentTypeError("--gpus: expected at least one device index")
    return out


def _budgets(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--compare: got {text!r}; expected trial counts such as 10,20,40") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="autotune kernel configs on this GPU and store the winners",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", action="append", default=None,
                   help="kernel family name, or 'all' (repeatable; default: all)")
    p.add_argument("--preset", choices=("shapes", "standard", "quick"), default="standard",
                   help="problem keys: 'shapes' = what the standard shapes (A, B, decode; every d and p) "
                        "dispatch, 'standard' = those and the other variants (dtypes, ungated, chunk sizes), "
                        "'quick' = the first key only (default: standard)")
    p.add_argument("--key", action="append", default=None, metavar="JSON",
                   help="explicit problem key as a JSON object (repeatable; overrides --preset)")
    p.add_argument("--keys", dest="keys_file", metavar="FILE", default=None,
                   help="tune exactly the problem keys in FILE ({family: [keys]}, as vidrial.tuning.record "
                        "writes it; overrides --preset; with --kernel: only those families)")
    p.add_argument("--trials", type=int, default=40, help="trial budget per study (default: 40)")
    p.add_argument("--timeout", type=float, default=None, help="time budget per study in seconds")
    p.add_argument("--sampler", choices=("tpe", "gp", "grid", "random"), default="tpe",
                   help="tpe (default), gp, random, or grid (exhaustive over every valid config)")
    p.add_argument("--out", default="vidrial-tune", help="output dir: reports and the default journal storage")
    p.add_argument("--storage", default=None,
                   help="Optuna storage: a journal file path (default <out>/journal.log) or a URL (sqlite:///...)")
    p.add_argument("--resume", action="store_true", help="continue existing studies (default: start them over)")
    p.add_argument("--gpus", type=_gpus, default=(0,), help="device indices, one tuning process each (e.g. 0,1)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--job-timeout", type=float, default=120.0,
                   help="seconds one measurement may take before the config counts as hung (default 120)")
    p.add_argument("--leaders", type=int, default=3, help="leaders re-timed at the end (default 3)")
    p.add_argument("--tuned-dir", default=None,
                   help="tuned-config folder to write (default: $VIDRIAL_TUNED_DIR or the user cache)")
    p.add_argument("--no-record", action="store_true", help="do not write winners to the tuned-config store")
    p.add_argument("--skip-tuned", action="store_true",
                   help="skip keys that already have an exact entry for this GPU (shipped, user dir or --tuned-dir)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    p.add_argument("--compare", type=_budgets, default=None, metavar="N,N,...",
                   help="with --sampler grid: replay TPE/GP/random on the exhaustive results and report "
                        "their best after N trials against the exhaustive best")
    # dest: tune()'s argument, so that its errors name --space
    p.add_argument("--space", dest="space_path", metavar="TOML", default=None,
                   help="search-space TOML to use instead of search_spaces/<family>.toml")
    # test doubles (hidden): measurement backend and compile function as 'module:attr'
    p.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    p.add_argument("--compiler", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vidrial.core.errors import InputError, VidrialError
    from vidrial.tuning.tuner import tune

    kernels = args.kernel or ["all"]
    kernel = "all" if "all" in kernels else kernels
    keys = None
    if args.key:
        keys = []
        for text in args.key:
            try:
                keys.append(json.loads(text))
            except json.JSONDecodeError as exc:
                print(f"vidrial tune: --key {text!r} is not a JSON object ({exc})", file=sys.stderr)
                return 2
    if keys is not None and args.keys_file:
        print("vidrial tune: --key and --keys both give problem keys; use one", file=sys.stderr)
        return 2
    if args.compare and args.sampler != "grid":
        print("vidrial tune: --compare needs --sampler grid (the exhaustive results are the yardstick)",
              file=sys.stderr)
        return 2
    try:
        results = tune(kernel, keys, preset=args.preset, trials=args.trials, timeout=args.timeout,
                       sampler=args.sampler, out=args.out, storage=args.storage, resume=args.resume,
                       gpus=args.gpus, compare=args.compare, seed=args.seed, job_timeout_s=args.job_timeout,
                       leaders=args.leaders, tuned_dir=args.tuned_dir, record=not args.no_record,
                       progress=args.progress, space_path=args.space_path, skip_tuned=args.skip_tuned,
                       keys_file=args.keys_file,
                       **({"backend": args.backend} if args.backend else {}),
                       **({"compiler": args.compiler} if args.compiler else {}), on_result=_print_result)
    except KeyboardInterrupt:
        print("\nvidrial tune: interrupted; rerun the same command with --resume to continue", file=sys.stderr)
        return 130
    except InputError:
        raise  # vidrial.cli.main names the option it came from
    except (VidrialError, ValueError) as exc:
        print(f"vidrial tune: {exc}", file=sys.stderr)
        return 2
    if results:
        print(f"report: {args.out}/report.md")
    return 0 if all(r.winner is not None for r in results) else 1


def _print_result(r) -> None:
    """One line per study, as it ends (a run cut short by a time limit still shows what it finished)."""
    speed = f" ({r.speedup:.2f}x vs default {r.default_time_ms:.4g} ms)" if r.speedup else ""
    winner = " ".join(f"{k}={v}" for k, v in (r.winner or {}).items()) or "none"
    time_text = f"{r.time_ms:.4g} ms" if r.time_ms is not None else "-"
    how = "already tuned, in " if r.stopped_because == "already tuned" else "stored in "
    print(f"{r.family} {json.dumps(r.key)}: {winner} {time_text}{speed}; {r.trials} trials"
          f"{'; ' + how + r.store_path if r.store_path else ''}", flush=True)
