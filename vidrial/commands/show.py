"""`vidrial show`: what is tuned for a GPU, coverage of the standard shapes, stale entries.

    vidrial show                  # the present GPU (or, with none, every GPU found on disk)
    vidrial show --gpu "NVIDIA H200"   # or --gpu nvidia-h200
    vidrial show --json           # the same as one JSON document
    vidrial show --last           # what the last dispatched call chose

Coverage: for each of `family.standard_keys()`, whether dispatch finds an exact tuned
key, a nearest compatible one, or falls back to the default config; separately for the
keys the standard shapes dispatch (`family.shape_keys()`, what shipped configs must cover).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("show", help="list tuned configs, coverage and stale entries",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", metavar="NAME", default=None,
                        help="GPU model name or slug (default: the present GPU, else all found)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--last", action="store_true",
                        help="show what the last dispatched call chose (this process, else the file "
                             "written with VIDRIAL_DEBUG_DISPATCH=1)")
    parser.set_defaults(func=run)
    return parser


def _gpu_slugs(requested: str | None, on_disk: list[Path]) -> tuple[list[str], str | None]:
    """(GPU slugs to report, the present GPU's arch or None); `on_disk`: the tuned files found."""
    from vidrial.core.errors import InputError
    from vidrial.dispatch import store

    slugs = {p.parent.name for p in on_disk}
    if requested and store.slugify(requested) in slugs:
        return [store.slugify(requested)], None
    present = _present_gpu()
    if not requested:
        return ([present.slug], present.arch) if present is not None else (sorted(slugs), None)
    if present is not None and store.slugify(requested) == present.slug:  # this GPU, tuned or not
        return [present.slug], None
    # a typo would otherwise read as "nothing tuned, everything default"
    known = sorted(slugs | ({present.slug} if present is not None else set()))
    raise InputError("gpu", repr(requested), "a GPU model name or slug with tuned configs or present here: "
                     + (", ".join(known) if known else "none found"))


def _present_gpu() -> Any:
    """The present GPU's identity, or None."""
    try:
        from vidrial.core.arch import gpu_available

        if gpu_available():
            from vidrial.dispatch import current_gpu

            return current_gpu()
    except Exception:
        pass
    return None


def _entry_rows(index: Any) -> list[dict[str, Any]]:
    rows = []
    for cand in sorted(index.exact.values(), key=lambda c: c.key_string):
        e = cand.entry
        rows.append({
            "key": cand.key_string,
            "config": cand.config.model_dump(mode="json"),
            "time_ms": e.time_ms,
            "default_time_ms": e.default_time_ms,
            "speedup": e.speedup,
            "trials": e.trials,
            "tuned_at": e.tuned_at,
            "gpu": e.gpu.model_dump(),
            "toolchain": e.toolchain.model_dump(),
            "origin": cand.origin,
            "path": str(cand.path),
        })
    return rows


def report(requested_gpu: str | None = None) -> dict[str, Any]:
    """The data `vidrial show` prints, as a JSON-able dict."""
    from vidrial.core.paths import user_tuned_dir
    from vidrial.dispatch import borrowed_index, build_index, resolve
    from vidrial.kernels import families
    from vidrial.dispatch import store

    shipped = store.shipped_tuned_dir()
    # listed once (an unreadable folder warns once); build_index reports each family's files itself
    on_disk = [p for root in (shipped, user_tuned_dir()) for p in store.tuned_files(root)]
    slugs, present_arch = _gpu_slugs(requested_gpu, on_disk)
    out: dict[str, Any] = {
        "schema_version": store.SCHEMA_VERSION,
        "shipped_dir": None if shipped is None else str(shipped),
        "user_dir": str(user_tuned_dir()),
        "gpus": [],
        "errors": [],
    }
    try:
        fams = families()
    except Exception as exc:  # a broken family module must not hide the rest
        fams = {}
        out["errors"].append(f"loading kernel families: {exc}")
    present = _present_gpu() if present_arch is not None or requested_gpu else None
    for slug in slugs:
        gpu_out: dict[str, Any] = {"gpu": slug, "families": [], "unknown_files": []}
        for name in sorted(fams):
            family = fams[name]
            index = build_index(family, slug, warn=False)
            arch = present_arch or index.arch
            # the present GPU without a file of this family dispatches a same-arch GPU's entries: show those
            borrowed = borrowed_index(family, present) if present is not None and present.slug == slug else None
            used = borrowed if borrowed is not None else index
            if borrowed is not None:
                arch = present.arch
            try:
                standard = list(family.standard_keys())
                shapes = set(family.shape_keys())
            except Exception as exc:
                standard, shapes = [], set()
                out["errors"].append(f"{name}.standard_keys(): {exc}")
            keys = []
            counts = {"exact": 0, "nearest": 0, "default": 0}
            shape_counts = {"exact": 0, "nearest": 0, "default": 0}
            for key in standard:
                try:
                    d = resolve(family, used, key, arch, warn=False)  # d.note says what check rejected
                except Exception as exc:
                    out["errors"].append(f"{name}: resolving {key.key_string()}: {exc}")
                    continue
                counts[d.source] += 1
                if key in shapes:
                    shape_counts[d.source] += 1
                label = d.source if borrowed is None or d.source == "default" else f"{d.source} ({borrowed.gpu}, same arch)"
                keys.append({"key": key.key_string(), "source": d.source, "label": label, "standard_shape": key in shapes,
                             "tuned_key": None if d.tuned_key is None else d.tuned_key.key_string(),
                             "config": d.config.model_dump(mode="json"), "note": d.note})
            gpu_out["families"].append({
                "family": name,
                "template_hash": family.template_hash,
                "files": [{"path": str(f.path), "origin": f.origin, "status": f.status, "entries": f.entries,
                           "used": f.used, "problems": f.problems} for f in index.files],
                "entries": _entry_rows(index),
                # None, or the same-arch GPU whose entries dispatch uses here (this GPU has no file of the family)
                "borrowed_from": None if borrowed is None else borrowed.gpu,
                "coverage": {"standard": len(standard), **counts, "keys": keys,
                             "shapes": {"keys": len(shapes), **shape_counts}},
                "stale": [{"path": str(s.path), "origin": s.origin, "key": s.key, "reason": s.reason}
                          for s in index.stale],
            })
        gpu_out["unknown_files"] = [str(p) for p in on_disk if p.parent.name == slug and p.stem not in fams]
        out["gpus"].append(gpu_out)
    return out


def _last() -> dict[str, Any] | None:
    from vidrial.dispatch import last_dispatch, last_dispatch_file

    found = last_dispatch()
    if found is not None:
        return {**found.as_dict(), "from": "this process"}
    path = last_dispatch_file()
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    data["from"] = str(path)
    return data


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g} ms"


