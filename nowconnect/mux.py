"""
One tunnel's stream table: frames in from the link, bytes in from local sockets, and what each
must cause on the other side.  Pure: it speaks to typed ports (L{LocalSide} for a socket,
L{MuxObserver} for metrics and logs, an output callback for the link) and to an injected clock.

The hub opens streams (L{Mux.open_stream}); the agent accepts them through an L{Acceptor} and
attaches the target socket when it connects (L{Mux.attach}).  Frames produced during one reactor
turn are batched: the mux calls C{wake} once when output becomes pending and the link collects
everything with L{Mux.take_output}.
"""
# -*- test-case-name: tests.test_mux -*-

from __future__ import annotations

from typing import Callable, Iterator, Protocol

from twisted.internet.interfaces import IDelayedCall

from nowconnect import wire
from nowconnect.stream import CreditError, Half, Phase, Stream
from nowconnect.wire import ProtocolError, ResetCode

HUB = "hub"
AGENT = "agent"

#: Output is cut into messages of about this size; a frame is never split.
MAX_MESSAGE = 4 * 1024 * 1024

#: Parts shorter than this (headers, control frames, small payloads) are copied together into
#: one chunk; longer payloads stay separate chunks, so the link can send them without a copy.
COALESCE_BELOW = 8192


class LocalSide(Protocol):
    """The local TCP socket of a stream (client on the hub, target on the agent)."""

    def write(self, data: bytes) -> None: ...

    def write_eof(self) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class MuxObserver(Protocol):
    """Metrics and logs see every stream event through this port."""

    def stream_opened(self, stream: Stream) -> None: ...

    def stream_connected(self, stream: Stream) -> None: ...

    def bytes_moved(self, stream: Stream, direction: str, n: int) -> None: ...

    def close_event(self, stream: Stream, event: str) -> None: ...

    def stream_ended(self, stream: Stream, outcome: str) -> None: ...

    def limit_hit(self, limit: str) -> None: ...


class Acceptor(Protocol):
    """Agent side: start connecting a stream's target; later call attach() or reject()."""

    def __call__(self, stream_id: int, connector: str, client: str) -> None: ...


class Clock(Protocol):
    def seconds(self) -> float: ...

    def callLater(self, delay: float, f: Callable[..., object], *a: object) -> IDelayedCall: ...


class NullObserver:
    """An observer that records nothing."""

    def stream_opened(self, stream: Stream) -> None:
        pass

    def stream_connected(self, stream: Stream) -> None:
        pass

    def bytes_moved(self, stream: Stream, direction: str, n: int) -> None:
        pass

    def close_event(self, stream: Stream, event: str) -> None:
        pass

    def stream_ended(self, stream: Stream, outcome: str) -> None:
        pass

    def limit_hit(self, limit: str) -> None:
        pass


