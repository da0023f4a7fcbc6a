"""Encode and decode values in the Erlang External Term Format.

Oban stores the value a job records (``meta.return``) as base64 of the value in
this format, so Elixir nodes and Oban Web read it with ``:erlang.binary_to_term/1``.
oban-py uses the ``erlpack`` package for this. We write our own small codec,
because erlpack ships only as an sdist and needs a compiler at install time.

Python values map to terms as follows:

========================  =============================================
Python                    term
========================  =============================================
None, True, False         the atoms ``nil``, ``true`` and ``false``
int                       integer, of any size
float                     float (NEW_FLOAT_EXT); NaN and infinity raise
str                       binary of its UTF-8 bytes (an Elixir string)
bytes, bytearray          binary
list, tuple               proper list
dict                      map, with keys encoded by the same rules
========================  =============================================

Tuples become lists, not Erlang tuples, because recorded values are JSON-like
data and JSON has no tuple. Elixir code that reads a recorded value then sees
the same shapes it sees in job args and meta.

Decoding also accepts the older atom tags, STRING_EXT, FLOAT_EXT, tuples and
compressed terms. Binaries decode to ``str`` when they are valid UTF-8, else to
``bytes``. The atoms ``nil``, ``true`` and ``false`` decode to None and bool,
any other atom to its name as ``str``.

Tag numbers and layouts follow the "External Term Format" chapter of the ERTS
user's guide (erl_ext_dist).
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
import zlib
from typing import Any

__all__ = ["encode", "decode", "encode_base64", "decode_base64", "MAX_DEPTH"]

VERSION = 131

COMPRESSED = 80
NEW_FLOAT_EXT = 70
SMALL_INTEGER_EXT = 97
INTEGER_EXT = 98
FLOAT_EXT = 99
ATOM_EXT = 100
SMALL_TUPLE_EXT = 104
LARGE_TUPLE_EXT = 105
NIL_EXT = 106
STRING_EXT = 107
LIST_EXT = 108
BINARY_EXT = 109
SMALL_BIG_EXT = 110
LARGE_BIG_EXT = 111
SMALL_ATOM_EXT = 115
MAP_EXT = 116
ATOM_UTF8_EXT = 118
SMALL_ATOM_UTF8_EXT = 119

# Names for error messages, including tags this codec rejects (pids, ports,
# references, funs, bitstrings), so an error names what the input contained.
TAG_NAMES = {
    COMPRESSED: "COMPRESSED",
    NEW_FLOAT_EXT: "NEW_FLOAT_EXT",
    77: "BIT_BINARY_EXT",
    82: "ATOM_CACHE_REF",
    88: "NEW_PID_EXT",
    89: "NEW_PORT_EXT",
    90: "NEWER_REFERENCE_EXT",
    SMALL_INTEGER_EXT: "SMALL_INTEGER_EXT",
    INTEGER_EXT: "INTEGER_EXT",
    FLOAT_EXT: "FLOAT_EXT",
    ATOM_EXT: "ATOM_EXT",
    101: "REFERENCE_EXT",
    102: "PORT_EXT",
    103: "PID_EXT",
    SMALL_TUPLE_EXT: "SMALL_TUPLE_EXT",
    LARGE_TUPLE_EXT: "LARGE_TUPLE_EXT",
    NIL_EXT: "NIL_EXT",
    STRING_EXT: "STRING_EXT",
    LIST_EXT: "LIST_EXT",
    BINARY_EXT: "BINARY_EXT",
    SMALL_BIG_EXT: "SMALL_BIG_EXT",
    LARGE_BIG_EXT: "LARGE_BIG_EXT",
    112: "NEW_FUN_EXT",
    113: "EXPORT_EXT",
    114: "NEW_REFERENCE_EXT",
    SMALL_ATOM_EXT: "SMALL_ATOM_EXT",
    MAP_EXT: "MAP_EXT",
    117: "FUN_EXT",
    ATOM_UTF8_EXT: "ATOM_UTF8_EXT",
    SMALL_ATOM_UTF8_EXT: "SMALL_ATOM_UTF8_EXT",
    120: "V4_PORT_EXT",
    121: "LOCAL_EXT",
}

# Lists, tuples and maps may nest this deep, in both directions. Each level
# takes at most three stack frames, so the limit keeps the recursive encoder and
# decoder under 600 frames, inside Python's default recursion limit of 1000.
# Hostile input then raises ValueError, not RecursionError.
MAX_DEPTH = 200

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

SUPPORTED_TYPES = "None, bool, int, float, str, bytes, bytearray, list, tuple and dict"


def encode(value: Any) -> bytes:
    """Encode ``value`` as an Erlang term, starting with the version byte 131.

    Raises:
        TypeError: a value, or a map key, has a type with no mapping. The
            message names the type and its path, as in ``value['a'][2]``.
        ValueError: a float is NaN or infinite, a str is not encodable as
            UTF-8, two map keys encode to the same term, a container contains
            itself, or nesting is deeper than ``MAX_DEPTH``.
    """
    out = bytearray([VERSION])
    _Encoder(out).encode(value, "value", 0)

    return bytes(out)


def encode_base64(value: Any) -> str:
    """Encode ``value`` as a term and return it as unpadded standard base64.

    This is the text Oban stores in ``meta.return``. Raises as ``encode`` does.
    """
    encoded = base64.b64encode(encode(value)).decode("ascii")

    return encoded.rstrip("=")


def decode(data: bytes | bytearray | memoryview) -> Any:
    """Decode one Erlang term, which must fill ``data`` exactly.

    Raises:
        TypeError: ``data`` is not bytes-like.
        ValueError: the version byte is not 131, a tag is unknown or not
            supported, the input is truncated or has trailing bytes, a list is
            improper, or nesting is deeper than ``MAX_DEPTH``. The message
            names the byte offset and the tag.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"cannot decode {type(data).__name__}: expected bytes")

    decoder = _Decoder(bytes(data))
    decoder.read_version()
    value = decoder.decode_term(0)
    decoder.expect_end()

    return value


