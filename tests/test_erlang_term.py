"""Tests for the Erlang External Term Format codec.

Expected bytes are written out from the format's definition (the "External Term
Format" chapter of the ERTS user's guide): version byte 131, then a tag and its
data, with every length and fixed-size integer big-endian.
"""

from __future__ import annotations

import math
import struct
import zlib

import pytest

from obanpro import erlang_term
from obanpro.erlang_term import decode, decode_base64, encode, encode_base64

NIL_ATOM = [119, 3, *b"nil"]
TRUE_ATOM = [119, 4, *b"true"]
FALSE_ATOM = [119, 5, *b"false"]


def term(*parts: int) -> bytes:
    return bytes([131, *parts])


# --- exact bytes -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, term(97, 0)),
        (1, term(97, 1)),
        (255, term(97, 255)),
        (256, term(98, 0, 0, 1, 0)),
        (-1, term(98, 255, 255, 255, 255)),
        (2**31 - 1, term(98, 127, 255, 255, 255)),
        (-(2**31), term(98, 128, 0, 0, 0)),
        # SMALL_BIG_EXT: 110, digit count, sign, digits least significant first.
        (2**31, term(110, 4, 0, 0, 0, 0, 128)),
        (-(2**31) - 1, term(110, 4, 1, 1, 0, 0, 128)),
        (2**64, term(110, 9, 0, *[0] * 8, 1)),
        (-(2**64), term(110, 9, 1, *[0] * 8, 1)),
    ],
)
def test_encode_integer_bytes(value: int, expected: bytes) -> None:
    assert encode(value) == expected


def test_encode_largest_small_big() -> None:
    value = 256**255 - 1

    assert encode(value) == term(110, 255, 0, *[255] * 255)


def test_encode_large_big() -> None:
    # LARGE_BIG_EXT: 111, a 4-byte digit count, sign, digits.
    value = 256**255

    assert encode(value) == term(111, 0, 0, 1, 0, 0, *[0] * 255, 1)
    assert encode(-value) == term(111, 0, 0, 1, 0, 1, *[0] * 255, 1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # NEW_FLOAT_EXT: 70 and an IEEE 754 double, big-endian.
        (1.5, term(70, 0x3F, 0xF8, 0, 0, 0, 0, 0, 0)),
        (-2.0, term(70, 0xC0, 0, 0, 0, 0, 0, 0, 0)),
        (0.0, term(70, 0, 0, 0, 0, 0, 0, 0, 0)),
    ],
)
def test_encode_float_bytes(value: float, expected: bytes) -> None:
    assert encode(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # SMALL_ATOM_UTF8_EXT: 119, a 1-byte length, the name.
        (None, term(*NIL_ATOM)),
        (True, term(*TRUE_ATOM)),
        (False, term(*FALSE_ATOM)),
        # BINARY_EXT: 109, a 4-byte length, the bytes.
        ("a", term(109, 0, 0, 0, 1, 97)),
        ("", term(109, 0, 0, 0, 0)),
        ("é", term(109, 0, 0, 0, 2, 0xC3, 0xA9)),
        (b"\x00\xff", term(109, 0, 0, 0, 2, 0, 255)),
        (bytearray(b"ab"), term(109, 0, 0, 0, 2, 97, 98)),
        # NIL_EXT is 106. LIST_EXT is 108, a 4-byte count, the elements, the tail.
        ([], term(106)),
        ((), term(106)),
        ([1, "a"], term(108, 0, 0, 0, 2, 97, 1, 109, 0, 0, 0, 1, 97, 106)),
        ((1, 2), term(108, 0, 0, 0, 2, 97, 1, 97, 2, 106)),
        ([[]], term(108, 0, 0, 0, 1, 106, 106)),
        # MAP_EXT: 116, a 4-byte pair count, then key, value, key, value.
        ({}, term(116, 0, 0, 0, 0)),
        ({"a": 1}, term(116, 0, 0, 0, 1, 109, 0, 0, 0, 1, 97, 97, 1)),
        ({1: None}, term(116, 0, 0, 0, 1, 97, 1, *NIL_ATOM)),
        (
            {"ok": True, "n": [2]},
            term(
                116, 0, 0, 0, 2,
                109, 0, 0, 0, 2, *b"ok", *TRUE_ATOM,
                109, 0, 0, 0, 1, *b"n", 108, 0, 0, 0, 1, 97, 2, 106,
            ),
        ),
    ],
)  # fmt: skip
def test_encode_exact_bytes(value: object, expected: bytes) -> None:
    assert encode(value) == expected


