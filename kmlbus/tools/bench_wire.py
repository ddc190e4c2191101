"""Measure the wire layer: raw socket vs pyroute2, numpy views vs per-record decoding.

Why: DESIGN.md keeps pyroute2 for the control plane only and decodes the hot
telemetry path with numpy views.  This benchmark checks that choice on the
machine at hand.  Everything is measured in the same run and reported as
ratios against the raw/numpy baseline, because absolute times differ a lot
between the host and a TCG guest (ENVIRONMENT.md).

- request/reply: ``CTRL_CMD_GETFAMILY("nlctrl")`` (a family every kernel
  has) through :class:`kmlbus.wire.netlink.GenlSocket` and through pyroute2's
  ``GenericNetlinkSocket``; both send, wait for reply + ACK and parse.
- decode: one telemetry message of ``batch`` sample records through
  :func:`kmlbus.wire.codec.decode_msg` (numpy view), through a pyroute2 genlmsg
  class whose ``nla_map`` is built from the spec (records then viewed with
  numpy, pyroute2's best case), and record by record with
  ``struct.iter_unpack`` (what a pure-Python decoder would do).

Run: ``python -m kmlbus.tools.bench_wire``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from kmlbus.contract import spec as kspec
from kmlbus.wire import codec
from kmlbus.wire import netlink as nl

__all__ = ["run"]

#: YNL attribute types -> pyroute2 nla types (the benchmark's adapter, not part of the bus).
_PR2_TYPES = {
    "u8": "uint8", "u16": "uint16", "u32": "uint32", "u64": "uint64",
    "s8": "int8", "s16": "int16", "s32": "int32", "s64": "int64",
    "string": "asciiz", "binary": "cdata", "nest": "cdata", "flag": "flag", "pad": "none",
}


def _compare(cases: dict[str, tuple[Callable[[], Any], int]], rounds: int = 9) -> dict[str, float]:
    """Seconds per call of each case: best of *rounds* rounds of its *n* calls.

    Rounds of the cases are interleaved, and the best round is kept, so that
    load from other processes (a busy host, a TCG guest) hits every
    alternative alike instead of whichever happened to run during a spike.
    """
    for fn, _n in cases.values():
        fn()  # warm up caches, lazy tables, the kernel's socket state
    best = {name: float("inf") for name in cases}
    for _ in range(rounds):
        for name, (fn, n) in cases.items():
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / n)
    return best


def _pr2_name(set_name: str, attr: str) -> str:
    return "KMLBUS_A_%s_%s" % (set_name.upper(), attr.upper().replace("-", "_"))


def _pyroute2_nla_map(sp: kspec.Spec, set_name: str, base: type, cls_attrs: dict[str, Any]) -> tuple[Any, ...]:
    """nla_map of one attribute set, taken from the spec; nests become nested nla classes."""
    from pyroute2.netlink import nla

    out = []
    for a in sp.attr_sets[set_name].attrs:
        kind = _PR2_TYPES[a.type]
        if a.type == "nest":
            kind = "nest_" + a.nested.replace("-", "_")
            if kind not in cls_attrs:
                inner: dict[str, Any] = {}
                inner["nla_map"] = _pyroute2_nla_map(sp, a.nested, nla, inner)
                cls_attrs[kind] = type(kind, (nla,), inner)
        out.append((a.value, _pr2_name(set_name, a.name), kind))
    return tuple(out)


def _pyroute2_msg_class(sp: kspec.Spec, set_name: str) -> type:
    """A pyroute2 genlmsg class for one attribute set, with its nla_map taken from the spec."""
    from pyroute2.netlink import genlmsg

    attrs: dict[str, Any] = {}
    attrs["nla_map"] = _pyroute2_nla_map(sp, set_name, genlmsg, attrs)
    return type("kmlbus_%s_msg" % set_name, (genlmsg,), attrs)


def _kmlbus_requests(sp: kspec.Spec, requests: int, proxy: str) -> dict[str, float]:
    """``get`` of one proxy through Connection and through pyroute2 (needs kmlbus.ko)."""
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
    from pyroute2.netlink.generic import GenericNetlinkSocket

    out: dict[str, float] = {}
    conn = nl.Connection()
    cls = _pyroute2_msg_class(sp, "proxy")
    get = sp.op_by_name["get"].value
    pr2 = GenericNetlinkSocket()
    try:
        pr2.bind(sp.name, cls)

        def pr2_get() -> Any:
            msg = cls()
            msg["cmd"] = get
            msg["version"] = sp.version
            msg["attrs"].append([_pr2_name("proxy", "name"), proxy])
            (reply,) = pr2.nlm_request(msg, msg_type=pr2.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK)
            return reply.get_attr(_pr2_name("proxy", "nkeys"))

        t = _compare({"raw": (lambda: conn.proxy(proxy), requests), "pr2": (pr2_get, max(requests // 5, 20))})
        out["kmlbus_get_raw_us"], out["kmlbus_get_pyroute2_us"] = t["raw"] * 1e6, t["pr2"] * 1e6
    finally:
        pr2.close()
        conn.close()
    out["kmlbus_get_pyroute2_x"] = out["kmlbus_get_pyroute2_us"] / out["kmlbus_get_raw_us"]
    return out


def _telemetry_message(sp: kspec.Spec, batch: int) -> bytes:
    rng = np.random.default_rng(1)
    recs = np.zeros(batch, dtype=codec.struct_dtype("sample"))
    recs["seq"] = np.arange(1, batch + 1)
    recs["key"] = rng.integers(0, 64, batch)
    recs["features"][:, :3] = rng.integers(0, 64000, (batch, 3))
    return codec.encode_msg(0x20, "telemetry", {"id": 1, "records": recs, "drops": 0}, seq=0, flags=0)


def run(batch: int = 32, requests: int = 300, decodes: int = 3000, verbose: bool = True,
        proxy: str = "sample") -> dict[str, float]:
    """Measure and return times (``*_us``, best-round microseconds per call) and ratios (``*_x``).

    Ratios are the alternative's time over the baseline's, measured in this
    same run: ``request_pyroute2_x`` (pyroute2 / raw request),
    ``decode_pyroute2_x`` and ``decode_struct_x`` (over the numpy view).
    When kmlbus.ko is loaded and has proxy *proxy*, ``kmlbus_get_*`` time a
    real ``get`` both ways too.
    """
    sp = kspec.load()
    out: dict[str, float] = {"batch": float(batch)}

    # --- request/reply against nlctrl -------------------------------------------
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
    from pyroute2.netlink.generic import (
        CTRL_CMD_GETFAMILY,
        GENL_ID_CTRL,
        GenericNetlinkSocket,
        ctrlmsg,
    )

    raw = nl.GenlSocket()
    pr2 = GenericNetlinkSocket()
    try:
        pr2.bind("nlctrl", ctrlmsg)

        def pr2_request() -> Any:
            msg = ctrlmsg()
            msg["cmd"] = CTRL_CMD_GETFAMILY
            msg["version"] = 1
            msg["attrs"].append(["CTRL_ATTR_FAMILY_NAME", "nlctrl"])
            (reply,) = pr2.nlm_request(msg, msg_type=GENL_ID_CTRL, msg_flags=NLM_F_REQUEST | NLM_F_ACK)
            return reply.get_attr("CTRL_ATTR_FAMILY_ID")

        t = _compare({"raw": (lambda: raw.get_family("nlctrl"), requests),
                      "pr2": (pr2_request, max(requests // 5, 20))})
        out["request_raw_us"], out["request_pyroute2_us"] = t["raw"] * 1e6, t["pr2"] * 1e6
    finally:
        pr2.close()
        raw.close()

    # --- decoding one telemetry batch -------------------------------------------
    data = _telemetry_message(sp, batch)
    dt = codec.struct_dtype("sample")

    def numpy_view() -> Any:
        (m,) = codec.decode_msg(data)
        return codec.records(m.attrs)

    cls = _pyroute2_msg_class(sp, "proxy")
    rec_name = "KMLBUS_A_PROXY_RECORDS"

    def pyroute2_decode() -> Any:
        m = cls(data)
        m.decode()
        return np.frombuffer(b"".join(m.get_attrs(rec_name)), dtype=dt)  # one sample per attribute

    fmt = sp.struct_format("sample")
    import struct as _struct

    rec_attr = sp.attr_sets["proxy"].by_name["records"].value

    def struct_records() -> Any:
        out: list[tuple[Any, ...]] = []
        for _t, _fl, _s, _p, a, b in codec.iter_nlmsgs(data):
            for nr, _f, pa, pb in codec.iter_attrs(data, a + 4, b):  # + genlmsghdr
                if nr == rec_attr:
                    out.extend(_struct.iter_unpack(fmt, data[pa:pb]))
        return out

    assert codec.packed(numpy_view(), "sample").tobytes() == pyroute2_decode().tobytes()
    assert len(struct_records()) == batch
    t = _compare({"numpy": (numpy_view, decodes), "pr2": (pyroute2_decode, max(decodes // 10, 50)),
                  "struct": (struct_records, max(decodes // 5, 50))})
    out["decode_numpy_us"], out["decode_pyroute2_us"], out["decode_struct_us"] = (
        t["numpy"] * 1e6, t["pr2"] * 1e6, t["struct"] * 1e6)
    out["decode_numpy_ns_per_record"] = out["decode_numpy_us"] * 1e3 / batch

    out["request_pyroute2_x"] = out["request_pyroute2_us"] / out["request_raw_us"]
    out["decode_pyroute2_x"] = out["decode_pyroute2_us"] / out["decode_numpy_us"]
    out["decode_struct_x"] = out["decode_struct_us"] / out["decode_numpy_us"]

    try:
        out.update(_kmlbus_requests(sp, requests, proxy))
    except nl.KmlbusError as e:  # no module (the host) or no such proxy: nlctrl numbers only
        if verbose:
            print(f"kmlbus get not measured: {e}")

    if verbose:
        if "kmlbus_get_raw_us" in out:
            print(f"kmlbus get {proxy!r}: raw {out['kmlbus_get_raw_us']:.1f} us, pyroute2 "
                  f"{out['kmlbus_get_pyroute2_us']:.1f} us = {out['kmlbus_get_pyroute2_x']:.1f}x raw")
        print(f"request/reply (nlctrl getfamily): raw {out['request_raw_us']:.1f} us, "
              f"pyroute2 {out['request_pyroute2_us']:.1f} us = {out['request_pyroute2_x']:.1f}x raw")
        print(f"telemetry batch of {batch}: numpy view {out['decode_numpy_us']:.2f} us "
              f"({out['decode_numpy_ns_per_record']:.0f} ns/record), "
              f"pyroute2 {out['decode_pyroute2_us']:.1f} us = {out['decode_pyroute2_x']:.1f}x, "
              f"struct per record {out['decode_struct_us']:.1f} us = {out['decode_struct_x']:.1f}x")
    return out


if __name__ == "__main__":
    run()
