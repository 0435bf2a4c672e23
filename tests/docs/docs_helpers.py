"""Shared helpers of the documentation tests: reading pages, tables, code blocks and committed results.

``python tests/docs/docs_helpers.py config-reference`` prints the tables of docs/config-reference.md as
the config dataclass describes them (paste them when a key is added or changed).
"""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
RESULTS = DOCS / "results"
README = ROOT / "README.md"


def pages() -> list[Path]:
    """README.md and every Markdown page of the site (docs/**.md except the committed results)."""
    out = [README]
    out += sorted(p for p in DOCS.rglob("*.md") if RESULTS not in p.parents)
    return out


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", text, re.M | re.S)]


def without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def inline_code(text: str) -> list[str]:
    """Contents of the `inline code` spans outside fenced blocks (double backticks included)."""
    prose = without_code_blocks(text)
    return [m.group(2) for m in re.finditer(r"(`+)(.+?)\1", prose, re.S)]


def shell_lines(text: str) -> list[str]:
    """Commands shown to the reader: lines of bash/console blocks (continuations joined, comments and
    the prompt removed) and inline code spans that start like a command."""
    lines: list[str] = []
    for lang, body in code_blocks(text):
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        joined = re.sub(r"\\\n\s*", " ", body)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            line = line[2:] if line.startswith("$ ") else line
            if line and not line.startswith("#"):
                lines.append(line)
    lines += [span.strip() for span in inline_code(text)]
    return lines


def table_rows(lines: list[str], start: int) -> list[str]:
    """The table rows from line ``start`` on (up to the first line that is not a row)."""
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line.rstrip())
    return rows


def quoted_tables(text: str) -> list[tuple[str, list[str]]]:
    """(source, rows) of every table preceded by ``<!-- quoted-from: results/... -->``."""
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        m = re.match(r"\s*<!-- quoted-from: (\S+) -->\s*$", line)
        if m:
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            out.append((m.group(1), table_rows(lines, j)))
    return out


def md_table(path: Path, header_start: str) -> list[dict[str, str]]:
    """The rows, as dicts keyed by column, of the first table whose header starts with ``header_start``."""
    lines = read(path).split("\n")
    for i, line in enumerate(lines):
        if line.startswith(header_start):
            rows = table_rows(lines, i)
            cols = split_row(rows[0])
            return [dict(zip(cols, split_row(r))) for r in rows[2:]]
    raise AssertionError(f"{rel(path)}: no table whose header starts with {header_start!r}")


def md_section_table(path: Path, section: str, header_start: str) -> list[dict[str, str]]:
    """Like md_table, inside the ``## section`` of the file only."""
    text = read(path)
    m = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"{rel(path)}: no section '## {section}'"
    lines = m.group(1).split("\n")
    for i, line in enumerate(lines):
        if line.startswith(header_start):
            rows = table_rows(lines, i)
            cols = split_row(rows[0])
            return [dict(zip(cols, split_row(r))) for r in rows[2:]]
    raise AssertionError(f"{rel(path)}: no table starting {header_start!r} in section {section!r}")


def split_row(row: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", row.strip())[1:-1]
    return [c.strip() for c in cells]


def first_number(cell: str) -> float:
    m = re.search(r"-?\d[\d,]*\.?\d*(?:e-?\d+)?", cell)
    assert m, f"no number in {cell!r}"
    return float(m.group(0).replace(",", ""))



def resolve(path: str) -> object:
    """The object a dotted API-reference path names (module, then attributes)."""
    import importlib

    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise AssertionError(f"cannot import {path}")

def config_reference_tables() -> str:
    """The config reference tables, one per group, from the config dataclass."""
    from mallowspo_fast.trainer.config import describe_fields

    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    out: list[str] = []
    for group, items in itertools.groupby(describe_fields(), key=lambda r: r[0]):
        out += [f"**{group}**", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        out += [f"| `{name}` | {esc(typ)} | `{default}` | {esc(help_)} |" for _, name, typ, default, help_ in items]
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["config-reference"]:
        print(config_reference_tables(), end="")
    else:
        sys.exit("usage: python tests/docs/docs_helpers.py config-reference")
