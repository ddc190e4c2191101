"""The spec-driven codec: round trips for every operation, and no crash on any bytes.

Strategies are derived from the family spec, so a new attribute, struct or
operation in ``kmlbus/contract/kmlbus.yaml`` is covered without touching this file.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmlbus.contract import spec as kspec
from kmlbus.wire import codec
from kmlbus.wire.codec import CodecError

SPEC = kspec.load()
ROOT = Path(__file__).resolve().parent.parent
FAMILY = 0x1234

_INT_RANGES = {
    t: ((-(1 << (8 * n - 1)), (1 << (8 * n - 1)) - 1) if t[0] == "s" else (0, (1 << (8 * n)) - 1))
    for t, n in {"u8": 1, "u16": 2, "u32": 4, "u64": 8, "s8": 1, "s16": 2, "s32": 4, "s64": 8}.items()
}


def struct_array(name: str, max_records: int = 40, min_records: int = 0) -> st.SearchStrategy[np.ndarray]:
    """Arrays of spec struct *name* made of arbitrary bytes (every bit pattern is a valid record)."""
    dt = codec.struct_dtype(name)
    return st.integers(min_records, max_records).flatmap(
        lambda n: st.binary(min_size=n * dt.itemsize, max_size=n * dt.itemsize)
    ).map(lambda b: np.frombuffer(b, dtype=dt).copy())


def attr_value(attr: kspec.Attr, depth: int = 0) -> st.SearchStrategy[Any]:
    """A strategy for one value of *attr*, from its spec type."""
    if attr.type in _INT_RANGES:
        lo, hi = _INT_RANGES[attr.type]
        return st.integers(lo, hi)
    if attr.type == "string":
        return st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]), max_size=40)
    if attr.type == "binary" and attr.struct and attr.multi:  # a batch: one struct per attribute
        return struct_array(attr.struct, min_records=1)
    if attr.type == "binary":
        return struct_array(attr.struct) if attr.struct else st.binary(max_size=64)
    if attr.type == "flag":
        return st.just(True)
    if attr.type == "nest":
        return attrs_of(attr.nested, None, depth + 1)
    raise AssertionError(f"test strategy missing for spec type {attr.type}")


def attrs_of(set_name: str, names: tuple[str, ...] | None, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts with any subset of *names* (all of the set's when None) of *set_name*."""
    aset = SPEC.attr_sets[set_name]
    picked = [a for a in aset.attrs if a.type != "pad" and (names is None or a.name in names)]
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for a in picked:
        v = attr_value(a, depth)
        batch = a.multi and a.struct
        optional[a.name] = st.lists(v, min_size=1, max_size=4) if a.multi and not batch else v
    return st.fixed_dictionaries({}, optional=optional)


def op_lists() -> list[tuple[str, str, tuple[str, ...]]]:
    """(op, which, attribute names) for every request/reply/event list in the spec."""
    out = []
    for o in SPEC.ops:
        for which in ("do_request", "do_reply", "dump_reply", "event"):
            names = getattr(o, which)
            if names is not None:
                out.append((o.name, which, names))
    return out


def normalize(v: Any) -> Any:
    """Comparable form: numpy arrays become (fields, packed bytes), so a decoded batch
    (a view of the structs behind their attribute headers) equals the array encoded."""
    if isinstance(v, np.ndarray):
        names = v.dtype.names or ()
        fields = v.dtype.fields or {}
        packed = np.dtype([(n, fields[n][0]) for n in names]) if names else v.dtype
        return (packed.descr, v.astype(packed).tobytes())
    if isinstance(v, dict):
        return {k: normalize(x) for k, x in v.items()}
    if isinstance(v, list):
        return [normalize(x) for x in v]
    return v


