"""A kernel family: one template, one config schema, one problem key, one launch path.

Subclasses give the template, the Config/Key models, the rendering context, the dynamic shared
memory, the threads per block and the checks that tie a config to a problem and a target; and, for
the launch path, how inputs are checked (`prepare`), how the problem key is read off them
(`problem_key`), which outputs a call allocates (`outputs`) and each launch's grid and arguments
(`launches`). Everything else is shared here: rendering, compiling, memoised launchables,
feasibility from compiled facts, and `family(config=None, **inputs)`, which runs
prepare -> key -> dispatch -> cached cubin -> launch on the current stream for every family
(docs/ADDING_A_KERNEL.md)."""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Generic, TypeVar

from vidrial.core.arch import arch_limits, normalize_arch
from vidrial.core.compile import CompiledKernel, compile_source
from vidrial.core.config import KernelConfig, ProblemKey
from vidrial.core.errors import ConfigError, InputError
from vidrial.core.launch import LaunchableKernel, arch_of, current_stream_handle, host_launcher
from vidrial.core.render import RenderedKernel, render, template_hash
from vidrial.dispatch import record as _record

K = TypeVar("K", bound=ProblemKey)
C = TypeVar("C", bound=KernelConfig)


@dataclass(frozen=True)
class Launch:
    """One kernel launch of a call: the grid and the arguments in `signature` order. `keep`: temporaries
    made for this launch whose pointers are in `args`; they must live until the launch is enqueued
    (afterwards the caching allocator's stream order keeps their memory until the kernel is done)."""

    grid: tuple[int, int, int]
    args: tuple[Any, ...]
    keep: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Plan:
    """One call of a family, resolved: its key and config, the prepared inputs, the outputs and launches."""

    key: Any
    config: Any
    device: Any
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    launches: list[Launch]


