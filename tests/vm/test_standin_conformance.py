"""The user-space stand-in (tests/support/standin.py) held to the real module.

The host tests of the daemon run against the stand-in; this file checks,
inside the guest, that the stand-in answers the same requests the way
``kmlbus.ko`` does: the same acceptance or errno, the same extack text, the
same mode after each step, and the same schema in the dump.  A difference is
a bug in the stand-in (or a kernel change it has not followed).
"""

from __future__ import annotations

from typing import Any

import pytest

from kmlbus.contract import spec as kspec
from kmlbus.wire import codec
from kmlbus.wire.netlink import Connection, ControlOps, NetlinkError
from tests.support.standin import StandinKernel

pytestmark = pytest.mark.vm

_MAX_RECS = int(kspec.load().consts["max-recs"])

#: (what, operation) steps, run in order on a freshly attached sample proxy in emergency.
STEPS: list[tuple[str, Any]] = [
    ("skip a mode", lambda c, p: c.set_mode(p, "recommendation")),
    ("emergency -> learning", lambda c, p: c.set_mode(p, "learning", "recovery")),
    ("learning -> recommendation", lambda c, p: c.set_mode(p, "recommendation", "promotion")),
    ("learning -> collaboration", lambda c, p: c.set_mode(p, "collaboration", "promotion")),
    ("unknown mode number", lambda c, p: c.request("set-mode", {"id": p, "mode": 9})),
    ("no such proxy", lambda c, p: c.set_mode(p + 100, "learning")),
    ("share above permille", lambda c, p: c.set_params(p, share=1001)),
    ("share ok", lambda c, p: c.set_params(p, share=300, explore=20)),
    ("recs: key out of range", lambda c, p: c.recommend(p, [(1, 8, 100), (1000, 8, 100)])),
    ("recs: ttl 0", lambda c, p: c.recommend(p, [(1, 8, 0)])),
    ("recs: too many", lambda c, p: c.request("recommend", {"id": p, "recs": _recs(_MAX_RECS + 1)})),
    ("recs: ok", lambda c, p: c.recommend(p, [(1, 8, 100), (2, 70, 100)])),
    ("recs: missing", lambda c, p: c.request("recommend", {"id": p})),
    ("collaboration -> recommendation", lambda c, p: c.set_mode(p, "recommendation", "promotion")),
    ("operator to emergency", lambda c, p: c.set_mode(p, "emergency")),
    ("detach", lambda c, p: c.detach(p)),
    ("detach again", lambda c, p: c.detach(p)),
    ("dump of an op without one", lambda c, p: c.request("set-mode", {"id": p, "mode": 1}, dump=True)),
    ("attach with an attribute past its policy",
     lambda c, p: c.request("attach", {"id": p, "share": 5})),
    ("get with an attribute outside its policy", lambda c, p: c.request("get", {"id": p, "mode": 1})),
    ("set-params with an attribute outside its policy",
     lambda c, p: c.request("set-params", {"id": p, "name": "x"})),
]


def _recs(n: int) -> Any:
    import numpy as np

    r = np.zeros(n, dtype=codec.struct_dtype("rec"))
    r["key"], r["value"], r["ttl_ms"] = np.arange(n) % 64, 8, 100
    return r


def _outcomes(c: ControlOps, pid: int) -> list[tuple[str, str, str]]:
    """Run STEPS; per step its outcome (ok or errno + extack) and the proxy's mode after it."""
    out = []
    for what, step in STEPS:
        try:
            step(c, pid)
            result = "ok"
        except NetlinkError as e:
            result = f"errno {e.errno}: {e.extack}"
        mode = codec.enum_name("mode", int(c.proxy(pid)["mode"]))
        out.append((what, result, mode))
    return out


def _schema(p: dict[str, Any]) -> dict[str, Any]:
    keys = ("name", "nkeys", "feature", "recommendation", "efficiency-scale", "share", "explore")
    return {k: p.get(k) for k in keys}


def test_the_stand_in_answers_requests_as_the_module_does(modules: Any) -> None:
    with Connection() as real:
        pid = int(real.proxy("sample")["id"])
        real.attach(pid)
        try:
            real_schema = _schema(real.proxy(pid))
            kernel_side = _outcomes(real, pid)
        finally:
            try:
                real.detach(pid)
            except NetlinkError:
                pass
    k = StandinKernel(seed=1)
    with k.open() as fake:
        fid = int(fake.proxy("sample")["id"])
        fake.attach(fid)
        fake_schema = _schema(fake.proxy(fid))
        stand_in = _outcomes(fake, fid)
    # ids may differ; the stand-in's messages must not
    assert fake_schema == real_schema
    for (what, r, m), (_, f, fm) in zip(kernel_side, stand_in):
        assert (f, fm) == (r, m), f"{what}: kernel said {r!r} (mode {m}), stand-in {f!r} (mode {fm})"
