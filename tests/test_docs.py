"""Every Markdown table in the docs renders: README.md, docs/, benchmarks/ (GitHub-flavoured rules:
a header row, then a delimiter row `|---|:--:|`, every row with the header's number of cells)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted({ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("benchmarks/**/*.md")})
DELIMITER_CELL = re.compile(r"^\s*:?-+:?\s*$")


def cells(line: str) -> list[str]:
    """A table row's cells: split at unescaped pipes, outer pipes dropped."""
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    return re.split(r"(?<!\\)\|", body)


def tables(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of each block of consecutive `|` lines outside code fences."""
    out, block, start, fenced = [], [], 0, False
    for n, line in enumerate(text.splitlines() + [""], 1):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        if not fenced and line.lstrip().startswith("|"):
            if not block:
                start = n
            block.append(line)
            continue
        if block:
            out.append((start, block))
            block = []
    return out


def table_problems(text: str) -> list[str]:
    problems = []
    for start, rows in tables(text):
        head = cells(rows[0])
        if len(rows) < 2 or not all(DELIMITER_CELL.match(c) for c in cells(rows[1])):
            problems.append(f"line {start}: no delimiter row (|---|) under the header")
            continue
        for k, row in enumerate(rows[1:], start + 1):
            if len(cells(row)) != len(head):
                problems.append(f"line {k}: {len(cells(row))} cells, the header has {len(head)}")
    return problems


def test_checker_finds_broken_tables():
    good = "| a | b |\n|---|--:|\n| 1 | x \\| y |\n"
    assert table_problems(good) == []
    assert table_problems("| a | b |\n| 1 | 2 |\n") == ["line 1: no delimiter row (|---|) under the header"]
    assert table_problems("| a | b |\n|---|---|\n| 1 | 2 | 3 |\n") == ["line 3: 3 cells, the header has 2"]
    assert table_problems("```\n| not | a table |\n```\n") == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_tables_render(path):
    assert table_problems(path.read_text()) == []
