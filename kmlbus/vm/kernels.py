"""Find the installed Debian kernel and build the project's modules for it.

The kernel ABI suffix (``6.1.0-NN-amd64``) changes with every security update,
so nothing here names a version: the newest kernel that has both a
``/boot/vmlinuz-*`` image and a ``/lib/modules/*/build`` tree is chosen.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "VMError",
    "build_lock",
    "build_modules",
    "installed_kernels",
    "newest_kernel",
    "project_root",
    "vmlinuz",
]

BOOT = Path("/boot")
MODULES = Path("/lib/modules")


class VMError(RuntimeError):
    """The VM could not be prepared or run (not a failure of the guest command)."""


def project_root() -> Path:
    """The project folder: the parent of the ``kmlbus`` package."""
    return Path(__file__).resolve().parents[2]


def _version_key(kver: str) -> tuple[tuple[int, str], ...]:
    """Sort key for ``6.1.0-56-amd64``: numeric parts compare as numbers."""
    return tuple((int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.\-+~]", kver))


def installed_kernels() -> list[str]:
    """Kernel releases with a bootable image and modules, oldest first."""
    found = [
        p.name.removeprefix("vmlinuz-")
        for p in BOOT.glob("vmlinuz-*")
        if (MODULES / p.name.removeprefix("vmlinuz-")).is_dir()
    ]
    return sorted(found, key=_version_key)


def newest_kernel() -> str:
    """The newest installed kernel release; raises `VMError` if there is none."""
    kvers = installed_kernels()
    if not kvers:
        raise VMError(
            "no kernel found: expected /boot/vmlinuz-KVER with /lib/modules/KVER; "
            "install one with `apt-get install linux-image-amd64 linux-headers-amd64`"
        )
    return kvers[-1]


def vmlinuz(kver: str) -> Path:
    """Path of the kernel image for *kver*; raises `VMError` if it is missing."""
    image = BOOT / f"vmlinuz-{kver}"
    if not image.is_file():
        have = ", ".join(installed_kernels()) or "none"
        raise VMError(f"kernel image {image} not found (installed: {have}); pass --kver")
    return image


@contextmanager
def build_lock(project: Path) -> Iterator[None]:
    """Serialise module builds and initramfs creation between concurrent runs.

    Several people run the VM suite from the same tree; two ``make`` runs in
    one kbuild folder at once corrupt each other's outputs.
    """
    lockdir = project / "build" / "vm"
    lockdir.mkdir(parents=True, exist_ok=True)
    with open(lockdir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_modules(kver: str, project: Path, *, echo: bool = True) -> bool:
    """Run ``make -C kernel KDIR=/lib/modules/KVER/build``.

    Returns False (after saying so) when ``kernel/Makefile`` does not exist yet,
    True after a successful build; raises `VMError` when make fails.
    """
    makefile = project / "kernel" / "Makefile"
    if not makefile.is_file():
        print(f"kmlbus.vm: {makefile} not found, skipping the module build", file=sys.stderr)
        return False
    kdir = MODULES / kver / "build"
    if not kdir.is_dir():
        raise VMError(
            f"kernel headers for {kver} not found at {kdir}; "
            f"install them with `apt-get install linux-headers-{kver}` or pass --no-build"
        )
    cmd = ["make", "-C", str(project / "kernel"), f"KDIR={kdir}", f"KVER={kver}"]
    with build_lock(project):
        proc = subprocess.run(
            cmd,
            stdout=None if echo else subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "LC_ALL": "C"},
            check=False,
        )
    if proc.returncode != 0:
        if not echo and proc.stdout:
            sys.stderr.write(proc.stdout)
        raise VMError(
            f"module build failed: `{' '.join(cmd)}` exited {proc.returncode}; "
            "fix the build or pass --no-build"
        )
    return True
