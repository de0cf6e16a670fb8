"""
Tests for L{nowconnect.mux}: two muxes, a hub and an agent, wired back to back.

The local sockets are L{FakeLocal} objects that record what the mux asks of them; the link is a
pump that moves each mux's L{Mux.take_output} messages through L{wire.decode_message} into the
other mux's L{Mux.receive}.  Time is a L{Clock}.  Nothing here touches Twisted's reactor.
"""
# -*- test-case-name: tests.test_mux -*-

from __future__ import annotations

import random
from typing import Any

import attrs
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nowconnect import mux as muxmod
from nowconnect import wire
from nowconnect.mux import AGENT, HUB, Mux
from nowconnect.stream import Half, Phase, Stream
from nowconnect.wire import ProtocolError, ResetCode

WINDOW = 8192
MAX_FRAME = 1024
CONNECTOR = "addomain"
CLIENT = "10.1.2.3:40000"


class FakeLocal:
    """A L{mux.LocalSide} that records every call and what was written."""

    def __init__(self, name: str = "local") -> None:
        self.name = name
        self.calls: list[str] = []
        self.received = bytearray()
        self.paused = False
        self.eof = False
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        assert not (self.eof or self.closed or self.aborted), f"{self.name}: write after end"
        self.calls.append("write")
        self.received += data

    def write_eof(self) -> None:
        self.calls.append("write_eof")
        self.eof = True

    def close(self) -> None:
        self.calls.append("close")
        self.closed = True

    def abort(self) -> None:
        self.calls.append("abort")
        self.aborted = True

    def pause_reading(self) -> None:
        self.calls.append("pause_reading")
        self.paused = True

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")
        self.paused = False

    def count(self, call: str) -> int:
        return self.calls.count(call)


