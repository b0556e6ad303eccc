"""Canonical CBOR (ledger/encoding.py): round trip, determinism, and strict rejection.

The reference encoder below is written from RFC 8949 (sections 3 and 4.2) without
cbor2, so agreement with ``encode`` is evidence, and its knobs (a wider header
here, an unsorted or duplicated map there) produce exactly the near-canonical
inputs that ``decode`` must refuse.
"""

from __future__ import annotations

import datetime
import re
import decimal
import enum
import fractions
import math
import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gradledger.ledger import encoding as E
from gradledger.ledger.errors import EncodingError, UnusableInput

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

U64 = 1 << 64
BOUNDARY_INTS = [
    0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1,
    -1, -24, -25, -256, -257, -65536, -65537, -(2**32), -(2**32) - 1, -(2**64),
]

# -- data model strategies -------------------------------------------------

ints = st.one_of(st.integers(-U64, U64 - 1), st.sampled_from(BOUNDARY_INTS))
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.floats(width=16, allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, 1.5, 65504.0, 65505.0, 2.0**-24, 2.0**-25, 2.0**-149, 5e-324,
                     3.4028234663852886e38, 1e300, math.inf, -math.inf, math.nan]),
)
texts = st.one_of(st.text(max_size=24), st.text(min_size=24, max_size=300))
blobs = st.one_of(st.binary(max_size=24), st.binary(min_size=24, max_size=300))
scalars = st.one_of(ints, blobs, texts, floats, st.booleans(), st.none())
keys = st.text(max_size=12)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(keys, children, max_size=6),
    ),
    max_leaves=24,
)
small_values = st.recursive(
    st.one_of(ints, st.binary(max_size=8), st.text(max_size=8), floats, st.booleans(), st.none()),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=4), children, max_size=3)),
    max_leaves=8,
)


