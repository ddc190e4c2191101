"""Boot the installed Debian kernel under QEMU and run one command inside.

The guest's root is the host's root (9p, read-only, under a tmpfs overlay)
with the project mounted read-write at its host path, so a command means the same inside as outside.
QEMU itself exits 0 whatever happens in the guest, so the guest's ``/init``
prints markers on the serial console (see `initramfs`):

* ``KMLBUS-VM-BOOT-<nonce>``: /init started (the kernel booted);
* ``KMLBUS-VM-START-<nonce>``: shares mounted, the command starts;
* ``KMLBUS-VM-EXIT-<nonce> status=N``: the command exited with N;
* ``KMLBUS-VM-FAIL-<nonce> <why>``: /init could not set the guest up.

The nonce is fresh for every boot, so output of the command cannot fake them.
After the command /init saves ``dmesg`` to the job folder on the project
share; the harness fails the run if it holds a WARNING, BUG, Oops or trace.
"""

from __future__ import annotations

import codecs
import fcntl
import os
import re
import secrets
import select
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from . import dmesg as dmesg_mod
from .initramfs import ensure_initramfs
from .kernels import (
    VMError,
    boot_image,
    build_modules,
    select_kernel,
    project_root,
    vmlinuz,
)
from .pyimage import ensure_python_image

__all__ = [
    "EXIT_DMESG",
    "EXIT_NO_STATUS",
    "EXIT_TIMEOUT",
    "VMResult",
    "boot",
    "choose_accel",
    "guest_env",
    "job_script",
    "kvm_usable",
    "qemu_argv",
    "report",
    "run",
]

#: Exit codes of `run` when the guest's own status cannot be the answer.
EXIT_DMESG = 123  # the command passed but the kernel log shows a problem
EXIT_TIMEOUT = 124  # same code as coreutils timeout(1)
EXIT_NO_STATUS = 125  # the harness or the guest setup failed: no status

#: Seconds a KVM guest gets to print its BOOT marker before we retry with TCG.
KVM_BOOT_GRACE = 30.0
#: Seconds QEMU gets to power off after the EXIT marker before it is killed.
POWEROFF_GRACE = 15.0
#: Console lines shown when the guest died without a status and nothing was echoed.
TAIL_LINES = 40

_QEMU = "qemu-system-x86_64"


@dataclass
class VMResult:
    """What one boot produced; `exit_code` folds it into a process status."""

    status: int | None
    accel: str
    console: Path
    dmesg_file: Path
    timed_out: bool = False
    failure: str = ""
    boot_seconds: float | None = None
    total_seconds: float = 0.0
    dmesg: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    console_tail: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """The guest's status, unless a timeout, a setup failure or dmesg problems override it."""
        if self.timed_out:
            return EXIT_TIMEOUT
        if self.status is None:
            return EXIT_NO_STATUS
        if self.problems and self.status == 0:
            return EXIT_DMESG
        return self.status


def kvm_usable() -> bool:
    """True when /dev/kvm is writable and the CPU advertises vmx or svm.

    The project machines expose a paravirtual /dev/kvm without nested
    virtualisation: QEMU with ``-accel kvm`` aborts or hangs there.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"^flags\s*:.*\b(vmx|svm)\b", cpuinfo, re.MULTILINE) is not None


def choose_accel(requested: str = "auto") -> str:
    """``kvm`` or ``tcg``: *requested*, or for ``auto`` KVM only when usable."""
    requested = os.environ.get("KMLBUS_VM_ACCEL", requested) if requested == "auto" else requested
    if requested not in ("auto", "kvm", "tcg"):
        raise VMError(f"unknown accelerator {requested!r}: expected auto, kvm or tcg")
    if requested == "auto":
        return "kvm" if kvm_usable() else "tcg"
    return requested


def guest_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of the guest command: the host's PATH and Python settings.

    The guest's root is writable (a tmpfs overlay on the host root), so HOME
    can stay the host's (pyenv shims, for one, look there).  Bytecode writing
    stays on: pycs and pytest's rewritten test modules land in the project's
    ``__pycache__`` folders on the share and make the next boot faster
    (recompiling under TCG costs seconds per module).
    """
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"),
        "HOME": os.environ.get("HOME", "/root"),
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "TERM": "dumb",  # the serial console is a tty; keep ANSI codes out of the log
        "COLUMNS": "100",
        "KMLBUS_IN_VM": "1",
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("PYTHONPATH", "PYENV_ROOT", "PYENV_VERSION", "VIRTUAL_ENV"):
        if name in os.environ:
            env[name] = os.environ[name]
    # Test tuning knobs (KMLBUS_FUZZ_EXAMPLES, KMLBUS_REPLAY_EXAMPLES, ...) reach the guest.
    for name, value in os.environ.items():
        if name.startswith("KMLBUS_") and name not in ("KMLBUS_IN_VM", "KMLBUS_STATE"):
            env[name] = value
    env.update(extra or {})
    return env


