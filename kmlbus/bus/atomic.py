"""Atomic file replacement: write a temporary file beside the target, then rename it.

Model files, the daemon's state file, the operator's pins and learned models
are all read by another process while they may be rewritten; a rename means a
reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["write_bytes"]


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Replace *path* with *data* atomically; the temporary file never outlives a failure."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        os.unlink(tmp)
        raise
    return p
