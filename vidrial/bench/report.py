"""The bench's outputs: JSON (every figure), a printed table, a markdown table, PNG plots.

Files written under the output folder:

    bench.json             GPU, date, versions, settings, peers, ceilings, one row per (case, impl)
    bench.md               the tables (markdown), ready for README's results section
    bench_throughput.png   tokens/s vs context length at fixed tokens per batch, fwd and fwd+bwd
    bench_decode.png       decode us/step vs batch (log-log)

Plots need matplotlib (`pip install vidrial[plot]`); without it they are skipped with a note.
`vidrial bench --from-json bench.json --out DIR` redraws tables and plots from a saved run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from vidrial.bench.peers import IMPL_NAMES, LABELS

JSON_NAME = "bench.json"
MD_NAME = "bench.md"
THROUGHPUT_PNG = "bench_throughput.png"
DECODE_PNG = "bench_decode.png"
KIND_TITLES = {"fwd": "forward", "fwd_bwd": "forward+backward", "decode": "decode (one new token)"}
SHORT = {"vidrial": "vidrial", "retention": "retention", "sdpa": "SDPA", "gla": "GLA"}
TABLE_NOTES = {"fwd": "ms per call; % = useful FLOP/s of the bf16 matmul ceiling",
               "fwd_bwd": "ms per forward+backward; % = useful FLOP/s of the bf16 matmul ceiling",
               "decode": "us per step; % = bytes read per second of the copy ceiling"}
COLORS = {"vidrial": "#d62728", "retention": "#1f77b4", "sdpa": "#2ca02c", "gla": "#9467bd"}
MARKERS = {"vidrial": "o", "retention": "s", "sdpa": "^", "gla": "D"}


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, tuples -> lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(doc: dict[str, Any], out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / JSON_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(doc), indent=1, allow_nan=False))
    tmp.replace(path)
    return path


def load_json(path: str | Path, argument: str = "path") -> dict[str, Any]:
    """A saved run (bench.json); InputError naming `argument` when the file is missing or no bench run."""
    from vidrial.core.errors import InputError

    expected = f"a {JSON_NAME} written by `vidrial bench` (a JSON object with a \"results\" list of rows)"
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(argument, f"{path} ({exc.strerror or exc})", expected) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(argument, f"{path} (not valid JSON: {exc})", expected) from None
    if not isinstance(doc, dict):
        raise InputError(argument, f"{path} (a JSON {type(doc).__name__})", expected)
    rows = doc.get("results")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        what = "no \"results\"" if rows is None else f"\"results\" is a {type(rows).__name__}"
        raise InputError(argument, f"{path} ({what})", expected)
    return doc


# ---------------------------------------------------------------- tables

def _by_case(doc: dict[str, Any], kind: str) -> list[tuple[dict[str, Any], dict[str, dict[str, Any]]]]:
    cases: dict[str, dict[str, dict[str, Any]]] = {}
    first: dict[str, dict[str, Any]] = {}
    for r in doc.get("results", []):
        if r.get("kind") != kind:
            continue
        cases.setdefault(r["case"], {})[r["impl"]] = r
        first.setdefault(r["case"], r)
    out = [(first[c], rows) for c, rows in cases.items()]
    out.sort(key=lambda x: (x[0]["shape"]["t"], x[0]["shape"]["b"]) if kind != "decode" else
             (x[0]["shape"]["b"], x[0]["shape"]["t"]))
    return out


def _cell(r: dict[str, Any] | None, kind: str) -> str:
    if r is None:
        return "-"
    if r.get("ms") is None:
        st = r.get("status") or "?"
        return "n/a" if st == "not available" else ("skip" if st == "skipped" else st)
    v = f"{r['ms'] * 1e3:.1f}" if kind == "decode" else f"{r['ms']:.3f}"
    if r.get("status") == "check failed":
        v += " (WRONG)"
    return v


def _ratio(v: dict[str, Any] | None, peer: str) -> str:
    x = ((v or {}).get("vs") or {}).get(peer)
    return f"{x:.2f}x" if x else "-"


def _frac(r: dict[str, Any] | None) -> str:
    x = (r or {}).get("ceiling_fraction")
    return f"{100 * x:.1f}%" if x else "-"


def table_rows(doc: dict[str, Any], kind: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows: shape, ms per implementation, vidrial's speed-up vs each peer, and the
    fraction of the ceiling (matmul for fwd/fwd_bwd, copy for decode) of every implementation."""
    peers = [p for p in IMPL_NAMES if p != "vidrial"]
    unit = "us" if kind == "decode" else "ms"
    head = ["shape", "tags"] + [f"{SHORT[i]} {unit}" for i in IMPL_NAMES]
    head += [f"vidrial vs {SHORT[p]}" for p in peers]
    head += [f"{SHORT[i]} %" for i in IMPL_NAMES]
    rows = []
    for first, impls in _by_case(doc, kind):
        s = first["shape"]
        shape = f"b={s['b']} t={s['t']}"
        row = [shape, ",".join(t for t in first.get("tags", []) if t in ("A", "B"))]
        row += [_cell(impls.get(i), kind) for i in IMPL_NAMES]
        row += [_ratio(impls.get("vidrial"), p) for p in peers]
        row += [_frac(impls.get(i)) for i in IMPL_NAMES]
        rows.append(row)
    return head, rows