#: Host folders the guest covers with its own tmpfs (see the initramfs's /init)
HIDDEN_IN_GUEST = (Path("/tmp"), Path("/run"))


def _check_visible(prefix: Path, project: Path) -> None:
    """Refuse a Python environment the guest cannot see (a venv under /tmp or /run)."""
    where = prefix.resolve()
    if where.is_relative_to(project):
        return
    for hidden in HIDDEN_IN_GUEST:
        if where.is_relative_to(hidden):
            raise VMError(f"the Python environment {where} is under {hidden}, which the guest "
                          f"mounts its own {hidden} over; create the venv elsewhere "
                          "(e.g. /var/tmp or your home) to run kmlbus in the VM")


def job_script(cmd: Sequence[str], cwd: Path, env: Mapping[str, str]) -> str:
    """The shell script the guest runs in its chroot: cd, clean env, exec."""
    assigns = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(env.items()))
    return (
        "# kmlbus.vm job, run by the guest's /init inside the host-root chroot\n"
        f"cd {shlex.quote(str(cwd))} || exit 126\n"
        f"exec /usr/bin/env -i {assigns} {shlex.join(cmd)}\n"
    )


def qemu_argv(
    *, kernel: Path, initrd: Path, project: Path, accel: str, memory: str, smp: int,
    nonce: str, job: Path, python_image: tuple[Path, Path] | None = None,
) -> list[str]:
    """The QEMU command line (see /work/shared/ENVIRONMENT.md for why each part).

    *python_image* is (ext4 image, mount point) from `pyimage.ensure_python_image`.
    """
    cpu = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg", "-cpu", "max"]
    append = " ".join([
        "console=ttyS0", "panic=-1", "quiet", "8250.nr_uarts=1",
        f"kmlbus_nonce={nonce}", f"kmlbus_work={project}", f"kmlbus_job={job}",
        *([f"kmlbus_python={python_image[1]}"] if python_image else []),
    ])
    disk = [
        "-drive", f"file={python_image[0]},if=none,id=python,format=raw,readonly=on",
        "-device", "virtio-blk-pci,drive=python",
    ] if python_image else []
    return [
        _QEMU, "-nodefaults", "-no-user-config", *cpu,
        "-m", memory, "-smp", str(smp),
        "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={project},mount_tag=work,security_model=none,multidevs=remap",
        *disk,
    ]


class _Console:
    """Tees QEMU's serial output to the log, optionally the terminal, and a line parser."""

    def __init__(self, log: IO[bytes], nonce: str, echo: bool) -> None:
        self.log = log
        self.echo = echo
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.partial = b""
        self.lines: list[str] = []
        self.markers: list[tuple[str, str, float]] = []
        self._re = re.compile(rf"KMLBUS-VM-(BOOT|START|EXIT|FAIL)-{nonce}(?: (.*))?")

    def feed(self, chunk: bytes) -> None:
        chunk = chunk.replace(b"\r", b"")
        self.log.write(chunk)
        self.log.flush()
        if self.echo:
            sys.stdout.write(self.decoder.decode(chunk))
            sys.stdout.flush()
        *complete, self.partial = (self.partial + chunk).split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            m = self._re.search(line)
            if m:
                self.markers.append((m.group(1), m.group(2) or "", time.monotonic()))

    def marker(self, what: str) -> tuple[str, float] | None:
        for kind, arg, when in self.markers:
            if kind == what:
                return arg, when
        return None


