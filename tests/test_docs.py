"""Every citation of the math contract names docs/SPEC.md and points at something that exists.

A citation is any mention of the word SPEC (identifiers such as `SPEC_STD` are not mentions) in
the project's code and docs: the .py, .cpp, .cu, .h and .md files under sage_fast/, kernels/,
csrc/, bench/, tests/ and docs/, and README.md. Each must spell the file as `docs/SPEC.md` (from the
repository root), and a following "section N" / "sections N, M and K" / "defect N" must name a
`## N.` heading, or a numbered item of the defects section, of docs/SPEC.md. This file is not
scanned: its checks and examples name sections that do not exist on purpose.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC_PATH = ROOT / "docs" / "SPEC.md"
SCAN_DIRS = ("sage_fast", "kernels", "csrc", "bench", "tests", "docs")
SCAN_FILES = ("README.md",)
SUFFIXES = (".py", ".cpp", ".cu", ".h", ".md")
SKIP_DIRS = {"__pycache__", ".pytest_cache"}

CANONICAL = "docs/SPEC.md"
_WORD = re.compile(r"(?<![A-Za-z0-9_])SPEC(?![A-Za-z0-9_])")
_PATH_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_./-")
# after `docs/SPEC.md`: closing quotes or brackets, then "section(s) | defect(s) <numbers>"
_CITE = re.compile(
    r"""[`'")\]]*[,:]?\s+(?P<kind>section|defect)s?\s+"""
    r"""(?P<nums>\d+(?:\s*(?:,\s*and|,|and|&|-)\s*\d+)*)"""
)
# a line break inside a comment or docstring, with the next line's comment leader
_WRAP = re.compile(r"\s*\n[ \t]*(?:#+|//+|\*)?[ \t]*")
_HEADING = re.compile(r"^## (\d+)\. (.+)$", re.M)
_ITEM = re.compile(r"^(\d+)\. (.+)$", re.M)

# The stable numbering every citation relies on: a word of each section title and of each
# defect. Renumbering docs/SPEC.md would silently repoint the citations; this catches it.
PINNED_SECTIONS = {1: "schedule", 2: "SDE step", 3: "Gradient", 4: "equalizer", 5: "GRPO", 6: "KL",
                   7: "Shapes", 8: "defects"}
PINNED_DEFECTS = {1: "Reward failures", 2: "adaptive KL", 3: "CFG", 4: "permutation", 5: "output_dir",
                  6: "seeds", 7: "flow_grpo", 8: "hyperparameters", 9: "clamp"}


def spec_index(text: str) -> tuple[dict[int, str], dict[int, str]]:
    """(sections, defects) of a SPEC text: number -> title / first line."""
    sections = {int(n): title for n, title in _HEADING.findall(text)}
    defects: dict[int, str] = {}
    for m in _HEADING.finditer(text):
        if "defect" in m.group(2).lower():
            nxt = _HEADING.search(text, m.end())
            body = text[m.end(): nxt.start() if nxt else len(text)]
            defects = {int(n): line for n, line in _ITEM.findall(body)}
            break
    return sections, defects


def _numbers(spec: str) -> list[int]:
    """'1, 2 and 4' -> [1, 2, 4]; '1-3' -> [1, 2, 3]."""
    out: list[int] = []
    for part in re.split(r"\s*(?:,\s*and|,|and|&)\s*", spec):
        if "-" in part:
            lo, hi = (int(x) for x in part.split("-"))
            out += list(range(lo, hi + 1))
        else:
            out.append(int(part))
    return out


def citation_errors(text: str, where: str, sections: dict[int, str], defects: dict[int, str]) -> list[str]:
    """One message per SPEC mention of `text` that is not `docs/SPEC.md` or cites a missing number."""
    errors = []
    for m in _WORD.finditer(text):
        p = m.start()
        line = text.count("\n", 0, p) + 1
        start = p - len("docs/")
        named = (start >= 0 and text[start:p] == "docs/" and text[m.end(): m.end() + 3] == ".md"
                 and (start == 0 or text[start - 1] not in _PATH_CHARS))
        context = text[max(0, p - 30): m.end() + 30].replace("\n", " ")
        if not named:
            errors.append(f"{where}:{line}: cites the contract without naming {CANONICAL}: ...{context}...")
            continue
        after = _WRAP.sub(" ", text[m.end() + 3: m.end() + 300])
        cite = _CITE.match(after)
        if cite is None:
            continue  # the whole document, no number
        table = sections if cite.group("kind") == "section" else defects
        missing = [n for n in _numbers(cite.group("nums")) if n not in table]
        if missing:
            errors.append(f"{where}:{line}: {CANONICAL} has no {cite.group('kind')} {missing}: ...{context}...")
    return errors


def scanned_files(root: Path) -> list[Path]:
    files = [root / name for name in SCAN_FILES if (root / name).is_file()]
    for d in SCAN_DIRS:
        for path in sorted((root / d).rglob("*")):
            if path.suffix in SUFFIXES and path.is_file() and not SKIP_DIRS & set(path.parts) \
                    and path.resolve() != Path(__file__).resolve():
                files.append(path)
    return files


def tree_errors(root: Path, spec_text: str) -> list[str]:
    sections, defects = spec_index(spec_text)
    errors = []
    for path in scanned_files(root):
        text = path.read_text(encoding="utf-8", errors="replace")
        errors += citation_errors(text, str(path.relative_to(root)), sections, defects)
    return errors


@pytest.fixture(scope="module")
def spec_text() -> str:
    assert SPEC_PATH.is_file(), f"{SPEC_PATH} is missing: the math contract lives in the repository"
    return SPEC_PATH.read_text(encoding="utf-8")


def test_spec_numbering_is_contiguous_and_stable(spec_text):
    sections, defects = spec_index(spec_text)
    assert sorted(sections) == list(range(1, len(sections) + 1)), sorted(sections)
    assert sorted(defects) == list(range(1, len(defects) + 1)), sorted(defects)
    for n, word in PINNED_SECTIONS.items():
        assert word.lower() in sections.get(n, "").lower(), (n, word, sections.get(n))
    for n, word in PINNED_DEFECTS.items():
        assert word.lower() in defects.get(n, "").lower(), (n, word, defects.get(n))


def test_every_citation_names_docs_spec_and_resolves(spec_text):
    errors = tree_errors(ROOT, spec_text)
    assert not errors, f"{len(errors)} unresolved SPEC citation(s):\n" + "\n".join(errors)


def _index(spec_text):
    sections, defects = spec_index(spec_text)
    return sections, defects, max(sections) + 1, max(defects) + 1


@pytest.mark.parametrize("template", [
    "see SPEC section 2",  # not the file's name
    "see SPEC's tables",
    "see ../shared/design/SPEC.md section 7",  # a file outside the repository
    "see design/docs/SPEC.md section 2",  # not from the repository root
    "see docs/SPEC.md section {bad_section}",
    "see docs/SPEC.md sections 1, 2 and {bad_section}",
    "see `docs/SPEC.md` section {bad_section}",
    "see docs/SPEC.md defect {bad_defect}",
    "# wrapped: docs/SPEC.md\n# section {bad_section} of the contract",
    "see docs/SPEC.md sections 1-{bad_section}",
])
def test_checker_flags_bad_citations(spec_text, template):
    sections, defects, bad_section, bad_defect = _index(spec_text)
    text = template.format(bad_section=bad_section, bad_defect=bad_defect)
    assert len(citation_errors(text, "x.py", sections, defects)) == 1, text


@pytest.mark.parametrize("text", [
    "see docs/SPEC.md section 2",
    "see `docs/SPEC.md` section 7",
    "(docs/SPEC.md sections 1, 2 and 4)",
    "docs/SPEC.md sections 5 and 6, per pair",
    "docs/SPEC.md section 3's |b|",
    "docs/SPEC.md defect 9: the clamp",
    "The math contract is `docs/SPEC.md`.",
    "SPEC_STD = {}  # an identifier, not a mention",
    "// docs/SPEC.md\n// section 4",
])
def test_checker_accepts_good_citations(spec_text, text):
    sections, defects = spec_index(spec_text)
    assert citation_errors(text, "x.py", sections, defects) == []
