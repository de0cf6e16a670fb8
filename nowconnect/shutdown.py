"""
SIGTERM is how systemd and operators ask hub and agent to stop: it starts the graceful drain,
and a process that drained cleanly exits 0.  (twistd's own handler re-raises the signal after
shutdown, so the exit status would read as "killed by SIGTERM".)
"""
# -*- test-case-name: tests.test_e2e_shutdown -*-

from __future__ import annotations

import signal
from typing import Any, Callable, Generator

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import Logger

from nowconnect import logs

_log = Logger()


def stop_cleanly_on_sigterm(reactor: Any) -> None:
    """Once the reactor runs, make SIGTERM a plain C{reactor.stop()} (services drain, exit 0)."""

    def install() -> None:
        def on_sigterm(signum: int, frame: Any) -> None:
            _log.info("SIGTERM received: stopping", event="sigterm")
            reactor.callFromThread(reactor.stop)

        signal.signal(signal.SIGTERM, on_sigterm)

    reactor.callWhenRunning(install)


@inlineCallbacks
def drain(
    clock: Any, active: Callable[[], int], seconds: float, log: Logger
) -> Generator[Deferred[Any], Any, int]:
    """
    Wait until C{active()} is 0 or C{seconds} pass (C{drain_started} logged); return how many
    streams are still open, for the caller to reset.
    """
    logs.emit(log, "info", logs.DRAIN_STARTED, "streams={streams} seconds={seconds}",
              streams=active(), seconds=seconds)
    deadline = clock.seconds() + seconds
    while active() and clock.seconds() < deadline:
        yield deferLater(clock, 0.1, lambda: None)
    return active()
