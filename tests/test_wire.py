"""
Tests for L{nowconnect.wire}: the sans-IO frame codec.

Everything here is pure: bytes in, frames out.  Malformed input must raise L{ProtocolError} and
nothing else, because the tunnel turns exactly that exception into a logged close.
"""
# -*- test-case-name: tests.test_wire -*-

from __future__ import annotations

import json
from typing import Any, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from nowconnect.wire import (
    HEADER,
    HEADER_SIZE,
    MAX_CONTROL_PAYLOAD,
    MAX_U32,
    Connected,
    Data,
    Fin,
    Frame,
    FrameDecoder,
    FrameType,
    Hello,
    Open,
    ProtocolError,
    Reset,
    ResetCode,
    Welcome,
    Window,
    decode_message,
    encode,
    encode_all,
    encode_data_header,
)

#: The negotiated max DATA payload used throughout; larger than MAX_CONTROL_PAYLOAD on purpose,
#: so the tests show that the DATA bound and the control bound are separate.
MAX_PAYLOAD = 4 * MAX_CONTROL_PAYLOAD

#: Bounded so the whole module runs in a few seconds.
PROPERTY = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def raw_frame(ftype: int, stream_id: int, payload: bytes) -> bytes:
    """A frame built by hand, bypassing encode(), so any type and payload can be sent."""
    return HEADER.pack(ftype, stream_id, len(payload)) + payload


def feed_chunks(decoder: FrameDecoder, chunks: Sequence[bytes]) -> list[Frame]:
    """Feed every chunk in order and collect all the frames that come out."""
    frames: list[Frame] = []
    for chunk in chunks:
        frames.extend(decoder.feed(chunk))
    return frames


def split_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """Slice C{data} at the given offsets (any order, duplicates allowed; empty chunks kept)."""
    points = [0, *sorted(min(max(c, 0), len(data)) for c in cuts), len(data)]
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def hello_payload(**overrides: Any) -> bytes:
    """A valid HELLO JSON payload, with fields replaced (or removed, when the value is DELETE)."""
    obj: dict[str, Any] = {
        "agent_id": "agent-1",
        "connectors": ["ldap", "ad"],
        "version": "0.1.0",
        "protocol": 1,
    }
    return _override(obj, overrides)


def welcome_payload(**overrides: Any) -> bytes:
    """A valid WELCOME JSON payload, with fields replaced or removed as for L{hello_payload}."""
    obj: dict[str, Any] = {"initial_window": 1 << 20, "max_frame": 65536, "protocol": 1}
    return _override(obj, overrides)


DELETE = object()


def _override(obj: dict[str, Any], overrides: dict[str, Any]) -> bytes:
    for key, value in overrides.items():
        if value is DELETE:
            del obj[key]
        else:
            obj[key] = value
    return json.dumps(obj).encode("utf-8")


SAMPLE_FRAMES: list[Frame] = [
    Hello(agent_id="agent-é", connectors=("ldap", "ad", "日本"), version="0.1.0"),
    Welcome(initial_window=1 << 20, max_frame=65536),
    Open(1, "ldap", "192.0.2.1:50000"),
    Connected(1),
    Data(1, b"hello"),
    Data(1, b""),
    Window(1, 5),
    Fin(1),
    Reset(2, ResetCode.target_refused, "connection refused"),
]


