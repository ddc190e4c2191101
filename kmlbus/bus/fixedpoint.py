"""Fixed point <-> model units for one binding: features in, recommendations out.

The kernel speaks integers with a per-field scale; models speak float32 in real
units.  The dispatcher (hot path), the learner and the offline evaluator all
convert through these functions, so the rounding rules live in one place.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kmlbus.bus.config import Binding
from kmlbus.contract import spec as _spec

__all__ = ["Conversion", "SMALL_BATCH", "conversion", "features_to_float", "sample_rows", "to_fixed",
           "to_fixed_lazy"]


@functools.lru_cache(maxsize=None)
def sample_rows(stride: int = 0) -> tuple[struct.Struct, int, int, int]:
    """``struct`` of one ``sample`` (from the spec) and the positions of ``seq``, ``key``
    and the first feature in the tuple it unpacks to.

    With *stride*, rows are that many bytes apart and each sample ends its row (a
    decoded batch: every sample behind its 4-byte attribute header), so the
    ``struct`` skips the bytes before it."""
    sp = _spec.load()
    at: dict[str, int] = {}
    pos = 0
    for m in sp.structs["sample"].members:
        at[m.name] = pos
        pos += m.count if m.sub_type else 1
    fmt = sp.struct_format("sample")
    lead = stride - struct.calcsize(fmt) if stride else 0
    if lead < 0:
        raise ValueError(f"sample rows {stride} bytes apart cannot hold a {struct.calcsize(fmt)}-byte sample")
    return struct.Struct(fmt[0] + ("%dx" % lead if lead else "") + fmt[1:]), at["seq"], at["key"], at["features"]


#: Batches up to this many records take the pure-Python path (:meth:`Dispatcher._handle_small`):
#: a kernel batch is at most 32 records, and a few dict operations per record cost
#: less than the numpy calls of the general path (each tens of microseconds under
#: emulation, hundreds once their code has gone cold between two batches).
SMALL_BATCH = 64


@dataclass(frozen=True)
class Conversion:
    """A binding's conversion constants as arrays, built once per binding."""

    binding: Binding
    cols: npt.NDArray[np.intp] | slice  # a slice when the columns are 0..n-1 in order
    div: npt.NDArray[np.float64]
    #: a divisor so small that a feature / divisor may overflow float32 (then the
    #: overflow warning is silenced: the model sees inf)
    tiny: bool
    #: (position in an unpacked ``sample`` tuple, divisor) of each model input, in order
    pairs: tuple[tuple[int, float], ...]
    #: every divisor is non-zero: plain Python division gives what numpy's does
    nonzero: bool


_CONVERSIONS: dict[int, Conversion] = {}


def conversion(binding: Binding) -> Conversion:
    c = _CONVERSIONS.get(id(binding))
    if c is None or c.binding is not binding:
        n = len(binding.columns)
        cols: npt.NDArray[np.intp] | slice = (
            slice(0, n) if binding.columns == tuple(range(n))
            else np.asarray(binding.columns, dtype=np.intp))
        div = np.asarray(binding.divisors, dtype=np.float64)
        f0 = sample_rows()[3]
        c = Conversion(binding, cols, div, bool((np.abs(div) < 1e-28).any()),
                  tuple((f0 + col, float(d)) for col, d in zip(binding.columns, binding.divisors)),
                  all(d != 0 for d in binding.divisors))
        if len(_CONVERSIONS) > 256:  # bindings are few; forget them all rather than grow
            _CONVERSIONS.clear()
        _CONVERSIONS[id(binding)] = c
    return c


def features_to_float(records: npt.NDArray[np.void], binding: Binding) -> npt.NDArray[np.float32]:
    """``records.features[:, columns] / divisors`` as float32 [N, n_features].

    The division is done in float64 and rounded once to float32.  One ufunc
    call per batch: under emulation every numpy call costs tens of
    microseconds, so the hot path counts them.
    """
    c = conversion(binding)
    return _divide(records["features"][:, c.cols], c)


def _divide(raw: npt.NDArray[np.int32], c: Conversion) -> npt.NDArray[np.float32]:
    out = np.empty(raw.shape, dtype=np.float32)
    if c.tiny:
        with np.errstate(over="ignore"):  # a silly divisor gives inf; the model sees it
            np.divide(raw, c.div, out=out, dtype=np.float64, casting="unsafe")
    else:  # |int32| / 1e-28 < 3.4e38: no overflow possible, and errstate costs a few us
        np.divide(raw, c.div, out=out, dtype=np.float64, casting="unsafe")
    return out


def to_fixed(values: npt.NDArray[np.floating], binding: Binding
             ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Model output (real units) -> clamped fixed point.

    Returns ``(fixed int32, clamped mask, valid mask)``; NaN rows are invalid
    (their fixed value is meaningless).  Rounding is half-to-even (``np.rint``).
    """
    fixed, clamped, valid = to_fixed_lazy(values, binding)
    return fixed, clamped, np.ones(len(fixed), dtype=bool) if valid is None else valid


def to_fixed_lazy(values: npt.NDArray[np.floating], binding: Binding
              ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.bool_], npt.NDArray[np.bool_] | None]:
    """:func:`to_fixed` with ``valid`` None when every row is valid (the usual case)."""
    v = np.multiply(values, binding.out_scale, dtype=np.float64)
    np.rint(v, out=v)
    if 0 < len(v) <= SMALL_BATCH:
        lo, hi = binding.rec_min, binding.rec_max
        # the usual case, all in range (a NaN compares False), checked without a reduction
        if all(lo <= x <= hi for x in v.tolist()):
            return v.astype(np.int32), np.zeros(len(v), dtype=bool), None
    valid: npt.NDArray[np.bool_] | None = None
    nan = np.isnan(v)
    if nan.any():
        valid = ~nan
        v[nan] = float(binding.rec_min)
    c = np.minimum(v, float(binding.rec_max))
    np.maximum(c, float(binding.rec_min), out=c)
    clamped = c != v
    if valid is not None:
        clamped &= valid
    return c.astype(np.int32), clamped, valid
