"""The docs hold together: every relative link in README.md, BENCHMARKS.md and docs/*.md
resolves (to a file, and a ``#anchor`` to a heading of that file), every doc section the code
cites exists, and the README stays a front page (under 8 KB).

A citation is a doc file followed by a quoted section, in the forms the code uses: ``README,
"Faults"``, ``BENCHMARKS.md ("Precision")``, ``docs/method.md, "The model"``, also across a
comment's line break or a literal ``\\n`` in a string. The named file must have a heading that
contains the section's text. A ``docs/*.md`` named without a section must exist.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
README_LIMIT = 8192  # bytes: the README is a front page, the rest lives in docs/

# ----------------------------------------------------------------------------- markdown


def doc_files(root: Path) -> list[Path]:
    return [root / "README.md", root / "BENCHMARKS.md", *sorted((root / "docs").glob("*.md"))]


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) outside fenced code blocks: a ``# comment`` in a bash block is no
    heading, and a ``[x](y)`` in code is no link."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        mark = re.match(r"^ {0,3}(`{3,}|~{3,})", line)
        if mark:
            if fence is None:
                fence = mark.group(1)
                continue
            if mark.group(1).startswith(fence):
                fence = None
                continue
        if fence is None:
            yield number, line


HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$")


def headings(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [m.group(1) for _, line in prose_lines(text) if (m := HEADING.match(line))]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped except '-' and '_', each
    space a '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor; a repeated one gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for heading in headings(path):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


# [text](target) or ![alt](target), with an optional "title"; text may hold one level of [].
LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?(?P<target>[^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"
)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link outside code blocks and inline code."""
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = re.sub(r"(`+).*?\1", "", line)
        found += [(number, m.group("target")) for m in LINK.finditer(line)]
    return found


def link_problems(root: Path, files: list[Path]) -> list[str]:
    problems = []
    for path in files:
        rel = path.relative_to(root)
        for number, target in links(path):
            if SCHEME.match(target):
                continue  # http(s), mailto: not ours to check
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / unquote(file_part)).resolve() if file_part else path
            where = f"{rel}:{number}: link {target!r}"
            if not dest.exists():
                problems.append(f"{where}: no file {dest.relative_to(root.resolve())}")
            elif anchor:
                if dest.suffix != ".md":
                    problems.append(f"{where}: an anchor into a file that is not markdown")
                elif unquote(anchor) not in anchors(dest):
                    problems.append(
                        f"{where}: no heading with anchor #{anchor} in "
                        f"{dest.relative_to(root.resolve())}"
                    )
    return problems


# ---------------------------------------------------------------------------- citations

CITATION = re.compile(
    r"(?<![\w/.-])(?P<doc>README(?:\.md)?|[A-Z][A-Z0-9_]*\.md|docs/[\w.-]+\.md)\b"
    # between the file and its section: spaces, line breaks (a comment's # too), a comma, a
    # parenthesis, a colon, backticks, or a literal \n inside a string
    r"(?:(?P<sep>(?:[\s,(#:`]|\\n)*)"
    # the section, quoted; it may go on across a line break (a comment's # too)
    r"(?:\"(?P<dq>[A-Za-z0-9](?:[^\"\n]|\n[ \t]*#?){0,120})\""
    r"|'(?P<sq>[A-Za-z0-9](?:[^'\n]|\n[ \t]*#?){0,120})'))?"
)
CITING_DIRS = ("multieye_dist", "launch", "benchmarks", "tests", "configs")
CITING_SUFFIXES = {".py", ".sh", ".yaml", ".yml"}
SELF = Path(__file__).resolve()  # its docstring and examples are not citations


def citing_files(root: Path) -> list[Path]:
    files = []
    for top in CITING_DIRS:
        files += [
            p
            for p in sorted((root / top).rglob("*"))
            if p.suffix in CITING_SUFFIXES and p.is_file() and "__pycache__" not in p.parts
        ]
    # shards/: the scripts only (converted output may sit in its subfolders)
    files += sorted((root / "shards").glob("*.py")) + sorted((root / "shards").glob("*.sh"))
    files += [p for p in (root / "install.sh", root / ".ci" / "run") if p.is_file()]
    return [p for p in files if p.resolve() != SELF]


