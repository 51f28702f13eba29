"""Test doubles for the tuner (not registered as kernel families; reached by REF). They live
under tests/, outside the package: REFs name the module `tuning_doubles`, which tests/conftest.py
puts on PYTHONPATH for child processes (spawned workers inherit the parent's sys.path).

- `synthetic`: a family with the fields of a real tile config whose "time" is a known
  function with a unique optimum; no CUDA needed (FakeBackend + fake_compiler).
- `FakeBackend`: a measurement backend for MeasurementWorker on CPU. The environment
  variable VIDRIAL_FAKE_MISBEHAVE ("crash:tile_m=256;hang:tile_k=128;fault:warps=8")
  (conditions joined by '&' must all hold) makes configs with those values crash the worker (os._exit), hang (sleep) or report a
  CUDA fault: the isolation tests use it. VIDRIAL_FAKE_DELAY_S makes each measurement take
  that long; VIDRIAL_FAKE_RENDEZVOUS=PATH makes device 0 wait until another device has measured
  (scale-out tests); VIDRIAL_FAKE_KILL_AT=N makes the Nth measurement in a process SIGKILL that
  process (a `kill -9` mid-study: with isolate=False, the tuner itself).
- `fault_probe`: a real CUDA family for the GPU isolation proof. Its `mode` field picks
  a kernel that works, writes to an illegal address, or spins for ~15 s (a hang past the
  tuner's job timeout). Tune it with
  `vidrial tune --kernel tests/tuning_doubles.py:fault_probe --sampler grid --job-timeout 8`
  (a file path REF puts tests/ on sys.path; vidrial.tuning.worker.import_ref).
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Literal

from pydantic import field_validator

from vidrial.core.compile import CompiledKernel, CompileFacts
from vidrial.core.config import KernelConfig, ProblemKey
from vidrial.core.family import KernelFamily
from vidrial.core.render import RenderedKernel


# ---- synthetic family ---------------------------------------------------------------------------
class SynthConfig(KernelConfig):
    tile_m: int = 64
    tile_k: int = 32
    warps: int = 4
    stages: int = 2

    @field_validator("tile_m", "tile_k")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v <= 0 or v & (v - 1):
            raise ValueError("must be a power of two")
        return v

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: int) -> int:
        if not 1 <= v <= 4:
            raise ValueError("must be in 1..4")
        return v


class SynthKey(ProblemKey):
    COMPILE_FIELDS = ("head_dim",)
    head_dim: int = 64
    chunk_size: int = 1024


SYNTH_OPTIMUM = {"tile_m": 128, "tile_k": 64, "warps": 4, "stages": 3}

SYNTH_SPACE = """
family = "_synthetic"
description = "test space"
constraints = ["tile_m % (16 * warps) == 0", "tile_k <= head_dim"]

