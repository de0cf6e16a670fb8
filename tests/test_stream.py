"""
Tests for L{nowconnect.stream}: one stream's credit and half-close machine, with no I/O.

A L{Stream} is driven by method calls and answers with what the caller must do; these tests
check those answers and the public state the mux relies on.
"""
# -*- test-case-name: tests.test_stream -*-

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from nowconnect.stream import CreditError, Half, Phase, Stream

WINDOW = 800


def make_stream(window: int = WINDOW) -> Stream:
    """A fresh stream with a small window so credit arithmetic stays readable."""
    return Stream(7, "addomain", "10.0.0.1:5000", window, opened_at=100.0)


class InitialStateTests(SynchronousTestCase):
    def test_fresh_stream(self) -> None:
        """
        A new stream is CONNECTING, both halves OPEN, with a full window of credit each way and
        nothing buffered or owed.
        """
        s = make_stream()
        self.assertIs(s.phase, Phase.CONNECTING)
        self.assertIs(s.outbound, Half.OPEN)
        self.assertIs(s.inbound, Half.OPEN)
        self.assertEqual(s.send_credit, WINDOW)
        self.assertEqual(s.recv_allowance, WINDOW)
        self.assertEqual(s.ungranted, 0)
        self.assertEqual(s.send_buffered, 0)
        self.assertEqual(s.last_activity, 100.0)
        self.assertIsNone(s.connected_at)
        self.assertFalse(s.wants_reading_paused())
        self.assertFalse(s.is_finished())

    def test_connected(self) -> None:
        """connected() moves the stream to ESTABLISHED and records the time."""
        s = make_stream()
        s.connected(101.5)
        self.assertIs(s.phase, Phase.ESTABLISHED)
        self.assertEqual(s.connected_at, 101.5)


