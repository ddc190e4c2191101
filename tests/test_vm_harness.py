"""The VM harness (kmlbus.vm) on the host: pieces without QEMU, then two real boots.

The boots take a few seconds each under TCG (longer on a busy machine); they
prove the two promises the VM suite relies on: the harness returns the
guest command's exit status (QEMU itself always exits 0), and a kernel
WARNING in the guest fails the run even if the command succeeded.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from kmlbus.vm import EXIT_DMESG, EXIT_NO_STATUS, EXIT_TIMEOUT, VMResult, run
from kmlbus.vm.__main__ import pytest_command
from kmlbus.vm.dmesg import problems
from kmlbus.vm.initramfs import Entry, cpio_newc, init_script, parse_show_depends
from kmlbus.vm import kernels
from kmlbus.vm.kernels import (
    DEFAULT_KERNEL,
    KERNEL_ENV,
    VMError,
    _version_key,
    has_pvh_note,
    kernel_series,
    select_kernel,
)
from kmlbus.vm.qemu import guest_env, job_script, qemu_argv


def _parse_newc(archive: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, data) of a newc cpio archive (test-side reader)."""
    out: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        assert archive[pos:pos + 6] == b"070701"
        fields = [int(archive[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        pos += 110
        name = archive[pos: pos + namesize - 1].decode()
        pos = (pos + namesize + 3) // 4 * 4
        data = archive[pos: pos + size]
        pos = (pos + size + 3) // 4 * 4
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, data)


def test_cpio_writer_round_trips_files_links_and_devices() -> None:
    archive = cpio_newc([
        Entry("bin", stat.S_IFDIR | 0o755),
        Entry("bin/busybox", stat.S_IFREG | 0o755, b"\x7fELF..."),
        Entry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
    ])
    assert len(archive) % 512 == 0
    members = _parse_newc(archive)
    assert members["bin/busybox"] == (stat.S_IFREG | 0o755, b"\x7fELF...")
    assert members["bin/sh"][1] == b"busybox"
    assert stat.S_ISCHR(members["dev/console"][0])


def test_show_depends_parser_keeps_order_and_skips_builtins() -> None:
    text = ("insmod /lib/modules/k/virtio_ring.ko \n"
            "builtin crc32c\n"
            "insmod /lib/modules/k/9p.ko.xz opt=1\n")
    assert parse_show_depends(text) == [Path("/lib/modules/k/virtio_ring.ko"),
                                        Path("/lib/modules/k/9p.ko.xz")]


def test_init_script_loads_modules_in_order_and_reports_markers() -> None:
    script = init_script([Path("/x/virtio.ko"), Path("/x/9p.ko.zst")])
    assert "for m in virtio.ko 9p.ko; do" in script
    assert 'say EXIT "status=$rc"' in script and "poweroff -f" in script
    assert "@" not in script  # every placeholder filled


def test_kernel_versions_sort_numerically() -> None:
    assert sorted(["6.1.0-9-amd64", "6.1.0-56-amd64", "6.10.0-1-amd64"], key=_version_key) == [
        "6.1.0-9-amd64", "6.1.0-56-amd64", "6.10.0-1-amd64"]
    assert kernel_series("6.12.117+deb12-amd64") == "6.12" and kernel_series("6.1.0-57-amd64") == "6.1"


@pytest.fixture
def two_kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake /boot and /lib/modules with 6.1 (two ABIs), 6.12, and a 6.13 without an image."""
    boot, modules = tmp_path / "boot", tmp_path / "modules"
    for kver in ("6.1.0-9-amd64", "6.1.0-57-amd64", "6.12.117+deb12-amd64", "6.13.1-amd64"):
        (modules / kver).mkdir(parents=True)
        if not kver.startswith("6.13"):
            boot.mkdir(exist_ok=True)
            (boot / f"vmlinuz-{kver}").write_bytes(b"")
    monkeypatch.setattr(kernels, "BOOT", boot)
    monkeypatch.setattr(kernels, "MODULES", modules)
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    return tmp_path


def test_default_kernel_is_the_6_1_series_not_the_newest_installed(two_kernels: Path) -> None:
    assert DEFAULT_KERNEL == "6.1"
    assert select_kernel() == "6.1.0-57-amd64"  # newest ABI of the series, not 6.12


def test_kernel_is_chosen_by_option_then_env_by_series_or_release(
        two_kernels: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KERNEL_ENV, "6.12")
    assert select_kernel() == "6.12.117+deb12-amd64"
    assert select_kernel("6.1") == "6.1.0-57-amd64"  # the option wins over the variable
    assert select_kernel("6.1.0-9-amd64") == "6.1.0-9-amd64"


def test_unknown_kernel_choice_names_what_is_installed(
        two_kernels: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KERNEL_ENV, "6.13")  # modules but no image: not bootable
    with pytest.raises(VMError, match=r"'6.13' \(from KMLBUS_KERNEL\).*6.1.0-57-amd64, 6.12.117"):
        select_kernel()
    with pytest.raises(VMError, match="from --kver"):
        select_kernel("6.1.0")


def test_pvh_note_detection_rejects_non_elf() -> None:
    assert not has_pvh_note(b"MZ" + b"\0" * 100)


def test_dmesg_problem_lines_are_warn_bug_oops_and_traces_only() -> None:
    log = ["[ 1.0] WARNING: CPU: 0 PID: 1 at x.c:1", "[ 1.1] Call Trace:", "[ 1.2] BUG: kernel NULL",
           "[ 1.3] Oops: 0002", "[ 1.4] CONFIG_DEBUG_BUGVERBOSE", "[ 1.5] kmlbus: loaded",
           "[ 1.6] module verification failed: signature and/or required key missing"]
    assert problems(log) == log[:4]


def test_job_script_quotes_arguments_and_sets_guest_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/a b")
    env = guest_env({"EXTRA": "1"})
    assert env["KMLBUS_IN_VM"] == "1" and env["PYTHONPATH"] == "/a b" and env["EXTRA"] == "1"
    script = job_script(["sh", "-c", "echo 'hi there'; exit 3"], Path("/work/p"), env)
    assert "cd /work/p" in script
    assert "'sh' '-c'" in script or "sh -c " in script
    assert "'echo '\"'\"'hi there'\"'\"'; exit 3'" in script
    assert "'PYTHONPATH=/a b'" in script


def test_qemu_command_uses_tcg_9p_shares_and_the_nonce(tmp_path: Path) -> None:
    argv = qemu_argv(kernel=Path("/boot/vmlinuz-x"), initrd=tmp_path / "i", project=Path("/w/p"),
                     accel="tcg", memory="1G", smp=2, nonce="abc", job=Path("/w/p/build/vm/jobs/abc"))
    line = " ".join(argv)
    assert "-accel tcg -cpu max" in line and "-no-reboot" in line
    assert "mount_tag=hostroot" in line and "readonly=on" in line and "path=/w/p,mount_tag=work" in line
    assert "kmlbus_nonce=abc" in line and "console=ttyS0" in line


def test_exit_code_prefers_timeout_then_missing_status_then_dmesg() -> None:
    base = dict(accel="tcg", console=Path("c"), dmesg_file=Path("d"))
    assert VMResult(status=0, **base).exit_code == 0  # type: ignore[arg-type]
    assert VMResult(status=3, problems=["WARNING"], **base).exit_code == 3  # type: ignore[arg-type]
    assert VMResult(status=0, problems=["WARNING"], **base).exit_code == EXIT_DMESG  # type: ignore[arg-type]
    assert VMResult(status=None, **base).exit_code == EXIT_NO_STATUS  # type: ignore[arg-type]
    assert VMResult(status=0, timed_out=True, **base).exit_code == EXIT_TIMEOUT  # type: ignore[arg-type]


def test_test_command_runs_the_vm_suite_with_this_python() -> None:
    import sys
    assert pytest_command(["-x"])[:7] == [sys.executable, "-m", "pytest", "-m", "vm", "tests/vm", "-q"]
    assert "tests/vm" not in pytest_command(["tests/vm/test_vm_smoke.py::test_x"])
    # options that name tests to leave out keep the whole suite as the run's path
    left_out = ["--deselect=tests/vm/test_vm_smoke.py::test_x", "--ignore=tests/vm/test_dkms.py"]
    assert pytest_command(left_out)[5] == "tests/vm"


# --- real boots (two, a few seconds each under TCG) ---------------------------------------


def test_boot_returns_the_guest_commands_exit_status(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    assert run(["sh", "-c", "exit 3"], build=False, echo=False, timeout=300, console=console) == 3
    assert "status=3" in console.read_text()


def test_boot_fails_when_the_guest_kernel_logs_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    console = tmp_path / "console.log"
    code = run(["sh", "-c", "echo 'WARNING: test' > /dev/kmsg"], build=False, echo=False,
               timeout=300, console=console)
    assert code == EXIT_DMESG
    err = capsys.readouterr().err
    assert "WARNING: test" in err
    assert "WARNING: test" in (tmp_path / "console.dmesg.log").read_text()


def test_a_work_folder_gets_the_kernel_sources_and_no_build_output(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What an installed wheel relies on: KMLBUS_WORKDIR (or ~/.cache/kmlbus) is given the
    kernel sources to build; a changed source is refreshed; kbuild output is never copied."""
    from kmlbus.vm.kernels import project_root

    monkeypatch.setenv("KMLBUS_WORKDIR", str(tmp_path))
    assert project_root() == tmp_path
    src = Path(__file__).resolve().parents[1] / "kernel"
    for rel in ("Kbuild", "Makefile", "kmlbus_core.c", "include/uapi/linux/kmlbus.h",
                "samples/kmlbus_sample.c"):
        assert (tmp_path / "kernel" / rel).read_bytes() == (src / rel).read_bytes(), rel
    assert not list((tmp_path / "kernel").rglob("*.o")) and not list((tmp_path / "kernel").rglob("*.mod.c"))
    (tmp_path / "kernel" / "kmlbus_core.c").write_text("stale\n")
    project_root()
    assert (tmp_path / "kernel" / "kmlbus_core.c").read_bytes() == (src / "kmlbus_core.c").read_bytes()


def test_the_vm_refuses_a_python_environment_the_guest_cannot_see(tmp_path: Path) -> None:
    from kmlbus.vm.kernels import VMError
    from kmlbus.vm.qemu import _check_visible

    with pytest.raises(VMError, match=r"/tmp/venv is under /tmp, .* create the venv elsewhere"):
        _check_visible(Path("/tmp/venv"), Path("/work/project"))
    _check_visible(Path("/var/tmp/venv"), Path("/work/project"))
    _check_visible(Path("/tmp/ci/project/.venv"), Path("/tmp/ci/project"))