def valid_message() -> st.SearchStrategy[bytes]:
    """Encoded messages of any operation with attributes from any of its lists."""
    return st.sampled_from(op_lists()).flatmap(
        lambda t: st.tuples(st.just(t[0]), attrs_of(SPEC.op_by_name[t[0]].attr_set, t[2]),
                            st.integers(0, 2**32 - 1))
    ).map(lambda t: codec.encode_msg(FAMILY, t[0], t[1], seq=t[2], flags=codec.NLM_F_REQUEST))


# --- round trips ----------------------------------------------------------------------


@pytest.mark.parametrize(("op", "which", "names"), op_lists(), ids=lambda x: x if isinstance(x, str) else None)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_operation_attribute_list_round_trips(op: str, which: str, names: tuple[str, ...], data: st.DataObject) -> None:
    o = SPEC.op_by_name[op]
    attrs = data.draw(attrs_of(o.attr_set, names))
    seq = data.draw(st.integers(0, 2**32 - 1))
    raw = codec.encode_msg(FAMILY, op, attrs, seq=seq, flags=codec.NLM_F_REQUEST | codec.NLM_F_ACK)
    (msg,) = codec.decode_msg(raw)
    assert (msg.type, msg.seq, msg.cmd, msg.op) == (FAMILY, seq, o.value, op)
    assert msg.flags == codec.NLM_F_REQUEST | codec.NLM_F_ACK
    assert normalize(msg.attrs) == normalize(attrs)
    assert codec.decode_attrs(o.attr_set, codec.encode_attrs(o.attr_set, attrs)).keys() == attrs.keys()


@pytest.mark.parametrize("set_name", sorted(SPEC.attr_sets))
@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_every_attribute_set_round_trips(set_name: str, data: st.DataObject) -> None:
    attrs = data.draw(attrs_of(set_name, None))
    assert normalize(codec.decode_attrs(set_name, codec.encode_attrs(set_name, attrs))) == normalize(attrs)


@settings(max_examples=50, deadline=None)
@given(msgs=st.lists(valid_message(), min_size=1, max_size=5))
def test_several_messages_in_one_datagram_decode_in_order(msgs: list[bytes]) -> None:
    decoded = codec.decode_msg(b"".join(msgs))
    assert [m.seq for m in decoded] == [codec.decode_msg(m)[0].seq for m in msgs]


# --- nothing but CodecError ----------------------------------------------------------


def _decode_everything(data: bytes) -> None:
    for fam in (None, FAMILY, 0x10):
        try:
            codec.decode_msg(data, family_id=fam)
        except CodecError:
            pass
    for set_name in SPEC.attr_sets:
        try:
            codec.decode_attrs(set_name, data)
        except CodecError:
            pass


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_raise_only_codec_error(data: bytes) -> None:
    _decode_everything(data)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_mutated_messages_raise_only_codec_error(data: st.DataObject) -> None:
    raw = bytearray(data.draw(valid_message()))
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "len16"]))
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if kind == "flip" and raw:
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "cut":
            del raw[pos:pos + data.draw(st.integers(1, 8))]
        elif kind == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif kind == "len16" and pos + 2 <= len(raw):
            raw[pos:pos + 2] = struct.pack("=H", data.draw(st.integers(0, 0xFFFF)))
    _decode_everything(bytes(raw))


@settings(max_examples=300, deadline=None)
@given(attrs=st.data())
def test_mutated_attributes_inside_a_valid_header_raise_only_codec_error(attrs: st.DataObject) -> None:
    # A well-formed nlmsghdr/genlmsghdr around garbage reaches the attribute decoders themselves.
    body = attrs.draw(st.binary(max_size=300))
    cmd = attrs.draw(st.sampled_from([o.value for o in SPEC.ops] + [0, 250]))
    _decode_everything(codec.pack_genlmsg(FAMILY, cmd, 1, body, seq=1, flags=0))


