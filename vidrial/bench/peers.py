"""The implementations that `vidrial bench` compares, each loaded behind a try/except.

A peer that cannot be imported (or has no CUDA device to run on) is recorded as
``Peer(available=False, note="skipped: <reason>")``; it is reported, never faked.

* ``vidrial``      vidrial.ops.power_retention (forward), vidrial.autograd (backward through the
                   same op with requires_grad inputs), vidrial.inference.power_retention_inference
                   (decode). A missing piece makes that kind "not available", not a failure.
* ``retention``    retention.triton.power_retention / power_retention_inference (Manifest AI, Triton).
                   Its Triton autotune is exhaustive (about 6 minutes on first use on an H200), so the
                   bench keeps at most N configs per autotuned kernel (``limit_autotune``); the report
                   says so. docs/BENCHMARKS.md has its fully tuned numbers.
* ``sdpa``         torch.nn.functional.scaled_dot_product_attention, flash backend, causal, bf16,
                   layout [b, h, t, d].
* ``gla``          flash-linear-attention's gated linear attention (fla.ops.gla.chunk_gla for
                   training, fused_recurrent_gla for one decode step): the small-state (d x d) reference.
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any

PEER_NAMES = ("retention", "sdpa", "gla")
IMPL_NAMES = ("vidrial",) + PEER_NAMES
LABELS = {
    "vidrial": "vidrial",
    "retention": "retention (Triton)",
    "sdpa": "SDPA",
    "gla": "fla GLA",
}


@dataclass
class Peer:
    name: str
    available: bool
    note: str = ""
    version: str | None = None
    funcs: dict[str, Any] = field(default_factory=dict)  # kind -> callable (or None: "not available")
    missing: dict[str, str] = field(default_factory=dict)  # kind -> reason it is not available

    def as_dict(self) -> dict[str, Any]:
        return {"available": self.available, "note": self.note, "version": self.version,
                "kinds": sorted(k for k, f in self.funcs.items() if f is not None),
                "missing": dict(self.missing)}


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def dist_version(*names: str) -> str | None:
    """Installed version of the first distribution found among `names`, else None."""
    from importlib import metadata

    for n in names:
        try:
            return metadata.version(n)
        except Exception:
            continue
    return None


def limit_autotune(prefixes: tuple[str, ...], max_configs: int) -> int:
    """Keep at most `max_configs` (spread over the list) in every triton Autotuner found in the
    loaded modules whose name starts with one of `prefixes`. Returns how many were cut."""
    if max_configs is None or max_configs <= 0:
        return 0
    try:
        from triton.runtime.autotuner import Autotuner
    except Exception:
        return 0
    cut = 0
    seen: set[int] = set()
    for name, mod in list(sys.modules.items()):
        if mod is None or not name.startswith(prefixes):
            continue
        for obj in list(vars(mod).values()):
            for _ in range(4):  # @triton.heuristics(...) over @triton.autotune(...): follow .fn
                if isinstance(obj, Autotuner) or obj is None:
                    break
                obj = getattr(obj, "fn", None)
            if isinstance(obj, Autotuner) and id(obj) not in seen and len(obj.configs) > max_configs:
                seen.add(id(obj))
                k = len(obj.configs)
                idx = sorted({(i * k) // max_configs + k // (2 * max_configs) for i in range(max_configs)})
                obj.configs = [obj.configs[i] for i in idx if i < k]
                cut += 1
    return cut


def _cuda_reason() -> str | None:
    try:
        import torch
    except Exception as exc:
        return f"torch not importable ({_reason(exc)})"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def load_vidrial() -> Peer:
    from vidrial import __version__

    p = Peer("vidrial", True, version=__version__)
    for kind, mod, attr in (("fwd", "vidrial.ops", "power_retention"),
                            ("fwd_bwd", "vidrial.autograd", "power_retention"),
                            ("decode", "vidrial.inference", "power_retention_inference")):
        try:
            f = getattr(importlib.import_module(mod), attr)
            p.funcs[kind] = f
        except Exception as exc:
            p.funcs[kind] = None
            p.missing[kind] = f"not available: {mod}.{attr} ({_reason(exc)})"
    if p.funcs.get("fwd_bwd") is not None:
        # the benchmark drives backward through the public op (requires_grad inputs route to autograd)
        p.funcs["fwd_bwd"] = p.funcs.get("fwd")
        if p.funcs["fwd_bwd"] is None:
            p.missing["fwd_bwd"] = "not available: vidrial.ops.power_retention missing"
    return p


def load_retention(max_autotune_configs: int | None = 2) -> Peer:
    why = _cuda_reason()
    if why:
        return Peer("retention", False, f"skipped: {why}")
    try:
        rt = importlib.import_module("retention.triton")
    except Exception as exc:
        return Peer("retention", False, f"skipped: retention not importable ({_reason(exc)})")
    note = ""
    cut = limit_autotune(("retention",), max_autotune_configs or 0)
    if cut:
        note = f"Triton autotune limited to {max_autotune_configs} configs per kernel ({cut} kernels)"
    if os.environ.get("TRITON_NO_AUTOTUNE") == "1":
        note += "; TRITON_NO_AUTOTUNE=1 (first valid config in update_state/query_state)"
    p = Peer("retention", True, note, version=dist_version("retention"))
    p.funcs = {"fwd": rt.power_retention, "fwd_bwd": rt.power_retention,
               "decode": getattr(rt, "power_retention_inference", None)}
    if p.funcs["decode"] is None:
        p.missing["decode"] = "not available: retention.triton.power_retention_inference missing"
    return p


def load_sdpa() -> Peer:
    why = _cuda_reason()
    if why:
        return Peer("sdpa", False, f"skipped: {why}")
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception as exc:
        return Peer("sdpa", False, f"skipped: torch.nn.attention not importable ({_reason(exc)})")
    F = torch.nn.functional

    def causal(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def decode(q, k, v):  # one query against the whole cache: no mask
        return F.scaled_dot_product_attention(q, k, v)

    return Peer("sdpa", True, "flash backend, causal, bf16, [b,h,t,d]", version=torch.__version__,
                funcs={"fwd": causal, "fwd_bwd": causal, "decode": decode})


def load_gla(max_autotune_configs: int | None = 2) -> Peer:
    why = _cuda_reason()
    if why:
        return Peer("gla", False, f"skipped: {why}")
    try:
        gla = importlib.import_module("fla.ops.gla")
        chunk = gla.chunk_gla
    except Exception as exc:
        return Peer("gla", False, f"skipped: flash-linear-attention (fla.ops.gla) not importable ({_reason(exc)})")
    note = "chunk_gla (training), fused_recurrent_gla (decode); state d x d per head"
    cut = limit_autotune(("fla",), max_autotune_configs or 0)
    if cut:
        note += f"; Triton autotune limited to {max_autotune_configs} configs per kernel ({cut} kernels)"
    p = Peer("gla", True, note, version=dist_version("fla-core", "flash-linear-attention", "fla_core"))
    p.funcs = {"fwd": chunk, "fwd_bwd": chunk, "decode": getattr(gla, "fused_recurrent_gla", None)}
    if p.funcs["decode"] is None:
        p.missing["decode"] = "not available: fla.ops.gla.fused_recurrent_gla missing"
    return p


def load_all(max_autotune_configs: int | None = 2, skip: tuple[str, ...] = ()) -> dict[str, Peer]:
    """vidrial and every peer; a loader that raises is recorded as skipped."""
    loaders = {"vidrial": load_vidrial,
               "retention": lambda: load_retention(max_autotune_configs),
               "sdpa": load_sdpa,
               "gla": lambda: load_gla(max_autotune_configs)}
    out: dict[str, Peer] = {}
    for name, load in loaders.items():
        if name in skip:
            out[name] = Peer(name, False, "skipped: excluded on the command line")
            continue
        try:
            out[name] = load()
        except Exception as exc:  # a broken install must not stop the run
            out[name] = Peer(name, False, f"skipped: {_reason(exc)}")
    return out


__all__ = ["Peer", "PEER_NAMES", "IMPL_NAMES", "LABELS", "load_all", "load_vidrial", "load_retention",
           "load_sdpa", "load_gla", "limit_autotune", "dist_version"]
