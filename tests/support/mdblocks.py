"""The code blocks of a markdown page that name a file (```` ```c file=NAME ````).

Documentation whose examples are tested keeps them in its own text: a test
takes the marked blocks out, writes them under their names and runs them, so
the page and what is tested cannot drift apart.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["file_blocks"]

_FENCE = re.compile(r"^```(\S*)[ \t]+file=(\S+)[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def file_blocks(page: Path) -> dict[str, str]:
    """File name -> text of every fenced block of *page* whose info string has ``file=NAME``.

    Raises ValueError if two blocks name the same file (one would hide the other).
    """
    out: dict[str, str] = {}
    for m in _FENCE.finditer(page.read_text(encoding="utf-8")):
        name = m.group(2)
        if name in out:
            raise ValueError(f"{page}: two code blocks are marked file={name}")
        out[name] = m.group(3)
    return out
