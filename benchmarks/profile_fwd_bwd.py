"""Profiling target: one forward+backward of vidrial.power_retention at a benchmark shape, for Nsight
Compute. The first iteration compiles and loads every kernel; only the second runs between
cudaProfilerStart/Stop, so `ncu --profile-from-start off` sees each kernel exactly once.

    ncu --clock-control none --profile-from-start off --set full -o $OUT/bwd \
        python3 benchmarks/profile_fwd_bwd.py --shape A
(benchmarks/h200_session.sh profile does this and writes a text summary.)"""
from __future__ import annotations

import argparse

import torch

SHAPES = {
    "A": dict(b=1, t=65536, h=8, d=64, p=2, chunk=1024),
    "B": dict(b=8, t=8192, h=8, d=64, p=2, chunk=1024),
}


def main(argv: list[str] | None = None) -> None:
    import vidrial

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="A")
    args = ap.parse_args(argv)
    s = SHAPES[args.shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (s["b"], s["t"], s["h"], s["d"])
    Q, K, V = (torch.randn(shape, device="cuda", generator=g).bfloat16().requires_grad_() for _ in range(3))
    log_G = torch.nn.functional.logsigmoid(torch.randn(shape[:3], device="cuda", generator=g) + 4.0).requires_grad_()
    dY = torch.randn(shape, device="cuda", generator=g).bfloat16()

    def step() -> None:
        Y = vidrial.power_retention(Q, K, V, log_G, deg=s["p"], chunk_size=s["chunk"])
        Y.backward(dY)

    step()  # compile, load, allocate
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"profiled one forward+backward at shape {args.shape}: {s}")


if __name__ == "__main__":
    main()
