"""The author's guide's example built on the host for a guest kernel, ahead of the VM test.

``tests/vm/test_authors_guide.py`` needs the guide's module built against the
guest kernel's headers and its model written by the guide's ``make_model.py``.
Inside the TCG guest those two steps took most of the test's two minutes (gcc and
modpost under emulation, and the ``onnx`` import); on the host they take seconds.
``tests/run`` runs this module before the VM suite:

    python3 -m tests.support.guide_build --kver 6.1

It writes the page's ``file=`` blocks into ``build/guide/<release>/`` and runs the
guide's own ``build.sh`` there, with ``uname -r`` answering the guest kernel's
release (the only thing that differs from running it in the guest), then
``make_model.py``.  A stamp records what the build used: the blocks, the public
header and ``kernel/Module.symvers``.  The VM test takes the folder only while that
stamp matches the files it sees; otherwise it builds in the guest as before, so
``python -m kmlbus.vm test`` alone still tests the page's current text.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from kmlbus.vm.kernels import build_modules, project_root, select_kernel
from tests.support.mdblocks import file_blocks

__all__ = ["GUIDE", "prepared", "stamp", "prepare", "main"]

GUIDE = project_root() / "docs" / "authors-guide.md"
STAMP = "guide.stamp"
BUILD_LOG = "build.log"


def prepared(release: str) -> Path:
    """Where the example is built for kernel *release*."""
    return project_root() / "build" / "guide" / release


def stamp() -> str:
    """A digest of what the build depends on: the page's blocks, kmlbus.h, Module.symvers."""
    kernel = project_root() / "kernel"
    h = hashlib.sha256()
    for name, text in sorted(file_blocks(GUIDE).items()):
        h.update(f"{name}\0{text}\0".encode())
    for dep in (kernel / "include" / "kmlbus" / "kmlbus.h", kernel / "Module.symvers"):
        h.update(dep.read_bytes() if dep.is_file() else b"missing")
    return h.hexdigest()


def is_current(folder: Path) -> bool:
    """True when *folder* holds a build whose stamp matches the files as they are now."""
    f = folder / STAMP
    return f.is_file() and f.read_text().strip() == stamp()


def prepare(release: str) -> Path:
    """Build the module and write the model for *release*; returns the folder.

    Raises RuntimeError naming the step that failed, with its output.
    """
    build_modules(release, project_root(), echo=False)  # kernel/Module.symvers for *release*
    out = prepared(release)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name, text in file_blocks(GUIDE).items():
        (out / name).write_text(text, encoding="utf-8")
    shim = out / ".uname"
    shim.mkdir()
    (shim / "uname").write_text(f'#!/bin/sh\n[ "$1" = -r ] && exec echo {release}\nexec /bin/uname "$@"\n')
    (shim / "uname").chmod(stat.S_IRWXU)
    env = dict(os.environ, K=str(project_root() / "kernel"),
               PATH=f"{shim}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join(p for p in (str(project_root()),
                                                       os.environ.get("PYTHONPATH", "")) if p))
    build = subprocess.run(["sh", "build.sh"], cwd=out, env=env, capture_output=True, text=True,
                           timeout=600)
    (out / BUILD_LOG).write_text(build.stdout + build.stderr)
    if build.returncode != 0:
        raise RuntimeError(f"the guide's build.sh failed for {release}:\n{build.stderr[-3000:]}")
    model = subprocess.run([sys.executable, "make_model.py"], cwd=out, env=env,
                           capture_output=True, text=True, timeout=600)
    if model.returncode != 0:
        raise RuntimeError(f"the guide's make_model.py failed:\n{model.stderr[-3000:]}")
    shutil.rmtree(shim)
    (out / STAMP).write_text(stamp() + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    """``python3 -m tests.support.guide_build --kver SERIES``: prepare, print the folder."""
    parser = argparse.ArgumentParser(prog="python3 -m tests.support.guide_build",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kver", help="guest kernel release or series (default: as kmlbus.vm)")
    args = parser.parse_args(argv)
    release = select_kernel(args.kver)
    try:
        print(f"the author's guide's example for {release} in {prepare(release)}")
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
