"""Kernel generation core on the CPU: arch names, rendering, NVRTC compiling and its cache."""
from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import jinja2
import pytest

from vidrial.core import compile as compiling
from vidrial.core.arch import arch_limits, normalize_arch
from vidrial.core.compile import cache_key, compile_many, compile_source, parse_ptxas_log
from vidrial.core.errors import CompileError, InputError, LaunchError
from vidrial.core.launch import LaunchableKernel
from vidrial.core.render import RenderedKernel, render, template_hash


@pytest.mark.parametrize("given,expected", [("sm_90", "sm_90"), ("90", "sm_90"), ("sm80", "sm_80"),
                                            ("8.0", "sm_80"), ("sm_90a", "sm_90a"), ("compute_90", "sm_90")])
def test_normalize_arch(given, expected):
    assert normalize_arch(given) == expected


def test_bad_arch_names_the_argument():
    with pytest.raises(InputError, match=r"arch: got 'sm_42'.*sm_80"):
        normalize_arch("sm_42")


def test_arch_limits():
    assert arch_limits("sm_90").max_dynamic_smem_per_block == 232448
    assert arch_limits("sm_80").max_dynamic_smem_per_block < arch_limits("sm_90").max_dynamic_smem_per_block


def test_render_is_deterministic_and_strict():
    a = render("testing/axpy.cu.j2", "axpy_a", {"vec": 4})
    b = render("testing/axpy.cu.j2", "axpy_a", {"vec": 4})
    assert a.source == b.source and a.source_hash == b.source_hash
    assert render("testing/axpy.cu.j2", "axpy_a", {"vec": 2}).source_hash != a.source_hash
    assert "axpy_a" in a.source
    with pytest.raises(jinja2.UndefinedError):
        render("testing/axpy.cu.j2", "axpy_a", {})
    assert len(template_hash("testing/axpy.cu.j2")) == 16


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_compile_reports_facts_and_caches(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("VIDRIAL_CACHE_DIR", str(tmp_path))
    kernel = render("testing/axpy.cu.j2", "axpy_vec4", {"vec": 4})
    first = compile_source(kernel, arch)
    assert not first.cached and first.seconds > 0
    assert first.cubin[:4] == b"\x7fELF"
    assert first.facts.registers > 0 and not first.facts.spills
    second = compile_source(kernel, arch)
    assert second.cached and second.cubin == first.cubin and second.facts == first.facts
    assert list(tmp_path.rglob("*.tmp")) == []


def test_cache_key_covers_source_arch_and_options():
    k = cache_key("src", "sm_90", ("-O3",))
    assert k != cache_key("src2", "sm_90", ("-O3",))
    assert k != cache_key("src", "sm_80", ("-O3",))
    assert k != cache_key("src", "sm_90", ("-O2",))


def test_corrupt_cache_entry_is_recompiled(tmp_path, monkeypatch):
    monkeypatch.setenv("VIDRIAL_CACHE_DIR", str(tmp_path))
    kernel = render("testing/axpy.cu.j2", "axpy_vec1", {"vec": 1})
    first = compile_source(kernel, "sm_90")
    for f in tmp_path.rglob("*.json"):
        f.write_text("{not json")
    again = compile_source(kernel, "sm_90")
    assert not again.cached and again.cubin == first.cubin


def test_compile_error_shows_config_log_and_numbered_source():
    bad = RenderedKernel("broken", 'extern "C" __global__ void broken() {\n  int x = ;\n}\n', "<inline>")
    with pytest.raises(CompileError) as info:
        compile_source(bad, "sm_90", label="tile_m=64 warps=4", use_cache=False)
    text = str(info.value)
    assert "tile_m=64 warps=4" in text and "broken" in text
    assert ">    2 |   int x = ;" in text


def test_compile_many_runs_in_workers_and_keeps_order(tmp_path, monkeypatch):
    monkeypatch.setenv("VIDRIAL_CACHE_DIR", str(tmp_path))
    good = [render("testing/axpy.cu.j2", f"axpy_w{v}", {"vec": v}) for v in (1, 2)]
    bad = RenderedKernel("broken2", 'extern "C" __global__ void broken2() { undefined_fn(); }', "<inline>")
    results = compile_many([(good[0], "sm_80", (), "g0"), (bad, "sm_90", (), "bad"), (good[1], "sm_90", (), "g1")],
                           workers=2)
    assert results[0].entry == "axpy_w1" and results[2].entry == "axpy_w2"
    assert isinstance(results[1], CompileError)


def _compile_same(cache_dir: str) -> bytes:
    os.environ["VIDRIAL_CACHE_DIR"] = cache_dir
    return compile_source(render("testing/axpy.cu.j2", "axpy_race", {"vec": 8}), "sm_90").cubin


def test_concurrent_compiles_share_the_cache_safely(tmp_path):
    with mp.get_context("spawn").Pool(2) as pool:
        cubins = pool.map(_compile_same, [str(tmp_path)] * 4)
    assert len(set(cubins)) == 1
    assert len(list(tmp_path.rglob("*.cubin"))) == 1 and list(tmp_path.rglob("*.tmp")) == []


def test_parse_ptxas_log_picks_the_entry():
    log = """ptxas info    : Compiling entry function 'other' for 'sm_90'
ptxas info    : Function properties for other
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 0 barriers
ptxas info    : Compiling entry function 'mine' for 'sm_90'
ptxas info    : Function properties for mine
    48 bytes stack frame, 40 bytes spill stores, 36 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 8192 bytes smem
"""
    facts = parse_ptxas_log(log, "mine")
    assert (facts.registers, facts.spill_store_bytes, facts.spill_load_bytes) == (255, 40, 36)
    assert (facts.stack_frame_bytes, facts.static_smem_bytes, facts.barriers) == (48, 8192, 1)
    assert facts.spills and facts.reported


def test_missing_ptxas_report_is_unknown_retried_and_never_cached(tmp_path, monkeypatch):
    import vidrial.core.compile as C

    assert not parse_ptxas_log("", "mine").reported
    monkeypatch.setenv("VIDRIAL_CACHE_DIR", str(tmp_path))
    real = C._nvrtc_compile
    calls = []

    def flaky(kernel, arch, options, label):
        cubin, log = real(kernel, arch, options, label)
        calls.append(1)
        return cubin, "" if len(calls) == 1 else log  # first log without the report, as seen once on an H200

    monkeypatch.setattr(C, "_nvrtc_compile", flaky)
    kernel = render("testing/axpy.cu.j2", "axpy_flaky", {"vec": 1})
    ok = compile_source(kernel, "sm_90")
    assert len(calls) == 2 and ok.facts.reported and ok.facts.registers > 0
    assert compile_source(kernel, "sm_90").cached
    monkeypatch.setattr(C, "_nvrtc_compile", lambda *a: (real(*a)[0], ""))
    other = render("testing/axpy.cu.j2", "axpy_silent", {"vec": 2})
    silent = compile_source(other, "sm_90")
    assert not silent.facts.reported and not compile_source(other, "sm_90").cached  # unknown facts not cached


def test_launch_argument_mismatch_is_reported_before_touching_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("VIDRIAL_CACHE_DIR", str(tmp_path))
    compiled = compile_source(render("testing/axpy.cu.j2", "axpy_args", {"vec": 1}), "sm_90")
    kernel = LaunchableKernel(compiled, ("ptr", "ptr", "i64", "f32", "i32"))
    with pytest.raises(LaunchError, match="do not match signature"):
        kernel.launch((1, 1, 1), (32, 1, 1), (0, 0, "n", 1.0, 0), 0, 0)
    with pytest.raises(LaunchError, match="unknown parameter types"):
        LaunchableKernel(compiled, ("ptr", "double"))


def test_missing_headers_error_names_the_fix(monkeypatch):
    from vidrial.core import toolchain

    monkeypatch.setattr("cuda.pathfinder.find_nvidia_header_directory", lambda name: None)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(toolchain, "Path", _NoCudaPath)
    with pytest.raises(toolchain.ToolchainError, match="nvidia-cuda-runtime"):
        toolchain.cuda_include_dir.__wrapped__()


class _NoCudaPath(type(Path())):
    def is_file(self) -> bool:  # pretend /usr/local/cuda is absent
        return False


def test_cache_stats_and_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("VIDRIAL_CACHE_DIR", str(tmp_path))
    compile_source(render("testing/axpy.cu.j2", "axpy_stats", {"vec": 1}), "sm_80")
    assert compiling.cache_stats()["entries"] == 1
    compiling.clear_cache()
    assert compiling.cache_stats()["entries"] == 0


def test_declarative_field_rules_name_field_value_and_rule():
    from typing import ClassVar

    import pydantic

    from vidrial.core.config import KernelConfig
    from vidrial.core.rules import Between, MultipleOf, OneOf, PowerOfTwo, Rule

    class Cfg(KernelConfig):
        RULES: ClassVar[dict[str, Rule]] = {"warps": OneOf((2, 4), "whole warps"), "stages": Between(2, 4),
                                            "tile": MultipleOf(16, 16, 64), "chunk": MultipleOf(16, allow_zero=True),
                                            "bucket": PowerOfTwo()}
        warps: int = 4
        stages: int = 2
        tile: int = 32
        chunk: int = 0
        bucket: int = 8

        @pydantic.model_validator(mode="after")
        def _split(self) -> "Cfg":  # runs after the rules: may rely on warps being valid
            assert self.warps in (2, 4)
            return self

    assert Cfg().warps == 4 and Cfg(chunk=32).chunk == 32
    bad = {"warps": (3, "one of (2, 4) (whole warps)"), "stages": (5, "between 2 and 4"),
           "tile": (80, "a positive multiple of 16 between 16 and 64"), "chunk": (8, "0 or a positive multiple of 16"),
           "bucket": (6, "a power of two >= 1")}
    for name, (value, text) in bad.items():
        with pytest.raises(pydantic.ValidationError) as err:
            Cfg(**{name: value})
        assert f"{name}={value}: {text}" in str(err.value)


# ---- cache integrity, size bound, `vidrial cache` (issue 17 item 6) ---------------------------------------------
def _damage(data: bytes, how: str) -> bytes:
    if how == "truncated":
        return data[: len(data) // 2]
    if how == "random":
        return os.urandom(len(data))
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    return bytes(flipped)


@pytest.mark.parametrize("how", ["truncated", "random", "one byte flipped"])
def test_damaged_cubin_is_recompiled_and_replaced(how, tmp_path, monkeypatch):
    monkeypatch.setenv("VIDRIAL_CACHE_DIR", str(tmp_path))
    kernel = render("testing/axpy.cu.j2", "axpy_damaged", {"vec": 2})
    first = compile_source(kernel, "sm_90")
    (path,) = tmp_path.rglob("*.cubin")
    path.write_bytes(_damage(first.cubin, how))
    again = compile_source(kernel, "sm_90")
    assert not again.cached and again.cubin == first.cubin
    assert path.read_bytes() == first.cubin  # the bad entry was replaced
    assert compile_source(kernel, "sm_90").cached
    assert list(tmp_path.rglob("*.tmp")) == []


def test_cache_writes_are_fsynced(tmp_path, monkeypatch):
    monkeypatch.setenv("VIDRIAL_CACHE_DIR", str(tmp_path))
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    compile_source(render("testing/axpy.cu.j2", "axpy_fsync", {"vec": 1}), "sm_80")
    assert len(synced) >= 2  # the cubin and its facts


def _entry_paths(root: Path, key: str) -> tuple[Path, Path]:
    base = root / "cubin" / key[:2] / key
    return base.with_suffix(".cubin"), base.with_suffix(".json")


def test_cache_evicts_least_recently_used_entries_over_the_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("VIDRIAL_CACHE_DIR", str(tmp_path))
    a, b, c = (render("testing/axpy.cu.j2", f"axpy_lru{v}", {"vec": v}) for v in (1, 2, 4))
    ka, kb = compile_source(a, "sm_80").cache_key, compile_source(b, "sm_80").cache_key
    for age, key in ((3000, ka), (2000, kb)):  # a is older than b ...
        for p in _entry_paths(tmp_path, key):
            os.utime(p, (p.stat().st_mtime - age,) * 2)
    assert compile_source(a, "sm_80").cached  # ... until this hit makes b the least recently used
    two = compiling.cache_stats()["bytes"]
    monkeypatch.setenv("VIDRIAL_CACHE_MAX_MB", str(1.5 * two / 2**20))  # room for two entries, not three
    kc = compile_source(c, "sm_80").cache_key
    assert not any(p.exists() for p in _entry_paths(tmp_path, kb))
    assert all(p.exists() for k in (ka, kc) for p in _entry_paths(tmp_path, k))
    assert compiling.cache_stats()["entries"] == 2


@pytest.mark.parametrize("value", ["lots", "-1", "0", "nan"])
def test_cache_limit_env_names_the_variable(value, monkeypatch):
    monkeypatch.setenv("VIDRIAL_CACHE_MAX_MB", value)
    with pytest.raises(InputError, match=rf"^VIDRIAL_CACHE_MAX_MB: got '{value}'"):
        compiling.cache_limit_bytes()


def test_cache_limit_default_is_2_gib(monkeypatch):
    monkeypatch.delenv("VIDRIAL_CACHE_MAX_MB", raising=False)
    assert compiling.cache_limit_bytes() == 2 * 2**30


def test_clear_removes_only_cubin_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("VIDRIAL_CACHE_DIR", str(tmp_path))
    compile_source(render("testing/axpy.cu.j2", "axpy_clear", {"vec": 1}), "sm_80")
    foreign = [tmp_path / "cubin" / "README.txt", tmp_path / "cubin" / "ab" / "notes.json",
               tmp_path / "tuned_configs" / "nvidia-h200" / "update_state.json"]
    for f in foreign:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("not vidrial's cubin cache")
    key = "ab" + "0" * 62
    stale, fresh = (tmp_path / "cubin" / "ab" / f"{key}.cubin{tag}.tmp" for tag in ("old", "new"))
    for f in (stale, fresh):
        f.write_bytes(b"partial")
    os.utime(stale, (1.0, 1.0))  # an interrupted write; the fresh one may be a write in progress
    compiling.clear_cache()
    assert compiling.cache_stats() == {"entries": 0, "bytes": 0}
    assert all(f.exists() for f in foreign)
    assert not stale.exists() and fresh.exists()
    assert not list((tmp_path / "cubin").rglob("*.cubin"))


def test_cache_command_info_and_clear(tmp_path, monkeypatch, capsys):
    from vidrial.cli import main

    monkeypatch.setenv("VIDRIAL_CACHE_DIR", str(tmp_path))
    compile_source(render("testing/axpy.cu.j2", "axpy_cli", {"vec": 1}), "sm_80")
    for argv in (["cache"], ["cache", "info"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert str(tmp_path / "cubin") in out and "1 entries" in out and "limit" in out
    assert main(["cache", "clear"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert compiling.cache_stats()["entries"] == 0
