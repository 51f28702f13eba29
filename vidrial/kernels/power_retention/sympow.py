"""The tiled symmetric power feature layout (docs/MATH.md section 2), one integer knob d_tile.

x (length d) is split into n = d / d_tile tiles. Features come in blocks, one per
multiset of p tile indices, enumerated as non-decreasing tuples (i_1 <= ... <= i_p) in
itertools.combinations_with_replacement order. Block M holds the T^p entries

    phi_M(x)[e] = sqrt(dup(M)) * x[i_1*T + a_1] * ... * x[i_p*T + a_p],
    e = a_1*T^(p-1) + ... + a_p   (row-major over the offsets),

with dup(M) = p! / prod(multiplicity!). Then phi(x).phi(y) = (x.y)^p exactly, and
D = C(n+p-1, p) * T^p. This order is part of the state's layout: kernels, references
and inference all use this module's tables.
"""
from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass
from functools import cache, cached_property

from vidrial.core.errors import InputError

SUPPORTED_DEGREES = (2, 4)


def _check_layout(head_dim: int, deg: int, d_tile: int) -> None:
    if deg not in SUPPORTED_DEGREES:
        raise InputError("deg", deg, f"one of {SUPPORTED_DEGREES} (an even degree keeps weights non-negative)")
    if head_dim <= 0:
        raise InputError("head_dim", head_dim, "a positive integer")
    if d_tile <= 0 or head_dim % d_tile:
        divisors = [t for t in range(1, head_dim + 1) if head_dim % t == 0]
        raise InputError("d_tile", d_tile, f"a divisor of head_dim={head_dim}: {divisors}")


@dataclass(frozen=True)
class SympowLayout:
    head_dim: int
    deg: int
    d_tile: int

    def __post_init__(self) -> None:
        _check_layout(self.head_dim, self.deg, self.d_tile)

    @property
    def n_tiles(self) -> int:
        return self.head_dim // self.d_tile

    @property
    def block_size(self) -> int:
        return self.d_tile**self.deg

    @cached_property
    def blocks(self) -> tuple[tuple[int, ...], ...]:
        return tuple(itertools.combinations_with_replacement(range(self.n_tiles), self.deg))

    @property
    def n_blocks(self) -> int:
        return math.comb(self.n_tiles + self.deg - 1, self.deg)

    @property
    def feature_dim(self) -> int:
        """D, the number of features (rows of the state)."""
        return self.n_blocks * self.block_size

    @cached_property
    def block_coefficients(self) -> tuple[float, ...]:
        return tuple(math.sqrt(duplication_count(b)) for b in self.blocks)

    def feature_indices(self):
        """LongTensor [D, p] of the x indices multiplied into each feature, and float64 [D] coefficients."""
        import torch

        T, p = self.d_tile, self.deg
        offsets = torch.tensor(list(itertools.product(range(T), repeat=p)), dtype=torch.long)  # [T^p, p]
        tiles = torch.tensor(self.blocks, dtype=torch.long)  # [n_blocks, p]
        idx = (tiles[:, None, :] * T + offsets[None, :, :]).reshape(-1, p)
        coef = torch.tensor(self.block_coefficients, dtype=torch.float64).repeat_interleave(T**p)
        return idx, coef


def duplication_count(multiset: tuple[int, ...]) -> int:
    """p! / prod(multiplicity!): how many ordered tuples give this multiset."""
    out = math.factorial(len(multiset))
    for m in Counter(multiset).values():
        out //= math.factorial(m)
    return out


@cache
def layout(head_dim: int, deg: int, d_tile: int) -> SympowLayout:
    return SympowLayout(head_dim, deg, d_tile)


def feature_dim(head_dim: int, deg: int, d_tile: int) -> int:
    """D = C(d/T + p - 1, p) * T^p."""
    return layout(head_dim, deg, d_tile).feature_dim


def default_d_tile(head_dim: int, deg: int) -> int:
    """MMA-friendly default: 8 for p=2 (D=2304 at d=64), 4 for p=4 (keeps D moderate)."""
    wanted = 8 if deg == 2 else 4
    return wanted if head_dim % wanted == 0 else 1


# ---- the device block table (templates/common/sympow.cuh says why a table) --------------------------
def block_table_values(head_dim: int, deg: int, d_tile: int) -> list[int]:
    """One u32 per feature block, byte j = tile index i_{j+1} (this module's order)."""
    out = []
    for blk in layout(head_dim, deg, d_tile).blocks:
        packed = 0
        for j, tile in enumerate(blk):
            packed |= int(tile) << (8 * j)
        out.append(packed)
    return out


_TABLES: dict[tuple[int, int, int, object], object] = {}


def block_table(head_dim: int, deg: int, d_tile: int, device: object) -> object:
    """The block table as an int32 tensor on `device`, cached per layout and device. Built (one
    host->device copy) on the first call: run a kernel once before capturing a CUDA graph (the first
    call also compiles or loads the kernel)."""
    import torch

    memo = (head_dim, deg, d_tile, device)
    table = _TABLES.get(memo)
    if table is None:
        vals = [v - (1 << 32) if v >= 1 << 31 else v for v in block_table_values(head_dim, deg, d_tile)]
        table = _TABLES[memo] = torch.tensor(vals, dtype=torch.int32, device=device)
    return table
