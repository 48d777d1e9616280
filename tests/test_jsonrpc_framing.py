"""The jsonrpc-fdpass framer and fd batching plan, as the spec states them.

Messages are written with the standard library's json module (an encoder
independent of msgspec) and read back with json.loads, so expected values
never come from the code under test.
"""

from __future__ import annotations

import bisect
import json
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec import UNSET

from protocol.jsonrpc import (
    FD_ERROR,
    ErrorObject,
    FramingError,
    InvalidMessage,
    MessageFramer,
    Request,
    Response,
    encode_message,
    error_response,
    new_request,
    plan_fd_batches,
    success_response,
)

ABSENT = "<absent>"

# Text biased towards the bytes that steer the scanner.
json_text = st.text(
    alphabet=st.one_of(
        st.sampled_from('{}[]"\\/ \t\n\r:,'),
        st.characters(codec="utf-8"),
    ),
    max_size=12,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | json_text,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(json_text, children, max_size=4)
    ),
    max_leaves=12,
)
whitespace = st.text(alphabet=" \t\n\r", max_size=3)


@st.composite
def request_documents(draw: st.DrawFn) -> dict[str, Any]:
    document: dict[str, Any] = {"jsonrpc": "2.0", "method": draw(json_text)}
    document["params"] = draw(st.dictionaries(json_text, json_values, max_size=4))
    request_id = draw(st.one_of(st.integers(0, 2**31), json_text, st.just(ABSENT)))
    if request_id != ABSENT:
        document["id"] = request_id
    return document


def dump(document: dict[str, Any], style: int) -> bytes:
    """Serialize with the standard library in one of a few layouts."""
    if style == 0:
        return json.dumps(document, separators=(",", ":")).encode()
    if style == 1:
        return json.dumps(document, ensure_ascii=False).encode()
    return json.dumps(document, indent=style - 1, ensure_ascii=False).encode()


def as_comparable(message: Any, fds: list[int]) -> tuple[Any, ...]:
    assert isinstance(message, Request), message
    request_id = ABSENT if message.id is UNSET else message.id
    assert not isinstance(message.params, type(UNSET))
    params = json.loads(bytes(message.params))
    return (message.method, params, request_id, fds)


def drain(framer: MessageFramer) -> list[tuple[Any, list[int]]]:
    received = []
    while (item := framer.next_message()) is not None:
        received.append(item)
    return received


def feed_all(framer: MessageFramer, chunks: list[tuple[bytes, list[int]]]) -> list[Any]:
    received = []
    for data, fds in chunks:
        framer.feed(data, fds)
        received.extend(drain(framer))
    return received


class Schedule(NamedTuple):
    """What a sender means to send, and the sendmsg calls it makes."""

    expected: list[tuple[Any, ...]]
    calls: list[tuple[bytes, list[int]]]
    unannounced_in: int | None


@st.composite
def sender_schedules(draw: st.DrawFn, unannounced: bool = False) -> Schedule:
    """Messages with fds, as the sendmsg calls a conforming sender makes.

    Whitespace before a message goes in a call of its own: the spec sends a
    message's fds with its first byte. Whitespace after it may share its
    payload. With ``unannounced``, one message carries 1 to 300 fds more
    than it announces (its expected fds stay the announced ones).
    """
    expected: list[tuple[Any, ...]] = []
    calls: list[tuple[bytes, list[int]]] = []
    next_fd = 3
    documents = draw(st.lists(request_documents(), min_size=1, max_size=5))
    unannounced_in = None
    if unannounced:
        unannounced_in = draw(st.integers(0, len(documents) - 1))
    for index, document in enumerate(documents):
        fd_count = draw(st.one_of(st.integers(0, 3), st.integers(0, 600)))
        extra = draw(st.integers(1, 300)) if index == unannounced_in else 0
        fds = list(range(next_fd, next_fd + fd_count + extra))
        next_fd += fd_count + extra
        if fd_count:
            document["fds"] = fd_count
        leading = draw(whitespace).encode()
        if leading:
            calls.append((leading, []))
        payload = dump(document, draw(st.integers(0, 3))) + draw(whitespace).encode()
        batch = draw(st.integers(1, 300))
        calls.extend(plan_fd_batches(payload, fds, batch))
        request_id = document.get("id", ABSENT)
        announced = fds[:fd_count]
        expected.append((document["method"], document["params"], request_id, announced))
    return Schedule(expected, calls, unannounced_in)