def _print_text(data: dict[str, Any], file=None) -> None:
    file = file or sys.stdout
    p = lambda *a: print(*a, file=file)  # noqa: E731
    p(f"tuned configs (schema {data['schema_version']}): shipped {data['shipped_dir']}, user {data['user_dir']}")
    for err in data["errors"]:
        p(f"error: {err}")
    if not data["gpus"]:
        p("no GPU present and no tuned configs found; use --gpu NAME")
    for g in data["gpus"]:
        p(f"\n== GPU {g['gpu']} ==")
        if not g["families"]:
            p("  no kernel families registered")
        for f in g["families"]:
            cov = f["coverage"]
            p(f"\n  {f['family']} (template {f['template_hash']}): {len(f['entries'])} tuned entries; "
              f"standard keys {cov['standard']}: {cov['exact']} exact, {cov['nearest']} nearest, "
              f"{cov['default']} default")
            if f.get("borrowed_from"):
                p(f"    no tuned file for this GPU: dispatch uses the entries of {f['borrowed_from']} (same arch); "
                  "the counts above and below are over them")
            sc = cov["shapes"]
            p(f"    standard shapes {sc['keys']}: {sc['exact']} exact, {sc['nearest']} nearest, {sc['default']} default")
            for fr in f["files"]:
                extra = f" ({'; '.join(fr['problems'])})" if fr["problems"] else ""
                p(f"    [{fr['origin']}] {fr['path']}: {fr['status']}, {fr['used']}/{fr['entries']} used{extra}")
            for e in f["entries"]:
                speed = "" if e["speedup"] is None else f", {e['speedup']:.2f}x vs default"
                cfg = " ".join(f"{k}={v}" for k, v in e["config"].items())
                p(f"    {e['key']}\n      -> {cfg}  [{_fmt_ms(e['time_ms'])}{speed}, {e['trials']} trials, "
                  f"{e['origin']}]")
            missing = [k for k in cov["keys"] if k["source"] != "exact"]
            if missing:
                p("    standard keys without an exact entry:")
                for k in missing:
                    via = f" (from {k['tuned_key']})" if k["tuned_key"] else ""
                    mark = "  [standard shape]" if k["standard_shape"] else ""
                    p(f"      {k['key']}: {k.get('label', k['source'])}{via}{mark}")
            for k in cov["keys"]:
                if k["note"]:
                    p(f"    passed over: {k['note']}")
            if f["stale"]:
                p(f"    stale / ignored ({len(f['stale'])}):")
                for s in f["stale"]:
                    p(f"      [{s['origin']}] {s['key']}: {s['reason']}")
        for path in g["unknown_files"]:
            p(f"  file for an unregistered family: {path}")
        gaps = sum(f["coverage"]["shapes"]["keys"] - f["coverage"]["shapes"]["exact"] for f in g["families"])
        if gaps:
            p(f"\n  {gaps} standard-shape keys have no exact entry; on this GPU model, fill them with\n"
              f"    vidrial tune --kernel all --preset shapes --skip-tuned --resume")
        if any(f.get("borrowed_from") for f in g["families"]):
            p("\n  families marked 'same arch' use another GPU's entries; tune this GPU's own with\n"
              "    vidrial tune --kernel all --preset shapes   (or your model's keys: vidrial tune --keys keys.json)")
    if "last" in data:
        _print_last(data["last"], file)


def _print_last(last: dict[str, Any] | None, file=None) -> None:
    file = file or sys.stdout
    if last is None:
        print("\nlast dispatch: none recorded (in this process; set VIDRIAL_DEBUG_DISPATCH=1 to record calls "
              "for `vidrial show --last`)", file=file)
        return
    cfg = " ".join(f"{k}={v}" for k, v in last["config"].items())
    key = ",".join(f"{k}={v}" for k, v in last["key"].items())
    print(f"\nlast dispatch ({last['from']}): {last['family']} on {last['gpu']}\n  key {key}\n  config {cfg}\n"
          f"  source {last.get('label') or last['source']}" + (f" ({last['path']})" if last.get("path") else ""),
          file=file)


def run(args: argparse.Namespace) -> int:
    if args.last and not args.gpu:
        last = _last()
        if args.json:
            print(json.dumps({"last": last}, indent=2))
        else:
            _print_last(last)
        return 0
    data = report(args.gpu)
    if args.last:
        data["last"] = _last()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        _print_text(data)
    return 0
