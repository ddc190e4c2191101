"""The TOML configuration and its binding to a kernel proxy schema."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmlbus.bus import config as cfg
from kmlbus.bus import sockbuf
from kmlbus.bus.config import ConfigError, FieldSchema, ProxySchema, loads

SAMPLE_ATTRS = {
    "id": 1,
    "name": "sample",
    "nkeys": 64,
    "efficiency-scale": 1000,
    "feature": [
        {"name": "seq_ratio", "scale": 1000},
        {"name": "req_size", "scale": 1000},
        {"name": "noise", "scale": 1000},
    ],
    "recommendation": {"name": "window", "scale": 1, "min": 1, "max": 64},
}


def sample_schema() -> ProxySchema:
    return ProxySchema.from_attrs(SAMPLE_ATTRS)


def test_defaults_when_file_is_empty(tmp_path: Path) -> None:
    p = tmp_path / "bus.toml"
    p.write_text("")
    c = cfg.load(p)
    assert c.bus.ttl_ms == 200
    assert c.bus.trace is None
    assert c.proxies == {}


def test_full_file_resolves_paths_relative_to_the_file(tmp_path: Path) -> None:
    p = tmp_path / "etc" / "bus.toml"
    p.parent.mkdir()
    p.write_text("""
[bus]
ttl_ms = 500
latency_budget_ms = 5
trace = "t.kmltrace"

[proxy.sample]
model = "models/m.onnx"
input = "x"
output = "y"
features = ["seq_ratio"]
input_scale = { seq_ratio = 100 }
output_scale = 2.5
""")
    c = cfg.load(p)
    assert c.bus == cfg.BusConfig(500, 5.0, p.parent.resolve() / "t.kmltrace")
    sp = c.proxies["sample"]
    assert sp.model == p.parent.resolve() / "models" / "m.onnx"
    assert (sp.input, sp.output, sp.features) == ("x", "y", ("seq_ratio",))
    assert sp.input_scale == {"seq_ratio": 100.0}
    assert sp.output_scale == 2.5


@pytest.mark.parametrize("text, key, expected", [
    ("[bus]\nttl_ms = 0", "bus.ttl_ms", "integer in 1..60000"),
    ("[bus]\nttl_ms = 'x'", "bus.ttl_ms", "integer"),
    ("[bus]\nttl = 3", "bus.ttl", "unknown key"),
    ("[bus]\nlatency_budget_ms = -1", "bus.latency_budget_ms", "positive number"),
    ("[proxy.sample]\nmodel = 3", "proxy.sample.model", "non-empty string"),
    ("[proxy.sample]\nfeatures = []", "proxy.sample.features", "non-empty list"),
    ("[proxy.sample]\nfeatures = ['a', 'a']", "proxy.sample.features", "distinct"),
    ("[proxy.sample]\ninput_scale = { a = 0 }", "proxy.sample.input_scale.a", "positive"),
    ("[proxy.sample]\ninput_scale = 'big'", "proxy.sample.input_scale", "positive number or"),
    ("[proxy.sample]\nmodle = 'x'", "proxy.sample.modle", "unknown key"),
    ("[proxies]\n", "proxies", "unknown table"),
    ("[proxy.sample]\nlearn = 'yes'", "proxy.sample.learn", "true or false"),
    ("[proxy.sample]\nexplore = 1001", "proxy.sample.explore", "0..1000"),
    ("[proxy.sample]\nexplore = 0.5", "proxy.sample.explore", "permille"),
    ("[proxy.sample]\nexplore_spread = 0", "proxy.sample.explore_spread", "(0, 1]"),
    ("[proxy.sample]\nlearn_every_s = 0", "proxy.sample.learn_every_s", "positive"),
    ("[proxy.sample]\nmodel = 'm.onnx'\nlearned_model = 'm.onnx'", "proxy.sample.learned_model",
     "other than the configured model"),
    ("[proxy.sample]\nsample_period = 0", "proxy.sample.sample_period", "1..1048576"),
    ("[proxy.sample]\nsample_period = 1048577", "proxy.sample.sample_period", "1..1048576"),
    ("[proxy.sample]\nsample_period = 2.5", "proxy.sample.sample_period", "integer"),
    ("[proxy.sample]\nsample_period = true", "proxy.sample.sample_period", "integer"),
    ("[bus\n", "", "not valid TOML"),
    ("[proxy.sample]\nefficiency = 'wa'", "proxy.sample.efficiency",
     '"mean", "reclaimed", "class-match"'),
    ("[proxy.sample]\nefficiency = 1", "proxy.sample.efficiency", "found int 1"),
])
def test_errors_are_one_line_naming_file_key_and_expectation(
        tmp_path: Path, text: str, key: str, expected: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        cfg.load(p)
    msg = str(ei.value)
    assert "\n" not in msg
    assert str(p.resolve()) in msg
    assert key in msg
    assert expected in msg


def test_learning_keys_and_the_explore_share_they_give(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[proxy.a]\nlearn = true\nlearned_model = 'l.onnx'\n"
                 "[proxy.b]\nlearn = true\nexplore = 30\nexplore_spread = 0.5\nlearn_every_s = 2\n"
                 "[proxy.c]\n")
    c = cfg.load(p)
    a, b, off = c.proxies["a"], c.proxies["b"], c.proxies["c"]
    assert a.learn and a.learned_model == tmp_path.resolve() / "l.onnx"
    assert (b.explore, b.explore_spread, b.learn_every_s) == (30, 0.5, 2.0)
    assert not off.learn and off.learned_model is None
    # learning without exploration could only copy the default: it gets a share by default
    assert a.explore_share(0) == cfg.DEFAULT_LEARN_EXPLORE
    assert a.explore_share(50) == 50  # the graph's own share wins when it has one
    assert b.explore_share(0) == 30 and off.explore_share(0) == 0


def test_efficiency_reading_defaults_to_the_plain_mean_and_takes_each_known_kind(
        tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[proxy.a]\n[proxy.b]\nefficiency = 'reclaimed'\n"
                 "[proxy.c]\nefficiency = 'class-match'\n[proxy.d]\nefficiency = 'mean'\n")
    c = cfg.load(p)
    assert [c.proxies[n].efficiency for n in "abcd"] == ["mean", "reclaimed", "class-match", "mean"]


def test_error_names_what_was_found(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[bus]\nttl_ms = 99999999\n")
    with pytest.raises(ConfigError, match="found int 99999999"):
        cfg.load(p)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        cfg.load(tmp_path / "nope.toml")


def test_schema_from_netlink_reply() -> None:
    s = sample_schema()
    assert [f.name for f in s.features] == ["seq_ratio", "req_size", "noise"]
    assert s.recommendation == FieldSchema("window", 1, 1, 64)
    assert s.nkeys == 64 and s.id == 1
    assert ProxySchema.from_attrs(s.to_attrs()) == s


def test_schema_missing_attribute_is_named() -> None:
    attrs = dict(SAMPLE_ATTRS)
    del attrs["recommendation"]
    with pytest.raises(ConfigError, match="recommendation"):
        ProxySchema.from_attrs(attrs)


def test_bind_defaults_feed_every_feature_at_schema_scale() -> None:
    b = cfg.bind(sample_schema())
    assert b.columns == (0, 1, 2)
    assert b.divisors == (1000.0, 1000.0, 1000.0)
    assert (b.out_scale, b.rec_min, b.rec_max, b.ttl_ms) == (1.0, 1, 64, 200)
    assert b.model is None


def test_bind_selects_features_in_config_order_with_overrides() -> None:
    pc = cfg.loads("""
