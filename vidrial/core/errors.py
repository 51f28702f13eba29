"""Exceptions that name what was given and what is allowed."""
from __future__ import annotations

from typing import Any


class VidrialError(Exception):
    """Base class of vidrial's own errors."""


class InputError(VidrialError, ValueError):
    """A bad argument to a public op: names the argument, the value and the rule."""

    def __init__(self, argument: str, given: Any, allowed: str):
        self.argument, self.given, self.allowed = argument, given, allowed
        super().__init__(f"{argument}: got {given}; expected {allowed}")


class ToolchainError(VidrialError, RuntimeError):
    """NVRTC or the CUDA headers are missing or unusable."""


class CompileError(VidrialError, RuntimeError):
    """NVRTC rejected a rendered kernel; carries the log with source line numbers."""


class LaunchError(VidrialError, RuntimeError):
    """A kernel could not be loaded or launched."""


class ConfigError(VidrialError, ValueError):
    """A kernel config that cannot work for a problem or target: names field, value and rule."""

    def __init__(self, field: str, value: Any, rule: str):
        self.field, self.value, self.rule = field, value, rule
        super().__init__(f"{field}={value!r}: {rule}")


class MissingExtraError(InputError):
    """A feature whose optional dependencies (a pip extra) are not installed; the message says what to install."""

    def __init__(self, extra: str, module: str, feature: str):
        super().__init__(f"vidrial[{extra}]", f"{module} is not installed", f'pip install "vidrial[{extra}]"')
        self.extra, self.module, self.feature = extra, module, feature
        # one line: str(exc) is what the CLI prints
        self.args = (f'{feature} needs {module}, which is not installed: pip install "vidrial[{extra}]"',)

    def __str__(self) -> str:
        return self.args[0]


def require_extra(extra: str, modules: tuple[str, ...], feature: str) -> None:
    """Raises MissingExtraError naming `pip install "vidrial[<extra>]"` when one of `modules` cannot be imported
    (the light install leaves the tuner's, bench's and plots' dependencies out)."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise MissingExtraError(extra, module, feature) from exc
