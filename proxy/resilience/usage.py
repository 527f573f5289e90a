"""What an upstream's answer says about its rate limit, read from its headers: the observations a backend's
``observe`` takes to correct its count.

Two sources, both optional (``UsageHeaders``):

- headers the policy names (``observe: {used: X-MBX-USED-WEIGHT-1M}``): ``used`` weight in the upstream's
  current window, or ``remaining`` weight until ``reset``;
- ``standard``: the IETF httpapi draft's ``RateLimit: "default";r=50;t=30`` (remaining ``r`` until ``t`` seconds
  from now, one item per policy; a missing ``t`` is read as the window ``w`` of the same-named policy in
  ``RateLimit-Policy: "default";q=100;w=60``, which the reset cannot be later than), its earlier forms
  (``RateLimit: remaining=50, reset=30`` and ``RateLimit-Remaining``/``RateLimit-Reset``), and the common
  ``X-RateLimit-Remaining``/``X-RateLimit-Reset``. The first of these present is read.

A reset is seconds from now, except in headers that are often epoch timestamps (a named ``reset`` header and
``X-RateLimit-Reset``, e.g. GitHub's): there a value of at least 1e9 is an epoch time in seconds (1e9 s is 31
years, longer than any rate window, and every current epoch time is above it, 2001-09-09 being 1e9), and one of
at least 1e12 an epoch time in milliseconds. ``wall`` (seconds since the epoch) turns those into seconds from
now. Malformed or negative values are ignored, never raised on: a header is a hint, not an order.

Pure: header names are lower-case bytes, looked up through a callable, so the data plane can hand in its parsed
head as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from proxy.resilience.ratelimit import Backend

EPOCH_SECONDS = 1e9  # a reset at least this large is an epoch time, not seconds from now
EPOCH_MILLISECONDS = 1e12
Header = Callable[[bytes], bytes | None]


@dataclass(frozen=True, slots=True)
class UsageHeaders:
    """Which headers report usage, and which limit (by number in the policy's ``limits``) they correct."""

    used: bytes | None = None
    remaining: bytes | None = None
    reset: bytes | None = None
    limit: int = 0
    standard: bool = False

    def __post_init__(self) -> None:
        for name in ("used", "remaining", "reset"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, value.lower())


@dataclass(frozen=True, slots=True)
class Observation:
    """One report for ``Backend.observe``: ``used`` in the current window, or ``remaining`` until ``reset`` s."""

    limit: int
    used: int | None = None
    remaining: int | None = None
    reset: float | None = None

    def apply(self, backend: Backend, now: float) -> None:
        backend.observe(self.limit, now, used=self.used, remaining=self.remaining, reset=self.reset)


def read_usage(spec: UsageHeaders, header: Header, wall: float) -> list[Observation]:
    """Every observation the answer's headers make under ``spec``; ``wall`` is the time now since the epoch."""
    found: list[Observation] = []
    named = _named(spec, header, wall)
    if named is not None:
        found.append(named)
    if spec.standard:
        found.extend(
            Observation(spec.limit, remaining=remaining, reset=reset) for remaining, reset in _standard(header, wall)
        )
    return found


def _named(spec: UsageHeaders, header: Header, wall: float) -> Observation | None:
    used = _count(header(spec.used)) if spec.used else None
    remaining = _count(header(spec.remaining)) if spec.remaining else None
    reset = _reset(header(spec.reset), wall) if spec.reset and remaining is not None else None
    if used is None and remaining is None:
        return None
    return Observation(spec.limit, used=used, remaining=remaining, reset=reset)


def _standard(header: Header, wall: float) -> list[tuple[int, float]]:
    """(remaining, seconds until reset) for each policy the first standard header present reports."""
    value = header(b"ratelimit")
    if value is not None:
        return _draft(value, header(b"ratelimit-policy"))
    for prefix, epoch_ok in ((b"ratelimit-", False), (b"x-ratelimit-", True)):
        remaining = _count(header(prefix + b"remaining"))
        if remaining is not None:
            reset = _reset(header(prefix + b"reset"), wall if epoch_ok else None)
            return [(remaining, reset)] if reset is not None else []
    return []


def _draft(value: bytes, policy: bytes | None) -> list[tuple[int, float]]:
    """``RateLimit``: items ``"name";r=R;t=T`` (current draft) or members ``remaining=R, reset=T`` (earlier)."""
    windows = {name: _reset(params.get(b"w"), None) for name, params in _members(policy)} if policy else {}
    found: list[tuple[int, float]] = []
    earlier: dict[bytes, bytes] = {}
    for name, params in _members(value):
        key, eq, number = name.partition(b"=")
        if eq:
            earlier[key.strip().lower()] = number.strip()
            continue
        remaining = _count(params.get(b"r"))
        reset = _reset(params.get(b"t"), None)
        if reset is None:
            reset = windows.get(name)
        if remaining is not None and reset is not None:
            found.append((remaining, reset))
    remaining = _count(earlier.get(b"remaining"))
    reset = _reset(earlier.get(b"reset"), None)
    if remaining is not None and reset is not None:
        found.append((remaining, reset))
    return found


def _members(value: bytes) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """A structured-field list, leniently: (item, its ``;key=value`` parameters) per comma-separated member."""
    members = []
    for member in _split(value, b","):
        item, *params = _split(member, b";")
        pairs = {key.strip().lower(): number.strip() for key, _, number in (p.partition(b"=") for p in params)}
        members.append((item.strip(), pairs))
    return members


def _split(value: bytes, separator: bytes) -> list[bytes]:
    """Split on ``separator`` outside double-quoted strings (a policy's name may hold a comma)."""
    parts: list[bytes] = []
    start, quoted, escaped = 0, False, False
    sep = separator[0]
    for index, char in enumerate(value):
        if escaped:
            escaped = False
        elif quoted and char == 0x5C:  # backslash
            escaped = True
        elif char == 0x22:  # double quote
            quoted = not quoted
        elif char == sep and not quoted:
            parts.append(value[start:index])
            start = index + 1
    parts.append(value[start:])
    return parts


def _count(value: bytes | None) -> int | None:
    """A non-negative whole number, or None."""
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isdigit() else None


def _seconds(value: bytes | None) -> float | None:
    """A positive finite number of seconds, or None (a reset of 0 means the window has just reset)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def _reset(value: bytes | None, wall: float | None) -> float | None:
    """Seconds until a reset given as seconds from now or (with ``wall``) as an epoch time in s or ms."""
    seconds = _seconds(value)
    if seconds is None or seconds < EPOCH_SECONDS:
        return seconds
    if wall is None:
        return None  # 31 years from now: not a window any upstream has
    epoch = seconds / 1000 if seconds >= EPOCH_MILLISECONDS else seconds
    left = epoch - wall
    return left if left > 0 else None
