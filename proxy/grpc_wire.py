"""gRPC's own header values on HTTP/2, pure: deadlines, status messages, pushback, trailers-only answers.

Everything here follows "gRPC over HTTP2" (grpc/doc/PROTOCOL-HTTP2.md) and the retry design (gRFC A6):

- ``grpc-timeout`` is 1–8 ASCII digits and a unit (``H M S m u n``). ``parse_grpc_timeout`` reads one (None for
  anything else); ``format_grpc_timeout`` writes the time left for the next attempt, rounded *down* in the
  finest unit that fits in 8 digits, so an upstream is never told it has more time than the caller gave.
- ``grpc-status``: ``parse_grpc_status`` (garbage and codes above 16 read as UNKNOWN, as clients read them).
- ``grpc-message`` is percent-encoded UTF-8: ``encode_grpc_message`` / ``decode_grpc_message`` (decoding never
  fails: a bad escape is kept as written, bad UTF-8 replaced, as the spec asks).
- ``grpc-retry-pushback-ms``: ``parse_pushback`` gives seconds, None when absent, and ``math.inf`` when the
  server said "do not retry" (negative or garbage) — as a ``retry_after`` for ``decide_retry`` that is exactly
  "longer than max_delay", so the answer is ``retry_after_too_long`` and no second rule is needed.
- ``trailers_only`` is the single header block of an answer the sidecar makes itself to a gRPC caller, and
  ``own_answer_status`` the gRPC status for each of the sidecar's reasons (``x-sidecar-reason``).
"""

from __future__ import annotations

import math
import re
from typing import Final

Header = tuple[bytes, bytes]
UNKNOWN_STATUS: Final = 2  # gRPC's UNKNOWN: what a status that cannot be read is taken for

# ---------------------------------------------------------------------------------------------------------------
# grpc-timeout

_TIMEOUT = re.compile(rb"(\d{1,8})([HMSmun])")
_UNIT_SECONDS: Final = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
# Finest first, as exact fractions of a second (numerator, denominator): the formatter's integer arithmetic.
_UNITS_FINEST_FIRST: Final = (
    (b"n", 1, 1_000_000_000),
    (b"u", 1, 1_000_000),
    (b"m", 1, 1_000),
    (b"S", 1, 1),
    (b"M", 60, 1),
    (b"H", 3600, 1),
)
_MAX_VALUE: Final = 99_999_999  # eight digits
MAX_GRPC_TIMEOUT: Final = b"99999999H"  # about 11,400 years: what any longer time is written as


def parse_grpc_timeout(value: bytes) -> float | None:
    """A ``grpc-timeout`` value in seconds; None when it is not 1–8 digits and one of ``H M S m u n``."""
    match = _TIMEOUT.fullmatch(value)
    if match is None:
        return None
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def format_grpc_timeout(seconds: float) -> bytes:
    """``seconds`` as a ``grpc-timeout`` value: the finest unit whose count fits in 8 digits, rounded down.

    Rounding down means the upstream's deadline is never later than the caller's. The arithmetic is on the
    float's exact value (``as_integer_ratio``), so no float rounding can push it over either. A time already up
    (≤ 0, NaN) is ``0n``, which an upstream fails at once — the exchange should rather answer
    ``deadline_exceeded`` itself than forward it. Longer than 99999999 hours is written as that.
    """
    if not seconds > 0:  # NaN too
        return b"0n"
    if math.isinf(seconds):
        return MAX_GRPC_TIMEOUT
    top, bottom = seconds.as_integer_ratio()
    for unit, per_num, per_den in _UNITS_FINEST_FIRST:
        # count = floor(seconds / (per_num / per_den)), exactly
        count = (top * per_den) // (bottom * per_num)
        if count <= _MAX_VALUE:
            return b"%d%s" % (count, unit)
    return MAX_GRPC_TIMEOUT


# ---------------------------------------------------------------------------------------------------------------
# grpc-status

_STATUS = re.compile(rb"\d{1,3}")


