"""The bus configuration file (TOML) and its binding to a proxy's kernel schema.

The configuration says which ONNX model serves which proxy and how the
kernel's fixed-point numbers map to the model's float tensors::

    [bus]
    ttl_ms = 200               # freshness of every recommendation sent
    latency_budget_ms = 20     # a batch slower than this is a fault for the daemon
    trace = "bus.kmltrace"     # optional msgpack trace of every batch
    rate = 20000               # decisions/s of all proxies together: sizes the socket buffer
    rcvbuf = 33554432          # or the telemetry socket's receive buffer in bytes, as is

    [proxy.sample]
    model = "models/sample_good.onnx"     # relative to this file
    input = "features"                    # default: the model's first input
    output = "window"                     # default: the model's first output
    features = ["seq_ratio", "req_size"]  # default: every feature, schema order
    input_scale = { seq_ratio = 1000 }    # divisor; default: the schema's scale
    output_scale = 1                      # multiplier; default: the rec's scale
    learn = true                          # learn from feedback (default false)
    explore = 100                         # permille explored in learning (learn: 100)
    explore_spread = 0.25                 # explored values: model's +- 25% of the range
    learn_every_s = 5                     # refit at most this often
    learned_model = "learned.onnx"        # also write each learned model here
    learner = "tree"                      # model class learned: "linear" (default), "tree", "choice"
    sample_period = 16                    # kernel records 1 decision in 16 (default: left as is)
    efficiency = "reclaimed"              # status reading per arm: "mean" (default), "reclaimed", "class-match"

With ``learn = true`` a proxy needs no ``model``: in learning the bus
explores uniformly over the recommendation's range until the first fit.
``learner = "tree"`` learns a decision tree instead of a line (for decisions
far from linear, see :mod:`kmlbus.bus.treefit`) and explores over the
recommendation's range on a log scale: 0 or the minimum, then powers of two.
``learner = "choice"`` learns a tree that chooses among every value of a small
range (at most 65, such as a device's streams), exploring around the served value.
``efficiency`` only changes how ``kmlbus status`` shows each arm's mean
efficiency (see :mod:`kmlbus.bus.readings`), never what the policy compares.

The kernel, not the file, is the authority on what a proxy's features are:
:func:`bind` checks a :class:`ProxyConfig` against the :class:`ProxySchema`
the kernel reported and produces a :class:`Binding`, the small table the
dispatcher, the learner and the trace evaluator all convert numbers with.
Every error is one line naming the file, the key, what was expected and what
was found.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmlbus.contract import spec as _spec
from kmlbus.bus import sockbuf

__all__ = [
    "Binding",
    "BusConfig",
    "Config",
    "ConfigError",
    "EFFICIENCY_READINGS",
    "FieldSchema",
    "LEARNERS",
    "ProxyConfig",
    "ProxySchema",
    "bind",
    "load",
    "loads",
]

_INT32_MIN = -(1 << 31)
_INT32_MAX = (1 << 31) - 1


class ConfigError(ValueError):
    """The configuration file is unreadable, malformed or does not fit a proxy."""


# --------------------------------------------------------------------------
# What the kernel reports about a proxy (decoded `get` reply).


@dataclass(frozen=True)
class FieldSchema:
    """One fixed-point field: real value = raw / scale, within [min, max] if given."""

    name: str
    scale: int
    min: int | None = None
    max: int | None = None


@dataclass(frozen=True)
class ProxySchema:
    """A proxy's schemas as the kernel reports them in a ``get`` reply."""

    name: str
    features: tuple[FieldSchema, ...]
    recommendation: FieldSchema
    nkeys: int
    efficiency_scale: int = 1000
    id: int = 0

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> ProxySchema:
        """Build from a decoded ``get``/dump reply (``kmlbus.wire.netlink`` dict).

        Raises :class:`ConfigError` if an attribute the bus needs is absent,
        because a model cannot be checked against a schema it never saw.
        """
        name = str(attrs.get("name", f"#{attrs.get('id', '?')}"))
        for key in ("feature", "recommendation", "nkeys"):
            if key not in attrs:
                raise ConfigError(f"proxy {name}: kernel reply lacks attribute '{key}'")
        feats = attrs["feature"]
        if isinstance(feats, Mapping):  # a single multi-attr decoded as one dict
            feats = [feats]
        return cls(
            name=name,
            features=tuple(_field(name, f) for f in feats),
            recommendation=_field(name, attrs["recommendation"]),
            nkeys=int(attrs["nkeys"]),
            efficiency_scale=int(attrs.get("efficiency-scale", 1000)) or 1000,
            id=int(attrs.get("id", 0)),
        )

    def to_attrs(self) -> dict[str, Any]:
        """The inverse of :meth:`from_attrs` (used to store schemas in traces)."""

        def f(x: FieldSchema) -> dict[str, Any]:
            d: dict[str, Any] = {"name": x.name, "scale": x.scale}
            if x.min is not None:
                d["min"] = x.min
            if x.max is not None:
                d["max"] = x.max
            return d

        return {
            "id": self.id,
            "name": self.name,
            "feature": [f(x) for x in self.features],
            "recommendation": f(self.recommendation),
            "nkeys": self.nkeys,
            "efficiency-scale": self.efficiency_scale,
        }


