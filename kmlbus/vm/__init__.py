"""Run commands inside the installed Debian kernel under QEMU.

The host kernel cannot load modules, so everything that needs the real
``kmlbus.ko`` runs in a throw-away guest that boots ``/boot/vmlinuz-KVER``
with the host's root file system (read-only) and this project (read-write)
shared over 9p.  Entry points:

* ``python -m kmlbus.vm run -- CMD ARGS...`` / `run`: build the modules,
  boot, run, return the guest's exit status (or a harness failure code);
* ``python -m kmlbus.vm test [PYTEST ARGS]``: the ``vm``-marked test suite;
* `kmlbus.vm.guest`: helpers for code running *inside* the guest.
"""

from __future__ import annotations

import logging

from .kernels import VMError, installed_kernels, select_kernel, project_root
from .qemu import EXIT_DMESG, EXIT_NO_STATUS, EXIT_TIMEOUT, VMResult, boot, run

__all__ = [
    "EXIT_DMESG",
    "EXIT_NO_STATUS",
    "EXIT_TIMEOUT",
    "VMError",
    "VMResult",
    "boot",
    "installed_kernels",
    "select_kernel",
    "project_root",
    "run",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
