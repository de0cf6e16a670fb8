"""
One stream's lifecycle and credit, as an explicit state machine with no I/O.

A stream is one client TCP connection carried through a tunnel.  It has three parts of state:

 - a L{Phase}: CONNECTING until the target has accepted (the agent sent CONNECTED), then
   ESTABLISHED, then ENDED (both directions finished, or reset);
 - one L{Half} per direction: C{outbound} is what the local socket sends into the tunnel,
   C{inbound} what the tunnel delivers to the local socket.  Each goes OPEN -> FINISHING (EOF
   seen, buffered bytes not yet out) -> FINISHED;
 - credit: how many bytes each side may still send before the other grants more.

Methods take an event and return what the caller must do (frames to send, actions on the local
socket); the stream itself never performs I/O.  L{mux.Mux} owns the streams and does that.
"""
# -*- test-case-name: tests.test_stream -*-

from __future__ import annotations

import enum
from collections import deque

import attrs


class Phase(enum.Enum):
    CONNECTING = "connecting"
    ESTABLISHED = "established"
    ENDED = "ended"


class Half(enum.Enum):
    OPEN = "open"
    FINISHING = "finishing"
    FINISHED = "finished"


class CreditError(Exception):
    """The peer sent more than the credit it was granted."""


@attrs.define
class Stream:
    """
    State for one stream.  C{send_credit} is what this side may send; C{recv_allowance} is what
    the peer may still send; C{ungranted} counts bytes delivered locally but not yet granted
    back to the peer.
    """

    stream_id: int
    connector: str
    client: str
    window: int
    opened_at: float
    phase: Phase = Phase.CONNECTING
    outbound: Half = Half.OPEN
    inbound: Half = Half.OPEN
    send_credit: int = 0
    recv_allowance: int = 0
    ungranted: int = 0
    #: Local bytes read past the credit: at most one socket read.
    send_buffer: deque[bytes] = attrs.field(factory=deque)
    send_buffered: int = 0
    #: Tunnel bytes that arrived before the local socket connected (agent side, optimistic open).
    early_data: list[bytes] = attrs.field(factory=list)
    local_backed_up: bool = False
    reading_paused: bool = False
    sent_bytes: int = 0
    received_bytes: int = 0
    last_activity: float = 0.0
    connected_at: float | None = None

    def __attrs_post_init__(self) -> None:
        self.send_credit = self.window
        self.recv_allowance = self.window
        self.last_activity = self.opened_at

    # -- outbound: local socket -> tunnel ------------------------------------------------------

    def take_sendable(self, data: bytes) -> bytes:
        """
        Local bytes arrived.  Return the part that may go into the tunnel now; the rest waits
        in the send buffer for credit.
        """
        self.sent_bytes += len(data)
        if self.send_buffer or self.send_credit <= 0:
            self._buffer(data)
            return b""
        if len(data) <= self.send_credit:
            self.send_credit -= len(data)
            return data
        now, later = data[: self.send_credit], data[self.send_credit :]
        self.send_credit = 0
        self._buffer(later)
        return now

    def _buffer(self, data: bytes) -> None:
        self.send_buffer.append(data)
        self.send_buffered += len(data)

    def grant_received(self, credit: int) -> list[bytes]:
        """WINDOW arrived: return buffered chunks that the new credit lets out, in order."""
        self.send_credit += credit
        out: list[bytes] = []
        while self.send_buffer and self.send_credit > 0:
            chunk = self.send_buffer.popleft()
            if len(chunk) > self.send_credit:
                self.send_buffer.appendleft(chunk[self.send_credit :])
                chunk = chunk[: self.send_credit]
            self.send_credit -= len(chunk)
            self.send_buffered -= len(chunk)
            out.append(chunk)
        return out

    def wants_reading_paused(self) -> bool:
        """The local socket should stop being read: no credit left or bytes already waiting."""
        return self.send_credit <= 0 or bool(self.send_buffer)

    def local_eof(self) -> bool:
        """
        The local socket sent EOF.  Return True when FIN can go out now, False when it must wait
        for buffered bytes (see L{fin_ready}).
        """
        if self.outbound is not Half.OPEN:
            return False
        if self.send_buffer:
            self.outbound = Half.FINISHING
            return False
        self.outbound = Half.FINISHED
        return True

    def fin_ready(self) -> bool:
        """After credit drained the buffer: is a deferred FIN now due?"""
        if self.outbound is Half.FINISHING and not self.send_buffer:
            self.outbound = Half.FINISHED
            return True
        return False

    # -- inbound: tunnel -> local socket -------------------------------------------------------

    def data_received(self, n: int) -> None:
        """Account for n DATA bytes from the peer; raise L{CreditError} past the allowance."""
        if n > self.recv_allowance:
            raise CreditError(
                f"stream {self.stream_id}: {n} bytes exceed remaining credit {self.recv_allowance}"
            )
        self.recv_allowance -= n
        self.received_bytes += n

    def delivered(self, n: int) -> None:
        """n bytes were handed to the local socket."""
        self.ungranted += n

    def take_grant(self) -> int:
        """
        Credit to grant the peer now, or 0.  Grants wait while the local socket is backed up
        (that is what bounds memory) and are batched to an eighth of the window.
        """
        if self.local_backed_up or self.ungranted < self.window // 8:
            return 0
        grant, self.ungranted = self.ungranted, 0
        self.recv_allowance += grant
        return grant

    def remote_fin(self) -> None:
        self.inbound = Half.FINISHED

    # -- lifecycle -----------------------------------------------------------------------------

    def connected(self, now: float) -> None:
        self.phase = Phase.ESTABLISHED
        self.connected_at = now

    def is_finished(self) -> bool:
        """Both directions are done: the stream ends cleanly."""
        return self.outbound is Half.FINISHED and self.inbound is Half.FINISHED

    def end(self) -> None:
        self.phase = Phase.ENDED
        self.send_buffer.clear()
        self.early_data.clear()