def _field(proxy: str, raw: Any) -> FieldSchema:
    if not isinstance(raw, Mapping) or "name" not in raw:
        raise ConfigError(f"proxy {proxy}: field schema without a name: {raw!r}")
    scale = int(raw.get("scale", 1)) or 1
    lo = raw.get("min")
    hi = raw.get("max")
    return FieldSchema(str(raw["name"]), scale,
                       None if lo is None else int(lo), None if hi is None else int(hi))


# --------------------------------------------------------------------------
# The configuration file.


@dataclass(frozen=True)
class BusConfig:
    """The ``[bus]`` table."""

    ttl_ms: int = 200
    latency_budget_ms: float = 50.0
    trace: Path | None = None
    #: decisions per second of all the bus's proxies together (sizes the receive buffer)
    rate: int = 20000
    #: the telemetry socket's receive buffer in bytes; None: computed from :attr:`rate`
    rcvbuf: int | None = None

    def receive_buffer(self) -> int:
        """``SO_RCVBUF`` of the telemetry socket: :attr:`rcvbuf`, else sized for :attr:`rate`."""
        return self.rcvbuf if self.rcvbuf is not None else sockbuf.receive_buffer(self.rate)


@dataclass(frozen=True)
class ProxyConfig:
    """One ``[proxy.<name>]`` table (paths already resolved against the file)."""

    name: str
    model: Path | None = None
    input: str | None = None
    output: str | None = None
    features: tuple[str, ...] | None = None
    #: per-feature divisor overrides (feature name -> divisor)
    input_scale: Mapping[str, float] = field(default_factory=dict)
    #: one divisor for every feature (``input_scale = 1000``), per-feature wins
    input_scale_all: float | None = None
    output_scale: float | None = None
    ttl_ms: int | None = None
    #: learn from feedback in the modes whose duty is to learn (``learn = true``)
    learn: bool = False
    #: exploration share (permille) the kernel gets in learning; None: the graph's
    #: ``exploration_share``, or :data:`DEFAULT_LEARN_EXPLORE` when ``learn`` is on
    explore: int | None = None
    #: how far explored recommendations stray from the model's, as a fraction of the
    #: recommendation's range (without a model yet: uniform over the range)
    explore_spread: float = 0.25
    #: seconds between refits of the learned model
    learn_every_s: float = 5.0
    #: where each learned model is also written (atomically), so a restart keeps it
    learned_model: Path | None = None
    #: the model class learned: one of :data:`LEARNERS`
    learner: str = "linear"
    #: the kernel records one decision in this many as a sample (set when the daemon
    #: adopts the proxy); None leaves the kernel's value as it is
    sample_period: int | None = None
    #: how ``kmlbus status`` reads each arm's mean efficiency: one of :data:`EFFICIENCY_READINGS`
    efficiency: str = "mean"

    def explore_share(self, graph_default: int) -> int:
        """The ``explore`` permille to give the kernel for this proxy."""
        if self.explore is not None:
            return self.explore
        return DEFAULT_LEARN_EXPLORE if self.learn and graph_default == 0 else graph_default


