"""Benchmark: issue 20's two targets, side by side in one run (CUDA events, L2 flushed, medians).

1. The layer's training step at shape B (b=8, t=8192, d_model=512, 8 heads of 64, p=2, chunk 1024, bf16,
   gated): `vidrial.nn.PowerRetention` forward+backward against the bare op's forward+backward plus its
   projection GEMMs (fused qkv, gate, output) timed alone; target: layer <= 1.05 x (op + projections),
   i.e. no hidden copies or casts.
2. Packed variable-length sequences: the op's forward+backward on 8 sequences of mixed lengths packed along
   t (65536 tokens, `cu_seqlens`) against the same tokens as 8 equal-length sequences (b=8, t=8192);
   target: packed <= 1.10 x equal.

    python benchmarks/bench_layer.py [--reps 20] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vidrial  # noqa: E402
from vidrial.tuning.measure import time_cuda  # noqa: E402

B, T, D_MODEL, HEADS, HEAD_DIM = 8, 8192, 512, 8, 64
LENGTHS = (12288, 4096, 9000, 1024, 16384, 520, 8192, 14032)  # 65536 tokens


def _step(fn, grads):
    """fn() -> output; one forward + backward with a fixed output gradient."""
    def run():
        out = fn()
        torch.autograd.backward(out, grads)
    return run


def layer_rows(reps: int) -> list[dict]:
    dev = "cuda"
    layer = vidrial.nn.PowerRetention(D_MODEL, HEADS, head_dim=HEAD_DIM, device=dev)
    x = torch.randn(B, T, D_MODEL, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(B, T, D_MODEL, device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        Q, K, V, lg = (t.detach().contiguous() if t is not None else None for t in layer.project(x))
    q, k, v = (t.clone().requires_grad_(True) for t in (Q, K, V))
    g = lg.clone().requires_grad_(True)
    dY = torch.randn_like(Q)
    hd = HEADS * HEAD_DIM
    xq = x.detach().clone().requires_grad_(True)
    y_in = torch.randn(B, T, hd, device=dev, dtype=torch.bfloat16, requires_grad=True)
    rows = {
        "layer fwd+bwd": time_cuda(_step(lambda: layer(x), dy), warmup=3, repeats=reps).median_ms,
        "op fwd+bwd (contiguous Q, K, V)": time_cuda(_step(lambda: vidrial.power_retention(q, k, v, g), dY),
                                                      warmup=3, repeats=reps).median_ms,
        "qkv projection fwd+bwd": time_cuda(_step(lambda: layer.qkv(xq), torch.randn(B, T, 3 * hd, device=dev,
                                                                                     dtype=torch.bfloat16)),
                                            warmup=3, repeats=reps).median_ms,
        "gate projection + logsigmoid fwd+bwd": time_cuda(
            _step(lambda: torch.nn.functional.logsigmoid(layer.gate(xq).float()), torch.randn_like(lg)),
            warmup=3, repeats=reps).median_ms,
        "output projection fwd+bwd": time_cuda(_step(lambda: layer.out(y_in), dy), warmup=3, repeats=reps).median_ms,
    }
    parts = sum(v for k, v in rows.items() if k != "layer fwd+bwd")
    return [dict(case=k, ms=v) for k, v in rows.items()] + [
        dict(case="op + projections", ms=parts),
        dict(case="layer / (op + projections) (target <= 1.05)", ratio=rows["layer fwd+bwd"] / parts)]


def varlen_rows(reps: int) -> list[dict]:
    dev, h, d = "cuda", HEADS, HEAD_DIM
    tokens = sum(LENGTHS)
    gen = torch.Generator(device=dev).manual_seed(0)

    def inputs(b, t):
        Q, K, V = (torch.randn(b, t, h, d, device=dev, generator=gen).bfloat16().requires_grad_(True)
                   for _ in range(3))
        lg = torch.nn.functional.logsigmoid(torch.randn(b, t, h, device=dev, generator=gen) + 3.0).requires_grad_(True)
        return Q, K, V, lg

    cu = torch.tensor([0] + list(torch.tensor(LENGTHS).cumsum(0)), dtype=torch.int32, device=dev)
    pk = inputs(1, tokens)
    eq = inputs(tokens // T, T)
    dp, de = torch.randn_like(pk[0]), torch.randn_like(eq[0])
    packed = time_cuda(_step(lambda: vidrial.power_retention(*pk, cu_seqlens=cu), dp), warmup=3,
                       repeats=reps).median_ms
    equal = time_cuda(_step(lambda: vidrial.power_retention(*eq), de), warmup=3, repeats=reps).median_ms
    return [dict(case=f"packed, {len(LENGTHS)} sequences, {tokens} tokens (cu_seqlens)", ms=packed),
            dict(case=f"equal, b={tokens // T} t={T}", ms=equal),
            dict(case="packed / equal (target <= 1.10)", ratio=packed / equal)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = layer_rows(args.reps) + varlen_rows(args.reps)
    print(f"{torch.cuda.get_device_name()}: h={HEADS} d={HEAD_DIM} p=2 chunk 1024 bf16 gated")
    for r in rows:
        print(f"  {r['case']:<60} " + (f"{r['ms']:8.3f} ms" if "ms" in r else f"{r['ratio']:8.3f}"))
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
