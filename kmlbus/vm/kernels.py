"""Find the installed Debian kernel and build the project's modules for it.

The kernel ABI suffix (``6.1.0-NN-amd64``) changes with every security update,
so a kernel is chosen by *series* (``6.1``, ``6.12``) or by exact release, and
the newest installed release of the series is booted.  Which series is always
explicit: ``--kver``, else ``$KMLBUS_KERNEL``, else `DEFAULT_KERNEL`.  Never
"the newest installed": installing a second kernel (Debian's 6.12 beside 6.1)
must not silently move every run onto it.
"""

from __future__ import annotations

import fcntl
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

__all__ = [
    "DEFAULT_KERNEL",
    "KERNEL_ENV",
    "VMError",
    "boot_image",
    "build_lock",
    "has_pvh_note",
    "build_modules",
    "install_kernel_sources",
    "installed_kernels",
    "kernel_series",
    "select_kernel",
    "project_root",
    "vmlinuz",
]

BOOT = Path("/boot")
MODULES = Path("/lib/modules")

#: The kernel series the testbed boots unless told otherwise (Debian 12's own kernel).
DEFAULT_KERNEL = "6.1"
#: Environment variable naming the kernel (a series such as ``6.12`` or an exact release).
KERNEL_ENV = "KMLBUS_KERNEL"


class VMError(RuntimeError):
    """The VM could not be prepared or run (not a failure of the guest command)."""


def project_root() -> Path:
    """The folder the testbed works in: it holds ``kernel/`` (built there) and ``build/vm``.

    ``KMLBUS_WORKDIR`` if set; else the source checkout this package runs
    from; else, for an installed wheel, ``~/.cache/kmlbus/<version>``.  A
    folder without kernel sources gets the ones shipped in the wheel
    (``kmlbus.kernel_src``), copied on first use.  The guest gets the same
    HOME and ``KMLBUS_*`` variables, so it resolves the same folder.
    """
    env = os.environ.get("KMLBUS_WORKDIR")
    checkout = Path(__file__).resolve().parents[2]
    in_checkout = (checkout / "kernel" / "Kbuild").is_file() and (checkout / "pyproject.toml").is_file()
    if env:
        work = Path(env).resolve()
    elif in_checkout:
        return checkout
    else:
        from kmlbus import __version__

        work = Path.home() / ".cache" / "kmlbus" / __version__
    if work != checkout:
        install_kernel_sources(checkout / "kernel" if in_checkout
                                else resources.files("kmlbus.kernel_src"), work / "kernel")
    return work


def install_kernel_sources(src: Traversable, dest: Path) -> None:
    """Copy the kernel sources under *src* to *dest*, file by file, where they differ."""
    for rel, data in _walk(src, ""):
        target = dest / rel
        if target.is_file() and target.read_bytes() == data:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(target)


def _walk(node: Traversable, prefix: str) -> Iterator[tuple[str, bytes]]:
    """(relative path, bytes) of every kernel source file under *node* (no build output)."""
    for child in node.iterdir():
        rel = f"{prefix}{child.name}"
        if child.is_dir():
            if child.name != "__pycache__":
                yield from _walk(child, rel + "/")
        elif child.name.endswith((".c", ".h")) and not child.name.endswith(".mod.c") \
                or child.name in ("Kbuild", "Makefile", "README.md", "dkms.conf"):
            yield rel, child.read_bytes()


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


def kernel_series(kver: str) -> str:
    """``MAJOR.MINOR`` of a release: ``6.1`` for ``6.1.0-57-amd64``, ``6.12`` for ``6.12.117+deb12-amd64``."""
    m = re.match(r"(\d+)\.(\d+)", kver)
    if m is None:
        raise VMError(f"kernel release {kver!r} does not start with MAJOR.MINOR")
    return f"{m.group(1)}.{m.group(2)}"