@st.composite
def receiver_chunks(
    draw: st.DrawFn, calls: list[tuple[bytes, list[int]]], like_linux: bool = False
) -> list[tuple[bytes, list[int]]]:
    """Re-cut the byte stream at random; each call's fds ride with its first byte.

    ``like_linux`` also ends a chunk where a call carrying fds ends, as
    Linux's recvmsg does on a stream socket (unix_stream_read_generic stops
    after the data that came with fds).
    """
    stream = b"".join(data for data, _ in calls)
    call_starts = []
    offset = 0
    for data, _ in calls:
        call_starts.append(offset)
        offset += len(data)
    cuts = draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=20))
    if like_linux:
        for start, (data, fds) in zip(call_starts, calls, strict=True):
            if fds:
                cuts.add(start + len(data))
    bounds = [0, *sorted(c for c in cuts if c < len(stream)), len(stream)]
    chunks = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        first = bisect.bisect_left(call_starts, start)
        last = bisect.bisect_left(call_starts, end)
        fds = [fd for _, call_fds in calls[first:last] for fd in call_fds]
        chunks.append((stream[start:end], fds))
    return chunks


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_any_chunking_and_fd_batching_yields_the_same_messages(
    data: st.DataObject,
) -> None:
    expected, calls, _ = data.draw(sender_schedules())
    chunks = data.draw(receiver_chunks(calls))
    framer = MessageFramer()

    received = feed_all(framer, chunks)
    framer.at_eof()

    assert [as_comparable(m, fds) for m, fds in received] == expected
    assert framer.close() == []


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_unannounced_fds_are_fatal_before_a_later_message_is_handed_out(
    data: st.DataObject,
) -> None:
    expected, calls, bad = data.draw(sender_schedules(unannounced=True))
    assert bad is not None
    chunks = data.draw(receiver_chunks(calls, like_linux=True))
    framer = MessageFramer()

    received: list[Any] = []
    with pytest.raises(FramingError, match="mismatched fd count"):
        for data_chunk, fds in chunks:
            framer.feed(data_chunk, fds)
            while (item := framer.next_message()) is not None:
                received.append(item)

    # The message with extra fds is handed out only when its own fds came
    # first, and every message handed out has exactly the fds it announced.
    assert len(received) in (bad, bad + 1)
    assert [as_comparable(m, fds) for m, fds in received] == expected[: len(received)]


def test_whitespace_between_messages_is_skipped() -> None:
    stream = (
        b' \t\r\n{"jsonrpc":"2.0","method":"a"}\n\n\t {"jsonrpc":"2.0","method":"b"} '
    )
    framer = MessageFramer()
    framer.feed(stream, [])
    methods = [m.method for m, _ in drain(framer) if isinstance(m, Request)]
    assert methods == ["a", "b"]
    framer.at_eof()


def test_messages_may_follow_each_other_without_whitespace() -> None:
    framer = MessageFramer()
    framer.feed(b'{"jsonrpc":"2.0","method":"a"}{"jsonrpc":"2.0","method":"b"}', [])
    assert len(drain(framer)) == 2


def test_braces_and_escaped_quotes_inside_strings_do_not_end_a_message() -> None:
    document = {
        "jsonrpc": "2.0",
        "method": 'we}ird{"name',
        "params": {"a\\": '}}}\\"{{', "b": ["\\", '\\\\"}']},
        "id": "{",
    }
    stream = json.dumps(document).encode()
    framer = MessageFramer()
    for byte in stream:
        framer.feed(bytes([byte]), [])
        if byte != stream[-1]:
            assert framer.next_message() is None
    message, fds = drain(framer)[0]
    assert as_comparable(message, fds) == (
        'we}ird{"name',
        {"a\\": '}}}\\"{{', "b": ["\\", '\\\\"}']},
        "{",
        [],
    )


