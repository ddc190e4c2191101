"""A null_blk disk with ext4 on it, for storage experiments inside the test VM.

The disk is made through null_blk's configfs interface (memory backed, with a
completion latency and an optional bandwidth cap), so the block layer's own
counters in ``/sys/block/NAME/stat`` show every read the page cache issued.
Used by the readahead VM tests and the readahead benchmark; root only.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Self

__all__ = ["DiskStat", "NullBlk", "disk_stat", "drop_caches", "drop_file", "set_read_ahead_kb"]

_CONFIGFS = Path("/sys/kernel/config")
_NULLB = _CONFIGFS / "nullb"


def _run(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()}")


@dataclass(frozen=True)
class DiskStat:
    """Read counters of ``/sys/block/NAME/stat``: completed reads, merges, 512-byte sectors."""

    ios: int
    merges: int
    sectors: int

    def __sub__(self, other: DiskStat) -> DiskStat:
        return DiskStat(self.ios - other.ios, self.merges - other.merges,
                        self.sectors - other.sectors)


def disk_stat(name: str) -> DiskStat:
    """The read side of ``/sys/block/NAME/stat`` (fields 1-3 of Documentation/block/stat.rst)."""
    f = (Path("/sys/block") / name / "stat").read_text().split()
    return DiskStat(int(f[0]), int(f[1]), int(f[2]))


def drop_caches() -> None:
    """Write back, then drop the page cache, dentries and inodes."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def drop_file(path: Path | str) -> None:
    """Evict one file's clean pages (POSIX_FADV_DONTNEED on the whole file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def set_read_ahead_kb(name: str, kb: int) -> None:
    """The device's readahead default (bdi->ra_pages), copied into each file at open."""
    (Path("/sys/block") / name / "queue" / "read_ahead_kb").write_text(f"{kb}\n")


class NullBlk:
    """``/dev/NAME`` from null_blk's configfs, with ext4 mounted at *mountpoint*.

    *completion_nsec*: latency of every request (irqmode 2, timer);
    *mbps*: bandwidth cap in MB/s, 0 for none.  Use as a context manager.
    """

    def __init__(self, mountpoint: Path | str, *, name: str = "nullb0", size_mb: int = 256,
                 completion_nsec: int = 2_000_000, mbps: int = 0) -> None:
        self.name = name
        self.dev = Path("/dev") / name
        self.mountpoint = Path(mountpoint)
        self.size_mb = size_mb
        self.completion_nsec = completion_nsec
        self.mbps = mbps
        self._dir = _NULLB / name

    def __enter__(self) -> Self:
        if not _NULLB.exists():
            _run("modprobe", "null_blk", "nr_devices=0")  # pulls in configfs
            if not os.path.ismount(_CONFIGFS):
                _run("mount", "-t", "configfs", "none", str(_CONFIGFS))
        self._dir.mkdir()
        try:
            attrs = {"size": self.size_mb, "blocksize": 4096, "memory_backed": 1,
                     "irqmode": 2, "completion_nsec": self.completion_nsec}
            if self.mbps:
                attrs["mbps"] = self.mbps
            for k, v in attrs.items():
                (self._dir / k).write_text(f"{v}\n")
            (self._dir / "power").write_text("1\n")
            if not self.dev.exists():
                major_minor = (Path("/sys/block") / self.name / "dev").read_text().strip()
                major, minor = (int(x) for x in major_minor.split(":"))
                os.mknod(self.dev, 0o600 | 0o060000, os.makedev(major, minor))
            _run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                 str(self.dev))
            self.mountpoint.mkdir(parents=True, exist_ok=True)
            _run("mount", "-t", "ext4", str(self.dev), str(self.mountpoint))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if os.path.ismount(self.mountpoint):
            _run("umount", str(self.mountpoint))
        self._remove()

    def _remove(self) -> None:
        if self._dir.exists():
            (self._dir / "power").write_text("0\n")
            self._dir.rmdir()

    def make_file(self, name: str, size_mb: int) -> Path:
        """A file of *size_mb* MiB of non-zero data on the disk, written through and evicted."""
        path = self.mountpoint / name
        chunk = bytes(range(256)) * 4096  # 1 MiB
        with open(path, "wb") as f:
            f.writelines(chunk for _ in range(size_mb))
            f.flush()
            os.fsync(f.fileno())
        drop_file(path)
        return path

    def stat(self) -> DiskStat:
        """This disk's read counters now."""
        return disk_stat(self.name)
