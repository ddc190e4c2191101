"""Helpers for code that runs *inside* the test VM (the ``vm`` pytest suite).

They wrap the few kernel interfaces the VM tests need: loading and unloading
modules, reading the kernel log since a point in time (``/dev/kmsg`` sequence
numbers, so nothing has to be written into the log to mark it), and the
sample workload's module parameters in sysfs.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

from .dmesg import problems
from .kernels import project_root

__all__ = [
    "KMLBUS_KO",
    "SAMPLE_KO",
    "ModuleError",
    "dmesg_mark",
    "dmesg_problems",
    "dmesg_since",
    "in_vm",
    "insmod",
    "is_loaded",
    "rmmod",
    "sample_param",
    "set_sample_param",
    "set_sample_rate",
]

KMLBUS_KO = project_root() / "kernel" / "kmlbus.ko"
SAMPLE_KO = project_root() / "kernel" / "samples" / "kmlbus_sample.ko"
_SYS_MODULE = Path("/sys/module")
_SAMPLE = "kmlbus_sample"


class ModuleError(RuntimeError):
    """insmod/rmmod failed, or a module is not in the expected state."""


def in_vm() -> bool:
    """True inside the guest started by ``python -m kmlbus.vm`` (it sets KMLBUS_IN_VM=1)."""
    return os.environ.get("KMLBUS_IN_VM") == "1"


def is_loaded(name: str) -> bool:
    """True if loadable module *name* is live (``/sys/module/NAME/initstate``).

    Built-in code also has ``/sys/module/NAME`` but no ``initstate``.
    """
    try:
        return (_SYS_MODULE / name / "initstate").read_text().strip() in ("live", "coming")
    except OSError:
        return False


def insmod(path: Path | str, **params: object) -> None:
    """Load the module file *path* with ``name=value`` parameters.

    Raises `ModuleError` with insmod's own message (e.g. "File exists",
    "Invalid parameters") when loading fails.
    """
    path = Path(path)
    if not path.is_file():
        raise ModuleError(f"{path} not found: build it with `make -C kernel` "
                          "(python -m kmlbus.vm test does that first)")
    args = [f"{k}={v}" for k, v in params.items()]
    proc = subprocess.run(["insmod", str(path), *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ModuleError(f"insmod {path.name} {' '.join(args)} failed: "
                          f"{(proc.stderr or proc.stdout).strip()}")


def rmmod(name: str) -> None:
    """Unload module *name* and check it is gone; raises `ModuleError` otherwise."""
    proc = subprocess.run(["rmmod", name], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ModuleError(f"rmmod {name} failed: {(proc.stderr or proc.stdout).strip()}")
    if is_loaded(name):
        raise ModuleError(f"rmmod {name} returned 0 but /sys/module/{name} is still live")


def _kmsg_records() -> list[tuple[int, str]]:
    """All records in the kernel log buffer as (sequence number, message)."""
    records: list[tuple[int, str]] = []
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    try:
        while True:
            try:
                raw = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # overwritten while reading: skip ahead
                    continue
                raise
            if not raw:
                break
            # "prio,seq,ts_usec,flags[,...];message\n" then " KEY=value" lines
            header, _, rest = raw.decode("utf-8", "replace").partition(";")
            fields = header.split(",")
            records.append((int(fields[1]), rest.split("\n", 1)[0]))
    finally:
        os.close(fd)
    return records


def dmesg_mark() -> int:
    """A mark for `dmesg_since`: the sequence number of the newest log record."""
    records = _kmsg_records()
    return records[-1][0] if records else -1


def dmesg_since(mark: int) -> list[str]:
    """Kernel log messages logged after `dmesg_mark` returned *mark*."""
    return [msg for seq, msg in _kmsg_records() if seq > mark]


def dmesg_problems(mark: int) -> list[str]:
    """Messages since *mark* with WARNING, BUG, Oops or Call Trace in them."""
    return problems(dmesg_since(mark))


def sample_param(name: str) -> str:
    """Current value of the sample module's parameter *name* (sysfs text)."""
    return (_SYS_MODULE / _SAMPLE / "parameters" / name).read_text().strip()


def set_sample_param(name: str, value: object) -> None:
    """Write module parameter *name* of the sample workload through sysfs."""
    path = _SYS_MODULE / _SAMPLE / "parameters" / name
    if not path.exists():
        raise ModuleError(f"{path} not found: is {_SAMPLE} loaded and is {name} writable (0644)?")
    path.write_text(f"{value}\n")


def set_sample_rate(n: int) -> None:
    """Set the sample workload's decisions per second (0 pauses it)."""
    set_sample_param("rate", n)
