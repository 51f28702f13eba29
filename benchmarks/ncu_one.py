"""Runs one family config at shape A or B a few times (the launch to profile under ncu).

    ncu --kernel-name regex:update_state --launch-skip 2 --launch-count 1 --section SpeedOfLight \\
        python benchmarks/ncu_one.py update_state '{"impl":"wgmma","tile_m":128,"tile_k":64,"warps":4,"stages":5}' B
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vidrial.kernels.power_retention.update_state import UpdateStateConfig, update_state  # noqa: E402

SHAPES = {"A": (1, 65536), "B": (8, 8192)}


def main() -> int:
    family, config, shape = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    assert family == "update_state", "only update_state so far"
    b, t = SHAPES[shape]
    K = (torch.randn(b, t, 8, 64, device="cuda") / 8**0.5).to(torch.bfloat16)
    V = torch.randn(b, t, 8, 64, device="cuda").to(torch.bfloat16)
    G = torch.nn.functional.logsigmoid(torch.randn(b, t, 8, device="cuda") + 3.0)
    cfg = UpdateStateConfig(**config)
    for _ in range(4):
        update_state(K, V, G, deg=2, d_tile=8, chunk_size=1024, config=cfg)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
