"""On a real GPU: a dispatched call uses the tuned config (seen through last_dispatch()
and `vidrial show --last`), GpuIdentity.current() is right, and dispatch is cheap."""
from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from typing import ClassVar

import pytest
import torch

from vidrial import dispatch
from vidrial.core.config import KernelConfig, ProblemKey
from vidrial.core.family import KernelFamily
from vidrial.core.launch import current_stream_handle
from vidrial.dispatch import store
from vidrial.dispatch.store import GpuIdentity, record

pytestmark = pytest.mark.gpu


class NoopConfig(KernelConfig):
    block: int = 128


class NoopKey(ProblemKey):
    COMPILE_FIELDS: ClassVar[tuple[str, ...]] = ("scale",)
    scale: int = 3
    n: int = 1 << 16


class NoopFamily(KernelFamily):
    name = "test_noop_gpu"
    template = "testing/noop.cu.j2"
    Config = NoopConfig
    Key = NoopKey
    signature = ("ptr", "ptr", "i64")

    def default_config(self, key):
        return NoopConfig()

    def render_context(self, key, config):
        return {"scale": float(key.scale)}

    def threads_per_block(self, config):
        return config.block

    def dynamic_smem_bytes(self, key, config):
        return 0


FAM = NoopFamily()


def scale_op(x: torch.Tensor, n_bucket: int) -> torch.Tensor:
    """A toy public op: dispatch, then launch with the chosen config."""
    key = NoopKey(n=n_bucket)
    gpu = dispatch.current_gpu(x.device.index)
    config = dispatch.select_config(FAM, key)
    out = torch.empty_like(x)
    kernel = FAM.launchable(NoopKey(n=1 << 16), config, gpu.arch)  # n is a runtime size: one compile per config
    dev = x.device.index
    kernel.launch(((x.numel() + config.block - 1) // config.block, 1, 1), (config.block, 1, 1),
                  (out.data_ptr(), x.data_ptr(), x.numel()), dev, current_stream_handle(dev))
    return out


@pytest.fixture
def tuned_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VIDRIAL_TUNED_DIR", str(tmp_path))
    monkeypatch.setattr(store, "shipped_tuned_dir", lambda: None)
    dispatch.reload()
    yield tmp_path
    dispatch.reload()


def test_gpu_identity_current():
    gpu = GpuIdentity.current()
    props = torch.cuda.get_device_properties(0)
    major, minor = torch.cuda.get_device_capability()
    assert gpu.name == props.name and gpu.sm_count == props.multi_processor_count > 0
    assert gpu.arch.startswith(f"sm_{major}{minor}")
    assert dispatch.current_gpu() == gpu and dispatch.current_gpu(0) is dispatch.current_gpu(0)
    toolchain = store.Toolchain.current()
    assert toolchain.torch and toolchain.nvrtc and toolchain.driver


def test_dispatched_call_uses_tuned_config(tuned_dir, monkeypatch):
    from vidrial import cli, kernels

    gpu = dispatch.current_gpu()
    record(FAM, NoopKey(n=1 << 20), NoopConfig(block=512), gpu=gpu, time_ms=0.01, default_time_ms=0.02,
           trials=3)
    dispatch.reload()
    x = torch.randn(100_003, device="cuda")

    out = scale_op(x, 1 << 20)
    torch.testing.assert_close(out, 3 * x)
    d = dispatch.last_dispatch()
    assert d.source == "exact" and d.config == NoopConfig(block=512) and d.gpu == gpu.slug

    out = scale_op(x, 1 << 18)
    torch.testing.assert_close(out, 3 * x)
    d = dispatch.last_dispatch()
    assert d.source == "nearest" and d.config.block == 512 and d.tuned_key == NoopKey(n=1 << 20)

    d_default = dispatch.select_config(FAM, NoopKey(scale=5, n=1 << 20))
    assert d_default == NoopConfig() and dispatch.last_dispatch().source == "default"

    scale_op(x, 1 << 20)
    monkeypatch.setitem(kernels._FAMILIES, FAM.name, FAM)
    buf = io.StringIO()
    with redirect_stdout(buf):
        cli.main(["show", "--last", "--json"])
    last = json.loads(buf.getvalue())["last"]
    assert last["family"] == FAM.name and last["source"] == "exact" and last["config"] == {"block": 512}
    # `vidrial show` with no --gpu reports the present GPU
    buf = io.StringIO()
    with redirect_stdout(buf):
        cli.main(["show", "--json"])
    data = json.loads(buf.getvalue())
    assert [g["gpu"] for g in data["gpus"]] == [gpu.slug]
    fam = next(f for f in data["gpus"][0]["families"] if f["family"] == FAM.name)
    assert len(fam["entries"]) == 1 and fam["entries"][0]["gpu"]["name"] == gpu.name


def test_dispatch_overhead_reported():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_dispatch.py"
    spec = importlib.util.spec_from_file_location("bench_dispatch", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.measure(entries=100, number=5000, repeat=5)
    print(f"\nselect_config warm overhead: {json.dumps(result)}")
    assert "current_gpu_us" in result