class RoundTripTests(SynchronousTestCase):
    """
    Every frame type survives encode() followed by either decoding entry point.
    """

    def assert_round_trip(self, frame: Frame) -> None:
        """Assert C{frame} comes back equal from FrameDecoder.feed and decode_message."""
        wire = encode(frame)
        decoder = FrameDecoder(MAX_PAYLOAD)
        self.assertEqual(decoder.feed(wire), [frame])
        self.assertEqual(decoder.pending(), 0)
        self.assertEqual(decode_message(wire, MAX_PAYLOAD), [frame])

    def test_hello(self) -> None:
        """HELLO with unicode agent id and connector names round-trips, on stream 0."""
        frame = Hello(
            agent_id="agënt-☃", connectors=("ldap", "ad-é", "日本語", "🔌"), version="1.2.3"
        )
        self.assert_round_trip(frame)
        self.assertEqual(HEADER.unpack_from(encode(frame))[:2], (FrameType.HELLO, 0))

    def test_hello_no_connectors_other_protocol(self) -> None:
        """HELLO with an empty connector list and a non-default protocol number round-trips."""
        self.assert_round_trip(Hello(agent_id="a", connectors=(), version="", protocol=7))

    def test_welcome(self) -> None:
        """WELCOME round-trips with its limits intact, on stream 0."""
        frame = Welcome(initial_window=1 << 20, max_frame=MAX_PAYLOAD)
        self.assert_round_trip(frame)
        self.assertEqual(HEADER.unpack_from(encode(frame))[:2], (FrameType.WELCOME, 0))

    def test_open(self) -> None:
        """OPEN round-trips, including a unicode connector name and an empty client address."""
        self.assert_round_trip(Open(1, "ldap", "192.0.2.1:389"))
        self.assert_round_trip(Open(MAX_U32, "ad-контроллер-☃", "[2001:db8::1]:636"))
        self.assert_round_trip(Open(0, "x", ""))

    def test_open_layout(self) -> None:
        """OPEN payload is a u16 connector byte length, the UTF-8 connector, then the client."""
        self.assertEqual(
            encode(Open(3, "é", "h:1")),
            b"\x03\x00\x00\x00\x03\x00\x00\x00\x07" + b"\x00\x02\xc3\xa9" + b"h:1",
        )

    def test_connected(self) -> None:
        """CONNECTED round-trips with an empty payload."""
        self.assert_round_trip(Connected(42))
        self.assertEqual(len(encode(Connected(42))), HEADER_SIZE)

    def test_data(self) -> None:
        """DATA round-trips arbitrary bytes."""
        self.assert_round_trip(Data(7, bytes(range(256))))

    def test_data_empty(self) -> None:
        """DATA with an empty payload round-trips as a header-only frame."""
        self.assert_round_trip(Data(7, b""))
        self.assertEqual(encode(Data(7, b"")), encode_data_header(7, 0))

    def test_data_max_size(self) -> None:
        """DATA of exactly max_payload bytes (more than the control limit) is accepted."""
        self.assert_round_trip(Data(MAX_U32, b"\xab" * MAX_PAYLOAD))

    def test_window(self) -> None:
        """WINDOW round-trips the smallest and the largest credit."""
        self.assert_round_trip(Window(1, 1))
        self.assert_round_trip(Window(1, 2**32 - 1))

    def test_window_layout(self) -> None:
        """WINDOW is type 6, stream id, length 4, credit, all big-endian."""
        self.assertEqual(
            encode(Window(7, 1)),
            b"\x06" + b"\x00\x00\x00\x07" + b"\x00\x00\x00\x04" + b"\x00\x00\x00\x01",
        )

    def test_fin(self) -> None:
        """FIN round-trips with an empty payload."""
        self.assert_round_trip(Fin(9))
        self.assertEqual(len(encode(Fin(9))), HEADER_SIZE)

    def test_reset_every_code(self) -> None:
        """RST round-trips with every ResetCode, with and without a unicode reason."""
        for code in ResetCode:
            self.assert_round_trip(Reset(5, code))
            self.assert_round_trip(Reset(5, code, "refusé ☃"))

    def test_reset_decodes_code_as_enum(self) -> None:
        """The decoded RST code is a ResetCode member, so its name is usable as a metric label."""
        [frame] = decode_message(encode(Reset(5, ResetCode.idle_timeout)), MAX_PAYLOAD)
        assert isinstance(frame, Reset)
        self.assertIs(frame.code, ResetCode.idle_timeout)
        self.assertEqual(frame.code.name, "idle_timeout")

    def test_reset_reason_truncated(self) -> None:
        """An RST reason longer than 1024 UTF-8 bytes is cut to 1024 bytes on the wire."""
        wire = encode(Reset(5, ResetCode.shutdown, "x" * 5000))
        self.assertEqual(len(wire), HEADER_SIZE + 1 + 1024)
        self.assertEqual(
            decode_message(wire, MAX_PAYLOAD), [Reset(5, ResetCode.shutdown, "x" * 1024)]
        )

    def test_reset_reason_cut_mid_character_still_decodes(self) -> None:
        """A reason truncated inside a multi-byte character decodes (lossily), never raises."""
        [frame] = decode_message(encode(Reset(5, ResetCode.shutdown, "☃" * 1000)), MAX_PAYLOAD)
        assert isinstance(frame, Reset)
        self.assertTrue(frame.reason.startswith("☃" * 341))

    def test_reset_reason_non_utf8_accepted(self) -> None:
        """A non-UTF-8 RST reason is accepted with replacement characters: it is only logged."""
        self.assertEqual(
            decode_message(raw_frame(FrameType.RST, 5, b"\x01ab\xff"), MAX_PAYLOAD),
            [Reset(5, ResetCode.client_reset, "ab\ufffd")],
        )

    def test_encode_rejects_non_frame(self) -> None:
        """encode() of something that is not a frame raises TypeError."""
        self.assertRaises(TypeError, encode, object())