def test_encode_bool_is_atom_not_integer() -> None:
    assert encode(True) != encode(1)
    assert decode(encode(True)) is True
    assert decode(encode(False)) is False


def test_encode_base64_strips_padding() -> None:
    assert encode_base64(1) == "g2EB"
    assert encode_base64("a") == "g20AAAABYQ"
    assert encode_base64({"ok": True}) == "g3QAAAABbQAAAAJva3cEdHJ1ZQ"


# --- round trips ----------------------------------------------------------------

JSON_LIKE_VALUES = [
    None,
    True,
    0,
    -255,
    2**100,
    -(2**100),
    3**1000,
    0.1,
    -1e300,
    5e-324,
    "",
    "plain",
    "unicode ✓ 日本語 🎉",
    [],
    {},
    [1, [2, [3, [4, []]]]],
    {"users": [{"id": 1, "name": "Ann", "tags": ["a", "b"], "score": 9.5, "active": True}]},
    {"nested": {"deeper": {"deepest": None}}, "empty_list": [], "empty_map": {}},
    {"big": 2**70, "negative": -(2**40), "list": [None, False, 1.25, "x"]},
    {1: "int key", 2.5: "float key", None: "nil key", False: "bool key"},
]


@pytest.mark.parametrize("value", JSON_LIKE_VALUES)
def test_round_trip_json_like(value: object) -> None:
    assert decode(encode(value)) == value


@pytest.mark.parametrize("value", JSON_LIKE_VALUES)
def test_round_trip_base64(value: object) -> None:
    assert decode_base64(encode_base64(value)) == value


def test_round_trip_keeps_float_type() -> None:
    decoded = decode(encode({"whole": 2.0, "int": 2}))

    assert type(decoded["whole"]) is float
    assert type(decoded["int"]) is int


def test_round_trip_negative_zero() -> None:
    decoded = decode(encode(-0.0))

    assert decoded == 0.0
    assert math.copysign(1.0, decoded) == -1.0


def test_round_trip_tuple_becomes_list() -> None:
    assert decode(encode({"pair": (1, (2, 3))})) == {"pair": [1, [2, 3]]}


def test_round_trip_tuple_key_stays_tuple() -> None:
    # The key is encoded as a list, and list keys decode to tuples.
    assert decode(encode({(1, "a"): "x"})) == {(1, "a"): "x"}


def test_round_trip_bytes() -> None:
    assert decode(encode(b"\xff\xfe")) == b"\xff\xfe"
    assert decode(encode(b"utf-8 text")) == "utf-8 text"


# --- decoding other tags ----------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # ATOM_EXT (100) and SMALL_ATOM_EXT (115) hold Latin-1 names.
        (term(100, 0, 2, *b"ok"), "ok"),
        (term(100, 0, 3, *b"nil"), None),
        (term(115, 4, *b"true"), True),
        (term(115, 1, 0xE9), "é"),
        # ATOM_UTF8_EXT (118) has a 2-byte length.
        (term(118, 0, 5, *b"false"), False),
        (term(118, 0, 2, 0xC3, 0xA9), "é"),
        (term(119, 5, *b"error"), "error"),
        # STRING_EXT (107) is a list of bytes with a 2-byte length.
        (term(107, 0, 3, 1, 2, 255), [1, 2, 255]),
        # SMALL_TUPLE_EXT (104) and LARGE_TUPLE_EXT (105).
        (term(104, 2, 97, 1, *NIL_ATOM), (1, None)),
        (term(104, 0), ()),
        (term(105, 0, 0, 0, 1, 106), ([],)),
        # A binary that is not valid UTF-8 stays bytes.
        (term(109, 0, 0, 0, 2, 0xC3, 0x28), b"\xc3\x28"),
        # A map keyed by a list decodes with a tuple key.
        (term(116, 0, 0, 0, 1, 108, 0, 0, 0, 1, 97, 7, 106, 97, 1), {(7,): 1}),
        # LARGE_BIG_EXT with a short magnitude is still valid input.
        (term(111, 0, 0, 0, 1, 1, 5), -5),
    ],
)
def test_decode_accepts_other_tags(data: bytes, expected: object) -> None:
    assert decode(data) == expected


