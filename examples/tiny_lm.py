"""A tiny language model built from vidrial.nn.PowerRetention: trains on a synthetic task, then generates.

    python examples/tiny_lm.py --steps 300 --device cuda

The model: token embedding plus an embedding of the previous token (a token shift: power retention has no
positions, so this is what lets a layer match "the token before position j" with the current one), `--layers`
blocks of (RMSNorm -> PowerRetention -> residual, RMSNorm -> MLP ->
residual), a final RMSNorm and an LM head. The task ("repeat"): every sequence is a random pattern of
`--period` tokens repeated to the sequence length; after the first period every token is predictable from
the one `period` steps back (an induction / copy task), so the loss falls well below log(vocab) once the
layer learns to look back. After training the model is prompted with four periods of a fresh pattern and
generates with the layers' decode caches (prefill, then one token at a time: KV cache until
switch_over_seq_len, then the state); the printout shows how many generated tokens continue the pattern.

Everything is bf16 on the GPU (the kernels' dtype). `main(argv)` returns a dict (losses, accuracy) for tests.
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Optional

import torch
from torch import nn

import vidrial.nn as vnn


class RMSNorm(nn.Module):
    def __init__(self, d: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.weight


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int, kv_heads: int, head_dim: int, chunk_size: Optional[int],
                 switch_over: Optional[int], device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.norm1, self.norm2 = RMSNorm(d_model, **kw), RMSNorm(d_model, **kw)
        self.attn = vnn.PowerRetention(d_model, heads, num_kv_heads=kv_heads, head_dim=head_dim,
                                       chunk_size=chunk_size, switch_over_seq_len=switch_over, **kw)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model, bias=False, **kw), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model, bias=False, **kw))

    def forward(self, x, cache=None):
        if cache is None:
            x = x + self.attn(self.norm1(x))
        else:
            a, cache = self.attn.step(self.norm1(x), cache)
            x = x + a
        return x + self.mlp(self.norm2(x)), cache


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d_model: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                 chunk_size: Optional[int], switch_over: Optional[int], device=None, dtype=torch.bfloat16):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.embed = nn.Embedding(vocab, d_model, **kw)
        self.prev_embed = nn.Embedding(vocab + 1, d_model, **kw)  # the previous token; index vocab: none
        self.vocab = vocab
        self.blocks = nn.ModuleList(Block(d_model, heads, kv_heads, head_dim, chunk_size, switch_over, **kw)
                                    for _ in range(layers))
        self.norm = RMSNorm(d_model, **kw)
        self.head = nn.Linear(d_model, vocab, bias=False, **kw)

    def forward(self, tokens, caches=None):
        """tokens [b, t] -> logits [b, t, vocab] (float32); with caches (new_caches(): one per block and the
        last token seen): a prefill or decoding step, returns (logits, caches)."""
        before = torch.full_like(tokens[:, :1], self.vocab) if caches is None or caches["last"] is None \
            else caches["last"]
        x = self.embed(tokens) + self.prev_embed(torch.cat([before, tokens[:, :-1]], 1))
        new = []
        for i, blk in enumerate(self.blocks):
            x, c = blk(x, None if caches is None else caches["blocks"][i])
            new.append(c)
        logits = self.head(self.norm(x)).float()
        return logits if caches is None else (logits, {"blocks": new, "last": tokens[:, -1:]})

    def new_caches(self, batch: int):
        return {"blocks": [blk.attn.new_cache(batch) for blk in self.blocks], "last": None}

    @torch.no_grad()
    def generate(self, prompt, n: int):
        """Greedy decoding of n tokens after prompt [b, t0], through the layers' caches."""
        caches = self.new_caches(prompt.shape[0])
        logits, caches = self(prompt, caches)
        out = [logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(n - 1):
            logits, caches = self(out[-1], caches)
            out.append(logits[:, -1].argmax(-1, keepdim=True))
        return torch.cat(out, 1)


def repeat_batch(batch: int, seq: int, period: int, vocab: int, gen: torch.Generator, device) -> torch.Tensor:
    pat = torch.randint(0, vocab, (batch, period), generator=gen)
    return pat.repeat(1, -(-seq // period))[:, :seq].to(device)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--period", type=int, default=16)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=128)
    p.add_argument("--switch-over", type=int, default=64, help="decode: KV cache length before the state")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--generate", type=int, default=48, help="tokens to generate after training (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = TinyLM(args.vocab, args.d_model, args.layers, args.heads, args.kv_heads, args.head_dim,
                   args.chunk_size, args.switch_over, device=dev)
    # bf16 parameters: AdamW's update in bf16 is coarse but enough for this toy; eps above bf16 resolution
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    losses = []
    log = (lambda *a: None) if args.quiet else print
    log(f"tiny_lm: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {dev}, "
        f"task repeat(period={args.period}), log(vocab) = {math.log(args.vocab):.3f}")
    t0 = time.time()
    for step in range(args.steps):
        tokens = repeat_batch(args.batch, args.seq + 1, args.period, args.vocab, gen, dev)
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, args.vocab), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == args.steps - 1:
            log(f"step {step:4d}  loss {losses[-1]:.4f}  ({time.time() - t0:.1f} s)")
    result = {"losses": losses, "accuracy": None}
    if args.generate:
        # a prompt of 4 periods (training sees up to seq / period of them; 2 leave the model unsure)
        P, n, k = args.period, args.generate, 4
        prompt = repeat_batch(4, k * P, P, args.vocab, gen, dev)
        out = model.generate(prompt, n)
        want = prompt[:, :P].repeat(1, -(-(k * P + n) // P))[:, k * P:k * P + n]  # the pattern, continued
        acc = (out == want).float().mean().item()
        result["accuracy"] = acc
        log(f"generated {n} tokens after a {k}-period prompt: {acc:.1%} continue the pattern")
        log("prompt   :", prompt[0].tolist())
        log("generated:", out[0].tolist())
    return result


if __name__ == "__main__":
    main()
