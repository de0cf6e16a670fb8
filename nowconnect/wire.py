"""
Sans-IO codec for the NowConnect tunnel protocol, version 1.

Every binary WebSocket message carries one or more whole frames back to back::

    type u8 | stream id u32 | length u32 | payload (length bytes)

All integers are big-endian.  A frame never spans two messages, so a message that ends in the
middle of a frame is malformed.  HELLO and WELCOME carry a small JSON object and are only valid as
the first message in each direction; everything after them is binary frames of the other types.

This module knows nothing about Twisted or sockets: bytes in, frames out, and back.
"""
# -*- test-case-name: tests.test_wire -*-

from __future__ import annotations

import enum
import json
import struct
from typing import Any, Iterable, Union

import attrs

PROTOCOL_VERSION = 1
SUBPROTOCOL = "nowconnect.v1"

HEADER = struct.Struct("!BII")
HEADER_SIZE = HEADER.size
_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")
MAX_U32 = 0xFFFFFFFF

#: Control payloads (HELLO, WELCOME, OPEN, RST) are small; this bounds them whatever the
#: negotiated data frame size is.
MAX_CONTROL_PAYLOAD = 65536


class FrameType(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    OPEN = 3
    CONNECTED = 4
    DATA = 5
    WINDOW = 6
    FIN = 7
    RST = 8


class ResetCode(enum.IntEnum):
    """
    Why a stream was reset.  The names double as the ``reason`` label values in metrics.
    """

    client_reset = 1
    target_refused = 2
    target_timeout = 3
    tunnel_lost = 4
    protocol_error = 5
    shutdown = 6
    idle_timeout = 7
    limit = 8
    unknown_connector = 9
    open_timeout = 10
    target_reset = 11


class ProtocolError(Exception):
    """
    The peer sent something that is not valid protocol.  The tunnel that received it is closed
    with this message as the logged reason.
    """


@attrs.frozen
class Hello:
    """First message from the agent: who it is and which connectors it serves."""

    agent_id: str
    connectors: tuple[str, ...]
    version: str
    protocol: int = PROTOCOL_VERSION


@attrs.frozen
class Welcome:
    """The hub's answer to HELLO: the limits both sides use for the life of the tunnel."""

    initial_window: int
    max_frame: int
    protocol: int = PROTOCOL_VERSION


@attrs.frozen
class Open:
    """Hub -> agent: a client connected to ``connector`` from ``client`` ("host:port")."""

    stream_id: int
    connector: str
    client: str


@attrs.frozen
class Connected:
    """Agent -> hub: the target accepted the connection."""

    stream_id: int


@attrs.frozen
class Data:
    stream_id: int
    payload: bytes


@attrs.frozen
class Window:
    """The sender may send ``credit`` more DATA bytes on this stream."""

    stream_id: int
    credit: int


@attrs.frozen
class Fin:
    """The sender will send no more DATA on this stream (TCP half-close)."""

    stream_id: int


@attrs.frozen
class Reset:
    """The stream is aborted in both directions."""

    stream_id: int
    code: ResetCode
    reason: str = ""


StreamFrame = Union[Open, Connected, Data, Window, Fin, Reset]
Frame = Union[Hello, Welcome, StreamFrame]


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")


def _header(ftype: FrameType, stream_id: int, length: int) -> bytes:
    return HEADER.pack(ftype, stream_id, length)


def encode(frame: Frame) -> bytes:
    """
    Serialise one frame.  For DATA prefer L{encode_data_header} plus the payload, which avoids
    copying the payload.
    """
    if isinstance(frame, Data):
        return _header(FrameType.DATA, frame.stream_id, len(frame.payload)) + frame.payload
    if isinstance(frame, Window):
        return _header(FrameType.WINDOW, frame.stream_id, 4) + _U32.pack(frame.credit)
    if isinstance(frame, Fin):
        return _header(FrameType.FIN, frame.stream_id, 0)
    if isinstance(frame, Connected):
        return _header(FrameType.CONNECTED, frame.stream_id, 0)
    if isinstance(frame, Open):
        connector = frame.connector.encode("utf-8")
        payload = _U16.pack(len(connector)) + connector + frame.client.encode("utf-8")
        return _header(FrameType.OPEN, frame.stream_id, len(payload)) + payload
    if isinstance(frame, Reset):
        payload = bytes([frame.code]) + frame.reason.encode("utf-8")[:1024]
        return _header(FrameType.RST, frame.stream_id, len(payload)) + payload
    if isinstance(frame, Hello):
        payload = _json(
            {
                "agent_id": frame.agent_id,
                "connectors": list(frame.connectors),
                "version": frame.version,
                "protocol": frame.protocol,
            }
        )
        return _header(FrameType.HELLO, 0, len(payload)) + payload
    if isinstance(frame, Welcome):
        payload = _json(
            {
                "initial_window": frame.initial_window,
                "max_frame": frame.max_frame,
                "protocol": frame.protocol,
            }
        )
        return _header(FrameType.WELCOME, 0, len(payload)) + payload
    raise TypeError(f"not a frame: {frame!r}")


def encode_data_header(stream_id: int, length: int) -> bytes:
    """The 9-byte header of a DATA frame whose payload the caller sends right after it."""
    return _header(FrameType.DATA, stream_id, length)


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not UTF-8") from None


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(_text(raw, what))
    except (ValueError, RecursionError):
        raise ProtocolError(f"{what} is not JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    return obj


def _field(obj: dict[str, Any], key: str, kind: type, what: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError(f"{what} field {key!r} missing or not {kind.__name__}")
    return value


def _decode_hello(payload: bytes) -> Hello:
    obj = _json_object(payload, "HELLO")
    connectors = _field(obj, "connectors", list, "HELLO")
    if not all(isinstance(c, str) for c in connectors):
        raise ProtocolError("HELLO field 'connectors' must be a list of strings")
    return Hello(
        agent_id=_field(obj, "agent_id", str, "HELLO"),
        connectors=tuple(connectors),
        version=_field(obj, "version", str, "HELLO"),
        protocol=_field(obj, "protocol", int, "HELLO"),
    )


def _decode_welcome(payload: bytes) -> Welcome:
    obj = _json_object(payload, "WELCOME")
    welcome = Welcome(
        initial_window=_field(obj, "initial_window", int, "WELCOME"),
        max_frame=_field(obj, "max_frame", int, "WELCOME"),
        protocol=_field(obj, "protocol", int, "WELCOME"),
    )
    if not 1024 <= welcome.max_frame <= 16 * 1024 * 1024:
        raise ProtocolError(f"WELCOME max_frame {welcome.max_frame} out of range")
    if not 1024 <= welcome.initial_window <= MAX_U32:
        raise ProtocolError(f"WELCOME initial_window {welcome.initial_window} out of range")
    return welcome


def _decode_open(stream_id: int, payload: bytes) -> Open:
    if len(payload) < 2:
        raise ProtocolError("OPEN payload too short")
    (n,) = _U16.unpack_from(payload)
    if n == 0 or len(payload) < 2 + n:
        raise ProtocolError("OPEN connector length invalid")
    return Open(
        stream_id,
        _text(payload[2 : 2 + n], "OPEN connector"),
        _text(payload[2 + n :], "OPEN client address"),
    )


def _decode_reset(stream_id: int, payload: bytes) -> Reset:
    if not payload:
        raise ProtocolError("RST without a code")
    try:
        code = ResetCode(payload[0])
    except ValueError:
        raise ProtocolError(f"RST with unknown code {payload[0]}") from None
    return Reset(stream_id, code, payload[1:].decode("utf-8", "replace"))


def _decode(ftype: int, stream_id: int, payload: bytes) -> Frame:
    if ftype == FrameType.DATA:
        return Data(stream_id, payload)
    if ftype == FrameType.WINDOW:
        if len(payload) != 4:
            raise ProtocolError("WINDOW payload must be 4 bytes")
        (credit,) = _U32.unpack(payload)
        if credit == 0:
            raise ProtocolError("WINDOW with zero credit")
        return Window(stream_id, credit)
    if ftype in (FrameType.FIN, FrameType.CONNECTED):
        if payload:
            raise ProtocolError(f"{FrameType(ftype).name} must have an empty payload")
        return Fin(stream_id) if ftype == FrameType.FIN else Connected(stream_id)
    if ftype == FrameType.OPEN:
        return _decode_open(stream_id, payload)
    if ftype == FrameType.RST:
        return _decode_reset(stream_id, payload)
    if ftype == FrameType.HELLO:
        return _decode_hello(payload)
    if ftype == FrameType.WELCOME:
        return _decode_welcome(payload)
    raise ProtocolError(f"unknown frame type {ftype}")


class FrameDecoder:
    """
    Incremental decoder: L{feed} any slicing of the byte stream and get whole frames back.

    C{max_payload} bounds DATA frames (the negotiated max frame); control frames are bounded by
    L{MAX_CONTROL_PAYLOAD}.  Anything invalid raises L{ProtocolError}; after that the decoder
    must not be used again, because the tunnel is being closed.
    """

    def __init__(self, max_payload: int) -> None:
        self._max_payload = max_payload
        self._buffer = bytearray()

    def pending(self) -> int:
        """Bytes of an incomplete frame held back; nonzero at a message boundary is malformed."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        """
        Decode what C{data} completes.  Whole frames inside C{data} are sliced out of it
        directly; only a frame that spans two feeds is assembled in the buffer, and then only
        its own bytes are copied there (not the rest of the next feed).
        """
        frames: list[Frame] = []
        pos = 0
        n = len(data)
        buf = self._buffer
        if buf:
            pos = self._complete_pending(data, frames)
            if buf:
                return frames
        while n - pos >= HEADER_SIZE:
            ftype, stream_id, length = HEADER.unpack_from(data, pos)
            self._check_length(ftype, length)
            start = pos + HEADER_SIZE
            end = start + length
            if end > n:
                break
            frames.append(_decode(ftype, stream_id, data[start:end]))
            pos = end
        if pos < n:
            buf += memoryview(data)[pos:]
        return frames

    def _complete_pending(self, data: bytes, frames: list[Frame]) -> int:
        """Take from C{data} what the buffered partial frame lacks; return how much was taken."""
        buf = self._buffer
        pos = 0
        if len(buf) < HEADER_SIZE:
            pos = min(HEADER_SIZE - len(buf), len(data))
            buf += memoryview(data)[:pos]
            if len(buf) < HEADER_SIZE:
                return pos
        ftype, stream_id, length = HEADER.unpack_from(buf)
        self._check_length(ftype, length)
        take = min(HEADER_SIZE + length - len(buf), len(data) - pos)
        buf += memoryview(data)[pos : pos + take]
        pos += take
        if len(buf) == HEADER_SIZE + length:
            with memoryview(buf) as view:
                payload = bytes(view[HEADER_SIZE:])
            buf.clear()
            frames.append(_decode(ftype, stream_id, payload))
        return pos

    def _check_length(self, ftype: int, length: int) -> None:
        if ftype == FrameType.DATA:
            if length > self._max_payload:
                raise ProtocolError(f"DATA frame of {length} bytes exceeds max {self._max_payload}")
        elif ftype in FrameType._value2member_map_:
            if length > MAX_CONTROL_PAYLOAD:
                raise ProtocolError(f"{FrameType(ftype).name} frame of {length} bytes too long")
        else:
            raise ProtocolError(f"unknown frame type {ftype}")


def decode_message(message: bytes, max_payload: int) -> list[Frame]:
    """Decode one whole WebSocket message; trailing partial frames are malformed."""
    decoder = FrameDecoder(max_payload)
    frames = decoder.feed(message)
    if decoder.pending():
        raise ProtocolError("message ends in the middle of a frame")
    return frames


def encode_all(frames: Iterable[Frame]) -> bytes:
    """Serialise several frames into one message body."""
    return b"".join(encode(f) for f in frames)
