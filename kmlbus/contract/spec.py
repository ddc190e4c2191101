"""Load the kmlbus family spec (``kmlbus/contract/kmlbus.yaml``) into typed tables.

The spec is the one wire contract shared by the kernel and the bus: the C
generator (:mod:`kmlbus.contract.cgen`) and the Python codec both read it
through this module, so numbering rules live in exactly one place.  It needs only
PyYAML: the generator runs without numpy.

Numbering follows YNL: attributes count from 1 in each set, operations count
from 1 in list order, enum entries from 0, flag entries are bit positions.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: libyaml's safe loader where PyYAML was built with it: it parses the family spec about 7x
#: faster than the pure-Python one (9 vs 68 ms on the host, about 2 s less at every Python start
#: that reads the spec in a TCG guest); the same documents give the same objects.
SAFE_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

__all__ = [
    "Attr",
    "AttrSet",
    "Enum",
    "Member",
    "Op",
    "Spec",
    "SpecError",
    "StructDef",
    "load",
    "spec_path",
]

#: ``struct`` module codes for YNL scalar member types (host byte order).
_STRUCT_FMT = {
    "u8": "B", "u16": "H", "u32": "I", "u64": "Q",
    "s8": "b", "s16": "h", "s32": "i", "s64": "q",
}


class SpecError(ValueError):
    """The spec file is malformed or inconsistent."""


@dataclass(frozen=True)
class Enum:
    """An ``enum`` or ``flags`` definition: names and their wire values."""

    name: str
    is_flags: bool
    entries: tuple[str, ...]
    doc: str = ""

    def value(self, entry: str) -> int:
        """Wire value of *entry* (a bit for flags)."""
        i = self.entries.index(entry)
        return 1 << i if self.is_flags else i

    def name_of(self, value: int) -> str:
        """Entry name for a wire value (enums only)."""
        if self.is_flags or not 0 <= value < len(self.entries):
            raise SpecError(f"{self.name}: no entry for value {value}")
        return self.entries[value]


@dataclass(frozen=True)
class Member:
    """One struct member: a scalar, or a fixed-length binary/array."""

    name: str
    type: str
    len: int = 0
    #: element type of an array member: the one scalar type of the struct it names
    sub_type: str = ""
    enum: str = ""
    doc: str = ""
    #: the struct a binary member holds (YNL's ``struct``); an array when that struct
    #: is all of one scalar type (``sub_type``)
    struct: str = ""

    @property
    def size(self) -> int:
        """Size in bytes."""
        if self.type == "binary":
            return self.len
        return struct.calcsize(_STRUCT_FMT[self.type])

    @property
    def count(self) -> int:
        """Elements in an array member (``sub-type``), else 0."""
        if self.sub_type:
            return self.len // struct.calcsize(_STRUCT_FMT[self.sub_type])
        return 0


@dataclass(frozen=True)
class StructDef:
    """A packed C struct (no implicit padding: the spec pads explicitly)."""

    name: str
    members: tuple[Member, ...]
    doc: str = ""

    @property
    def size(self) -> int:
        """sizeof() of the packed struct."""
        return sum(m.size for m in self.members)


@dataclass(frozen=True)
class Attr:
    """One attribute of a set, with its YNL type and checks."""

    name: str
    value: int
    type: str
    enum: str = ""
    nested: str = ""
    struct: str = ""
    multi: bool = False
    checks: dict[str, int] = field(default_factory=dict)
    doc: str = ""


@dataclass(frozen=True)
class AttrSet:
    """A named attribute set; ``by_name`` and ``by_value`` index it."""

    name: str
    attrs: tuple[Attr, ...]

    @functools.cached_property
    def by_name(self) -> dict[str, Attr]:
        return {a.name: a for a in self.attrs}

    @functools.cached_property
    def by_value(self) -> dict[int, Attr]:
        return {a.value: a for a in self.attrs}

    @property
    def max_value(self) -> int:
        return max(a.value for a in self.attrs)


@dataclass(frozen=True)
class Op:
    """An operation: a request (do/dump) or a multicast event."""

    name: str
    value: int
    attr_set: str
    admin: bool
    do_request: tuple[str, ...] | None
    do_reply: tuple[str, ...] | None
    dump_reply: tuple[str, ...] | None
    event: tuple[str, ...] | None
    mcgrp: str
    doc: str = ""


@dataclass(frozen=True)
class Spec:
    """The whole family: consts, enums, structs, attribute sets, ops, groups."""

    name: str
    version: int
    consts: dict[str, int]
    enums: dict[str, Enum]
    structs: dict[str, StructDef]
    attr_sets: dict[str, AttrSet]
    ops: tuple[Op, ...]
    mcast_groups: tuple[str, ...]
    doc: str
    path: Path
    #: each multicast group's ``flags`` (YNL: ``admin-perm`` = joining needs CAP_NET_ADMIN)
    mcast_flags: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @functools.cached_property
    def op_by_name(self) -> dict[str, Op]:
        return {o.name: o for o in self.ops}

    @functools.cached_property
    def op_by_value(self) -> dict[int, Op]:
        return {o.value: o for o in self.ops}

    def op(self, name: str) -> Op:
        """The operation *name*, or a :class:`SpecError` naming the ones there are."""
        o = self.op_by_name.get(name)
        if o is None:
            raise SpecError(f"no operation {name!r}; the spec has {[x.name for x in self.ops]}")
        return o

    @property
    def array_structs(self) -> frozenset[str]:
        """Structs that only describe the elements of an array member (C has the array)."""
        return frozenset(m.struct for sd in self.structs.values() for m in sd.members if m.sub_type)

    def struct_format(self, name: str) -> str:
        """``struct`` module format of a spec struct (native order, no padding)."""
        out = "="
        for m in self.structs[name].members:
            if m.type in _STRUCT_FMT:
                out += _STRUCT_FMT[m.type]
            elif m.sub_type:
                out += "%d%s" % (m.count, _STRUCT_FMT[m.sub_type])
            else:
                out += "%ds" % m.len
        if struct.calcsize(out) != self.structs[name].size:
            raise SpecError(f"struct {name}: format {out} size mismatch")
        return out


def spec_path() -> Path:
    """Where the family spec is: beside this module, in the source tree and in the wheel alike."""
    path = Path(__file__).resolve().parent / "kmlbus.yaml"
    if not path.is_file():
        raise SpecError(f"{path} is missing; the kmlbus package is incomplete: reinstall it")
    return path


def _names(block: dict[str, Any] | None) -> tuple[str, ...] | None:
    if block is None:
        return None
    return tuple(block.get("attributes", []))


def _parse(raw: dict[str, Any], path: Path) -> Spec:
    consts: dict[str, int] = {}
    enums: dict[str, Enum] = {}
    structs: dict[str, StructDef] = {}
    for d in raw.get("definitions", []):
        kind = d["type"]
        if kind == "const":
            consts[d["name"]] = int(d["value"])
        elif kind in ("enum", "flags"):
            enums[d["name"]] = Enum(d["name"], kind == "flags", tuple(d["entries"]), d.get("doc", ""))
        elif kind == "struct":
            members = tuple(
                Member(m["name"], m["type"], int(m.get("len", 0)), "", m.get("enum", ""),
                       m.get("doc", ""), m.get("struct", ""))
                for m in d["members"]
            )
            for m in members:
                if m.type == "binary" and m.len <= 0:
                    raise SpecError(f"struct {d['name']}.{m.name}: binary member needs len")
                if m.type not in _STRUCT_FMT and m.type != "binary":
                    raise SpecError(f"struct {d['name']}.{m.name}: unsupported type {m.type}")
            structs[d["name"]] = StructDef(d["name"], members, d.get("doc", ""))
        else:
            raise SpecError(f"definition {d.get('name')}: unknown type {kind}")
    for name, sd in structs.items():
        structs[name] = dataclasses.replace(sd, members=tuple(
            _array_member(name, m, structs) if m.struct else m for m in sd.members))

    sets: dict[str, AttrSet] = {}
    for s in raw["attribute-sets"]:
        attrs = []
        for i, a in enumerate(s["attributes"], start=1):
            value = int(a.get("value", i))
            attrs.append(Attr(
                a["name"], value, a["type"], a.get("enum", ""), a.get("nested-attributes", ""),
                a.get("struct", ""), bool(a.get("multi-attr", False)),
                {k: int(v) for k, v in a.get("checks", {}).items()}, a.get("doc", ""),
            ))
        sets[s["name"]] = AttrSet(s["name"], tuple(attrs))

    ops = []
    for i, o in enumerate(raw["operations"]["list"], start=1):
        do = o.get("do")
        dump = o.get("dump")
        ops.append(Op(
            o["name"], int(o.get("value", i)), o["attribute-set"],
            "admin-perm" in o.get("flags", []),
            _names(do.get("request")) if do else None,
            _names(do.get("reply")) if do else None,
            _names(dump.get("reply")) if dump else None,
            _names(o.get("event")),
            o.get("mcgrp", ""), o.get("doc", ""),
        ))
    spec = Spec(
        raw["name"], int(raw.get("version", 1)), consts, enums, structs, sets, tuple(ops),
        tuple(g["name"] for g in raw["mcast-groups"]["list"]), raw.get("doc", ""), path,
        {g["name"]: tuple(g.get("flags", ())) for g in raw["mcast-groups"]["list"]},
    )
    _check(spec)
    return spec


def _array_member(owner: str, m: Member, structs: dict[str, StructDef]) -> Member:
    """A binary member naming a struct of one scalar type: an array of that type.

    That is how the genetlink-legacy schema lets a spec say "packed array" (it has
    no sub-type for struct members); other nested structs are not used by kmlbus.
    """
    inner = structs.get(m.struct)
    where = f"struct {owner}.{m.name}"
    if inner is None:
        raise SpecError(f"{where}: unknown struct {m.struct}")
    types = {x.type for x in inner.members}
    if m.type != "binary" or len(types) != 1 or not types <= set(_STRUCT_FMT):
        raise SpecError(f"{where}: expected a binary member naming a struct of one scalar type, "
                        f"found {m.type} naming {m.struct} of {sorted(types)}")
    if m.len != inner.size:
        raise SpecError(f"{where}: len {m.len} differs from the {inner.size} bytes of struct {m.struct}")
    return dataclasses.replace(m, sub_type=types.pop())


def _check(spec: Spec) -> None:
    """Cross-references must resolve; a typo in the spec fails loudly here."""
    for s in spec.attr_sets.values():
        for a in s.attrs:
            if a.enum and a.enum not in spec.enums:
                raise SpecError(f"{s.name}.{a.name}: unknown enum {a.enum}")
            if a.nested and a.nested not in spec.attr_sets:
                raise SpecError(f"{s.name}.{a.name}: unknown set {a.nested}")
            if a.struct and a.struct not in spec.structs:
                raise SpecError(f"{s.name}.{a.name}: unknown struct {a.struct}")
    for o in spec.ops:
        aset = spec.attr_sets[o.attr_set]
        for names in (o.do_request, o.do_reply, o.dump_reply, o.event):
            for n in names or ():
                if n not in aset.by_name:
                    raise SpecError(f"op {o.name}: unknown attribute {n} in set {aset.name}")
        if o.mcgrp and o.mcgrp not in spec.mcast_groups:
            raise SpecError(f"op {o.name}: unknown mcast group {o.mcgrp}")


@functools.lru_cache(maxsize=None)
def load(path: Path | None = None) -> Spec:
    """Parse and check the family spec (cached; the default path is :func:`spec_path`)."""
    p = path or spec_path()
    with open(p, encoding="utf-8") as f:
        raw = yaml.load(f, Loader=SAFE_LOADER)
    return _parse(raw, p)