def anchor_rows(doc: dict[str, Any]) -> list[list[str]]:
    """vidrial against the fully tuned peer numbers of docs/BENCHMARKS.md (H200 only): one row per
    (kind, shape, peer): vidrial ms, anchor ms, anchor / vidrial."""
    from vidrial.bench.cases import ANCHORS, ANCHORS_GPU

    if (doc.get("gpu") or {}).get("name") != ANCHORS_GPU:
        return []
    rows = []
    for r in doc.get("results", []):
        if r.get("impl") != "vidrial" or r.get("ms") is None:
            continue
        keys = [t for t in r.get("tags", []) if t in ("A", "B")]
        if r["kind"] == "decode":
            keys = [f"b{r['shape']['b']}"]
        for k in keys:
            for peer, ms in ANCHORS.get((r["kind"], k), {}).items():
                rows.append([f"{r['kind']} {k}", peer, f"{r['ms']:.3f}", f"{ms:.3f}", f"{ms / r['ms']:.2f}x"])
    return rows


ANCHOR_HEAD = ["case", "peer (docs/BENCHMARKS.md, tuned)", "vidrial ms", "peer ms", "vidrial vs peer"]


def _fmt_text(head: list[str], rows: list[list[str]]) -> str:
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(cells))  # noqa: E731
    return "\n".join([line(head), line(["-" * x for x in w])] + [line(r) for r in rows])