def same(a, b) -> bool:
    """Type-strict structural equality: True is not 1, -0.0 is not 0.0, NaN equals NaN."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if type(a) is list:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if type(a) is dict:
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


# -- an independent reference encoder with mutation knobs -------------------

WIDTHS = (0, 1, 2, 4, 8)  # 0: argument inline in the initial byte


def _min_width(arg: int) -> int:
    return 0 if arg < 24 else 1 if arg < 256 else 2 if arg < 65536 else 4 if arg < 2**32 else 8


def _head(major: int, arg: int, width: int) -> bytes:
    ai = {0: arg, 1: 24, 2: 25, 4: 26, 8: 27}[width]
    return bytes([major << 5 | ai]) + (arg.to_bytes(width, "big") if width else b"")


def _float_forms(x: float) -> list[bytes]:
    """Every exact encoding of x, shortest first (the first is the canonical one)."""
    if math.isnan(x):
        return [b"\xf9\x7e\x00", b"\xfa\x7f\xc0\x00\x00", b"\xfb\x7f\xf8\x00\x00\x00\x00\x00\x00"]
    forms = []
    for fmt, ib in (("e", 0xF9), ("f", 0xFA), ("d", 0xFB)):
        try:
            packed = struct.pack(">" + fmt, x)
        except OverflowError:
            continue
        if struct.unpack(">" + fmt, packed)[0] == x:
            forms.append(bytes([ib]) + packed)
    return forms


class Ref:
    """RFC 8949 core deterministic encoder; ``target`` picks one site to spoil.

    Sites are numbered in encoding order: every integer, length header and float.
    mode "widen": that site takes a wider-than-needed form (choice picks which).
    Maps are their own sites for modes "unsorted" and "duplicate".
    """

    def __init__(self, mode: str | None = None, target: int = -1, choice: int = 0) -> None:
        self.mode, self.target, self.choice = mode, target, choice
        self.sites = 0
        self.map_sites = 0
        self.hit = False

    def _site(self) -> bool:
        mine = self.mode == "widen" and self.sites == self.target
        self.sites += 1
        return mine

    def head(self, major: int, arg: int) -> bytes:
        width = _min_width(arg)
        if self._site():
            wider = [w for w in WIDTHS if w > width]
            if wider:
                width = wider[self.choice % len(wider)]
                self.hit = True
        return _head(major, arg, width)

    def enc(self, v) -> bytes:
        t = type(v)
        if t is bool:
            return b"\xf5" if v else b"\xf4"
        if v is None:
            return b"\xf6"
        if t is int:
            return self.head(0, v) if v >= 0 else self.head(1, -1 - v)
        if t is bytes:
            return self.head(2, len(v)) + v
        if t is str:
            data = v.encode("utf-8")
            return self.head(3, len(data)) + data
        if t is float:
            forms = _float_forms(v)
            if self._site() and len(forms) > 1:
                self.hit = True
                return forms[1 + self.choice % (len(forms) - 1)]
            return forms[0]
        if t is list:
            return self.head(4, len(v)) + b"".join(self.enc(x) for x in v)
        if t is dict:
            me = self.map_sites
            self.map_sites += 1
            spoil = self.mode in ("unsorted", "duplicate") and me == self.target
            count = len(v) + (1 if spoil and self.mode == "duplicate" and v else 0)
            out = self.head(5, count)
            pairs = sorted(((ref_key(k), k) for k in v), key=lambda p: p[0])
            if spoil and self.mode == "unsorted" and len(pairs) >= 2:
                pairs.reverse()
                self.hit = True
            if spoil and self.mode == "duplicate" and pairs:
                pairs.insert(self.choice % len(pairs), pairs[self.choice % len(pairs)])
                self.hit = True
            for key_bytes, k in pairs:
                out += key_bytes + self.enc(v[k])
            return out
        raise TypeError(t)


def ref_key(k: str) -> bytes:
    data = k.encode("utf-8")
    return _head(3, len(data), _min_width(len(data))) + data


def ref_encode(v) -> bytes:
    return Ref().enc(v)


def count_sites(v) -> tuple[int, int]:
    r = Ref()
    r.enc(v)
    return r.sites, r.map_sites


def rejects(data: bytes, **kw) -> EncodingError:
    with pytest.raises(EncodingError) as info:
        E.decode(data, **kw)
    return info.value


# -- round trip and determinism --------------------------------------------


@SETTINGS
@given(values)
def test_round_trip(value):
    data = E.encode(value)
    assert same(E.decode(data), value)
    assert E.encode(value, check=True) == data
    # Agreement with the independent reference encoder: canonical bytes.
    assert data == ref_encode(value)
    # decode accepts any bytes-like input.
    assert same(E.decode(bytearray(data)), value)
    assert same(E.decode(memoryview(data)), value)


@pytest.mark.parametrize("value", BOUNDARY_INTS)
def test_integer_boundaries(value):
    data = E.encode(value, check=True)
    assert data == ref_encode(value)
    assert E.decode(data) == value and type(E.decode(data)) is int


@pytest.mark.parametrize(
    "value, hex_",
    [
        (0.0, "f90000"), (-0.0, "f98000"), (1.0, "f93c00"), (1.5, "f93e00"), (65504.0, "f97bff"),
        (math.inf, "f97c00"), (-math.inf, "f9fc00"), (math.nan, "f97e00"), (2.0**-24, "f90001"),
        (100000.0, "fa47c35000"), (3.4028234663852886e38, "fa7f7fffff"), (1.1, "fb3ff199999999999a"),
        (1e300, "fb7e37e43c8800759c"),
    ],
)
def test_float_shortest_form(value, hex_):
    # RFC 8949 section 4.2.2 / appendix A examples: the shortest exact width.
    assert E.encode(value).hex() == hex_
    assert same(E.decode(bytes.fromhex(hex_)), value)


def test_nan_and_signed_zero_round_trip():
    assert math.isnan(E.decode(E.encode(math.nan)))
    neg = E.decode(E.encode(-0.0))
    assert neg == 0.0 and math.copysign(1.0, neg) == -1.0


@SETTINGS
@given(st.dictionaries(keys, small_values, min_size=0, max_size=12), st.randoms(use_true_random=False))
def test_encoding_is_independent_of_insertion_order(mapping, rng):
    items = list(mapping.items())
    shuffled = items[:]
    rng.shuffle(shuffled)
    a, b = dict(items), dict(shuffled)
    assert E.encode(a) == E.encode(b) == E.encode(dict(reversed(items)))
    # The wire order of keys is RFC 8949 section 4.2.1's: bytewise on the encoded keys.
    wire_order = list(E.decode(E.encode(b)).keys())
    assert wire_order == sorted(mapping, key=ref_key)
    # ... and nested maps too.
    assert E.encode([a, {"x": b}]) == E.encode([b, {"x": a}])


def test_key_order_is_bytewise_not_lexical_on_text():
    # Shorter keys first because the length is in the header; "b" < "aa".
    mapping = {"aa": 1, "b": 2, "": 3, "a": 4, "\u00e9": 5, "z" * 24: 6, "y" * 23: 7}
    assert list(E.decode(E.encode(mapping))) == ["", "a", "b", "aa", "\u00e9", "y" * 23, "z" * 24]


# -- rejection of non-canonical forms ---------------------------------------


@SETTINGS
@given(values, st.integers(min_value=0, max_value=10_000), st.integers(min_value=0, max_value=3))
def test_non_minimal_header_or_wide_float_rejected(value, site, choice):
    sites, _ = count_sites(value)
    assume(sites > 0)  # true, false and null have no argument to widen
    ref = Ref("widen", site % sites, choice)
    data = ref.enc(value)
    assume(ref.hit)  # a site that can be widened (all but 8-byte arguments / f64 floats)
    assert data != E.encode(value)
    rejects(data)


@pytest.mark.parametrize(
    "hex_",
    [
        "1800", "1817", "190000", "1900ff", "1a0000ffff", "1b00000000ffffffff",  # uint
        "3800", "390000", "3b00000000ffffffff",  # nint
        "5800", "590001ff", "7800", "780161", "9800", "b800", "980180",  # lengths
        "fa3f800000", "fb3ff0000000000000", "fa7fc00000", "fb7ff8000000000000",  # floats
        "f97e01", "f97c01", "fa7f800001",  # NaN payloads are not canonical NaN
    ],
)
def test_known_non_canonical_forms_rejected(hex_):
    rejects(bytes.fromhex(hex_))


@SETTINGS
@given(st.data())
def test_unsorted_map_rejected(data):
    inner = data.draw(st.dictionaries(keys, small_values, min_size=2, max_size=8))
    wrap = data.draw(st.sampled_from(["top", "list", "map"]))
    value = inner if wrap == "top" else [1, inner] if wrap == "list" else {"k": inner}
    # Map sites are numbered in encoding order: the wrapper map of "map" is site 0,
    # so ``inner`` is site 1 there and site 0 otherwise.
    ref = Ref("unsorted", 1 if wrap == "map" else 0)
    encoded = ref.enc(value)
    assert ref.hit and encoded != E.encode(value)
    rejects(encoded)


@SETTINGS
@given(st.dictionaries(keys, small_values, min_size=1, max_size=6), st.integers(0, 50), st.booleans())
def test_duplicate_map_keys_rejected(mapping, choice, nested):
    value = [mapping] if nested else mapping
    ref = Ref("duplicate", 0, choice)
    encoded = ref.enc(value)
    assert ref.hit
    rejects(encoded)


def test_duplicate_keys_with_different_values_rejected():
    rejects(bytes.fromhex("a2616101616102"))  # {"a": 1, "a": 2}


# -- framing: trailing bytes, truncation, indefinite lengths ---------------


@SETTINGS
@given(values, st.binary(min_size=1, max_size=16))
def test_trailing_bytes_rejected(value, suffix):
    rejects(E.encode(value) + suffix)


@FEW
@given(values)
def test_every_proper_prefix_rejected(value):
    data = E.encode(value)
    for cut in range(len(data)):
        rejects(data[:cut])


@pytest.mark.parametrize(
    "hex_",
    [
        "5f4100ff", "5fff", "7f6161ff", "7fff", "9fff", "9f01ff", "bfff", "bf616101ff",
        "825f4100ff00",  # indefinite inside an array
        "a161615f4100ff",  # indefinite as a map value
        "ff",  # a lone break
        "1c", "1d", "1e", "1f", "3c", "3f", "5c", "7c", "9c", "bc", "dc", "df", "fc", "fd", "fe",  # reserved / invalid ai
    ],
)
def test_indefinite_lengths_and_reserved_forms_rejected(hex_):
    rejects(bytes.fromhex(hex_))


# -- tags and simple values -------------------------------------------------


def _tag(n: int) -> bytes:
    width = _min_width(n)
    return _head(6, n, width)


TAG_PAYLOADS = [b"\x00", b"\x20", b"\x40", b"\x60", b"\x80", b"\xa0", b"\xf6", b"\x41\x01", b"\x82\x00\x01",
                b"\x74" + b"2013-03-21T20:04:00Z", b"\xfb\x3f\xf1\x99\x99\x99\x99\x99\x9a"]


@pytest.mark.parametrize(
    "tag",
    [0, 1, 2, 3, 4, 5, 21, 22, 23, 24, 25, 28, 29, 30, 32, 33, 34, 35, 36, 37, 38, 64, 100, 256, 258, 260,
     261, 262, 263, 1004, 1040, 55799, 55800, 55801, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1],
)
@pytest.mark.parametrize("payload", TAG_PAYLOADS)
def test_known_and_unknown_tags_rejected(tag, payload):
    rejects(_tag(tag) + payload)
    rejects(b"\x82\x01" + _tag(tag) + payload)  # nested in an array
    rejects(b"\xa1\x61a" + _tag(tag) + payload)  # as a map value


@SETTINGS
@given(st.integers(0, U64 - 1), small_values)
def test_any_tag_rejected(tag, value):
    rejects(_tag(tag) + E.encode(value))


def test_self_describe_and_shared_reference_tags_rejected():
    rejects(bytes.fromhex("d9d9f7") + E.encode({"a": 1}))  # 55799 self-describe
    rejects(bytes.fromhex("82d81c8000d81d00"))  # 28/29 shared value references
    rejects(bytes.fromhex("d9010283010203"))  # 258 set
    rejects(bytes.fromhex("c249010000000000000000"))  # 2 bignum 2**64


@pytest.mark.parametrize("initial", [*range(0xE0, 0xF4), 0xF7])
def test_one_byte_simple_values_rejected(initial):
    rejects(bytes([initial]))


@pytest.mark.parametrize("simple", range(256))
def test_two_byte_simple_values_rejected(simple):
    rejects(bytes([0xF8, simple]))
    rejects(bytes([0x81, 0xF8, simple]))


def test_false_true_null_accepted():
    assert E.decode(b"\xf4") is False
    assert E.decode(b"\xf5") is True
    assert E.decode(b"\xf6") is None


# -- map keys, UTF-8, depth, size ------------------------------------------


@pytest.mark.parametrize(
    "hex_",
    [
        "a10000",  # {0: 0}
        "a12000",  # {-1: 0}
        "a1416100",  # {h'61': 0}
        "a1f400",  # {false: 0}
        "a1f600",  # {null: 0}
        "a1f93c0000",  # {1.0: 0}
        "a18000",  # {[]: 0}
        "a1a000",  # {{}: 0}
        "a20000616100",  # {0: 0, "a": 0}
        "81a10000",  # nested [{0: 0}]
    ],
)
def test_non_text_map_keys_rejected(hex_):
    rejects(bytes.fromhex(hex_))


@pytest.mark.parametrize("hex_", ["61ff", "61c0", "62c080", "63eda080", "64f4908080", "62c3", "6180"])
def test_invalid_utf8_text_rejected(hex_):
    rejects(bytes.fromhex(hex_))


def _nest(levels: int, kind: str, leaf):
    value = leaf
    for _ in range(levels):
        value = [value] if kind == "list" else {"k": value}
    return value


@pytest.mark.parametrize("kind", ["list", "map"])
def test_depth_limit_is_the_same_for_encode_and_decode(kind):
    # Depth of an item: the top item is at depth 0. Items at depth <= MAX_DEPTH pass.
    ok = _nest(E.MAX_DEPTH, kind, 7)  # the scalar sits at depth MAX_DEPTH
    assert same(E.decode(E.encode(ok, check=True)), ok)
    too_deep = _nest(E.MAX_DEPTH + 1, kind, 7)
    with pytest.raises(EncodingError):
        E.encode(too_deep, check=True)
    rejects(E.encode(too_deep))
    empty_ok = _nest(E.MAX_DEPTH, kind, [])  # the empty list sits at depth MAX_DEPTH
    assert same(E.decode(E.encode(empty_ok, check=True)), empty_ok)
    rejects(E.encode(_nest(E.MAX_DEPTH + 1, kind, [])))


@pytest.mark.parametrize("levels", [E.MAX_DEPTH + 1, 1000, 200_000])
def test_hostile_nesting_fails_cleanly(levels):
    # Refused at the depth limit, without building the nesting: memory stays small whatever the
    # declared depth (a bound on work that does not depend on how loaded the machine is).
    lists, maps = b"\x81" * levels + b"\x00", b"\xa1\x61k" * levels + b"\x00"
    tracemalloc.start()
    try:
        for data in (lists, maps):
            assert "depth" in str(rejects(data)).lower()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"decoder allocated {peak} bytes refusing {levels} levels"


@SETTINGS
@given(values)
def test_max_size_bound(value):
    data = E.encode(value)
    assert same(E.decode(data, max_size=len(data)), value)
    rejects(data, max_size=len(data) - 1)


def test_input_over_default_max_size_rejected_before_parsing():
    data = b"\x5a" + (E.MAX_ENCODED_SIZE).to_bytes(4, "big") + bytes(E.MAX_ENCODED_SIZE)
    assert len(data) > E.MAX_ENCODED_SIZE
    tracemalloc.start()
    try:
        err = rejects(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "limit" in str(err)
    assert peak < 1024 * 1024, f"decoder allocated {peak} bytes before refusing an oversized input"


def test_empty_input_rejected():
    rejects(b"")


@pytest.mark.parametrize(
    "hex_",
    [
        "5bffffffffffffffff", "7bffffffffffffffff", "9bffffffffffffffff", "bbffffffffffffffff",
        "5b7fffffffffffffff", "9b7fffffffffffffff", "bb7fffffffffffffff",
        "5affffffff", "7affffffff", "9affffffff", "baffffffff",
        "5b000000007fffffff", "9b000000007fffffff", "bb000000007fffffff",
        "9bffffffffffffffff00", "825bffffffffffffffff00",  # with a few bytes following
    ],
)
def test_huge_declared_lengths_fail_fast_without_allocating(hex_):
    data = bytes.fromhex(hex_)
    tracemalloc.start()
    try:
        rejects(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"decoder allocated {peak} bytes for a {len(data)}-byte input"


def test_encoding_error_is_unusable_input():
    # The verifier maps UnusableInput to "could not read" (exit 2).
    assert issubclass(EncodingError, UnusableInput)


# -- encode(check=True) ------------------------------------------------------


class Colour(enum.IntEnum):
    RED = 1


class MyStr(str):
    pass


@pytest.mark.parametrize(
    "value",
    [
        (1, 2), {1, 2}, frozenset({1}), datetime.datetime(2024, 1, 1), datetime.date(2024, 1, 1),
        decimal.Decimal("1.5"), fractions.Fraction(1, 3), 2**64, 2**100, -(2**64) - 1, bytearray(b"x"),
        memoryview(b"x"), 1j, object(), Colour.RED, MyStr("x"), {1: "int key"}, {b"k": "bytes key"},
        {("t",): 1}, {None: 1}, [1, (2, 3)], {"a": {"b": {3}}}, [[[[2**64]]]], {"a": [datetime.date.today()]},
        {MyStr("k"): 1},
    ],
    ids=lambda v: re.sub(r" at 0x[0-9a-f]+", "", repr(v)),  # the same ids in every process (pytest-xdist)
)
def test_encode_check_rejects_values_outside_the_model(value):
    with pytest.raises(EncodingError):
        E.encode(value, check=True)


@pytest.mark.parametrize("value", ["\ud800", {"k": "a\udfffb"}, {"\ud83d": 1}])
def test_encode_check_rejects_unencodable_text(value):
    with pytest.raises(EncodingError):
        E.encode(value, check=True)