[fields]
tile_m = [32, 64, 128, 256]
tile_k = [16, 32, 64, 128]
warps = [2, 4, 8]
stages = [1, 2, 3, 4]
"""


def synthetic_time(key: SynthKey, config: SynthConfig) -> float:
    """Known objective: the unique minimum (1.0 ms) is SYNTH_OPTIMUM (when allowed by key)."""
    return (1.0 + 0.30 * abs(math.log2(config.tile_m / 128)) + 0.20 * abs(math.log2(config.tile_k / 64))
            + 0.10 * abs(config.warps - 4) / 4 + 0.05 * abs(config.stages - 3))


class SyntheticFamily(KernelFamily):
    name = "_synthetic"
    template = "<synthetic>"
    template_hash = "synthetic0000000"
    Config = SynthConfig
    Key = SynthKey
    signature = ("ptr",)
    REF = "tuning_doubles:synthetic"
    SEARCH_SPACE_TOML = SYNTH_SPACE

    def default_config(self, key):
        return SynthConfig()

    def render_context(self, key, config):
        return {}

    def threads_per_block(self, config):
        return config.warps * 32

    def dynamic_smem_bytes(self, key, config):
        return (config.tile_m + 64) * config.tile_k * 2 * config.stages

    def render(self, key, config):
        return RenderedKernel(self.entry_name(key, config), f"// synthetic {config.label()}\n", self.template)

    def standard_keys(self):
        return [SynthKey(head_dim=64), SynthKey(head_dim=128, chunk_size=2048)]


synthetic = SyntheticFamily()


def fake_compiler(spills: Any = None):
    """A compile function for the tuner (family, key, config, arch) -> CompiledKernel whose
    facts report spills when `spills(config)` is true; no NVRTC involved."""
    def compile_fn(family, key, config, arch):
        spill = bool(spills(config)) if spills else False
        facts = CompileFacts(registers=128, spill_store_bytes=64 if spill else 0, spill_load_bytes=64 if spill else 0,
                             stack_frame_bytes=0, static_smem_bytes=0)
        return CompiledKernel(family.entry_name(key, config), arch, b"\0", facts, "fake", 0.0, True)
    return compile_fn


no_spill_compile = fake_compiler()  # for TuneSettings.compiler = "tuning_doubles:no_spill_compile"


def _misbehaviour(config: dict[str, Any]) -> str | None:
    spec = os.environ.get("VIDRIAL_FAKE_MISBEHAVE", "")
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        what, _, conds = part.partition(":")
        matched = True
        for cond in conds.split("&"):
            name, _, value = cond.partition("=")
            matched = matched and str(config.get(name.strip())) == value.strip()
        if matched:
            return what.strip()
    return None


class FakeBackend:
    """CPU measurement backend: the synthetic objective, plus misbehaviour on request."""

    measured = 0  # in this process (VIDRIAL_FAKE_KILL_AT)

    def __init__(self, device_index: int = 0):
        self.device_index = device_index

    def hello(self) -> dict[str, Any]:
        return {"gpu": {"name": "Fake GPU", "arch": "sm_90", "sm_count": 132}, "arch": "sm_90",
                "toolchain": {}, "device_index": self.device_index, "pid": os.getpid()}

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        from vidrial.tuning.worker import resolve_family

        family = resolve_family(job["family"])
        key = family.Key.model_validate(job["key"])
        config = family.Config.model_validate(job["config"])
        FakeBackend.measured += 1
        if FakeBackend.measured == int(os.environ.get("VIDRIAL_FAKE_KILL_AT", "0") or 0):
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        bad = _misbehaviour(job["config"])
        if bad == "crash":
            os._exit(17)
        if bad == "hang":
            time.sleep(3600)
        if bad == "fault":
            return {"status": "fault", "fatal": True, "reason": "CUDA_ERROR_ILLEGAL_ADDRESS (fake)"}
        if bad == "wrong":
            return {"status": "wrong", "rel_err": 1.0, "reason": "fake wrong result"}
        rendezvous = os.environ.get("VIDRIAL_FAKE_RENDEZVOUS")
        if rendezvous:  # scale-out test: device 0 measures only once another device has measured
            if self.device_index == 0:
                deadline = time.monotonic() + 90
                while not os.path.exists(rendezvous) and time.monotonic() < deadline:
                    time.sleep(0.05)
            else:
                open(rendezvous, "a").close()
        delay = float(os.environ.get("VIDRIAL_FAKE_DELAY_S", "0") or 0)
        if delay:
            time.sleep(delay)
        t = synthetic_time(key, config) if isinstance(config, SynthConfig) else 1.0
        return {"status": "ok", "time_ms": t, "timing": {"median_ms": t}, "rel_err": 0.0 if job.get("check") else None,
                "pid": os.getpid()}



class TieBackend(FakeBackend):
    """Every config with tile_m=128, tile_k=64 takes 1.0 ms (the synthetic optimum's region: a tie), the others
    their synthetic time; 0.5% Gaussian noise per measurement (seeded), so re-timing has intervals to build."""

    def __init__(self, device_index: int = 0):
        import random

        super().__init__(device_index)
        self.rng = random.Random(7)

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        out = super().run(job)
        c = job["config"]
        if out.get("status") == "ok":
            t = 1.0 if (c.get("tile_m"), c.get("tile_k")) == (128, 64) else out["time_ms"]
            out["time_ms"] = t * (1.0 + 0.005 * self.rng.gauss(0.0, 1.0))
            out["timing"] = {"median_ms": out["time_ms"]}
        return out


class NoDeviceBackend(FakeBackend):
    """A backend on a machine without a GPU: fails at start, as the real one does there."""

    def hello(self) -> dict[str, Any]:
        from vidrial.core.errors import InputError

        raise InputError("gpus", f"device {self.device_index}: no CUDA device present", "a machine with a CUDA GPU")

# ---- fault probe (real CUDA) ---------------------------------------------------------------------
class ProbeConfig(KernelConfig):
    mode: Literal["ok", "illegal_address", "hang"] = "ok"
    block: int = 128


class ProbeKey(ProblemKey):
    n: int = 1 << 20


PROBE_SPACE = """
family = "_fault_probe"
description = "deliberately faulting configs: the tuner must survive them"
constraints = ["block % 32 == 0"]

[fields]
mode = ["ok", "illegal_address", "hang"]
block = [128, 256]
"""

_PROBE_SOURCE = r"""
extern "C" __global__ void {entry}(float* __restrict__ out, const float* __restrict__ x, long long n,
                                   long long spin_cycles) {{
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
{body}
  if (i < n) out[i] = 2.f * x[i] + 1.f;
}}
"""
_PROBE_BODY = {
    "ok": "",
    "illegal_address": "  if (i == 0) { *((volatile float*)(0x10ull)) = 1.f; }",
    "hang": "  if (i == 0) { long long t0 = clock64(); while (clock64() - t0 < spin_cycles) { } }",
}
PROBE_SPIN_CYCLES = 30_000_000_000  # ~15 s at ~2 GHz: longer than a test's job timeout, still bounded


class FaultProbeFamily(KernelFamily):
    name = "_fault_probe"
    template = "<fault_probe>"
    template_hash = "faultprobe000000"
    Config = ProbeConfig
    Key = ProbeKey
    signature = ("ptr", "ptr", "i64", "i64")
    REF = "tuning_doubles:fault_probe"
    SEARCH_SPACE_TOML = PROBE_SPACE

    def default_config(self, key):
        return ProbeConfig()

    def render_context(self, key, config):
        return {"mode": config.mode}

    def threads_per_block(self, config):
        return config.block

    def dynamic_smem_bytes(self, key, config):
        return 0

    def render(self, key, config):
        entry = self.entry_name(key, config)
        return RenderedKernel(entry, _PROBE_SOURCE.format(entry=entry, body=_PROBE_BODY[config.mode]), self.template)

    def standard_keys(self):
        return [ProbeKey()]

    def make_inputs(self, key, device, seed):
        import torch

        g = torch.Generator(device="cpu").manual_seed(seed)
        return {"x": torch.randn(key.n, generator=g).to(device)}

    def run(self, key, config, inputs):
        import torch

        from vidrial.core.launch import current_stream_handle

        x = inputs["x"]
        out = torch.empty_like(x)
        dev = x.device.index
        kernel = self.launchable(key, config, _arch_of(dev))
        kernel.launch(((key.n + config.block - 1) // config.block, 1, 1), (config.block, 1, 1),
                      (out.data_ptr(), x.data_ptr(), key.n, PROBE_SPIN_CYCLES), dev, current_stream_handle(dev))
        return out

    def reference(self, key, inputs):
        return 2 * inputs["x"] + 1


_ARCHS: dict[int, str] = {}


def _arch_of(device_index: int) -> str:
    if device_index not in _ARCHS:
        from vidrial.core.arch import device_arch

        _ARCHS[device_index] = device_arch(device_index)
    return _ARCHS[device_index]


fault_probe = FaultProbeFamily()