class RecordingObserver:
    """A L{mux.MuxObserver} keeping (event, stream id, detail) tuples."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, Any]] = []

    def stream_opened(self, stream: Stream) -> None:
        self.events.append(("opened", stream.stream_id, stream.connector))

    def stream_connected(self, stream: Stream) -> None:
        self.events.append(("connected", stream.stream_id, None))

    def bytes_moved(self, stream: Stream, direction: str, n: int) -> None:
        self.events.append(("bytes", stream.stream_id, (direction, n)))

    def close_event(self, stream: Stream, event: str) -> None:
        self.events.append(("close_event", stream.stream_id, event))

    def stream_ended(self, stream: Stream, outcome: str) -> None:
        self.events.append(("ended", stream.stream_id, outcome))

    def limit_hit(self, limit: str) -> None:
        self.events.append(("limit", 0, limit))

    def outcomes(self) -> list[tuple[int, str]]:
        return [(sid, detail) for (kind, sid, detail) in self.events if kind == "ended"]

    def close_events(self) -> list[str]:
        return [detail for (kind, _, detail) in self.events if kind == "close_event"]


@attrs.define
class Pair:
    """A hub mux and an agent mux with a manual link between them."""

    clock: Clock
    hub: Mux
    agent: Mux
    hub_obs: RecordingObserver
    agent_obs: RecordingObserver
    accepted: list[tuple[int, str, str]]
    wakes: dict[str, int]
    messages: dict[str, list[bytes]] = attrs.field(factory=lambda: {HUB: [], AGENT: []})

    def move(self, src: Mux, dst: Mux) -> int:
        """Deliver one batch from C{src} to C{dst}; return the number of messages moved."""
        out = src.take_output()
        for message in out:
            self.messages[src.role].append(message)
            dst.receive(wire.decode_message(message, dst.max_frame))
        return len(out)

    def pump(self) -> None:
        """Move output both ways until neither side has anything left to say."""
        for _ in range(1000):
            if not (self.move(self.hub, self.agent) + self.move(self.agent, self.hub)):
                return
        raise AssertionError("link never went quiet")

    def frames_from(self, role: str) -> list[wire.Frame]:
        """Every frame the C{role} side has sent so far through L{move}."""
        frames: list[wire.Frame] = []
        for message in self.messages[role]:
            frames.extend(wire.decode_message(message, MAX_FRAME * 64))
        return frames

    def open(self, hub_local: FakeLocal | None = None) -> tuple[int, FakeLocal]:
        """Open a stream from the hub and pump OPEN to the agent; no attach yet."""
        hub_local = hub_local or FakeLocal("client")
        sid = self.hub.open_stream(CONNECTOR, CLIENT, hub_local)
        self.pump()
        return sid, hub_local

    def connect(self) -> tuple[int, FakeLocal, FakeLocal]:
        """Open a stream and attach a target; both sides ESTABLISHED."""
        sid, hub_local = self.open()
        target = FakeLocal("target")
        assert self.agent.attach(sid, target)
        self.pump()
        return sid, hub_local, target


def make_pair(window: int = WINDOW, max_frame: int = MAX_FRAME,
              max_pending: int | None = None) -> Pair:
    """
    A hub and an agent mux sharing one clock, with recording observers; C{max_pending} is the
    per-tunnel budget of both.
    """
    clock = Clock()
    clock.advance(1000)
    accepted: list[tuple[int, str, str]] = []
    wakes = {HUB: 0, AGENT: 0}
    hub_obs, agent_obs = RecordingObserver(), RecordingObserver()

    def wake(role: str) -> Any:
        def w() -> None:
            wakes[role] += 1
        return w

    hub = Mux(HUB, window=window, max_frame=max_frame, clock=clock, wake=wake(HUB),
              observer=hub_obs, max_pending=max_pending)
    agent = Mux(AGENT, window=window, max_frame=max_frame, clock=clock, wake=wake(AGENT),
                observer=agent_obs, max_pending=max_pending,
                acceptor=lambda sid, connector, client: accepted.append((sid, connector, client)),
                connectors=frozenset({CONNECTOR, "other"}))
    return Pair(clock, hub, agent, hub_obs, agent_obs, accepted, wakes)


def pattern(n: int, seed: int = 0) -> bytes:
    """n pseudo-random bytes (fixed per seed), so any reordering or loss shows."""
    return random.Random(seed).randbytes(n)


# -- opening and relaying ----------------------------------------------------------------------


class OpenTests(SynchronousTestCase):
    def test_open_accept_attach_connected(self) -> None:
        """
        open_stream sends OPEN; the agent's acceptor is called with the stream id, connector
        and client; attach sends CONNECTED and both sides become ESTABLISHED.
        """
        p = make_pair()
        sid = p.hub.open_stream(CONNECTOR, CLIENT, FakeLocal())
        self.assertEqual(sid, 1)
        self.assertEqual(p.hub.stream_count(), 1)
        self.assertIs(p.hub.stream(sid).phase, Phase.CONNECTING)  # type: ignore[union-attr]
        self.assertEqual(p.accepted, [])
        p.pump()
        self.assertEqual(p.accepted, [(sid, CONNECTOR, CLIENT)])
        self.assertEqual(p.agent.stream_count(), 1)
        agent_stream = p.agent.stream(sid)
        assert agent_stream is not None
        self.assertIs(agent_stream.phase, Phase.CONNECTING)
        self.assertEqual((agent_stream.connector, agent_stream.client), (CONNECTOR, CLIENT))

        self.assertTrue(p.agent.attach(sid, FakeLocal()))
        p.pump()
        self.assertIs(p.agent.stream(sid).phase, Phase.ESTABLISHED)  # type: ignore[union-attr]
        self.assertIs(p.hub.stream(sid).phase, Phase.ESTABLISHED)  # type: ignore[union-attr]
        self.assertEqual(p.frames_from(HUB), [wire.Open(sid, CONNECTOR, CLIENT)])
        self.assertEqual(p.frames_from(AGENT), [wire.Connected(sid)])
        self.assertIn(("connected", sid, None), p.hub_obs.events)
        self.assertIn(("connected", sid, None), p.agent_obs.events)

    def test_stream_ids_increase(self) -> None:
        """The hub numbers streams 1, 2, 3, ... and never reuses an id."""
        p = make_pair()
        ids = [p.hub.open_stream(CONNECTOR, CLIENT, FakeLocal()) for _ in range(3)]
        self.assertEqual(ids, [1, 2, 3])
        p.hub.reset(2, ResetCode.client_reset)
        self.assertEqual(p.hub.open_stream(CONNECTOR, CLIENT, FakeLocal()), 4)
        self.assertEqual(sorted(s.stream_id for s in p.hub.streams()), [1, 3, 4])

    def test_bytes_both_ways(self) -> None:
        """Bytes written on either local socket arrive, intact, on the other."""
        p = make_pair()
        sid, client, target = p.connect()
        p.hub.local_data(sid, b"bind request")
        p.pump()
        self.assertEqual(bytes(target.received), b"bind request")
        p.agent.local_data(sid, b"bind response")
        p.pump()
        self.assertEqual(bytes(client.received), b"bind response")
        self.assertIn(("bytes", sid, ("c2a", 12)), p.hub_obs.events)
        self.assertIn(("bytes", sid, ("c2a", 12)), p.agent_obs.events)
        self.assertIn(("bytes", sid, ("a2c", 13)), p.agent_obs.events)
        self.assertIn(("bytes", sid, ("a2c", 13)), p.hub_obs.events)

    def test_streams_are_independent(self) -> None:
        """Two streams on one tunnel each deliver only their own bytes."""
        p = make_pair()
        a, client_a, target_a = p.connect()
        b, client_b, target_b = p.connect()
        p.hub.local_data(a, b"to a")
        p.hub.local_data(b, b"to b")
        p.agent.local_data(b, b"from b")
        p.pump()
        self.assertEqual(bytes(target_a.received), b"to a")
        self.assertEqual(bytes(target_b.received), b"to b")
        self.assertEqual(bytes(client_b.received), b"from b")
        self.assertEqual(bytes(client_a.received), b"")

    def test_optimistic_open(self) -> None:
        """
        Hub bytes sent right after OPEN, before the target connected, are buffered at the agent
        and delivered on attach, in order, before anything sent after attach.
        """
        p = make_pair()
        client = FakeLocal()
        sid = p.hub.open_stream(CONNECTOR, CLIENT, client)
        p.hub.local_data(sid, b"first ")
        p.hub.local_data(sid, b"second ")
        p.pump()
        self.assertEqual(p.accepted, [(sid, CONNECTOR, CLIENT)])
        # Both frames travelled with OPEN in one message.
        self.assertEqual(len(p.messages[HUB]), 1)
        self.assertEqual(p.agent.stream(sid).early_data, [b"first ", b"second "])  # type: ignore[union-attr]
        target = FakeLocal()
        self.assertTrue(p.agent.attach(sid, target))
        self.assertEqual(bytes(target.received), b"first second ")
        p.pump()
        p.hub.local_data(sid, b"third")
        p.pump()
        self.assertEqual(bytes(target.received), b"first second third")

    def test_attach_after_reset_returns_false(self) -> None:
        """attach() for a stream the hub already reset returns False and touches nothing."""
        p = make_pair()
        sid, client = p.open()
        p.hub.local_lost(sid, "client went away")
        p.pump()
        self.assertEqual(p.agent.stream_count(), 0)
        target = FakeLocal()
        self.assertFalse(p.agent.attach(sid, target))
        self.assertEqual(target.calls, [])
        self.assertEqual(p.agent.take_output(), [])


# -- flow control ------------------------------------------------------------------------------


class CreditTests(SynchronousTestCase):
    def test_sender_pauses_when_window_spent_and_resumes_on_window(self) -> None:
        """
        The hub pauses its client's reading once a window is in flight and resumes it when the
        agent's WINDOW arrives; the bytes beyond the window wait and follow in order.
        """
        p = make_pair()
        sid, client, target = p.connect()
        p.agent.local_backed_up(sid)
        data = pattern(WINDOW + 100)
        p.hub.local_data(sid, data)
        self.assertEqual(client.calls, ["pause_reading"])
        self.assertEqual(p.hub.stream(sid).send_buffered, 100)  # type: ignore[union-attr]
        p.pump()
        # The agent delivered a window but its socket is backed up: no WINDOW, still paused.
        self.assertEqual(bytes(target.received), data[:WINDOW])
        self.assertTrue(client.paused)
        self.assertNotIn(wire.Window(sid, WINDOW), p.frames_from(AGENT))
        p.agent.local_drained(sid)
        p.pump()
        self.assertEqual(client.calls, ["pause_reading", "resume_reading"])
        self.assertEqual(bytes(target.received), data)
        self.assertIn(wire.Window(sid, WINDOW), p.frames_from(AGENT))

    def test_no_pause_within_window(self) -> None:
        """Reads that stay within the credit never pause the local socket."""
        p = make_pair()
        sid, client, target = p.connect()
        for _ in range(10):
            p.hub.local_data(sid, b"x" * (WINDOW // 4))
            p.pump()
        self.assertEqual(client.calls, [])
        self.assertEqual(len(target.received), 10 * (WINDOW // 4))

    def test_receiver_grants_every_eighth(self) -> None:
        """The receiver grants credit in batches of at least window/8, not per frame."""
        p = make_pair()
        sid, client, target = p.connect()
        small = WINDOW // 8 // 4
        for _ in range(3):
            p.hub.local_data(sid, b"y" * small)
        p.pump()
        self.assertEqual([f for f in p.frames_from(AGENT) if isinstance(f, wire.Window)], [])
        p.hub.local_data(sid, b"y" * small)
        p.pump()
        self.assertEqual([f for f in p.frames_from(AGENT) if isinstance(f, wire.Window)],
                         [wire.Window(sid, WINDOW // 8)])

    def test_receiver_withholds_grants_while_backed_up(self) -> None:
        """
        While the receiving local socket is backed up no WINDOW is sent, however much is
        delivered; local_drained grants it all in one WINDOW.
        """
        p = make_pair()
        sid, client, target = p.connect()
        p.hub.local_backed_up(sid)
        for _ in range(4):
            p.agent.local_data(sid, b"z" * (WINDOW // 4))
            p.pump()
        self.assertEqual(len(client.received), WINDOW)
        self.assertEqual([f for f in p.frames_from(HUB) if isinstance(f, wire.Window)], [])
        self.assertTrue(target.paused)
        p.agent.local_data(sid, b"more")
        p.pump()
        self.assertEqual(len(client.received), WINDOW)
        p.hub.local_drained(sid)
        p.pump()
        self.assertEqual([f for f in p.frames_from(HUB) if isinstance(f, wire.Window)],
                         [wire.Window(sid, WINDOW)])
        self.assertFalse(target.paused)
        self.assertEqual(bytes(client.received[-4:]), b"more")

    def test_drained_without_pending_grant_sends_nothing(self) -> None:
        """local_drained with less than window/8 owed sends no WINDOW."""
        p = make_pair()
        sid, client, target = p.connect()
        p.hub.local_data(sid, b"q")
        p.pump()
        p.agent.local_backed_up(sid)
        p.agent.local_drained(sid)
        self.assertEqual(p.agent.take_output(), [])

    def test_window_overflow_is_a_protocol_error(self) -> None:
        """A WINDOW that would push the credit past 2**32-1 is a protocol error."""
        p = make_pair()
        sid, client, target = p.connect()
        with self.assertRaises(ProtocolError):
            p.hub.receive([wire.Window(sid, wire.MAX_U32)])


# -- half-close, reset, reject, tunnel loss ----------------------------------------------------


class HalfCloseTests(SynchronousTestCase):
    def test_client_half_closes_first(self) -> None:
        """
        Client EOF becomes FIN and write_eof on the target; the stream lives on (the target can
        still answer) until the target's EOF, then both sides end and close their sockets.
        """
        p = make_pair()
        sid, client, target = p.connect()
        p.hub.local_eof(sid)
        p.pump()
        self.assertEqual(target.calls, ["write_eof"])
        self.assertEqual((p.hub.stream_count(), p.agent.stream_count()), (1, 1))
        self.assertIs(p.hub.stream(sid).outbound, Half.FINISHED)  # type: ignore[union-attr]
        self.assertIs(p.agent.stream(sid).inbound, Half.FINISHED)  # type: ignore[union-attr]
        p.agent.local_data(sid, b"late answer")
        p.pump()
        self.assertEqual(bytes(client.received), b"late answer")
        p.agent.local_eof(sid)
        p.pump()
        self.assertEqual(client.calls, ["write", "write_eof", "close"])
        self.assertEqual(target.calls, ["write_eof", "close"])
        self.assertEqual((p.hub.stream_count(), p.agent.stream_count()), (0, 0))
        self.assertEqual(p.hub_obs.outcomes(), [(sid, "fin")])
        self.assertEqual(p.agent_obs.outcomes(), [(sid, "fin")])
        self.assertEqual(p.hub_obs.close_events(), ["FIN_SENT", "FIN_RECV"])
        self.assertEqual(p.agent_obs.close_events(), ["FIN_RECV", "FIN_SENT"])

    def test_target_half_closes_first(self) -> None:
        """The same, the other way round: target EOF, then the client's."""
        p = make_pair()
        sid, client, target = p.connect()
        p.agent.local_eof(sid)
        p.pump()
        self.assertEqual(client.calls, ["write_eof"])
        self.assertEqual((p.hub.stream_count(), p.agent.stream_count()), (1, 1))
        p.hub.local_data(sid, b"still talking")
        p.pump()
        self.assertEqual(bytes(target.received), b"still talking")
        p.hub.local_eof(sid)
        p.pump()
        self.assertEqual(client.calls, ["write_eof", "close"])
        self.assertEqual(target.calls, ["write", "write_eof", "close"])
        self.assertEqual((p.hub.stream_count(), p.agent.stream_count()), (0, 0))

    def test_fin_waits_for_buffered_bytes(self) -> None:
        """
        EOF while bytes wait for credit: FIN goes only after those bytes, once WINDOW lets
        them out, so the far side sees every byte and then EOF.
        """
        p = make_pair()
        sid, client, target = p.connect()
        p.agent.local_backed_up(sid)
        data = pattern(WINDOW + 50)
        p.hub.local_data(sid, data)
        p.hub.local_eof(sid)
        p.pump()
        self.assertNotIn("write_eof", target.calls)
        self.assertIs(p.hub.stream(sid).outbound, Half.FINISHING)  # type: ignore[union-attr]
        p.agent.local_drained(sid)
        p.pump()
        self.assertEqual(bytes(target.received), data)
        self.assertEqual(target.calls[-1], "write_eof")

    def test_data_after_eof_is_ignored(self) -> None:
        """local_data after local_eof (a confused socket) sends nothing."""
        p = make_pair()
        sid, client, target = p.connect()
        p.hub.local_eof(sid)
        p.pump()
        p.hub.local_data(sid, b"ghost")
        self.assertEqual(p.hub.take_output(), [])

    def test_fin_before_attach(self) -> None:
        """
        A client that sends and half-closes before the target connects: the agent delivers the
        bytes and then write_eof on attach.
        """
        p = make_pair()
        sid, client = p.open()
        p.hub.local_data(sid, b"query")
        p.hub.local_eof(sid)
        p.pump()
        target = FakeLocal()
        self.assertTrue(p.agent.attach(sid, target))
        self.assertEqual(target.calls, ["write", "write_eof"])
        self.assertEqual(bytes(target.received), b"query")
        p.pump()
        self.assertEqual(p.agent.stream_count(), 1)
        p.agent.local_data(sid, b"answer")
        p.agent.local_eof(sid)
        p.pump()
        self.assertEqual(bytes(client.received), b"answer")
        self.assertEqual((p.hub.stream_count(), p.agent.stream_count()), (0, 0))
        self.assertTrue(client.closed and target.closed)