def decode_base64(text: str) -> Any:
    """Decode standard base64 of an Erlang term, with or without ``=`` padding.

    Raises:
        TypeError: ``text`` is not a str.
        ValueError: ``text`` is not valid base64, or as ``decode`` raises.
    """
    if not isinstance(text, str):
        raise TypeError(f"cannot decode {type(text).__name__}: expected base64 text as str")

    stripped = text.strip()
    padded = stripped + "=" * (-len(stripped) % 4)

    try:
        data = base64.b64decode(padded, validate=True)
    except binascii.Error as error:
        raise ValueError(
            f"invalid base64 in encoded term {_preview(stripped)}: {error}"
        ) from None

    return decode(data)


def _preview(text: str, limit: int = 40) -> str:
    if len(text) <= limit:
        return repr(text)

    return repr(text[:limit]) + "..."


def _tag_name(tag: int) -> str:
    return f"{tag} ({TAG_NAMES[tag]})" if tag in TAG_NAMES else f"{tag} (unknown)"


def _describe_tag(tag: int, tag_offset: int) -> str:
    return f"tag {_tag_name(tag)} at offset {tag_offset}"


def _count_bytes(count: int) -> str:
    return "1 byte" if count == 1 else f"{count} bytes"


class _Encoder:
    """Encoder that appends terms to ``out``, where ``path`` names the value in errors."""

    def __init__(self, out: bytearray) -> None:
        self.out = out

        # ids of the containers on the path being encoded, to detect cycles
        self.open_containers: set[int] = set()

    def encode(self, value: Any, path: str, depth: int) -> None:
        if value is None:
            self.encode_atom("nil")
        elif value is True:
            self.encode_atom("true")
        elif value is False:
            self.encode_atom("false")
        elif isinstance(value, int):
            self.encode_int(value)
        elif isinstance(value, float):
            self.encode_float(value, path)
        elif isinstance(value, str):
            self.encode_str(value, path)
        elif isinstance(value, (bytes, bytearray)):
            self.encode_binary(bytes(value))
        elif isinstance(value, (list, tuple, dict)):
            self.encode_container(value, path, depth)
        else:
            raise TypeError(
                f"cannot encode {type(value).__name__} at {path} as an Erlang term: "
                f"supported types are {SUPPORTED_TYPES}"
            )

    def encode_atom(self, name: str) -> None:
        encoded = name.encode("utf-8")

        self.out += struct.pack(">BB", SMALL_ATOM_UTF8_EXT, len(encoded))
        self.out += encoded

    def encode_int(self, value: int) -> None:
        if 0 <= value <= 255:
            self.out += struct.pack(">BB", SMALL_INTEGER_EXT, value)
            return

        if INT32_MIN <= value <= INT32_MAX:
            self.out += struct.pack(">Bi", INTEGER_EXT, value)
            return

        # Bignums are a sign byte and the magnitude in little-endian bytes.
        magnitude = abs(value)
        digits = magnitude.to_bytes((magnitude.bit_length() + 7) // 8, "little")
        sign = 1 if value < 0 else 0

        if len(digits) <= 255:
            self.out += struct.pack(">BBB", SMALL_BIG_EXT, len(digits), sign)
        else:
            self.out += struct.pack(">BIB", LARGE_BIG_EXT, len(digits), sign)

        self.out += digits

    def encode_float(self, value: float, path: str) -> None:
        if not math.isfinite(value):
            raise ValueError(
                f"cannot encode {value!r} at {path}: Erlang floats have no NaN or "
                "infinity, so store it as None or a string"
            )

        self.out += struct.pack(">Bd", NEW_FLOAT_EXT, value)

    def encode_str(self, value: str, path: str) -> None:
        try:
            encoded = value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"cannot encode the str at {path} as UTF-8: {error.reason} at index "
                f"{error.start}; remove the lone surrogate or pass bytes"
            ) from None

        self.encode_binary(encoded)

    def encode_binary(self, value: bytes) -> None:
        self.out += struct.pack(">BI", BINARY_EXT, len(value))
        self.out += value

    def encode_container(self, value: list | tuple | dict, path: str, depth: int) -> None:
        if depth >= MAX_DEPTH:
            raise ValueError(
                f"cannot encode {path}: nested more than {MAX_DEPTH} levels deep"
            )

        if id(value) in self.open_containers:
            raise ValueError(f"cannot encode {path}: it contains itself (circular reference)")

        self.open_containers.add(id(value))

        if isinstance(value, dict):
            self.encode_map(value, path, depth)
        else:
            self.encode_list(value, path, depth)

        self.open_containers.discard(id(value))

    def encode_list(self, value: list | tuple, path: str, depth: int) -> None:
        if not value:
            self.out.append(NIL_EXT)
            return

        self.out += struct.pack(">BI", LIST_EXT, len(value))

        for index, item in enumerate(value):
            self.encode(item, f"{path}[{index}]", depth + 1)

        self.out.append(NIL_EXT)

    def encode_map(self, value: dict, path: str, depth: int) -> None:
        self.out += struct.pack(">BI", MAP_EXT, len(value))

        # Python keeps 'a' and b'a' apart, but both encode to the same binary,
        # and a term may not contain a map with duplicate keys.
        seen_keys: set[bytes] = set()

        for key, item in value.items():
            key_path = f"{path}[{key!r}]"
            key_start = len(self.out)

            self.encode(key, f"the key of {key_path}", depth + 1)

            encoded_key = bytes(self.out[key_start:])
            if encoded_key in seen_keys:
                raise ValueError(
                    f"cannot encode the map at {path}: key {key!r} encodes to the same "
                    "term as another key (str and bytes keys with equal bytes collide)"
                )
            seen_keys.add(encoded_key)

            self.encode(item, key_path, depth + 1)


