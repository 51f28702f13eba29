"""Base classes for the typed records of a kernel family.

Every family has exactly one `KernelConfig` subclass (tile and layout fields, named
once) and one `ProblemKey` subclass (compile-time constants plus buckets of the
runtime sizes). Both are frozen, hashable and JSON round-trippable."""
from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

from vidrial.core.errors import ConfigError
from vidrial.core.rules import Rule


class FrozenModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    # simple per-field rules (vidrial.core.rules), checked before the subclasses' model validators
    RULES: ClassVar[dict[str, Rule]] = {}

    @model_validator(mode="after")
    def _apply_rules(self) -> "FrozenModel":
        for name, rule in self.RULES.items():
            value = getattr(self, name)
            if not rule.ok(value):
                raise ConfigError(name, value, rule.describe())
        return self

    def label(self) -> str:
        """Compact one-line form for tables and logs: 'tile_m=64 warps=4 ...'."""
        return " ".join(f"{k}={v}" for k, v in self.model_dump(mode="json").items())


class KernelConfig(FrozenModel):
    """Tile and layout choices of one kernel family (searched by the tuner)."""


class ProblemKey(FrozenModel):
    """What a tuned config is keyed by.

    `COMPILE_FIELDS` names the compile-time constants (head dim, degree, d_tile, dtype,
    ...): a tuned config is only reusable for a key with the same values of those. The
    other fields are buckets of runtime sizes (batch*heads, sequence length) that only
    steer which config is fastest; nearest-key dispatch measures distance on them."""

    COMPILE_FIELDS: ClassVar[tuple[str, ...]] = ()

    def compile_part(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.COMPILE_FIELDS}

    def runtime_part(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if k not in self.COMPILE_FIELDS}

    def key_string(self) -> str:
        """Stable text form, used as the JSON store's entry key."""
        return ",".join(f"{k}={v}" for k, v in self.model_dump(mode="json").items())
