"""A proxy's declared schema, as the kernel describes it in a ``get`` reply.

Strategies and the state machine are generated from this, so a test written
against the kit follows whatever the subsystem registered (feature names and
scales, the recommendation's safe bounds, the number of keys) without
restating it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kmlbus.contract import spec as kspec

__all__ = ["Field", "ProxySchema", "S32_MAX", "S32_MIN"]

S32_MIN, S32_MAX = -(1 << 31), (1 << 31) - 1


@dataclass(frozen=True)
class Field:
    """One declared value: a feature or the recommendation (``field`` attribute set)."""

    name: str
    scale: int
    min: int | None = None
    max: int | None = None

    @classmethod
    def from_attrs(cls, a: Mapping[str, Any]) -> Field:
        """From a decoded ``field`` nest (``min``/``max`` absent when undeclared)."""
        return cls(str(a["name"]), int(a.get("scale", 1)),
                   None if a.get("min") is None else int(a["min"]),
                   None if a.get("max") is None else int(a["max"]))

    def clamp(self, value: int) -> int:
        """*value* corrected into [min, max] as the kernel does for a recommendation."""
        lo = S32_MIN if self.min is None else self.min
        hi = S32_MAX if self.max is None else self.max
        return min(max(value, lo), hi)


@dataclass(frozen=True)
class ProxySchema:
    """What a registered proxy declared: its id and name, keys, features, recommendation."""

    id: int
    name: str
    nkeys: int
    features: tuple[Field, ...]
    recommendation: Field
    efficiency_scale: int

    @classmethod
    def from_get(cls, reply: Mapping[str, Any]) -> ProxySchema:
        """From a decoded ``get`` reply (``Connection.proxy(name)``)."""
        return cls(int(reply["id"]), str(reply["name"]), int(reply["nkeys"]),
                   tuple(Field.from_attrs(f) for f in reply.get("feature") or ()),
                   Field.from_attrs(reply["recommendation"]), int(reply.get("efficiency-scale", 1)))

    @property
    def max_features(self) -> int:
        """Features per telemetry record on the wire (the spec's ``max-features``)."""
        return int(kspec.load().consts["max-features"])
