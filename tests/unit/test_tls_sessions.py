"""When the client context reads a connection's TLS session where reading one leaks (CPython gh-116810)."""

from __future__ import annotations

import itertools

from proxy.upstream.tls import SavedSession, session_read_leaks


def test_the_interpreters_whose_session_read_leaks() -> None:
    assert session_read_leaks((3, 11, 7)) and session_read_leaks((3, 12, 6)) and session_read_leaks((3, 13, 0))
    assert not session_read_leaks((3, 12, 7)) and not session_read_leaks((3, 13, 1))
    assert not session_read_leaks((3, 14, 0))


def test_a_reusable_ticket_is_read_once_per_lifetime() -> None:
    """nginx's tickets: resumed again and again until they expire (ssl_session_timeout, 5 minutes)."""
    saved = SavedSession()
    reads: list[int] = []
    for now in range(0, 3600, 10):  # a new connection every 10 s; each read ticket resumes for 300 s
        fresh = not reads or now - reads[-1] < 300
        if saved.read_again(resumed=bool(reads) and fresh, now=float(now)):
            reads.append(now)
    assert reads == list(range(0, 3600, 300))  # the first, then one per expiry (by the first refused connection)


def test_a_server_that_never_resumes_is_read_less_and_less_often() -> None:
    saved = SavedSession()
    reads = [now for now in range(0, 6 * 3600, 10) if saved.read_again(resumed=False, now=float(now))]
    assert reads[:5] == [0, 300, 900, 2100, 4500]  # 5 minutes, doubling...
    gaps = [b - a for a, b in itertools.pairwise(reads)]
    assert gaps[-1] == 3600 and max(gaps) == 3600  # ... to an hour


def test_single_use_tickets_are_read_once_per_five_minutes() -> None:
    """Each read ticket resumes one connection, then is refused: one read (and one resumption) per 5 minutes."""
    saved = SavedSession()
    reads: list[int] = []
    used = True
    for now in range(0, 3600, 10):
        resumed = not used
        used = True
        if saved.read_again(resumed=resumed, now=float(now)):
            reads.append(now)
            used = False
    assert reads == list(range(0, 3600, 300))
