"""Context parallelism (vidrial.parallel) on the CPU: a sequence split along time across 1-4 gloo ranks gives
the single-device float64 result, values and gradients (Q, K, V, log_G, initial_state / sum_of_keys), with
segments of unequal length that are not multiples of the chunk size; and clear errors."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vidrial.core.errors import InputError
from vidrial.parallel import power_retention_context_parallel
from vidrial.reference.forward import power_retention_reference

from vidrial.kernels.power_retention.sympow import default_d_tile, feature_dim

B, HQ, H, D_HEAD, DEG, CHUNK, T = 1, 2, 1, 16, 2, 8, 45
# segment boundaries per world size: on chunk multiples (the chunks are the single device's: equal to
# rounding), and anywhere (other chunk boundaries: the denominators' 1e-6 terms differ, ~1e-6 relative)
ALIGNED = {1: [0, T], 2: [0, 24, T], 3: [0, 8, 32, T], 4: [0, 8, 16, 40, T]}
ANYWHERE = {2: [0, 19, T], 3: [0, 7, 20, T], 4: [0, 7, 20, 33, T]}
D = feature_dim(D_HEAD, DEG, default_d_tile(D_HEAD, DEG))  # 192: two tiles of 8
# name -> (world, gating, state, bounds, tol)
SCENARIOS = {
    "aligned-1": (1, True, True, ALIGNED[1], 1e-9),
    "aligned-2": (2, True, False, ALIGNED[2], 1e-9),
    "aligned-3": (3, False, True, ALIGNED[3], 1e-9),
    "aligned-4": (4, True, True, ALIGNED[4], 1e-9),
    "anywhere-3": (3, True, True, ANYWHERE[3], 2e-5),
}


def _full_inputs(gating: bool, state: bool):
    g = torch.Generator().manual_seed(11)
    dt = torch.float64
    Q = torch.randn(B, T, HQ, D_HEAD, generator=g, dtype=dt)
    K = torch.randn(B, T, H, D_HEAD, generator=g, dtype=dt) / 2
    V = torch.randn(B, T, H, D_HEAD, generator=g, dtype=dt)
    G = torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=g, dtype=dt) + 2) if gating else None
    S0 = torch.rand(B, H, D, D_HEAD, generator=g, dtype=dt) if state else None
    s0 = torch.rand(B, H, D, generator=g, dtype=dt) + 1 if state else None
    W = torch.randn(B, T, HQ, D_HEAD, generator=g, dtype=dt)  # the loss weights: loss = sum(Y * W)
    WS = torch.randn(B, H, D, D_HEAD, generator=g, dtype=dt)  # ... + sum(S_final * WS) on the last rank
    return Q, K, V, G, S0, s0, W, WS


def _leaves(*xs):
    return [x.clone().requires_grad_(True) if x is not None else None for x in xs]


def _worker(rank: int, world: int, store: str, out_dir: str, gating: bool, state: bool, bounds: list[int]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        Q, K, V, G, S0, s0, W, WS = _full_inputs(gating, state)
        lo, hi = bounds[rank], bounds[rank + 1]
        seg = [x[:, lo:hi] if x is not None else None for x in (Q, K, V, G, W)]
        q, k, v, gg, S0l, s0l = _leaves(*seg[:4], S0, s0)
        Y, S_end, s_end = power_retention_context_parallel(q, k, v, gg, S0l, s0l, True, deg=DEG, chunk_size=CHUNK,
                                                           backend="reference")
        loss = (Y * seg[4]).sum()
        if rank == world - 1:
            loss = loss + (S_end * WS).sum() + s_end.sum()
        loss.backward()
        grads = {n: (x.grad if x is not None else None) for n, x in zip("QKVG", (q, k, v, gg))}
        grads.update(S0=S0l.grad if S0l is not None else None, s0=s0l.grad if s0l is not None else None)
        torch.save({"Y": Y.detach(), "S_end": S_end.detach(), "s_end": s_end.detach(), **grads},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _every_scenario(rank: int, out_dir: str) -> None:
    """Rank `rank` of every scenario whose world has it, in order: one default process group at a time, each
    scenario's own (its own file store, world size and output folder)."""
    for name, (world, gating, state, bounds, _) in SCENARIOS.items():
        if rank < world:
            folder = os.path.join(out_dir, name)
            _worker(rank, world, os.path.join(folder, "store"), folder, gating, state, bounds)