def _fmt_md(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _kinds(doc: dict[str, Any]) -> list[str]:
    present = {r.get("kind") for r in doc.get("results", [])}
    return [k for k in ("fwd", "fwd_bwd", "decode") if k in present]


def _header_lines(doc: dict[str, Any]) -> list[str]:
    gpu = (doc.get("gpu") or {}).get("name") or "unknown GPU"
    v = doc.get("versions") or {}
    c = doc.get("ceilings") or {}
    cp = (c.get("copy") or {}).get("bytes_per_s")
    mm = (c.get("matmul") or {}).get("flops_per_s")
    vers = ", ".join(f"{k} {v[k]}" for k in ("vidrial", "vidrial_git", "torch", "triton", "cupy", "retention", "fla")
                     if v.get(k))
    lines = [f"{gpu}, {doc.get('date', '?')}, preset {doc.get('preset', '?')}; {vers}",
             f"ceilings measured in the same run: device copy "
             f"{'%.2f TB/s' % (cp / 1e12) if cp else 'n/a'} (read+write), bf16 8192^3 matmul "
             f"{'%.0f TFLOP/s' % (mm / 1e12) if mm else 'n/a'}"]
    for name, p in (doc.get("peers") or {}).items():
        if not p.get("available"):
            lines.append(f"{name}: {p.get('note')}")
        elif p.get("note"):
            lines.append(f"{name} {p.get('version') or ''}: {p.get('note')}")
        for k, why in (p.get("missing") or {}).items():
            lines.append(f"{name} {k}: {why}")
    return lines


def text_report(doc: dict[str, Any]) -> str:
    parts = _header_lines(doc)
    for kind in _kinds(doc):
        head, rows = table_rows(doc, kind)
        parts += ["", f"== {KIND_TITLES[kind]} ({TABLE_NOTES[kind]}) ==", _fmt_text(head, rows)]
    anchors = anchor_rows(doc)
    if anchors:
        parts += ["", "== vidrial vs the fully tuned peers of docs/BENCHMARKS.md (same GPU model, another run) ==",
                  _fmt_text(ANCHOR_HEAD, anchors)]
    parts += ["", "vidrial vs X = X's time / vidrial's time (above 1: vidrial is faster). "
                  "% = FLOPs (exact D, docs/MATH.md section 6) or bytes per second over the measured ceiling."]
    bad = [r for r in doc.get("results", []) if r.get("status") in ("error", "check failed")]
    for r in bad:
        parts.append(f"{r['status']}: {r['case']} {r['impl']}: {r.get('note', '')}"
                     + (f" (check {r['check']['rel_err']:.2e} > {r['check']['tol']})" if r.get("check") else ""))
    return "\n".join(parts)


def markdown_report(doc: dict[str, Any], plots: list[str] | None = None) -> str:
    parts = ["# vidrial bench", ""] + [f"- {x}" for x in _header_lines(doc)]
    for kind in _kinds(doc):
        head, rows = table_rows(doc, kind)
        parts += ["", f"## {KIND_TITLES[kind]}", "", f"{TABLE_NOTES[kind]}.", "", _fmt_md(head, rows)]
    if anchor_rows(doc):
        parts += ["", "## vidrial vs the fully tuned peers of docs/BENCHMARKS.md", "",
                  _fmt_md(ANCHOR_HEAD, anchor_rows(doc))]
    parts += ["", "vidrial vs X = X's time / vidrial's time (above 1: vidrial is faster). Fraction of the "
                  "ceiling: useful FLOPs (exact D, docs/MATH.md section 6) per second over the bf16 matmul rate, "
                  "or for decode the bytes the step must read per second over the copy rate. "
                  "Shape tags A and B: docs/BENCHMARKS.md."]
    for p in plots or []:
        parts += ["", f"![{p}]({p})"]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- plots

def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401

        return True
    except Exception:
        return False


def _plain_ticks(ax) -> None:
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda y, _: f"{y:g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if str(f"{y:g}")[0] in "25" else ""))


def _series(doc: dict[str, Any], kind: str, x_of, y_of) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for r in doc.get("results", []):
        if r.get("kind") != kind or r.get("ms") is None or r.get("status") != "ok":
            continue
        x, y = x_of(r), y_of(r)
        if x is None or y is None:
            continue
        out.setdefault(r["impl"], []).append((x, y))
    return {k: sorted(v) for k, v in out.items()}


def _title(doc: dict[str, Any]) -> str:
    gpu = (doc.get("gpu") or {}).get("name") or "unknown GPU"
    return f"{gpu}, {str(doc.get('date', ''))[:10]}"


def plot_throughput(doc: dict[str, Any], path: str | Path) -> Path | None:
    kinds = [k for k in ("fwd", "fwd_bwd") if k in _kinds(doc)]
    if not kinds:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(kinds), figsize=(6.4 * len(kinds), 4.6), squeeze=False)
    tpb = ((doc.get("settings") or {}).get("preset") or {}).get("tokens_per_batch")
    for ax, kind in zip(axes[0], kinds):
        ser = _series(doc, kind, lambda r: r["shape"]["t"] if "sweep" in r.get("tags", []) else None,
                      lambda r: (r.get("tokens_per_s") or 0) / 1e6 or None)
        for impl in IMPL_NAMES:
            pts = ser.get(impl)
            if not pts:
                continue
            label = LABELS[impl] + (" (flash, causal)" if impl == "sdpa" else "")
            label += " (d x d state)" if impl == "gla" else ""
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=MARKERS[impl], color=COLORS[impl],
                    lw=2.4 if impl == "vidrial" else 1.5, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ts = sorted({p[0] for pts in ser.values() for p in pts})
        if ts:
            ax.set_xticks(ts)
            ax.set_xticklabels([f"{t // 1024}k" if t >= 1024 else str(t) for t in ts])
        ax.set_xlabel("context length t" + (f" (b = {tpb // 1024}k / t tokens per batch)" if tpb else ""))
        ax.set_ylabel("M tokens / s (higher is better)")
        ax.set_title(f"{KIND_TITLES[kind]}: h=8 d=64 p=2 bf16 gating")
        ax.grid(True, which="both", alpha=0.3)
        _plain_ticks(ax)
        ax.legend(fontsize=8)
    fig.suptitle(f"Throughput vs context length, {_title(doc)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_decode(doc: dict[str, Any], path: str | Path) -> Path | None:
    if "decode" not in _kinds(doc):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ser = _series(doc, "decode", lambda r: r["shape"]["b"], lambda r: r.get("us_per_step"))
    if not ser:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    hist = None
    for impl in IMPL_NAMES:
        pts = ser.get(impl)
        if not pts:
            continue
        label = LABELS[impl]
        if impl == "sdpa":
            hist = next((r["shape"]["t"] for r in doc["results"] if r.get("kind") == "decode"), None)
            label += f", {hist // 1024}k-token KV cache" if hist else ""
        if impl == "gla":
            label += " (d x d state)"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=MARKERS[impl], color=COLORS[impl],
                lw=2.4 if impl == "vidrial" else 1.5, label=label)
    bs = sorted({p[0] for pts in ser.values() for p in pts})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(bs)
    ax.set_xticklabels([str(b) for b in bs])
    ax.set_xlabel("batch b (one new token per sequence)")
    ax.set_ylabel("us per step (lower is better)")
    ax.set_title(f"Decode step, h=8 d=64 p=2, {_title(doc)}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    _plain_ticks(ax)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_plots(doc: dict[str, Any], out_dir: str | Path) -> tuple[list[Path], str | None]:
    """(PNG paths written, note or None). No matplotlib -> ([], 'skipped: ...')."""
    if not have_matplotlib():
        return [], "plots skipped: matplotlib is not installed (pip install 'vidrial[plot]')"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, notes = [], []
    for f, name in ((plot_throughput, THROUGHPUT_PNG), (plot_decode, DECODE_PNG)):
        try:
            p = f(doc, out / name)
            if p is not None:
                written.append(p)
        except Exception as exc:  # a plot must not lose the numbers
            notes.append(f"{name} failed: {type(exc).__name__}: {exc}")
    return written, ("; ".join(notes) or None)


def write_all(doc: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """JSON, plots, markdown. Returns {"json", "markdown", "plots", "plot_note"}."""
    out = Path(out_dir)
    plots, note = write_plots(doc, out)
    doc.setdefault("outputs", {})["plots"] = [p.name for p in plots]
    if note:
        doc["outputs"]["plot_note"] = note
    js = write_json(doc, out)
    md = out / MD_NAME
    md.write_text(markdown_report(doc, [p.name for p in plots]))
    return {"json": js, "markdown": md, "plots": plots, "plot_note": note}


README_START = "<!-- bench:start (written by `vidrial bench --readme README.md`) -->"
README_END = "<!-- bench:end -->"


def readme_section(doc: dict[str, Any], plot_paths: list[str]) -> str:
    """The README's results block: GPU and date, the tables, the plots (paths relative to README)."""
    gpu = (doc.get("gpu") or {}).get("name") or "unknown GPU"
    parts = [README_START, "", f"Measured on **{gpu}**, {str(doc.get('date', '?'))[:10]} "
             f"(`vidrial bench --preset {doc.get('preset', '?')}`, {doc.get('elapsed_s', 0):.0f} s).", ""]
    parts += [f"- {x}" for x in _header_lines(doc)[1:]]
    for p in plot_paths:
        parts += ["", f"![{Path(p).stem}]({p})"]
    for kind in _kinds(doc):
        head, rows = table_rows(doc, kind)
        parts += ["", f"**{KIND_TITLES[kind]}** ({TABLE_NOTES[kind]})", "", _fmt_md(head, rows)]
    if anchor_rows(doc):
        parts += ["", "**vidrial vs the fully tuned peers of docs/BENCHMARKS.md** (same GPU model, another run)", "",
                  _fmt_md(ANCHOR_HEAD, anchor_rows(doc))]
    parts += ["", "vidrial vs X = X's time / vidrial's time (above 1: vidrial is faster); % = useful FLOPs "
                  "(exact D, docs/MATH.md section 6) per second over the measured bf16 matmul rate, or for decode the "
                  "bytes a step must read per second over the measured copy rate.", "", README_END]
    return "\n".join(parts)


def update_readme(readme: str | Path, doc: dict[str, Any], plots: list[Path]) -> Path:
    """Replace the block between README_START and README_END (or append it under a
    "## Benchmark results" heading) with `readme_section`."""
    import os

    path = Path(readme)
    text = path.read_text() if path.exists() else ""
    rel = [os.path.relpath(Path(p).resolve(), path.resolve().parent) for p in plots]
    block = readme_section(doc, rel)
    i, j = text.find(README_START), text.find(README_END)
    if i >= 0 and j > i:
        text = text[:i] + block + text[j + len(README_END):]
    else:
        text = text.rstrip("\n") + "\n\n## Benchmark results\n\n" + block + "\n"
    path.write_text(text)
    return path


__all__ = ["update_readme", "readme_section", "write_json", "load_json", "write_all", "write_plots", "text_report", "markdown_report", "table_rows",
           "plot_throughput", "plot_decode", "have_matplotlib"]