def _same_as_generic(raw: bytes) -> bool:
    """decode_event agrees with decode_one on one message (or declines it); True if it decoded."""
    if len(raw) < 20:
        return False
    mlen, mtype, mflags, seq, portid = struct.unpack_from("=IHHII", raw, 0)
    if mlen != len(raw):
        return False
    fast = codec.decode_event(raw, mtype, mflags, seq, portid, 16, len(raw))
    peek = codec.peek_event(raw, mtype)  # the daemon's look before anything is decoded
    if fast is None:
        assert peek is None
        return False
    assert peek is not None and peek.attrs.keys() == fast.attrs.keys()
    for k, v in fast.attrs.items():
        if isinstance(v, np.ndarray):  # struct arrays: the same packed bytes, no array
            assert isinstance(peek.attrs[k], memoryview) and bytes(peek.attrs[k]) == v.tobytes()
        else:
            assert peek.attrs[k] == v
    assert codec.peek_event(raw, mtype + 1) is None and codec.peek_event(raw + b"\0" * 4, mtype) is None
    slow = codec.decode_one(raw, mtype, mflags, seq, portid, 16, len(raw), family_id=mtype)
    assert (fast.type, fast.flags, fast.seq, fast.portid, fast.cmd, fast.op) == \
        (slow.type, slow.flags, slow.seq, slow.portid, slow.cmd, slow.op)
    assert normalize(fast.attrs) == normalize(slow.attrs)
    return True


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_the_fast_event_decoder_agrees_with_the_generic_one(data: st.DataObject) -> None:
    op = data.draw(st.sampled_from(["telemetry", "feedback", "mode-event"]))
    o = SPEC.op_by_name[op]
    assert o.event is not None
    attrs = data.draw(attrs_of(o.attr_set, tuple(o.event)))
    raw = codec.encode_msg(FAMILY, op, attrs, seq=data.draw(st.integers(0, 2**32 - 1)),
                           flags=0)
    decoded = _same_as_generic(raw)
    assert decoded == (op != "mode-event")  # mode events (enums, strings) go the generic way


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_the_fast_event_decoder_on_mutated_events_agrees_or_declines(data: st.DataObject) -> None:
    op = data.draw(st.sampled_from(["telemetry", "feedback"]))
    o = SPEC.op_by_name[op]
    assert o.event is not None
    raw = bytearray(codec.encode_msg(FAMILY, op, data.draw(attrs_of(o.attr_set, tuple(o.event))),
                                     seq=1, flags=0))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(20, max(len(raw) - 1, 20)))
        if pos < len(raw):
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
    struct.pack_into("=I", raw, 0, len(raw))
    try:
        _same_as_generic(bytes(raw))
    except CodecError:
        pass  # the generic decoder refuses what the fast one accepted: that is a failure
    else:
        return
    fast = codec.decode_event(bytes(raw), FAMILY, 0, 1, 0, 16, len(raw))
    assert fast is None, "the fast decoder accepted a message the generic one refuses"


# --- wire details ----------------------------------------------------------------------


def _proxy_attr(name: str) -> kspec.Attr:
    return SPEC.attr_sets["proxy"].by_name[name]


def test_attributes_are_aligned_to_four_bytes_and_nests_carry_nla_f_nested() -> None:
    nest = next(a for a in SPEC.attr_sets["proxy"].attrs if a.type == "nest" and not a.multi)
    inner = SPEC.attr_sets[nest.nested]
    first = next(a for a in inner.attrs if a.type == "string")
    raw = codec.encode_attrs("proxy", {"name": "abcde", nest.name: {first.name: "x"}})
    items = list(codec.iter_attrs(raw))
    assert [nr for nr, *_ in items] == [_proxy_attr("name").value, nest.value]
    assert items[0][2] % 4 == 0 and items[1][2] % 4 == 0 and len(raw) % 4 == 0
    assert items[0][1] == 0 and items[1][1] == codec.NLA_F_NESTED