def test_nested_objects_and_unicode_survive_any_split() -> None:
    params = {"x": {"y": {"z": [{"é": "雪"}, {"🐳": {"": {}}}]}}, "ü": "ß"}
    document = {"jsonrpc": "2.0", "method": "Lätt", "params": params, "id": 9}
    stream = json.dumps(document, ensure_ascii=False).encode()
    for cut in range(1, len(stream)):
        framer = MessageFramer()
        received = feed_all(framer, [(stream[:cut], []), (stream[cut:], [])])
        assert [as_comparable(m, f) for m, f in received] == [("Lätt", params, 9, [])]


def test_a_message_waits_for_fds_sent_in_later_batches() -> None:
    framer = MessageFramer()
    framer.feed(b'{"jsonrpc":"2.0","method":"m","id":1,"fds":3}', [10])
    assert framer.next_message() is None
    framer.feed(b" ", [11])
    assert framer.next_message() is None
    framer.feed(b" ", [12])
    message, fds = drain(framer)[0]
    assert fds == [10, 11, 12]


def test_fds_are_handed_out_in_fifo_order_per_message() -> None:
    framer = MessageFramer()
    framer.feed(
        b'{"jsonrpc":"2.0","method":"a","fds":2}{"jsonrpc":"2.0","method":"b"}'
        b'{"jsonrpc":"2.0","method":"c","fds":1}',
        [5, 6, 7],
    )
    assert [fds for _, fds in drain(framer)] == [[5, 6], [], [7]]


def test_syntax_error_is_fatal() -> None:
    framer = MessageFramer()
    framer.feed(b'{"jsonrpc":"2.0","method":tru}', [])
    with pytest.raises(FramingError, match="malformed JSON") as raised:
        framer.next_message()
    assert raised.value.code == -32050 == FD_ERROR


def test_framer_stays_failed_after_a_fatal_error() -> None:
    framer = MessageFramer()
    framer.feed(b"[]", [])
    with pytest.raises(FramingError):
        framer.next_message()
    with pytest.raises(FramingError):
        framer.feed(b"{}", [4])
    assert framer.close() == [4]


def test_a_byte_other_than_an_open_brace_between_messages_is_fatal() -> None:
    framer = MessageFramer()
    framer.feed(b'{"jsonrpc":"2.0","method":"a"} x', [])
    assert framer.next_message() is not None
    with pytest.raises(FramingError, match="0x78 at stream offset 31"):
        framer.next_message()


def test_a_batch_is_fatal() -> None:
    framer = MessageFramer()
    framer.feed(b'[{"jsonrpc":"2.0","method":"a"}]', [])
    with pytest.raises(FramingError, match="must start with.*batches"):
        framer.next_message()


def test_invalid_utf8_is_fatal() -> None:
    framer = MessageFramer()
    framer.feed(b'{"jsonrpc":"2.0","method":"a","x":"\xff"}', [])
    with pytest.raises(FramingError, match="malformed JSON"):
        framer.next_message()


def test_next_message_starting_before_promised_fds_is_a_mismatched_count() -> None:
    framer = MessageFramer()
    framer.feed(b'{"jsonrpc":"2.0","method":"a","fds":2}', [3])
    assert framer.next_message() is None
    framer.feed(b'  {"jsonrpc"', [])
    with pytest.raises(FramingError, match="mismatched fd count.*1 of the 2"):
        framer.next_message()
    assert framer.close() == [3]


def test_eof_before_promised_fds_is_a_mismatched_count() -> None:
    framer = MessageFramer()
    framer.feed(b'{"jsonrpc":"2.0","method":"a","fds":2} ', [3])
    assert framer.next_message() is None
    with pytest.raises(FramingError, match="mismatched fd count.*closed"):
        framer.at_eof()
    assert framer.close() == [3]


