"""A bare raw-socket reader of the ``telemetry`` group: the benchmarks' floor.

It parses only what a benchmark needs (which proxy, how many records, the
newest record's kernel timestamp) with ``struct`` and no codec, so that it
costs as little as a reader can.  :mod:`kmlbus.tools.bench` and
:mod:`kmlbus.tools.bench_kernel` both measure against it.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

from kmlbus.contract import spec
from kmlbus.wire import codec

__all__ = ["Batch", "TelemetryParser", "TelemetryReader"]

_SOL_NETLINK = 270
_NETLINK_ADD_MEMBERSHIP = 1
_NETLINK_GENERIC = 16
_HDR = 20  # nlmsghdr (16) + genlmsghdr (4)


@dataclass(frozen=True)
class Batch:
    """One telemetry message: its proxy, record count, newest ``ts-ns``, and when it was read."""

    proxy_id: int
    records: int
    newest_ts: int
    read_ns: int


class TelemetryParser:
    """The bare parse of telemetry datagrams: headers walked with ``struct``, records counted."""

    def __init__(self, family_id: int) -> None:
        sp = spec.load()
        proxy = sp.attr_sets["proxy"].by_name
        self.family_id = family_id
        self.cmd = sp.op_by_name["telemetry"].value
        self.attr_id = proxy["id"].value
        self.attr_records = proxy["records"].value
        # a batch is a run of records attributes, one sample each, at a fixed stride
        run = codec.run_dtype("sample")
        self.stride = run.itemsize
        self.rec_header = self.stride | self.attr_records << 16
        self.ts_off = int(run.fields["ts_ns"][1])  # type: ignore[index]

    def parse(self, buf: bytes | bytearray, n: int, t: int) -> list[Batch]:
        """The telemetry messages in ``buf[:n]`` (one datagram), read at *t*."""
        out: list[Batch] = []
        off = 0
        while off + _HDR <= n:
            mlen, mtype = struct.unpack_from("=IH", buf, off)
            if mlen < 16 or off + mlen > n:
                break
            if mtype == self.family_id and buf[off + 16] == self.cmd:
                out.append(self._message(buf, off + _HDR, off + mlen, t))
            off += (mlen + 3) & ~3
        return out

    def _message(self, buf: bytes | bytearray, pos: int, end: int, t: int) -> Batch:
        pid, nrec, ts = -1, 0, 0
        while pos + 4 <= end:
            alen, atype = struct.unpack_from("=HH", buf, pos)
            if alen < 4:
                break
            atype &= 0x3FFF
            if atype == self.attr_id and alen >= 8:
                pid = struct.unpack_from("=I", buf, pos + 4)[0]
            elif atype == self.attr_records and not nrec:
                # a bare reader trusts the kernel's framing: the records run to the
                # end but for the drops attribute, checked by the last one's header
                nrec = (end - pos) // self.stride
                if not nrec or struct.unpack_from("=I", buf, pos + (nrec - 1) * self.stride)[0] != self.rec_header:
                    nrec = codec.run_length(bytes(buf[pos:end]), 0, end - pos, self.rec_header, self.stride)
                if nrec:
                    ts = struct.unpack_from("=Q", buf, pos + (nrec - 1) * self.stride + self.ts_off)[0]
                    pos += nrec * self.stride
                    continue
            pos += (alen + 3) & ~3
        return Batch(pid, nrec, ts, t)


class TelemetryReader:
    """A raw ``NETLINK_GENERIC`` socket joined to the family's telemetry group."""

    def __init__(self, family_id: int, group_id: int, *, timeout: float = 0.05) -> None:
        self.parser = TelemetryParser(family_id)
        self.family_id = family_id
        #: receive errors (ENOBUFS: the socket overflowed and messages were lost)
        self.enobufs = 0
        self.buf = bytearray(1 << 17)
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_GENERIC)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            self.sock.bind((0, 0))
            self.sock.setsockopt(_SOL_NETLINK, _NETLINK_ADD_MEMBERSHIP, group_id)
            self.sock.settimeout(timeout)
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def read(self) -> list[Batch] | None:
        """The telemetry messages of one datagram; None when nothing came within the timeout."""
        try:
            n = self.sock.recv_into(self.buf)
        except (socket.timeout, BlockingIOError):
            return None
        except OSError:
            self.enobufs += 1
            return []
        return self.parser.parse(self.buf, n, time.monotonic_ns())
