"""Command line: ``python -m kmlbus.vm run -- CMD...`` and ``python -m kmlbus.vm test``.

``test`` is ``run -- <this python> -m pytest -m vm tests/vm -q -p no:cacheprovider
[PYTEST ARGS]``; the same interpreter path works inside because the guest's
root is the host's root.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .kernels import DEFAULT_KERNEL, project_root
from .qemu import run

__all__ = ["main", "pytest_command"]


def _vm_options(parser: argparse.ArgumentParser, timeout: float) -> None:
    """Options shared by ``run`` and ``test``."""
    parser.add_argument("--kver", help="kernel to boot: a release or a series such as 6.12 "
                        "(default: $KMLBUS_KERNEL, else %s)" % DEFAULT_KERNEL)
    parser.add_argument("--no-build", dest="build", action="store_false",
                        help="do not run `make -C kernel` first")
    parser.add_argument("--timeout", type=float, default=timeout, metavar="S",
                        help="kill the VM after S seconds (default: %(default)g)")
    parser.add_argument("--console", type=Path, metavar="FILE",
                        help="where to save the serial console (default: vm-out/console.log)")
    parser.add_argument("--memory", default="1G", help="guest RAM (default: %(default)s)")
    parser.add_argument("--smp", type=int, help="guest CPUs (default: min(2, host CPUs))")
    parser.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                        help="QEMU accelerator (default: KVM only when usable, else TCG)")
    parser.add_argument("--no-python-image", dest="python_image", action="store_false",
                        help="read the host Python over 9p instead of an ext4 image of it")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="do not stream the console (it is still saved)")


def pytest_command(pytest_args: Sequence[str]) -> list[str]:
    """The guest command of ``test``: pytest on the vm-marked suite.

    If the arguments name test paths, they replace the default ``tests/vm``; options such as
    ``--deselect=FILE::TEST`` or ``--ignore=FILE`` name no path to run.
    """
    names_path = any(not a.startswith("-") and ("::" in a or Path(a).exists()) for a in pytest_args)
    paths = [] if names_path else ["tests/vm"]
    return [sys.executable, "-m", "pytest", "-m", "vm", *paths, "-q", "-p", "no:cacheprovider",
            *pytest_args]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse *argv* and run; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m kmlbus.vm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    p_run = sub.add_parser("run", help="run a command in the guest: run [OPTIONS] -- CMD ARGS...")
    _vm_options(p_run, 900.0)
    p_test = sub.add_parser("test", help="run the vm-marked pytest suite in the guest; "
                                         "unknown options go to pytest")
    # the whole suite under TCG on a machine shared with other VMs can take 15+ minutes
    _vm_options(p_test, 2400.0)

    if argv and argv[0] == "run":
        # Split at the first "--" ourselves: argparse would eat the command's options.
        if "--" in argv:
            cut = argv.index("--")
            opts, cmd = argv[:cut], argv[cut + 1:]
        else:
            opts, cmd = argv, []
        args = parser.parse_args(opts)
        if not cmd:
            p_run.error("no command: expected `run [OPTIONS] -- CMD ARGS...`")
    else:
        args, rest = parser.parse_known_args(argv)
        if args.action == "run":  # pragma: no cover - handled above
            parser.error("usage: run [OPTIONS] -- CMD ARGS...")
        if rest and rest[0] == "--":
            rest = rest[1:]
        cmd = pytest_command(rest)
    try:
        return run(cmd, kver=args.kver, build=args.build, timeout=args.timeout,
                   console=args.console, memory=args.memory, smp=args.smp, accel=args.accel,
                   echo=not args.quiet, cwd=project_root(), python_image=args.python_image)
    except KeyboardInterrupt:
        print("kmlbus.vm: interrupted; QEMU killed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