def test_eof_inside_a_message_is_fatal() -> None:
    framer = MessageFramer()
    framer.feed(b'{"jsonrpc":"2.0","meth', [])
    assert framer.next_message() is None
    with pytest.raises(FramingError, match="inside a message"):
        framer.at_eof()


def test_fds_sent_with_a_message_that_announces_none_are_fatal() -> None:
    framer = MessageFramer()
    framer.feed(b'{"jsonrpc":"2.0","method":"a"}', [8])
    with pytest.raises(FramingError, match="mismatched fd count.*1 fds that no"):
        framer.next_message()
    assert framer.close() == [8]


def test_unannounced_fds_are_not_handed_to_the_next_message_announcing_fds() -> None:
    framer = MessageFramer()
    framer.feed(b'{"jsonrpc":"2.0","method":"a"}\n', [8])
    with pytest.raises(FramingError, match="mismatched fd count"):
        framer.next_message()
    with pytest.raises(FramingError):
        framer.feed(b'{"jsonrpc":"2.0","method":"b","fds":1}', [9])
    assert framer.close() == [8, 9]


def test_many_messages_with_unannounced_fds_fail_at_the_first() -> None:
    # The tester's case: 20 messages, each sent with 250 fds and no "fds".
    framer = MessageFramer()
    received = []
    with pytest.raises(FramingError, match="250 fds that no message announced"):
        for index in range(20):
            fds = list(range(1000 + 250 * index, 1000 + 250 * (index + 1)))
            framer.feed(b'{"jsonrpc":"2.0","method":"a"}', fds)
            received.extend(drain(framer))
    assert received == []
    assert framer.close() == list(range(1000, 1250))


def test_more_fds_than_announced_in_a_continuation_are_fatal() -> None:
    framer = MessageFramer()
    framer.feed(b'{"jsonrpc":"2.0","method":"a","fds":2}', [5])
    assert framer.next_message() is None
    framer.feed(b" ", [6, 7])
    with pytest.raises(FramingError, match="1 fds that no message announced"):
        framer.next_message()
    assert framer.close() == [5, 6, 7]


def test_fds_in_a_whitespace_chunk_after_the_message_took_its_own_are_fatal() -> None:
    framer = MessageFramer()
    framer.feed(b'{"jsonrpc":"2.0","method":"a","fds":1}', [5])
    (_, fds), *_ = drain(framer)
    assert fds == [5]
    framer.feed(b"  ", [6])
    with pytest.raises(FramingError, match="1 fds that no message announced"):
        framer.next_message()
    assert framer.close() == [6]


def test_fds_sharing_a_chunk_with_the_next_message_start_belong_to_it() -> None:
    framer = MessageFramer()
    framer.feed(b'{"jsonrpc":"2.0","method":"a"}\n{"jsonrpc":"2.0",', [5, 6])
    message, fds = drain(framer)[0]
    assert isinstance(message, Request) and message.method == "a" and fds == []
    framer.feed(b'"method":"b","fds":2}', [])
    (message, fds), *_ = drain(framer)
    assert isinstance(message, Request) and message.method == "b"
    assert fds == [5, 6]
    framer.at_eof()


def test_queued_fds_are_bounded() -> None:
    framer = MessageFramer()
    framer.feed(b'{"jsonrpc":"2.0","method":"a","fds":4096}', list(range(250)))
    assert framer.next_message() is None
    for start in range(250, 4096, 250):
        framer.feed(b" ", list(range(start, min(start + 250, 4096))))
    (_, fds), *_ = drain(framer)
    assert fds == list(range(4096))
    framer.feed(b'{"jsonrpc":"2.0","method":"b","fds":1}', [0])
    with pytest.raises(FramingError, match="4097 fds that no message has taken"):
        framer.feed(b" ", list(range(1, 4097)))
    assert framer.close() == list(range(4097))