def parse_grpc_status(value: bytes | None) -> int | None:
    """A ``grpc-status`` value: None when absent; a number or garbage outside 0–16 is 2 (UNKNOWN), as gRPC
    clients read it."""
    if value is None:
        return None
    if _STATUS.fullmatch(value) is None or int(value) > 16:
        return UNKNOWN_STATUS
    return int(value)


# ---------------------------------------------------------------------------------------------------------------
# grpc-message


def _is_plain(byte: int) -> bool:
    """Bytes sent as they are: visible ASCII and space, but not '%' (which starts an escape)."""
    return 0x20 <= byte <= 0x7E and byte != 0x25


_ESCAPED: Final = tuple(bytes((b,)) if _is_plain(b) else b"%%%02X" % b for b in range(256))


def encode_grpc_message(text: str) -> bytes:
    """``text`` as a ``grpc-message`` value: UTF-8, percent-encoding every byte outside 0x20–0x7E and '%'."""
    data = text.encode("utf-8", "surrogatepass")
    if all(_is_plain(b) for b in data):
        return data
    return b"".join(_ESCAPED[b] for b in data)


_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")


def decode_grpc_message(value: bytes) -> str:
    """A ``grpc-message`` value as text. Never fails: a '%' not followed by two hex digits stays as written and
    bytes that are not UTF-8 become U+FFFD (the spec: never error or throw the message away)."""
    raw = _ESCAPE.sub(lambda m: bytes((int(m.group(1), 16),)), value) if b"%" in value else value
    return raw.decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------------------------
# grpc-retry-pushback-ms

_PUSHBACK = re.compile(rb"\s*(\d{1,10})\s*")


def parse_pushback(value: bytes | None) -> float | None:
    """``grpc-retry-pushback-ms`` in seconds: None when absent (back off as usual); ``math.inf`` when the server
    said not to retry (a negative or unreadable value, gRFC A6), which ``decide_retry`` turns into
    ``retry_after_too_long`` like any wait longer than ``max_delay``."""
    if value is None:
        return None
    match = _PUSHBACK.fullmatch(value)
    if match is None:
        return math.inf
    return int(match.group(1)) / 1000.0


# ---------------------------------------------------------------------------------------------------------------
# The sidecar's own answers

# The sidecar's reasons (x-sidecar-reason) → gRPC status. Refusals and lost upstreams are UNAVAILABLE (14), which
# gRPC clients may retry and whose message says why; its own deadline is DEADLINE_EXCEEDED (4); a request it
# could not read and its own faults are INTERNAL (13), as gRPC maps HTTP 400 and protocol errors.
_OWN_STATUS: Final = {
    "breaker_open": 14,
    "overload": 14,
    "rate_limited": 14,
    "upstream_cooldown": 14,
    "retry_budget": 14,
    "connect_error": 14,
    "tls_error": 14,
    "reset": 14,
    "bad_response": 14,  # HTTP's 502, UNAVAILABLE in gRPC's HTTP-to-gRPC table
    "timeout": 4,
    "bad_request": 13,
    "internal_error": 13,
}


def own_answer_status(reason: str) -> int:
    """The gRPC status of an answer the sidecar makes itself for ``reason``; 2 (UNKNOWN) for a reason not known."""
    return _OWN_STATUS.get(reason, UNKNOWN_STATUS)


def pushback_ms(retry_after: int | None) -> int | None:
    """An own answer's ``Retry-After`` (whole seconds) as ``grpc-retry-pushback-ms``."""
    return None if retry_after is None else retry_after * 1000


def trailers_only(status: int, message: str, pushback: int | None = None) -> list[Header]:
    """The one header block (END_STREAM set) of a trailers-only gRPC answer: ``:status 200``, the gRPC
    content type, ``grpc-status``, ``grpc-message`` and, when given, ``grpc-retry-pushback-ms``.

    HTTP 200 because a gRPC client reads the status from ``grpc-status``: grpcio reports a 503 on a stream as
    UNKNOWN, and a trailers-only 14 as UNAVAILABLE with its message."""
    headers: list[Header] = [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"%d" % status),
    ]
    if message:
        headers.append((b"grpc-message", encode_grpc_message(message)))
    if pushback is not None:
        headers.append((b"grpc-retry-pushback-ms", b"%d" % max(0, pushback)))
    return headers