class MessageTests(SynchronousTestCase):
    """
    Several frames per message, incremental feeding, and the DATA header helper.
    """

    def test_several_frames_in_order(self) -> None:
        """Frames packed into one message decode in the order they were encoded."""
        wire = encode_all(SAMPLE_FRAMES)
        self.assertEqual(wire, b"".join(encode(f) for f in SAMPLE_FRAMES))
        self.assertEqual(decode_message(wire, MAX_PAYLOAD), SAMPLE_FRAMES)
        self.assertEqual(FrameDecoder(MAX_PAYLOAD).feed(wire), SAMPLE_FRAMES)

    def test_empty_message(self) -> None:
        """An empty message holds no frames and is not an error."""
        self.assertEqual(decode_message(b"", MAX_PAYLOAD), [])
        self.assertEqual(encode_all([]), b"")

    def test_one_byte_at_a_time(self) -> None:
        """
        Fed one byte at a time, the decoder yields each frame exactly when its last byte
        arrives, and pending() counts the bytes of the incomplete frame held back.
        """
        encoded = [encode(f) for f in SAMPLE_FRAMES]
        wire = b"".join(encoded)
        ends = []
        total = 0
        for chunk in encoded:
            total += len(chunk)
            ends.append(total)

        decoder = FrameDecoder(MAX_PAYLOAD)
        frames: list[Frame] = []
        frame_start = 0
        for i in range(len(wire)):
            out = decoder.feed(wire[i : i + 1])
            if i + 1 in ends:
                index = ends.index(i + 1)
                self.assertEqual(out, [SAMPLE_FRAMES[index]], "after byte %d" % (i,))
                frame_start = i + 1
            else:
                self.assertEqual(out, [], "after byte %d" % (i,))
            self.assertEqual(decoder.pending(), i + 1 - frame_start, "after byte %d" % (i,))
            frames.extend(out)
        self.assertEqual(frames, SAMPLE_FRAMES)
        self.assertEqual(decoder.pending(), 0)

    def test_pending_mid_header_and_mid_payload(self) -> None:
        """pending() is the held-back byte count both inside a header and inside a payload."""
        wire = encode(Data(1, b"abcdef"))
        decoder = FrameDecoder(MAX_PAYLOAD)
        self.assertEqual(decoder.feed(wire[:4]), [])
        self.assertEqual(decoder.pending(), 4)
        self.assertEqual(decoder.feed(wire[4:12]), [])
        self.assertEqual(decoder.pending(), 12)
        self.assertEqual(decoder.feed(wire[12:] + wire[:3]), [Data(1, b"abcdef")])
        self.assertEqual(decoder.pending(), 3)

    def test_feed_empty(self) -> None:
        """Feeding no bytes yields nothing and leaves pending() unchanged."""
        decoder = FrameDecoder(MAX_PAYLOAD)
        self.assertEqual(decoder.feed(b""), [])
        decoder.feed(encode(Fin(1))[:5])
        self.assertEqual(decoder.feed(b""), [])
        self.assertEqual(decoder.pending(), 5)

    def test_data_header_plus_payload(self) -> None:
        """encode_data_header(sid, n) followed by the payload is byte-identical to encode(Data)."""
        for sid, payload in [(0, b""), (1, b"x"), (MAX_U32, b"\x00" * 1000), (77, bytes(256))]:
            self.assertEqual(
                encode_data_header(sid, len(payload)) + payload, encode(Data(sid, payload))
            )
            self.assertEqual(len(encode_data_header(sid, len(payload))), HEADER_SIZE)