def test_a_message_announcing_more_fds_than_the_bound_is_fatal() -> None:
    framer = MessageFramer()
    framer.feed(b'{"jsonrpc":"2.0","method":"a","fds":5000}', list(range(250)))
    with pytest.raises(FramingError, match="announced 5000 fds"):
        framer.next_message()
    assert framer.close() == list(range(250))


def test_nesting_up_to_128_levels_is_accepted() -> None:
    # The message object is level 1, then 127 arrays.
    params = b"[" * 127 + b"]" * 127
    framer = MessageFramer()
    framer.feed(b'{"jsonrpc":"2.0","method":"a","params":' + params + b"}", [])
    (message, _), *_ = drain(framer)
    assert isinstance(message, Request)
    assert json.loads(bytes(message.params)) == json.loads(params)  # type: ignore[arg-type]


@pytest.mark.parametrize("opening", [b"[", b'{"k":'])
def test_nesting_deeper_than_128_levels_is_fatal_at_the_offending_byte(
    opening: bytes,
) -> None:
    head = b'{"jsonrpc":"2.0","method":"a","params":'
    framer = MessageFramer()
    framer.feed(head + opening * 127, [])
    assert framer.next_message() is None
    framer.feed(opening, [7])
    with pytest.raises(FramingError, match="nested more than 128 levels") as raised:
        framer.next_message()
    assert raised.value.code == FD_ERROR
    assert framer.close() == [7]


def test_a_thousand_nested_arrays_are_a_framing_error_not_a_crash() -> None:
    framer = MessageFramer()
    framer.feed(
        b'{"jsonrpc":"2.0","id":1,"method":"Initialize","params":'
        + b"[" * 1000
        + b"]" * 1000
        + b"}",
        [],
    )
    with pytest.raises(FramingError, match="nested more than 128 levels"):
        framer.next_message()


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = "[{" * 1000
    framer = MessageFramer()
    framer.feed(json.dumps({"jsonrpc": "2.0", "method": text}).encode(), [])
    (message, _), *_ = drain(framer)
    assert isinstance(message, Request) and message.method == text


def test_mismatched_brackets_are_malformed_json() -> None:
    framer = MessageFramer()
    framer.feed(b'{"jsonrpc":"2.0","method":"a","params":[}]', [])
    with pytest.raises(FramingError, match="malformed JSON"):
        framer.next_message()


@pytest.mark.parametrize("fds_member", [b'"two"', b"-1", b"1.5", b"null"])
def test_unusable_fds_member_is_fatal(fds_member: bytes) -> None:
    framer = MessageFramer()
    framer.feed(b'{"jsonrpc":"2.0","method":"a","fds":' + fds_member + b"}", [])
    with pytest.raises(FramingError, match="'fds' member"):
        framer.next_message()


def test_message_over_the_size_bound_is_fatal_before_it_ends() -> None:
    framer = MessageFramer(max_message_size=100)
    framer.feed(b'{"jsonrpc":"2.0","params":"' + b"a" * 100, [])
    with pytest.raises(FramingError, match="100-byte limit"):
        framer.next_message()


def test_whitespace_between_messages_does_not_count_towards_the_bound() -> None:
    framer = MessageFramer(max_message_size=40)
    for _ in range(100):
        framer.feed(b" " * 100, [])
        assert framer.next_message() is None
    framer.feed(b'{"jsonrpc":"2.0","method":"a"}', [])
    assert len(drain(framer)) == 1


@pytest.mark.parametrize(
    ("stream", "expected_id", "reason"),
    [
        (b'{"jsonrpc":"2.0","method":5,"id":7}', 7, "Expected `str`"),
        (b'{"jsonrpc":"1.0","method":"a","id":"x"}', "x", "jsonrpc"),
        (b'{"jsonrpc":"2.0","method":"a","id":[1]}', None, "id"),
        (b'{"hello":"world"}', None, "no method, result or error"),
        (
            b'{"jsonrpc":"2.0","result":1,"error":{"code":1,"message":""},"id":3}',
            3,
            "exactly one of result and error",
        ),
    ],
)
def test_valid_json_that_is_not_json_rpc_is_not_fatal(
    stream: bytes, expected_id: object, reason: str
) -> None:
    framer = MessageFramer()
    framer.feed(stream + b'{"jsonrpc":"2.0","method":"next"}', [])
    (invalid, _), (following, _) = drain(framer)
    assert isinstance(invalid, InvalidMessage)
    assert invalid.id == expected_id
    assert reason in invalid.reason
    assert isinstance(following, Request) and following.method == "next"