def test_decode_elixir_map_with_latin1_atom() -> None:
    # term_to_binary(%{"ok" => true}) on OTP releases that still wrote ATOM_EXT.
    data = term(116, 0, 0, 0, 1, 109, 0, 0, 0, 2, *b"ok", 100, 0, 4, *b"true")

    assert decode(data) == {"ok": True}


def test_decode_old_float_ext() -> None:
    # FLOAT_EXT (99): the value printed with "%.20e", NUL-padded to 31 bytes.
    text = b"%.20e" % 1.5
    data = term(99, *text.ljust(31, b"\x00"))

    assert decode(data) == 1.5


def test_decode_compressed_term() -> None:
    # Compressed: 131, 80, the inflated size (4 bytes), zlib data of tag and data.
    inner = encode({"numbers": list(range(100))})[1:]
    data = term(80, *struct.pack(">I", len(inner)), *zlib.compress(inner))

    assert decode(data) == {"numbers": list(range(100))}


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = encode([1, 2])

    assert decode(bytearray(data)) == [1, 2]
    assert decode(memoryview(data)) == [1, 2]


def test_decode_base64_accepts_padding() -> None:
    assert decode_base64("g20AAAABYQ") == "a"
    assert decode_base64("g20AAAABYQ==") == "a"
    assert decode_base64("g2EB") == 1


# --- decoding errors ------------------------------------------------------------


def test_decode_every_truncation_raises() -> None:
    data = encode({"list": [1, 2**80, "text", 1.5, None], "map": {"k": (1,)}})

    for end in range(len(data)):
        with pytest.raises(ValueError, match="truncated Erlang term") as raised:
            decode(data[:end])

        assert "offset" in str(raised.value)


def test_decode_truncated_binary_message() -> None:
    with pytest.raises(ValueError) as raised:
        decode(term(109, 0, 0, 0, 5, 97))

    message = str(raised.value)
    assert "tag 109 (BINARY_EXT) at offset 1" in message
    assert "needs 5 bytes at offset 6" in message
    assert "1 byte remain" in message


def test_decode_empty_input() -> None:
    with pytest.raises(ValueError, match="the version byte needs 1 byte at offset 0"):
        decode(b"")


def test_decode_wrong_version() -> None:
    with pytest.raises(ValueError, match="version byte is 132, expected 131"):
        decode(bytes([132, 97, 1]))


def test_decode_unknown_tag() -> None:
    with pytest.raises(ValueError, match=r"tag 200 \(unknown\) at offset 1"):
        decode(term(200))


def test_decode_unsupported_pid_tag() -> None:
    with pytest.raises(ValueError, match=r"unsupported Erlang term: tag 103 \(PID_EXT\)"):
        decode(term(103, 0, 0))


def test_decode_nested_unknown_tag_offset() -> None:
    with pytest.raises(ValueError, match=r"tag 201 \(unknown\) at offset 8"):
        decode(term(108, 0, 0, 0, 2, 97, 1, 201, 106))


def test_decode_improper_list() -> None:
    # [1 | 2]: LIST_EXT with one element and the tail 2 instead of NIL_EXT.
    with pytest.raises(ValueError, match="improper") as raised:
        decode(term(108, 0, 0, 0, 1, 97, 1, 97, 2))

    assert "offset 8" in str(raised.value)
    assert "tag 97 (SMALL_INTEGER_EXT)" in str(raised.value)


def test_decode_trailing_bytes() -> None:
    with pytest.raises(ValueError, match="1 trailing bytes at offset 3"):
        decode(term(97, 1, 0))


def test_decode_count_larger_than_input() -> None:
    with pytest.raises(ValueError, match="declares 4294967295 elements"):
        decode(term(108, 255, 255, 255, 255, 106))