class RejectionTests(SynchronousTestCase):
    """
    Malformed input raises ProtocolError, and no other exception.
    """

    def assert_rejected(self, message: bytes, label: str, max_payload: int = MAX_PAYLOAD) -> None:
        """
        Assert both decode_message and a FrameDecoder fed the whole message raise
        ProtocolError.  Any other exception propagates and errors the test.
        """
        with self.assertRaises(ProtocolError, msg=label):
            decode_message(message, max_payload)
        if label != "truncated":
            with self.assertRaises(ProtocolError, msg=label):
                FrameDecoder(max_payload).feed(message)

    def test_truncated_message(self) -> None:
        """A message that ends inside a header or inside a payload is malformed."""
        full = encode_all([Fin(1), Data(2, b"payload")])
        for cut in range(1, len(encode(Data(2, b"payload")))):
            with self.assertRaises(ProtocolError, msg="cut %d" % (cut,)):
                decode_message(full[:-cut], MAX_PAYLOAD)
        with self.assertRaises(ProtocolError):
            decode_message(b"\x05", MAX_PAYLOAD)

    def test_data_over_max_rejected_at_header(self) -> None:
        """
        A DATA header announcing more than max_payload is rejected as soon as the 9-byte
        header arrives, without waiting for (or buffering) the payload.
        """
        header = encode_data_header(1, 101)
        with self.assertRaises(ProtocolError):
            FrameDecoder(100).feed(header)
        with self.assertRaises(ProtocolError):
            decode_message(header, 100)

    def test_data_over_max_rejected_at_last_header_byte(self) -> None:
        """A DATA header split across feeds is rejected when its ninth byte arrives."""
        header = encode_data_header(1, MAX_U32)
        decoder = FrameDecoder(MAX_PAYLOAD)
        self.assertEqual(decoder.feed(header[:-1]), [])
        with self.assertRaises(ProtocolError):
            decoder.feed(header[-1:])

    def test_data_over_max_after_valid_frame(self) -> None:
        """An oversized DATA header after a valid frame in the same chunk is still rejected."""
        with self.assertRaises(ProtocolError):
            FrameDecoder(100).feed(encode(Fin(1)) + encode_data_header(1, 101))

    def test_data_at_max_header_waits(self) -> None:
        """A DATA header announcing exactly max_payload is accepted and waits for the payload."""
        decoder = FrameDecoder(100)
        self.assertEqual(decoder.feed(encode_data_header(1, 100)), [])
        self.assertEqual(decoder.pending(), HEADER_SIZE)
        self.assertEqual(decoder.feed(b"z" * 100), [Data(1, b"z" * 100)])

    def test_control_over_max_rejected_at_header(self) -> None:
        """
        Every control frame type announcing more than MAX_CONTROL_PAYLOAD is rejected from its
        header alone, even when the negotiated DATA limit is larger.
        """
        for ftype in FrameType:
            if ftype == FrameType.DATA:
                continue
            header = HEADER.pack(ftype, 1, MAX_CONTROL_PAYLOAD + 1)
            with self.assertRaises(ProtocolError, msg=ftype.name):
                FrameDecoder(MAX_PAYLOAD).feed(header)
            with self.assertRaises(ProtocolError, msg=ftype.name):
                decode_message(header, MAX_PAYLOAD)

    def test_control_at_max_header_waits(self) -> None:
        """A control header announcing exactly MAX_CONTROL_PAYLOAD waits for its payload."""
        decoder = FrameDecoder(MAX_PAYLOAD)
        self.assertEqual(decoder.feed(HEADER.pack(FrameType.OPEN, 1, MAX_CONTROL_PAYLOAD)), [])
        self.assertEqual(decoder.pending(), HEADER_SIZE)

    def test_unknown_type(self) -> None:
        """Frame types 0, 9 and 255 are rejected, from the header alone."""
        for ftype in (0, 9, 255):
            self.assert_rejected(raw_frame(ftype, 1, b""), "type %d" % (ftype,))
            self.assert_rejected(raw_frame(ftype, 1, b"abcd"), "type %d" % (ftype,))
            with self.assertRaises(ProtocolError):
                FrameDecoder(MAX_PAYLOAD).feed(HEADER.pack(ftype, 1, 10))

    def test_window_wrong_length(self) -> None:
        """WINDOW payloads other than exactly 4 bytes are rejected."""
        for payload in (b"", b"\x00\x00\x01", b"\x00\x00\x00\x00\x01", b"\x00" * 7 + b"\x01"):
            self.assert_rejected(raw_frame(FrameType.WINDOW, 1, payload), repr(payload))

    def test_window_zero_credit(self) -> None:
        """WINDOW granting zero credit is rejected."""
        self.assert_rejected(raw_frame(FrameType.WINDOW, 1, b"\x00\x00\x00\x00"), "zero credit")

    def test_fin_connected_with_payload(self) -> None:
        """FIN and CONNECTED must have an empty payload."""
        for ftype in (FrameType.FIN, FrameType.CONNECTED):
            self.assert_rejected(raw_frame(ftype, 1, b"x"), ftype.name)
            self.assert_rejected(raw_frame(ftype, 1, b"\x00" * 4), ftype.name)

    def test_open_malformed(self) -> None:
        """
        OPEN is rejected when too short for the length prefix, with a zero connector length,
        with a connector length past the end, or with non-UTF-8 connector or client.
        """
        cases = {
            "empty": b"",
            "one byte": b"\x00",
            "zero connector length": b"\x00\x00",
            "zero connector length with client": b"\x00\x00127.0.0.1:1",
            "connector past end": b"\x00\x05abc",
            "connector length max": b"\xff\xff" + b"a" * 10,
            "connector not utf-8": b"\x00\x02\xc3\x28h:1",
            "client not utf-8": b"\x00\x04ldap\xff\xfe",
        }
        for label, payload in cases.items():
            self.assert_rejected(raw_frame(FrameType.OPEN, 1, payload), label)

    def test_reset_malformed(self) -> None:
        """RST is rejected with no code at all or with a code outside ResetCode."""
        self.assert_rejected(raw_frame(FrameType.RST, 1, b""), "empty")
        for code in (0, max(ResetCode) + 1, 255):
            self.assert_rejected(raw_frame(FrameType.RST, 1, bytes([code]) + b"why"), str(code))

    def test_hello_malformed(self) -> None:
        """
        HELLO is rejected when not UTF-8, not JSON, not an object, missing a field, or with a
        field of the wrong type (including C{true} for the int and non-string connectors).
        """
        cases = {
            "not utf-8": b"\xff\xfe{}",
            "not json": b"hello",
            "truncated json": hello_payload()[:-1],
            "empty": b"",
            "array": b'["agent", ["ldap"], "0.1", 1]',
            "string": b'"hello"',
            "null": b"null",
            "number": b"1",
            "missing agent_id": hello_payload(agent_id=DELETE),
            "missing connectors": hello_payload(connectors=DELETE),
            "missing version": hello_payload(version=DELETE),
            "missing protocol": hello_payload(protocol=DELETE),
            "agent_id int": hello_payload(agent_id=1),
            "agent_id null": hello_payload(agent_id=None),
            "version list": hello_payload(version=["0.1"]),
            "protocol true": hello_payload(protocol=True),
            "protocol false": hello_payload(protocol=False),
            "protocol float": hello_payload(protocol=1.0),
            "protocol string": hello_payload(protocol="1"),
            "connectors string": hello_payload(connectors="ldap"),
            "connectors object": hello_payload(connectors={"ldap": 1}),
            "connectors int member": hello_payload(connectors=["ldap", 1]),
            "connectors true member": hello_payload(connectors=[True]),
            "connectors null member": hello_payload(connectors=[None]),
            "connectors nested list": hello_payload(connectors=[["ldap"]]),
        }
        for label, payload in cases.items():
            self.assert_rejected(raw_frame(FrameType.HELLO, 0, payload), label)

    def test_welcome_malformed(self) -> None:
        """
        WELCOME is rejected when not UTF-8, not JSON, not an object, missing a field, or with a
        field of the wrong type (including C{true} and floats for the int fields).
        """
        cases = {
            "not utf-8": b"\x80",
            "not json": b"{welcome}",
            "empty": b"",
            "array": b"[1048576, 65536, 1]",
            "missing initial_window": welcome_payload(initial_window=DELETE),
            "missing max_frame": welcome_payload(max_frame=DELETE),
            "missing protocol": welcome_payload(protocol=DELETE),
            "initial_window true": welcome_payload(initial_window=True),
            "max_frame true": welcome_payload(max_frame=True),
            "protocol true": welcome_payload(protocol=True),
            "max_frame float": welcome_payload(max_frame=65536.0),
            "initial_window string": welcome_payload(initial_window="1048576"),
            "max_frame null": welcome_payload(max_frame=None),
        }
        for label, payload in cases.items():
            self.assert_rejected(raw_frame(FrameType.WELCOME, 0, payload), label)

    def test_valid_hand_built_hello_and_welcome(self) -> None:
        """The hand-built payloads the rejection tests mutate are themselves valid."""
        self.assertEqual(
            decode_message(raw_frame(FrameType.HELLO, 0, hello_payload()), MAX_PAYLOAD),
            [Hello(agent_id="agent-1", connectors=("ldap", "ad"), version="0.1.0", protocol=1)],
        )
        self.assertEqual(
            decode_message(raw_frame(FrameType.WELCOME, 0, welcome_payload()), MAX_PAYLOAD),
            [Welcome(initial_window=1 << 20, max_frame=65536, protocol=1)],
        )

    def test_welcome_limits_out_of_range_rejected(self) -> None:
        """WELCOME limits outside what a tunnel can run with are a protocol error."""
        for bad in (
            welcome_payload(max_frame=0),
            welcome_payload(max_frame=17 * 1024 * 1024),
            welcome_payload(initial_window=-1),
            welcome_payload(initial_window=2**32),
        ):
            with pytest.raises(ProtocolError):
                decode_message(raw_frame(FrameType.WELCOME, 0, bad), MAX_PAYLOAD)

    def test_deeply_nested_json_rejected(self) -> None:
        """
        A HELLO or WELCOME whose JSON nests deeper than the interpreter's recursion limit (but
        fits in MAX_CONTROL_PAYLOAD) is rejected with ProtocolError, not RecursionError.
        """
        for ftype in (FrameType.HELLO, FrameType.WELCOME):
            for payload in (b"[" * 50000, b'{"a":' * 10000):
                with pytest.raises(ProtocolError):
                    decode_message(raw_frame(ftype, 0, payload), MAX_PAYLOAD)