[bus]
ttl_ms = 300
[proxy.sample]
features = ["noise", "seq_ratio"]
input_scale = { noise = 10 }
output_scale = 4
""").proxies["sample"]
    b = cfg.bind(sample_schema(), pc, cfg.BusConfig(ttl_ms=300))
    assert b.columns == (2, 0)
    assert b.divisors == (10.0, 1000.0)
    assert b.feature_names == ("noise", "seq_ratio")
    assert b.out_scale == 4.0
    assert b.ttl_ms == 300


def test_bind_single_input_scale_applies_to_all() -> None:
    pc = cfg.loads("[proxy.sample]\ninput_scale = 1\n").proxies["sample"]
    assert cfg.bind(sample_schema(), pc).divisors == (1.0, 1.0, 1.0)


def test_bind_rejects_a_feature_the_kernel_does_not_report() -> None:
    pc = cfg.loads("[proxy.sample]\nfeatures = ['seq_ratio', 'latency']\n",
                   Path("/etc/kmlbus.toml")).proxies["sample"]
    with pytest.raises(ConfigError) as ei:
        cfg.bind(sample_schema(), pc, path=Path("/etc/kmlbus.toml"))
    msg = str(ei.value)
    assert "/etc/kmlbus.toml" in msg and "proxy.sample.features" in msg
    assert "seq_ratio, req_size, noise" in msg and "'latency'" in msg


def test_bind_rejects_scale_for_a_feature_not_fed() -> None:
    pc = cfg.loads("[proxy.sample]\nfeatures = ['seq_ratio']\n"
                   "input_scale = { noise = 3 }\n").proxies["sample"]
    with pytest.raises(ConfigError, match="input_scale"):
        cfg.bind(sample_schema(), pc)


def test_bind_without_bounds_uses_int32_range() -> None:
    s = ProxySchema("p", (FieldSchema("a", 1),), FieldSchema("r", 10), 4)
    b = cfg.bind(s)
    assert (b.rec_min, b.rec_max) == (-(1 << 31), (1 << 31) - 1)
    assert b.out_scale == 10.0


@settings(deadline=None)
@given(st.integers(min_value=1, max_value=60000))
def test_any_legal_ttl_round_trips(ttl: int) -> None:
    assert cfg.loads(f"[bus]\nttl_ms = {ttl}\n").bus.ttl_ms == ttl


def test_example_config_loads_binds_and_serves(tmp_path: Path) -> None:
    import shutil

    import numpy as np

    from kmlbus.bus import models
    from kmlbus.bus.registry import ModelRegistry

    example = Path(__file__).resolve().parent.parent / "examples" / "kmlbus.toml"
    shutil.copy(example, tmp_path / "kmlbus.toml")
    assert models.main([str(tmp_path / "models")]) == 0
    c = cfg.load(tmp_path / "kmlbus.toml")
    assert c.bus.ttl_ms == 200 and c.bus.trace is None
    reg = ModelRegistry(c)
    b = reg.bind(sample_schema())
    assert b.feature_names == models.SAMPLE_FEATURES
    np.testing.assert_allclose(reg.predict("sample", [[1.0, 0.0, 0.0]]), [64.0])


def test_schema_survives_the_wire_codec() -> None:
    from kmlbus.wire import codec

    s = sample_schema()
    wire = codec.encode_attrs("proxy", s.to_attrs())
    assert ProxySchema.from_attrs(codec.decode_attrs("proxy", wire)) == s


def _toml(v: object) -> str:
    """Render a Python value as a TOML literal (enough for the fuzz below)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if v == v and v not in (float("inf"), float("-inf")) else "nan"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    assert isinstance(v, dict)
    return "{" + ", ".join(f'"{k}" = {_toml(x)}' for k, x in v.items()) + "}"