def citations(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, doc file, section or None) of every doc citation in a source file."""
    text = path.read_text(encoding="utf-8", errors="replace")
    found = []
    for m in CITATION.finditer(text):
        number = text.count("\n", 0, m.start()) + 1
        section = m.group("dq") or m.group("sq")
        if section is not None:
            section = re.sub(r"\s*\n[ \t]*#?\s*", " ", section)
        found.append((number, m.group("doc"), section))
    return found


def doc_path(root: Path, doc: str) -> Path:
    return root / ("README.md" if doc == "README" else doc)


def citation_problems(root: Path, files: list[Path]) -> list[str]:
    problems = []
    for path in files:
        rel = path.relative_to(root)
        for number, doc, section in citations(path):
            target = doc_path(root, doc)
            if section is None:
                # a docs/ page named alone must exist; README/BENCHMARKS name plain files too
                if doc.startswith("docs/") and not target.is_file():
                    problems.append(f"{rel}:{number}: cites {doc}: no such file")
                continue
            where = f'{rel}:{number}: cites {doc}, "{section}"'
            if not target.is_file():
                problems.append(f"{where}: no file {target.relative_to(root)}")
                continue
            names = headings(target)
            if not any(section in h or section in h.replace("`", "") for h in names):
                problems.append(f"{where}: no heading of {target.relative_to(root)} contains it")
    return problems


# -------------------------------------------------------------------------------- tests


def test_every_relative_link_resolves():
    problems = link_problems(ROOT, doc_files(ROOT))
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_cited_doc_section_exists():
    problems = citation_problems(ROOT, citing_files(ROOT))
    assert not problems, "citations of missing doc sections:\n" + "\n".join(problems)


def test_readme_is_a_front_page_under_8_kb():
    size = len((ROOT / "README.md").read_bytes())
    assert size < README_LIMIT, (
        f"README.md is {size} bytes, the limit is {README_LIMIT}: move sections into docs/"
    )


def test_the_parsers_find_what_is_there():
    """The checks above pass vacuously if a parser finds nothing: they must find the links,
    anchors, headings and citations that are known to exist."""
    all_links = [t for p in doc_files(ROOT) for _, t in links(p)]
    assert len(all_links) >= 20, all_links
    assert sum("#" in t for t in all_links) >= 10, all_links
    assert "docs/faults.md" in all_links
    assert "the-layers-and-the-import-rule" in anchors(ROOT / "docs" / "architecture.md")
    assert "# 2 nodes x 8 GPUs" not in " ".join(headings(ROOT / "docs" / "cluster.md"))
    assert slug("Streaming shards to the ranks (`multieye_dist/data/stream.py`)") == (
        "streaming-shards-to-the-ranks-multieye_distdatastreampy"
    )
    assert slug("Efficacy: does the OCT teacher's knowledge reach the fundus student?") == (
        "efficacy-does-the-oct-teachers-knowledge-reach-the-fundus-student"
    )
    cited = [
        (p.relative_to(ROOT).as_posix(), doc, section)
        for p in citing_files(ROOT)
        for _, doc, section in citations(p)
        if section is not None
    ]
    assert len(cited) >= 5, cited
    assert ("multieye_dist/config.py", "BENCHMARKS.md", "Precision") in cited
    assert ("multieye_dist/demo.py", "BENCHMARKS.md", "Efficacy") in cited  # across a \n
    assert ("configs/demo.yaml", "BENCHMARKS.md", "Efficacy") in cited  # across a comment break
    differs = ("multieye_dist/config.py", "docs/method.md", "Where the released code differs")
    assert differs in cited  # a section broken across two lines of a docstring


def test_the_checks_catch_a_broken_link_and_a_missing_section(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## Exit statuses\n\ntext\n")
    (tmp_path / "BENCHMARKS.md").write_text("# Benchmarks\n")
    (tmp_path / "README.md").write_text(
        "# Front\n\n[ok](docs/page.md#exit-statuses) [gone](docs/nope.md)\n"
        "[bad anchor](docs/page.md#faults)\n\n```\n[in code](docs/nope.md)\n```\n"
    )
    problems = link_problems(tmp_path, doc_files(tmp_path))
    assert len(problems) == 2, problems
    assert problems[0].startswith("README.md:3: link 'docs/nope.md'"), problems
    assert problems[1].startswith("README.md:4: link 'docs/page.md#faults'"), problems

    (tmp_path / "multieye_dist").mkdir()
    code = tmp_path / "multieye_dist" / "mod.py"
    code.write_text(
        '"""See docs/page.md, "Exit statuses"."""\n'
        "# and docs/page.md,\n"
        '# "Faults" (gone), README, "Anything", docs/gone.md\n'
    )
    problems = citation_problems(tmp_path, citing_files(tmp_path))
    assert len(problems) == 3, problems
    assert problems[0] == (
        'multieye_dist/mod.py:2: cites docs/page.md, "Faults": no heading of docs/page.md '
        "contains it"
    )
    assert problems[1].startswith('multieye_dist/mod.py:3: cites README, "Anything"'), problems
    assert problems[2] == "multieye_dist/mod.py:3: cites docs/gone.md: no such file"