#: Model classes the bus can learn (``learner = ...``): a line; a tree over log-spaced
#: decisions (:mod:`kmlbus.bus.treefit`, e.g. readahead windows); a tree choosing among every
#: value of a small range (:mod:`kmlbus.bus.placefit`, e.g. kmlbus-lsd's streams).
LEARNERS = ("linear", "tree", "choice")

#: Readings of a proxy's per-arm efficiency (``efficiency = ...``, :mod:`kmlbus.bus.readings`):
#: the plain mean; cleaning WA = 1 / mean freed share; mean class error of a choice.
EFFICIENCY_READINGS = ("mean", "reclaimed", "class-match")

#: Exploration share (permille) of a learning proxy whose config does not say:
#: without explored decisions the learner can only reproduce the default.
DEFAULT_LEARN_EXPLORE = 100


@dataclass(frozen=True)
class Config:
    """A whole configuration file."""

    bus: BusConfig = field(default_factory=BusConfig)
    proxies: Mapping[str, ProxyConfig] = field(default_factory=dict)
    path: Path | None = None


_BUS_KEYS = {"ttl_ms", "latency_budget_ms", "trace", "rate", "rcvbuf"}
_PROXY_KEYS = {"model", "input", "output", "features", "input_scale", "output_scale", "ttl_ms",
               "learn", "explore", "explore_spread", "learn_every_s", "learned_model", "learner",
               "sample_period", "efficiency"}


class _Where:
    """Formats ``file: key: expected X, found Y`` messages."""

    def __init__(self, path: Path | None) -> None:
        self.file = str(path) if path is not None else "<config>"

    def err(self, key: str, expected: str, found: Any) -> ConfigError:
        shown = f"{type(found).__name__} {found!r}" if found is not None else "nothing"
        return ConfigError(f"{self.file}: {key}: expected {expected}, found {shown}")

    def unknown(self, table: str, key: str, allowed: set[str]) -> ConfigError:
        return ConfigError(f"{self.file}: {table}.{key}: unknown key "
                           f"(expected one of {', '.join(sorted(allowed))})")


def _max_ttl() -> int:
    return _spec.load().consts.get("max-ttl-ms", 60000)


def _ttl(w: _Where, key: str, v: Any) -> int:
    hi = _max_ttl()
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
        raise w.err(key, f"an integer in 1..{hi} (milliseconds)", v)
    return v


