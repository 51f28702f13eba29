"""`vidrial compile`: renders and compiles kernel configs for a named arch (no GPU needed) and prints ptxas's facts.

    vidrial compile --arch sm_90 --space corners      # every family's defaults and corner configs
    vidrial compile --arch sm_90 --kernel discumsum   # one family's default configs

One row per (config, arch): registers, spill bytes, shared memory, compile seconds. Rows of spilling configs
are marked and counted in the summary's problems; the exit status is non-zero when a config fails to compile
or a default config spills (a spilling corner or search-space config is only reported: the tuner drops it).
Cubins are cached (VIDRIAL_CACHE_DIR), so a second run takes seconds.
"""
from __future__ import annotations

import argparse
import sys
import time

from vidrial.core.arch import gpu_available, normalize_arch
from vidrial.core.compile import CompiledKernel, compile_many
from vidrial.core.errors import CompileError, ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compile", help="compile kernels for an arch (no GPU needed) and print their resource use",
                       description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", action="append", default=None,
                   help="target such as sm_80 or sm_90 (repeatable; default: sm_80 and sm_90)")
    p.add_argument("--kernel", action="append", default=None, help="kernel family (repeatable; default: all)")
    p.add_argument("--space", choices=("default", "corners", "all"), default="default",
                   help="default configs, plus corner configs, or the whole search space")
    p.add_argument("--workers", type=int, default=None, help="parallel compile processes (default: CPU count)")
    p.add_argument("--limit-keys", type=int, default=None, help="only the first N standard keys per family")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    p.set_defaults(func=run)


def _configs(family, key, space: str, arch: str) -> list[tuple[object, bool]]:
    """(config, is_default) pairs for one key on `arch` (whose default may be another implementation,
    e.g. the wgmma kernel on sm_90); duplicates removed, order kept."""
    default = family.default_config_for(key, arch)
    out = [(default, True)]
    if space in ("corners", "all"):
        out += [(c, False) for c in family.corner_configs(key)]
    if space == "all":
        from vidrial.tuning.search_space import load_search_space

        out += [(c, False) for c in load_search_space(family.name).valid_configs(key)]
    seen, unique = set(), []
    for cfg, is_default in out:
        if cfg not in seen:
            seen.add(cfg)
            unique.append((cfg, is_default))
    return unique


def _show_progress(asked: bool | None) -> bool:
    """--progress / --no-progress, else a bar only on a terminal (logs and captured output stay clean)."""
    return sys.stderr.isatty() if asked is None else asked


def _compile_with_progress(jobs: list, workers: int | None, progress: bool) -> list:
    """compile_many with a tqdm bar on stderr that moves as each compile finishes (cache hits at once)."""
    from tqdm import tqdm

    with tqdm(total=len(jobs), desc="compiling", unit="kernel", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        return compile_many(jobs, workers=workers, on_done=lambda _i, _res: bar.update(1))


def run(args: argparse.Namespace) -> int:
    from vidrial.kernels import families, get_family

    archs = [normalize_arch(a) for a in (args.arch or ["sm_80", "sm_90"])]
    fams = [get_family(k) for k in args.kernel] if args.kernel else list(families().values())
    jobs, rows = [], []
    failures = 0
    for fam in fams:
        keys = fam.standard_keys()[: args.limit_keys] if args.limit_keys else fam.standard_keys()
        for key in keys:
            for arch in archs:
                for config, is_default in _configs(fam, key, args.space, arch):
                    try:
                        fam.check(key, config, arch)
                    except ConfigError as exc:
                        rows.append((fam.name, arch, key.label(), config.label(), None, f"invalid: {exc}", is_default))
                        failures += is_default
                        continue
                    jobs.append((fam.render(key, config), fam.target_arch(config, arch), (),
                                 f"{fam.name}: {key.label()} | {config.label()}"))
                    rows.append((fam.name, fam.target_arch(config, arch), key.label(), config.label(), len(jobs) - 1,
                                 fam.dynamic_smem_bytes(key, config), is_default))
    started = time.perf_counter()
    results = _compile_with_progress(jobs, args.workers, _show_progress(args.progress))
    wall = time.perf_counter() - started
    spills = 0
    print(f"{'kernel':<24} {'arch':<6} {'regs':>4} {'spill':>6} {'smem':>7} {'sec':>6}  key | config"
          "   (smem = static + dynamic bytes)")
    for name, arch, key_label, cfg_label, idx, note_or_smem, is_default in rows:
        if idx is None:
            print(f"{name:<24} {arch:<6} {'-':>4} {'-':>6} {'-':>7} {'-':>6}  {key_label} | {cfg_label}  [{note_or_smem}]")
            continue
        res = results[idx]
        if isinstance(res, CompileError):
            failures += 1
            print(f"{name:<24} {arch:<6} FAILED  {key_label} | {cfg_label}\n{str(res)[:4000]}")
            continue
        assert isinstance(res, CompiledKernel)
        f = res.facts
        spill = f.spill_store_bytes + f.spill_load_bytes
        flag = ""
        if spill and is_default:
            failures += 1
            flag = "  [DEFAULT CONFIG SPILLS]"
        elif spill:  # slow, not broken: the tuner drops it; reported so a template change that spills is seen
            spills += 1
            flag = "  [SPILLS]"
        if not f.reported:
            flag += "  [no ptxas resource report: registers/spills unknown]"
        cached = " (cached)" if res.cached else ""
        smem = f.static_smem_bytes + note_or_smem
        regs = f.registers if f.reported else "?"
        print(f"{name:<24} {arch:<6} {regs:>4} {spill:>6} {smem:>7} "
              f"{res.seconds:>6.2f}  {key_label} | {cfg_label}{flag}{cached}")
    detail = f": {failures} error(s), {spills} spilling non-default config(s)" if failures or spills else ""
    print(f"\n{len(jobs)} compiles in {wall:.1f} s, {failures + spills} problem(s){detail}.")
    if not gpu_available():
        print("No GPU here: compiled and checked only. Correctness tests, tuning (vidrial tune) and "
              "benchmarks (vidrial bench) need a CUDA GPU.")
    return 1 if failures else 0
