"""Hypothesis strategies generated from a proxy's declared schema.

Everything comes from a :class:`~kmlbus.testing.schema.ProxySchema` (what the
kernel says the proxy declared) and the family spec (struct layouts, ttl and
batch limits, enums): feature vectors within their declared bounds,
recommendations whose values fall inside and outside the safe bounds,
recommendation batches the kernel must refuse, telemetry samples and
feedback records as numpy arrays of the spec's structs.  An author's tests
use them to feed a model, a dispatcher or the kernel itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from hypothesis import strategies as st

from kmlbus.contract import spec as kspec
from kmlbus.testing.schema import S32_MAX, S32_MIN, Field, ProxySchema
from kmlbus.wire import codec

__all__ = [
    "bad_recommendations",
    "feature_vectors",
    "feedback_records",
    "keys",
    "rec_values",
    "recommendations",
    "samples",
    "ttls",
]

Rec = tuple[int, int, int]  # (key, value, ttl-ms), a row of the spec's `rec` struct


def _max_ttl() -> int:
    return int(kspec.load().consts["max-ttl-ms"])


def _field_values(f: Field) -> st.SearchStrategy[int]:
    lo = S32_MIN if f.min is None else f.min
    hi = S32_MAX if f.max is None else f.max
    return st.integers(lo, hi)


def feature_vectors(schema: ProxySchema) -> st.SearchStrategy[list[int]]:
    """One decision's fixed-point features, one per declared feature, within declared bounds."""
    return st.tuples(*(_field_values(f) for f in schema.features)).map(list)


def keys(schema: ProxySchema) -> st.SearchStrategy[int]:
    """A valid recommendation-table key: 0 .. nkeys-1."""
    return st.integers(0, schema.nkeys - 1)


def rec_values(schema: ProxySchema, *, out_of_bounds: bool = True) -> st.SearchStrategy[int]:
    """A recommended value: inside [min, max] and (if *out_of_bounds*) beyond either bound."""
    r = schema.recommendation
    inside = _field_values(r)
    if not out_of_bounds:
        return inside
    outside: list[st.SearchStrategy[int]] = []
    if r.min is not None and r.min > S32_MIN:
        outside.append(st.integers(S32_MIN, r.min - 1))
    if r.max is not None and r.max < S32_MAX:
        outside.append(st.integers(r.max + 1, S32_MAX))
    return st.one_of(inside, *outside) if outside else inside


def ttls(*, low: int = 1, high: int | None = None) -> st.SearchStrategy[int]:
    """A valid ttl in ms: 1 .. the spec's max-ttl-ms (or the narrower *low*..*high*)."""
    return st.integers(max(1, low), min(_max_ttl(), high or _max_ttl()))


def recommendations(schema: ProxySchema, *, min_size: int = 1, max_size: int = 16,
                    ttl: st.SearchStrategy[int] | None = None, key: st.SearchStrategy[int] | None = None,
                    out_of_bounds: bool = True) -> st.SearchStrategy[list[Rec]]:
    """A batch the kernel must accept: valid keys (or *key*'s) and ttls; values may need clamping."""
    row = st.tuples(key if key is not None else keys(schema), rec_values(schema, out_of_bounds=out_of_bounds),
                    ttl if ttl is not None else ttls())
    return st.lists(row, min_size=min_size, max_size=max_size)


def bad_recommendations(schema: ProxySchema, *, max_size: int = 16) -> st.SearchStrategy[list[Rec]]:
    """A batch the kernel must refuse as a whole: at least one key >= nkeys or a ttl outside
    1..max-ttl-ms, placed anywhere among valid rows."""
    bad_key = st.tuples(st.integers(schema.nkeys, 0xFFFFFFFF), rec_values(schema), ttls())
    bad_ttl = st.tuples(keys(schema), rec_values(schema),
                        st.one_of(st.just(0), st.integers(_max_ttl() + 1, 0xFFFFFFFF)))
    good = st.tuples(keys(schema), rec_values(schema), ttls())
    return st.tuples(st.lists(good, max_size=max_size // 2), st.one_of(bad_key, bad_ttl),
                     st.lists(good, max_size=max_size // 2)).map(lambda t: [*t[0], t[1], *t[2]])


def samples(schema: ProxySchema, *, min_size: int = 1, max_size: int = 32
            ) -> st.SearchStrategy[npt.NDArray[Any]]:
    """Telemetry records (the spec's ``sample`` struct) as the kernel could send them for
    this proxy: increasing seq, valid keys, declared features, decisions within the
    recommendation's bounds, any arm and mode of the spec's enums."""
    sp = kspec.load()
    nmodes = len(sp.enums["mode"].entries)
    narms = len(sp.enums["arm"].entries)
    row = st.tuples(keys(schema), rec_values(schema, out_of_bounds=False), feature_vectors(schema),
                    st.integers(0, narms - 1), st.integers(0, nmodes - 1))

    def build(rows: list[tuple[int, int, list[int], int, int]]) -> npt.NDArray[Any]:
        out = np.zeros(len(rows), codec.struct_dtype("sample"))
        for i, (k, v, f, arm, mode) in enumerate(rows):
            out[i]["seq"], out[i]["key"], out[i]["decision"] = i + 1, k, v
            out[i]["arm"], out[i]["mode"] = arm, mode
            out[i]["features"][:len(f)] = f
        return out

    return st.lists(row, min_size=min_size, max_size=max_size).map(build)


def feedback_records(schema: ProxySchema, *, min_size: int = 1, max_size: int = 32
                     ) -> st.SearchStrategy[npt.NDArray[Any]]:
    """Feedback records (the spec's ``feedback`` struct): a decision's measured efficiency,
    anywhere within +-2x the proxy's efficiency scale."""
    sp = kspec.load()
    narms = len(sp.enums["arm"].entries)
    scale = schema.efficiency_scale
    row = st.tuples(keys(schema), rec_values(schema, out_of_bounds=False),
                    st.integers(-2 * scale, 2 * scale), st.integers(0, narms - 1))

    def build(rows: list[tuple[int, int, int, int]]) -> npt.NDArray[Any]:
        out = np.zeros(len(rows), codec.struct_dtype("feedback"))
        for i, (k, v, e, arm) in enumerate(rows):
            out[i]["seq"], out[i]["key"], out[i]["decision"] = i + 1, k, v
            out[i]["efficiency"], out[i]["arm"] = e, arm
        return out

    return st.lists(row, min_size=min_size, max_size=max_size).map(build)
