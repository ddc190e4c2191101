"""kmlbus soak on the host: its command line, its table, and how one fuzz answer is judged.

The rows themselves need the real module: tests/vm/test_soak.py runs them.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest

from kmlbus.contract import spec as kspec
from kmlbus.testing import fuzz
from kmlbus.tools import cli, soak
from kmlbus.wire.codec import NLMSG_ERROR, Message


class Answers:
    """A socket whose kernel answers every request with one fixed NLMSG_ERROR."""

    def __init__(self, error: int, extack: str = "", *, silent: bool = False) -> None:
        self.error, self.extack, self.silent = error, extack, silent

    def request_raw(self, cmd: int, payload: bytes, *, timeout: float | None = None) -> list[Message]:
        if self.silent:
            raise TimeoutError("no answer to netlink request seq 1 within 10 s")
        return [Message(NLMSG_ERROR, 0, 1, 0, 0, "", {}, error=self.error, extack=self.extack)]


@pytest.mark.parametrize("error,extack,faults", [
    (0, "", 0),                                  # accepted
    (-errno.EINVAL, "recs: bad length", 0),      # refused with a message
    (-errno.EINVAL, "", 1),                      # refused without one: a fault
    (-errno.EPERM, "", 0),                       # the genl core's own refusals carry none
    (-errno.EOPNOTSUPP, "", 0),
])
def test_an_answer_is_judged_by_errno_and_extack(error: int, extack: str, faults: int) -> None:
    t = fuzz.FuzzTally()
    got = fuzz.answer(Answers(error, extack), 5, b"\0\0\0\0", t)  # type: ignore[arg-type]
    assert got == -error and len(t.faults) == faults and t.sent == 1
    assert t.accepted == (1 if error == 0 else 0)


def test_no_answer_is_a_fault() -> None:
    t = fuzz.FuzzTally()
    fuzz.answer(Answers(0, silent=True), 5, b"", t)  # type: ignore[arg-type]
    assert len(t.faults) == 1 and "no answer" in t.faults[0]


def test_a_refused_batch_that_changed_the_state_is_a_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    stale = kspec.load().enums["reason"].value("stale")
    states = iter([{"mode": 0, "share": 5, "reason": 0}, {"mode": 0, "share": 6, "reason": 0},
                   {"mode": 1, "share": 6, "reason": stale}])
    monkeypatch.setattr(fuzz, "proxy_state", lambda c, pid: next(states))
    t = fuzz.FuzzTally()
    fuzz.batch_keeps_state(Answers(-errno.EINVAL, "no"), 1, 2, [b"x", b"y"], t)  # type: ignore[arg-type]
    # the first refusal changed the share: a fault; the second found the kernel's own stale fallback
    assert len(t.faults) == 1 and "state changed" in t.faults[0] and "payload 78" in t.faults[0]


def test_an_accepted_request_may_change_the_state(monkeypatch: pytest.MonkeyPatch) -> None:
    states = iter([{"mode": 0, "reason": 0}, {"mode": 1, "reason": 1}])
    monkeypatch.setattr(fuzz, "proxy_state", lambda c, pid: next(states))
    t = fuzz.FuzzTally()
    fuzz.batch_keeps_state(Answers(0), 1, 2, [b"x"], t)  # type: ignore[arg-type]
    assert not t.faults


def test_variants_cut_and_repeat_a_payload() -> None:
    assert fuzz.variants(b"abcdefgh") == [b"abcdefgh", b"abcd", b"abcdefghabcdefgh"]


def test_every_request_op_of_the_spec_is_fuzzed() -> None:
    assert {o.name for o in fuzz.request_ops()} == {"get", "set-mode", "set-params", "attach", "detach",
                                                     "recommend"}


def test_the_table_shows_each_row_and_its_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    soak.print_table([soak.Row("a", "1 thing", "fine", True), soak.Row("b", "2", "bad", False, ["why"])])
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "| a | 1 thing | fine | yes |" and out[3] == "| b | 2 | bad | NO |"
    assert out[4] == "  b: why"


def test_the_command_refuses_an_unknown_row(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["soak", "--rows", "fuzz,nonsense", "--here"]) == 2
    assert "unknown rows ['nonsense']" in capsys.readouterr().err


def test_full_is_ten_times_the_ci_size() -> None:
    args: Any = cli.build_parser().parse_args(["soak", "--full"])
    assert args.full and soak.FULL["fuzz"] == 10 * soak.SHORT["fuzz"] and soak.FULL["kills"] == 100
