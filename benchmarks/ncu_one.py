"""Runs one family config at shape A or B a few times (the launch to profile under ncu).

    ncu --kernel-name regex:update_state --launch-skip 2 --launch-count 1 --section SpeedOfLight \\
        python benchmarks/ncu_one.py update_state '{"impl":"wgmma","tile_m":128,"tile_k":64,"warps":4,"stages":5}' B
    ncu --kernel-name regex:update_state_bwd --launch-skip 2 --launch-count 1 --set full \\
        python benchmarks/ncu_one.py update_state_bwd '{"impl":"wgmma","warps":4,"stages":4}' A
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vidrial.kernels.power_retention.sympow import feature_dim  # noqa: E402

SHAPES = {"A": (1, 65536), "B": (8, 8192)}
H, D_HEAD, CHUNK = 8, 64, 1024


def _update_state(cfg: dict, b: int, t: int):
    from vidrial.kernels.power_retention.update_state import UpdateStateConfig, update_state

    K = (torch.randn(b, t, H, D_HEAD, device="cuda") / 8**0.5).to(torch.bfloat16)
    V = torch.randn(b, t, H, D_HEAD, device="cuda").to(torch.bfloat16)
    G = torch.nn.functional.logsigmoid(torch.randn(b, t, H, device="cuda") + 3.0)
    config = UpdateStateConfig(**cfg)
    return lambda: update_state(K, V, G, deg=2, d_tile=8, chunk_size=CHUNK, config=config)


def _update_state_bwd(cfg: dict, b: int, t: int):
    from vidrial.kernels.power_retention.update_state_bwd import UpdateStateBwdConfig, update_state_bwd

    n, D = t // CHUNK, feature_dim(D_HEAD, 2, 8)
    K = (torch.randn(b, t, H, D_HEAD, device="cuda") / 8**0.5).to(torch.bfloat16)
    V = torch.randn(b, t, H, D_HEAD, device="cuda").to(torch.bfloat16)
    G = torch.nn.functional.logsigmoid(torch.randn(b, t, H, device="cuda") + 3.0).view(b, n, CHUNK, H).cumsum(2)
    dS, ds = torch.randn(b, n, H, D, D_HEAD, device="cuda") * 0.1, torch.randn(b, n, H, D, device="cuda") * 0.1
    config = UpdateStateBwdConfig(**cfg)
    return lambda: update_state_bwd(K, V, G.view(b, t, H), dS, ds, deg=2, d_tile=8, chunk_size=CHUNK, config=config)


def _query_state_bwd(cfg: dict, b: int, t: int):
    from vidrial.kernels.power_retention.query_state_bwd import QueryStateBwdConfig, query_state_bwd_rows

    n, D = t // CHUNK, feature_dim(D_HEAD, 2, 8)
    Q, Y, dY = (torch.randn(b, t, H, D_HEAD, device="cuda").to(torch.bfloat16) for _ in range(3))
    G = torch.nn.functional.logsigmoid(torch.randn(b, t, H, device="cuda") + 3.0).view(b, n, CHUNK, H).cumsum(2)
    Sb16, sb = torch.randn(b, n, H, D, D_HEAD, device="cuda").bfloat16(), torch.rand(b, n, H, D, device="cuda")
    O, l, m = torch.randn(b, t, H, D_HEAD, device="cuda"), torch.rand(b, t, H, device="cuda") + 1, torch.randn(b, t, H, device="cuda")
    config = QueryStateBwdConfig(**cfg)
    return lambda: query_state_bwd_rows(Q, G.view(b, t, H), Sb16, sb, O, l, m, Y, dY, deg=2, d_tile=8,
                                        scale=D_HEAD ** -0.5, chunk_size=CHUNK, config=config)


RUNNERS = {"update_state": _update_state, "update_state_bwd": _update_state_bwd, "query_state_bwd": _query_state_bwd}


def main() -> int:
    family, config, shape = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    run = RUNNERS[family](config, *SHAPES[shape])
    for _ in range(4):
        run()
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
