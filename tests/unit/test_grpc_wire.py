"""gRPC's header values: grpc-timeout both ways, grpc-message, pushback, trailers-only answers."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.grpc_wire import (
    MAX_GRPC_TIMEOUT,
    decode_grpc_message,
    encode_grpc_message,
    format_grpc_timeout,
    own_answer_status,
    parse_grpc_timeout,
    parse_pushback,
    pushback_ms,
    trailers_only,
)

UNIT = {b"H": Fraction(3600), b"M": Fraction(60), b"S": Fraction(1), b"m": Fraction(1, 10**3)}
UNIT |= {b"u": Fraction(1, 10**6), b"n": Fraction(1, 10**9)}


def exact(value: bytes) -> Fraction:
    return int(value[:-1]) * UNIT[value[-1:]]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"1H", 3600.0),
        (b"2M", 120.0),
        (b"3S", 3.0),
        (b"250m", 0.25),
        (b"7u", 7e-6),
        (b"9n", 9e-9),
        (b"0S", 0.0),
        (b"99999999n", 0.099999999),
        (b"00000001S", 1.0),
        (b"99999999H", 99999999 * 3600.0),
    ],
)
def test_a_grpc_timeout_is_up_to_eight_digits_and_a_unit(value: bytes, seconds: float) -> None:
    assert parse_grpc_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"S",
        b"1",
        b"123456789S",
        b"1s",
        b"1h",
        b"1 S",
        b" 1S",
        b"1S ",
        b"-1S",
        b"1.5S",
        b"+1S",
        b"1SS",
        b"\xd9\xa1S",
    ],
)
def test_anything_else_is_no_grpc_timeout(value: bytes) -> None:
    assert parse_grpc_timeout(value) is None


@pytest.mark.parametrize(
    ("seconds", "value"),
    [
        (1e-9, b"1n"),
        (0.0625, b"62500000n"),
        (0.1, b"100000u"),  # 100000000n would be nine digits
        (1.5, b"1500000u"),
        (99.0, b"99000000u"),
        (100.0, b"100000m"),
        (99999.0, b"99999000m"),
        (100000.0, b"100000S"),
        (99999999.0, b"99999999S"),
        (100000000.0, b"1666666M"),  # rounded down: 1666666.67 minutes
        (6e9, b"1666666H"),
    ],
)
def test_the_finest_unit_that_fits_eight_digits_is_used(seconds: float, value: bytes) -> None:
    assert format_grpc_timeout(seconds) == value


def test_the_time_left_is_rounded_down_never_up() -> None:
    # 0.3 is a hair below 3/10 as a float: 299999999.99…n is nine digits, so microseconds, rounded down.
    assert format_grpc_timeout(0.3) == b"299999u"
    assert format_grpc_timeout(0.0999999999) == b"99999999n"  # 99999999.9n → 99999999n, not 100000u
    assert format_grpc_timeout(2.9999999999) == b"2999999u"


@pytest.mark.parametrize("seconds", [0.0, -1.0, -math.inf, math.nan, 1e-10])
def test_a_time_already_up_is_zero(seconds: float) -> None:
    assert format_grpc_timeout(seconds) == b"0n"


@pytest.mark.parametrize("seconds", [math.inf, 1e300, 99999999 * 3600.0 + 3600.0])
def test_a_longer_time_than_eight_digits_of_hours_is_the_longest(seconds: float) -> None:
    assert format_grpc_timeout(seconds) == MAX_GRPC_TIMEOUT


@given(st.floats(min_value=1e-9, max_value=99999999 * 3600.0, allow_nan=False))
def test_formatting_never_exceeds_the_time_and_loses_less_than_one_unit(seconds: float) -> None:
    value = format_grpc_timeout(seconds)
    assert parse_grpc_timeout(value) is not None
    written = exact(value)
    real = Fraction(seconds)
    assert written <= real
    unit = UNIT[value[-1:]]
    assert real - written < unit
    if value[-1:] != b"n":  # a coarser unit only when the finer one overflowed: at least five digits kept
        assert real - written < real / 10**5


@given(st.integers(min_value=1, max_value=99999999), st.sampled_from([b"S", b"M", b"H"]))
def test_whole_seconds_minutes_and_hours_survive_a_round_trip_exactly(count: int, unit: bytes) -> None:
    value = b"%d%s" % (count, unit)
    seconds = parse_grpc_timeout(value)
    assert seconds is not None
    assert exact(format_grpc_timeout(seconds)) == exact(value)


@given(st.integers(min_value=1, max_value=99999999), st.sampled_from([b"m", b"u", b"n"]))
def test_fractions_of_a_second_survive_a_round_trip_within_a_nanosecond(count: int, unit: bytes) -> None:
    value = b"%d%s" % (count, unit)
    seconds = parse_grpc_timeout(value)
    assert seconds is not None
    assert abs(exact(format_grpc_timeout(seconds)) - exact(value)) <= max(UNIT[b"n"], exact(value) / 10**5)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("", b""),
        ("no route to host", b"no route to host"),
        ("100% sure", b"100%25 sure"),
        ("line\nbreak\ttab", b"line%0Abreak%09tab"),
        ("café ☕", b"caf%C3%A9 %E2%98%95"),
        ("~ and !", b"~ and !"),
        ("\x7f", b"%7F"),
    ],
)
def test_grpc_messages_are_percent_encoded_utf8(text: str, value: bytes) -> None:
    assert encode_grpc_message(text) == value
    assert decode_grpc_message(value) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (b"50%", "50%"),
        (b"%zz and %4", "%zz and %4"),
        (b"%e2%98%95", "☕"),  # lower-case hex is read too
        (b"%FF", "\ufffd"),
        (b"raw \xc3\xa9", "raw é"),
    ],
)
def test_decoding_a_message_never_fails(value: bytes, text: str) -> None:
    assert decode_grpc_message(value) == text


@given(st.text())
def test_messages_round_trip(text: str) -> None:
    encoded = encode_grpc_message(text)
    assert all(0x20 <= b <= 0x7E for b in encoded)
    expected = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    assert decode_grpc_message(encoded) == expected


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, None), (b"0", 0.0), (b"250", 0.25), (b"  1500 ", 1.5), (b"9999999999", 9999999.999)],
)
def test_pushback_is_seconds_or_absent(value: bytes | None, seconds: float | None) -> None:
    assert parse_pushback(value) == seconds


@pytest.mark.parametrize("value", [b"-1", b"-0", b"", b"soon", b"1.5", b"12345678901", b"1e3", b"0x10"])
def test_a_negative_or_unreadable_pushback_means_do_not_retry(value: bytes) -> None:
    assert parse_pushback(value) == math.inf


def test_a_trailers_only_answer_is_one_header_block_with_status_and_message() -> None:
    assert trailers_only(14, "circuit breaker for api is open (breaker_open)", 7000) == [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"14"),
        (b"grpc-message", b"circuit breaker for api is open (breaker_open)"),
        (b"grpc-retry-pushback-ms", b"7000"),
    ]
    assert trailers_only(4, "") == [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"4"),
    ]
    assert dict(trailers_only(13, "50% done\n"))[b"grpc-message"] == b"50%25 done%0A"


def test_retry_after_becomes_pushback_milliseconds() -> None:
    assert pushback_ms(None) is None
    assert pushback_ms(3) == 3000


@pytest.mark.parametrize(
    ("reason", "status"),
    [
        ("breaker_open", 14),
        ("overload", 14),
        ("rate_limited", 14),
        ("upstream_cooldown", 14),
        ("retry_budget", 14),
        ("connect_error", 14),
        ("tls_error", 14),
        ("reset", 14),
        ("bad_response", 14),
        ("timeout", 4),
        ("bad_request", 13),
        ("internal_error", 13),
        ("something_new", 2),
    ],
)
def test_the_sidecars_own_reasons_map_to_grpc_statuses(reason: str, status: int) -> None:
    assert own_answer_status(reason) == status