class ResetTests(SynchronousTestCase):
    def test_client_reset(self) -> None:
        """A client lost mid-stream becomes RST: the target is aborted, both streams removed."""
        p = make_pair()
        sid, client, target = p.connect()
        p.hub.local_lost(sid, "connection reset")
        self.assertEqual(p.hub.stream_count(), 0)
        p.pump()
        self.assertEqual(target.calls, ["abort"])
        self.assertEqual(client.calls, [])  # already gone; not aborted again
        self.assertEqual(p.agent.stream_count(), 0)
        self.assertEqual(p.frames_from(HUB)[-1],
                         wire.Reset(sid, ResetCode.client_reset, "connection reset"))
        self.assertEqual(p.hub_obs.outcomes(), [(sid, "client_reset")])
        self.assertEqual(p.agent_obs.outcomes(), [(sid, "client_reset")])

    def test_target_reset(self) -> None:
        """A target lost mid-stream becomes RST: the client is aborted, both streams removed."""
        p = make_pair()
        sid, client, target = p.connect()
        p.agent.local_lost(sid, "connection reset")
        p.pump()
        self.assertEqual(client.calls, ["abort"])
        self.assertEqual(target.calls, [])
        self.assertEqual((p.hub.stream_count(), p.agent.stream_count()), (0, 0))
        self.assertEqual(p.hub_obs.outcomes(), [(sid, "target_reset")])

    def test_hub_reset(self) -> None:
        """reset() on the hub aborts its own client and the far target."""
        p = make_pair()
        sid, client, target = p.connect()
        p.hub.reset(sid, ResetCode.idle_timeout, "idle")
        p.pump()
        self.assertEqual(client.calls, ["abort"])
        self.assertEqual(target.calls, ["abort"])
        self.assertEqual(p.agent_obs.outcomes(), [(sid, "idle_timeout")])
        self.assertEqual(p.hub_obs.close_events(), ["RST_SENT"])
        self.assertEqual(p.agent_obs.close_events(), ["RST_RECV"])

    def test_reset_before_attach(self) -> None:
        """A stream reset while the agent dials is gone when the dial completes."""
        p = make_pair()
        sid, client = p.open()
        p.hub.reset(sid, ResetCode.open_timeout)
        p.pump()
        self.assertEqual(p.agent.stream_count(), 0)
        self.assertFalse(p.agent.attach(sid, FakeLocal()))

    def test_reject_aborts_client(self) -> None:
        """A refused target: reject() sends RST and the hub aborts its client."""
        p = make_pair()
        sid, client = p.open()
        p.hub.local_data(sid, b"optimistic")
        p.pump()
        p.agent.reject(sid, ResetCode.target_refused, "connection refused")
        p.pump()
        self.assertEqual(client.calls, ["abort"])
        self.assertEqual((p.hub.stream_count(), p.agent.stream_count()), (0, 0))
        self.assertEqual(p.frames_from(AGENT),
                         [wire.Reset(sid, ResetCode.target_refused, "connection refused")])
        self.assertEqual(p.hub_obs.outcomes(), [(sid, "target_refused")])

    def test_reset_unknown_stream_is_a_no_op(self) -> None:
        """reset(), local_lost() and the local_* calls for a stream not in the table do nothing."""
        p = make_pair()
        p.hub.reset(5, ResetCode.shutdown)
        p.hub.local_lost(5)
        p.hub.local_data(5, b"x")
        p.hub.local_eof(5)
        p.hub.local_backed_up(5)
        p.hub.local_drained(5)
        self.assertEqual(p.hub.take_output(), [])
        self.assertEqual(p.wakes[HUB], 0)

    def test_tunnel_lost_aborts_every_local(self) -> None:
        """close_all() aborts every local socket on that side, sends nothing, ends every stream."""
        p = make_pair()
        streams = [p.connect() for _ in range(3)]
        pending, _ = p.open()
        p.hub.local_data(streams[0][0], b"unsent")
        p.hub.close_all()
        self.assertEqual(p.hub.stream_count(), 0)
        self.assertEqual(p.hub.take_output(), [])
        for _, client, _ in streams:
            self.assertEqual(client.calls[-1], "abort")
        self.assertEqual(sorted(p.hub_obs.outcomes()),
                         [(1, "tunnel_lost"), (2, "tunnel_lost"), (3, "tunnel_lost"),
                          (pending, "tunnel_lost")])
        p.agent.close_all()
        for _, _, target in streams:
            self.assertEqual(target.calls, ["abort"])
        self.assertEqual(p.agent.stream_count(), 0)
        # A dial that completes after the tunnel was lost is refused.
        self.assertFalse(p.agent.attach(pending, FakeLocal()))

    def test_nothing_sent_after_close_all(self) -> None:
        """After close_all, new work produces no output and no wake."""
        p = make_pair()
        p.hub.close_all()
        p.hub.open_stream(CONNECTOR, CLIENT, FakeLocal())
        self.assertEqual(p.hub.take_output(), [])
        self.assertEqual(p.wakes[HUB], 0)


