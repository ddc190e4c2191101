"""Fixtures for the VM suite: the real kmlbus.ko and the sample workload.

Every test under ``tests/vm`` is marked ``vm`` automatically.  Such tests only
make sense inside the guest started by ``python -m kmlbus.vm test`` (the host
kernel cannot load modules); outside it they fail at setup with a one-line
message rather than being skipped, so a host run can never pass by silently
doing nothing.  The host suite deselects them with ``pytest -m 'not vm'``.

Fixtures:

* ``kmlbus_module``: kmlbus.ko loaded for the test, unloaded afterwards; the
  teardown asserts that rmmod worked and that the kernel log of the whole
  test has no WARNING/BUG/Oops/Call Trace.
* ``modules``: kmlbus.ko plus ``kmlbus_sample.ko`` loaded with
  ``sample_params``; yields a `LoadedModules` with the dmesg mark taken
  before loading.
* ``sample_params``: ``{}`` (module defaults) unless the test carries
  ``@pytest.mark.sample_params(rate=0, seed=7)`` or overrides the fixture.

Helpers (import them from `kmlbus.vm.guest`, re-exported here):
``insmod(path, **params)``, ``rmmod(name)``, ``dmesg_mark()``,
``dmesg_since(mark)``, ``set_sample_rate(n)``, ``KMLBUS_KO``, ``SAMPLE_KO``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kmlbus.vm.guest import (
    KMLBUS_KO,
    SAMPLE_KO,
    dmesg_mark,
    dmesg_problems,
    dmesg_since,
    in_vm,
    insmod,
    is_loaded,
    rmmod,
    set_sample_param,
    set_sample_rate,
)

__all__ = [
    "KMLBUS_KO",
    "SAMPLE_KO",
    "LoadedModules",
    "dmesg_mark",
    "dmesg_since",
    "insmod",
    "rmmod",
    "set_sample_param",
    "set_sample_rate",
]

_HERE = Path(__file__).resolve().parent
_OUTSIDE_VM = (
    "vm test run outside the QEMU guest (KMLBUS_IN_VM unset): "
    "run it with `python -m kmlbus.vm test` (host runs use `pytest -m 'not vm'`)"
)


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker used to choose the sample module's parameters."""
    config.addinivalue_line(
        "markers", "sample_params(**params): module parameters for kmlbus_sample.ko in `modules`"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark everything under tests/vm as ``vm`` before ``-m`` selection runs."""
    for item in items:
        if _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.vm)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Fail (never skip) a ``vm`` test that is not running inside the guest."""
    if item.get_closest_marker("vm") is not None and not in_vm():
        pytest.fail(_OUTSIDE_VM, pytrace=False)


@dataclass
class LoadedModules:
    """What the ``modules`` fixture loaded, and the log mark taken before."""

    mark: int
    sample_params: dict[str, object] = field(default_factory=dict)

    def dmesg(self) -> list[str]:
        """Kernel log messages since just before kmlbus.ko was loaded."""
        return dmesg_since(self.mark)


def _unload_stale() -> None:
    """Remove modules a crashed earlier test left behind (sample first: it uses kmlbus)."""
    for name in ("kmlbus_sample", "kmlbus"):
        if is_loaded(name):
            rmmod(name)


@pytest.fixture
def sample_params(request: pytest.FixtureRequest) -> dict[str, object]:
    """kmlbus_sample.ko parameters: from ``@pytest.mark.sample_params(...)``, else defaults."""
    marker = request.node.get_closest_marker("sample_params")
    return dict(marker.kwargs) if marker is not None else {}


@pytest.fixture
def kmlbus_module() -> Iterator[int]:
    """Load kmlbus.ko for one test; yields the dmesg mark taken before loading."""
    _unload_stale()
    mark = dmesg_mark()
    insmod(KMLBUS_KO)
    try:
        yield mark
    finally:
        if is_loaded("kmlbus_sample"):  # a test that loaded the sample itself
            rmmod("kmlbus_sample")
        rmmod("kmlbus")
    assert not is_loaded("kmlbus"), "kmlbus still loaded after rmmod"
    noise = dmesg_problems(mark)
    assert not noise, f"kernel log problems during the test: {noise[:5]}"


@pytest.fixture
def modules(kmlbus_module: int, sample_params: dict[str, object]) -> Iterator[LoadedModules]:
    """kmlbus.ko and kmlbus_sample.ko (with ``sample_params``) loaded for one test."""
    insmod(SAMPLE_KO, **sample_params)
    yield LoadedModules(mark=kmlbus_module, sample_params=sample_params)
    rmmod("kmlbus_sample")
    assert not is_loaded("kmlbus_sample"), "kmlbus_sample still loaded after rmmod"