# -- hypothesis strategies --------------------------------------------------------------------

stream_ids = st.integers(min_value=0, max_value=MAX_U32)
# UTF-8-encodable text only: encode() is not expected to cope with lone surrogates.
texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=20)
nonempty_texts = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=20)
json_ints = st.integers(min_value=-(2**63), max_value=2**63)

hellos = st.builds(
    Hello,
    agent_id=texts,
    connectors=st.lists(texts, max_size=5).map(tuple),
    version=texts,
    protocol=json_ints,
)
welcomes = st.builds(
    Welcome,
    initial_window=st.integers(1024, 2**32 - 1),
    max_frame=st.integers(1024, 16 * 1024 * 1024),
    protocol=json_ints,
)
opens = st.builds(Open, stream_id=stream_ids, connector=nonempty_texts, client=texts)
connecteds = st.builds(Connected, stream_id=stream_ids)
datas = st.builds(
    Data,
    stream_id=stream_ids,
    payload=st.one_of(st.binary(max_size=64), st.binary(min_size=1000, max_size=3000)),
)
windows = st.builds(Window, stream_id=stream_ids, credit=st.integers(1, MAX_U32))
fins = st.builds(Fin, stream_id=stream_ids)
# Short reasons only: longer ones are deliberately truncated on the wire.
resets = st.builds(
    Reset, stream_id=stream_ids, code=st.sampled_from(ResetCode), reason=texts
)
#: One strategy per frame type; RoundTripTests.test_strategies_cover_every_type keeps it whole.
STRATEGY_BY_TYPE: dict[FrameType, st.SearchStrategy[Any]] = {
    FrameType.HELLO: hellos,
    FrameType.WELCOME: welcomes,
    FrameType.OPEN: opens,
    FrameType.CONNECTED: connecteds,
    FrameType.DATA: datas,
    FrameType.WINDOW: windows,
    FrameType.FIN: fins,
    FrameType.RST: resets,
}
frames_strategy: st.SearchStrategy[Frame] = st.one_of(*STRATEGY_BY_TYPE.values())
cuts = st.lists(st.integers(min_value=0, max_value=20000), max_size=12)