def test_struct_arrays_decode_as_zero_copy_numpy_views() -> None:
    dt = codec.struct_dtype("sample")
    recs = np.zeros(5, dtype=dt)
    recs["seq"] = np.arange(1, 6)
    recs["features"][:, 0] = 777
    raw = codec.encode_msg(FAMILY, "telemetry", {"id": 3, "records": recs, "drops": 2}, seq=9, flags=0)
    (msg,) = codec.decode_msg(raw)
    view = codec.records(msg.attrs)
    assert view.dtype == codec.run_dtype("sample") and list(view["seq"]) == [1, 2, 3, 4, 5]
    assert not view.flags.owndata and np.shares_memory(view, np.frombuffer(raw, np.uint8))
    assert (view["features"][:, 0] == 777).all()
    assert codec.packed(view, "sample").tobytes() == recs.tobytes()


def test_a_batch_is_one_attribute_per_struct_back_to_back() -> None:
    """YNL's multi-attr: a generic client decodes the batch as a list of structs, and the
    fixed stride (4-byte header + struct) is what the array view relies on."""
    recs = np.zeros(3, dtype=codec.struct_dtype("sample"))
    recs["seq"] = [7, 8, 9]
    raw = codec.encode_attrs("proxy", {"id": 1, "records": recs, "drops": 0})
    items = list(codec.iter_attrs(raw))
    nr = _proxy_attr("records").value
    runs = [(a, b) for t, _f, a, b in items if t == nr]
    size = SPEC.structs["sample"].size
    assert [b - a for a, b in runs] == [size] * 3
    assert [a for a, _ in runs] == [runs[0][0] + i * (size + 4) for i in range(3)]
    assert [bytes(raw[a:b]) for a, b in runs] == [r.tobytes() for r in recs]
    assert codec.run_dtype("sample").itemsize == size + 4


def test_a_batch_split_by_other_attributes_still_decodes_whole() -> None:
    recs = np.zeros(4, dtype=codec.struct_dtype("feedback"))
    recs["seq"] = [1, 2, 3, 4]
    nr = _proxy_attr("feedback").value
    parts = [codec.pack_attr(nr, r.tobytes()) for r in recs]
    raw = parts[0] + parts[1] + codec.encode_attrs("proxy", {"id": 5}) + parts[2] + parts[3]
    out = codec.decode_attrs("proxy", raw)
    assert out["id"] == 5 and list(out["feedback"]["seq"]) == [1, 2, 3, 4]
    # the hot path declines it (two runs) and the generic decoder takes it
    msg = codec.pack_genlmsg(FAMILY, SPEC.op_by_name["feedback"].value, 1, raw, seq=1, flags=0)
    assert codec.decode_event(msg, FAMILY, 0, 1, 0, 16, len(msg)) is None


def test_run_length_stops_at_the_first_other_header() -> None:
    nr = _proxy_attr("records").value
    recs = np.zeros(6, dtype=codec.struct_dtype("sample"))
    run = codec.encode_attrs("proxy", {"records": recs})
    stride = codec.run_dtype("sample").itemsize
    header = stride | nr << 16
    assert codec.run_length(run, 0, len(run), header, stride) == 6
    assert codec.run_length(run + b"\0" * stride, 0, len(run) + stride, header, stride) == 6
    broken = bytearray(run)
    broken[2 * stride] = 0  # the third attribute's length
    assert codec.run_length(bytes(broken), 0, len(broken), header, stride) == 2
    assert codec.run_length(run, 4, len(run), header, stride) == 0


def test_feedback_batch_is_returned_by_records() -> None:
    fb = np.zeros(3, dtype=codec.struct_dtype("feedback"))
    fb["efficiency"] = [1, -2, 3]
    (msg,) = codec.decode_msg(codec.encode_msg(FAMILY, "feedback", {"id": 1, "feedback": fb}, seq=1, flags=0))
    assert msg.op == "feedback" and list(codec.records(msg.attrs)["efficiency"]) == [1, -2, 3]


@pytest.mark.parametrize("extra", [1, 64, -4])
def test_a_batch_attribute_not_holding_exactly_one_struct_is_a_codec_error(extra: int) -> None:
    size = SPEC.structs["sample"].size
    raw = codec.pack_attr(_proxy_attr("records").value, b"\0" * (size + extra))
    with pytest.raises(CodecError, match="each attribute holds one struct sample"):
        codec.decode_attrs("proxy", raw)