class LinkPressureTests(SynchronousTestCase):
    def test_link_paused_pauses_every_local(self) -> None:
        """link_paused pauses every stream's local reading; link_resumed resumes them."""
        p = make_pair()
        streams = [p.connect() for _ in range(3)]
        p.hub.link_paused()
        p.agent.link_paused()
        for _, client, target in streams:
            self.assertEqual(client.calls, ["pause_reading"])
            self.assertEqual(target.calls, ["pause_reading"])
        p.hub.link_resumed()
        p.agent.link_resumed()
        for _, client, target in streams:
            self.assertEqual(client.calls, ["pause_reading", "resume_reading"])
            self.assertEqual(target.calls, ["pause_reading", "resume_reading"])

    def test_link_resumed_keeps_streams_without_credit_paused(self) -> None:
        """A stream whose credit is spent stays paused when the link resumes."""
        p = make_pair()
        (a, client_a, _), (_, client_b, _) = p.connect(), p.connect()
        p.agent.local_backed_up(a)
        p.hub.local_data(a, b"w" * WINDOW)
        p.pump()
        self.assertEqual(client_a.calls, ["pause_reading"])
        p.hub.link_paused()
        p.hub.link_resumed()
        self.assertTrue(client_a.paused)
        self.assertEqual(client_a.calls, ["pause_reading"])
        self.assertEqual(client_b.calls, ["pause_reading", "resume_reading"])

    def test_window_while_link_paused_keeps_reading_paused(self) -> None:
        """Credit arriving while the link is backed up does not resume reading."""
        p = make_pair()
        sid, client, target = p.connect()
        p.hub.local_data(sid, b"w" * WINDOW)
        p.hub.link_paused()
        p.pump()
        self.assertTrue(client.paused)
        self.assertEqual(p.hub.stream(sid).send_credit, WINDOW)  # type: ignore[union-attr]
        p.hub.link_resumed()
        self.assertFalse(client.paused)

    def test_open_while_link_paused(self) -> None:
        """A stream opened while the link is backed up starts paused."""
        p = make_pair()
        p.hub.link_paused()
        client = FakeLocal()
        p.hub.open_stream(CONNECTOR, CLIENT, client)
        self.assertEqual(client.calls, ["pause_reading"])

    def test_attach_while_link_paused(self) -> None:
        """A target attached while the agent's link is backed up starts paused."""
        p = make_pair()
        sid, client = p.open()
        p.agent.link_paused()
        target = FakeLocal()
        p.agent.attach(sid, target)
        self.assertTrue(target.paused)

    def test_attach_with_early_fin_while_link_paused(self) -> None:
        """
        A target attached while the agent's link is backed up starts paused even when the
        client had already half-closed (the target may still send its answer).
        """
        p = make_pair()
        sid, client = p.open()
        p.hub.local_eof(sid)
        p.pump()
        p.agent.link_paused()
        target = FakeLocal()
        p.agent.attach(sid, target)
        self.assertIn("write_eof", target.calls)
        self.assertTrue(target.paused)


