"""Declarative per-field rules for configs and problem keys.

A family's Config/Key lists its simple field rules once, in a `RULES` class variable, instead
of one pydantic validator per field:

    RULES = {"warps": OneOf(WARP_CHOICES), "stages": Between(2, 6, "cp.async pipeline depth")}

`FrozenModel` checks them after parsing and raises ConfigError(field, value, rule text), so the
message names the field, what was given and what is allowed. Rules that tie several fields
together stay model validators of the family."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def _why(why: str) -> str:
    return f" ({why})" if why else ""


@dataclass(frozen=True)
class OneOf:
    choices: tuple[Any, ...]
    why: str = ""

    def __init__(self, choices: Any, why: str = ""):
        object.__setattr__(self, "choices", tuple(choices))
        object.__setattr__(self, "why", why)

    def ok(self, v: Any) -> bool:
        return v in self.choices

    def describe(self) -> str:
        return f"one of {self.choices}{_why(self.why)}"


@dataclass(frozen=True)
class Between:
    lo: int
    hi: int
    why: str = ""

    def ok(self, v: Any) -> bool:
        return self.lo <= v <= self.hi

    def describe(self) -> str:
        return f"between {self.lo} and {self.hi}{_why(self.why)}"


@dataclass(frozen=True)
class MultipleOf:
    step: int
    lo: int | None = None
    hi: int | None = None
    allow_zero: bool = False
    why: str = ""

    def ok(self, v: Any) -> bool:
        if self.allow_zero and v == 0:
            return True
        lo = self.step if self.lo is None else self.lo
        return v % self.step == 0 and v >= lo and (self.hi is None or v <= self.hi)

    def describe(self) -> str:
        span = f" between {self.lo or self.step} and {self.hi}" if self.hi is not None else ""
        text = f"a positive multiple of {self.step}{span}"
        return ("0 or " + text if self.allow_zero else text) + _why(self.why)


@dataclass(frozen=True)
class PowerOfTwo:
    why: str = ""

    def ok(self, v: Any) -> bool:
        return isinstance(v, int) and v >= 1 and not v & (v - 1)

    def describe(self) -> str:
        return f"a power of two >= 1{_why(self.why)}"


Rule = OneOf | Between | MultipleOf | PowerOfTwo

__all__ = ["OneOf", "Between", "MultipleOf", "PowerOfTwo", "Rule"]
