#!/usr/bin/env bash
# DKMS as an operator uses it: add this checkout's kernel/ (copied, without build
# output), build and install for each kernel named (a series such as 6.12 or a
# release; default: $KMLBUS_KERNEL, else the VM's default 6.1), then load the
# installed modules with modprobe in the VM booted on that kernel
# (tests/vm/test_dkms.py).  Needs root and dkms.
#   bash tests/dkms.sh [KERNEL...]
# KMLBUS_DKMS_VM=0 builds and installs only; tests/run then runs test_dkms.py
# inside its VM runs (KMLBUS_DKMS=1), which saves a boot per kernel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ver=$(sed -n 's/^PACKAGE_VERSION="\(.*\)"/\1/p' kernel/dkms.conf)
[ $# -gt 0 ] || set -- "${KMLBUS_KERNEL:-}"
kvers=()
for k in "$@"; do
	kvers+=("$("$PY" -c 'import sys; from kmlbus.vm import select_kernel; print(select_kernel(sys.argv[1] or None))' "$k")")
done
src=/usr/src/kmlbus-$ver

echo "== DKMS: kmlbus/$ver for ${kvers[*]} =="
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
for kver in "${kvers[@]}"; do
	dkms install "kmlbus/$ver" -k "$kver"
done
[ "${KMLBUS_DKMS_VM:-1}" = 0 ] && exit 0
for kver in "${kvers[@]}"; do
	KMLBUS_DKMS=1 "$PY" -m kmlbus.vm test --kver "$kver" tests/vm/test_dkms.py
done
