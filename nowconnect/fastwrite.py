"""
Write straight into a TCP socket when nothing is queued in front of it.

Twisted's C{transport.write} always buffers and sends on the next reactor turn, so every hop of
a small request costs an extra poll and two C{epoll_ctl} calls.  When the transport's buffer is
empty, sending at once is what Twisted would do next anyway; whatever the kernel does not take
goes through C{transport.write} as usual (so ordering, producers and errors keep Twisted's
semantics).  Anything that is not a plain TCP connection (TLS, test transports) just uses
C{write}.
"""
# -*- test-case-name: tests.test_fastwrite -*-

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

# Twisted's own names for its buffer state, checked on the first connection so that a future
# Twisted that renames them turns this optimisation off instead of breaking writes.
_REQUIRED = ("_tempDataLen", "dataBuffer", "offset", "_writeDisconnecting", "disconnecting",
             "socket")
_enabled: bool | None = None


def _supported(transport: tcp.Connection) -> bool:
    global _enabled
    if _enabled is None:
        _enabled = all(hasattr(transport, name) for name in _REQUIRED)
    return _enabled


def write_through(transport: Any, data: bytes) -> None:
    """C{transport.write(data)}, sending at once when the transport has nothing queued."""
    if (
        isinstance(transport, tcp.Connection)
        and _supported(transport)
        and transport.connected
        and not transport._tempDataLen
        and transport.offset >= len(transport.dataBuffer)
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and data
    ):
        try:
            sent = transport.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            # Let Twisted's own write path meet the error and report it as it always does.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
