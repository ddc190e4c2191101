"""The short soak (``kmlbus soak`` at CI size) against the real module: every row must pass.

``python -m kmlbus soak --full`` runs the same rows 10x longer; its table is in
the README's "Reliability" section.
"""

from __future__ import annotations

import pytest

from kmlbus.tools import soak

from .conftest import LoadedModules

pytestmark = pytest.mark.vm


@pytest.mark.sample_params(rate=soak.RATE)
def test_netlink_fuzz_of_every_operation(modules: LoadedModules) -> None:
    row = soak.fuzz_row(soak.SHORT["fuzz"])
    soak.print_table([row])
    assert row.ok, (row.result, row.details)
    assert int(row.checked.split()[0]) >= soak.SHORT["fuzz"], row.checked


@pytest.mark.sample_params(rate=soak.RATE)
def test_killed_bus_leaves_the_proxy_in_emergency_before_its_next_decision(modules: LoadedModules) -> None:
    row = soak.kill_row(soak.SHORT["kills"])
    soak.print_table([row])
    assert row.ok, (row.result, row.details)


@pytest.mark.sample_params(rate=soak.RATE)
def test_unprivileged_and_namespaced_callers_steer_nothing(modules: LoadedModules) -> None:
    row = soak.privilege_row()
    soak.print_table([row])
    assert row.ok, (row.result, row.details)


@pytest.mark.sample_params(rate=soak.RATE)
def test_overload_loses_no_sample_without_a_counter(modules: LoadedModules) -> None:
    row = soak.overload_row(seconds=2.0)
    soak.print_table([row])
    assert row.ok, (row.checked, row.result)