class TunnelBudgetTests(SynchronousTestCase):
    """C{max_pending}: the bytes all streams of a tunnel together may have unacknowledged."""

    def test_unacknowledged_counts_sent_minus_granted(self) -> None:
        """
        unacknowledged() is, summed over streams, what was sent and not yet granted back beyond
        the peer's grant threshold (an eighth of the window).
        """
        p = make_pair(max_pending=10 * WINDOW)
        (a, _, _), (b, _, _) = p.connect(), p.connect()
        p.agent.local_backed_up(a)
        p.agent.local_backed_up(b)
        p.hub.local_data(a, b"x" * 3000)
        p.hub.local_data(b, b"y" * 2000)
        self.assertEqual(p.hub.unacknowledged(), (3000 - WINDOW // 8) + (2000 - WINDOW // 8))
        p.pump()
        p.agent.local_drained(a)
        p.pump()
        self.assertEqual(p.hub.unacknowledged(), 2000 - WINDOW // 8)

    def test_small_outstanding_remainders_do_not_count(self) -> None:
        """
        Streams holding less than the grant threshold outstanding (idle connections that sent
        a few small requests) never use up the budget, however many there are.
        """
        p = make_pair(max_pending=WINDOW)
        streams = [p.connect() for _ in range(50)]
        for sid, _, _ in streams:
            p.hub.local_data(sid, b"q" * (WINDOW // 8 - 1))
        p.pump()
        self.assertEqual(p.hub.unacknowledged(), 0)
        self.assertFalse(any(client.paused for _, client, _ in streams))

    def test_over_budget_pauses_every_stream_until_under_half(self) -> None:
        """
        Reaching the budget pauses reading on every stream (and reports limit_hit once);
        reading resumes only when grants bring the total under half the budget.
        """
        eighth = WINDOW // 8
        budget = (WINDOW - eighth) + (WINDOW // 2 - eighth)
        p = make_pair(max_pending=budget)
        (a, client_a, _), (b, client_b, _), (c, client_c, _) = (p.connect(), p.connect(),
                                                                 p.connect())
        for sid in (a, b, c):
            p.agent.local_backed_up(sid)
        p.hub.local_data(a, b"a" * WINDOW)  # a: out of credit, paused on its own
        self.assertEqual((client_a.paused, client_b.paused, client_c.paused), (True, False, False))
        p.hub.local_data(b, b"b" * (WINDOW // 2))  # total reaches the budget
        self.assertEqual((client_a.paused, client_b.paused, client_c.paused), (True, True, True))
        self.assertEqual([e for e in p.hub_obs.events if e[0] == "limit"],
                         [("limit", 0, "pending_bytes_per_tunnel")])
        p.pump()
        p.agent.local_drained(b)  # b granted back: a's share is left, not under half the budget
        p.pump()
        self.assertEqual(p.hub.unacknowledged(), WINDOW - eighth)
        self.assertTrue(client_b.paused and client_c.paused)
        p.agent.local_drained(a)  # a granted back: nothing left
        p.pump()
        self.assertEqual(p.hub.unacknowledged(), 0)
        self.assertEqual((client_a.paused, client_b.paused, client_c.paused),
                         (False, False, False))

    def test_open_and_attach_over_budget_start_paused(self) -> None:
        """Streams opened (hub) or attached (agent) while over budget start paused."""
        p = make_pair(max_pending=WINDOW // 2)
        a, client_a, target_a = p.connect()
        p.agent.local_backed_up(a)
        p.hub.local_backed_up(a)
        p.hub.local_data(a, b"x" * (WINDOW // 2 + WINDOW // 8))
        client = FakeLocal()
        sid = p.hub.open_stream(CONNECTOR, CLIENT, client)
        self.assertTrue(client.paused)
        p.agent.local_data(a, b"y" * (WINDOW // 2 + WINDOW // 8))
        p.pump()
        target = FakeLocal()
        p.agent.attach(sid, target)
        self.assertTrue(target.paused)

    def test_ended_stream_releases_its_share(self) -> None:
        """A stream that ends (here by reset) no longer counts against the budget."""
        p = make_pair(max_pending=WINDOW - WINDOW // 8)
        (a, _, _), (_, client_b, _) = p.connect(), p.connect()
        p.agent.local_backed_up(a)
        p.hub.local_data(a, b"x" * WINDOW)
        self.assertTrue(client_b.paused)
        p.hub.reset(a, ResetCode.client_reset)
        self.assertEqual(p.hub.unacknowledged(), 0)
        self.assertFalse(client_b.paused)

    def test_small_budget_does_not_stall(self) -> None:
        """
        Whatever the configured budget, a stream that keeps sending eventually gets every byte
        through (the budget slows, it does not deadlock).
        """
        p = make_pair(max_pending=WINDOW // 16)
        sid, client, target = p.connect()
        data = pattern(WINDOW // 4, 5)
        sent = 0
        for _ in range(100):
            if not client.paused and sent < len(data):
                p.hub.local_data(sid, data[sent : sent + 256])
                sent += 256
            p.pump()
        self.assertEqual(bytes(target.received), data)


# -- protocol errors ---------------------------------------------------------------------------


class ProtocolErrorTests(SynchronousTestCase):
    def assert_error(self, side: Mux, frame: wire.Frame, words: str) -> None:
        """receive([frame]) raises ProtocolError whose message contains C{words}."""
        with self.assertRaises(ProtocolError) as cm:
            side.receive([frame])
        self.assertIn(words, str(cm.exception))

    def test_unknown_stream_id(self) -> None:
        """Frames for a stream id never opened (or id 0) are protocol errors on both sides."""
        p = make_pair()
        sid, client, target = p.connect()
        self.assert_error(p.hub, wire.Data(sid + 1, b"x"), "unknown stream")
        self.assert_error(p.hub, wire.Window(0, 10), "unknown stream")
        self.assert_error(p.agent, wire.Data(sid + 1, b"x"), "unknown stream")
        self.assert_error(p.agent, wire.Fin(99), "unknown stream")
        self.assert_error(p.agent, wire.Reset(0, ResetCode.client_reset), "unknown stream")
        self.assert_error(p.hub, wire.Connected(7), "unknown stream")

    def test_open_to_hub(self) -> None:
        """OPEN sent to the hub is a protocol error."""
        p = make_pair()
        self.assert_error(p.hub, wire.Open(1, CONNECTOR, CLIENT), "OPEN sent to the hub")

    def test_connected_to_agent(self) -> None:
        """CONNECTED sent to the agent is a protocol error."""
        p = make_pair()
        p.open()
        self.assert_error(p.agent, wire.Connected(1), "CONNECTED sent to the agent")

    def test_second_connected(self) -> None:
        """A second CONNECTED for one stream is a protocol error."""
        p = make_pair()
        sid, _, _ = p.connect()
        self.assert_error(p.hub, wire.Connected(sid), "second CONNECTED")

    def test_open_reusing_an_id(self) -> None:
        """OPEN with an id already used (live, ended, or lower than the highest) is an error."""
        p = make_pair()
        p.agent.receive([wire.Open(1, CONNECTOR, CLIENT), wire.Open(5, CONNECTOR, CLIENT)])
        self.assert_error(p.agent, wire.Open(1, CONNECTOR, CLIENT), "reuses stream id 1")
        self.assert_error(p.agent, wire.Open(3, CONNECTOR, CLIENT), "reuses stream id 3")
        p.agent.reject(5, ResetCode.target_refused)
        self.assert_error(p.agent, wire.Open(5, CONNECTOR, CLIENT), "reuses stream id 5")

    def test_open_for_undeclared_connector(self) -> None:
        """OPEN naming a connector this agent did not declare is an error, nothing is dialled."""
        p = make_pair()
        self.assert_error(p.agent, wire.Open(1, "payroll", CLIENT), "undeclared connector")
        self.assertEqual(p.accepted, [])
        self.assertEqual(p.agent.stream_count(), 0)

    def test_data_beyond_credit(self) -> None:
        """DATA past the granted credit is an error on either side."""
        p = make_pair()
        sid, _, _ = p.connect()
        p.agent.local_backed_up(sid)  # no grant: the allowance only shrinks
        p.agent.receive([wire.Data(sid, b"a" * MAX_FRAME)] * (WINDOW // MAX_FRAME))
        self.assert_error(p.agent, wire.Data(sid, b"a"), "exceed remaining credit")
        p.hub.local_backed_up(sid)
        p.hub.receive([wire.Data(sid, b"a" * (WINDOW - 1)), wire.Data(sid, b"a")])
        self.assert_error(p.hub, wire.Data(sid, b"a"), "exceed remaining credit")

    def test_early_data_beyond_credit(self) -> None:
        """Before attach the agent buffers at most one window: more is an error."""
        p = make_pair()
        sid, _ = p.open()
        p.agent.receive([wire.Data(sid, b"a" * WINDOW)])
        self.assert_error(p.agent, wire.Data(sid, b"a"), "exceed remaining credit")

    def test_data_after_fin(self) -> None:
        """DATA after the peer's FIN is an error."""
        p = make_pair()
        sid, _, _ = p.connect()
        p.agent.receive([wire.Fin(sid)])
        self.assert_error(p.agent, wire.Data(sid, b"x"), "DATA after FIN")
        p.hub.receive([wire.Fin(sid)])
        self.assert_error(p.hub, wire.Data(sid, b"x"), "DATA after FIN")

    def test_second_fin(self) -> None:
        """A second FIN on one stream is an error, before or after attach."""
        p = make_pair()
        sid, _, _ = p.connect()
        p.hub.receive([wire.Fin(sid)])
        self.assert_error(p.hub, wire.Fin(sid), "second FIN")
        q = make_pair()
        sid, _ = q.open()
        q.agent.receive([wire.Fin(sid)])
        self.assert_error(q.agent, wire.Fin(sid), "second FIN")

    def test_data_before_connected_at_hub(self) -> None:
        """The agent must not send DATA (or FIN) before CONNECTED: the hub refuses it."""
        p = make_pair()
        sid, _ = p.open()
        self.assert_error(p.hub, wire.Data(sid, b"x"), "DATA before CONNECTED")
        self.assert_error(p.hub, wire.Fin(sid), "FIN before CONNECTED")

    def test_handshake_frames_after_handshake(self) -> None:
        """HELLO or WELCOME inside the frame stream is an error."""
        p = make_pair()
        self.assert_error(p.hub, wire.Hello("a", ("x",), "1"), "HELLO after the handshake")
        self.assert_error(p.agent, wire.Welcome(65536, 1024), "WELCOME after the handshake")

    def test_agent_without_acceptor_refuses_open(self) -> None:
        """A mux built without an acceptor treats OPEN as a protocol error."""
        clock = Clock()
        agent = Mux(AGENT, window=WINDOW, max_frame=MAX_FRAME, clock=clock, wake=lambda: None,
                    connectors=frozenset({CONNECTOR}))
        with self.assertRaises(ProtocolError):
            agent.receive([wire.Open(1, CONNECTOR, CLIENT)])

    def test_bad_role(self) -> None:
        """A mux is either the hub or the agent."""
        with self.assertRaises(ValueError):
            Mux("proxy", window=WINDOW, max_frame=MAX_FRAME, clock=Clock(), wake=lambda: None)

    def test_frames_for_ended_streams_are_ignored(self) -> None:
        """
        After a stream ended on one side, the peer's frames still in flight for it (DATA,
        WINDOW, FIN, RST, CONNECTED) are dropped without error.
        """
        p = make_pair()
        sid, client, target = p.connect()
        p.hub.local_lost(sid)
        p.agent.local_lost(sid)  # crossing RSTs
        p.pump()
        for frame in (wire.Data(sid, b"x"), wire.Window(sid, 5), wire.Fin(sid),
                      wire.Reset(sid, ResetCode.client_reset), wire.Connected(sid)):
            p.hub.receive([frame])
        for frame in (wire.Data(sid, b"x"), wire.Window(sid, 5), wire.Fin(sid),
                      wire.Reset(sid, ResetCode.client_reset)):
            p.agent.receive([frame])
        self.assertEqual((p.hub.stream_count(), p.agent.stream_count()), (0, 0))
        self.assertEqual(p.hub.take_output(), [])
        self.assertEqual(p.agent.take_output(), [])
        self.assertEqual(client.calls, [])
        self.assertEqual(target.calls, [])

    def test_frames_after_reject_are_ignored(self) -> None:
        """Optimistic DATA and FIN arriving after the agent rejected the stream are dropped."""
        p = make_pair()
        sid, _ = p.open()
        p.agent.reject(sid, ResetCode.target_refused)
        p.agent.receive([wire.Data(sid, b"late"), wire.Fin(sid)])
        self.assertEqual(p.agent.stream_count(), 0)

    def test_frames_after_close_all_stop(self) -> None:
        """Once close_all ran inside receive(), the rest of that batch is not processed."""
        p = make_pair()
        sid, client, target = p.connect()
        p.agent.close_all()
        p.agent.receive([wire.Data(sid, b"x")])
        self.assertEqual(target.calls, ["abort"])


# -- output batching ---------------------------------------------------------------------------


class OutputTests(SynchronousTestCase):
    def test_one_turn_one_message_one_wake(self) -> None:
        """
        Everything produced before take_output goes out as one message, and wake is called
        once for that batch; the next frame wakes again.
        """
        p = make_pair()
        (a, _, _), (b, _, _) = p.connect(), p.connect()
        wakes = p.wakes[HUB]
        p.hub.local_data(a, b"one")
        p.hub.local_data(b, b"two")
        p.hub.local_eof(a)
        p.hub.open_stream(CONNECTOR, CLIENT, FakeLocal())
        self.assertEqual(p.wakes[HUB], wakes + 1)
        self.assertGreater(p.hub.pending_output(), 0)
        out = p.hub.take_output()
        self.assertEqual(len(out), 1)
        self.assertEqual(p.hub.pending_output(), 0)
        self.assertEqual(
            wire.decode_message(out[0], MAX_FRAME),
            [wire.Data(a, b"one"), wire.Data(b, b"two"), wire.Fin(a),
             wire.Open(3, CONNECTOR, CLIENT)],
        )
        self.assertEqual(p.hub.pending_output(), 0)
        self.assertEqual(p.hub.take_output(), [])
        p.hub.local_data(b, b"three")
        self.assertEqual(p.wakes[HUB], wakes + 2)

    def test_pending_output_counts_bytes(self) -> None:
        """pending_output() is the size of what take_output() would return."""
        p = make_pair()
        sid, _, _ = p.connect()
        p.hub.local_data(sid, b"12345")
        p.hub.local_eof(sid)
        size = p.hub.pending_output()
        self.assertEqual(size, 2 * wire.HEADER_SIZE + 5)
        self.assertEqual(sum(len(m) for m in p.hub.take_output()), size)

    def test_large_data_split_into_frames(self) -> None:
        """A read larger than max_frame is sent as several DATA frames of at most max_frame."""
        p = make_pair()
        sid, _, target = p.connect()
        data = pattern(5 * MAX_FRAME + 17)
        p.hub.local_data(sid, data)
        (message,) = p.hub.take_output()
        frames = wire.decode_message(message, MAX_FRAME)
        self.assertEqual([len(f.payload) for f in frames],  # type: ignore[union-attr]
                         [MAX_FRAME] * 5 + [17])
        self.assertEqual(b"".join(f.payload for f in frames), data)  # type: ignore[union-attr]

    def test_released_credit_split_into_frames(self) -> None:
        """Buffered bytes released by WINDOW are framed within max_frame too."""
        p = make_pair()
        sid, _, target = p.connect()
        p.agent.local_backed_up(sid)
        data = pattern(WINDOW + 3 * MAX_FRAME)
        p.hub.local_data(sid, data)
        p.pump()
        p.agent.local_drained(sid)
        p.pump()
        sizes = [len(f.payload) for f in p.frames_from(HUB) if isinstance(f, wire.Data)]
        self.assertTrue(all(0 < n <= MAX_FRAME for n in sizes), sizes)
        self.assertEqual(bytes(target.received), data)

    def test_messages_cut_near_max_message(self) -> None:
        """
        Output larger than MAX_MESSAGE is cut into several messages, each a whole number of
        frames, each at most MAX_MESSAGE plus one frame, all but the last at least MAX_MESSAGE.
        """
        max_frame = 256 * 1024
        window = 3 * muxmod.MAX_MESSAGE
        p = make_pair(window=window, max_frame=max_frame)
        sid, _, target = p.connect()
        data = pattern(2 * muxmod.MAX_MESSAGE + 12345)
        p.hub.local_data(sid, data)
        out = p.hub.take_output()
        self.assertEqual(len(out), 3)
        payload = bytearray()
        for i, message in enumerate(out):
            frames = wire.decode_message(message, max_frame)  # raises if a frame was split
            payload += b"".join(f.payload for f in frames)  # type: ignore[union-attr]
            self.assertLessEqual(len(message), muxmod.MAX_MESSAGE + wire.HEADER_SIZE + max_frame)
            if i < len(out) - 1:
                self.assertGreaterEqual(len(message), muxmod.MAX_MESSAGE)
        self.assertEqual(bytes(payload), data)


# -- property: arbitrary interleavings deliver exactly the bytes -------------------------------


class Endpoint:
    """
    One side's socket in the property test: bytes waiting to be read (only while the mux has
    not paused reading), and a write buffer that may be reported backed up.
    """

    def __init__(self, mux: Mux, sid: int, local: FakeLocal, source: bytes) -> None:
        self.mux = mux
        self.sid = sid
        self.local = local
        self.source = source
        self.offset = 0
        self.backed_up = False
        self.eof_sent = False

    def read(self, n: int) -> None:
        if self.local.paused or self.offset >= len(self.source):
            return
        chunk = self.source[self.offset : self.offset + n]
        self.offset += len(chunk)
        self.mux.local_data(self.sid, chunk)

    def toggle_backed_up(self) -> None:
        self.backed_up = not self.backed_up
        if self.backed_up:
            self.mux.local_backed_up(self.sid)
        else:
            self.mux.local_drained(self.sid)


ops = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["read_client", "read_target"]),
                  st.integers(min_value=1, max_value=3 * MAX_FRAME)),
        st.tuples(st.sampled_from(["flush_hub", "flush_agent", "deliver_hub", "deliver_agent",
                                   "toggle_client", "toggle_target", "link_hub",
                                   "link_agent"]),
                  st.just(0)),
    ),
    min_size=5,
    max_size=60,
)


class InterleavingTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(ops=ops, up=st.integers(0, 3 * WINDOW), down=st.integers(0, 3 * WINDOW),
           open_first=st.booleans(), attach_at=st.integers(0, 6),
           budget=st.one_of(st.none(), st.integers(WINDOW // 4, 2 * WINDOW)))
    def test_any_interleaving_delivers_the_exact_bytes(
        self, ops: list[tuple[str, int]], up: int, down: int, open_first: bool, attach_at: int,
        budget: int | None,
    ) -> None:
        """
        For any interleaving of socket reads, partial link delivery, write-buffer pressure and
        link pressure, with or without a tunnel budget, each side receives exactly the other's
        bytes, in order; the sender buffers at most one read; unacknowledged() is exactly the
        unspent part of the window; and after both EOFs the stream ends cleanly on both sides.
        """
        p = make_pair(max_pending=budget)
        client = FakeLocal("client")
        sid = p.hub.open_stream(CONNECTOR, CLIENT, client)
        hub_end = Endpoint(p.hub, sid, client, pattern(up, 1))
        target = FakeLocal("target")
        agent_end = Endpoint(p.agent, sid, target, pattern(down, 2))
        in_flight: dict[str, list[bytes]] = {HUB: [], AGENT: []}
        attached = False
        link_paused = {HUB: False, AGENT: False}
        if open_first:
            p.pump()  # OPEN reached the agent; the target may attach at any step

        def deliver(role: str, dst: Mux) -> None:
            if in_flight[role]:
                dst.receive(wire.decode_message(in_flight[role].pop(0), MAX_FRAME))

        for step, (op, n) in enumerate(ops):
            if not attached and p.accepted and step >= attach_at:
                self.assertTrue(p.agent.attach(sid, target))
                attached = True
            if op == "read_client":
                hub_end.read(n)
            elif op == "read_target" and attached:
                agent_end.read(n)
            elif op == "flush_hub":
                in_flight[HUB].extend(p.hub.take_output())
            elif op == "flush_agent":
                in_flight[AGENT].extend(p.agent.take_output())
            elif op == "deliver_hub":
                deliver(HUB, p.agent)
            elif op == "deliver_agent":
                deliver(AGENT, p.hub)
            elif op == "toggle_client":
                hub_end.toggle_backed_up()
            elif op == "toggle_target" and attached:
                agent_end.toggle_backed_up()
            elif op in ("link_hub", "link_agent"):
                m = p.hub if op == "link_hub" else p.agent
                link_paused[m.role] = not link_paused[m.role]
                m.link_paused() if link_paused[m.role] else m.link_resumed()
            # Memory bound: at most one window in flight toward each side, plus one read
            # buffered by the sender.
            for m in (p.hub, p.agent):
                stream = m.stream(sid)
                if stream is not None:
                    self.assertLessEqual(stream.send_buffered, 3 * MAX_FRAME)
                    self.assertGreaterEqual(stream.recv_allowance, 0)
                    self.assertEqual(m.unacknowledged(),
                                     max(0, WINDOW - stream.send_credit - WINDOW // 8))
            self.assertLessEqual(len(target.received), up)
            self.assertLessEqual(len(client.received), down)

        # Coverage of the interesting states, shown by --hypothesis-show-statistics.
        event(f"client paused: {'pause_reading' in client.calls}")
        event(f"target paused: {'pause_reading' in target.calls}")
        event(f"attached during ops: {attached}")

        # Settle: everything drains, every byte is read, both sides EOF.
        for role, dst in ((HUB, p.agent), (AGENT, p.hub)):
            while in_flight[role]:
                deliver(role, dst)
        if not attached:
            p.pump()
            self.assertTrue(p.agent.attach(sid, target))
        for m in (p.hub, p.agent):
            if link_paused[m.role]:
                m.link_resumed()
        for end in (hub_end, agent_end):
            if end.backed_up:
                end.toggle_backed_up()
        for _ in range(10_000):
            p.pump()
            hub_end.read(4 * MAX_FRAME)
            agent_end.read(4 * MAX_FRAME)
            if hub_end.offset == up and agent_end.offset == down and not (
                p.hub.pending_output() or p.agent.pending_output()
            ):
                break
        p.hub.local_eof(sid)
        p.agent.local_eof(sid)
        p.pump()
        self.assertEqual(bytes(target.received), hub_end.source)
        self.assertEqual(bytes(client.received), agent_end.source)
        self.assertEqual((p.hub.stream_count(), p.agent.stream_count()), (0, 0))
        self.assertTrue(client.closed and target.closed)
        self.assertFalse(client.aborted or target.aborted)