def _open_console(path: Path) -> tuple[Path, IO[bytes]]:
    """Open the console log, locked so that concurrent runs never share one.

    Several people run VMs from the same tree; when *path* is in use by
    another run this run writes ``<stem>-<pid><suffix>`` next to it instead.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for candidate in (path, path.with_name(f"{path.stem}-{os.getpid()}{path.suffix}")):
        log = open(candidate, "ab")
        try:
            fcntl.flock(log, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.close()
            continue
        log.truncate(0)
        if candidate != path:
            print(f"kmlbus.vm: {path} is in use by another run; console goes to {candidate}",
                  file=sys.stderr)
        return candidate, log
    raise VMError(f"cannot lock a console log next to {path}")


def _attempt(
    argv: list[str], log: IO[bytes], nonce: str, echo: bool, deadline: float,
    boot_grace: float | None,
) -> tuple[_Console, bool, bool, float]:
    """Run QEMU once. Returns (console, timed_out, never_booted, start time)."""
    start = time.monotonic()
    log.truncate(0)
    con = _Console(log, nonce, echo)
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
    except FileNotFoundError:
        raise VMError(f"{_QEMU} not found; install it with `apt-get install qemu-system-x86`")
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    timed_out = never_booted = False
    exit_seen: float | None = None
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if boot_grace is not None and now - start > boot_grace and not con.marker("BOOT"):
                never_booted = True
                break
            if exit_seen is None and (con.marker("EXIT") or con.marker("FAIL")):
                exit_seen = now
            if exit_seen is not None and now - exit_seen > POWEROFF_GRACE:
                break  # the guest reported but did not power off: no need to wait
            ready, _, _ = select.select([fd], [], [], min(1.0, deadline - now))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                con.feed(chunk)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
    if con.partial:
        con.feed(b"\n")
    if proc.returncode not in (0, None, -9) and not con.markers:
        con.lines.append(f"(QEMU exited with status {proc.returncode})")
    return con, timed_out, never_booted, start


def boot(
    cmd: Sequence[str],
    *,
    kver: str | None = None,
    build: bool = True,
    timeout: float = 900.0,
    console: Path | str | None = None,
    memory: str = "1G",
    smp: int | None = None,
    accel: str = "auto",
    echo: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    python_image: bool = True,
) -> VMResult:
    """Build the modules, boot the guest, run *cmd* there and collect the outcome.

    Raises `VMError` when the VM cannot be prepared (no kernel, no QEMU, build
    failure); everything that happens after QEMU starts is in the result.
    """
    if not cmd:
        raise VMError("no command given: expected e.g. `python -m kmlbus.vm run -- true`")
    project = project_root()
    _check_visible(Path(sys.prefix), project)
    if re.search(r"[\s,]", str(project)):
        raise VMError(f"project path {project!r} contains a space or comma, which 9p/QEMU options cannot carry")
    kver = select_kernel(kver)
    vmlinuz(kver)
    if build:
        build_modules(kver, project, echo=echo)
    initrd = ensure_initramfs(kver, project)
    kernel = boot_image(kver, project)
    image = ensure_python_image(project, echo=echo) if python_image else None
    console, log = _open_console(
        Path(console) if console is not None else project / "vm-out" / "console.log"
    )
    dmesg_file = console.with_name(console.stem + ".dmesg.log")
    smp = smp or min(2, os.cpu_count() or 1)

    nonce = secrets.token_hex(8)
    job = project / "build" / "vm" / "jobs" / nonce
    job.mkdir(parents=True)
    (job / "job.sh").write_text(job_script(cmd, cwd or project, guest_env(env)))

    chosen = choose_accel(accel)
    deadline = time.monotonic() + timeout
    try:
        while True:
            argv = qemu_argv(kernel=kernel, initrd=initrd, project=project, accel=chosen,
                             memory=memory, smp=smp, nonce=nonce, job=job, python_image=image)
            grace = KVM_BOOT_GRACE if chosen == "kvm" and accel == "auto" else None
            con, timed_out, never_booted, start = _attempt(argv, log, nonce, echo, deadline, grace)
            if never_booted:
                print("kmlbus.vm: the KVM guest never reported; retrying with TCG", file=sys.stderr)
                chosen = "tcg"
                continue
            break
        result = VMResult(status=None, accel=chosen, console=console, dmesg_file=dmesg_file,
                          timed_out=timed_out, total_seconds=time.monotonic() - start)
        exit_marker = con.marker("EXIT")
        fail_marker = con.marker("FAIL")
        started = con.marker("START")
        if started:
            result.boot_seconds = started[1] - start
        if exit_marker:
            m = re.match(r"status=(\d+)", exit_marker[0])
            result.status = int(m.group(1)) if m else None
        if fail_marker:
            result.failure = f"guest setup failed: {fail_marker[0]}"
        elif timed_out:
            result.failure = f"timed out after {timeout:g} s; QEMU killed"
        elif result.status is None:
            result.failure = "the guest stopped without reporting an exit status (kernel panic or QEMU error?)"
        saved = job / "dmesg"
        if saved.is_file():
            shutil.copyfile(saved, dmesg_file)
            result.dmesg = saved.read_text(errors="replace").splitlines()
        else:
            dmesg_file.unlink(missing_ok=True)
            result.dmesg = con.lines  # the guest died: the console is all we have
        result.problems = dmesg_mod.problems(result.dmesg)
        result.console_tail = con.lines[-TAIL_LINES:]
        return result
    finally:
        log.close()
        shutil.rmtree(job, ignore_errors=True)


def report(result: VMResult, *, echo: bool = True) -> None:
    """Print one line per finding to stderr (what failed, where to look)."""
    err = sys.stderr
    if not echo and result.exit_code != 0 and result.console_tail:
        err.write("".join(f"  | {line}\n" for line in result.console_tail))
    if result.failure:
        print(f"kmlbus.vm: {result.failure}; console in {result.console}", file=err)
    if result.problems:
        first = result.problems[0]
        idx = result.dmesg.index(first)
        context = result.dmesg[max(0, idx - 2): idx + 30]
        err.write("".join(f"  | {line}\n" for line in context))
        where = result.dmesg_file if result.dmesg_file.exists() else result.console
        print(
            f"kmlbus.vm: guest kernel log has {len(result.problems)} problem line(s), "
            f"first: {first.strip()!r}; full log in {where}",
            file=err,
        )
    boot_s = f"{result.boot_seconds:.1f} s" if result.boot_seconds is not None else "n/a"
    status = "none" if result.status is None else str(result.status)
    print(
        f"kmlbus.vm: guest status {status}, exit code {result.exit_code}; "
        f"boot {boot_s}, total {result.total_seconds:.1f} s ({result.accel})",
        file=err,
    )


def run(
    cmd: Sequence[str],
    *,
    kver: str | None = None,
    build: bool = True,
    timeout: float = 900.0,
    console: Path | str | None = None,
    memory: str = "1G",
    smp: int | None = None,
    accel: str = "auto",
    echo: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    python_image: bool = True,
) -> int:
    """Run *cmd* in the guest (options as for `boot`) and return an exit code.

    That is the guest command's status, or `EXIT_DMESG` (it passed but the
    kernel log shows a problem), `EXIT_TIMEOUT`, `EXIT_NO_STATUS` (the VM could
    not be prepared or the guest died); each problem is explained on stderr.
    """
    try:
        result = boot(cmd, kver=kver, build=build, timeout=timeout, console=console,
                      memory=memory, smp=smp, accel=accel, echo=echo, env=env, cwd=cwd,
                      python_image=python_image)
    except VMError as exc:
        print(f"kmlbus.vm: {exc}", file=sys.stderr)
        return EXIT_NO_STATUS
    report(result, echo=echo)
    return result.exit_code
