"""The readahead benchmark's real applications, run on the host: LMDB lookups and sha256sum."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from kmlbus.tools.bench_readahead import Results, summarize
from kmlbus.tools.ra_apps import (
    LMDB_VALUE,
    lmdb_keys,
    make_lmdb,
    parse_lmdb,
    parse_sha256sum,
    run_lmdb,
    run_sha256,
)


def test_lmdb_lookups_run_over_every_key_the_database_holds(tmp_path: Path) -> None:
    import lmdb

    n = make_lmdb(tmp_path / "db", 2)
    assert n == lmdb_keys(2) == 512
    env = lmdb.open(str(tmp_path / "db"), readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.stat()["entries"] == n
        assert txn.get((n - 1).to_bytes(8, "big")) == bytes([(n - 1) % 251]) * LMDB_VALUE
    env.close()
    assert run_lmdb(tmp_path / "db", n, 0.2, None) > 0


def test_lmdb_lookups_fail_loudly_on_a_missing_key(tmp_path: Path) -> None:
    n = make_lmdb(tmp_path / "db", 1)
    with pytest.raises(RuntimeError, match="missing"):
        run_lmdb(tmp_path / "db", n * 4, 0.2, None)


def test_parse_lmdb_gives_thousands_per_second_and_rejects_empty_runs() -> None:
    assert parse_lmdb('noise\n{"lookups": 3000, "bytes": 1, "seconds": 1.5}\n') == 2.0
    with pytest.raises(ValueError, match="one JSON line"):
        parse_lmdb("")
    with pytest.raises(ValueError, match="nothing measured"):
        parse_lmdb('{"lookups": 0, "bytes": 0, "seconds": 1.0}')


def test_sha256sum_hashes_every_file_and_its_output_is_checked(tmp_path: Path) -> None:
    files = [tmp_path / "a", tmp_path / "b"]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 300_000)
    assert run_sha256(files) > 0
    digest = hashlib.sha256(b"x").hexdigest()
    parse_sha256sum(f"{digest}  {files[0]}\n{digest}  {files[1]}\n", files)
    with pytest.raises(ValueError, match="a digest for each"):
        parse_sha256sum(f"{digest}  {files[0]}\n", files)
    with pytest.raises(ValueError, match="a digest for each"):
        parse_sha256sum(f"nothex  {files[0]}\n{digest}  {files[1]}\n", files)


def test_table_shows_applications_measured_and_leaves_out_those_not() -> None:
    res = Results({})
    for kb, (seq, mm, db, scan) in {0: (1.0, 40.0, 3.0, 10.0), 128: (20.0, 10.0, 1.0, 20.0),
                                    1024: (60.0, 5.0, 0.5, 30.0),
                                    8192: (80.0, 1.0, 0.2, 25.0)}.items():
        res.add("2ms", f"static {kb}", "mixed", {"seq4k": seq, "rand_mmap": mm})
        res.add("2ms", f"static {kb}", "lmdb", {"get_k/s": db})
        res.add("2ms", f"static {kb}", "sha256sum", {"scan": scan})
    res.add("2ms", "proxy rule", "mixed", {"seq4k": 80.0, "rand_mmap": 40.0})
    res.add("2ms", "proxy rule", "lmdb", {"get_k/s": 2.5})
    res.add("2ms", "proxy rule", "sha256sum", {"scan": 30.0})
    out = summarize(res, (0, 128, 1024, 8192))
    rows = {ln.split()[0]: ln for ln in out.splitlines()
            if ln and ln.split()[0].count("/") and not ln.startswith("workload/")}
    assert set(rows) == {"mixed/seq4k", "mixed/rand_mmap", "lmdb/get_k/s", "sha256sum/scan"}
    assert "3.0 @    0" in rows["lmdb/get_k/s"] and "2.50x" in rows["lmdb/get_k/s"]
    assert "30.0 @ 1024" in rows["sha256sum/scan"] and "1.50x" in rows["sha256sum/scan"]
