"""Traces: record/replay round trips, clear errors on damaged files, offline evaluation."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kmlbus.bus import models
from kmlbus.bus import tracefile as traces
from kmlbus.bus.config import FieldSchema, ProxySchema
from kmlbus.bus.tracefile import TraceError, TraceWriter
from kmlbus.contract import spec
from kmlbus.tools import offline
from kmlbus.wire import codec

SP = spec.load()
SAMPLE = codec.struct_dtype("sample")
FEEDBACK = codec.struct_dtype("feedback")
REC = codec.struct_dtype("rec")
ARM_DEFAULT = SP.enums["arm"].value("default")
ARM_MODEL = SP.enums["arm"].value("model")


def sample_schema() -> ProxySchema:
    return ProxySchema("sample", tuple(FieldSchema(n, 1000) for n in models.SAMPLE_FEATURES),
                       FieldSchema("window", 1, 1, 64), 64, 1000, 1)


def write_small(path: Path) -> dict[str, npt.NDArray[np.void]]:
    rng = np.random.default_rng(0)
    tel = np.zeros(5, SAMPLE)
    tel["seq"] = np.arange(1, 6)
    tel["features"] = rng.integers(-5, 5, (5, 8))
    fb = np.zeros(3, FEEDBACK)
    fb["seq"] = [1, 2, 3]
    fb["efficiency"] = [900, 800, 700]
    recs = np.zeros(2, REC)
    recs["key"], recs["value"], recs["ttl_ms"] = [1, 2], [10, 20], 200
    with TraceWriter(path, [sample_schema()]) as w:
        w.telemetry("sample", tel, ts=1)
        w.feedback("sample", fb, ts=2)
        w.recs("sample", recs, ts=3)
        w.mode("sample", SP.enums["mode"].value("learning"),
               SP.enums["mode"].value("emergency"), SP.enums["reason"].value("recovery"), ts=4)
    return {"telemetry": tel, "feedback": fb, "recs": recs}


def test_round_trip_of_every_kind(tmp_path: Path) -> None:
    p = tmp_path / "t.kmltrace"
    sent = write_small(p)
    h = traces.read_header(p)
    assert h.version == traces.VERSION and h.spec_version == SP.version
    assert h.schemas == {"sample": sample_schema()}
    assert h.dtypes["sample"] == SAMPLE and h.dtypes["feedback"] == FEEDBACK
    evs = list(traces.replay(p))
    assert [(e.kind, e.ts, e.proxy) for e in evs] == [
        ("telemetry", 1, "sample"), ("feedback", 2, "sample"), ("recs", 3, "sample"),
        ("mode", 4, "sample")]
    for e in evs[:3]:
        np.testing.assert_array_equal(e.data, sent[e.kind])
        assert e.data.dtype == sent[e.kind].dtype
    assert evs[3].data["mode"][0] == SP.enums["mode"].value("learning")
    assert evs[3].data["reason"][0] == SP.enums["reason"].value("recovery")
    assert evs[0].offset > 0 and evs[1].offset > evs[0].offset


def test_schemas_added_later_are_folded_in(tmp_path: Path) -> None:
    p = tmp_path / "t.kmltrace"
    other = ProxySchema("other", (FieldSchema("a", 10),), FieldSchema("r", 1, 0, 9), 4)
    with TraceWriter(p) as w:
        w.add_schema(other)
        w.add_schema(other)  # unchanged: not written twice
        w.recs("other", np.zeros(1, REC))
        assert w.records == 2
    r = traces.open_trace(p)
    assert r.schemas == {}
    assert [e.kind for e in r] == ["recs"]
    assert r.schemas == {"other": other}


def test_writer_rejects_wrong_dtype_and_kind(tmp_path: Path) -> None:
    with TraceWriter(tmp_path / "t") as w:
        with pytest.raises(ValueError, match="expected dtype of struct sample"):
            w.telemetry("sample", np.zeros(2, REC))
        with pytest.raises(ValueError, match="trace kind 'bogus'"):
            w.write("bogus", "sample", np.zeros(2, REC))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(hnp.arrays(SAMPLE, st.integers(0, 40)), max_size=5))
def test_any_telemetry_batches_round_trip(tmp_path: Path, batches: list[npt.NDArray[np.void]]
                                          ) -> None:
    p = tmp_path / "h.kmltrace"
    with TraceWriter(p, [sample_schema()]) as w:
        for b in batches:
            w.telemetry("sample", b)
    got = [e.data for e in traces.replay(p)]
    assert len(got) == len(batches)
    for a, b in zip(got, batches):
        assert a.tobytes() == b.tobytes()


def test_truncated_trace_names_the_offset(tmp_path: Path) -> None:
    p = tmp_path / "t.kmltrace"
    write_small(p)
    data = p.read_bytes()
    offsets = [e.offset for e in traces.replay(p)]
    cut = offsets[2] + 7  # in the middle of the recs record
    p.write_bytes(data[:cut])
    it = traces.replay(p)
    assert next(it).kind == "telemetry" and next(it).kind == "feedback"
    with pytest.raises(TraceError) as ei:
        next(it)
    assert f"truncated at offset {offsets[2]}" in str(ei.value) and str(p) in str(ei.value)


def test_a_type_string_numpy_cannot_parse_is_a_malformed_header() -> None:
    """Found by the property below: a flipped bit made a field type "04", which numpy
    parses with ast.literal_eval and refuses with a SyntaxError."""
    from kmlbus.bus.tracefile import _dtype_from_descr

    with pytest.raises(ValueError, match="unusable type"):
        _dtype_from_descr([["seq", "04"]])


@settings(max_examples=int(os.environ.get("KMLBUS_FUZZ_EXAMPLES", "200")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_damaged_trace_raises_only_trace_error(tmp_path: Path, data: st.DataObject) -> None:
    p = tmp_path / "d.kmltrace"
    if not (tmp_path / "orig").exists():
        write_small(tmp_path / "orig")
    raw = bytearray((tmp_path / "orig").read_bytes())
    how = data.draw(st.sampled_from(["cut", "flip", "junk"]))
    if how == "cut":
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
    else:
        raw += data.draw(st.binary(min_size=1, max_size=30))
    p.write_bytes(bytes(raw))
    try:
        for ev in traces.replay(p):
            assert ev.data.dtype.names is not None
    except TraceError as e:
        assert "\n" not in str(e) and str(p) in str(e)
        assert "offset" in str(e) or "version" in str(e)


@pytest.mark.parametrize("content, match", [
    (b"", "empty file"),
    (msgpack.packb([1, 2, 3]), "not a kmlbus trace at offset 0"),
    (msgpack.packb({"format": "kmlbus-trace", "version": 99}), "format version 99"),
    (msgpack.packb({"format": "kmlbus-trace", "version": 1, "structs": 5}), "malformed"),
    (b"\xc1", "corrupt trace at offset 0"),
])
def test_not_a_trace(tmp_path: Path, content: bytes, match: str) -> None:
    p = tmp_path / "x"
    p.write_bytes(content)
    with pytest.raises(TraceError, match=match):
        list(traces.replay(p))


def test_bad_record_fields_are_named_with_offset(tmp_path: Path) -> None:
    p = tmp_path / "t.kmltrace"
    write_small(p)
    off = p.stat().st_size
    with open(p, "ab") as f:
        f.write(msgpack.packb({"kind": "telemetry", "ts": 1, "proxy": "sample",
                               "data": b"\x00" * 65}, use_bin_type=True))
    with pytest.raises(TraceError, match=f"record at offset {off}: telemetry data of 65 bytes"):
        list(traces.replay(p))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot open trace"):
        traces.read_header(tmp_path / "nope")


# -- offline evaluation ------------------------------------------------------

def record_sample_run(p: Path, n: int, explore: float, seed: int = 11) -> None:
    """A trace shaped like the sample proxy in learning mode with exploration."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(0, 1, 64)
    with TraceWriter(p, [sample_schema()]) as w:
        seq = 0
        for _ in range(n // 250):
            keys = rng.integers(0, 64, 250)
            t = np.zeros(250, SAMPLE)
            t["seq"] = seq + 1 + np.arange(250)
            seq += 250
            t["key"] = keys
            t["features"][:, 0] = np.rint(np.clip(s[keys] + rng.normal(0, 0.05, 250), 0, 1) * 1000)
            t["features"][:, 1] = rng.integers(1, 65, 250) * 1000
            t["features"][:, 2] = rng.integers(0, 1001, 250)
            ex = rng.uniform(0, 1, 250) < explore
            dec = np.where(ex, rng.integers(1, 65, 250), 8)
            t["decision"] = dec
            t["arm"] = np.where(ex, ARM_MODEL, ARM_DEFAULT)
            wstar = 1 + np.rint(63 * s[keys])
            f = np.zeros(250, FEEDBACK)
            f["seq"], f["key"], f["decision"], f["arm"] = t["seq"], keys, dec, t["arm"]
            f["efficiency"] = 1000 - (1000 * np.abs(dec - wstar)) // 64
            w.telemetry("sample", t)
            w.feedback("sample", f[::-1])


def test_evaluate_ranks_good_above_default_above_bad(tmp_path: Path) -> None:
    p = tmp_path / "run.kmltrace"
    record_sample_run(p, 20000, explore=0.3)
    good = offline.evaluate(p, models.to_bytes(models.sample_good_model()))
    bad = offline.evaluate(p, models.save(models.sample_bad_model(), tmp_path / "bad.onnx"))
    assert good.proxy == "sample" and good.joined == 20000
    assert 0.55 < good.default_measured < 0.7  # the fixed window 8
    assert good.model.coverage > 0.8 and good.model.efficiency > 0.9
    assert good.gain > 0.25
    assert bad.gain < -0.1
    assert "gain +" in str(good) and "proxy sample" in str(good)
    assert good.recorded_model_n > 0


def test_evaluate_without_exploration_reports_low_coverage(tmp_path: Path) -> None:
    p = tmp_path / "run.kmltrace"
    record_sample_run(p, 5000, explore=0.0)
    ev = offline.evaluate(p, models.to_bytes(models.sample_good_model()))
    assert ev.model.coverage < 0.3  # only window-8 cells were ever measured
    assert ev.recorded_model_n == 0


def test_evaluate_checks_the_model_contract(tmp_path: Path) -> None:
    p = tmp_path / "run.kmltrace"
    record_sample_run(p, 500, explore=0.1)
    from kmlbus.bus.registry import ModelContractError
    with pytest.raises(ModelContractError, match="proxy sample"):
        offline.evaluate(p, models.to_bytes(models.mismatched_model("width")))


def test_evaluate_empty_trace(tmp_path: Path) -> None:
    p = tmp_path / "e.kmltrace"
    with TraceWriter(p, [sample_schema()]):
        pass
    with pytest.raises(TraceError, match="no telemetry or feedback"):
        offline.evaluate(p, models.to_bytes(models.sample_good_model()))


def test_learn_offline_from_a_trace_then_evaluate(tmp_path: Path) -> None:
    p = tmp_path / "run.kmltrace"
    record_sample_run(p, 20000, explore=0.1)
    learner = offline.learn(p)
    assert learner.n_samples == 20000
    fit = learner.fit()
    assert fit is not None
    ev = offline.evaluate(p, fit.to_onnx(learner.binding))
    assert ev.gain > 0.25


def test_cli_show_evaluate_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    p = tmp_path / "run.kmltrace"
    record_sample_run(p, 5000, explore=0.3)
    assert offline.main(["show", str(p)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["proxies"] == ["sample"]
    assert shown["batches"]["sample"]["telemetry"] == {"batches": 20, "rows": 5000}

    good = models.save(models.sample_good_model(), tmp_path / "good.onnx")
    assert offline.main(["evaluate", str(p), str(good)]) == 0
    assert "gain +" in capsys.readouterr().out

    out = tmp_path / "fitted.onnx"
    (tmp_path / "bus.toml").write_text('[proxy.sample]\nfeatures = ["seq_ratio"]\n')
    assert offline.main(["fit", str(p), str(out), "--config", str(tmp_path / "bus.toml")]) == 0
    text = capsys.readouterr().out
    assert "('seq_ratio',)" in text and "gain +" in text
    assert out.exists()

    p.write_bytes(p.read_bytes()[:100])
    assert offline.main(["evaluate", str(p), str(good)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kmlbus traces: ") and "offset" in err


def test_append_continues_a_trace_and_cuts_a_partial_record(tmp_path: Path) -> None:
    p = tmp_path / "t.kmltrace"
    sent = write_small(p)
    whole = p.stat().st_size
    with open(p, "ab") as f:  # a crash mid-record
        f.write(msgpack.packb({"kind": "recs", "ts": 9, "proxy": "sample",
                               "data": b"\x00" * 12}, use_bin_type=True)[:-5])
    other = ProxySchema("other", (FieldSchema("a", 10),), FieldSchema("r", 1, 0, 9), 4)
    with TraceWriter(p, [sample_schema(), other], append=True) as w:
        w.telemetry("sample", sent["telemetry"], ts=10)
    assert p.stat().st_size > whole
    r = traces.open_trace(p)
    evs = list(r)
    assert [e.ts for e in evs] == [1, 2, 3, 4, 10]
    assert set(r.schemas) == {"sample", "other"}
    np.testing.assert_array_equal(evs[-1].data, sent["telemetry"])


def test_append_refuses_a_foreign_layout(tmp_path: Path) -> None:
    p = tmp_path / "t.kmltrace"
    hdr = {"format": "kmlbus-trace", "version": 1, "structs": {"sample": [["seq", "<u8"]]},
           "schemas": {}}
    p.write_bytes(msgpack.packb(hdr))
    with pytest.raises(TraceError, match="cannot append: the trace's struct"):
        TraceWriter(p, append=True)


def test_new_writer_replaces_an_existing_file(tmp_path: Path) -> None:
    p = tmp_path / "t.kmltrace"
    write_small(p)
    with TraceWriter(p):
        pass
    assert list(traces.replay(p)) == []


@pytest.mark.parametrize("descr", [[["x", "|O"]], [], [["x", "<u8", [0]]]])
def test_header_with_an_unusable_layout_is_rejected(tmp_path: Path, descr: list[object]) -> None:
    p = tmp_path / "t"
    p.write_bytes(msgpack.packb({"format": "kmlbus-trace", "version": 1,
                                 "structs": {"sample": descr}}))
    with pytest.raises(TraceError, match="malformed trace header"):
        traces.read_header(p)


def test_evaluate_reads_an_older_layout_by_field_name(tmp_path: Path) -> None:
    # a trace whose sample struct had its fields in another order (and one extra)
    old_sample = np.dtype([("key", "<u4"), ("extra", "<u2"), ("seq", "<u8"), ("ts_ns", "<u8"),
                           ("decision", "<i4"), ("shadow", "<i4"), ("arm", "u1"), ("mode", "u1"),
                           ("flags", "<u2"), ("features", "<i4", (8,))])
    p = tmp_path / "old.kmltrace"
    record_sample_run(p, 2000, explore=0.3)
    before = offline.evaluate(p, models.to_bytes(models.sample_good_model()))
    evs = list(traces.replay(p))
    header = {"format": "kmlbus-trace", "version": 1, "spec_version": 1,
              "structs": {"sample": [list(x) for x in old_sample.descr],
                          "feedback": [list(x) for x in FEEDBACK.descr]},
              "schemas": {"sample": sample_schema().to_attrs()}}
    with open(p, "wb") as f:
        f.write(msgpack.packb(header, use_bin_type=True))
        for e in evs:
            data = e.data
            if e.kind == "telemetry":
                conv = np.zeros(len(data), old_sample)
                for n in SAMPLE.names or ():
                    conv[n] = data[n]
                data = conv
            f.write(msgpack.packb({"kind": e.kind, "ts": e.ts, "proxy": e.proxy,
                                   "data": data.tobytes()}, use_bin_type=True))
    after = offline.evaluate(p, models.to_bytes(models.sample_good_model()))
    assert after == before and after.joined == 2000
