"""``python -m kmlbus`` / ``kmlbus``: the command-line front end of the bus.

Each subcommand is a thin wrapper; the work lives in the modules it names.
Errors a person can act on (module not loaded, no privilege, a refused mode
change) are printed as one line and exit non-zero, never as a traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from kmlbus.bus import readings, statefile
from kmlbus.contract import spec
from kmlbus.tools import plot
from kmlbus.wire import codec, netlink

__all__ = ["main"]

log = logging.getLogger(__name__)


def _counter(p: dict[str, Any], name: str) -> int:
    return int(p.get("counters", {}).get(name, 0))


def proxy_view(p: dict[str, Any], bus_state: dict[str, Any]) -> dict[str, Any]:
    """Merge a kernel proxy dict with the daemon's view of it, with enum names."""
    view: dict[str, Any] = {
        "id": p.get("id"),
        "name": p.get("name"),
        "mode": codec.enum_name("mode", int(p.get("mode", 0))),
        "lifecycle": codec.enum_name("lifecycle", int(p.get("lifecycle", 0))),
        "mode_s": round(int(p.get("mode-ms", 0)) / 1000.0, 1),
        "reason": codec.enum_name("reason", int(p.get("reason", 0))),
        "bus_portid": int(p.get("bus-portid", 0)),
        "share": p.get("share"),
        "explore": p.get("explore"),
        "sample_period": p.get("sample-period"),
        "nkeys": p.get("nkeys"),
        "features": [f.get("name") for f in p.get("feature", [])],
        "recommendation": p.get("recommendation", {}),
        "counters": dict(p.get("counters", {})),
    }
    bus = bus_state.get("proxies", {}).get(view["name"])
    if bus:
        view["bus"] = dict(bus)
        stats = bus_state.get("stats", {})
        if "socket_overruns" in stats:
            # the daemon's telemetry socket: multicast it lost to a full receive buffer
            view["bus"]["socket"] = {"overruns": stats["socket_overruns"],
                                     "rcvbuf": stats.get("socket_rcvbuf")}
        if bus_state.get("portid") != view["bus_portid"]:
            # the daemon that wrote this is not the one attached (it died, or detached)
            view["bus"]["stale"] = (f"written by bus pid {bus_state.get('pid')} (port "
                                    f"{bus_state.get('portid')}), which is not attached to this proxy")
    return view


def _fmt_eff(x: Any) -> str:
    return "-" if x is None else f"{float(x):.1f}"


