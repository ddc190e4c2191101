"""One ONNX Runtime session per proxy, checked against the proxy's schema, hot-swappable.

The registry answers one question for the dispatcher: "give me the model of
proxy X". A model is only ever installed after it loaded *and* passed the
contract check against the kernel's schema (input float32 [N, n_features],
output float32 [N, 1] or [N]) *and* a probe inference; so a swap is atomic:
the new session is complete before the reference to it replaces the old one,
and a bad new file leaves the old model running.  A proxy whose model never
loaded has no model; the daemon keeps it in emergency while the other proxies
run, and :meth:`ModelRegistry.poll` retries when the file changes.

Sessions use the CPU provider with one intra-op and one inter-op thread: the
batches are small (<= 1024 rows) and the bus must not compete with the
kernel workload it serves for every core.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from .config import Binding, Config, ConfigError, ProxySchema, bind

__all__ = [
    "LoadedModel",
    "ModelContractError",
    "ModelError",
    "ModelLoadError",
    "ModelRegistry",
    "ModelRuntimeError",
    "NoModelError",
    "Reload",
    "UnknownProxyError",
    "bind_all",
    "check_session",
    "make_session",
]

log = logging.getLogger(__name__)


class ModelError(Exception):
    """Base of every model problem; ``.proxy`` names the proxy concerned."""

    def __init__(self, proxy: str, message: str) -> None:
        super().__init__(message)
        self.proxy = proxy


class ModelLoadError(ModelError):
    """The model file is missing, unreadable or not a valid ONNX model."""


class ModelContractError(ModelError):
    """The model's tensors do not match the proxy's schema."""


class ModelRuntimeError(ModelError):
    """onnxruntime failed while running the model."""


class NoModelError(ModelError):
    """The proxy has no model installed (none configured, or it failed to load)."""


class UnknownProxyError(KeyError):
    """The registry was never told about this proxy (call :meth:`ModelRegistry.bind`)."""

    def __str__(self) -> str:
        return f"proxy {self.args[0]!r} is not bound in the model registry"


@dataclass(frozen=True)
class LoadedModel:
    """An installed, checked session and where it came from."""

    proxy: str
    session: Any  # onnxruntime.InferenceSession (untyped library)
    input_name: str
    output_name: str
    n_features: int
    source: str
    #: (st_mtime_ns, st_size, st_ino) of the file when loaded; None for in-memory models
    stamp: tuple[int, int, int] | None

    @functools.cached_property
    def run(self) -> Callable[[list[str], dict[str, Any]], list[Any]]:
        """``session.run``, without onnxruntime's Python wrapper where its binding is there.

        The wrapper checks the feed's names and retries after a provider failure
        before it calls the C++ session.  Our feed was checked once, at load (names,
        shape, element type), and the wrapper's checks cost about 60 us a call
        under emulation (measured in the guest), on the bus's latency path.
        """
        inner = getattr(getattr(self.session, "_sess", None), "run", None)
        if not callable(inner):
            return cast(Callable[[list[str], dict[str, Any]], list[Any]], self.session.run)
        return lambda outputs, feed: cast(list[Any], inner(outputs, feed, None))


@dataclass(frozen=True)
class Reload:
    """Outcome of one reload attempted by :meth:`ModelRegistry.poll`."""

    proxy: str
    error: ModelError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def make_session(proxy: str, model: bytes | str | os.PathLike[str]) -> Any:
    """Build an onnxruntime CPU session (1 thread); failures -> :class:`ModelLoadError`."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # warnings from ORT would go to stderr, not our log
    src = model if isinstance(model, bytes) else os.fspath(model)
    try:
        return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        where = "in-memory model" if isinstance(model, bytes) else os.fspath(model)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(proxy, f"proxy {proxy}: cannot load {where}: {first}") from None


def _shape(s: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in s) + "]"


