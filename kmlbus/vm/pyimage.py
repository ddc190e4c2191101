"""Ship the host's Python installation to the guest as a read-only ext4 disk.

Over 9p every file open costs several round trips to QEMU, and under TCG on a
busy machine each round trip costs milliseconds: importing pytest, numpy and
onnxruntime from 9p takes tens of seconds.  The same tree on a virtio disk
is read through the guest's own page and dentry caches instead.  The image
(``build/vm/python-<hash>.ext4``) is made with ``mke2fs -d`` (no root, no
loop device) and remade when the installation changes, which pip always
shows in the mtime of ``site-packages`` or ``bin``.  The guest mounts it over
the same absolute path, so paths and ``sys.executable`` stay the host's.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .kernels import VMError, build_lock

__all__ = ["ensure_python_image", "python_prefix"]

#: Prefixes never imaged: a distribution Python shares /usr with everything else.
_SYSTEM_PREFIXES = (Path("/"), Path("/usr"), Path("/usr/local"))


def python_prefix() -> Path | None:
    """The installation to image (``sys.base_prefix``), or None for a system Python."""
    prefix = Path(sys.base_prefix).resolve()
    return None if prefix in _SYSTEM_PREFIXES else prefix


def _fingerprint(prefix: Path) -> str:
    """Changes whenever packages are installed, removed or upgraded."""
    digest = hashlib.sha256(str(prefix).encode())
    lib = prefix / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    for path in (prefix, prefix / "bin", prefix / "lib", lib, lib / "site-packages"):
        try:
            st = path.stat()
        except OSError:
            continue
        digest.update(f"{path}:{st.st_mtime_ns}:{st.st_ino}\n".encode())
    return digest.hexdigest()[:12]


def _tree_size(root: Path) -> tuple[int, int]:
    """(bytes, number of inodes) under *root*, not following symlinks."""
    total = count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        count += 1 + len(dirnames) + len(filenames)
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total, count


def ensure_python_image(project: Path, *, echo: bool = True) -> tuple[Path, Path] | None:
    """Return (image, prefix) for the host Python, building the image if stale.

    None means "use 9p for Python too": a system Python, or no ``mke2fs``.
    """
    prefix = python_prefix()
    mke2fs = shutil.which("mke2fs") or shutil.which("mke2fs", path="/sbin:/usr/sbin")
    if prefix is None or mke2fs is None:
        return None
    cache_dir = project / "build" / "vm"
    image = cache_dir / f"python-{_fingerprint(prefix)}.ext4"
    if image.is_file():
        return image, prefix
    with build_lock(project):
        if image.is_file():
            return image, prefix
        if echo:
            print(f"kmlbus.vm: imaging {prefix} for the guest (once per package change)...",
                  file=sys.stderr, flush=True)
        size, inodes = _tree_size(prefix)
        size_mb = size * 5 // 4 // 2**20 + 128
        tmp = image.with_name(f"{image.name}.tmp{os.getpid()}")
        proc = subprocess.run(
            [mke2fs, "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-L", "kmlbus-python",
             "-N", str(inodes * 5 // 4 + 1024), "-E", "root_owner=0:0",
             "-d", str(prefix), str(tmp), f"{size_mb}M"],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise VMError(f"mke2fs -d {prefix} failed: {proc.stderr.strip()}; "
                          "pass --no-python-image to read Python over 9p instead")
        tmp.replace(image)
        for stale in cache_dir.glob("python-*.ext4"):
            if stale != image:
                stale.unlink(missing_ok=True)
    return image, prefix
