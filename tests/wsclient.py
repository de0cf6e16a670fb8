"""
A tiny blocking WebSocket client over a plain socket, for hostile end-to-end tests.

It speaks just enough RFC 6455 to reach the hub's ``/tunnel`` and then misbehave on purpose:
the upgrade request (``Sec-WebSocket-Protocol: nowconnect.v1``, optional ``Authorization``),
masked (or deliberately unmasked) binary and text frames, frames with any header, raw bytes, and
reading the server's frames including its close frame (code and reason).  Pings from the server
are answered automatically while reading, so a slow test is not dropped for a missed pong.

    ws, status = upgrade("127.0.0.1", port, token="...")
    assert status == 101 and ws is not None
    ws.send_binary(b"...")
    closed = ws.wait_closed(5)        # Closed(code=4003, reason="...") or Closed(None, "dropped")

No Twisted, no threads: every read has a timeout and raises L{socket.timeout} when it passes.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import time
from dataclasses import dataclass

__all__ = ["Closed", "Frame", "WebSocketClient", "upgrade",
           "OP_CONT", "OP_TEXT", "OP_BINARY", "OP_CLOSE", "OP_PING", "OP_PONG"]

OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@dataclass(frozen=True)
class Frame:
    """One WebSocket frame as read from the server."""

    opcode: int
    payload: bytes
    fin: bool = True


@dataclass(frozen=True)
class Closed:
    """
    How the connection ended: C{code}/C{reason} of the server's close frame, or C{code=None}
    with C{reason="dropped"} when the TCP connection ended (EOF or reset) without one.
    """

    code: int | None
    reason: str


class ConnectionEnded(Exception):
    """The TCP connection ended while a frame was expected."""


class WebSocketClient:
    """An upgraded connection.  Build it with L{upgrade}."""

    def __init__(self, sock: socket.socket, buffered: bytes = b"") -> None:
        self.sock = sock
        self._buffer = bytearray(buffered)

    # -- sending -------------------------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are: truncated frames, junk, hand-made headers."""
        self.sock.sendall(data)

    def send_frame(self, opcode: int, payload: bytes, *, fin: bool = True,
                   mask: bool = True) -> None:
        """One frame; clients must mask (RFC 6455 5.3), C{mask=False} breaks that rule."""
        self.send_raw(encode_frame(opcode, payload, fin=fin, mask=mask))

    def send_binary(self, payload: bytes, *, mask: bool = True) -> None:
        self.send_frame(OP_BINARY, payload, mask=mask)

    def send_text(self, text: str) -> None:
        self.send_frame(OP_TEXT, text.encode("utf-8"))

    def send_close(self, code: int = 1000, reason: str = "") -> None:
        self.send_frame(OP_CLOSE, struct.pack("!H", code) + reason.encode("utf-8"))

    # -- receiving -----------------------------------------------------------------------------

    def _fill(self, n: int, deadline: float) -> None:
        while len(self._buffer) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out reading a WebSocket frame")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as e:
                raise ConnectionEnded(str(e)) from None
            if not data:
                raise ConnectionEnded("EOF")
            self._buffer += data

    def _take(self, n: int, deadline: float) -> bytes:
        self._fill(n, deadline)
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    def recv_frame(self, timeout: float) -> Frame:
        """The next frame, whatever it is (pings included, not answered)."""
        deadline = time.monotonic() + timeout
        b0, b1 = self._take(2, deadline)
        length = b1 & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._take(2, deadline))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._take(8, deadline))
        key = self._take(4, deadline) if b1 & 0x80 else b""
        payload = self._take(length, deadline)
        if key:
            payload = _mask(payload, key)
        return Frame(b0 & 0x0F, payload, bool(b0 & 0x80))

    def recv_message(self, timeout: float) -> Frame:
        """
        The next data message (fragments joined) or close frame; pings are answered with
        pongs and pongs are skipped on the way.
        """
        deadline = time.monotonic() + timeout
        parts: list[bytes] = []
        opcode = None
        while True:
            frame = self.recv_frame(max(0.0, deadline - time.monotonic()))
            if frame.opcode == OP_PING:
                self.send_frame(OP_PONG, frame.payload)
                continue
            if frame.opcode == OP_PONG:
                continue
            if frame.opcode == OP_CLOSE:
                return frame
            if opcode is None:
                opcode = frame.opcode
            parts.append(frame.payload)
            if frame.fin:
                return Frame(opcode, b"".join(parts))

    def wait_closed(self, timeout: float) -> Closed:
        """
        Read (answering pings, discarding data) until the server's close frame or the end of
        the connection.  Raises L{socket.timeout} if neither comes within C{timeout}.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                frame = self.recv_message(max(0.0, deadline - time.monotonic()))
            except ConnectionEnded:
                return Closed(None, "dropped")
            if frame.opcode == OP_CLOSE:
                return parse_close(frame.payload)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> WebSocketClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def encode_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True) -> bytes:
    """The bytes of one frame (masked with a random key unless C{mask=False})."""
    head = bytes([(0x80 if fin else 0) | opcode])
    bit = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head += bytes([bit | n])
    elif n < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + _mask(payload, key)


def parse_close(payload: bytes) -> Closed:
    """A close frame's payload: C{Closed(code, reason)} (code 1005 when it carries none)."""
    if len(payload) < 2:
        return Closed(1005, "")
    (code,) = struct.unpack("!H", payload[:2])
    return Closed(code, payload[2:].decode("utf-8", "replace"))


def _mask(data: bytes, key: bytes) -> bytes:
    # XOR with the repeated key, done on one big integer: fast enough for megabytes.
    n = len(data)
    if not n:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def upgrade(
    host: str,
    port: int,
    *,
    token: str | None = None,
    path: str = "/tunnel",
    protocols: tuple[str, ...] = ("nowconnect.v1",),
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[WebSocketClient | None, int]:
    """
    Connect and send the upgrade request: C{(client, 101)} on success (the accept key and
    subprotocol checked), else C{(None, status)} with the socket closed.  C{token} becomes
    C{Authorization: Bearer <token>}; C{headers} adds or replaces header lines.
    """
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    lines = {
        "Host": f"{host}:{port}",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": key,
        "Sec-WebSocket-Version": "13",
    }
    if protocols:
        lines["Sec-WebSocket-Protocol"] = ", ".join(protocols)
    if token is not None:
        lines["Authorization"] = f"Bearer {token}"
    lines.update(headers or {})
    request = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in lines.items())
    try:
        sock.sendall((request + "\r\n").encode("latin-1"))
        head, rest = _read_head(sock, time.monotonic() + timeout)
    except BaseException:
        sock.close()
        raise
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    if status != 101:
        sock.close()
        return None, status
    got = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    accept = base64.b64encode(hashlib.sha1((key + _GUID).encode()).digest()).decode()
    if got.get("sec-websocket-accept") != accept:
        sock.close()
        raise AssertionError(f"bad Sec-WebSocket-Accept in {head!r}")
    if protocols and got.get("sec-websocket-protocol") not in protocols:
        sock.close()
        raise AssertionError(f"server chose no offered subprotocol: {head!r}")
    return WebSocketClient(sock, rest), 101


def _read_head(sock: socket.socket, deadline: float) -> tuple[bytes, bytes]:
    """Read up to the blank line that ends the response head: (head, bytes after it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out waiting for the upgrade response")
        sock.settimeout(left)
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionEnded(f"connection closed during the upgrade: {data!r}")
        data += chunk
        if len(data) > 65536:
            raise AssertionError("response head over 64 KiB")
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest
