"""The kernel's own YNL CLI (``tools/net/ynl/cli.py``) drives the real kmlbus.ko.

A generic netlink client that knows kmlbus only from its spec: the CLI of
Debian's linux-source-6.12, cached under ``build/ynl`` by ``.ci/fetch-ynl``
(the project does not carry it), checking the spec against the kernel's
genetlink-legacy schema as published (``../shared/ynl/``; the ``--do get`` test
validates with it, the others pass ``--no-schema``: the host test
``tests/test_ynl_schema.py`` validates the same spec against the same schema, and
jsonschema's check costs seconds per run under TCG).  Each test runs the
commands the README shows: ``--do get``, ``--dump get``, ``--subscribe
telemetry`` (records and feedback decoded as lists of structs),
``--subscribe events`` and a ``recommend`` the kernel refuses, whose extack
the CLI names (``.recs``) instead of failing to follow it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

from kmlbus.contract import spec as kspec
from kmlbus.vm import project_root
from kmlbus.wire.netlink import Connection

pytestmark = pytest.mark.vm

CLI = project_root() / "build" / "ynl" / "cli.py"
SCHEMA = project_root().parent / "shared" / "ynl" / "genetlink-legacy.yaml"
SPEC = kspec.spec_path()


def command(*args: str, schema: bool = False) -> list[str]:
    """The CLI's command line on the family spec, JSON output (fails if the CLI is missing);
    the spec checked against the kernel's schema when *schema*."""
    for need, how in ((CLI, "run `bash .ci/fetch-ynl` (it caches the kernel's YNL CLI)"),
                      (SCHEMA, "the kernel's genetlink-legacy.yaml must be at ../shared/ynl/")):
        if not need.is_file():
            pytest.fail(f"{need} is missing: {how}", pytrace=False)
    check = ["--schema", str(SCHEMA)] if schema else ["--no-schema"]
    return [sys.executable, str(CLI), "--spec", str(SPEC), *check, "--output-json", *args]


def ynl(*args: str, timeout: float = 120, schema: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the CLI; the process, whatever its exit."""
    return subprocess.run(command(*args, schema=schema), capture_output=True, text=True,
                          timeout=timeout)


def ok(*args: str, schema: bool = False) -> Any:
    """The CLI's JSON output of a command that must succeed."""
    r = ynl(*args, schema=schema)
    assert r.returncode == 0, f"ynl {' '.join(args)}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_do_get_decodes_the_proxy_with_enum_names_and_nests(modules: Any) -> None:
    with Connection() as c:
        ours = c.proxy("sample")
    p = ok("--do", "get", "--json", json.dumps({"name": "sample"}), schema=True)
    assert p["id"] == ours["id"] and p["name"] == "sample" and p["nkeys"] == 64
    assert p["mode"] == "emergency" and p["lifecycle"] == ours_lifecycle(ours)
    assert [f["name"] for f in p["feature"]] == [f["name"] for f in ours["feature"]]
    assert p["recommendation"] == {"name": "window", "scale": 1, "min": 1, "max": 64}
    assert p["counters"]["samples"] >= ours["counters"]["samples"]


def ours_lifecycle(p: dict[str, Any]) -> str:
    return kspec.load().enums["lifecycle"].name_of(int(p["lifecycle"]))


def test_dump_get_lists_every_proxy(modules: Any) -> None:
    with Connection() as c:
        ids = sorted(int(p["id"]) for p in c.proxies())
    out = ok("--dump", "get")
    assert sorted(p["id"] for p in out) == ids
    assert [p["name"] for p in out if p["name"] == "sample"] == ["sample"]


@pytest.mark.sample_params(rate=300)
def test_subscribed_telemetry_decodes_records_and_feedback_as_lists_of_structs(modules: Any) -> None:
    # the CLI reads its socket only after --sleep; the kernel flushes both rings every 20 ms, so
    # 2 s of batches overflowed its default receive buffer once (ENOBUFS): 1 s, as the README has
    msgs = ok("--subscribe", "telemetry", "--sleep", "1")
    tel = [m["msg"] for m in msgs if m["name"] == "telemetry"]
    fb = [m["msg"] for m in msgs if m["name"] == "feedback"]
    assert tel and fb, msgs[:3]
    batch = max(tel, key=lambda m: len(m["records"]))
    recs = batch["records"]
    assert len(recs) > 1, "a batch must decode as several records, not one struct"
    seqs = [r["seq"] for r in recs]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    for r in recs:
        assert r["mode"] == "emergency" and r["arm"] == "default" and 0 <= r["key"] < 64
        assert sorted(r["features"]) == [f"feature-{i}" for i in range(8)]
        assert r["features"]["feature-3"] == 0  # the sample has 3 features; the rest are zero
        assert isinstance(r["flags"], list)  # sample-flags decoded as a set of names
    assert any(r["features"]["feature-1"] for m in tel for r in m["records"])
    f = max(fb, key=lambda m: len(m["feedback"]))["feedback"]
    assert len(f) > 1 and all(x["arm"] == "default" and x["seq"] >= 1 for x in f)


def test_subscribed_events_decode_mode_changes(modules: Any) -> None:
    cmd = command("--subscribe", "events", "--sleep", "3")
    with Connection() as c:
        pid = int(c.proxy("sample")["id"])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # the CLI subscribes some seconds after it starts (Python under TCG): keep moving
            # the proxy until it has slept its 3 s and printed what it heard
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                c.set_mode(pid, "learning", "recovery")
                time.sleep(0.2)
                c.set_mode(pid, "emergency")
                time.sleep(0.2)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err
    events = [m["msg"] for m in json.loads(out.strip().splitlines()[-1]) if m["name"] == "mode-event"]
    assert events, out
    up = [e for e in events if e["mode"] == "learning"]
    down = [e for e in events if e["mode"] == "emergency"]
    assert up and down, events
    assert all(e["old-mode"] == "emergency" and e["reason"] == "recovery" and e["id"] == pid
               for e in up)
    assert all(e["old-mode"] == "learning" and e["reason"] == "operator" for e in down)
    seqs = [e["mode-seq"] for e in events]
    assert seqs == sorted(seqs) and all(e["name"] == "sample" for e in events)


def test_recommend_from_the_cli_is_applied(modules: Any) -> None:
    with Connection() as c:
        pid = int(c.proxy("sample")["id"])
        before = int(c.proxy(pid)["counters"]["recs-received"])
    recs = [{"key": 1, "value": 8, "ttl-ms": 100}, {"key": 2, "value": 9, "ttl-ms": 100}]
    r = ynl("--do", "recommend", "--json", json.dumps({"id": pid, "recs": recs}))
    assert r.returncode == 0, r.stdout + r.stderr
    with Connection() as c:
        assert int(c.proxy(pid)["counters"]["recs-received"]) == before + 2


def test_a_refused_recommend_shows_the_extack_on_the_offending_rec(modules: Any) -> None:
    with Connection() as c:
        pid = int(c.proxy("sample")["id"])
        before = int(c.proxy(pid)["counters"]["recs-received"])
    recs = [{"key": 1, "value": 8, "ttl-ms": 100}, {"key": 1000, "value": 8, "ttl-ms": 100}]
    r = ynl("--do", "recommend", "--json", json.dumps({"id": pid, "recs": recs}))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "Can't dive" not in r.stdout + r.stderr, r.stderr
    assert "Netlink error: Invalid argument" in r.stdout
    assert "recs[offset]: key >= the proxy's nkeys" in r.stdout
    assert "'bad-attr': '.recs'" in r.stdout, r.stdout
    with Connection() as c:
        assert int(c.proxy(pid)["counters"]["recs-received"]) == before

