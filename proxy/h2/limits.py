"""What an HTTP/2 client may do to a listener before it is told to go away.

Defaults follow nginx and Envoy after CVE-2023-44487 (Rapid Reset: streams opened and reset at once, each costing
the server work and none counting against the concurrency limit) and the 2024 CONTINUATION floods (a header block
that never ends, held in memory frame by frame).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class AbuseLimits:
    max_concurrent_streams: int = 100  # advertised; a stream beyond it is refused (RST_STREAM REFUSED_STREAM)
    max_header_list_size: int = 64 * 1024  # advertised; a larger block ends the connection (ENHANCE_YOUR_CALM)
    max_continuation_frames: int = 32  # per header block (h2 alone allows 64)
    max_resets: int = 200  # client resets plus refused streams within reset_window: more is Rapid Reset
    reset_window: float = 1.0  # seconds
    max_streams_per_connection: int | None = None  # then GOAWAY NO_ERROR: the client opens a new connection


class ResetBudget:
    """A sliding window of the last ``max_resets`` reset times: spent once one more arrives within the window."""

    def __init__(self, max_resets: int, window: float) -> None:
        self._times: deque[float] = deque(maxlen=max_resets)
        self._window = window

    def spend(self, now: float) -> bool:
        """Count one reset at ``now``; True when that makes more than ``max_resets`` within the window."""
        times = self._times
        full = len(times) == times.maxlen
        oldest = times[0] if full else 0.0
        times.append(now)
        return full and now - oldest < self._window