def print_status_table(views: list[dict[str, Any]]) -> None:
    """One row per proxy: mode, time in it, why, decisions and recommendations."""
    hdr = ("ID", "NAME", "MODE", "FOR", "WHY", "LIFECYCLE", "BUS", "DEC d/m",
           "RECS rx/app/ign/exp", "LOST ring/send", "SAMPLED", "EFF d/m", "MATURITY")
    rows = []
    for v in views:
        c = v["counters"]
        bus = v.get("bus", {})
        ev = {} if bus.get("stale") else bus.get("evidence", {})
        rows.append((
            str(v["id"]), str(v["name"]), v["mode"], f"{v['mode_s']}s", v["reason"], v["lifecycle"],
            str(v["bus_portid"] or "-"),
            f"{c.get('decisions-default', 0)}/{c.get('decisions-model', 0)}",
            "/".join(str(c.get(k, 0)) for k in ("recs-received", "recs-applied", "recs-ignored", "recs-expired")),
            f"{c.get('drops', 0)}/{c.get('send-failed', 0)}",
            f"1/{v.get('sample_period') or '?'}",
            f"{_fmt_eff(ev.get('default_mean'))}/{_fmt_eff(ev.get('model_mean'))}",
            _fmt_eff(ev.get("maturity")),
        ))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(hdr)]
    print("  ".join(h.ljust(w) for h, w in zip(hdr, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    sockets = [v["bus"]["socket"] for v in views if "socket" in v.get("bus", {}) and not v["bus"].get("stale")]
    if sockets:
        sock = sockets[0]
        print(f"bus socket: {sock['overruns']} receive-buffer overrun(s) (multicast lost, "
              f"ENOBUFS), buffer {sock.get('rcvbuf') or '?'} bytes")
    for v in views:
        bus = v.get("bus")
        if bus and bus.get("stale"):
            print(f"  {v['name']}: the bus's view below is stale: {bus['stale']}")
        if bus and bus.get("last"):
            last = bus["last"]
            print(f"  {v['name']}: last move {last.get('from')} -> {last.get('to')} "
                  f"({last.get('trigger')}): {last.get('reason')}")
        per = (bus or {}).get("evidence", {}).get("per_arm")
        if per and per.get("efficiency", "mean") != "mean" and not bus.get("stale"):
            print(f"  {v['name']}: {readings.line(per)}")
        learning = (bus or {}).get("learning")
        if learning:
            print(f"  {v['name']}: {_learning_line(learning)}")


def _learning_line(learning: dict[str, Any]) -> str:
    """One line about a proxy's learning loop (fits, data, the last fit)."""
    line = (f"learning: {learning.get('fits', 0)} fit(s) installed, {learning.get('kept', 0)} "
            f"kept back, {learning.get('samples', 0)} samples")
    last = learning.get("last_fit")
    if last:
        if last.get("model") == "tree":
            what = f"tree (value model's gain {last.get('predicted_gain', 0.0):.2f}x)"
        else:
            w = ", ".join(f"{x:.2f}" for x in last.get("weights", []))
            what = f"weights [{w}] bias {last.get('bias', 0.0):.2f}"
        line += (f"; last fit: {what}, estimated "
                 f"{last.get('estimated', 0.0):.3f} (observed {last.get('observed', 0.0):.3f})")
    return line


def cmd_status(args: argparse.Namespace) -> int:
    """Show every proxy the kernel has, merged with the daemon's evidence."""
    with netlink.Connection() as conn:
        proxies = conn.proxies()
    bus_state = statefile.read()
    views = [proxy_view(p, bus_state) for p in proxies]
    if args.json:
        json.dump(views, sys.stdout, indent=1, sort_keys=True, default=str)
        print()
    else:
        print_status_table(views)
    return 0


def _lookup(conn: netlink.Connection, proxy: str) -> dict[str, Any]:
    """The kernel's ``get`` reply for a proxy given by name or id (one request)."""
    key: int | str = int(proxy) if proxy.isdigit() else proxy
    return conn.proxy(key)


def cmd_mode(args: argparse.Namespace) -> int:
    """Ask the kernel for a mode change; pin/unpin go to the daemon's control file."""
    from kmlbus.bus import pins

    if args.unpin:
        pins.unpin(args.proxy)
        print(f"{args.proxy}: unpinned; the bus may move it again")
        return 0
    if args.mode is None:
        print("kmlbus mode: give a MODE (or --unpin)", file=sys.stderr)
        return 2
    with netlink.Connection() as conn:
        attrs = _lookup(conn, args.proxy)
        pid, name = int(attrs["id"]), str(attrs["name"])
        previous = pins.load().get(name)
        if args.pin:
            # Pin first, so a running bus does not move the proxy between our
            # request and its next look at the pins.
            pins.pin(name, args.mode)
        try:
            conn.set_mode(pid, args.mode, "operator")
        except netlink.NetlinkError as e:
            if args.pin:
                if previous is None:
                    pins.unpin(name)
                else:
                    pins.pin(name, previous)
            if e.errno == errno.EINVAL:
                raise netlink.NetlinkError(e.errno, _refusal(conn, pid, args.mode, e.extack), e.op) from None
            raise
    if args.pin:
        print(f"{name}: now {args.mode}, pinned (kmlbus mode {name} --unpin to release)")
    else:
        print(f"{name}: now {args.mode}")
    return 0


def cmd_sample_period(args: argparse.Namespace) -> int:
    """Show a proxy's sample period, or set it (the kernel checks the range)."""
    with netlink.Connection() as conn:
        attrs = _lookup(conn, args.proxy)
        pid, name = int(attrs["id"]), str(attrs["name"])
        if args.period is not None:
            conn.set_params(pid, sample_period=args.period)
            attrs = conn.proxy(pid)
    c = attrs.get("counters", {})
    print(f"{name}: sample-period {attrs.get('sample-period')} (one decision in "
          f"{attrs.get('sample-period')} recorded; {c.get('samples', 0)} sampled, "
          f"{c.get('unsampled', 0)} unsampled so far)")
    return 0


def _refusal(conn: netlink.Connection, pid: int, want: str, extack: str) -> str:
    """The kernel's reason plus where the proxy is and where it may go from there."""
    from kmlbus.contract import graph as mgraph

    try:
        cur = codec.enum_name("mode", int(conn.proxy(pid)["mode"]))
    except netlink.KmlbusError:
        return extack
    g = mgraph.load()
    allowed = sorted(d for s, d in g.allowed if s == cur)
    return (f"{extack}; proxy is in {cur}, {cur} -> {want} is not an edge of the mode graph "
            f"(from {cur}: {', '.join(allowed) or 'nowhere'})")


def cmd_watch(args: argparse.Namespace) -> int:
    """Every proxy live: a refreshing table on a terminal, plain lines in a pipe."""
    from kmlbus.tools import watch

    with netlink.Connection(groups=("events", "telemetry")) as conn:
        return watch.run(conn, sys.stdout, only=args.proxy, seconds=args.seconds,
                         terminal=False if args.plain else None)


def cmd_run(args: argparse.Namespace) -> int:
    """The daemon: attach to configured proxies, dispatch, drive modes."""
    from kmlbus.bus import daemon

    return daemon.main(args.config, duration=args.duration, metrics=args.metrics)


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmarks against a raw-socket floor measured in the same run."""
    from kmlbus.tools import bench

    return int(bench.main(args))


def cmd_soak(args: argparse.Namespace) -> int:
    """Reliability figures of the module: fuzz, bus kills, privilege (boots the VM if needed)."""
    try:
        from kmlbus.tools import soak
    except ModuleNotFoundError as e:
        print(f"kmlbus soak needs {e.name}, from the test extra: pip install 'kmlbus[test]'",
              file=sys.stderr)
        return 2
    return soak.main(args)


def cmd_demo(args: argparse.Namespace) -> int:
    """Sample proxy driven through its modes by a good, then a bad model."""
    from kmlbus.tools import demo

    return int(demo.main(args))


def cmd_trace(args: argparse.Namespace) -> int:
    """Inspect a recorded trace, evaluate a model on it offline, or fit one from it."""
    from kmlbus.tools import offline

    return offline.main(args.rest)


def cmd_plot(args: argparse.Namespace) -> int:
    """Draw a recorded trace as a PNG (mode bands, per-arm efficiency, rates, transitions)."""
    return plot.run_command(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (kept separate so tests can inspect it)."""
    ap = argparse.ArgumentParser(prog="kmlbus", description=__doc__.split("\n")[0])
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("status", help="proxies with mode, lifecycle, counters, evidence")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("run", help="the bus daemon")
    s.add_argument("--config", required=True, help="TOML file mapping proxies to ONNX models")
    s.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    s.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics on "
                   "http://HOST:PORT/metrics (e.g. 127.0.0.1:9464)")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("mode", help="ask the kernel for a mode change")
    s.add_argument("proxy", help="proxy name or id")
    s.add_argument("mode", nargs="?", choices=spec.load().enums["mode"].entries)
    g = s.add_mutually_exclusive_group()
    g.add_argument("--pin", action="store_true", help="suspend the bus's automatic moves")
    g.add_argument("--unpin", action="store_true", help="let the bus move the proxy again")
    s.set_defaults(func=cmd_mode)

    s = sub.add_parser("sample-period", help="show or set how many decisions make one telemetry sample")
    s.add_argument("proxy", help="proxy name or id")
    s.add_argument("period", nargs="?", type=int, help="record one decision in PERIOD (1 = every one)")
    s.set_defaults(func=cmd_sample_period)

    s = sub.add_parser("watch", help="every proxy live: mode, time in it, per-arm efficiency, rates, "
                       "drops, the latest transitions")
    s.add_argument("proxy", nargs="?", help="only this proxy (name or id)")
    s.add_argument("--seconds", type=float, default=None, help="stop after this long")
    s.add_argument("--plain", action="store_true", help="plain lines even on a terminal "
                   "(the default when stdout is not one)")
    s.set_defaults(func=cmd_watch)

    s = sub.add_parser("bench", help="benchmarks (run inside the VM or on a kernel with the module)")
    s.add_argument("--seconds", type=float, default=5.0, help="time per measurement")
    s.add_argument("--rate", type=int, default=200000, help="sample decisions per second for (b)")
    s.add_argument("--here", action="store_true", help="run on this kernel, do not boot a VM")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("soak", help="reliability figures against the real module: netlink fuzz, bus "
                       "kills, module reloads, overload, privilege (boots the VM if needed)")
    s.add_argument("--full", action="store_true", help="the full soak: 100000 fuzz requests, 100 kills, "
                   "100 reloads (default: the CI size, 10000, 10 and 3)")
    s.add_argument("--fuzz", type=int, default=None, help="fuzz requests (overrides the size)")
    s.add_argument("--kills", type=int, default=None, help="bus kills (overrides the size)")
    s.add_argument("--reloads", type=int, default=None, help="module reloads (overrides the size)")
    s.add_argument("--rows", default="fuzz,kill,reload,overload,privilege", help="rows to run "
                   "(default: all of fuzz,kill,reload,overload,privilege)")
    s.add_argument("--here", action="store_true", help="run on this kernel, do not boot a VM")
    s.set_defaults(func=cmd_soak)

    s = sub.add_parser("trace", help="recorded traces: show, evaluate MODEL, fit (offline, no kernel)",
                       add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of python -m kmlbus.tools.offline")
    s.set_defaults(func=cmd_trace)

    s = sub.add_parser("plot", help="draw a recorded trace as a PNG: modes, per-arm efficiency, rates")
    plot.add_arguments(s)
    s.set_defaults(func=cmd_plot)

    s = sub.add_parser("demo", help="drive the sample proxy through its modes (boots the VM if needed)")
    s.add_argument("--here", action="store_true", help="run on this kernel, do not boot a VM")
    s.add_argument("--seconds", type=float, default=90.0, help="time limit per phase")
    s.add_argument("--plot", metavar="PNG", help="picture of the run (default: vm-out/demo.png in "
                   "the work folder)")
    s.add_argument("--no-picture", action="store_true", help=argparse.SUPPRESS)
    s.add_argument("--trace", help=argparse.SUPPRESS)  # where the guest records (the host draws it)
    s.set_defaults(func=cmd_demo)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one command; a reader that went away ends it quietly.

    Every command may write into a pipe whose reader stops early
    (``kmlbus status --json | head -c 600``).  Like Unix tools, the command then
    ends without a word: the rest of its output goes to /dev/null (so Python's
    final flush cannot complain either) and the exit status is 128 + SIGPIPE,
    what a shell reports for a tool the signal ended.
    """
    try:
        try:
            return _main(argv)
        finally:  # output still buffered must reach the pipe now, where we can catch the error
            sys.stdout.flush()
    except BrokenPipeError:
        _discard_stdout()
        return 128 + signal.SIGPIPE


def _discard_stdout() -> None:
    """Point file descriptor 1 at /dev/null, so nothing more can fail on the closed pipe."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _main(argv: Sequence[str] | None) -> int:
    """Parse, run, turn known failures into one-line messages."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["trace"]:  # its own parser takes every remaining argument, --help included
        from kmlbus.tools import offline

        return offline.main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # transitions logs every callback at INFO/DEBUG; our machine logs each move itself.
    logging.getLogger("transitions").setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except netlink.ModuleNotLoaded as e:
        print(f"kmlbus: {e}", file=sys.stderr)
        return 3
    except netlink.NetlinkError as e:
        print(str(e), file=sys.stderr)
        return 4 if e.errno != 1 else 5
    except KeyboardInterrupt:
        return 130