def _positive(w: _Where, key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise w.err(key, "a positive number", v)
    return float(v)


def _int_in(w: _Where, key: str, v: Any, lo: int, hi: int, unit: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise w.err(key, f"an integer in {lo}..{hi} ({unit})", v)
    return v


def _name(w: _Where, key: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise w.err(key, "a non-empty string", v)
    return v


def _path(w: _Where, key: str, v: Any, base: Path) -> Path:
    p = Path(_name(w, key, v)).expanduser()
    return p if p.is_absolute() else base / p


def loads(text: str, path: Path | None = None) -> Config:
    """Parse configuration *text*; relative paths resolve against *path*'s folder."""
    w = _Where(path)
    base = path.parent if path is not None else Path.cwd()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{w.file}: not valid TOML: {e}") from None

    for key in raw:
        if key not in ("bus", "proxy"):
            raise ConfigError(f"{w.file}: {key}: unknown table "
                              "(expected [bus] or [proxy.<name>])")

    bus_raw = raw.get("bus", {})
    if not isinstance(bus_raw, dict):
        raise w.err("bus", "a table", bus_raw)
    for key in bus_raw:
        if key not in _BUS_KEYS:
            raise w.unknown("bus", key, _BUS_KEYS)
    bus = BusConfig(
        ttl_ms=_ttl(w, "bus.ttl_ms", bus_raw["ttl_ms"]) if "ttl_ms" in bus_raw else 200,
        latency_budget_ms=(_positive(w, "bus.latency_budget_ms", bus_raw["latency_budget_ms"])
                           if "latency_budget_ms" in bus_raw else 50.0),
        trace=_path(w, "bus.trace", bus_raw["trace"], base) if "trace" in bus_raw else None,
        rate=(_int_in(w, "bus.rate", bus_raw["rate"], 1, 100_000_000, "decisions per second")
              if "rate" in bus_raw else 20000),
        rcvbuf=(_int_in(w, "bus.rcvbuf", bus_raw["rcvbuf"], 64 << 10, sockbuf.MAX_RCVBUF, "bytes")
                if "rcvbuf" in bus_raw else None),
    )

    proxies_raw = raw.get("proxy", {})
    if not isinstance(proxies_raw, dict):
        raise w.err("proxy", "tables [proxy.<name>]", proxies_raw)
    proxies: dict[str, ProxyConfig] = {}
    for name, t in proxies_raw.items():
        proxies[name] = _proxy(w, name, t, base)
    return Config(bus=bus, proxies=proxies, path=path)


def _proxy(w: _Where, name: str, t: Any, base: Path) -> ProxyConfig:
    pre = f"proxy.{name}"
    if not isinstance(t, dict):
        raise w.err(pre, "a table", t)
    for key in t:
        if key not in _PROXY_KEYS:
            raise w.unknown(pre, key, _PROXY_KEYS)
    model = _path(w, f"{pre}.model", t["model"], base) if "model" in t else None
    inp = _name(w, f"{pre}.input", t["input"]) if "input" in t else None
    out = _name(w, f"{pre}.output", t["output"]) if "output" in t else None

    features: tuple[str, ...] | None = None
    if "features" in t:
        fl = t["features"]
        if (not isinstance(fl, list) or not fl
                or not all(isinstance(x, str) and x for x in fl)):
            raise w.err(f"{pre}.features", "a non-empty list of feature names", fl)
        if len(set(fl)) != len(fl):
            raise w.err(f"{pre}.features", "distinct feature names", fl)
        features = tuple(fl)

    per: dict[str, float] = {}
    scale_all: float | None = None
    if "input_scale" in t:
        s = t["input_scale"]
        if isinstance(s, dict):
            for fname, v in s.items():
                per[fname] = _positive(w, f"{pre}.input_scale.{fname}", v)
        else:
            try:
                scale_all = _positive(w, f"{pre}.input_scale", s)
            except ConfigError:
                raise w.err(f"{pre}.input_scale",
                            "a positive number or a table {feature = divisor}", s) from None
    out_scale = (_positive(w, f"{pre}.output_scale", t["output_scale"])
                 if "output_scale" in t else None)
    ttl = _ttl(w, f"{pre}.ttl_ms", t["ttl_ms"]) if "ttl_ms" in t else None
    learn = t.get("learn", False)
    if not isinstance(learn, bool):
        raise w.err(f"{pre}.learn", "true or false", learn)
    explore = t.get("explore")
    permille = _spec.load().consts.get("permille", 1000)
    if explore is not None and (isinstance(explore, bool) or not isinstance(explore, int)
                                or not 0 <= explore <= permille):
        raise w.err(f"{pre}.explore", f"an integer in 0..{permille} (permille)", explore)
    spread = t.get("explore_spread", ProxyConfig.explore_spread)
    if (isinstance(spread, bool) or not isinstance(spread, (int, float))
            or not 0 < spread <= 1):
        raise w.err(f"{pre}.explore_spread", "a number in (0, 1] (fraction of the range)", spread)
    every = (_positive(w, f"{pre}.learn_every_s", t["learn_every_s"])
             if "learn_every_s" in t else ProxyConfig.learn_every_s)
    saved = (_path(w, f"{pre}.learned_model", t["learned_model"], base)
             if "learned_model" in t else None)
    if saved is not None and model is not None and saved == model:
        raise w.err(f"{pre}.learned_model", "a file other than the configured model "
                    "(the bus never overwrites the model you gave it)", str(saved))
    learner = t.get("learner", ProxyConfig.learner)
    if learner not in LEARNERS:
        raise w.err(f"{pre}.learner", ", ".join(f'"{n}"' for n in LEARNERS), learner)
    eff = t.get("efficiency", ProxyConfig.efficiency)
    if eff not in EFFICIENCY_READINGS:
        raise w.err(f"{pre}.efficiency", ", ".join(f'"{n}"' for n in EFFICIENCY_READINGS), eff)
    return ProxyConfig(name, model, inp, out, features, per, scale_all, out_scale, ttl,
                       learn, explore, float(spread), every, saved, learner,
                       _sample_period(w, f"{pre}.sample_period", t.get("sample_period")), eff)


def _sample_period(w: _Where, key: str, v: Any) -> int | None:
    """``sample_period``: an integer in 1..max-sample-period (the kernel's bound), or absent."""
    top = int(_spec.load().consts["max-sample-period"])
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top):
        raise w.err(key, f"an integer in 1..{top} (one decision in N recorded)", v)
    return v


def load(path: str | Path) -> Config:
    """Read and check the configuration file at *path*."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the configuration: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: expected UTF-8 TOML text, found undecodable bytes") from None
    return loads(text, p.resolve())


# --------------------------------------------------------------------------
# Binding a proxy's configuration to its kernel schema.


@dataclass(frozen=True)
class Binding:
    """How one proxy's fixed-point numbers map to and from its model's tensors.

    ``features_float = sample.features[:, columns] / divisors`` and
    ``rec.value = clamp(round(model_output * out_scale), rec_min, rec_max)``.
    """

    proxy: str
    schema: ProxySchema
    columns: tuple[int, ...]
    divisors: tuple[float, ...]
    out_scale: float
    rec_min: int
    rec_max: int
    ttl_ms: int
    model: Path | None = None
    input_name: str | None = None
    output_name: str | None = None

    @property
    def n_features(self) -> int:
        """Width of the model's input tensor."""
        return len(self.columns)

    @property
    def bounded(self) -> bool:
        """Whether the recommendation has a real range on both sides (not int32's limits,
        which is what a field without min/max gets)."""
        return _INT32_MIN < self.rec_min and self.rec_max < _INT32_MAX

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(self.schema.features[c].name for c in self.columns)


def bind(schema: ProxySchema, proxy: ProxyConfig | None = None,
         bus: BusConfig | None = None, *, path: Path | None = None) -> Binding:
    """Check *proxy* (may be None: all defaults) against *schema*; build the :class:`Binding`.

    Raises :class:`ConfigError` when the configuration names a feature the
    kernel does not report, or when the schema itself is unusable.
    """
    w = _Where(path)
    bus = bus or BusConfig()
    pre = f"proxy.{schema.name}"
    max_feat = _spec.load().consts.get("max-features", 8)
    if not schema.features or len(schema.features) > max_feat:
        raise ConfigError(f"proxy {schema.name}: kernel reports {len(schema.features)} features, "
                          f"expected 1..{max_feat}")
    names = [f.name for f in schema.features]
    wanted = proxy.features if proxy is not None and proxy.features is not None else tuple(names)
    columns = []
    for fname in wanted:
        if fname not in names:
            raise w.err(f"{pre}.features", f"features of proxy {schema.name} "
                        f"({', '.join(names)})", fname)
        columns.append(names.index(fname))
    per = dict(proxy.input_scale) if proxy is not None else {}
    for fname in per:
        if fname not in wanted:
            raise w.err(f"{pre}.input_scale", f"one of the fed features ({', '.join(wanted)})",
                        fname)
    divisors = []
    for c in columns:
        f = schema.features[c]
        if f.name in per:
            divisors.append(per[f.name])
        elif proxy is not None and proxy.input_scale_all is not None:
            divisors.append(proxy.input_scale_all)
        else:
            divisors.append(float(f.scale))
    rec = schema.recommendation
    out_scale = (proxy.output_scale if proxy is not None and proxy.output_scale is not None
                 else float(rec.scale))
    lo = _INT32_MIN if rec.min is None else rec.min
    hi = _INT32_MAX if rec.max is None else rec.max
    if lo > hi:
        raise ConfigError(f"proxy {schema.name}: recommendation {rec.name} has min {lo} > max {hi}")
    ttl = proxy.ttl_ms if proxy is not None and proxy.ttl_ms is not None else bus.ttl_ms
    return Binding(
        proxy=schema.name, schema=schema, columns=tuple(columns), divisors=tuple(divisors),
        out_scale=out_scale, rec_min=lo, rec_max=hi, ttl_ms=ttl,
        model=proxy.model if proxy is not None else None,
        input_name=proxy.input if proxy is not None else None,
        output_name=proxy.output if proxy is not None else None,
    )
