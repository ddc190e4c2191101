"""The raw netlink transport against the host kernel, without the kmlbus module.

The host kernel has generic netlink but cannot load modules, so these tests
drive the same code paths through the kernel's own ``nlctrl`` family: family
resolution, dumps, ACKs, errors with extended ACK, and the absent-family
case that :class:`~kmlbus.wire.netlink.Connection` turns into ModuleNotLoaded.
Multicast-like traffic is injected by unicast from a second netlink socket
(root only, like everything that talks to kmlbus's control ops).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from kmlbus.contract import spec as kspec
from kmlbus.wire import codec
from kmlbus.wire import netlink as nl

SPEC = kspec.load()
FAKE_FAMILY = 0x7777
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="unicast between netlink sockets needs CAP_NET_ADMIN")


@pytest.fixture
def sock() -> Iterator[nl.GenlSocket]:
    with nl.GenlSocket(timeout=2.0) as s:
        yield s


def ctrl(s: nl.GenlSocket, cmd: int, payload: bytes, flags: int = codec.NLM_F_REQUEST | codec.NLM_F_ACK,
         timeout: float | None = None) -> list[codec.Message]:
    seq = s.next_seq()
    req = codec.pack_genlmsg(nl.GENL_ID_CTRL, cmd, nl.CTRL_VERSION, payload, seq=seq, flags=flags)
    return s.transact(req, seq, expect_ack=bool(flags & (codec.NLM_F_ACK | codec.NLM_F_DUMP)), timeout=timeout)


def kmlbus_loaded() -> bool:
    with nl.GenlSocket() as s:
        try:
            s.get_family(SPEC.name)
        except nl.NetlinkError:
            return False
    return True


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- family resolution -------------------------------------------------------------


def test_nlctrl_resolves_with_its_ops_and_groups(sock: nl.GenlSocket) -> None:
    info = sock.get_family("nlctrl")
    assert (info.name, info.id) == ("nlctrl", nl.GENL_ID_CTRL)
    assert nl.CTRL_CMD_GETFAMILY in info.ops
    assert info.groups.get("notify", 0) > 0


def test_absent_family_is_a_netlink_error_enoent(sock: nl.GenlSocket) -> None:
    with pytest.raises(nl.NetlinkError) as ei:
        sock.get_family("no-such-family")
    assert ei.value.errno == errno.ENOENT
    assert "\n" not in str(ei.value)


@pytest.mark.skipif(kmlbus_loaded(), reason="the kmlbus module is loaded here")
def test_connection_without_the_module_raises_module_not_loaded_and_leaks_no_socket() -> None:
    before = open_fds()
    with pytest.raises(nl.ModuleNotLoaded) as ei:
        nl.Connection(groups=("telemetry",))
    assert str(ei.value) == ("the kmlbus kernel module is not loaded: load it with `insmod kernel/kmlbus.ko` "
                             "(or `modprobe kmlbus`)")
    assert isinstance(ei.value, nl.KmlbusError)
    assert open_fds() == before


# --- replies, dumps, errors --------------------------------------------------------


def test_dump_collects_every_family_and_ends_with_done(sock: nl.GenlSocket) -> None:
    replies = ctrl(sock, nl.CTRL_CMD_GETFAMILY, b"", codec.NLM_F_REQUEST | codec.NLM_F_DUMP)
    assert replies[-1].type == codec.NLMSG_DONE and replies[-1].error == 0
    names = {nl._parse_family(m.payload).name for m in replies[:-1]}
    assert "nlctrl" in names and len(names) == len(replies) - 1


def test_do_request_gets_its_reply_then_an_ack(sock: nl.GenlSocket) -> None:
    replies = ctrl(sock, nl.CTRL_CMD_GETFAMILY, codec.pack_attr(nl.CTRL_ATTR_FAMILY_NAME, b"nlctrl\0"))
    assert [m.type for m in replies] == [nl.GENL_ID_CTRL, codec.NLMSG_ERROR]
    assert replies[-1].error == 0 and all(m.portid == sock.portid for m in replies)


def test_policy_violation_carries_the_extack_message_and_offset(sock: nl.GenlSocket) -> None:
    # CTRL_ATTR_FAMILY_ID is NLA_U16: one byte fails the kernel's policy check.
    (err,) = ctrl(sock, nl.CTRL_CMD_GETFAMILY, codec.pack_attr(nl.CTRL_ATTR_FAMILY_ID, b"\x01"))
    assert err.type == codec.NLMSG_ERROR and -err.error in (errno.EINVAL, errno.ERANGE)
    assert err.extack and err.extack_offset == 16 + 4  # the attribute right after nlmsghdr + genlmsghdr


def test_unknown_command_is_eopnotsupp(sock: nl.GenlSocket) -> None:
    (err,) = ctrl(sock, 0xEE, b"")
    assert err.error == -errno.EOPNOTSUPP


def test_request_without_an_answer_times_out_with_a_kmlbus_error(sock: nl.GenlSocket) -> None:
    with pytest.raises(nl.KmlbusError, match="no answer"):
        ctrl(sock, nl.CTRL_CMD_GETFAMILY, b"", flags=0, timeout=0.2)  # no NLM_F_REQUEST: ignored by the kernel


def test_netlink_error_text_is_one_line_with_op_strerror_and_extack() -> None:
    assert str(nl.NetlinkError(errno.EPERM, "", "attach")) == "kmlbus attach: Operation not permitted"
    e = nl.NetlinkError(errno.EINVAL, "mode change not allowed", "set-mode")
    assert str(e) == "kmlbus set-mode: Invalid argument (mode change not allowed)"
    assert (e.errno, e.extack, e.op) == (errno.EINVAL, "mode change not allowed", "set-mode")


def stand_in_connection() -> nl.Connection:
    """A Connection whose 'kmlbus' is nlctrl: kmlbus requests hit a real kernel policy."""
    conn = nl.Connection.__new__(nl.Connection)
    nl.GenlSocket.__init__(conn, timeout=2.0)
    conn.spec = SPEC
    conn._event_cmds = frozenset(o.value for o in SPEC.ops if o.event is not None)
    conn.family_id, conn.family_name = nl.GENL_ID_CTRL, "nlctrl"
    conn.version, conn.ops, conn.groups = 2, {}, {}
    return conn


def test_request_error_names_the_attribute_the_kernel_points_at() -> None:
    # The kmlbus op numbered like CTRL_CMD_GETFAMILY sends the proxy attribute numbered like
    # CTRL_ATTR_FAMILY_NAME (a string); nlctrl allows 15 characters and rejects 30 with an
    # extack offset that Connection maps back to the kmlbus attribute's name.
    op = SPEC.op_by_value[nl.CTRL_CMD_GETFAMILY]
    attr = SPEC.attr_sets[op.attr_set].by_value[nl.CTRL_ATTR_FAMILY_NAME]
    assert attr.type == "string"
    with stand_in_connection() as conn, pytest.raises(nl.NetlinkError) as ei:
        conn.request(op.name, {attr.name: "x" * 30})
    assert ei.value.op == op.name and ei.value.errno in (errno.EINVAL, errno.ERANGE)
    assert f"[attribute {attr.name}]" in ei.value.extack and "\n" not in str(ei.value)


# --- multicast queueing, malformed input, overruns ------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[nl.GenlSocket, nl.GenlSocket]]:
    """A receiver that treats FAKE_FAMILY as kmlbus, and a sender to inject datagrams into it."""
    with nl.GenlSocket(timeout=2.0) as rx, nl.GenlSocket() as tx:
        rx.family_id = FAKE_FAMILY
        yield rx, tx


def telemetry(n: int, first: int = 1) -> tuple[bytes, np.ndarray]:
    recs = np.zeros(n, dtype=codec.struct_dtype("sample"))
    recs["seq"] = np.arange(first, first + n)
    return codec.encode_msg(FAKE_FAMILY, "telemetry", {"id": 1, "records": recs, "drops": 0}, seq=0, flags=0), recs


@needs_root
def test_multicast_arriving_during_a_request_is_queued_for_recv(pair: tuple[nl.GenlSocket, nl.GenlSocket]) -> None:
    rx, tx = pair
    ev, recs = telemetry(32)
    tx._sock.sendto(ev, (rx.portid, 0))
    assert ctrl(rx, nl.CTRL_CMD_GETFAMILY, codec.pack_attr(nl.CTRL_ATTR_FAMILY_NAME, b"nlctrl\0"))[-1].error == 0
    (m,) = rx.recv(0)
    assert m.op == "telemetry" and codec.packed(codec.records(m.attrs), "sample").tobytes() == recs.tobytes()
    assert rx.recv(0) == []


@needs_root
def test_recv_drains_waiting_datagrams_in_order(pair: tuple[nl.GenlSocket, nl.GenlSocket]) -> None:
    rx, tx = pair
    for i in range(5):
        tx._sock.sendto(telemetry(1, first=i + 1)[0], (rx.portid, 0))
    got = rx.recv(1.0)
    assert [int(codec.records(m.attrs)["seq"][0]) for m in got] == [1, 2, 3, 4, 5]


@needs_root
def test_malformed_datagram_is_counted_and_the_good_messages_kept(pair: tuple[nl.GenlSocket, nl.GenlSocket]) -> None:
    rx, tx = pair
    good, _ = telemetry(2)
    bad_attr = codec.pack_genlmsg(FAKE_FAMILY, SPEC.op_by_name["telemetry"].value, 1,
                                  codec.pack_attr(SPEC.attr_sets["proxy"].by_name["records"].value, b"\0" * 65),
                                  seq=0, flags=0)
    tx._sock.sendto(good + bad_attr, (rx.portid, 0))
    tx._sock.sendto(b"\x05\x00", (rx.portid, 0))
    got = rx.recv(1.0)
    got += rx.recv(0.2)
    assert len(got) == 1 and got[0].op == "telemetry"
    assert rx.stats["malformed"] == 2


class _OverrunOnce:
    """Wraps a socket: the first receive fails with ENOBUFS, as after a full receive buffer."""

    def __init__(self, real: Any) -> None:
        self.real, self.fired = real, False

    def recv_into(self, *a: Any) -> int:
        if not self.fired:
            self.fired = True
            raise OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))
        return int(self.real.recv_into(*a))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@needs_root
def test_enobufs_on_receive_is_counted_not_raised(pair: tuple[nl.GenlSocket, nl.GenlSocket]) -> None:
    rx, tx = pair
    tx._sock.sendto(telemetry(1)[0], (rx.portid, 0))
    rx._sock = _OverrunOnce(rx._sock)  # type: ignore[assignment]
    got = rx.recv(1.0)
    assert len(got) == 1 and rx.stats["overruns"] == 1


def test_recv_with_nothing_waiting_returns_empty_after_the_timeout(sock: nl.GenlSocket) -> None:
    assert sock.recv(0) == [] and sock.recv(0.05) == []


# --- the pyroute2 control plane (kmlbus.wire.control) ---------------------------------------


def test_pyroute2_resolution_agrees_with_the_raw_socket(sock: nl.GenlSocket) -> None:
    import asyncio

    from kmlbus.wire import control

    info = asyncio.run(control.resolve("nlctrl"))
    raw = sock.get_family("nlctrl")
    assert (info.name, info.id, info.version, info.ops, info.groups) == (
        raw.name, raw.id, raw.version, raw.ops, raw.groups)


@pytest.mark.skipif(kmlbus_loaded(), reason="the kmlbus module is loaded here")
def test_async_control_without_the_module_raises_module_not_loaded() -> None:
    import asyncio

    from kmlbus.wire import control

    async def main() -> None:
        async with control.AsyncControl():
            pass

    with pytest.raises(nl.ModuleNotLoaded):
        asyncio.run(control.resolve())
    with pytest.raises(nl.ModuleNotLoaded):
        asyncio.run(main())


def test_a_socket_asked_for_broadcast_errors_has_the_option_and_a_plain_one_not() -> None:
    with nl.GenlSocket(broadcast_error=True) as on, nl.GenlSocket() as off:
        assert on._sock.getsockopt(nl.SOL_NETLINK, nl.NETLINK_BROADCAST_ERROR) == 1
        assert off._sock.getsockopt(nl.SOL_NETLINK, nl.NETLINK_BROADCAST_ERROR) == 0
        assert on.rcvbuf == on._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) > 0