class SendCreditTests(SynchronousTestCase):
    def test_within_credit(self) -> None:
        """Bytes within the credit pass straight through and spend it."""
        s = make_stream()
        self.assertEqual(s.take_sendable(b"a" * 300), b"a" * 300)
        self.assertEqual(s.send_credit, WINDOW - 300)
        self.assertEqual(s.send_buffered, 0)
        self.assertEqual(s.sent_bytes, 300)
        self.assertFalse(s.wants_reading_paused())

    def test_exactly_the_credit(self) -> None:
        """Spending the credit exactly passes everything and then asks for reading to pause."""
        s = make_stream()
        self.assertEqual(s.take_sendable(b"x" * WINDOW), b"x" * WINDOW)
        self.assertEqual(s.send_credit, 0)
        self.assertEqual(s.send_buffered, 0)
        self.assertTrue(s.wants_reading_paused())

    def test_over_credit_buffers_the_rest(self) -> None:
        """A read larger than the credit is split: the credit's worth goes now, the rest waits."""
        s = make_stream()
        data = bytes(range(256)) * 4  # 1024 bytes
        self.assertEqual(s.take_sendable(data), data[:WINDOW])
        self.assertEqual(s.send_credit, 0)
        self.assertEqual(s.send_buffered, 1024 - WINDOW)
        self.assertEqual(list(s.send_buffer), [data[WINDOW:]])
        self.assertTrue(s.wants_reading_paused())

    def test_buffered_bytes_keep_later_bytes_waiting(self) -> None:
        """
        While bytes wait in the buffer, later reads are buffered too, even if credit came back
        without a grant being processed: order is never broken.
        """
        s = make_stream()
        s.take_sendable(b"a" * (WINDOW + 10))
        s.send_credit = 50  # credit present but the buffer is not yet drained
        self.assertEqual(s.take_sendable(b"b" * 5), b"")
        self.assertEqual(list(s.send_buffer), [b"a" * 10, b"b" * 5])
        self.assertEqual(s.send_buffered, 15)
        self.assertTrue(s.wants_reading_paused())

    def test_no_credit_buffers_everything(self) -> None:
        """With no credit at all, a read is buffered whole."""
        s = make_stream()
        s.take_sendable(b"a" * WINDOW)
        self.assertEqual(s.take_sendable(b"later"), b"")
        self.assertEqual(s.send_buffered, 5)
        self.assertEqual(s.sent_bytes, WINDOW + 5)

    def test_grant_releases_buffered_bytes_in_order(self) -> None:
        """A WINDOW releases buffered chunks in arrival order, splitting the last if needed."""
        s = make_stream()
        s.take_sendable(b"a" * WINDOW)
        s.take_sendable(b"b" * 100)
        s.take_sendable(b"c" * 100)
        out = s.grant_received(150)
        self.assertEqual(out, [b"b" * 100, b"c" * 50])
        self.assertEqual(s.send_credit, 0)
        self.assertEqual(s.send_buffered, 50)
        self.assertTrue(s.wants_reading_paused())
        out = s.grant_received(1000)
        self.assertEqual(out, [b"c" * 50])
        self.assertEqual(s.send_credit, 950)
        self.assertEqual(s.send_buffered, 0)
        self.assertFalse(s.wants_reading_paused())

    def test_grant_without_buffer_only_adds_credit(self) -> None:
        """A WINDOW with nothing buffered returns nothing and adds to the credit."""
        s = make_stream()
        s.take_sendable(b"a" * 100)
        self.assertEqual(s.grant_received(100), [])
        self.assertEqual(s.send_credit, WINDOW)

    @settings(max_examples=150, deadline=None)
    @given(
        steps=st.lists(
            st.tuples(
                st.sampled_from(["read", "grant"]),
                st.integers(min_value=1, max_value=2 * WINDOW),
            ),
            min_size=1,
            max_size=30,
        )
    )
    def test_bytes_leave_in_order_and_never_exceed_credit(
        self, steps: list[tuple[str, int]]
    ) -> None:
        """
        Whatever the interleaving of reads and grants, what leaves is a prefix of what was
        read, in order, never more than the window plus the credit granted, and the buffer
        holds exactly the rest.
        """
        s = make_stream()
        read = bytearray()
        sent = bytearray()
        granted = 0
        for kind, n in steps:
            if kind == "read":
                chunk = bytes((len(read) + i) % 251 for i in range(n))
                read += chunk
                sent += s.take_sendable(chunk)
            else:
                granted += n
                for chunk in s.grant_received(n):
                    sent += chunk
            self.assertEqual(bytes(sent), bytes(read[: len(sent)]))
            self.assertLessEqual(len(sent), WINDOW + granted)
            self.assertEqual(len(read) - len(sent), s.send_buffered)
            self.assertEqual(s.wants_reading_paused(), s.send_credit <= 0 or s.send_buffered > 0)
        # Enough credit drains everything.
        for chunk in s.grant_received(len(read) + 1):
            sent += chunk
        self.assertEqual(bytes(sent), bytes(read))
        self.assertEqual(s.send_buffered, 0)


class LocalEofTests(SynchronousTestCase):
    def test_eof_with_nothing_buffered(self) -> None:
        """EOF with an empty buffer: FIN may go now and the outbound half is FINISHED."""
        s = make_stream()
        self.assertTrue(s.local_eof())
        self.assertIs(s.outbound, Half.FINISHED)
        self.assertFalse(s.fin_ready())

    def test_eof_with_buffered_bytes_waits(self) -> None:
        """
        EOF while bytes wait for credit: FIN waits (FINISHING); fin_ready() turns True only when
        a grant has drained the buffer, and only once.
        """
        s = make_stream()
        s.take_sendable(b"a" * (WINDOW + 20))
        self.assertFalse(s.local_eof())
        self.assertIs(s.outbound, Half.FINISHING)
        self.assertFalse(s.fin_ready())
        self.assertEqual(s.grant_received(10), [b"a" * 10])
        self.assertFalse(s.fin_ready())
        self.assertEqual(s.grant_received(10), [b"a" * 10])
        self.assertTrue(s.fin_ready())
        self.assertIs(s.outbound, Half.FINISHED)
        self.assertFalse(s.fin_ready())

    def test_second_eof_is_ignored(self) -> None:
        """A repeated EOF never asks for a second FIN."""
        s = make_stream()
        self.assertTrue(s.local_eof())
        self.assertFalse(s.local_eof())
        self.assertIs(s.outbound, Half.FINISHED)

    def test_fin_ready_while_open(self) -> None:
        """fin_ready() is False while the local socket has not sent EOF."""
        s = make_stream()
        self.assertFalse(s.fin_ready())
        self.assertIs(s.outbound, Half.OPEN)


