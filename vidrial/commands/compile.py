"""`vidrial compile`: compile kernel configs for a named arch (no GPU needed) and report
ptxas facts. Exits non-zero when any config fails to compile or a default config spills."""
from __future__ import annotations

import argparse
import time

from vidrial.core.arch import gpu_available, normalize_arch
from vidrial.core.compile import CompiledKernel, compile_many
from vidrial.core.errors import CompileError, ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compile", help="compile kernels for an arch (no GPU needed) and print their resource use")
    p.add_argument("--arch", action="append", default=None,
                   help="target such as sm_80 or sm_90 (repeatable; default: sm_80 and sm_90)")
    p.add_argument("--kernel", action="append", default=None, help="kernel family (repeatable; default: all)")
    p.add_argument("--space", choices=("default", "corners", "all"), default="default",
                   help="default configs, plus corner configs, or the whole search space")
    p.add_argument("--workers", type=int, default=None, help="parallel compile processes (default: CPU count)")
    p.add_argument("--limit-keys", type=int, default=None, help="only the first N standard keys per family")
    p.set_defaults(func=run)


def _configs(family, key, space: str) -> list[tuple[object, bool]]:
    """(config, is_default) pairs for one key; duplicates removed, order kept."""
    default = family.default_config(key)
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


def run(args: argparse.Namespace) -> int:
    from vidrial.kernels import families, get_family

    archs = [normalize_arch(a) for a in (args.arch or ["sm_80", "sm_90"])]
    fams = [get_family(k) for k in args.kernel] if args.kernel else list(families().values())
    jobs, rows = [], []
    failures = 0
    for fam in fams:
        keys = fam.standard_keys()[: args.limit_keys] if args.limit_keys else fam.standard_keys()
        for key in keys:
            for config, is_default in _configs(fam, key, args.space):
                for arch in archs:
                    try:
                        fam.check(key, config, arch)
                    except ConfigError as exc:
                        rows.append((fam.name, arch, key.label(), config.label(), None, f"invalid: {exc}", is_default))
                        failures += is_default
                        continue
                    jobs.append((fam.render(key, config), arch, (), f"{fam.name}: {key.label()} | {config.label()}"))
                    rows.append((fam.name, arch, key.label(), config.label(), len(jobs) - 1,
                                 fam.dynamic_smem_bytes(key, config), is_default))
    started = time.perf_counter()
    results = compile_many(jobs, workers=args.workers)
    wall = time.perf_counter() - started
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
        if not f.reported:
            flag += "  [no ptxas resource report: registers/spills unknown]"
        cached = " (cached)" if res.cached else ""
        smem = f.static_smem_bytes + note_or_smem
        regs = f.registers if f.reported else "?"
        print(f"{name:<24} {arch:<6} {regs:>4} {spill:>6} {smem:>7} "
              f"{res.seconds:>6.2f}  {key_label} | {cfg_label}{flag}{cached}")
    print(f"\n{len(jobs)} compiles in {wall:.1f} s, {failures} problem(s).")
    if not gpu_available():
        print("No GPU here: compiled and checked only. Correctness tests, tuning (vidrial tune) and "
              "benchmarks (vidrial bench) need a CUDA GPU.")
    return 1 if failures else 0
