"""Real applications for the readahead benchmark: LMDB random lookups and a ``sha256sum`` scan.

Neither is ours: py-lmdb (the LMDB library) looks keys up at random in a
database larger than the memory its process may keep cached, and coreutils'
``sha256sum`` reads large files from start to end.  The benchmark measures
them beside fio's synthetic workloads, under the same policies.

* LMDB: :func:`make_lmdb` writes the database once; :func:`run_lmdb` runs the
  lookups in a child process placed in a memory cgroup (:func:`memcg`, cgroup
  v2 ``memory.max``), so the page cache that may hold the database is smaller
  than the database, as on a machine whose data outgrows its memory.  LMDB is
  opened as an application would by default (``readahead=True``: LMDB leaves
  the kernel's readahead on; its docs advise turning it off for random access,
  which is the decision the proxy is meant to learn per stream).
* ``sha256sum``: :func:`run_sha256` hashes the files; throughput = bytes / time.

Parsing is apart from running (:func:`parse_lmdb`, :func:`parse_sha256sum`) so the
host tests check it without a guest.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LMDB_VALUE", "lmdb_keys", "make_lmdb", "memcg", "parse_lmdb", "parse_sha256sum", "run_lmdb",
           "run_sha256"]

#: bytes per LMDB value: one 4 KiB overflow page each, so a lookup reads about one page
LMDB_VALUE = 4000
CGROUP_ROOT = Path("/sys/fs/cgroup")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

# The child: joins the cgroup, looks up random keys for the given seconds, prints JSON.
_LOOKUPS = r"""
import json, random, sys, time
import lmdb
procs, path, n, seconds, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
if procs:
    with open(procs, "w") as f:
        f.write("0")
env = lmdb.open(path, readonly=True, lock=False, subdir=True)
rng = random.Random(seed)
done = nbytes = 0
t0 = time.monotonic()
with env.begin() as txn:
    while time.monotonic() - t0 < seconds:
        for _ in range(64):
            v = txn.get(rng.randrange(n).to_bytes(8, "big"))
            if v is None:
                sys.exit("lmdb: a key written by make_lmdb is missing")
            nbytes += len(v)
        done += 64
print(json.dumps({"lookups": done, "bytes": nbytes, "seconds": time.monotonic() - t0}))
"""


def lmdb_keys(size_mb: int) -> int:
    """Keys in a :func:`make_lmdb` database of *size_mb* MiB (one 4 KiB page per value)."""
    return size_mb * 2**20 // 4096


def make_lmdb(path: Path, size_mb: int) -> int:
    """Write an LMDB database of about *size_mb* MiB at *path* (a folder); the number of keys.

    Keys are 0..n-1 as 8-byte big-endian integers; values :data:`LMDB_VALUE` bytes.
    """
    import lmdb

    n = lmdb_keys(size_mb)
    path.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=(size_mb * 2 + 64) * 2**20, subdir=True)
    try:
        chunk = 4096
        for lo in range(0, n, chunk):
            with env.begin(write=True) as txn:
                for k in range(lo, min(lo + chunk, n)):
                    txn.put(k.to_bytes(8, "big"), bytes([k % 251]) * LMDB_VALUE, append=True)
        env.sync(True)
    finally:
        env.close()
    return n


@contextmanager
def memcg(name: str, limit_mb: int) -> Iterator[Path]:
    """A cgroup v2 group *name* with ``memory.max`` = *limit_mb* MiB; yields its ``cgroup.procs``.

    Mounts cgroup2 at /sys/fs/cgroup if nothing is mounted there (the guest's
    init does not) and enables the memory controller for children.  Removed
    on exit (its processes must have exited)."""
    if not (CGROUP_ROOT / "cgroup.controllers").exists():
        subprocess.run(["mount", "-t", "cgroup2", "none", str(CGROUP_ROOT)], check=True)
    if "memory" not in (CGROUP_ROOT / "cgroup.controllers").read_text().split():
        raise RuntimeError("cgroup v2 has no memory controller here")
    (CGROUP_ROOT / "cgroup.subtree_control").write_text("+memory")
    group = CGROUP_ROOT / name
    group.mkdir(exist_ok=True)
    try:
        (group / "memory.max").write_text(str(limit_mb * 2**20))
        yield group / "cgroup.procs"
    finally:
        os.rmdir(group)


def parse_lmdb(out: str) -> float:
    """Thousands of lookups per second from the lookup child's JSON line."""
    lines = [ln for ln in out.splitlines() if ln.strip().startswith("{")]
    if len(lines) != 1:
        raise ValueError(f"lmdb lookups: expected one JSON line, got {out!r}")
    d = json.loads(lines[0])
    lookups, seconds = int(d["lookups"]), float(d["seconds"])
    if lookups <= 0 or seconds <= 0:
        raise ValueError(f"lmdb lookups: nothing measured: {d}")
    return lookups / seconds / 1000


def run_lmdb(path: Path, n: int, seconds: float, procs: Path | None, seed: int = 7) -> float:
    """Thousands of random lookups per second over *seconds*, in the cgroup of *procs*."""
    out = subprocess.run([sys.executable, "-c", _LOOKUPS, str(procs or ""), str(path), str(n),
                          f"{seconds:g}", str(seed)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"lmdb lookups failed ({out.returncode}): {out.stderr[-2000:]}")
    return parse_lmdb(out.stdout)


def parse_sha256sum(out: str, files: Sequence[Path]) -> None:
    """Check that ``sha256sum`` printed one digest for each of *files*, in order."""
    lines = out.splitlines()
    got = [ln.split(None, 1) for ln in lines]
    if len(got) != len(files) or any(
            len(g) != 2 or not _HEX64.match(g[0]) or g[1].lstrip("*") != str(f)
            for g, f in zip(got, files)):
        raise ValueError(f"sha256sum: expected a digest for each of {[str(f) for f in files]}, "
                         f"got {out!r}")


def run_sha256(files: Sequence[Path]) -> float:
    """MiB/s of ``sha256sum`` over *files* (their total size over the command's time)."""
    total = sum(f.stat().st_size for f in files)
    t0 = time.monotonic()
    out = subprocess.run(["sha256sum", *map(str, files)], capture_output=True, text=True,
                         check=True).stdout
    dt = time.monotonic() - t0
    parse_sha256sum(out, files)
    return total / 2**20 / dt