def _pick_tensor(proxy: str, where: str, kind: str, tensors: list[Any], name: str | None) -> Any:
    """The tensor called *name* among *tensors* (the first when *name* is None).

    Raises :class:`ModelContractError` listing the names found when there is no such tensor.
    """
    if name is None:
        return tensors[0]
    for tensor in tensors:
        if tensor.name == name:
            return tensor
    raise ModelContractError(proxy, (
        f"proxy {proxy}: model{where} has no {kind} '{name}' "
        f"(found {kind}s: {', '.join(t.name for t in tensors)})"))


def check_session(proxy: str, session: Any, n_features: int, *, input_name: str | None = None,
                  output_name: str | None = None, source: str = "") -> tuple[str, str]:
    """Check *session* against the contract for a proxy with *n_features* inputs.

    Returns the (input, output) tensor names to use.  Raises
    :class:`ModelContractError` naming the proxy, the tensor, and the expected
    and found type/shape.  Static shapes are checked first; then a probe
    inference on two zero rows catches what dynamic dimensions hide.
    """
    where = f" {source}" if source else ""
    inputs = session.get_inputs()
    outputs = session.get_outputs()
    inp = _pick_tensor(proxy, where, "input", inputs, input_name)
    out = _pick_tensor(proxy, where, "output", outputs, output_name)

    want_in = f"tensor(float) [N, {n_features}]"
    got_in = f"{inp.type} {_shape(inp.shape)}"
    shape = list(inp.shape)
    if (inp.type != "tensor(float)" or len(shape) != 2
            or (isinstance(shape[1], int) and shape[1] != n_features)):
        raise ModelContractError(proxy, (
            f"proxy {proxy}: model{where} input '{inp.name}': expected {want_in}, found {got_in}"))
    others = [i.name for i in inputs if i.name != inp.name]
    if others:
        raise ModelContractError(proxy, (
            f"proxy {proxy}: model{where} has extra inputs {', '.join(others)}: "
            f"expected exactly one input {want_in}"))

    want_out = "tensor(float) [N, 1] or [N]"
    oshape = list(out.shape)
    if (out.type != "tensor(float)" or len(oshape) not in (1, 2)
            or (len(oshape) == 2 and isinstance(oshape[1], int) and oshape[1] != 1)):
        raise ModelContractError(proxy, (
            f"proxy {proxy}: model{where} output '{out.name}': expected {want_out}, "
            f"found {out.type} {_shape(oshape)}"))

    # Probe: dynamic dims (and broadcasting mistakes) only show when run.
    probe = np.zeros((2, n_features), dtype=np.float32)
    try:
        (y,) = session.run([out.name], {inp.name: probe})
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelContractError(proxy, (
            f"proxy {proxy}: model{where} fails on a probe input float32 [2, {n_features}]: "
            f"{first}")) from None
    y = np.asarray(y)
    if y.dtype != np.float32 or y.shape not in ((2, 1), (2,)):
        raise ModelContractError(proxy, (
            f"proxy {proxy}: model{where} output '{out.name}' on a probe of 2 rows: expected "
            f"float32 [2, 1] or [2], found {y.dtype} {list(y.shape)}"))
    return str(inp.name), str(out.name)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class ModelRegistry:
    """Sessions of every bound proxy.

    Usage by the daemon::

        reg = ModelRegistry(config)
        for attrs in conn.proxies():
            try:
                reg.bind(ProxySchema.from_attrs(attrs))
            except ModelError as e:       # proxy stays in emergency
                log.error("%s", e)
        ...
        for r in reg.poll():              # periodically: hot swap changed files
            ...
        y = reg.predict("sample", x)      # float32 [N]
    """

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or Config()
        self._bindings: dict[str, Binding] = {}
        self._models: dict[str, LoadedModel] = {}
        self._errors: dict[str, ModelError] = {}
        # stamp of the file last attempted (good or bad), so poll() retries
        # a broken file only after it changed
        self._tried: dict[str, tuple[int, int, int] | None] = {}
        self._lock = threading.Lock()  # serialises loaders; predict() takes no lock

    # -- binding ------------------------------------------------------------
    def bind(self, schema: ProxySchema, *, load: bool = True) -> Binding:
        """Register *schema* with its ``[proxy.<name>]`` config and load its model.

        Returns the :class:`~kmlbus.bus.config.Binding`.  A proxy without a
        configured model is bound without one (no error).  If loading fails
        the binding is kept, the proxy has no model, and the
        :class:`ModelError` is raised for the caller to report.
        Re-binding with a changed schema re-checks the installed model; a
        schema the configuration does not fit raises
        :class:`~kmlbus.bus.config.ConfigError` and unbinds the proxy.
        """
        try:
            b = bind(schema, self.config.proxies.get(schema.name), self.config.bus,
                     path=self.config.path)
        except ConfigError:
            # the kernel's (new) schema does not fit the config: serve nothing stale
            with self._lock:
                self._bindings.pop(schema.name, None)
                self._models.pop(schema.name, None)
                self._tried.pop(schema.name, None)
            raise
        with self._lock:
            old = self._bindings.get(schema.name)
            self._bindings[schema.name] = b
            if old is not None and old != b:
                # the contract may have changed: the old session is no longer trusted
                self._models.pop(schema.name, None)
                self._tried.pop(schema.name, None)
        if load and b.model is not None:
            self.reload(schema.name)
        return b

    def binding(self, name: str) -> Binding:
        """The binding of a bound proxy (raises :class:`UnknownProxyError`)."""
        try:
            return self._bindings[name]
        except KeyError:
            raise UnknownProxyError(name) from None

    @property
    def proxies(self) -> tuple[str, ...]:
        """Names of every bound proxy."""
        return tuple(self._bindings)

    def has_model(self, name: str) -> bool:
        return name in self._models

    def model(self, name: str) -> LoadedModel | None:
        """The installed model of *name*, or None."""
        return self._models.get(name)

    def error(self, name: str) -> ModelError | None:
        """Why the last load of *name* failed (None after a successful one)."""
        return self._errors.get(name)

    # -- loading ------------------------------------------------------------
    def _check_and_install(self, name: str, b: Binding, session: Any, source: str,
                           stamp: tuple[int, int, int] | None) -> LoadedModel:
        inp, out = check_session(name, session, b.n_features, input_name=b.input_name,
                                 output_name=b.output_name, source=source)
        lm = LoadedModel(name, session, inp, out, b.n_features, source, stamp)
        self._models[name] = lm  # the swap: one reference assignment
        self._errors.pop(name, None)
        log.info("proxy %s: model %s installed", name, source)
        return lm

    def reload(self, name: str, path: str | os.PathLike[str] | None = None) -> LoadedModel:
        """Load the proxy's model file (or *path*, which then becomes its file), check, swap.

        On any failure the previously installed model, if any, stays in use,
        the error is remembered (:meth:`error`) and raised.
        """
        b = self.binding(name)
        with self._lock:
            if path is not None:
                b = self._bindings[name] = _with_model(b, Path(path))
            if b.model is None:
                err: ModelError = NoModelError(name, f"proxy {name}: no model configured "
                                                     f"(set proxy.{name}.model)")
                self._errors[name] = err
                raise err
            stamp = _stamp(b.model)
            self._tried[name] = stamp
            try:
                if stamp is None:
                    raise ModelLoadError(name, f"proxy {name}: model file {b.model} "
                                               "does not exist or is unreadable")
                session = make_session(name, b.model)
                return self._check_and_install(name, b, session, str(b.model), stamp)
            except ModelError as e:
                self._errors[name] = e
                raise

    def install(self, name: str, model: bytes, source: str = "in-memory model") -> LoadedModel:
        """Check and swap in a serialized ONNX model (e.g. one the learner just fitted).

        The file watch is suspended for this proxy until its file changes again.
        """
        b = self.binding(name)
        with self._lock:
            try:
                session = make_session(name, model)
                lm = self._check_and_install(name, b, session, source, None)
            except ModelError as e:
                self._errors[name] = e
                raise
            if b.model is not None:
                self._tried[name] = _stamp(b.model)
            return lm

    def unload(self, name: str) -> None:
        """Drop the proxy's model (it then has none until the next reload)."""
        with self._lock:
            self._models.pop(name, None)

    def poll(self) -> list[Reload]:
        """Reload every bound proxy whose model file changed since it was last tried.

        A file that vanished is ignored (the old model keeps running); a file
        that reappears or changes is reloaded; a broken file is reported once
        and retried when it changes again.
        """
        out: list[Reload] = []
        for name, b in list(self._bindings.items()):
            if b.model is None:
                continue
            stamp = _stamp(b.model)
            if stamp is None or (name in self._tried and self._tried[name] == stamp):
                continue
            try:
                self.reload(name)
            except ModelError as e:
                log.warning("%s", e)
                out.append(Reload(name, e))
            else:
                out.append(Reload(name))
        return out

    # -- inference ----------------------------------------------------------
    def predict(self, name: str, features: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Run the proxy's model on float features [N, n_features]; returns float32 [N].

        Raises :class:`NoModelError` if the proxy has no model and
        :class:`ModelRuntimeError` for any failure inside onnxruntime.
        """
        lm = self._installed(name)
        x = np.ascontiguousarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != lm.n_features:
            raise ModelRuntimeError(name, f"proxy {name}: features of shape {list(x.shape)}, "
                                          f"expected [N, {lm.n_features}]")
        if x.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        y = np.asarray(self._run(lm, x), dtype=np.float32).reshape(-1)
        if y.shape[0] != x.shape[0]:
            raise ModelRuntimeError(name, f"proxy {name}: model returned {y.shape[0]} values "
                                          f"for {x.shape[0]} rows")
        return y

    def predict_rows(self, name: str, rows: list[list[float]]) -> list[float]:
        """:meth:`predict` for a few rows as Python lists: one array in, a list out.

        The dispatcher's small-batch path uses it.  Between two kernel batches
        the code of each numpy call goes cold, and under emulation its first
        call then costs 100-250 us (measured in the guest); this makes one
        array where :meth:`predict` adds four numpy calls around the model.
        Same float32 inputs, same model, same values (a test holds them equal).
        """
        lm = self._installed(name)
        if not rows:
            return []
        if any(len(r) != lm.n_features for r in rows):
            bad = next(len(r) for r in rows if len(r) != lm.n_features)
            raise ModelRuntimeError(name, f"proxy {name}: features of shape [{len(rows)}, {bad}], "
                                          f"expected [N, {lm.n_features}]")
        out = self._run(lm, np.array(rows, dtype=np.float32)).tolist()
        if out and isinstance(out[0], list):  # [N, 1]
            out = [v for r in out for v in r]
        if len(out) != len(rows):
            raise ModelRuntimeError(name, f"proxy {name}: model returned {len(out)} values "
                                          f"for {len(rows)} rows")
        return cast(list[float], out)

    def _installed(self, name: str) -> LoadedModel:
        lm = self._models.get(name)  # one read: a concurrent swap cannot tear it
        if lm is None:
            if name not in self._bindings:
                raise UnknownProxyError(name)
            raise NoModelError(name, f"proxy {name}: no model installed"
                               + (f" ({self._errors[name]})" if name in self._errors else ""))
        return lm

    @staticmethod
    def _run(lm: LoadedModel, x: npt.NDArray[np.float32]) -> Any:
        """The model's one output for *x*; any onnxruntime failure as :class:`ModelRuntimeError`."""
        try:
            (y,) = lm.run([lm.output_name], {lm.input_name: x})
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelRuntimeError(lm.proxy, f"proxy {lm.proxy}: inference failed in {lm.source}: "
                                              f"{first}") from e
        return y


def _with_model(b: Binding, path: Path) -> Binding:
    return replace(b, model=path)


def bind_all(registry: ModelRegistry, schemas: Iterable[ProxySchema]) -> dict[str, ModelError]:
    """Bind every schema; returns the proxies whose model failed, with why."""
    failed: dict[str, ModelError] = {}
    for s in schemas:
        try:
            registry.bind(s)
        except ModelError as e:
            failed[s.name] = e
    return failed