def select_kernel(choice: str | None = None) -> str:
    """The installed release to boot for *choice* (a release or a series).

    *choice* defaults to ``$KMLBUS_KERNEL``, then to `DEFAULT_KERNEL`.  An
    installed release is taken as it is; a series gives its newest installed
    release.  Raises `VMError` naming what is installed when nothing matches.
    """
    want = choice or os.environ.get(KERNEL_ENV) or DEFAULT_KERNEL
    kvers = installed_kernels()
    if want in kvers:
        return want
    same = [k for k in kvers if re.fullmatch(r"\d+\.\d+", want) and kernel_series(k) == want]
    if same:
        return same[-1]
    have = ", ".join(kvers) or "none"
    raise VMError(
        f"no installed kernel matches {want!r} (from "
        f"{'--kver' if choice else KERNEL_ENV if os.environ.get(KERNEL_ENV) else 'the default'}); "
        f"installed: {have}; expected a release or a series such as 6.1 or 6.12 with "
        f"/boot/vmlinuz-KVER and /lib/modules/KVER (Debian: `apt-get install linux-image-6.12-amd64 "
        f"linux-headers-6.12-amd64` for 6.12)"
    )


def vmlinuz(kver: str) -> Path:
    """Path of the kernel image for *kver*; raises `VMError` if it is missing."""
    image = BOOT / f"vmlinuz-{kver}"
    if not image.is_file():
        have = ", ".join(installed_kernels()) or "none"
        raise VMError(f"kernel image {image} not found (installed: {have}); pass --kver")
    return image


#: ELF note the kernel carries when it can be entered directly in 32-bit
#: protected mode (``XEN_ELFNOTE_PHYS32_ENTRY``, CONFIG_PVH).
_PVH_NOTE_NAME = b"Xen"
_PVH_NOTE_TYPE = 18

#: Compressed-payload magics inside a bzImage, and how to inflate each.
_PAYLOADS: tuple[tuple[bytes, str], ...] = (
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x1f\x8b\x08", "gzip"),
)


def has_pvh_note(elf: bytes) -> bool:
    """True if the ELF64 image *elf* has a PVH entry note QEMU can boot from."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12: pos + 12 + namesz].rstrip(b"\0")
            if name == _PVH_NOTE_NAME and ntype == _PVH_NOTE_TYPE:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _inflate(data: bytes, kind: str) -> bytes:
    """Decompress a payload that may be followed by trailing bytes."""
    if kind == "xz":
        return lzma.LZMADecompressor().decompress(data)
    if kind == "gzip":
        return zlib.decompressobj(wbits=31).decompress(data)
    zstd = shutil.which("zstd")
    if zstd is None:
        raise ValueError("zstd not installed")
    return subprocess.run([zstd, "-dc"], input=data, capture_output=True, check=False).stdout


def _extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The uncompressed ELF kernel inside *bzimage*, or None if not found."""
    for magic, kind in _PAYLOADS:
        start = bzimage.find(magic)
        while start >= 0:
            try:
                elf = _inflate(bzimage[start:], kind)
            except (lzma.LZMAError, zlib.error, ValueError):
                elf = b""
            if elf[:4] == b"\x7fELF":
                return elf
            start = bzimage.find(magic, start + 1)
    return None


def boot_image(kver: str, project: Path) -> Path:
    """The image QEMU should boot for *kver*: the same kernel, entered faster.

    Under TCG, the bzImage's own decompressor takes about 4 s of a 10 s boot.
    The Debian kernel is built with CONFIG_PVH, so QEMU can load the
    uncompressed ELF ``vmlinux`` directly (``-kernel`` detects the PVH note).
    The extracted file is cached in ``build/vm/``; if extraction fails or
    the note is missing, the bzImage itself is returned.  One difference:
    without the decompressor there is no KASLR, which makes addresses in
    traces reproducible.
    """
    bzimage = vmlinuz(kver)
    cache = project / "build" / "vm" / f"vmlinux-{kver}"
    st = bzimage.stat()
    stamp = cache.with_name(cache.name + ".source")
    want = f"{bzimage}:{st.st_size}:{st.st_mtime_ns}\n"
    if cache.is_file() and stamp.is_file() and stamp.read_text() == want:
        return cache
    with build_lock(project):
        if cache.is_file() and stamp.is_file() and stamp.read_text() == want:
            return cache
        elf = _extract_vmlinux(bzimage.read_bytes())
        if elf is None or not has_pvh_note(elf):
            print(f"kmlbus.vm: no PVH-bootable vmlinux inside {bzimage}; booting the bzImage",
                  file=sys.stderr)
            return bzimage
        tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
        tmp.write_bytes(elf)
        tmp.replace(cache)
        stamp.write_text(want)
    return cache


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
