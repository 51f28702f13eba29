"""Registry of kernel families. Each family module registers one instance here."""
from __future__ import annotations

from vidrial.core.errors import InputError
from vidrial.core.family import KernelFamily

_FAMILIES: dict[str, KernelFamily] = {}
_FAMILY_MODULES = (
    "vidrial.kernels.power_retention.update_state",
    "vidrial.kernels.power_retention.intra_chunk_attention",
    "vidrial.kernels.power_retention.discumsum",
    "vidrial.kernels.power_retention.query_state",
    "vidrial.kernels.power_retention.update_state_bwd",
    "vidrial.kernels.power_retention.query_state_bwd",
    "vidrial.kernels.power_retention.discumsum_bwd",
    "vidrial.kernels.power_retention.intra_chunk_attention_bwd",
    "vidrial.kernels.power_retention.decode",
)


def register(family: KernelFamily) -> KernelFamily:
    _FAMILIES[family.name] = family
    return family


def _load_all() -> None:
    import importlib

    for module in _FAMILY_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def families() -> dict[str, KernelFamily]:
    _load_all()
    return dict(_FAMILIES)


def get_family(name: str) -> KernelFamily:
    fams = families()
    if name not in fams:
        raise InputError("kernel", repr(name), f"one of {', '.join(sorted(fams))}")
    return fams[name]