def test_decode_map_key_that_is_a_map() -> None:
    with pytest.raises(ValueError, match="a map key is itself a map"):
        decode(term(116, 0, 0, 0, 1, 116, 0, 0, 0, 0, 97, 1))


def test_decode_too_deep() -> None:
    depth = erlang_term.MAX_DEPTH + 1
    data = term(*[108, 0, 0, 0, 1] * depth, 106, *[106] * depth)

    with pytest.raises(ValueError, match="nested more than"):
        decode(data)


def test_decode_max_depth_is_accepted() -> None:
    depth = erlang_term.MAX_DEPTH
    data = term(*[108, 0, 0, 0, 1] * depth, 97, 1, *[106] * depth)

    value = decode(data)
    for _ in range(depth):
        value = value[0]
    assert value == 1


def test_decode_compressed_wrong_size() -> None:
    inner = encode([1, 2, 3])[1:]
    data = term(80, *struct.pack(">I", len(inner) + 1), *zlib.compress(inner))

    with pytest.raises(ValueError, match="declared"):
        decode(data)


def test_decode_compressed_not_zlib() -> None:
    with pytest.raises(ValueError, match="not valid zlib"):
        decode(term(80, 0, 0, 0, 2, 1, 2, 3, 4))


def test_decode_compressed_inner_error() -> None:
    inner = bytes([108, 0, 0, 0, 1, 97, 1, 97, 2])
    data = term(80, *struct.pack(">I", len(inner)), *zlib.compress(inner))

    with pytest.raises(ValueError, match="improper.*inflated data"):
        decode(data)


def test_decode_rejects_str() -> None:
    with pytest.raises(TypeError, match="expected bytes"):
        decode("g2EB")  # type: ignore[arg-type]


def test_decode_base64_invalid_characters() -> None:
    with pytest.raises(ValueError, match="invalid base64"):
        decode_base64("g2E*")


def test_decode_base64_invalid_length() -> None:
    with pytest.raises(ValueError, match="invalid base64"):
        decode_base64("g2EBg")


def test_decode_base64_rejects_bytes() -> None:
    with pytest.raises(TypeError, match="expected base64 text as str"):
        decode_base64(b"g2EB")  # type: ignore[arg-type]


# --- encoding errors ------------------------------------------------------------


def test_encode_unsupported_type_names_path() -> None:
    with pytest.raises(TypeError) as raised:
        encode({"a": [1, 2, {3}]})

    message = str(raised.value)
    assert "cannot encode set at value['a'][2]" in message
    assert "supported types are" in message


def test_encode_unsupported_top_level() -> None:
    with pytest.raises(TypeError, match="cannot encode object at value as"):
        encode(object())


def test_encode_unsupported_map_key() -> None:
    with pytest.raises(TypeError, match=r"cannot encode frozenset at the key of value\['m'\]"):
        encode({"m": {frozenset(): 1}})


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_encode_non_finite_float(value: float) -> None:
    with pytest.raises(ValueError, match=r"value\[0\]: Erlang floats have no NaN or infinity"):
        encode([value])


def test_encode_lone_surrogate() -> None:
    with pytest.raises(ValueError, match=r"str at value\['s'\] as UTF-8"):
        encode({"s": "\ud800"})


def test_encode_circular_list() -> None:
    items: list = [1]
    items.append(items)

    with pytest.raises(ValueError, match=r"value\[1\]: it contains itself"):
        encode(items)


def test_encode_shared_non_circular_value() -> None:
    shared = [1, 2]

    assert decode(encode([shared, shared])) == [[1, 2], [1, 2]]


def test_encode_duplicate_keys_after_encoding() -> None:
    with pytest.raises(ValueError, match="encodes to the same term as another key"):
        encode({"a": 1, b"a": 2})


def test_encode_too_deep() -> None:
    value: list = []
    for _ in range(erlang_term.MAX_DEPTH + 1):
        value = [value]

    with pytest.raises(ValueError, match="nested more than"):
        encode(value)


def test_encode_base64_raises_like_encode() -> None:
    with pytest.raises(TypeError, match=r"value\['when'\]"):
        encode_base64({"when": object()})