class Mux:
    """
    The streams of one tunnel.  Protocol violations raise L{ProtocolError} out of L{receive};
    the caller closes the tunnel and then calls L{close_all}.

    C{max_pending} bounds the bytes this side has sent on all streams together and the peer has
    not yet granted back: past it every local socket stops being read until grants bring the
    total under half of it.  Per-stream windows bound one stream; this bounds thousands.  Only
    what a stream has outstanding beyond the peer's grant threshold (an eighth of the window)
    counts: below it the peer may rightly hold a grant back forever (an idle LDAP connection
    that sent a few requests), and counting those remainders would stall a busy tunnel.
    """

    def __init__(
        self,
        role: str,
        *,
        window: int,
        max_frame: int,
        clock: Clock,
        wake: Callable[[], None],
        observer: MuxObserver | None = None,
        acceptor: Acceptor | None = None,
        connectors: frozenset[str] = frozenset(),
        max_pending: int | None = None,
    ) -> None:
        if role not in (HUB, AGENT):
            raise ValueError(role)
        self.role = role
        self.window = window
        self.max_frame = max_frame
        self._clock = clock
        self._wake = wake
        self._observer: MuxObserver = observer or NullObserver()
        self._acceptor = acceptor
        self._connectors = connectors
        self._streams: dict[int, Stream] = {}
        self._locals: dict[int, LocalSide] = {}
        self._messages: list[list[bytes]] = []
        self._current: list[bytes] = []
        self._small = bytearray()
        self._current_size = 0
        self._out_size = 0
        self._next_id = 1
        self._highest_seen = 0
        self._link_paused = False
        self._max_pending = max_pending
        self._pending = 0
        self._over_budget = False
        self._closed = False
        # Our reads are c2a on the hub (client side) and a2c on the agent (target side).
        self._local_dir, self._remote_dir = ("c2a", "a2c") if role == HUB else ("a2c", "c2a")

    # -- introspection -------------------------------------------------------------------------

    def stream_count(self) -> int:
        return len(self._streams)

    def streams(self) -> Iterator[Stream]:
        return iter(list(self._streams.values()))

    def stream(self, stream_id: int) -> Stream | None:
        return self._streams.get(stream_id)

    def pending_output(self) -> int:
        return self._out_size

    def unacknowledged(self) -> int:
        """
        Bytes counted against C{max_pending}: per stream, what is outstanding (sent, not yet
        granted back) beyond an eighth of the window.
        """
        return self._pending

    # -- output --------------------------------------------------------------------------------

    def _emit(self, *parts: bytes) -> None:
        """Queue the parts of one frame; a message boundary never falls inside a frame."""
        if self._closed:
            return
        if not self._out_size:
            self._wake()
        if self._current_size >= MAX_MESSAGE:
            self._seal_small()
            self._messages.append(self._current)
            self._current, self._current_size = [], 0
        for part in parts:
            n = len(part)
            if n < COALESCE_BELOW:
                self._small += part
            else:
                self._seal_small()
                self._current.append(part)
            self._current_size += n
            self._out_size += n

    def _seal_small(self) -> None:
        if self._small:
            self._current.append(bytes(self._small))
            self._small.clear()

    def _emit_frame(self, frame: wire.Frame) -> None:
        self._emit(wire.encode(frame))

    def _emit_data(self, stream_id: int, data: bytes) -> None:
        size = self.max_frame
        if len(data) <= size:
            self._emit(wire.encode_data_header(stream_id, len(data)), data)
            return
        for start in range(0, len(data), size):
            piece = data[start : start + size]
            self._emit(wire.encode_data_header(stream_id, len(piece)), piece)

    def take_output(self) -> list[bytes]:
        """
        Everything produced since the last call, as message bodies of about L{MAX_MESSAGE}
        bytes each.
        """
        return [b"".join(chunks) for chunks in self.take_output_chunks()]

    def take_output_chunks(self) -> list[list[bytes]]:
        """
        Like L{take_output}, but each message as the chunks that make it up, so the link can
        write large payloads without joining them into one buffer first.
        """
        if not self._out_size:
            return []
        self._seal_small()
        messages = self._messages
        messages.append(self._current)
        self._messages, self._current, self._current_size, self._out_size = [], [], 0, 0
        return messages

    # -- hub: opening streams ------------------------------------------------------------------

    def open_stream(self, connector: str, client: str, local: LocalSide) -> int:
        """Hub: start a stream for a freshly accepted client socket and send OPEN."""
        stream_id = self._next_id
        self._next_id += 1
        stream = Stream(stream_id, connector, client, self.window, self._clock.seconds())
        self._streams[stream_id] = stream
        self._locals[stream_id] = local
        self._emit_frame(wire.Open(stream_id, connector, client))
        self._observer.stream_opened(stream)
        if self._link_paused or self._over_budget:
            self._set_reading(stream, local)
        return stream_id

    # -- agent: accepting streams --------------------------------------------------------------

    def attach(self, stream_id: int, local: LocalSide) -> bool:
        """
        Agent: the target connected.  Send CONNECTED and deliver what arrived meanwhile.
        Returns False if the stream is gone (the hub reset it): close the target then.
        """
        stream = self._streams.get(stream_id)
        if stream is None or self._closed:
            return False
        self._locals[stream_id] = local
        stream.connected(self._clock.seconds())
        self._emit_frame(wire.Connected(stream_id))
        self._observer.stream_connected(stream)
        early, stream.early_data = stream.early_data, []
        for data in early:
            self._deliver(stream, local, data)
        if self._link_paused or self._over_budget:
            self._set_reading(stream, local)
        if stream.inbound is Half.FINISHED:
            local.write_eof()
            self._maybe_finished(stream)
        return True

    def reject(self, stream_id: int, code: ResetCode, reason: str = "") -> None:
        """Agent: the target could not be reached; reset the stream toward the hub."""
        self.reset(stream_id, code, reason)

    # -- local socket events -------------------------------------------------------------------

    def local_data(self, stream_id: int, data: bytes) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.outbound is not Half.OPEN:
            return
        stream.last_activity = self._clock.seconds()
        self._observer.bytes_moved(stream, self._local_dir, len(data))
        before = _counted(stream)
        now = stream.take_sendable(data)
        if now:
            self._emit_data(stream_id, now)
            self._add_pending(_counted(stream) - before)
        self._set_reading(stream, self._locals[stream_id])

    def local_eof(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        if stream.local_eof():
            self._send_fin(stream)

    def local_backed_up(self, stream_id: int) -> None:
        """The local socket's write buffer is full: stop granting credit to the peer."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.local_backed_up = True

    def local_drained(self, stream_id: int) -> None:
        """The local socket's write buffer drained: grant what it took."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.local_backed_up = False
            self._maybe_grant(stream)

    def local_lost(self, stream_id: int, reason: str = "") -> None:
        """
        The local socket is gone.  After a clean end this is a no-op; otherwise the peer gets
        RST, because its bytes can no longer be delivered.
        """
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        code = ResetCode.client_reset if self.role == HUB else ResetCode.target_reset
        self._emit_frame(wire.Reset(stream_id, code, reason))
        self._observer.close_event(stream, "RST_SENT")
        self._end(stream, code.name, abort_local=False)

    def reset(self, stream_id: int, code: ResetCode, reason: str = "") -> None:
        """Abort a stream from this side: RST to the peer, abort the local socket."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        self._emit_frame(wire.Reset(stream_id, code, reason))
        self._observer.close_event(stream, "RST_SENT")
        self._end(stream, code.name, abort_local=True)

    # -- link events ---------------------------------------------------------------------------

    def link_paused(self) -> None:
        """The tunnel's transport is backed up: stop reading every local socket."""
        self._link_paused = True
        self._refresh_reading()

    def link_resumed(self) -> None:
        self._link_paused = False
        self._refresh_reading()

    def close_all(self, code: ResetCode = ResetCode.tunnel_lost) -> None:
        """The tunnel is gone: abort every local socket.  Nothing more is sent."""
        self._closed = True
        self._messages, self._current, self._current_size, self._out_size = [], [], 0, 0
        self._small.clear()
        for stream in list(self._streams.values()):
            self._end(stream, code.name, abort_local=True)

    def receive(self, frames: list[wire.Frame]) -> None:
        for frame in frames:
            if isinstance(frame, wire.Data):
                self._on_data(frame)
            elif isinstance(frame, wire.Window):
                self._on_window(frame)
            elif isinstance(frame, wire.Fin):
                self._on_fin(frame)
            elif isinstance(frame, wire.Reset):
                self._on_reset(frame)
            elif isinstance(frame, wire.Open):
                self._on_open(frame)
            elif isinstance(frame, wire.Connected):
                self._on_connected(frame)
            else:
                raise ProtocolError(f"{type(frame).__name__.upper()} after the handshake")
            if self._closed:
                return

    # -- frame handlers ------------------------------------------------------------------------

    def _lookup(self, stream_id: int) -> Stream | None:
        """
        The live stream, or None for one that already ended here (a race the peer cannot
        avoid, so its frames are dropped).  An id never opened is a protocol error.
        """
        stream = self._streams.get(stream_id)
        if stream is not None:
            return stream
        known = self._next_id - 1 if self.role == HUB else self._highest_seen
        if stream_id == 0 or stream_id > known:
            raise ProtocolError(f"frame for unknown stream {stream_id}")
        return None

    def _on_open(self, frame: wire.Open) -> None:
        if self.role != AGENT or self._acceptor is None:
            raise ProtocolError("OPEN sent to the hub")
        if frame.stream_id <= self._highest_seen:
            raise ProtocolError(f"OPEN reuses stream id {frame.stream_id}")
        if frame.connector not in self._connectors:
            raise ProtocolError(f"OPEN for undeclared connector {frame.connector!r}")
        self._highest_seen = frame.stream_id
        stream = Stream(
            frame.stream_id, frame.connector, frame.client, self.window, self._clock.seconds()
        )
        self._streams[frame.stream_id] = stream
        self._observer.stream_opened(stream)
        self._acceptor(frame.stream_id, frame.connector, frame.client)

    def _on_connected(self, frame: wire.Connected) -> None:
        if self.role != HUB:
            raise ProtocolError("CONNECTED sent to the agent")
        stream = self._lookup(frame.stream_id)
        if stream is None:
            return
        if stream.phase is not Phase.CONNECTING:
            raise ProtocolError(f"second CONNECTED for stream {frame.stream_id}")
        stream.connected(self._clock.seconds())
        self._observer.stream_connected(stream)

    def _on_data(self, frame: wire.Data) -> None:
        stream = self._lookup(frame.stream_id)
        if stream is None:
            return
        if stream.inbound is not Half.OPEN:
            raise ProtocolError(f"DATA after FIN on stream {frame.stream_id}")
        if self.role == HUB and stream.phase is Phase.CONNECTING:
            raise ProtocolError(f"DATA before CONNECTED on stream {frame.stream_id}")
        try:
            stream.data_received(len(frame.payload))
        except CreditError as e:
            raise ProtocolError(str(e)) from None
        stream.last_activity = self._clock.seconds()
        self._observer.bytes_moved(stream, self._remote_dir, len(frame.payload))
        local = self._locals.get(frame.stream_id)
        if local is None:
            stream.early_data.append(frame.payload)
        else:
            self._deliver(stream, local, frame.payload)

    def _deliver(self, stream: Stream, local: LocalSide, data: bytes) -> None:
        local.write(data)
        stream.delivered(len(data))
        self._maybe_grant(stream)

    def _maybe_grant(self, stream: Stream) -> None:
        if stream.phase is Phase.ENDED or stream.inbound is not Half.OPEN:
            return
        grant = stream.take_grant()
        if grant:
            self._emit_frame(wire.Window(stream.stream_id, grant))

    def _on_window(self, frame: wire.Window) -> None:
        stream = self._lookup(frame.stream_id)
        if stream is None:
            return
        if stream.send_credit + frame.credit > wire.MAX_U32:
            raise ProtocolError(f"WINDOW overflows credit on stream {frame.stream_id}")
        before = _counted(stream)
        for chunk in stream.grant_received(frame.credit):
            self._emit_data(stream.stream_id, chunk)
        self._add_pending(_counted(stream) - before)
        if stream.fin_ready():
            self._send_fin(stream)
            return
        local = self._locals.get(stream.stream_id)
        if local is not None:
            self._set_reading(stream, local)

    def _on_fin(self, frame: wire.Fin) -> None:
        stream = self._lookup(frame.stream_id)
        if stream is None:
            return
        if stream.inbound is not Half.OPEN:
            raise ProtocolError(f"second FIN on stream {frame.stream_id}")
        if self.role == HUB and stream.phase is Phase.CONNECTING:
            raise ProtocolError(f"FIN before CONNECTED on stream {frame.stream_id}")
        stream.remote_fin()
        self._observer.close_event(stream, "FIN_RECV")
        local = self._locals.get(frame.stream_id)
        if local is not None:
            local.write_eof()
            self._maybe_finished(stream)

    def _on_reset(self, frame: wire.Reset) -> None:
        stream = self._lookup(frame.stream_id)
        if stream is None:
            return
        self._observer.close_event(stream, "RST_RECV")
        self._end(stream, frame.code.name, abort_local=True)

    # -- helpers -------------------------------------------------------------------------------

    def _send_fin(self, stream: Stream) -> None:
        self._emit_frame(wire.Fin(stream.stream_id))
        self._observer.close_event(stream, "FIN_SENT")
        self._maybe_finished(stream)

    def _maybe_finished(self, stream: Stream) -> None:
        if stream.is_finished():
            local = self._locals.get(stream.stream_id)
            self._end(stream, "fin", abort_local=False)
            if local is not None:
                local.close()

    def _add_pending(self, delta: int) -> None:
        self._pending = max(0, self._pending + delta)
        limit = self._max_pending
        if limit is None:
            return
        if not self._over_budget and self._pending >= limit:
            self._over_budget = True
            self._observer.limit_hit("pending_bytes_per_tunnel")
            self._refresh_reading()
        elif self._over_budget and self._pending < limit // 2:
            self._over_budget = False
            self._refresh_reading()

    def _refresh_reading(self) -> None:
        for stream_id, local in list(self._locals.items()):
            stream = self._streams.get(stream_id)
            if stream is not None:
                self._set_reading(stream, local)

    def _set_reading(self, stream: Stream, local: LocalSide) -> None:
        paused = self._link_paused or self._over_budget or stream.wants_reading_paused()
        if paused != stream.reading_paused:
            stream.reading_paused = paused
            if paused:
                local.pause_reading()
            else:
                local.resume_reading()

    def _end(self, stream: Stream, outcome: str, *, abort_local: bool) -> None:
        del self._streams[stream.stream_id]
        if not self._closed:
            self._add_pending(-_counted(stream))
        local = self._locals.pop(stream.stream_id, None)
        stream.end()
        self._observer.stream_ended(stream, outcome)
        if abort_local and local is not None:
            local.abort()


def _counted(stream: Stream) -> int:
    """What C{stream} contributes to the tunnel budget (see L{Mux})."""
    return max(0, stream.window - stream.send_credit - stream.window // 8)