def test_pad_attributes_are_skipped_and_unknown_numbers_kept() -> None:
    pad = next(a for a in SPEC.attr_sets["proxy"].attrs if a.type == "pad")
    unknown = SPEC.attr_sets["proxy"].max_value + 7
    raw = (codec.pack_attr(pad.value, b"") + codec.encode_attrs("proxy", {"drops": 2**64 - 1})
           + codec.pack_attr(unknown, b"\x01\x02\x03"))
    out = codec.decode_attrs("proxy", raw)
    assert out == {"drops": 2**64 - 1, "unknown": {unknown: b"\x01\x02\x03"}}
    assert codec.encode_attrs("proxy", out) == raw[4:]


def test_enum_attributes_take_names_on_encode_and_come_back_as_ints() -> None:
    out = codec.decode_attrs("proxy", codec.encode_attrs("proxy", {"mode": "recommendation", "reason": "bus-gone"}))
    assert out == {"mode": SPEC.enums["mode"].value("recommendation"), "reason": SPEC.enums["reason"].value("bus-gone")}
    assert codec.enum_name("mode", out["mode"]) == "recommendation"
    assert codec.enum_name("mode", 99) == "mode?99"
    flags = SPEC.enums["sample-flags"]
    assert codec.enum_name("sample-flags", flags.value("has-shadow") | flags.value("explored")) == "has-shadow|explored"


@pytest.mark.parametrize(("values", "needle"), [
    ({"id": -1}, "outside"),
    ({"id": 2**32}, "outside"),
    ({"mode": "warp"}, "not one of"),
    ({"name": 5}, "expected a str"),
    ({"nope": 1}, "no attribute"),
    ({"feature": {"name": "x"}}, "multi-attr"),
    ({"records": b"\0" * 3}, "not a multiple"),
])
def test_values_that_do_not_fit_raise_codec_error_naming_the_attribute(values: dict[str, Any], needle: str) -> None:
    with pytest.raises(CodecError, match=needle):
        codec.encode_attrs("proxy", values)


def test_unknown_operation_and_set_are_codec_errors() -> None:
    with pytest.raises(CodecError, match="no operation"):
        codec.encode_msg(FAMILY, "frobnicate", {}, seq=1, flags=0)
    with pytest.raises(CodecError, match="no attribute set"):
        codec.decode_attrs("nope", b"")


def _nlmsgerr(err: int, request: bytes, tlvs: bytes, *, capped: bool) -> bytes:
    echoed = request[:16] if capped else request
    flags = (codec.NLM_F_CAPPED if capped else 0) | (codec.NLM_F_ACK_TLVS if tlvs else 0)
    return codec.pack_nlmsg(codec.NLMSG_ERROR, flags, 77, struct.pack("=i", err) + echoed + tlvs, portid=5)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(1, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF),
       st.sampled_from([codec.NLM_F_REQUEST, codec.NLM_F_REQUEST | codec.NLM_F_ACK]),
       st.lists(st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(-(1 << 31), (1 << 31) - 1),
                          st.integers(0, 0xFFFFFFFF)), max_size=40))
def test_the_fast_recommend_encoder_equals_the_generic_one(
        family: int, pid: int, seq: int, flags: int, rows: list[tuple[int, int, int]]) -> None:
    recs = np.array(rows, dtype=codec.struct_dtype("rec"))
    generic = codec.encode_msg(family, "recommend", {"id": pid, "recs": recs}, seq=seq, flags=flags)
    assert codec.encode_recommend(family, pid, recs.tobytes(), seq=seq, flags=flags) == generic


def test_the_fast_recommend_encoder_refuses_partial_records() -> None:
    with pytest.raises(codec.CodecError, match="12-byte rec"):
        codec.encode_recommend(20, 1, b"\0" * 13, seq=1, flags=codec.NLM_F_REQUEST)


