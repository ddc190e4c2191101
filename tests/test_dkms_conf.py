"""kernel/dkms.conf builds and installs what the Kbuild files make, at the package's version."""

from __future__ import annotations

import re
from pathlib import Path

import kmlbus

ROOT = Path(__file__).resolve().parents[1]
#: built for the benchmarks and the tests only, never installed
NOT_INSTALLED = {"kmlbus_bench", "kmlbus_testmod"}


def _conf() -> dict[str, str]:
    text = (ROOT / "kernel" / "dkms.conf").read_text()
    return dict(re.findall(r'^([A-Z_]+(?:\[\d+\])?)="([^"]*)"', text, re.M))


def _kbuild_modules() -> dict[str, str]:
    """module name -> its folder relative to kernel/ ("." for kernel/ itself)."""
    out = {}
    for kb in sorted((ROOT / "kernel").rglob("Kbuild")):
        for name in re.findall(r"^obj-m\s*\+?=\s*(\w+)\.o", kb.read_text(), re.M):
            rel = kb.parent.relative_to(ROOT / "kernel").as_posix()
            out[name] = rel if rel != "." else "."
    return out


def test_dkms_version_is_the_packages() -> None:
    c = _conf()
    assert c["PACKAGE_NAME"] == "kmlbus" and c["PACKAGE_VERSION"] == kmlbus.__version__


def test_dkms_installs_every_module_kbuild_makes_but_the_bench_and_test_ones() -> None:
    c = _conf()
    built = {c[k]: c[k.replace("NAME", "LOCATION")] for k in c if k.startswith("BUILT_MODULE_NAME")}
    want = {n: loc for n, loc in _kbuild_modules().items() if n not in NOT_INSTALLED}
    assert built == want
    for k in c:
        if k.startswith("DEST_MODULE_LOCATION"):
            assert c[k] == "/updates/dkms", k
