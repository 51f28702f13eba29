"""docs/ADDING_A_KERNEL.md holds: its worked example (discumsum) is built the way it says, and a family
written from the page alone (below: out = a*x + bias) gets rendering, compiling, dispatch and launching
from the core, executed on the host emulation of tests/bwd_host_emu.py."""
from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from pydantic import Field

from vidrial.core.config import KernelConfig, ProblemKey
from vidrial.core.errors import InputError
from vidrial.core.family import KernelFamily, Launch
from vidrial.core.rules import OneOf, PowerOfTwo, Rule
from vidrial.core.tensors import check_tensor, pow2_bucket

sys.path.insert(0, os.path.dirname(__file__))
import bwd_host_emu  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "ADDING_A_KERNEL.md"
LAUNCH_PATH = ("prepare", "problem_key", "outputs", "launches")
COMPILE_SIDE = ("default_config", "render_context", "threads_per_block", "dynamic_smem_bytes")
needs_gxx = pytest.mark.skipif(not bwd_host_emu.available(), reason="no g++ for the host emulation")


class AxpyConfig(KernelConfig):
    RULES: ClassVar[dict[str, Rule]] = {"vec": OneOf((1, 2, 4)), "threads": OneOf((64, 128, 256))}
    vec: int = Field(2, description="elements per thread")
    threads: int = Field(128, description="threads per CTA")


class AxpyKey(ProblemKey):
    RULES: ClassVar[dict[str, Rule]] = {"n_bucket": PowerOfTwo()}
    COMPILE_FIELDS: ClassVar[tuple[str, ...]] = ()
    n_bucket: int = 1024


class AxpyFamily(KernelFamily[AxpyKey, AxpyConfig]):
    """out = a * x + bias, written from docs/ADDING_A_KERNEL.md (template templates/testing/axpy.cu.j2)."""

    name = "axpy_doc_example"
    template = "testing/axpy.cu.j2"
    Config = AxpyConfig
    Key = AxpyKey
    signature = ("ptr", "ptr", "i64", "f32", "i32")

    def default_config(self, key: AxpyKey) -> AxpyConfig:
        return AxpyConfig()

    def render_context(self, key: AxpyKey, config: AxpyConfig) -> dict[str, Any]:
        return dict(vec=config.vec)

    def threads_per_block(self, config: AxpyConfig) -> int:
        return config.threads

    def dynamic_smem_bytes(self, key: AxpyKey, config: AxpyConfig) -> int:
        return 0

    def prepare(self, x: dict[str, Any]) -> dict[str, Any]:
        check_tensor("x", x["x"], dtypes=("float32",), ndim=1, what="[n]")
        if not isinstance(x["bias"], int):
            raise InputError("bias", type(x["bias"]).__name__, "an int")
        return dict(x=x["x"].contiguous(), a=float(x["a"]), bias=x["bias"])

    def problem_key(self, x: dict[str, Any]) -> AxpyKey:
        return AxpyKey(n_bucket=pow2_bucket(x["x"].numel()))

    def outputs(self, key: AxpyKey, config: AxpyConfig, x: dict[str, Any]) -> dict[str, Any]:
        return {"out": torch.empty_like(x["x"])}

    def launches(self, key: AxpyKey, config: AxpyConfig, x: dict[str, Any], out: dict[str, Any]):
        n = x["x"].numel()
        if n:
            per_cta = config.threads * config.vec
            yield Launch((-(-n // per_cta), 1, 1), (out["out"].data_ptr(), x["x"].data_ptr(), n, x["a"], x["bias"]))


def test_the_page_names_what_a_family_writes():
    text = DOC.read_text()
    for name in LAUNCH_PATH + COMPILE_SIDE + ("make_inputs", "reference", "shape_keys", "signature"):
        assert f"`{name}" in text, name


def test_discumsum_is_built_the_way_the_page_says():
    from vidrial.kernels.power_retention import discumsum as module

    fam = module.FAMILY
    for name in LAUNCH_PATH + COMPILE_SIDE + ("make_inputs", "run", "reference", "shape_keys"):
        assert getattr(type(fam), name) is not getattr(KernelFamily, name), f"discumsum does not define {name}"
    # the public launcher is the core's call, nothing per family between the tensors and the launch
    assert "FAMILY(config" in inspect.getsource(module.discumsum_forward)
    assert (Path(module.__file__).parents[3] / "search_spaces" / "discumsum.toml").exists()


def test_a_family_from_the_page_compiles_for_every_arch_without_a_gpu():
    fam = AxpyFamily()
    key = AxpyKey()
    for arch in ("sm_80", "sm_90"):
        compiled = fam.compile(key, AxpyConfig(vec=4), arch)
        assert compiled.facts.spills == 0 and fam.infeasible_reason(key, AxpyConfig(vec=4), compiled) is None


@needs_gxx
@pytest.mark.parametrize("n", [0, 1, 1000])
def test_a_family_from_the_page_runs_through_the_core(n):
    fam = AxpyFamily()
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    with pytest.raises(InputError, match="^x"):  # no host launcher: CPU tensors are refused by name
        fam(x=x, a=2.0, bias=3)
    undo = bwd_host_emu.install()
    try:
        plan = fam.plan(x=x, a=2.0, bias=3)
        assert plan.key == AxpyKey(n_bucket=pow2_bucket(n)) and plan.config == AxpyConfig()
        assert len(plan.launches) == (1 if n else 0)
        out = fam(AxpyConfig(vec=1, threads=64), x=x, a=2.0, bias=3)["out"]
        with pytest.raises(InputError, match="^config"):
            fam(object(), x=x, a=2.0, bias=3)
    finally:
        undo()
    assert torch.equal(out, 2.0 * x + 3.0)


@needs_gxx
def test_discumsum_runs_through_the_core_on_the_host():
    from vidrial.kernels.power_retention.discumsum import discumsum
    from vidrial.reference.forward import discumsum_reference

    gen = torch.Generator().manual_seed(0)
    b, n, h, D, d = 1, 3, 2, 24, 8
    S, s = torch.randn(b, n, h, D, d, generator=gen), torch.randn(b, n, h, D, generator=gen)
    L = -torch.rand(b, n, h, generator=gen)
    undo = bwd_host_emu.install()
    try:
        Sbar, sbar = discumsum(S, s, L)
    finally:
        undo()
    Sbar_ref, sbar_ref = discumsum_reference(S, s, L)
    assert torch.allclose(Sbar.double(), Sbar_ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(sbar.double(), sbar_ref, rtol=1e-5, atol=1e-5)
