"""systemd's notify protocol, for ``Type=notify`` and ``WatchdogSec=`` (see packaging/systemd).

The protocol (``sd_notify(3)``) is one datagram per notification, newline-separated
``KEY=VALUE`` lines, sent to the AF_UNIX socket named in ``$NOTIFY_SOCKET``
(a leading ``@`` means the abstract namespace).  The daemon says ``READY=1``
once it has attached its proxies, ``WATCHDOG=1`` from its loop at half the
interval systemd asks for in ``$WATCHDOG_USEC`` (so a hung loop, not just a dead
process, gets the service restarted), and ``STOPPING=1`` when it detaches.

Written here in a few lines rather than taken from a library: it is the whole
protocol, and it keeps the daemon free of a C extension.  Without
``$NOTIFY_SOCKET`` (not run by systemd) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

__all__ = ["Notifier"]

log = logging.getLogger(__name__)


class Notifier:
    """Sends notifications to systemd, if *env* names a notify socket."""

    def __init__(self, env: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        env = os.environ if env is None else env
        self.clock = clock
        path = env.get("NOTIFY_SOCKET", "")
        #: the socket's address (abstract names start with NUL), None when not under systemd
        self.address: str | None = ("\0" + path[1:] if path.startswith("@") else path) or None
        #: seconds between keep-alives: half of systemd's watchdog interval; None without one
        self.interval: float | None = None
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.interval = int(usec) / 2e6
        self._next_ping = 0.0
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: object) -> bool:
        """Send one notification (``ready=1`` -> ``READY=1``); False when not sent."""
        if self.address is None:
            return False
        msg = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(msg, self.address)
        except OSError as e:  # systemd gone or the socket unusable: never fatal for the bus
            log.warning("systemd notification %r not sent: %s", msg, e)
            return False
        return True

    def ready(self, status: str) -> bool:
        """The service is up (its proxies attached); *status* is shown by ``systemctl status``."""
        self._next_ping = self.clock() + (self.interval or 0.0)
        return self.notify(ready=1, status=status)

    def keepalive(self) -> bool:
        """From the loop: ``WATCHDOG=1`` when half the watchdog interval has passed; True if sent."""
        if self.interval is None or self.address is None:
            return False
        now = self.clock()
        if now < self._next_ping:
            return False
        self._next_ping = now + self.interval
        return self.notify(watchdog=1)

    def stopping(self, status: str = "detaching") -> bool:
        return self.notify(stopping=1, status=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
