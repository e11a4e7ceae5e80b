"""Every reference in the repository resolves inside it.

Docs, docstrings, comments, configs and results files cite files (``docs/update-rules.md``) and
sections (``docs/distributed-design.md#the-owner-exchange``). A user has only the repository, so a
citation of a path outside it (``../shared/...``), of a Markdown file that does not exist, or of a
section anchor that no heading produces is a broken promise; these tests list every one.
Results files are documents too: each names the script command that wrote it, and the script
keeps a hand-written notes section when it rewrites the file.
"""
from __future__ import annotations

import importlib.util
import os
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", ".venv", "venv", ".hypothesis", ".pytest_cache", "__pycache__", "node_modules", "build",
             "dist", "runs"}
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ini", ".sh", ".rst"}


def repo_files() -> list[Path]:
    """The repository's text files (sources, docs, configs, scripts), not environments or outputs."""
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.suffix in TEXT_SUFFIXES or path.parent.name == ".ci":
                out.append(path)
    return out


def lines_of(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return []
    return list(enumerate(text.splitlines(), start=1))


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    """Anchors of every heading outside code fences (repeats get ``-1``, ``-2``, as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for _, line in lines_of(path):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


# A Markdown path: relative (docs/x.md, ../x.md, x.md), optionally with a section anchor.
MD_REF = re.compile(r"(?<![\w/.{}<>$-])((?:\.\.?/)*(?:[\w.-]+/)*[\w.-]+\.md)(#[\w-]+)?(?![\w/])")


DOCS = ROOT / "docs"
DOC_NAMES = {p.name for p in DOCS.glob("*.md")} | {"update-rules.md", "distributed-design.md"}


def resolve(ref: str, where: Path) -> Path | None:
    """The file a reference names: relative to the citing file, else to the repository root."""
    for base in (where.parent, ROOT):
        candidate = (base / ref).resolve()
        if candidate.is_file():
            return candidate
    return None


def broken_references() -> list[str]:
    problems = []
    for path in repo_files():
        rel = path.relative_to(ROOT)
        if rel == Path(__file__).resolve().relative_to(ROOT):
            continue  # this file spells out the patterns it forbids
        for number, line in lines_of(path):
            where = f"{rel}:{number}"
            if re.search(r"\.\./shared\b|\bshared/spec\b", line):
                problems.append(f"{where}: cites a path outside the repository: {line.strip()}")
            for m in MD_REF.finditer(line):
                ref, anchor = m.group(1), m.group(2)
                if "/" not in ref and path.parent != DOCS:
                    # A bare file name is a citation only when it names a doc (``update-rules.md``):
                    # outside docs/ it does not resolve, so it must be written docs/<name>. Other bare
                    # names are output file names in code ("step.md").
                    if ref in DOC_NAMES:
                        problems.append(f"{where}: cites {ref} without its folder: write docs/{ref}")
                    continue
                target = resolve(ref, path)
                if target is None:
                    problems.append(f"{where}: {ref} does not exist (write it relative to the repository, "
                                    f"e.g. docs/<name>.md)")
                elif not str(target).startswith(str(ROOT) + os.sep):
                    problems.append(f"{where}: {ref} is outside the repository")
                elif anchor and anchor[1:] not in anchors(target):
                    problems.append(f"{where}: {ref} has no section {anchor}; its sections: "
                                    f"{', '.join(sorted(anchors(target)))}")
    return problems


def test_every_reference_resolves_inside_the_repository():
    problems = broken_references()
    assert not problems, "broken references:\n" + "\n".join(problems)


def test_the_docs_the_code_cites_exist():
    for name in ("update-rules.md", "distributed-design.md"):
        assert (ROOT / "docs" / name).is_file(), f"docs/{name} is missing"


def test_reference_check_catches_what_it_should(tmp_path):
    """The checker itself: a missing file, a missing anchor and an existing one."""
    doc = ROOT / "docs" / "update-rules.md"
    assert "the-polar-factor" in anchors(doc)
    assert resolve("docs/update-rules.md", ROOT / "README.md") == doc
    assert resolve("docs/no-such-file.md", ROOT / "README.md") is None
    refs = [m.groups() for m in MD_REF.finditer("see `docs/update-rules.md#notation` and ../x/y.md")]
    assert refs == [("docs/update-rules.md", "#notation"), ("../x/y.md", None)]
    assert slug("Row rules and all-reduced statistics") == "row-rules-and-all-reduced-statistics"
    assert slug("The step: momentum and weight decay") == "the-step-momentum-and-weight-decay"


# ----- results files -----

RESULTS = ROOT / "benchmarks" / "results"


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.md")), ids=lambda p: p.name)
def test_results_file_names_the_script_that_wrote_it(path):
    head = path.read_text(encoding="utf-8").splitlines()[:8]
    command = next((line for line in head if line.startswith("Command:")), None)
    assert command, f"{path.name}: no 'Command:' line in its header: a results file is written by its script"
    script = re.search(r"benchmarks/(\w+\.py)", command)
    assert script and (ROOT / "benchmarks" / script.group(1)).is_file(), \
        f"{path.name}: its command names no script in benchmarks/: {command}"


def _common():
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "benchmarks" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("heading", ["## Notes (by hand)", "## Notes (added by hand after the run)"])
def test_write_results_keeps_the_hand_written_notes(tmp_path, heading):
    common = _common()
    out = tmp_path / "results" / "x.md"
    common.write_results(str(out), ["# x", "", "Command: `python benchmarks/x.py`", "", "old figure 1.0"])
    out.write_text(out.read_text() + f"\n{heading}\n\nwhy the figure moved\n")
    common.write_results(str(out), ["# x", "", "Command: `python benchmarks/x.py`", "", "new figure 2.0"])
    text = out.read_text()
    assert "old figure" not in text and "new figure 2.0" in text
    assert text.endswith(f"\n\n{heading}\n\nwhy the figure moved\n")
    with pytest.raises(ValueError, match="notes section"):
        common.write_results(str(out), ["# x", "## Notes (by hand)", "by a script"])
    assert "why the figure moved" in out.read_text()  # the refused write left the file alone
