#!/usr/bin/env bash
# DKMS as an operator uses it: add this checkout's kernel/ (copied, without build
# output), build and install for the kernel the VM boots, then load the installed
# modules with modprobe in the VM (tests/vm/test_dkms.py).  Needs root and dkms.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ver=$(sed -n 's/^PACKAGE_VERSION="\(.*\)"/\1/p' kernel/dkms.conf)
kver=$("$PY" -c 'from kmlbus.vm import newest_kernel; print(newest_kernel())')
src=/usr/src/kmlbus-$ver

echo "== DKMS: kmlbus/$ver for $kver =="
dkms remove "kmlbus/$ver" --all >/dev/null 2>&1 || true
rm -rf "$src"
mkdir -p "$src"
# sources only: what kmlbus.vm copies for a wheel (no .o, .ko, .mod.c of a local build)
"$PY" - "$src" <<'PY'
import sys
from pathlib import Path
from kmlbus.vm.kernels import install_kernel_sources
install_kernel_sources(Path("kernel"), Path(sys.argv[1]))
PY
dkms add "kmlbus/$ver"
dkms install "kmlbus/$ver" -k "$kver"
KMLBUS_DKMS=1 "$PY" -m kmlbus.vm test --kver "$kver" tests/vm/test_dkms.py
