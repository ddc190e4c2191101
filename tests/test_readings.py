"""Per-arm readings of ``kmlbus status`` (:mod:`kmlbus.bus.readings`): the conversions, the
daemon's status carrying them, and the status table's line."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmlbus.bus import readings
from kmlbus.bus.config import FieldSchema, ProxySchema
from kmlbus.tools import cli


def schema(rec_min: int | None = 0, rec_max: int | None = 2, scale: int = 1000) -> ProxySchema:
    return ProxySchema("lsd0.x", (FieldSchema("f", 1),), FieldSchema("r", 1, rec_min, rec_max),
                       nkeys=4, efficiency_scale=scale)


def test_reclaimed_is_the_cleaning_write_amplification_of_the_mean_freed_share() -> None:
    s = schema()
    # a quarter of each segment freed: moved 3 blocks per block reclaimed -> (1 + 3) / 1
    assert readings.reading("reclaimed", 250.0, s) == pytest.approx(4.0)
    assert readings.reading("reclaimed", 1000.0, s) == pytest.approx(1.0)
    # the kernel's wa_<arm> = total / (total - moved) over equal segments is the same number
    segs, blocks, moved = 10, 64, [48, 40, 56, 32, 60, 44, 50, 36, 52, 46]
    shares = [(blocks - m) * 1000 // blocks for m in moved]  # the kernel's integer permille
    kernel_wa = segs * blocks / (segs * blocks - sum(moved))
    assert readings.reading("reclaimed", sum(shares) / segs, s) == pytest.approx(kernel_wa, rel=0.01)
    assert readings.reading("reclaimed", 500.0, schema(scale=100)) == pytest.approx(0.2)
    assert readings.reading("reclaimed", 0.0, s) is None  # nothing freed: no finite number
    assert readings.reading("reclaimed", None, s) is None


def test_class_match_is_the_mean_class_error_over_the_recommendations_range() -> None:
    three = schema(0, 2)  # three streams: efficiency 1000 - 1000 * |off| / 2
    assert readings.reading("class-match", 1000.0, three) == pytest.approx(0.0)
    assert readings.reading("class-match", 500.0, three) == pytest.approx(1.0)
    assert readings.reading("class-match", 0.0, three) == pytest.approx(2.0)
    assert readings.reading("class-match", 750.0, schema(0, 4)) == pytest.approx(1.0)
    assert readings.reading("class-match", 500.0, schema(None, None)) is None  # no classes
    assert readings.reading("class-match", 1200.0, three) == pytest.approx(0.0)  # clamped


def test_mean_is_the_raw_mean_and_an_unknown_kind_is_refused() -> None:
    assert readings.reading("mean", 812.5, schema()) == 812.5
    with pytest.raises(ValueError, match="unknown efficiency reading 'wa'"):
        readings.reading("wa", 500.0, schema())


def test_per_arm_reads_each_arm_and_the_line_names_the_reading() -> None:
    arms = {"default": {"mean": 500.0, "count": 40}, "model": {"mean": None, "count": 0}}
    per = readings.per_arm("reclaimed", schema(), arms)
    assert per == {"efficiency": "reclaimed", "label": "WA", "default": pytest.approx(2.0),
                   "default_count": 40, "model": None, "model_count": 0}
    assert readings.line(per) == "WA per arm: default 2.00, model -"
    per = readings.per_arm("class-match", schema(), {"model": {"mean": 750.0, "count": 3}})
    assert readings.line(per) == "class error per arm: default -, model 0.50"


def test_the_daemons_status_carries_the_configured_reading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The stand-in kernel's sample proxy with ``efficiency = "reclaimed"``: the status's
    per-arm reading is scale / the evidence's own default mean, and the table shows it."""
    from tests.test_daemon_standin import make_learning_rig

    monkeypatch.setenv("KMLBUS_STATE", str(tmp_path / "state.json"))
    rig = make_learning_rig(tmp_path, 'efficiency = "reclaimed"\n')
    try:
        rig.run(3.0)
        (p,) = rig.bus.proxies.values()
        st = p.status()
        ev = st["evidence"]
        assert ev["default_mean"] and ev["per_arm"]["efficiency"] == "reclaimed"
        assert ev["per_arm"]["default"] == pytest.approx(p.schema.efficiency_scale / ev["default_mean"])
        assert ev["per_arm"]["default_count"] > 0
        view = cli.proxy_view({"id": p.id, "name": p.name, "mode": 1, "bus-portid": 7},
                              {"portid": 7, "proxies": {p.name: st}})
        cli.print_status_table([view])
        wa = ev["per_arm"]["default"]
        assert f"  {p.name}: WA per arm: default {wa:.2f}, model -" in capsys.readouterr().out
    finally:
        rig.bus.shutdown()


def test_the_status_table_prints_a_non_default_reading_only(capsys: pytest.CaptureFixture[str]) -> None:
    def view(per: dict[str, object]) -> dict[str, object]:
        return cli.proxy_view({"id": 1, "name": "lsd0.victim", "mode": 3, "bus-portid": 7},
                              {"portid": 7, "proxies": {"lsd0.victim": {"evidence": {"per_arm": per}}}})

    wa = readings.per_arm("reclaimed", schema(), {"default": {"mean": 490.0, "count": 9},
                                                  "model": {"mean": 560.0, "count": 9}})
    cli.print_status_table([view(wa)])
    out = capsys.readouterr().out.splitlines()
    assert "  lsd0.victim: WA per arm: default 2.04, model 1.79" in out
    plain = readings.per_arm("mean", schema(), {"default": {"mean": 490.0, "count": 9}})
    cli.print_status_table([view(plain)])
    assert not any("per arm" in line for line in capsys.readouterr().out.splitlines())


def test_a_proxy_refuses_an_unknown_reading() -> None:
    from kmlbus.bus.proxy import Proxy

    with pytest.raises(ValueError, match="unknown efficiency reading"):
        Proxy(schema(), None, ctl=None, registry=None, dispatcher=None, policy=None,  # type: ignore[arg-type]
              stats={}, reading="wa")
