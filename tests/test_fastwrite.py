"""Writing straight into a TCP socket when nothing is queued, over real loopback sockets."""

from __future__ import annotations

import hashlib
import os

from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from nowconnect.fastwrite import write_through


class _Collect(protocol.Protocol):
    def __init__(self, expected: int, done: Deferred[bytes]) -> None:
        self.data = bytearray()
        self.expected = expected
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= self.expected and not self.done.called:
            self.done.callback(bytes(self.data))


class RealSocketTests(TestCase):
    timeout = 30

    async def test_order_kept_across_direct_and_buffered_writes(self) -> None:
        """
        Small writes (sent at once), a large one the kernel only partly takes (the rest queued
        in Twisted) and small writes behind it all arrive complete and in order.
        """
        chunks = [b"a" * 10, os.urandom(16 * 1024 * 1024), b"b" * 100, os.urandom(70_000), b"z"]
        expected = b"".join(chunks)
        done: Deferred[bytes] = Deferred()
        factory = protocol.Factory.forProtocol(lambda: _Collect(len(expected), done))
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            protocol.Factory.forProtocol(protocol.Protocol))
        for chunk in chunks:
            write_through(client.transport, chunk)
        received = await done
        client.transport.loseConnection()
        self.assertEqual(hashlib.sha256(received).digest(), hashlib.sha256(expected).digest())


class FallbackTests(SynchronousTestCase):
    def test_other_transports_use_write(self) -> None:
        """A transport that is not a plain TCP connection (TLS, tests) just gets write()."""
        transport = StringTransport()
        write_through(transport, b"hello")
        self.assertEqual(transport.value(), b"hello")
