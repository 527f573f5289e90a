"""When the client context reads a connection's TLS session where reading one leaks (CPython gh-116810)."""

from __future__ import annotations

import itertools

from proxy.upstream.tls import SavedSession, session_read_leaks


def test_the_interpreters_whose_session_read_leaks() -> None:
    assert session_read_leaks((3, 11, 7)) and session_read_leaks((3, 12, 6)) and session_read_leaks((3, 13, 0))
    assert not session_read_leaks((3, 12, 7)) and not session_read_leaks((3, 13, 1))
    assert not session_read_leaks((3, 14, 0))


def test_a_resumed_session_is_kept_and_a_refused_one_is_read_again_at_once() -> None:
    saved = SavedSession()
    assert not saved.read_again(resumed=True, now=10.0)  # the saved session works: no read
    assert saved.read_again(resumed=False, now=300.0)  # it expired: read the new connection's at once
    assert not saved.read_again(resumed=True, now=301.0)  # ... which resumes again
    assert saved.read_again(resumed=False, now=600.0)  # the next expiry: at once again


def test_a_server_that_never_resumes_is_read_less_and_less_often() -> None:
    saved = SavedSession()
    reads = [now for now in range(0, 4 * 3600, 10) if saved.read_again(resumed=False, now=float(now))]
    # One read at once, one on the next connection, then after 60, 120, ... seconds, at most one an hour.
    assert reads[:5] == [0, 10, 70, 190, 430]
    gaps = [b - a for a, b in itertools.pairwise(reads)]
    assert max(gaps) <= 3600 + 10 and gaps[-1] >= 3600
    assert len(reads) < 12
