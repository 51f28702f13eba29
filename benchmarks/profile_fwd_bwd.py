"""Profiling target: one forward+backward of vidrial.power_retention at a benchmark shape, for Nsight
Compute. The first iteration compiles and loads every kernel; only the second runs between
cudaProfilerStart/Stop, so `ncu --profile-from-start off` sees each kernel exactly once.

    ncu --clock-control none --profile-from-start off --set full -o $OUT/bwd \
        python3 benchmarks/profile_fwd_bwd.py --shape A
(benchmarks/h200_session.sh profile does this and writes a text summary.)

    python3 benchmarks/profile_fwd_bwd.py --shape A --torch-profiler
prints instead a table of every GPU kernel of a few forward+backward steps (torch.profiler), the
vidrial kernels and torch's glue (casts, sums, einsums) side by side, with each one's share."""
from __future__ import annotations

import argparse

import torch
from bench_fwd_bwd import SHAPES  # this script's folder is on sys.path when it runs


def kernel_table(step, steps: int = 5, rows: int = 40) -> None:
    """Per-kernel GPU time of `steps` calls of step(), averaged per step, largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            times.setdefault(ev.name, []).append(ev.time_range.elapsed_us())
    total = sum(sum(v) for v in times.values()) / steps / 1e3
    print(f"GPU kernel time per step: {total:.3f} ms ({len(times)} kernels)")
    print(f"{'ms/step':>9} {'share':>6} {'calls':>6}  kernel")
    for name, v in sorted(times.items(), key=lambda kv: -sum(kv[1]))[:rows]:
        ms = sum(v) / steps / 1e3
        print(f"{ms:>9.3f} {100 * ms / total:>5.1f}% {len(v) // steps:>6}  {name[:110]}")


def main(argv: list[str] | None = None) -> None:
    import vidrial

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="A")
    ap.add_argument("--torch-profiler", action="store_true", help="print a per-kernel table (no Nsight)")
    args = ap.parse_args(argv)
    s = SHAPES[args.shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (s["b"], s["t"], s["h"], s["d"])
    Q, K, V = (torch.randn(shape, device="cuda", generator=g).bfloat16().requires_grad_() for _ in range(3))
    log_G = torch.nn.functional.logsigmoid(torch.randn(shape[:3], device="cuda", generator=g) + 4.0).requires_grad_()
    dY = torch.randn(shape, device="cuda", generator=g).bfloat16()

    def step() -> None:
        for x in (Q, K, V, log_G):
            x.grad = None  # else the table also counts autograd's gradient accumulation
        Y = vidrial.power_retention(Q, K, V, log_G, deg=s["p"], chunk_size=s["chunk"])
        Y.backward(dY)

    step()  # compile, load, allocate
    torch.cuda.synchronize()
    if args.torch_profiler:
        print(f"shape {args.shape}: {s}")
        kernel_table(step)
        return
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"profiled one forward+backward at shape {args.shape}: {s}")


if __name__ == "__main__":
    main()
