#!/usr/bin/env bash
# The package as users get it: build the wheel, install it (not editable) into
# a fresh venv, and run the CLI from outside the source tree: --help, status
# without the module (one line, non-zero, no traceback), then the VM suite's
# CLI tests with that venv's Python and the kernel sources shipped in the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# not under /tmp: the VM guest mounts its own /tmp over the host's
W=${KMLBUS_WHEEL_DIR:-/var/tmp/kmlbus-wheel-check}
rm -rf "$W"
mkdir -p "$W/dist" "$W/work"

echo "== wheel: build, install into a fresh venv =="
"$PY" -m pip wheel -q --no-deps --disable-pip-version-check -w "$W/dist" . 2>&1 | grep -v '^WARNING' || true
rm -rf build/lib build/bdist.*
whl=$(ls "$W"/dist/kmlbus-*.whl)
"$PY" -m venv "$W/venv"
"$W/venv/bin/pip" install -q --disable-pip-version-check "$whl[test]" 2>&1 | grep -v '^WARNING' || true

cd "$W/work"
echo "== wheel: kmlbus --help =="
"$W/venv/bin/python" -m kmlbus --help >help.txt
grep -q "demo" help.txt
"$W/venv/bin/kmlbus" --help >/dev/null

echo "== wheel: kmlbus status without the module =="
set +e
"$W/venv/bin/python" -m kmlbus status >status.txt 2>&1
rc=$?
set -e
cat status.txt
if [ "$rc" -eq 0 ] || [ "$(wc -l <status.txt)" -ne 1 ] || grep -q Traceback status.txt; then
	echo "wheel check: 'kmlbus status' without the module should print one line and fail (rc=$rc)" >&2
	exit 1
fi

echo "== wheel: the VM suite's CLI tests with the installed package =="
# The tests come from the checkout; kmlbus comes from the venv (this folder has no
# kmlbus/ to shadow it), the kernel sources from the wheel (copied into this folder).
cp -r "$OLDPWD/tests" "$OLDPWD/pyproject.toml" .
"$W/venv/bin/python" - <<'PY'
import kmlbus, sys
assert "site-packages" in kmlbus.__file__, f"kmlbus imported from {kmlbus.__file__}, not the wheel"
print("kmlbus from", kmlbus.__file__)
PY
# (the CLI tests that need no second daemon run; the whole file runs in the VM suite)
KMLBUS_WORKDIR="$W/work" "$W/venv/bin/python" -m kmlbus.vm test tests/vm/test_vm_smoke.py \
	tests/vm/test_bus_daemon.py -k "smoke or killing or without_the_module"