class KernelFamily(ABC, Generic[K, C]):
    name: ClassVar[str]
    template: ClassVar[str]
    Config: ClassVar[type[KernelConfig]]
    Key: ClassVar[type[ProblemKey]]
    # kernel parameters in order, as vidrial.core.launch.PARAM_CODES names
    signature: ClassVar[tuple[str, ...]]

    def __init__(self) -> None:
        self._launchables: dict[tuple[K, C, str], LaunchableKernel] = {}

    # ---- what each family defines -------------------------------------------------
    @abstractmethod
    def default_config(self, key: K) -> C:
        """A safe config for `key` (used when nothing is tuned)."""

    @abstractmethod
    def render_context(self, key: K, config: C) -> dict[str, Any]:
        """Template variables (compile-time constants) for `key` and `config`."""

    @abstractmethod
    def threads_per_block(self, config: C) -> int: ...

    @abstractmethod
    def dynamic_smem_bytes(self, key: K, config: C) -> int: ...

    def check(self, key: K, config: C, arch: str) -> None:
        """Raises ConfigError when `config` cannot run `key` on `arch`.

        Subclasses add their own rules and call super().check()."""
        limits = arch_limits(arch)
        threads = self.threads_per_block(config)
        if threads > limits.max_threads_per_block:
            raise ConfigError("warps", getattr(config, "warps", threads // 32),
                              f"{threads} threads per block exceed {limits.max_threads_per_block}")
        smem = self.dynamic_smem_bytes(key, config)
        if smem > limits.max_dynamic_smem_per_block:
            raise ConfigError("config", config.label(),
                              f"needs {smem} bytes of shared memory; {limits.arch} allows "
                              f"{limits.max_dynamic_smem_per_block} per block")

    # ---- implementations: a family may have more than one template (e.g. mma.sync for sm_80 and a
    # Hopper wgmma kernel); the config says which one (its `impl` field), these hooks follow it.
    def template_for(self, config: C) -> str:
        """The template `config` renders (the family's only one unless it has implementations)."""
        return self.template

    def target_arch(self, config: C, arch: str) -> str:
        """The compile target of `config` for a GPU of `arch` (e.g. sm_90a for a wgmma kernel on sm_90)."""
        return arch

    def default_config_for(self, key: K, arch: str | None) -> C:
        """The default config on `arch` (None: not known, e.g. host emulation or `vidrial show` for an
        absent GPU): default_config(key) unless the family picks an implementation per arch."""
        return self.default_config(key)

    def shape_keys(self) -> list[K]:
        """The keys the standard problems dispatch (power_retention/standard_shapes.py): what shipped
        configs must cover, tuned by `--preset shapes`. A prefix of standard_keys()."""
        return []

    def standard_keys(self) -> list[K]:
        """Problem keys compiled by `vidrial compile` and tuned by `--preset standard`: shape_keys()
        first, then the variants users also run (other dtypes, ungated, other chunk sizes)."""
        return self.shape_keys()

    def corner_configs(self, key: K) -> list[C]:
        """Extreme but valid configs (smallest/largest tiles) for compile coverage."""
        return [self.default_config(key)]

    # ---- shared machinery ------------------------------------------------------------
    @cached_property
    def template_hash(self) -> str:
        """The hash of every template the family renders (with their includes): names its tuning
        studies, so a study restarts when any implementation changes. Tuned entries store the hash of
        their own implementation's template (template_hash_for)."""
        names = self.implementation_templates()
        if len(names) == 1:
            return template_hash(names[0])
        return hashlib.sha256("|".join(template_hash(n) for n in names).encode()).hexdigest()[:16]

    def implementation_templates(self) -> tuple[str, ...]:
        """Every template template_for() may return."""
        return (self.template,)

    def template_hash_for(self, config: C) -> str:
        """The hash stored with a tuned `config`: that of the template it renders, so an entry goes stale
        only when its own implementation's source changes."""
        if len(self.implementation_templates()) == 1:
            return self.template_hash  # (test doubles without a template file override template_hash)
        return template_hash(self.template_for(config))

    def entry_name(self, key: K, config: C) -> str:
        """Only the compile-time part of the key names the kernel: a new runtime bucket (batch,
        heads, chunks) reuses the same source, cubin and cache entry, so it never recompiles."""
        text = json.dumps(key.compile_part(), sort_keys=True) + config.model_dump_json()
        return f"{self.name}_{hashlib.sha256(text.encode()).hexdigest()[:12]}"

    def render(self, key: K, config: C) -> RenderedKernel:
        return render(self.template_for(config), self.entry_name(key, config), self.render_context(key, config))

    def compile(self, key: K, config: C, arch: str, use_cache: bool = True) -> CompiledKernel:
        self.check(key, config, arch)
        return compile_source(self.render(key, config), self.target_arch(config, normalize_arch(arch)),
                              label=f"{self.name}: {key.label()} | {config.label()}", use_cache=use_cache)

    def infeasible_reason(self, key: K, config: C, compiled: CompiledKernel) -> str | None:
        """Why compiled facts rule the config out before timing (None when fine)."""
        facts = compiled.facts
        limits = arch_limits(compiled.arch)
        if facts.spills:
            return f"spills {facts.spill_store_bytes} B stores / {facts.spill_load_bytes} B loads"
        smem = facts.static_smem_bytes + self.dynamic_smem_bytes(key, config)
        if smem > limits.max_dynamic_smem_per_block:
            return f"{smem} B shared memory > {limits.max_dynamic_smem_per_block}"
        if facts.registers * self.threads_per_block(config) > limits.registers_per_sm:
            return f"{facts.registers} registers x {self.threads_per_block(config)} threads exceed the register file"
        return None

    # ---- optional measurement protocol (used by the tuner, vidrial/tuning) -------------
    # A family that implements make_inputs/run/reference can be tuned: the tuner makes
    # inputs once per key, checks each config's first run against reference() and times
    # run(). See docs/HELPERS.md, "Tuner protocol".
    def make_inputs(self, key: K, device: Any, seed: int) -> dict[str, Any]:
        """Random inputs (torch tensors on `device`) for one problem of `key`."""
        raise NotImplementedError(f"kernel family {self.name!r} does not implement make_inputs(key, device, seed); "
                                  "the tuner needs it (see docs/HELPERS.md, 'Tuner protocol')")

    def run(self, key: K, config: C, inputs: dict[str, Any]) -> Any:
        """Launches the kernel built with `config` on `inputs` (current stream, no sync); returns the outputs."""
        raise NotImplementedError(f"kernel family {self.name!r} does not implement run(key, config, inputs); "
                                  "the tuner needs it (see docs/HELPERS.md, 'Tuner protocol')")

    def reference(self, key: K, inputs: dict[str, Any]) -> Any:
        """The expected outputs for `inputs`, computed without the kernel (e.g. in torch)."""
        raise NotImplementedError(f"kernel family {self.name!r} does not implement reference(key, inputs); "
                                  "the tuner needs it (see docs/HELPERS.md, 'Tuner protocol')")

    def inputs_key(self, inputs: dict[str, Any], key: K) -> K | None:
        """The key the public op computes (and dispatches on) when run(key, config, inputs) launches
        `inputs`, from shapes and dtypes only. The tuner stores its winner under `key`, so this must
        be `key` itself; the worker refuses inputs that break it (docs/TUNING.md, "What the tuner
        times"). None: the family does not say, and nothing is checked."""
        return None

    def check_outputs(self, key: K, inputs: dict[str, Any], outputs: Any, expected: Any) -> float:
        """Relative error of `outputs` against `expected` (= reference(key, inputs), computed once
        per key): max over tensors of max|out - exp| / max(max|exp|, 1e-6), in float32.

        reference() may cover a leading slice of each output (e.g. the first heads and chunks of a
        problem timed at full size, to bound the float64 work): outputs are compared on that slice."""
        import torch

        outs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        exps = expected if isinstance(expected, (tuple, list)) else (expected,)
        if len(outs) != len(exps):
            raise ValueError(f"{self.name}: run() gave {len(outs)} outputs, reference() {len(exps)}")
        err = 0.0
        for out, exp in zip(outs, exps):
            if out is None and exp is None:
                continue
            if not isinstance(out, torch.Tensor) or not isinstance(exp, torch.Tensor):
                out, exp = torch.as_tensor(out, dtype=torch.float64), torch.as_tensor(exp, dtype=torch.float64)
            out, exp = out.float(), exp.to(out.device).float()
            if out.shape != exp.shape:
                if out.dim() != exp.dim() or any(e > o for e, o in zip(exp.shape, out.shape)):
                    raise ValueError(f"{self.name}: output shape {tuple(out.shape)} != reference {tuple(exp.shape)} "
                                     "(a reference may only cover a leading slice of an output)")
                out = out[tuple(slice(0, n) for n in exp.shape)]
            if not torch.isfinite(out).all():
                return float("inf")
            scale = max(exp.abs().max().item() if exp.numel() else 0.0, 1e-6)
            err = max(err, ((out - exp).abs().max().item() if out.numel() else 0.0) / scale)
        return err

    def tolerance(self, key: K) -> float:
        """Largest relative error check_outputs may report for a correct config."""
        return 2e-2

    # ---- the launch path -------------------------------------------------------------------------
    # A launchable family defines prepare, problem_key, outputs and launches; __call__ does the rest.
    def prepare(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Checks a call's inputs (InputError naming the argument, what was given, what is allowed) and
        returns them as the kernel reads them (contiguous, converted); may add derived values."""
        raise NotImplementedError(f"kernel family {self.name!r} has no launch path (prepare)")

    def problem_key(self, inputs: dict[str, Any]) -> K:
        """The dispatch key of prepared inputs: compile-time facts plus buckets of the runtime sizes."""
        raise NotImplementedError(f"kernel family {self.name!r} has no launch path (problem_key)")

    def outputs(self, key: K, config: C, inputs: dict[str, Any]) -> dict[str, Any]:
        """The tensors a call returns (allocated here, written by the kernel)."""
        raise NotImplementedError(f"kernel family {self.name!r} has no launch path (outputs)")

    def launches(self, key: K, config: C, inputs: dict[str, Any], outputs: dict[str, Any]) -> Iterable[Launch]:
        """The launches of one call (none for an empty problem)."""
        raise NotImplementedError(f"kernel family {self.name!r} has no launch path (launches)")

    def plan(self, config: C | None = None, **inputs: Any) -> "Plan":
        """Everything a call does short of launching: prepare -> problem key -> config (the dispatcher's
        unless given) -> outputs -> launches. The CPU tests execute a plan's launches on the host."""
        inputs = self.prepare(inputs)
        key = self.problem_key(inputs)
        device = _device_of(inputs)
        config = self.config_for(key, device, config)
        outputs = self.outputs(key, config, inputs)
        if device.type == "meta":  # a recording's dry run: shapes only, nothing to launch
            return Plan(key, config, device, inputs, outputs, [])
        return Plan(key, config, device, inputs, outputs, list(self.launches(key, config, inputs, outputs)))

    def __call__(self, config: C | None = None, **inputs: Any) -> dict[str, Any]:
        """Runs the family on `inputs` (its plan, launched on the current stream with the cached cubin):
        no host sync, no copies beyond prepare's. Returns the outputs."""
        plan = self.plan(config, **inputs)
        if plan.launches:
            kernel = self.kernel_for(plan.key, plan.config, plan.device)
            block = (self.threads_per_block(plan.config), 1, 1)
            dev = plan.device.index or 0
            stream = 0 if plan.device.type == "cpu" else current_stream_handle(dev)
            for launch in plan.launches:
                kernel.launch(launch.grid, block, launch.args, dev, stream)
        return plan.outputs

    def config_for(self, key: K, device: Any, config: C | None = None) -> C:
        """`config` when given (type-checked), else the dispatcher's pick for `key` on the device's GPU
        (the default config for host-emulated CPU tensors and a recording's meta tensors, which have no
        GPU to be tuned for). Keys dispatched here (config None) are what `vidrial.tuning.record` records."""
        if config is not None:
            if not isinstance(config, self.Config):
                raise InputError("config", type(config).__name__, f"None or a {self.Config.__name__}")
            return config
        # the one dispatch point: what vidrial.tuning.record(...) sees (a contextvar read when not recording)
        _record.note(self, key)
        if device.type in ("cpu", "meta"):  # no GPU to be tuned for (meta: a recording's dry run)
            return self.default_config(key)
        from vidrial.dispatch import current_gpu, select_config

        return select_config(self, key, current_gpu(device.index))

    def kernel_for(self, key: K, config: C, device: Any) -> Any:
        """The launchable for `key` on `device`: compiled for the device's arch from the key's compile
        part only (a new batch size or sequence length never renders or compiles), or the installed
        host launcher for CPU tensors."""
        if device.type == "cpu":
            return host_launcher()(self, key, config)
        return self.launchable(self.compile_key(key), config, arch_of(device.index))

    def compile_key(self, key: K) -> K:
        """`key` with its runtime buckets at their defaults: the cubin depends on the compile fields only."""
        fields = type(key).model_fields
        return key.model_copy(update={k: fields[k].default for k in key.runtime_part()})

    def launchable(self, key: K, config: C, arch: str) -> LaunchableKernel:
        """Memoised: the hot path does no rendering, hashing or file access after the first call."""
        memo_key = (key, config, arch)
        kernel = self._launchables.get(memo_key)
        if kernel is None:
            arch = normalize_arch(arch)
            kernel = LaunchableKernel(self.compile(key, config, arch), self.signature,
                                      self.dynamic_smem_bytes(key, config))
            self._launchables[memo_key] = kernel
        return kernel


def _device_of(inputs: dict[str, Any]) -> Any:
    """The device of a call: that of its tensor inputs, which must all be on one device kernels run on
    (CUDA; the CPU only where a host launcher is installed, see core.launch; meta only inside
    vidrial.tuning.record, where calls are planned to record their keys and launch nothing)."""
    import torch

    from vidrial.core.launch import runs_on

    def usable(dev: Any) -> bool:
        return runs_on(dev) or (dev.type == "meta" and _record.recording())

    device = None
    for name, value in inputs.items():
        if not isinstance(value, torch.Tensor):
            continue
        if device is None:  # the first tensor's device must run kernels; the others must match it
            device = value.device
            if not usable(device):
                raise InputError(name, f"device {device}", "a CUDA tensor")
        elif value.device != device:
            if not usable(value.device):
                raise InputError(name, f"device {value.device}", "a CUDA tensor")
            raise InputError(name, f"device {value.device}", f"the device of the other inputs ({device})")
    if device is None:
        raise InputError("inputs", sorted(inputs), "at least one tensor")
    return device
