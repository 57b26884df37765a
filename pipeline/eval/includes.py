"""Markdown documents that show a table of a report: the table is copied from the report file, never
typed by hand, so a document cannot drift from the results it quotes.

A document marks the block that holds the copy:

    <!-- include reports/paper_table.md (any note here) -->

    | Method | Bits | ... |

    <!-- end include -->

The path is relative to the root the caller names (the repository), and the block holds the first
table of that file (its first run of consecutive lines that start with ``|``) between blank lines, so
that Markdown renders the table apart from the comments. :func:`include_tables` rewrites every block
from the current files; a document it leaves unchanged is up to date.
"""

from __future__ import annotations

import re
from pathlib import Path

BEGIN = re.compile(r"^<!-- include (\S+).*-->$")
END = "<!-- end include -->"


def first_table(markdown: str, source: str | Path = "the text") -> str:
    """The first Markdown table of ``markdown`` (header, separator and rows), each line ending in a
    newline."""
    lines = markdown.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if start is None:
        raise ValueError(f"{source} holds no Markdown table (no line starts with '|')")
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines[start:end])


def include_tables(document: str, root: Path, name: str | Path = "the document") -> str:
    """``document`` with the block of every include marker replaced by the first table of the file it
    names (under ``root``). The markers themselves and everything outside the blocks stay as they are.
    ``name`` is what errors call the document."""
    out: list[str] = []
    lines = document.splitlines(keepends=True)
    number = 0
    while number < len(lines):
        line = lines[number]
        out.append(line)
        number += 1
        begin = BEGIN.match(line.strip())
        if not begin:
            continue
        source = root / begin.group(1)
        if not source.is_file():
            raise FileNotFoundError(f"{name}:{number}: includes {begin.group(1)}, which is not a file under {root}")
        end = next((i for i in range(number, len(lines)) if lines[i].strip() == END), None)
        if end is None:
            raise ValueError(f"{name}:{number}: the include of {begin.group(1)} has no '{END}' line after it")
        out += ["\n", first_table(source.read_text(), source), "\n"]
        number = end
    return "".join(out)