@pytest.mark.parametrize("capped", [True, False])
def test_nlmsg_error_gives_the_kernel_errno_and_extack(capped: bool) -> None:
    req = codec.encode_msg(FAMILY, "set-mode", {"id": 1, "mode": 3}, seq=77, flags=codec.NLM_F_REQUEST)
    tlvs = (codec.pack_attr(codec.NLMSGERR_ATTR_MSG, b"illegal mode change\0")
            + codec.pack_attr(codec.NLMSGERR_ATTR_OFFS, struct.pack("=I", 28))
            + codec.pack_attr(codec.NLMSGERR_ATTR_MISS_TYPE, struct.pack("=I", 1)))
    (m,) = codec.decode_msg(_nlmsgerr(-22, req, tlvs, capped=capped))
    assert (m.type, m.seq, m.error, m.extack, m.extack_offset, m.extack_missing) == (
        codec.NLMSG_ERROR, 77, -22, "illegal mode change", 28, 1)


def test_ack_and_done_decode_with_error_zero() -> None:
    ack = _nlmsgerr(0, codec.pack_nlmsg(0x20, 5, 3, b""), b"", capped=True)
    done = codec.pack_nlmsg(codec.NLMSG_DONE, codec.NLM_F_MULTI, 3, struct.pack("=i", 0))
    a, d = codec.decode_msg(ack + done)
    assert (a.type, a.error, a.extack) == (codec.NLMSG_ERROR, 0, "")
    assert (d.type, d.error) == (codec.NLMSG_DONE, 0)


def test_other_families_keep_their_raw_payload() -> None:
    body = codec.pack_attr(2, b"nlctrl\0")
    (m,) = codec.decode_msg(codec.pack_genlmsg(0x10, 1, 2, body, seq=1, flags=0), family_id=FAMILY)
    assert (m.cmd, m.op, m.attrs, m.payload) == (1, "", {}, body)


def test_codec_follows_the_spec_file_not_hand_written_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Renumber every attribute and operation of a copy of the spec: the codec must follow.
    import yaml

    raw = yaml.safe_load(SPEC.path.read_text())
    for s in raw["attribute-sets"]:
        for i, a in enumerate(s["attributes"]):
            a["value"] = 40 + i
    for i, o in enumerate(raw["operations"]["list"]):
        o["value"] = 100 + i
    alt = tmp_path / "alt.yaml"
    alt.write_text(yaml.safe_dump(raw))
    alt_spec = kspec.load(alt)
    monkeypatch.setattr(kspec, "load", lambda path=None: alt_spec)
    codec.clear_caches()
    try:
        raw_msg = codec.encode_msg(FAMILY, "get", {"id": 7, "name": "x"}, seq=1, flags=0)
        assert raw_msg[16] == alt_spec.op_by_name["get"].value
        assert [nr for nr, *_ in codec.iter_attrs(raw_msg, 20)] == [alt_spec.attr_sets["proxy"].by_name["id"].value,
                                                                    alt_spec.attr_sets["proxy"].by_name["name"].value]
        (m,) = codec.decode_msg(raw_msg)
        assert (m.op, m.attrs) == ("get", {"id": 7, "name": "x"})
    finally:
        monkeypatch.undo()
        codec.clear_caches()
    assert codec.encode_attrs("proxy", {"id": 7})[2] == SPEC.attr_sets["proxy"].by_name["id"].value


def test_the_fast_yaml_loader_reads_the_spec_and_graph_as_the_pure_python_one_does() -> None:
    # spec.load() and graph.load() use libyaml's loader for start-up time; it must not change
    # what they read (a tag or a number parsed differently would renumber the wire).
    import yaml

    from kmlbus.contract import graph as kgraph

    for path in (SPEC.path, kgraph.GRAPH_PATH):
        text = path.read_text(encoding="utf-8")
        assert yaml.load(text, Loader=kspec.SAFE_LOADER) == yaml.safe_load(text), path
