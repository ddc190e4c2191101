"""The CLI on a kernel without the kmlbus family (the host): one line, non-zero, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kmlbus.bus import pins, statefile
from kmlbus.tools import cli


@pytest.mark.parametrize("argv", [
    ["status"], ["status", "--json"], ["mode", "sample", "learning"], ["watch", "--seconds", "0.1"],
])
def test_every_command_says_the_module_is_not_loaded(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "kmlbus kernel module is not loaded" in err and "insmod" in err


def test_mode_rejects_unknown_modes_before_asking_the_kernel(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["mode", "sample", "turbo"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_proxy_view_names_enums_and_merges_the_daemons_evidence() -> None:
    kernel = {"id": 1, "name": "sample", "mode": 2, "lifecycle": 4, "mode-ms": 1500, "reason": 5,
              "bus-portid": 77, "feature": [{"name": "a"}, {"name": "b"}],
              "counters": {"decisions-model": 3}}
    bus = {"portid": 77, "proxies": {"sample": {"evidence": {"model_mean": 900.0}}}}
    v = cli.proxy_view(kernel, bus)
    assert (v["mode"], v["lifecycle"], v["reason"]) == ("collaboration", "running", "promotion")
    assert v["mode_s"] == 1.5 and v["features"] == ["a", "b"] and v["bus"]["evidence"]["model_mean"] == 900.0
    assert "stale" not in v["bus"]
    assert "bus" not in cli.proxy_view(kernel, {})


def test_the_view_of_a_bus_that_is_not_attached_is_marked_stale(capsys: pytest.CaptureFixture[str]) -> None:
    """A killed daemon leaves its state file behind; the kernel's bus-portid says who is attached."""
    state = {"pid": 4242, "portid": 77, "proxies": {"sample": {
        "mode": "recommendation", "evidence": {"default_mean": 500.0, "model_mean": 900.0}}}}
    v = cli.proxy_view({"id": 1, "name": "sample", "mode": 0, "bus-portid": 0}, state)
    assert "pid 4242" in v["bus"]["stale"] and "not attached" in v["bus"]["stale"]
    cli.print_status_table([v])
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[2] == "emergency" and out[1].split()[-2:] == ["-/-", "-"]
    assert "the bus's view below is stale: written by bus pid 4242" in out[2]


def test_status_table_shows_each_proxy_and_its_last_move(capsys: pytest.CaptureFixture[str]) -> None:
    v = cli.proxy_view({"id": 1, "name": "sample", "mode": 3, "counters": {"recs-applied": 9}},
                       {"portid": 0, "proxies": {"sample": {"last": {"from": "collaboration", "to": "recommendation",
                                                        "trigger": "promote", "reason": "promotion: x"}}}})
    cli.print_status_table([v])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["ID", "NAME", "MODE"]
    assert out[1].split()[:3] == ["1", "sample", "recommendation"]
    assert "collaboration -> recommendation (promote)" in out[2]


def test_status_shows_lost_records_and_the_bus_sockets_overruns(capsys: pytest.CaptureFixture[str]) -> None:
    v = cli.proxy_view({"id": 1, "name": "sample", "mode": 3, "bus-portid": 77,
                        "counters": {"drops": 4, "send-failed": 96}},
                       {"portid": 77, "stats": {"socket_overruns": 3, "socket_rcvbuf": 16777216},
                        "proxies": {"sample": {"mode": "recommendation"}}})
    assert v["bus"]["socket"] == {"overruns": 3, "rcvbuf": 16777216}
    cli.print_status_table([v])
    out = capsys.readouterr().out.splitlines()
    col = out[0].index("LOST ring/send")
    assert out[1][col:].split()[0] == "4/96"
    assert "bus socket: 3 receive-buffer overrun(s) (multicast lost, ENOBUFS), buffer 16777216 bytes" in out
    # a stale view (the daemon that wrote it is gone) shows no socket line
    stale = cli.proxy_view({"id": 1, "name": "sample", "mode": 0, "bus-portid": 0},
                           {"portid": 77, "stats": {"socket_overruns": 3}, "proxies": {"sample": {"mode": "learning"}}})
    cli.print_status_table([stale])
    assert not any(line.startswith("bus socket") for line in capsys.readouterr().out.splitlines())


def test_status_table_shows_the_learning_loop(capsys: pytest.CaptureFixture[str]) -> None:
    learning = {"samples": 5000, "fits": 2, "kept": 1, "last_fit": {
        "weights": [62.5, 0.01, -0.2], "bias": 1.25, "samples": 5000, "estimated": 0.951,
        "coverage": 0.9, "observed": 0.61}}
    v = cli.proxy_view({"id": 1, "name": "sample", "mode": 1},
                       {"portid": 0, "proxies": {"sample": {"learning": learning}}})
    cli.print_status_table([v])
    line = capsys.readouterr().out.splitlines()[-1]
    assert "2 fit(s) installed, 1 kept back, 5000 samples" in line
    assert "weights [62.50, 0.01, -0.20] bias 1.25, estimated 0.951 (observed 0.610)" in line


def test_state_file_round_trip_and_unreadable_means_empty(tmp_path: Path) -> None:
    p = tmp_path / "state.json"
    assert statefile.read(p) == {}
    statefile.write({"proxies": {"sample": {"mode": "learning"}}}, p)
    assert statefile.read(p)["proxies"]["sample"]["mode"] == "learning"
    p.write_text("{not json")
    assert statefile.read(p) == {}


def test_pins_are_kept_per_proxy_and_unpin_is_idempotent(tmp_path: Path) -> None:
    p = tmp_path / "pins.json"
    pins.pin("sample", "learning", p)
    pins.pin("other", "emergency", p)
    assert pins.load(p) == {"sample": "learning", "other": "emergency"}
    pins.unpin("sample", p)
    pins.unpin("sample", p)
    assert json.loads(p.read_text()) == {"other": "emergency"}


def test_atomic_write_replaces_and_leaves_no_temporary_file_on_failure(tmp_path: Path) -> None:
    from kmlbus.bus import atomic

    target = tmp_path / "f.bin"
    atomic.write_bytes(target, b"one")
    atomic.write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x").write_text("keeps the directory non-empty")
    with pytest.raises(OSError):
        atomic.write_bytes(tmp_path / "dir", b"cannot replace a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "f.bin"]


def test_status_table_shows_the_sample_period(capsys: pytest.CaptureFixture[str]) -> None:
    v = cli.proxy_view({"id": 1, "name": "sample", "mode": 0, "sample-period": 8, "counters": {}}, {})
    assert v["sample_period"] == 8
    cli.print_status_table([v])
    hdr, row = capsys.readouterr().out.splitlines()[:2]
    assert row[hdr.index("SAMPLED"):].split()[0] == "1/8"


def test_sample_period_command_shows_and_sets_through_the_family(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from kmlbus.wire import netlink
    from tests.support.standin import StandinKernel

    k = StandinKernel(seed=3)
    monkeypatch.setattr(netlink, "Connection", lambda: k.open())
    assert cli.main(["sample-period", "sample"]) == 0
    assert "sample: sample-period 1 " in capsys.readouterr().out
    assert cli.main(["sample-period", "sample", "64"]) == 0
    assert "sample-period 64 " in capsys.readouterr().out and k.find("sample").sample_period == 64
    assert cli.main(["sample-period", "sample", "0"]) != 0  # refused by the family: one line, unchanged
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sample-period" in err
    assert k.find("sample").sample_period == 64