class _Decoder:
    """Decoder of the term in ``data``. ``pos`` is the offset of the next unread byte."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def read_version(self) -> None:
        version = self.read_uint8("the version byte")

        if version == VERSION:
            return

        raise ValueError(
            f"invalid Erlang term at offset 0: version byte is {version}, expected "
            f"{VERSION}; the data is not in the External Term Format"
        )

    def expect_end(self) -> None:
        trailing = len(self.data) - self.pos

        if trailing:
            raise ValueError(
                f"invalid Erlang term: {trailing} trailing bytes at offset {self.pos} "
                "after a complete term"
            )

    def take(self, size: int, what: str) -> bytes:
        remaining = len(self.data) - self.pos

        if size > remaining:
            raise ValueError(
                f"truncated Erlang term: {what} needs {_count_bytes(size)} at offset "
                f"{self.pos}, but {_count_bytes(remaining)} remain"
            )

        chunk = self.data[self.pos : self.pos + size]
        self.pos += size

        return chunk

    def read_uint8(self, what: str) -> int:
        return self.take(1, what)[0]

    def read_unpacked(self, layout: str, what: str) -> Any:
        (value,) = struct.unpack(layout, self.take(struct.calcsize(layout), what))

        return value

    def decode_term(self, depth: int) -> Any:
        tag_offset = self.pos
        tag = self.read_uint8("a tag")
        handler = _HANDLERS.get(tag)

        if handler is None:
            raise ValueError(
                f"unsupported Erlang term: {_describe_tag(tag, tag_offset)}; "
                "only atoms, numbers, binaries, lists, tuples and maps are decoded"
            )

        return handler(self, tag, tag_offset, depth)

    def check_depth(self, depth: int, tag: int, tag_offset: int) -> None:
        if depth >= MAX_DEPTH:
            raise ValueError(
                f"invalid Erlang term: {_describe_tag(tag, tag_offset)} is nested "
                f"more than {MAX_DEPTH} levels deep"
            )

    def check_count(self, count: int, tag: int, tag_offset: int) -> None:
        # Every element takes at least one byte, so a larger count is truncated
        # input, reported before any work is done.
        remaining = len(self.data) - self.pos

        if count > remaining:
            raise ValueError(
                f"truncated Erlang term: {_describe_tag(tag, tag_offset)} declares "
                f"{count} elements, but {_count_bytes(remaining)} remain"
            )

    def decode_small_integer(self, tag: int, tag_offset: int, depth: int) -> int:
        return self.read_uint8(_describe_tag(tag, tag_offset))

    def decode_integer(self, tag: int, tag_offset: int, depth: int) -> int:
        return self.read_unpacked(">i", _describe_tag(tag, tag_offset))

    def decode_big(self, tag: int, tag_offset: int, depth: int) -> int:
        what = _describe_tag(tag, tag_offset)
        size = self.read_uint8(what) if tag == SMALL_BIG_EXT else self.read_unpacked(">I", what)
        sign = self.read_uint8(what)
        magnitude = int.from_bytes(self.take(size, what), "little")

        return -magnitude if sign else magnitude

    def decode_new_float(self, tag: int, tag_offset: int, depth: int) -> float:
        return self.read_unpacked(">d", _describe_tag(tag, tag_offset))

    def decode_old_float(self, tag: int, tag_offset: int, depth: int) -> float:
        # FLOAT_EXT is the float printed with "%.20e", NUL-padded to 31 bytes.
        text = self.take(31, _describe_tag(tag, tag_offset)).rstrip(b"\x00")

        try:
            return float(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise ValueError(
                f"invalid Erlang term: {_describe_tag(tag, tag_offset)} "
                f"contains {text!r}, which is not a float"
            ) from None

    def decode_atom(self, tag: int, tag_offset: int, depth: int) -> Any:
        what = _describe_tag(tag, tag_offset)
        short = tag in (SMALL_ATOM_EXT, SMALL_ATOM_UTF8_EXT)
        size = self.read_uint8(what) if short else self.read_unpacked(">H", what)
        encoding = "utf-8" if tag in (ATOM_UTF8_EXT, SMALL_ATOM_UTF8_EXT) else "latin-1"

        try:
            name = self.take(size, what).decode(encoding)
        except UnicodeDecodeError:
            raise ValueError(
                f"invalid Erlang term: {_describe_tag(tag, tag_offset)} "
                "has an atom name that is not valid UTF-8"
            ) from None

        return _ATOM_VALUES.get(name, name)

    def decode_binary(self, tag: int, tag_offset: int, depth: int) -> str | bytes:
        what = _describe_tag(tag, tag_offset)
        size = self.read_unpacked(">I", what)
        data = self.take(size, what)

        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data

    def decode_string(self, tag: int, tag_offset: int, depth: int) -> list[int]:
        # STRING_EXT is Erlang's compact form of a list of integers 0-255.
        what = _describe_tag(tag, tag_offset)
        size = self.read_unpacked(">H", what)

        return list(self.take(size, what))

    def decode_nil(self, tag: int, tag_offset: int, depth: int) -> list:
        return []

    def decode_list(self, tag: int, tag_offset: int, depth: int) -> list:
        self.check_depth(depth, tag, tag_offset)
        count = self.read_unpacked(">I", _describe_tag(tag, tag_offset))
        self.check_count(count, tag, tag_offset)

        items = [self.decode_term(depth + 1) for _ in range(count)]

        tail_offset = self.pos
        tail_tag = self.read_uint8(f"the tail of the list at offset {tag_offset}")
        if tail_tag != NIL_EXT:
            raise ValueError(
                f"invalid Erlang term at offset {tail_offset}: the list at offset "
                f"{tag_offset} is improper (its tail is tag {_tag_name(tail_tag)}, "
                f"expected {_tag_name(NIL_EXT)}), and Python has no improper lists"
            )

        return items

    def decode_tuple(self, tag: int, tag_offset: int, depth: int) -> tuple:
        self.check_depth(depth, tag, tag_offset)
        what = _describe_tag(tag, tag_offset)
        arity = self.read_uint8(what) if tag == SMALL_TUPLE_EXT else self.read_unpacked(">I", what)
        self.check_count(arity, tag, tag_offset)

        return tuple(self.decode_term(depth + 1) for _ in range(arity))

    def decode_map(self, tag: int, tag_offset: int, depth: int) -> dict:
        self.check_depth(depth, tag, tag_offset)
        arity = self.read_unpacked(">I", _describe_tag(tag, tag_offset))
        self.check_count(arity, tag, tag_offset)

        result = {}

        for _ in range(arity):
            key_offset = self.pos
            key = _hashable_key(self.decode_term(depth + 1), key_offset)
            result[key] = self.decode_term(depth + 1)

        return result

    def decode_compressed(self, tag: int, tag_offset: int, depth: int) -> Any:
        if tag_offset != 1:
            raise ValueError(
                f"invalid Erlang term: {_describe_tag(tag, tag_offset)} may "
                "only follow the version byte"
            )

        size = self.read_unpacked(">I", _describe_tag(tag, tag_offset))
        inflated = self.inflate(self.take(len(self.data) - self.pos, "compressed data"), size)

        # The inflated bytes hold one tag and its data, without a version byte.
        inner = _Decoder(inflated)

        try:
            value = inner.decode_term(depth)
            inner.expect_end()
        except ValueError as error:
            raise ValueError(
                f"{error} (offsets count from the start of the inflated data)"
            ) from None

        return value

    def inflate(self, compressed: bytes, size: int) -> bytes:
        # A max_length of 0 means no limit to zlib, so reject it before inflating.
        if size == 0:
            raise ValueError(
                "invalid Erlang term at offset 1: the compressed term declares 0 bytes"
            )

        inflater = zlib.decompressobj()

        try:
            inflated = inflater.decompress(compressed, size)
        except zlib.error as error:
            raise ValueError(
                f"invalid Erlang term at offset 1: compressed data is not valid zlib: {error}"
            ) from None

        if len(inflated) != size or not inflater.eof or inflater.unused_data:
            raise ValueError(
                f"invalid Erlang term at offset 1: compressed data does not inflate "
                f"to exactly the declared {size} bytes"
            )

        return inflated


_ATOM_VALUES: dict[str, Any] = {"nil": None, "true": True, "false": False}

_HANDLERS = {
    COMPRESSED: _Decoder.decode_compressed,
    NEW_FLOAT_EXT: _Decoder.decode_new_float,
    SMALL_INTEGER_EXT: _Decoder.decode_small_integer,
    INTEGER_EXT: _Decoder.decode_integer,
    FLOAT_EXT: _Decoder.decode_old_float,
    ATOM_EXT: _Decoder.decode_atom,
    SMALL_TUPLE_EXT: _Decoder.decode_tuple,
    LARGE_TUPLE_EXT: _Decoder.decode_tuple,
    NIL_EXT: _Decoder.decode_nil,
    STRING_EXT: _Decoder.decode_string,
    LIST_EXT: _Decoder.decode_list,
    BINARY_EXT: _Decoder.decode_binary,
    SMALL_BIG_EXT: _Decoder.decode_big,
    LARGE_BIG_EXT: _Decoder.decode_big,
    SMALL_ATOM_EXT: _Decoder.decode_atom,
    MAP_EXT: _Decoder.decode_map,
    ATOM_UTF8_EXT: _Decoder.decode_atom,
    SMALL_ATOM_UTF8_EXT: _Decoder.decode_atom,
}


def _hashable_key(key: Any, offset: int) -> Any:
    """Return ``key`` usable as a dict key: lists become tuples, recursively.

    This lets a map keyed by a list, which is how a tuple key is encoded, decode.
    """
    if isinstance(key, list):
        return tuple(_hashable_key(item, offset) for item in key)

    if isinstance(key, tuple):
        return tuple(_hashable_key(item, offset) for item in key)

    if isinstance(key, dict):
        raise ValueError(
            f"unsupported Erlang term at offset {offset}: a map key is itself a map, "
            "which Python cannot use as a dict key"
        )

    return key