def _run_every_scenario(out: Path) -> None:
    for name in SCENARIOS:
        (out / name).mkdir()
    mp.spawn(_every_scenario, args=(str(out),), nprocs=max(w for w, *_ in SCENARIOS.values()), join=True)


@pytest.fixture(scope="module")
def ranks_ran(tmp_path_factory) -> Path:
    """Every scenario's ranks, run by one spawn of max(world) processes (a spawned rank imports torch:
    seconds each, 13 of them when each scenario spawned its own), once per run (tests/run_once.py)."""
    from run_once import once

    return once(tmp_path_factory, "context-parallel", _run_every_scenario)


def _single_device(gating: bool, state: bool):
    Q, K, V, G, S0, s0, W, WS = _full_inputs(gating, state)
    q, k, v, gg, S0l, s0l = _leaves(Q, K, V, G, S0, s0)
    Y, S_f, s_f = power_retention_reference(q, k, v, gg, S0l, s0l, True, deg=DEG, chunk_size=CHUNK)
    ((Y * W).sum() + (S_f * WS).sum() + s_f.sum()).backward()
    grads = {n: (x.grad if x is not None else None) for n, x in zip("QKVG", (q, k, v, gg))}
    grads.update(S0=S0l.grad if S0l is not None else None, s0=s0l.grad if s0l is not None else None)
    return Y.detach(), S_f.detach(), s_f.detach(), grads


def _check(folder: Path, world, gating, state, bounds, tol):
    parts = [torch.load(folder / f"rank{r}.pt") for r in range(world)]
    Y, S_f, s_f, grads = _single_device(gating, state)
    close = dict(rtol=tol, atol=tol)
    torch.testing.assert_close(torch.cat([p["Y"] for p in parts], 1), Y, **close)
    torch.testing.assert_close(parts[-1]["S_end"], S_f, **close)
    torch.testing.assert_close(parts[-1]["s_end"], s_f, **close)
    for name in "QKVG":
        if grads[name] is not None:
            torch.testing.assert_close(torch.cat([p[name] for p in parts], 1), grads[name], **close, msg=f"d{name}")
    for name in ("S0", "s0"):
        if grads[name] is not None:  # every rank's use of the initial state adds to its gradient
            torch.testing.assert_close(sum(p[name] for p in parts), grads[name], **close, msg=name)


@pytest.mark.parametrize("world,gating,state", [(1, True, True), (2, True, False), (3, False, True),
                                                (4, True, True)])
def test_split_on_chunk_boundaries_equals_single_device(ranks_ran, world, gating, state):
    name = f"aligned-{world}"
    assert SCENARIOS[name][:4] == (world, gating, state, ALIGNED[world])
    _check(ranks_ran / name, *SCENARIOS[name])


@pytest.mark.parametrize("world", [3])
def test_split_anywhere_equals_single_device(ranks_ran, world):
    name = f"anywhere-{world}"
    assert SCENARIOS[name][:4] == (world, True, True, ANYWHERE[world])
    _check(ranks_ran / name, *SCENARIOS[name])


def test_errors_name_the_argument():
    Q, K, V, G, S0, s0, _, _ = _full_inputs(True, True)
    with pytest.raises(InputError, match="group.*init_process_group"):
        power_retention_context_parallel(Q, K, V, G, backend="reference")
    with pytest.raises(InputError, match="backend.*'reference', 'vidrial'"):
        power_retention_context_parallel(Q, K, V, G, backend="nccl")
