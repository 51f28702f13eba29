"""The project's documents are in the repo, and the code cites them there.

* nothing outside templates/ cites a file outside the repo (the shared folder of the sessions that built
  it) or the math/design/benchmark documents without their docs/ path;
* every cited docs/<NAME>.md exists, and every "docs/MATH.md section N" (and "section N step M") names a
  numbered section of docs/MATH.md; every "docs/DESIGN.md principle N" one of its principles;
* README's python blocks are valid Python, and its first block keeps the test command that .ci/run runs.

templates/ is left out on purpose: a comment there is part of the template hash that the shipped tuned
configs are keyed by. benchmarks/results/ holds raw logs of past runs, kept as they were printed.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED_DIRS = ("vidrial", "tests", "benchmarks", "docs", "search_spaces", ".ci")
TOP_FILES = ("README.md", "pyproject.toml", "setup.py", "MANIFEST.in")
SKIPPED = ("templates", "benchmarks/results")
TEXT_SUFFIXES = {".py", ".md", ".toml", ".sh", ".cfg", ".in", ".txt", ".yml", ".yaml", ""}

OUTSIDE = re.compile(r"\.\./shared|/work/shared")
BARE_DOC = re.compile(r"(?<![\w/.])(MATH|ANCHORS|DESIGN)\.md")
DOC_CITE = re.compile(r"\bdocs/([A-Za-z_]+\.md)")
MATH_SECTION = re.compile(r"docs/MATH\.md,?\s+sections?\s+((?:\d+(?:\.\d+)?(?:\s*(?:-|,|and)\s*)?)+)(?:\s+step\s+(\d+))?")
DESIGN_PRINCIPLE = re.compile(r"docs/DESIGN\.md,?\s+principles?\s+(\d+)")


def _files() -> list[Path]:
    out = [ROOT / f for f in TOP_FILES if (ROOT / f).is_file()]
    for d in SCANNED_DIRS:
        for p in sorted((ROOT / d).rglob("*")):
            rel = p.relative_to(ROOT).as_posix()
            if not p.is_file() or p.suffix not in TEXT_SUFFIXES or "__pycache__" in rel:
                continue
            if any(rel == s or rel.startswith(s + "/") for s in SKIPPED) or p.resolve() == Path(__file__).resolve():
                continue
            out.append(p)
    return out


def _lines():
    for p in _files():
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            yield f"{p.relative_to(ROOT).as_posix()}:{n}", line


def _math_sections() -> set[str]:
    """'1', '1.4', '3', '3.2', ... from the numbered headings of docs/MATH.md."""
    heads = re.findall(r"^#{2,3}\s+(\d+(?:\.\d+)?)\.?\s", (ROOT / "docs/MATH.md").read_text(), re.M)
    return set(heads)


def _numbers(spec: str) -> list[str]:
    """'1-3' -> 1, 2, 3; '1, 3.3' -> 1, 3.3; '3 and 4' -> 3, 4."""
    out: list[str] = []
    for part in re.split(r"\s*(?:,|and)\s*", spec.strip(" ,")):
        if not part:
            continue
        if "-" in part:
            a, b = (x.strip() for x in part.split("-", 1))
            out += [str(i) for i in range(int(float(a)), int(float(b)) + 1)]
        else:
            out.append(part.strip())
    return out


def test_the_documents_exist():
    for name in ("MATH.md", "DESIGN.md", "BENCHMARKS.md", "ADDING_A_KERNEL.md", "TUNING.md", "HELPERS.md"):
        assert (ROOT / "docs" / name).is_file(), name


def test_no_citation_outside_the_repo():
    bad = [f"{where}: {line.strip()}" for where, line in _lines() if OUTSIDE.search(line)]
    assert not bad, "cite docs/... instead of files outside the repo:\n" + "\n".join(bad)


def test_documents_are_cited_with_their_docs_path():
    bad = [f"{where}: {line.strip()}" for where, line in _lines() if BARE_DOC.search(line)]
    assert not bad, "write docs/MATH.md, docs/DESIGN.md, docs/BENCHMARKS.md (ANCHORS.md is gone):\n" + "\n".join(bad)


def test_cited_documents_exist():
    bad = [f"{where}: docs/{m}" for where, line in _lines() for m in DOC_CITE.findall(line)
           if not (ROOT / "docs" / m).is_file()]
    assert not bad, "cited documents that are not in docs/:\n" + "\n".join(bad)


def test_cited_math_sections_exist():
    sections = _math_sections()
    assert {"1", "2", "3", "3.1", "3.2", "3.3", "3.4", "4", "5", "6"} <= sections, sorted(sections)
    bad, seen = [], 0
    for where, line in _lines():
        for m in MATH_SECTION.finditer(line):
            seen += 1
            nums = _numbers(m.group(1))
            wanted = [f"{nums[-1]}.{m.group(2)}"] if m.group(2) else nums
            bad += [f"{where}: section {w} ({m.group(0)!r})" for w in wanted if w not in sections]
    assert seen > 20, seen  # the pattern still finds the code's citations
    assert not bad, "docs/MATH.md has no such section:\n" + "\n".join(bad)


def test_cited_design_principles_exist():
    text = (ROOT / "docs/DESIGN.md").read_text()
    principles = set(re.findall(r"^(\d+)\.\s+\*\*", text, re.M))
    bad = [f"{where}: principle {n}" for where, line in _lines() for n in DESIGN_PRINCIPLE.findall(line)
           if n not in principles]
    assert not bad, "docs/DESIGN.md has no such principle:\n" + "\n".join(bad)


def test_the_checker_catches_what_it_should():
    assert OUTSIDE.search("see ../shared/MATH.md")
    assert BARE_DOC.search("(MATH.md section 4)") and BARE_DOC.search("ANCHORS.md: A 5.80 ms")
    assert not BARE_DOC.search("(docs/MATH.md section 4)")
    m = MATH_SECTION.search("discumsum (docs/MATH.md section 3 step 2): the scan")
    assert m and _numbers(m.group(1)) == ["3"] and m.group(2) == "2"
    assert _numbers(MATH_SECTION.search("docs/MATH.md sections 1-3)").group(1)) == ["1", "2", "3"]
    assert _numbers(MATH_SECTION.search("(docs/MATH.md sections 1, 3.3).").group(1)) == ["1", "3.3"]


# ---- README ---------------------------------------------------------------------------------------
def _readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)


def test_readme_python_blocks_compile():
    blocks = _readme_blocks("python")
    assert len(blocks) >= 3, "README: training, decode and tuning examples"
    for i, src in enumerate(blocks):
        compile(src, f"README.md python block {i}", "exec")


def test_readme_first_commands_and_ci():
    first = _readme_blocks("bash")[0]
    assert "vidrial compile" in first
    (test_cmd,) = [line.split("#")[0].strip() for line in first.splitlines() if "python -m pytest" in line]
    assert test_cmd.startswith("python -m pytest -q")
    ci = (ROOT / ".ci/run").read_text()
    # CI runs exactly README's test command (pytest-xdist options included: -n needs the [test] extra)
    assert test_cmd in [line.strip() for line in ci.splitlines()], test_cmd


@pytest.mark.parametrize("name", ["MATH", "DESIGN", "BENCHMARKS"])
def test_documents_are_the_projects_own(name):
    """Headed, numbered where the code cites numbers, and not empty."""
    text = (ROOT / "docs" / f"{name}.md").read_text()
    assert text.startswith("# ") and len(text.splitlines()) > 50


def test_readme_training_example_passes_validation_up_to_the_device():
    """The training block's model, run on CPU tensors, gets through every argument check but the device
    one: shapes, dtypes, strides and log_G are what vidrial.power_retention accepts."""
    import torch

    from vidrial.core.errors import InputError

    src = _readme_blocks("python")[0]
    head = src.split("\nvocab, dim")[0]  # the imports and the block class, before the first CUDA call
    ns: dict = {}
    exec(compile(head, "README.md training block", "exec"), ns)
    block = ns["PowerRetentionBlock"](dim=128, heads=2, head_dim=64, chunk=64).bfloat16()
    with pytest.raises(InputError, match="CUDA"):
        block(torch.randn(1, 128, 128, dtype=torch.bfloat16))