class ReceiveTests(SynchronousTestCase):
    def test_data_within_allowance(self) -> None:
        """DATA within the allowance is counted and spends the allowance."""
        s = make_stream()
        s.data_received(WINDOW)
        self.assertEqual(s.recv_allowance, 0)
        self.assertEqual(s.received_bytes, WINDOW)

    def test_data_over_allowance_raises(self) -> None:
        """DATA beyond the remaining allowance raises CreditError and changes nothing."""
        s = make_stream()
        s.data_received(WINDOW - 10)
        with self.assertRaises(CreditError):
            s.data_received(11)
        self.assertEqual(s.recv_allowance, 10)
        self.assertEqual(s.received_bytes, WINDOW - 10)

    def test_grant_batched_at_an_eighth(self) -> None:
        """
        Delivered bytes are granted back only once they reach window/8, then all at once, and
        the grant restores the peer's allowance.
        """
        s = make_stream()
        eighth = WINDOW // 8
        s.data_received(WINDOW)
        s.delivered(eighth - 1)
        self.assertEqual(s.take_grant(), 0)
        s.delivered(1)
        self.assertEqual(s.take_grant(), eighth)
        self.assertEqual(s.ungranted, 0)
        self.assertEqual(s.recv_allowance, eighth)
        self.assertEqual(s.take_grant(), 0)
        s.delivered(WINDOW - eighth)
        self.assertEqual(s.take_grant(), WINDOW - eighth)
        self.assertEqual(s.recv_allowance, WINDOW)

    def test_grant_withheld_while_backed_up(self) -> None:
        """While the local socket is backed up no credit is granted; once drained it all is."""
        s = make_stream()
        s.data_received(WINDOW)
        s.local_backed_up = True
        s.delivered(WINDOW)
        self.assertEqual(s.take_grant(), 0)
        self.assertEqual(s.recv_allowance, 0)
        s.local_backed_up = False
        self.assertEqual(s.take_grant(), WINDOW)

    def test_allowance_never_exceeds_window(self) -> None:
        """Granting everything delivered keeps the peer's allowance at most one window."""
        s = make_stream()
        for _ in range(20):
            s.data_received(WINDOW // 4)
            s.delivered(WINDOW // 4)
            s.take_grant()
            self.assertLessEqual(s.recv_allowance, WINDOW)
        self.assertEqual(s.received_bytes, 20 * (WINDOW // 4))


class LifecycleTests(SynchronousTestCase):
    def test_finished_needs_both_halves(self) -> None:
        """is_finished() holds only when both the local EOF and the remote FIN happened."""
        s = make_stream()
        s.local_eof()
        self.assertFalse(s.is_finished())
        s.remote_fin()
        self.assertIs(s.inbound, Half.FINISHED)
        self.assertTrue(s.is_finished())

    def test_finished_remote_first(self) -> None:
        """The order of the two halves does not matter."""
        s = make_stream()
        s.remote_fin()
        self.assertFalse(s.is_finished())
        s.local_eof()
        self.assertTrue(s.is_finished())

    def test_not_finished_while_fin_is_deferred(self) -> None:
        """A FIN still waiting for credit (FINISHING) does not finish the stream."""
        s = make_stream()
        s.take_sendable(b"a" * (WINDOW + 1))
        s.local_eof()
        s.remote_fin()
        self.assertFalse(s.is_finished())
        s.grant_received(1)
        self.assertTrue(s.fin_ready())
        self.assertTrue(s.is_finished())

    def test_end_clears_buffers(self) -> None:
        """end() marks the stream ENDED and drops buffered and early bytes."""
        s = make_stream()
        s.take_sendable(b"a" * (WINDOW + 5))
        s.early_data.append(b"early")
        s.end()
        self.assertIs(s.phase, Phase.ENDED)
        self.assertEqual(list(s.send_buffer), [])
        self.assertEqual(s.early_data, [])
