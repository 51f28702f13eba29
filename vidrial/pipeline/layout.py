"""The layout of an inference state (docs/MATH.md section 2): it travels with the state, a mismatch is an error."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vidrial.core.errors import InputError
from vidrial.kernels.power_retention.sympow import feature_dim

__all__ = ["StateLayout", "layout_rule"]


@dataclass(frozen=True)
class StateLayout:
    """The layout of an inference state: it travels with the state (D and dtype are visible in the
    tensor; d_tile is not, so pass it as d_tile= whenever it is not the default)."""

    head_dim: int
    deg: int
    d_tile: int
    dtype: str  # "float32" or "bfloat16"

    @property
    def feature_dim(self) -> int:
        return feature_dim(self.head_dim, self.deg, self.d_tile)

    @staticmethod
    def d_tiles_for(head_dim: int, deg: int, D: int) -> list[int]:
        """The d_tile values whose layout has D features."""
        return [t for t in range(1, head_dim + 1) if head_dim % t == 0 and feature_dim(head_dim, deg, t) == D]

    @classmethod
    def of(cls, state: Any, head_dim: int, deg: int, d_tile: int | None = None) -> "StateLayout":
        """The layout of `state` [b, h, D, d]: checks D against d_tile (or infers d_tile from D when
        None and exactly one d_tile matches); raises InputError otherwise."""
        D = int(state.shape[-2])
        dtype = str(state.dtype).removeprefix("torch.")
        if d_tile is None:
            found = cls.d_tiles_for(head_dim, deg, D)
            if len(found) != 1:
                raise InputError("initial_state", f"D={D}",
                                 f"a feature dim of some d_tile for head_dim={head_dim}, deg={deg}"
                                 + (f" (ambiguous: d_tile in {found}; pass d_tile=)" if found else ""))
            d_tile = found[0]
        out = cls(head_dim, deg, d_tile, dtype)
        if out.feature_dim != D:
            raise InputError("initial_state", f"D={D}", layout_rule(head_dim, deg, d_tile, D))
        return out


def layout_rule(d: int, deg: int, d_tile: int, D_given: int) -> str:
    """What a state of D_given features should have been, and which d_tile it has (the error's 'expected')."""
    want = feature_dim(d, deg, d_tile)
    match = StateLayout.d_tiles_for(d, deg, D_given)
    hint = (f"; a state with D={D_given} has the layout d_tile={match[0]}: pass d_tile={match[0]}" if len(match) == 1
            else f"; D={D_given} is no layout of head_dim={d}, deg={deg}" if not match
            else f"; D={D_given} matches d_tile in {match}: pass the one it was made with")
    return (f"D = feature_dim(head_dim={d}, deg={deg}, d_tile={d_tile}) = {want} (the state layout travels with "
            f"the state: d_tile, D, dtype){hint}")
