"""SASS instruction counts of a family's config (cuobjdump on the cubin vidrial compiled): checks the
Hopper kernels really issue HGMMA (not HMMA) and that nothing goes to local memory.

    python benchmarks/sass_of.py update_state '{"head_dim":64}' '{"impl":"wgmma","tile_m":128,"warps":4}' [--arch sm_90]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vidrial.kernels import get_family  # noqa: E402

WATCH = ("HGMMA", "HMMA", "LDSM", "LDS", "STS", "LDGSTS", "LDL", "STL", "BAR", "WARPGROUP", "SYNCS")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("family")
    ap.add_argument("key", help="problem key JSON")
    ap.add_argument("config", nargs="?", default=None, help="config JSON (default: the arch's default)")
    ap.add_argument("--arch", default="sm_90")
    args = ap.parse_args()
    fam = get_family(args.family)
    key = fam.Key.model_validate(json.loads(args.key))
    cfg = fam.Config.model_validate(json.loads(args.config)) if args.config else fam.default_config_for(key, args.arch)
    compiled = fam.compile(key, cfg, args.arch)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.cubin)
        f.flush()
        sass = ""
        for cmd in (["cuobjdump", "--dump-sass", f.name], ["nvdisasm", "-c", f.name]):
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode == 0 and res.stdout.strip():
                sass = res.stdout
                break
            print(f"{cmd[0]}: exit {res.returncode}: {res.stderr.strip()[:300]}")
        if not sass:
            return 1
    ops = Counter(m.group(1).split(".")[0] for m in re.finditer(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass))
    if not ops:  # nvdisasm's listing has no /*addr*/ prefixes
        ops = Counter(m.group(1).split(".")[0] for m in re.finditer(r"^\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass, re.M))
    print(f"{fam.name} {key.label()} | {cfg.label()} -> {compiled.arch}: {compiled.facts.registers} regs, "
          f"spills {compiled.facts.spill_store_bytes}/{compiled.facts.spill_load_bytes} B")
    print("  " + "  ".join(f"{op}={ops.get(op, 0)}" for op in WATCH))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