# Byte soup biased towards plausible frames, so the fuzzer reaches the payload decoders rather
# than stopping at the first header with an absurd type or length.
_fuzz_frame = st.one_of(
    st.binary(max_size=40),
    st.builds(
        lambda t, sid, p: raw_frame(t, sid, p),
        st.integers(0, 10),
        st.integers(0, 3),
        st.one_of(
            st.binary(max_size=40),
            st.sampled_from([hello_payload(), welcome_payload(), b"\x00\x04ldaph:1"]),
        ),
    ),
    st.builds(lambda t, n: HEADER.pack(t, 1, n), st.integers(0, 255), st.integers(0, MAX_U32)),
)
fuzz_bytes = st.lists(_fuzz_frame, max_size=8).map(b"".join)


class PropertyTests(SynchronousTestCase):
    """
    Hypothesis properties over arbitrary input and arbitrary valid frames.
    """

    @PROPERTY
    @given(data=st.one_of(st.binary(max_size=300), fuzz_bytes), chunk_cuts=cuts)
    def test_arbitrary_bytes_only_protocol_error(self, data: bytes, chunk_cuts: list[int]) -> None:
        """
        Any bytes fed in any chunking either decode or raise ProtocolError; decode_message of the
        same bytes likewise.  No other exception escapes.
        """
        decoder = FrameDecoder(64)
        try:
            feed_chunks(decoder, split_at(data, chunk_cuts))
        except ProtocolError:
            pass
        try:
            decode_message(data, 64)
        except ProtocolError:
            pass

    @PROPERTY
    @given(frames=st.lists(frames_strategy, max_size=10), chunk_cuts=cuts)
    def test_valid_frames_round_trip(self, frames: list[Frame], chunk_cuts: list[int]) -> None:
        """
        Any list of valid frames encoded with encode_all decodes back exactly, both through
        decode_message and through a FrameDecoder fed a random chunking, ending with nothing
        pending.
        """
        wire = encode_all(frames)
        self.assertEqual(decode_message(wire, MAX_PAYLOAD), frames)
        decoder = FrameDecoder(MAX_PAYLOAD)
        self.assertEqual(feed_chunks(decoder, split_at(wire, chunk_cuts)), frames)
        self.assertEqual(decoder.pending(), 0)

    def test_strategies_cover_every_type(self) -> None:
        """The valid-frame strategy has a branch for every frame type."""
        self.assertEqual(set(STRATEGY_BY_TYPE), set(FrameType))

    @PROPERTY
    @given(frames=st.lists(frames_strategy, min_size=1, max_size=10))
    def test_valid_message_missing_last_byte(self, frames: list[Frame]) -> None:
        """A valid message with its last byte removed is rejected with ProtocolError."""
        wire = encode_all(frames)
        with self.assertRaises(ProtocolError):
            decode_message(wire[:-1], MAX_PAYLOAD)

