"""
The TCP side of a stream: a Twisted protocol that bridges one socket to one stream of a mux.

It is the L{mux.LocalSide} the mux drives (write, half-close, abort, pause reading) and it
turns socket events (bytes, EOF, loss, write-buffer pressure) into mux calls.  Backpressure in
both directions goes through producers: the relay registers itself as its own transport's push
producer so that a full write buffer withholds credit from the peer, and the mux pauses the
transport's reading when the stream's send credit is spent.
"""
# -*- test-case-name: tests.test_relay -*-

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from nowconnect.fastwrite import write_through

if TYPE_CHECKING:
    from nowconnect.mux import Mux

#: Reads start at Twisted's 64 KiB and grow while they fill the buffer: large buffers make a
#: fresh process's small messages slower (glibc's mmap threshold), bulk transfers want them.
MIN_READ = 65536
MAX_READ = 262144


@implementer(IHalfCloseableProtocol, IPushProducer)
class StreamRelay(Protocol):
    """One local socket carried as one stream."""

    #: A TCP transport: ITCPTransport, IHalfCloseableDescriptor, IPushProducer and IConsumer.
    transport: Any
    mux: Mux | None = None
    stream_id: int = 0

    def bind(self, mux: Mux, stream_id: int) -> None:
        self.mux = mux
        self.stream_id = stream_id

    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        self.transport.registerProducer(self, True)

    # -- mux.LocalSide -------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        write_through(self.transport, data)

    def write_eof(self) -> None:
        # With a paused streaming producer registered, Twisted would resume it instead of
        # finishing the half-close once the buffer drains: unregister first.
        self.transport.unregisterProducer()
        self.transport.loseWriteConnection()

    def close(self) -> None:
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def abort(self) -> None:
        self.mux = None
        self.transport.abortConnection()

    def pause_reading(self) -> None:
        self.transport.pauseProducing()

    def resume_reading(self) -> None:
        self.transport.resumeProducing()

    # -- socket events -------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.mux is not None:
            self.mux.local_data(self.stream_id, data)
        transport = self.transport
        size = getattr(transport, "bufferSize", MAX_READ)
        if len(data) >= size and size < MAX_READ:
            transport.bufferSize = size * 2

    def readConnectionLost(self) -> None:
        if self.mux is not None:
            self.mux.local_eof(self.stream_id)

    def writeConnectionLost(self) -> None:
        # Our half-close finished; the stream ends when the other direction does.
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        mux, self.mux = self.mux, None
        if mux is not None:
            mux.local_lost(self.stream_id, reason.getErrorMessage())

    # -- IPushProducer: our transport's write buffer -------------------------------------------

    def pauseProducing(self) -> None:
        if self.mux is not None:
            self.mux.local_backed_up(self.stream_id)

    def resumeProducing(self) -> None:
        if self.mux is not None:
            self.mux.local_drained(self.stream_id)

    def stopProducing(self) -> None:
        pass