def test_invalid_message_still_takes_its_fds() -> None:
    framer = MessageFramer()
    framer.feed(b'{"jsonrpc":"2.0","method":null,"fds":2}', [4, 5])
    message, fds = drain(framer)[0]
    assert isinstance(message, InvalidMessage)
    assert fds == [4, 5]


def test_responses_are_decoded() -> None:
    framer = MessageFramer()
    framer.feed(
        b'{"jsonrpc":"2.0","result":{"a":[1]},"id":1,"fds":1}'
        b'{"jsonrpc":"2.0","error":{"code":-32601,"message":"no"},"id":null}',
        [9],
    )
    (ok, ok_fds), (failed, _) = drain(framer)
    assert isinstance(ok, Response) and isinstance(failed, Response)
    assert json.loads(bytes(ok.result)) == {"a": [1]}  # type: ignore[arg-type]
    assert ok_fds == [9]
    assert failed.error == ErrorObject(code=-32601, message="no")
    assert failed.id is None


def test_feeding_one_byte_at_a_time_scans_each_byte_once() -> None:
    document = {"jsonrpc": "2.0", "method": "big", "params": {"s": 'x{\\"}' * 20000}}
    stream = b"  " + json.dumps(document).encode() + b"\n"
    framer = MessageFramer()

    received = []
    for index in range(len(stream)):
        framer.feed(stream[index : index + 1], [])
        received.extend(drain(framer))

    assert len(received) == 1
    assert framer.scanned_bytes == len(stream)


def test_many_small_messages_in_one_chunk_scan_each_byte_once() -> None:
    one = b'{"jsonrpc":"2.0","method":"m"}\n'
    framer = MessageFramer()
    framer.feed(one * 5000, [])
    assert len(drain(framer)) == 5000
    assert framer.scanned_bytes == len(one) * 5000


def test_encoding_omits_fds_when_zero_and_id_when_a_notification() -> None:
    assert (
        encode_message(new_request("GetImage", {"imageId": "a"}, id=1))
        == b'{"jsonrpc":"2.0","method":"GetImage","params":{"imageId":"a"},"id":1}'
    )
    assert (
        encode_message(new_request("Ping", None))
        == b'{"jsonrpc":"2.0","method":"Ping"}'
    )
    assert (
        encode_message(success_response(1, {"n": 2}, fds=2))
        == b'{"jsonrpc":"2.0","result":{"n":2},"id":1,"fds":2}'
    )
    assert (
        encode_message(error_response(None, ErrorObject(code=-32600, message="bad")))
        == b'{"jsonrpc":"2.0","error":{"code":-32600,"message":"bad"},"id":null}'
    )


def test_plan_sends_payload_with_first_batch_then_single_spaces() -> None:
    assert plan_fd_batches(b"{}", list(range(7)), 3) == [
        (b"{}", [0, 1, 2]),
        (b" ", [3, 4, 5]),
        (b" ", [6]),
    ]


def test_plan_without_fds_is_one_call() -> None:
    assert plan_fd_batches(b"{}", [], 250) == [(b"{}", [])]


def test_plan_default_batch_is_250() -> None:
    plan = plan_fd_batches(b"{}", list(range(600)))
    assert [len(fds) for _, fds in plan] == [250, 250, 100]


def test_plan_refuses_fds_without_payload_and_empty_batches() -> None:
    with pytest.raises(ValueError):
        plan_fd_batches(b"", [1], 250)
    with pytest.raises(ValueError):
        plan_fd_batches(b"{}", [1], 0)
