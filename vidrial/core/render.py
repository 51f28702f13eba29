"""Rendering: a Jinja2 environment over templates/ (StrictUndefined, deterministic)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from typing import Any

import jinja2

from vidrial.core.paths import data_dir


@dataclass(frozen=True)
class RenderedKernel:
    """CUDA source of one kernel instance; `source_hash` identifies it everywhere."""

    entry: str  # the extern "C" __global__ function name
    source: str
    template: str

    @property
    def source_hash(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()


@cache
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(data_dir("templates"))),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def render(template: str, entry: str, context: dict[str, Any]) -> RenderedKernel:
    """Renders `template` with `context`; the kernel's entry point is named `entry`."""
    source = environment().get_template(template).render(entry=entry, **context)
    return RenderedKernel(entry=entry, source=source, template=template)


@cache
def template_hash(template: str) -> str:
    """Hash of a template and every template it includes (transitively, by name).

    Stored with tuned configs: a tuned entry is stale when its template changed."""
    env = environment()
    seen: set[str] = set()
    pending = [template]
    digest = hashlib.sha256()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        source, _, _ = env.loader.get_source(env, name)
        digest.update(name.encode() + b"\0" + source.encode() + b"\0")
        ast = env.parse(source)
        from jinja2 import meta

        pending.extend(sorted(n for n in meta.find_referenced_templates(ast) if n))
    return digest.hexdigest()[:16]