_scalar = st.one_of(st.booleans(), st.integers(-(2**40), 2**40),
                    st.floats(allow_nan=False, allow_infinity=False),
                    st.text(alphabet="abcdefghijklmnopqrstuvwxyz_/.", max_size=12))
_value = st.one_of(_scalar, st.lists(_scalar, max_size=4),
                   st.dictionaries(st.sampled_from(["seq_ratio", "req_size", "noise", "x"]),
                                   _scalar, max_size=3))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(cfg._BUS_KEYS) + ["bogus"]), _value, max_size=4),
       st.dictionaries(st.sampled_from(sorted(cfg._PROXY_KEYS) + ["bogus"]), _value, max_size=6))
def test_any_value_in_any_key_gives_a_config_or_a_config_error(
        bus: dict[str, object], proxy: dict[str, object]) -> None:
    text = "[bus]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in bus.items())
    text += "[proxy.sample]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in proxy.items())
    try:
        c = cfg.loads(text, Path("/etc/kmlbus.toml"))
    except ConfigError as e:
        assert "\n" not in str(e) and str(e).startswith("/etc/kmlbus.toml: ")
        return
    try:
        b = cfg.bind(sample_schema(), c.proxies["sample"], c.bus)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    assert 1 <= b.ttl_ms <= 60000 and b.out_scale > 0 and all(d > 0 for d in b.divisors)


def test_the_telemetry_receive_buffer_is_sized_for_the_configured_rate() -> None:
    assert loads("").bus.receive_buffer() == sockbuf.MIN_RCVBUF  # 20000 decisions/s fit in 8 MiB
    fast = loads("[bus]\nrate = 200000\n").bus
    # half a second of 200000 decisions, each a sample and a feedback record in kernel skbs
    assert fast.receive_buffer() == 200000 * sockbuf.STALL_S * sockbuf.bytes_per_decision()
    assert fast.receive_buffer() > sockbuf.MIN_RCVBUF
    assert loads("[bus]\nrate = 200000\nrcvbuf = 65536\n").bus.receive_buffer() == 65536
    # a 32-sample message costs a 4 KiB data area plus its sk_buff, not its 2 KiB payload
    assert sockbuf.bytes_per_decision() >= 4096 // 32


@pytest.mark.parametrize(("text", "message"), [
    ("[bus]\nrate = 0\n", "bus.rate: expected an integer in 1..100000000 (decisions per second), found int 0"),
    ("[bus]\nrate = 1.5\n", "bus.rate: expected an integer"),
    ("[bus]\nrcvbuf = 1024\n", "bus.rcvbuf: expected an integer in 65536..1073741824 (bytes), found int 1024"),
])
def test_bad_rate_or_receive_buffer_is_refused_with_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        loads(text)


def test_sample_period_is_read_and_absent_means_leave_the_kernel_alone(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[proxy.a]\nsample_period = 16\n[proxy.b]\n")
    c = cfg.load(p)
    assert c.proxies["a"].sample_period == 16 and c.proxies["b"].sample_period is None
